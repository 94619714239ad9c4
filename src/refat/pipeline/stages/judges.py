"""One judge over every harmful completion of the run; scores cached by judge, behaviour and completion."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ...attacks.base import AttackRecord, read_records
from ...judges import cache_path, cached_scores, judge_name, judge_threshold
from ...storage import write_json, write_jsonl
from ..config import NO_ATTACK


def completions(ctx) -> list[tuple[str, str, AttackRecord]]:
    """(defense, column, record) for every harmful completion; the first RFA attack also gives the
    no-attack column."""
    first_rfa, out = ctx.cfg.first_rfa, []
    for d in ctx.cfg.defenses:
        for spec in ctx.cfg.attacks:
            for r in read_records(ctx.layout.records(d, spec.label)):
                if r.extra.get("kind", "harmful") != "harmful":
                    continue
                if spec.name == "rfa" and r.attack == NO_ATTACK:
                    if spec is first_rfa:
                        out.append((d, NO_ATTACK, r))
                    continue
                out.append((d, spec.label, r))
    return out


def run(ctx, folder: Path, *, spec: str) -> None:
    ctx.models.release(base=True)  # a judge model may need the memory
    name, threshold, items = judge_name(spec), judge_threshold(spec), completions(ctx)
    scores = cached_scores(spec, [(r.goal, r.completion) for _, _, r in items], cache_path(ctx.layout.cache, spec),
                           dtype=ctx.cfg.dtype, device=ctx.cfg.device)
    rows, hits = [], defaultdict(list)
    for score, (d, col, r) in zip(scores, items):
        broke = score > threshold
        group = r.extra.get("behaviour_id", r.behaviour_id)
        hits[d, col].append((group, broke))
        rows.append({"defense": d, "attack": col, "behaviour_id": r.behaviour_id, "behaviour": group,
                     "goal": r.goal, "completion": r.completion, "score": score, "jailbroken": broke, "judge": name})
    rates: dict[str, dict[str, float]] = defaultdict(dict)
    for (d, col), xs in hits.items():
        rates[d][col] = sum(b for _, b in xs) / len(xs)
        by_behaviour = defaultdict(list)
        for g, b in xs:
            by_behaviour[g].append(b)
        if any(len(v) > 1 for v in by_behaviour.values()):  # several prompts per behaviour (templates)
            rates[d][f"{col} best-of-n"] = sum(any(v) for v in by_behaviour.values()) / len(by_behaviour)
    write_jsonl(folder / "verdicts.jsonl", rows)
    write_json(folder / "rates.json", {"judge": name, "spec": spec, "rates": rates})
