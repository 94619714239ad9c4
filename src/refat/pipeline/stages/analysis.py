"""The mechanism analysis of one model: what each attack does to its refusal feature."""

from __future__ import annotations

from pathlib import Path

from ...analysis import analyse, residuals
from ...attacks import rfa
from ...attacks.base import read_records
from ...directions import Directions
from ..config import Subject


def run(ctx, folder: Path, *, subject: Subject) -> None:
    a, model = ctx.cfg.analysis, ctx.models.get(subject)
    directions = Directions.load(ctx.layout.directions(subject.directions))
    harmful = [b.goal for b in ctx.inputs.behaviours][:a.max_prompts]
    harmless = ctx.inputs.harmless_test(a.max_prompts)
    attacked = {}
    for spec in ctx.cfg.attacks:
        if spec.entry.prompt_attack:
            prompts = [r.prompt for r in read_records(ctx.layout.records(subject.key, spec.label))]
            if prompts:
                attacked[spec.label] = prompts[:a.max_prompts]
    if a.rfa:
        spec = ctx.cfg.first_rfa
        with rfa.ablation(model, directions, spec.parsed() if spec else rfa.RFAConfig()):
            attacked[spec.label if spec else "rfa"] = residuals(model, harmful, [directions.selection.position],
                                                                batch_size=a.batch_size, desc="residuals (rfa)")
    analyse(model, directions, harmful, harmless, attacked, batch_size=a.batch_size).save(folder)
