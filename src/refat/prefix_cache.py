"""Mean block-input residuals at the last positions of chat-formatted prompts, the shared prefix run once.

Every prompt in a chat template starts with the same tokens (the system prompt and the user turn's
opening: 58 % of ReFAT's recomputation tokens on Qwen2.5, whose template always has a system prompt).
Under causal attention those tokens' keys and values do not depend on what follows, so they are
computed once, expanded over each batch, and only the rest of each prompt runs: left-padded after the
prefix (padding masked out), positions continuing after it. The residuals equal a full forward's up to
float rounding; capture hooks see only the suffix, whose last positions are the ones read.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import hooks
from .generation import batched, cache_keyword, new_cache, position_ids
from .models import Model

__all__ = ["Work", "shared_prefix_length", "mean_block_inputs"]


@dataclass
class Work:
    """What a computation fed the model: forward calls and token positions (padding included)."""

    forwards: int = 0
    tokens: int = 0
    prefix_tokens: int = 0  # of the shared prefix, run once (0: no prefix shared, or sharing off)


def shared_prefix_length(rows: Sequence[Sequence[int]], keep: int) -> int:
    """Length of the token prefix common to all ``rows``, leaving at least ``keep`` tokens of each after it."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - keep
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _prefix_cache(model: Model, ids: list[int], work: Work):
    """The KV cache of ``ids`` (one row), computed once and copied for each batch."""
    cache = new_cache(model)
    model.hf(input_ids=torch.tensor([ids], device=model.device), use_cache=True, logits_to_keep=1,
             **{cache_keyword(model): cache})
    work.forwards += 1
    work.tokens += len(ids)
    work.prefix_tokens = len(ids)
    return cache


@torch.no_grad()
def mean_block_inputs(model: Model, prompts: Sequence[str], positions: list[int], *, batch_size: int = 32,
                      share_prefix: bool = True, desc: str | None = None, progress: bool = False,
                      work: Work | None = None) -> Tensor:
    """[len(positions), n_layers, d_model] float64 means over ``prompts`` of block-input residuals at
    ``positions`` (negative offsets from the end of each formatted prompt).

    With ``share_prefix`` the tokens every prompt starts with run once and batches group prompts of similar
    length (less padding; the means do not depend on the order); without it (or when the prompts share no
    prefix) every prompt runs whole, left-padded, in batches in input order, as ``extract`` always did.
    """
    if not positions or any(p >= 0 for p in positions):
        raise ValueError(f"positions must be non-empty negative offsets from the end, got {positions}")
    work = work if work is not None else Work()
    total = torch.zeros(len(positions), model.n_layers, model.d_model, dtype=torch.float64)
    enc = model.tokenize(list(prompts))  # checks max_prompt_tokens; rows are read back without padding
    rows = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"].cpu(), enc["attention_mask"].cpu())]
    n = shared_prefix_length(rows, keep=-min(positions)) if share_prefix else 0
    prefix = _prefix_cache(model, rows[0][:n], work) if n else None
    pad = model.tokenizer.pad_token_id

    def run(chunk: list[list[int]]) -> list[None]:
        width = max(len(r) for r in chunk) - n
        ids = torch.tensor([[pad] * (width - len(r) + n) + r[n:] for r in chunk], device=model.device)
        mask = torch.tensor([[0] * (width - len(r) + n) + [1] * (len(r) - n) for r in chunk], device=model.device)
        kw = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(chunk))
            kw[cache_keyword(model)] = cache
            pos = position_ids(mask) + n
            mask = torch.cat([mask.new_ones(len(chunk), n), mask], 1)
        else:
            pos = position_ids(mask)
        with hooks.capture(model, positions=positions) as store:
            model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=prefix is not None,
                     logits_to_keep=1, **kw)
        for layer, acts in store.items():
            total[:, layer] += acts[0].double().sum(0).cpu()  # [pos, d], summed over the batch
        work.forwards += 1
        work.tokens += ids.numel()
        return [None] * len(chunk)

    batched(run, rows, batch_size, desc=desc, progress=progress, sort_key=len if n else None)
    return total / len(rows)
