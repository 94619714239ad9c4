"""Prefilling: the assistant's answer is made to start with the target's first words.

Open-weight models can be made to continue an answer already begun ("Sure, here is how to"); a
shallowly aligned model then often complies, a deeply aligned one recovers and refuses. The prompt
is the chat-formatted goal followed by the prefill, generated as formatted text. The record's
completion is prefill + continuation (the answer a reader sees) and its verdict judges that whole
answer; ``extra`` holds the prefill, the continuation and the verdict on the continuation alone,
i.e. on what the model itself wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..configs import at_least, require
from ..judges import RefusalStringJudge
from ..models import Model
from .base import AttackContext, AttackRecord, Behaviour
from .transfer import Message, send

__all__ = ["PrefillConfig", "prefill_for", "run"]


@dataclass
class PrefillConfig:
    n_words: int = 5  # the target's first words (ignored when ``prefill`` is given)
    prefill: str | None = None  # one fixed prefill for every behaviour, e.g. "Sure, here is"
    max_new_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self):
        at_least(self, 1, "n_words", "max_new_tokens", "batch_size")
        require(self.prefill is None or bool(self.prefill.strip()), "prefill",
                "empty; set a non-empty string or leave it None to use n_words")


def prefill_for(behaviour: Behaviour, config: PrefillConfig) -> str:
    """The start of the answer: the fixed prefill, else the target's first ``n_words`` words."""
    if config.prefill is not None:
        return config.prefill
    words = behaviour.target.split()
    if not words:
        raise ValueError(f"behaviour {behaviour.id} has an empty target: nothing to prefill (set a fixed prefill)")
    return " ".join(words[:config.n_words])


def run(model: Model, behaviours: Sequence[Behaviour], config: PrefillConfig = PrefillConfig(),
        out_dir: str | Path | None = None, *, judge: RefusalStringJudge | None = None,
        context: AttackContext | None = None, progress: bool = True) -> list[AttackRecord]:
    """One record per behaviour: prompt = the goal, completion = prefill + greedy continuation."""
    if not behaviours:
        raise ValueError("the behaviour set is empty: nothing to attack")
    messages = [Message(b, b.goal, prefill_for(b, config)) for b in behaviours]
    records, _ = send(model, "prefill", messages, config=asdict(config), out_dir=out_dir,
                      max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, judge=judge,
                      progress=progress)
    return records
