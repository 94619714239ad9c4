"""Utility and over-refusal of one model."""

from __future__ import annotations

from pathlib import Path

from ...evals.overrefusal import evaluate_overrefusal
from ...evals.utility import evaluate_utility, write_results
from ...judges import from_spec
from ..config import HARMLESS_TEST, OverRefusalSpec, Subject


def utility(ctx, folder: Path, *, subject: Subject) -> None:
    write_results(evaluate_utility(ctx.models.get(subject), ctx.cfg.utility), folder, ctx.cfg.utility)


def overrefusal(ctx, folder: Path, *, subject: Subject, spec: OverRefusalSpec) -> None:
    """One over-refusal set, judged by the set's own judge; ``harmless-test`` is this run's held-out harmless split
    (outside every training and extraction prompt), evaluated whole (or its seeded ``n``)."""
    config, model = spec.config, ctx.models.get(subject)
    judge = from_spec(config.judge, dtype=ctx.cfg.dtype, device=ctx.cfg.device)
    if config.dataset == HARMLESS_TEST:
        result = evaluate_overrefusal(model, config, judge=judge, examples=ctx.inputs.sets.harmless["test"])
        result.dataset = HARMLESS_TEST
    else:
        result = evaluate_overrefusal(model, config, judge=judge)
    result.save(folder)
