"""Utility and over-refusal of one model."""

from __future__ import annotations

from pathlib import Path

from ...evals.harness import evaluate_harness
from ...evals.overrefusal import evaluate_overrefusal
from ...evals.utility import evaluate_utility, write_results
from ...judges import from_spec
from ..config import HARMLESS_TEST, OverRefusalSpec, Subject


def utility(ctx, folder: Path, *, subject: Subject) -> None:
    """refat's utility.json and utility_records.jsonl, whichever evaluator scores; lm-eval's own results JSON
    (versions, stderr) beside them when it is lm-eval."""
    config, model = ctx.cfg.utility, ctx.models.get(subject)
    if config.evaluator == "lm-eval":
        evaluate_harness(model, config).save(folder, config)
    else:
        write_results(evaluate_utility(model, config), folder, config)


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
