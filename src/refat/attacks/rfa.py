"""Refusal feature ablation (RFA) as an attack: generate with a refusal direction ablated.

RFA is white-box and cheap: no optimisation, forward hooks only. It is the adaptive attack against a
defended model when the directions are re-extracted from that model. Which ablation: ``direction:
worst-case`` (default) lets the attacker choose it by a sweep on harmful validation prompts
(:mod:`.rfa_sweep`: every layer × position in each mode, each layer's own direction at its layer, the
best few together); ``selected`` ablates the directions' defender-style selection (Arditi et al.'s
filters; on a defended model, the base model's layer and position), the reference. Its records are the
refusal rates with and without it: each harmful behaviour and each harmless prompt (over-refusal)
answered plainly (attack ``none``) and under RFA (attack ``rfa``, ``extra["direction"]`` naming the
ablation), generated in four batched passes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from .. import hooks
from ..configs import at_least, fingerprint_data, require
from ..data import prompt_key
from ..directions import Directions
from ..errors import InputError
from ..generation import generate
from ..judges import RefusalStringJudge
from ..models import Model, check_resumable, identity
from ..storage import digest, write_jsonl
from . import rfa_sweep
from .base import NO_ATTACK, AttackContext, AttackRecord, Behaviour, claim_records, string_judge
from .rfa_sweep import Member, SweepConfig

log = logging.getLogger(__name__)

__all__ = ["RFAConfig", "ablation", "applied", "run", "rates", "summarize", "summary"]

KINDS = ("harmful", "harmless")


@dataclass
class RFAConfig:
    # worst-case: the sweep's choice on context.validation (``sweep`` sizes it); selected: the directions' selection
    direction: Literal["selected", "worst-case"] = "worst-case"
    # the selected direction's ablation (the sweep's members carry their own modes and layers):
    mode: hooks.AblationMode = "project"
    # None: ``project`` ablates the whole residual stream (every block input and writer, as Arditi et al.);
    # ``mean`` every block input; ``subtract`` the selected layer only (subtracting at many layers compounds).
    layers: list[int] | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        require(self.mode in hooks.ABLATION_MODES, "mode",
                f"unknown RFA mode {self.mode!r}; use one of {', '.join(hooks.ABLATION_MODES)}")
        require(self.layers is None or len(self.layers) > 0, "layers", "empty (no ablation at all); use none for all")
        at_least(self, 1, "max_new_tokens", "batch_size")


def ablation(model: Model, directions: Directions, config: RFAConfig):
    """The context manager that applies RFA with the selected direction (``direction: selected``)."""
    layers = config.layers
    if layers is None and config.mode == "subtract":
        layers = [directions.selection.layer]
    mean = directions.harmless() if config.mode == "mean" else None
    return hooks.ablate(model, directions.vector(), mode=config.mode, layers=layers, harmless_mean=mean)


def applied(model: Model, directions: Directions, config: RFAConfig,
            chosen: Member | None = None) -> tuple[dict, Callable[[], AbstractContextManager]]:
    """The ablation RFA with ``config`` applies, named as its records name it (``extra["direction"]``: direction,
    description and what was ablated), and a function giving the context manager that applies it: the worst-case
    sweep's ``chosen`` member, or the directions' selection (``direction: selected``). What the attack ablates and
    what the mechanism analysis ablates to compare with it come from here, so they are the same."""
    if config.direction == "worst-case":
        if chosen is None:
            raise ValueError("worst-case RFA needs the sweep's chosen member")
        named = {"direction": "worst-case", "description": chosen.describe(), **asdict(chosen)}
        return named, lambda: rfa_sweep.ablation(model, directions, chosen)
    sel = directions.selection
    if sel is None:
        raise InputError("rfa with direction 'selected' needs directions with a selection (refat directions)")
    named = {"direction": "selected", "description": f"layer {sel.layer}, position {sel.position}, {config.mode}",
             "layer": sel.layer, "position": sel.position, "mode": config.mode}
    return named, lambda: ablation(model, directions, config)


def run(model: Model, behaviours: Sequence[Behaviour], config: RFAConfig = RFAConfig(),
        out_dir: str | Path | None = None, *, judge: RefusalStringJudge | None = None,
        context: AttackContext | None = None, progress: bool = True) -> list[AttackRecord]:
    """Per harmful behaviour and per harmless prompt of ``context.harmless``, a record without attack and one
    under RFA with ``context.directions`` (``extra["kind"]`` says which set; an RFA record's
    ``extra["direction"]`` names the ablation). ``worst-case`` first sweeps on ``context.validation`` (harmful
    prompts none of which is an attacked behaviour) and, with ``out_dir``, writes the sweep to sweep.json. Not
    resumable: with ``out_dir``, records.jsonl is written whole, atomically."""
    context = context or AttackContext()
    directions = context.require("rfa", "directions")
    harmless = [Behaviour(p, "") for p in context.require("rfa", "harmless")]
    judge = string_judge(judge)
    if config.direction == "worst-case":
        validation = context.require("rfa", "validation")
        attacked = {prompt_key(b.goal) for b in behaviours}
        leaked = [p for p in validation if prompt_key(p) in attacked]
        if leaked:
            raise InputError(f"rfa: {len(leaked)} validation prompt(s) are attacked behaviours (e.g. {leaked[0]!r}); "
                             "the attacker must choose its ablation on other prompts")
        result = _sweep(model, directions, validation, config, judge, out_dir, progress)
        named, attack = applied(model, directions, config, result.chosen)
    else:
        named, attack = applied(model, directions, config)
    records = []
    for kind, items in zip(KINDS, (list(behaviours), harmless), strict=True):
        prompts = [b.goal for b in items]
        for name in (NO_ATTACK, "rfa"):
            if name == "rfa":
                with attack():
                    completions = generate(model, prompts, max_new_tokens=config.max_new_tokens,
                                           batch_size=config.batch_size, progress=progress,
                                           desc=f"generating (RFA, {named['description']})")
            else:
                completions = generate(model, prompts, max_new_tokens=config.max_new_tokens,
                                       batch_size=config.batch_size, desc=f"generating ({kind})", progress=progress)
            extra = {"kind": kind} | ({"direction": named} if name == "rfa" else {})
            records += [AttackRecord(name, b.id, b.goal, b.target, b.goal, c, extra=extra,
                                     refused=judge.refuses(c), judge=judge.name)
                        for b, c in zip(items, completions, strict=True)]
    if out_dir is not None:
        write_jsonl(Path(out_dir) / "records.jsonl", [r.to_dict() for r in records])
    return records


def _sweep(model: Model, directions: Directions, validation: list[str], config: RFAConfig, judge: RefusalStringJudge,
           out_dir: str | Path | None, progress: bool) -> rfa_sweep.Sweep:
    """The sweep, or the one ``out_dir/sweep.json`` already holds when ``out_dir`` is claimed for the same model,
    directions, validation prompts, config and judge (:func:`~refat.attacks.base.claim_records`): an interrupted
    attack does not redo its quarter-hour sweep."""
    saved = None if out_dir is None else Path(out_dir) / "sweep.json"
    if saved is not None:
        tensor = directions.diff.contiguous().cpu().numpy().tobytes()
        claim_records(saved.parent, {"attack": "rfa", "config": fingerprint_data(config), "model": identity(model),
                                     "judge": judge.name, "validation": digest([prompt_key(p) for p in validation]),
                                     "directions": hashlib.sha256(tensor).hexdigest()[:16]})
        if saved.exists():
            check_resumable(model, saved.parent)
            log.info("rfa: reusing the sweep in %s", saved)
            return rfa_sweep.Sweep.load(saved)
    result = rfa_sweep.sweep(model, directions, validation, config.sweep, judge=judge,
                             max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, progress=progress)
    if saved is not None:
        result.save(saved)
    return result


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
    """:func:`rates`, the size of each set and the ablation its RFA records name (``direction``: selected or
    worst-case; ``member``: what was ablated, with the sweep's scores for worst-case): the registry's summary."""
    n = {kind: sum(r.extra.get("kind") == kind and r.attack == NO_ATTACK for r in records) for kind in KINDS}
    named = [r.extra["direction"] for r in records if r.attack == "rfa" and "direction" in r.extra]
    if any(d != named[0] for d in named):
        raise ValueError("RFA records name different ablations; summarize them apart")
    member = {"direction": named[0]["direction"],
              "member": {k: v for k, v in named[0].items() if k != "direction"}} if named else {}
    return {**rates(records), "n_harmful": n["harmful"], "n_harmless": n["harmless"], **member}


def summary(records: Sequence[AttackRecord], directions: Directions) -> dict:
    """:func:`summarize` with what it was measured with: the directions' selected layer and position (the
    ablated direction for ``selected``, the reference for ``worst-case``, whose ``member`` names what was
    ablated) and the judge (what every RFA summary shows: demo, ``refat attack rfa``, pipeline)."""
    judges = {r.judge for r in records}
    if len(judges) != 1:
        raise ValueError(f"records judged by {len(judges)} judges ({', '.join(map(str, judges))}); "
                         "summarize them apart")
    sel = directions.selection
    return {**summarize(records), "layer": sel.layer if sel else None, "position": sel.position if sel else None,
            "judge": judges.pop()}
