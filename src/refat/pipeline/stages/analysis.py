"""The mechanism analysis of one model: what each attack does to its refusal feature.

Every comparison is paired: an attack's prompts are matched to the clean prompts of the behaviours they attack
(the analysed behaviours are the first ``max_prompts``), and RFA ablates exactly what the experiment's first
RFA attack ablated on this model (the worst-case sweep's chosen member, read from that attack's folder, or the
selected direction), named in ``analysis.json``'s ``ablation``.
"""

from __future__ import annotations

from pathlib import Path

from ...analysis import analyse, paired_prompts, residuals
from ...attacks import rfa
from ...attacks.base import read_records
from ...attacks.rfa_sweep import Sweep
from ...directions import Directions
from ...errors import RunError
from ..config import Subject


def run(ctx, folder: Path, *, subject: Subject) -> None:
    a, model = ctx.cfg.analysis, ctx.models.get(subject)
    directions = Directions.load(ctx.layout.directions(subject.directions))
    behaviours = ctx.inputs.behaviours[:a.max_prompts]
    harmful = [b.goal for b in behaviours]
    harmless = ctx.inputs.harmless_test(a.max_prompts)
    attacked, pairs, left_out = {}, {}, {}
    for spec in ctx.cfg.attacks_on(subject):
        if spec.entry.prompt_attack:
            records = read_records(ctx.layout.records(subject.key, spec.label))
            prompts, index = paired_prompts([b.id for b in behaviours], [(r.behaviour, r.prompt) for r in records],
                                            a.max_prompts)
            if prompts:
                attacked[spec.label], pairs[spec.label] = prompts, index
            else:
                left_out[spec.label] = (f"left out: none of its {len(records)} records attacks one of the "
                                        f"{len(behaviours)} analysed behaviours")
    ablation = None
    if a.rfa:
        spec = ctx.cfg.first_rfa
        label, config = (spec.label, spec.parsed()) if spec else ("rfa", rfa.RFAConfig(direction="selected"))
        chosen = _chosen(ctx, subject, label) if config.direction == "worst-case" else None
        named, apply = rfa.applied(model, directions, config, chosen)
        with apply():
            attacked[label] = residuals(model, harmful, [directions.selection.position], batch_size=a.batch_size,
                                        desc=f"residuals (rfa: {named['description']})")
        ablation = {"attack": label, **named}
    result = analyse(model, directions, harmful, harmless, attacked, pairs=pairs, min_paired=a.min_paired,
                     batch_size=a.batch_size)
    result.ablation, result.notes = ablation, result.notes | left_out
    result.paired |= {k: 0 for k in left_out}
    result.save(folder)


def _chosen(ctx, subject: Subject, label: str):
    """The member the worst-case RFA attack ``label`` chose on this model (its stage wrote the sweep)."""
    path = ctx.layout.sweep(subject.key, label)
    if not path.is_file():
        stage = ctx.layout.name(ctx.layout.attack(subject.key, label))
        raise RunError(f"{path} is missing: the mechanism analysis ablates what worst-case RFA attack {label!r} "
                       f"chose; rerun that attack (--force {stage})")
    return Sweep.load(path).chosen
