"""Training pairs: (harmful prompt, refusal) and (harmless prompt, helpful answer), and their batches.

Targets come from the dataset where it has them, else from the model itself: its own refusals to
harmful prompts it refuses, a varied natural refusal where it complies; its own answers to harmless
prompts without one. Pairs are built once and cached as JSONL with a provenance file.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from .. import hooks
from ..data import DataConfig, Example, affirmative_target, load_dataset, prompt_key, prompt_sets
from ..generation import generate
from ..judges import RefusalStringJudge
from ..losses import target_cross_entropy
from ..models import Model, identity
from ..storage import digest, read_json, read_jsonl, write_json, write_jsonl
from .distributed import main_process_first

__all__ = ["Pair", "Batch", "NATURAL_REFUSALS", "build_pairs", "load_or_build_pairs", "training_pairs", "encode", "collate",
           "response_loss"]

NATURAL_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, but I cannot help with this. It could cause real harm.",
    "I won't help with that, as it could be used to hurt people.",
    "Sorry, I can't provide that information.",
    "I'm not able to help with this request.",
    "I cannot help with that. If you have another question, I'm happy to help.",
    "I'm sorry, I can't do that. It would be unsafe and potentially illegal.",
)


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    harmful: bool
    source: str  # where the response came from: dataset | model | template
    affirmative: str | None = None  # a compliant opening for harmful prompts (CAT/LAT attack target)


def _pick(options: Sequence[str], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def _attack_target(e: Example) -> str:
    """The attack target for a harmful prompt: the dataset's ("Sure, here is ...") or a generic one."""
    return e.target or affirmative_target(e.prompt)


def build_pairs(model: Model, harmful: Sequence[Example], harmless: Sequence[Example], *, exclude: Sequence[str] = (),
                judge: RefusalStringJudge = RefusalStringJudge(), max_new_tokens: int = 64,
                batch_size: int = 16) -> list[Pair]:
    """Make training pairs, leaving out every prompt in ``exclude`` (the evaluation splits)."""
    banned = {prompt_key(p) for p in exclude}
    keep = lambda xs: [e for e in xs if prompt_key(e.prompt) not in banned]  # noqa: E731
    harmful, harmless = keep(harmful), keep(harmless)
    if not harmful or not harmless:
        raise ValueError("no training prompts left after removing evaluation prompts")
    own = generate(model, [e.prompt for e in harmful], max_new_tokens=max_new_tokens, batch_size=batch_size,
                   desc="own refusals")
    pairs = [Pair(e.prompt, c.strip(), True, "model", _attack_target(e)) if judge.refuses(c) and c.strip()
             else Pair(e.prompt, _pick(NATURAL_REFUSALS, e.prompt), True, "template", _attack_target(e))
             for e, c in zip(harmful, own)]
    missing = [e for e in harmless if not e.target]
    answers = dict(zip([e.prompt for e in missing], generate(model, [e.prompt for e in missing],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, desc="own answers"))) if missing else {}
    pairs += [Pair(e.prompt, e.target, False, "dataset") if e.target else Pair(e.prompt, answers[e.prompt].strip(), False, "model")
              for e in harmless]
    return pairs


def load_or_build_pairs(path: str | Path, model: Model, harmful: Sequence[Example], harmless: Sequence[Example],
                        **kwargs) -> list[Pair]:
    """Cached :func:`build_pairs`: reused when the model and input prompts are the same."""
    path = Path(path)
    key = digest([identity(model), [asdict(e) for e in harmful], [asdict(e) for e in harmless],
                  sorted(kwargs.get("exclude", ()))])
    meta = path.with_suffix(".json")
    with main_process_first():  # data parallel: rank 0 builds the cache, the others read it
        if path.exists() and meta.exists() and read_json(meta).get("fingerprint") == key:
            return [Pair(**r) for r in read_jsonl(path)]
        pairs = build_pairs(model, harmful, harmless, **kwargs)
        write_jsonl(path, [asdict(p) for p in pairs])
        sources = Counter(f"{'harmful' if p.harmful else 'harmless'}:{p.source}" for p in pairs)
        write_json(meta, {"fingerprint": key, "model": model.name, "model_source": model.source, "n": len(pairs),
                          "response_sources": sources})
        return pairs


def training_pairs(model: Model, data: DataConfig, n_harmful: int, n_harmless: int, cache: str | Path) -> list[Pair]:
    """Training pairs drawn from outside the val and test splits of ``data`` (cached at ``cache``)."""
    harmful_all, harmless_all = load_dataset(data.harmful), load_dataset(data.harmless)
    sets = prompt_sets(data, harmful_all, harmless_all)
    held_out = [p for kind in ("harmful", "harmless") for s in ("val", "test") for p in sets.prompts(kind, s)]
    banned = {prompt_key(p) for p in held_out}
    harmful = [e for e in harmful_all if prompt_key(e.prompt) not in banned][:n_harmful]
    harmless = [e for e in harmless_all if prompt_key(e.prompt) not in banned][:n_harmless]
    return load_or_build_pairs(cache, model, harmful, harmless, exclude=held_out)


def encode(model: Model, prompt: str, response: str, max_length: int) -> tuple[list[int], int]:
    """Token ids of the chat-formatted prompt followed by the response (and the template's end-of-turn),
    and the prompt length. The response is truncated to fit ``max_length``; an over-long prompt is refused."""
    tok = model.tokenizer
    prompt_text = model.format(prompt)
    full = tok.apply_chat_template(model.messages(prompt, response), tokenize=False)
    rest = full[len(prompt_text):] if full.startswith(prompt_text) else response + (tok.eos_token or "")
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise ValueError(f"training prompt has {len(prompt_ids)} tokens, over max_length={max_length}: {prompt[:80]!r}")
    ids = prompt_ids + tok(rest, add_special_tokens=False)["input_ids"]
    return ids[:max_length], len(prompt_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded so prompts start at position 0
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 on prompt and padding: loss on response tokens only
    harmful: torch.Tensor  # [B] bool
    prompt_lengths: torch.Tensor  # [B]
    prompts: list[str]
    affirm: "Batch | None" = None  # harmful rows with their affirmative targets (CAT/LAT)
    rows: torch.Tensor | None = None  # [B] indices of these rows in the global batch (data parallel shards)
    global_size: int | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.harmful),
                     move(self.prompt_lengths), self.prompts, self.affirm.to(device) if self.affirm else None,
                     self.rows, self.global_size)

    def select(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of ``rows`` (a data-parallel shard); it remembers where its rows came from."""
        take = lambda t: t[rows]  # noqa: E731
        affirm = None
        if self.affirm is not None:
            harmful_rank = self.harmful.long().cumsum(0) - 1  # row -> index among harmful rows
            keep = rows[self.harmful[rows]]
            if len(keep):
                affirm = self.affirm.select(harmful_rank[keep])
        return Batch(take(self.input_ids), take(self.attention_mask), take(self.labels), take(self.harmful),
                     take(self.prompt_lengths), [self.prompts[i] for i in rows.tolist()], affirm,
                     rows if self.rows is None else self.rows[rows], self.global_size or len(self.harmful))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(model: Model, pairs: Sequence[Pair], max_length: int, *, with_affirmative: bool = False) -> Batch:
    encoded = [encode(model, p.prompt, p.response, max_length) for p in pairs]
    width = max(len(ids) for ids, _ in encoded)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, n_prompt) in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, n_prompt:len(row)] = ids[i, n_prompt:len(row)]
    affirm = None
    if with_affirmative and any(p.harmful for p in pairs):
        harmful = [Pair(p.prompt, p.affirmative or "Sure, here is", True, "attack") for p in pairs if p.harmful]
        affirm = collate(model, harmful, max_length)
    return Batch(ids, mask, labels, torch.tensor([p.harmful for p in pairs]),
                 torch.tensor([n for _, n in encoded]), [p.prompt for p in pairs], affirm)


def response_loss(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                  forward=None, reduction: Literal["mean", "sum"] = "sum") -> torch.Tensor:
    """Next-token cross-entropy of the labelled (response) tokens; ``forward``: the model's forward if not
    ``model.hf`` (its DDP wrapper).

    The vocabulary projection sees only the positions that predict a labelled token (a pre-hook on the
    output layer selects them): on a 150k-token vocabulary the full logits, their log-softmax and their
    gradients are most of a step's memory, and the prompt and padding positions' share is waste.
    """
    targets = labels[:, 1:]
    predicts = torch.nn.functional.pad(targets != -100, (0, 1))  # [B, T]: position t predicts labelled t + 1

    def select(module, args, kwargs):
        return (args[0][predicts][None], *args[1:]), kwargs  # [1, n_labelled, d]

    with hooks.hooked(pre=[(model.hf.get_output_embeddings(), select)]):
        logits = (forward or model.hf)(input_ids=input_ids, attention_mask=attention_mask).logits
    return target_cross_entropy(logits[0], targets[targets != -100], reduction)
