"""One attack on one model: every registered attack through the same call."""

from __future__ import annotations

from pathlib import Path

from ...attacks.base import AttackContext
from ...directions import Directions
from ...storage import write_json
from ..config import AttackSpec, Subject


def run(ctx, folder: Path, *, subject: Subject, spec: AttackSpec) -> None:
    entry, config = spec.entry, spec.parsed()
    behaviours = ctx.inputs.behaviours[:spec.n_behaviours]
    directions = Directions.load(ctx.layout.directions(subject.directions)) if "directions" in entry.needs else None
    context = AttackContext(directions=directions, harmless=ctx.inputs.harmless_test(spec.n_behaviours),
                            validation=ctx.inputs.validation,  # never a held-out behaviour
                            rating_judge=ctx.cfg.rating_judge, seed=ctx.cfg.seed, dtype=ctx.cfg.dtype,
                            device=ctx.cfg.device)
    records = entry.run(ctx.models.get(subject), behaviours, config, folder, judge=ctx.attack_judge, context=context)
    summary = {"attack": spec.name, "label": spec.label, "defense": subject.key, "n_records": len(records),
               "n_behaviours": len(behaviours), **entry.summarize(records), "judge": ctx.attack_judge.name,
               "seconds": round(sum(r.cost.seconds for r in records), 1)}
    if directions is not None:
        summary |= {"layer": directions.selection.layer, "position": directions.selection.position}
    write_json(folder / "summary.json", summary)

