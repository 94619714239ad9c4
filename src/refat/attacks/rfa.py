"""Refusal feature ablation (RFA) as an attack: generate with the refusal direction ablated.

RFA is white-box and cheap: no optimisation, one forward hook. It is the adaptive attack against
a defended model when the directions are re-extracted from that model. Its records are the refusal
rates with and without it: each harmful behaviour and each harmless prompt (over-refusal) answered
plainly (attack ``none``) and under RFA (attack ``rfa``), generated in four batched passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import hooks
from ..configs import at_least, require
from ..directions import Directions
from ..generation import generate
from ..judges import RefusalStringJudge
from ..models import Model
from ..storage import write_jsonl
from .base import NO_ATTACK, AttackContext, AttackRecord, Behaviour, string_judge

__all__ = ["RFAConfig", "ablation", "run", "rates", "summary"]

KINDS = ("harmful", "harmless")


@dataclass
class RFAConfig:
    mode: hooks.AblationMode = "project"
    # None: ``project`` ablates the whole residual stream (every block input and writer, as Arditi et al.);
    # ``mean`` every block input; ``subtract`` the selected layer only (subtracting at many layers compounds).
    layers: list[int] | None = None
    max_new_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self):
        require(self.mode in hooks.ABLATION_MODES, "mode",
                f"unknown RFA mode {self.mode!r}; use one of {', '.join(hooks.ABLATION_MODES)}")
        require(self.layers is None or len(self.layers) > 0, "layers", "empty (no ablation at all); use none for all")
        at_least(self, 1, "max_new_tokens", "batch_size")


def ablation(model: Model, directions: Directions, config: RFAConfig):
    """The context manager that applies RFA with the selected direction."""
    layers = config.layers
    if layers is None and config.mode == "subtract":
        layers = [directions.selection.layer]
    mean = directions.harmless() if config.mode == "mean" else None
    return hooks.ablate(model, directions.vector(), mode=config.mode, layers=layers, harmless_mean=mean)


def run(model: Model, behaviours: Sequence[Behaviour], config: RFAConfig = RFAConfig(),
        out_dir: str | Path | None = None, *, judge: RefusalStringJudge | None = None,
        context: AttackContext | None = None, progress: bool = True) -> list[AttackRecord]:
    """Per harmful behaviour and per harmless prompt of ``context.harmless``, a record without attack and one
    under RFA with ``context.directions`` (``extra["kind"]`` says which set). Not resumable: with ``out_dir``,
    records.jsonl is written whole, atomically."""
    context = context or AttackContext()
    directions = context.require("rfa", "directions")
    harmless = [Behaviour(p, "") for p in context.require("rfa", "harmless")]
    judge = string_judge(judge)
    records = []
    for kind, items in zip(KINDS, (list(behaviours), harmless), strict=True):
        prompts = [b.goal for b in items]
        for attack in (NO_ATTACK, "rfa"):
            if attack == "rfa":
                with ablation(model, directions, config):
                    completions = generate(model, prompts, max_new_tokens=config.max_new_tokens,
                                           batch_size=config.batch_size, desc=f"generating (RFA {config.mode})",
                                           progress=progress)
            else:
                completions = generate(model, prompts, max_new_tokens=config.max_new_tokens,
                                       batch_size=config.batch_size, desc=f"generating ({kind})", progress=progress)
            records += [AttackRecord(attack, b.id, b.goal, b.target, b.goal, c, extra={"kind": kind},
                                     refused=judge.refuses(c), judge=judge.name)
                        for b, c in zip(items, completions, strict=True)]
    if out_dir is not None:
        write_jsonl(Path(out_dir) / "records.jsonl", [r.to_dict() for r in records])
    return records


def rates(records: Sequence[AttackRecord]) -> dict[str, float]:
    """Refusal rate of each set (harmful, harmless) without and with RFA: the demo table's four numbers."""
    out = {}
    for kind in KINDS:
        for attack in (NO_ATTACK, "rfa"):
            rows = [r for r in records if r.extra.get("kind") == kind and r.attack == attack]
            if not rows:
                raise ValueError(f"no {kind} records {'under RFA' if attack == 'rfa' else 'without attack'}")
            out[f"{kind}_refusal_rate{'_rfa' if attack == 'rfa' else ''}"] = sum(r.refused for r in rows) / len(rows)
    return out


def summarize(records: Sequence[AttackRecord]) -> dict:
    """:func:`rates` and the size of each set (the registry's summary of an RFA run)."""
    n = {kind: sum(r.extra.get("kind") == kind and r.attack == NO_ATTACK for r in records) for kind in KINDS}
    return {**rates(records), "n_harmful": n["harmful"], "n_harmless": n["harmless"]}


def summary(records: Sequence[AttackRecord], directions: Directions) -> dict:
    """:func:`summarize` with what it was measured with: the direction's layer and position and the judge
    (what every RFA summary shows: demo, ``refat attack rfa``, pipeline)."""
    judges = {r.judge for r in records}
    if len(judges) != 1:
        raise ValueError(f"records judged by {len(judges)} judges ({', '.join(map(str, judges))}); "
                         "summarize them apart")
    sel = directions.selection
    return {**summarize(records), "layer": sel.layer, "position": sel.position, "judge": judges.pop()}
