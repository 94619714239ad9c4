"""Send fixed attack prompts to a model and judge the answers: transfer replay, and the batched core
that the template and prefilling attacks share.

An attack whose prompts are known in advance (a filled template, a goal with a prefilled answer, a
prompt found on another model) needs no optimisation, only generation. :func:`send` runs such
messages through :func:`~refat.attacks.base.run_attack` (resume, one JSONL line per message,
judging) while generating them in batches: ``run_attack`` asks for one record at a time, and on a
miss the next ``batch_size`` pending messages are generated together. Messages whose chat-formatted
prompt exceeds ``model.max_prompt_tokens`` are skipped, not sent, with the reason kept.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..configs import at_least
from ..errors import InputError
from ..generation import generate
from ..judges import RefusalStringJudge
from ..models import Model, PromptTooLongError
from ..storage import write_jsonl
from .base import AttackCost, AttackRecord, Behaviour, read_records, run_attack, string_judge

__all__ = ["Message", "Skipped", "send", "ReplayConfig", "replay"]


@dataclass(frozen=True)
class Message:
    """One prompt to send: the user message, an optional start of the assistant's answer, and what to keep."""

    behaviour: Behaviour  # its id is the record's key (resume)
    prompt: str
    prefill: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Skipped:
    id: str
    tokens: int
    reason: str


def _formatted(model: Model, m: Message) -> str:
    return model.format(m.prompt) + m.prefill


def send(model: Model, attack: str, messages: Sequence[Message], *, config: object, out_dir: str | Path | None = None,
         max_new_tokens: int = 64, batch_size: int = 16, judge: RefusalStringJudge | None = None,
         progress: bool = True) -> tuple[list[AttackRecord], list[Skipped]]:
    """Records of the messages that fit (in message order) and the ones skipped as too long.

    A record's completion is ``prefill + continuation`` (the whole answer the user would see); with a
    prefill, ``extra`` also holds the prefill, the continuation and the judge's verdict on it alone.
    Skips are written to ``out_dir/skipped.jsonl``.
    """
    if not messages:
        raise ValueError("no messages to send")
    judge = string_judge(judge)
    ids = [m.behaviour.id for m in messages]
    if len(set(ids)) != len(ids):
        raise ValueError("two messages share a behaviour id; each record needs its own id to resume")
    lengths = [len(model.tokenizer(_formatted(model, m), add_special_tokens=False)["input_ids"]) for m in messages]
    fit, skipped = [], []
    for m, n in zip(messages, lengths):
        if n > model.max_prompt_tokens:
            reason = f"prompt has {n} tokens > max_prompt_tokens={model.max_prompt_tokens}"
            skipped.append(Skipped(m.behaviour.id, n, reason))
        else:
            fit.append((n, m))
    if skipped:
        warnings.warn(f"{attack}: skipped {len(skipped)} of {len(messages)} prompts longer than "
                      f"max_prompt_tokens={model.max_prompt_tokens} (e.g. {skipped[0].id}, {skipped[0].tokens} tokens)",
                      stacklevel=2)
    if not fit:
        raise PromptTooLongError(f"{attack}: every prompt exceeds max_prompt_tokens={model.max_prompt_tokens}; "
                                 "raise it (--max-prompt-tokens, within the model's context) or use shorter prompts")
    # similar lengths share a batch (less padding); records are put back in message order at the end
    ordered = [m for _, m in sorted(fit, key=lambda x: x[0])]
    by_id = {m.behaviour.id: m for m in ordered}
    done = {r.behaviour_id for r in read_records(Path(out_dir) / "records.jsonl")} if out_dir is not None else set()
    pending = [m for m in ordered if m.behaviour.id not in done]
    position = {m.behaviour.id: i for i, m in enumerate(pending)}
    ready: dict[str, AttackRecord] = {}

    def fill(start: int) -> None:
        chunk = pending[start:start + batch_size]
        t0 = time.perf_counter()
        outs = generate(model, [_formatted(model, m) for m in chunk], max_new_tokens=max_new_tokens,
                        batch_size=batch_size, formatted=True, progress=False)
        share = round((time.perf_counter() - t0) / len(chunk), 3)
        for m, cont in zip(chunk, outs):
            extra = dict(m.extra)
            if m.prefill:
                extra.update(prefill=m.prefill, continuation=cont, continuation_refused=judge.refuses(cont))
            b = m.behaviour
            ready[b.id] = AttackRecord(attack, b.id, b.goal, b.target, m.prompt, m.prefill + cont,
                                       cost=AttackCost(seconds=share or 1e-3), extra=extra)

    def attack_one(b: Behaviour) -> AttackRecord:
        if b.id not in ready:
            if b.id not in position:  # thought done, but its line was torn: run_attack redoes it
                position[b.id] = len(pending)
                pending.append(by_id[b.id])
            fill(position[b.id])
        return ready.pop(b.id)

    records = run_attack(attack, [m.behaviour for m in ordered], attack_one, config=config, out_dir=out_dir,
                         judge=judge, progress=progress)
    if out_dir is not None:  # after run_attack has accepted the folder (same attack and config)
        write_jsonl(Path(out_dir) / "skipped.jsonl", [asdict(s) for s in skipped])
    got = {r.behaviour_id: r for r in records}
    return [got[m.behaviour.id] for m in messages if m.behaviour.id in got], skipped


@dataclass
class ReplayConfig:
    max_new_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self):
        at_least(self, 1, "max_new_tokens", "batch_size")


def replay(model: Model, records: Sequence[AttackRecord], out_dir: str | Path | None = None, *,
           config: ReplayConfig = ReplayConfig(), judge: RefusalStringJudge = RefusalStringJudge(),
           progress: bool = True) -> list[AttackRecord]:
    """Re-send each record's prompt (and prefill) to ``model`` and judge it: attack ``<orig>-transfer``.

    The records keep their ids, goals, targets and ``extra`` (so e.g. template summaries still work),
    plus ``source_attack``; records of prompts too long for ``model`` are skipped (``skipped.jsonl``).
    """
    if not records:
        raise InputError("no records to replay")
    attacks = sorted({r.attack for r in records})
    if len(attacks) > 1:
        raise InputError(f"records from several attacks ({', '.join(attacks)}); replay one attack's records at a time")
    if any(r.extra.get("transferable") is False for r in records):
        raise InputError(f"{attacks[0]} records cannot be replayed: their attack is not a prompt string "
                         "(e.g. an embedding perturbation)")
    messages = [Message(Behaviour(r.goal, r.target, r.behaviour_id), r.prompt, r.extra.get("prefill", ""),
                        {**{k: v for k, v in r.extra.items() if k not in ("continuation", "continuation_refused")},
                         "source_attack": r.attack, "source_refused": r.refused})
                for r in records]
    cfg = {**config.__dict__, "source_attack": attacks[0]}
    out, _ = send(model, f"{attacks[0]}-transfer", messages, config=cfg, out_dir=out_dir,
                  max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, judge=judge, progress=progress)
    return out
