"""Utility and over-refusal of one model."""

from __future__ import annotations

from pathlib import Path

from ...evals.overrefusal import evaluate_overrefusal
from ...evals.utility import evaluate_utility, write_results


def utility(ctx, folder: Path, *, defense: str) -> None:
    write_results(evaluate_utility(ctx.models.get(defense), ctx.cfg.utility), folder, ctx.cfg.utility)


def overrefusal(ctx, folder: Path, *, defense: str) -> None:
    evaluate_overrefusal(ctx.models.get(defense), ctx.cfg.overrefusal).save(folder)
