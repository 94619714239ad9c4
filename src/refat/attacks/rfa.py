"""Refusal feature ablation (RFA) as an attack: generate with the refusal direction ablated.

RFA is white-box and cheap: no optimisation, one forward hook. It is the adaptive attack against
a defended model when the directions are re-extracted from that model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from .. import hooks
from ..directions import Directions
from ..generation import generate
from ..judges import RefusalStringJudge, rate, refusal_records
from ..models import Model

__all__ = ["RFAConfig", "RFAResult", "run", "evaluate"]


@dataclass
class RFAConfig:
    mode: hooks.AblationMode = "project"
    # None: ``project`` ablates the whole residual stream (every block input and writer, as Arditi et al.);
    # ``mean`` every block input; ``subtract`` the selected layer only (subtracting at many layers compounds).
    layers: list[int] | None = None
    max_new_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self):
        if self.mode not in hooks.ABLATION_MODES:
            raise ValueError(f"unknown RFA mode {self.mode!r}; use one of {', '.join(hooks.ABLATION_MODES)}")


def ablation(model: Model, directions: Directions, config: RFAConfig):
    """The context manager that applies RFA with the selected direction."""
    layers = config.layers
    if layers is None and config.mode == "subtract":
        layers = [directions.selection.layer]
    mean = directions.harmless() if config.mode == "mean" else None
    return hooks.ablate(model, directions.vector(), mode=config.mode, layers=layers, harmless_mean=mean)


def run(model: Model, prompts: Sequence[str], directions: Directions, config: RFAConfig = RFAConfig()) -> list[str]:
    """Completions of ``prompts`` under RFA."""
    with ablation(model, directions, config):
        return generate(model, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                        desc=f"generating (RFA {config.mode})")


@dataclass
class RFAResult:
    records: list[dict]
    rates: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(model: Model, directions: Directions, harmful: Sequence[str], harmless: Sequence[str],
             config: RFAConfig = RFAConfig(), judge: RefusalStringJudge = RefusalStringJudge()) -> RFAResult:
    """Refusal rates on harmful and harmless prompts, with and without RFA, with per-prompt records."""
    records, rates = [], {}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        for attacked in (False, True):
            if attacked:
                completions = run(model, prompts, directions, config)
            else:
                completions = generate(model, prompts, max_new_tokens=config.max_new_tokens,
                                       batch_size=config.batch_size, desc=f"generating ({kind})")
            rows = refusal_records(prompts, completions, judge, kind=kind, attack="rfa" if attacked else "none")
            rates[f"{kind}_refusal_rate{'_rfa' if attacked else ''}"] = rate(rows)
            records.extend(rows)
    return RFAResult(records, rates)
