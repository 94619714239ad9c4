"""The data stage: the splits and the held-out behaviours, as the run saw them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from ...storage import write_json, write_jsonl


def write(ctx, folder: Path) -> None:
    sets = ctx.inputs.sets
    write_jsonl(folder / "splits.jsonl", [{"kind": kind, "split": s, **e.to_dict()}
                                          for kind in ("harmful", "harmless")
                                          for s, xs in getattr(sets, kind).items() for e in xs])
    write_jsonl(folder / "behaviours.jsonl", [asdict(b) for b in ctx.inputs.behaviours])
    write_json(folder / "hashes.json", ctx.inputs.hashes)
    if ctx.cfg.validation is not None:
        write_jsonl(folder / "validation.jsonl", [{"prompt": p} for p in ctx.inputs.validation])
    if ctx.cfg.behaviours is not None and ctx.cfg.near_duplicates is not None:
        write_json(folder / "near_duplicates.json", {
            "threshold": ctx.cfg.near_duplicates, "kept": len(ctx.inputs.behaviours),
            "dropped": [{"prompt": e.prompt, "closest": closest, "similarity": round(sim, 4)}
                        for e, closest, sim in ctx.inputs.near_duplicates]})
