"""Batched greedy generation with left padding and a KV cache; works under any refat hook.

Prompts are sorted by length before batching (less padding), a batch halves itself on
out-of-memory, and finished rows stop counting. Results come back in input order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from .models import Model, PromptTooLongError

__all__ = ["generate", "batched", "forward_last_logits", "greedy_tokens", "new_cache"]

T = TypeVar("T")
R = TypeVar("R")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def batched(fn: Callable[[list[T]], list[R]], items: Sequence[T], batch_size: int, *, desc: str | None = None,
            progress: bool = True, sort_key: Callable[[T], int] | None = None, longest_first: bool = False) -> list[R]:
    """Apply ``fn`` to consecutive batches of ``items``; halve the batch on out-of-memory.

    With ``sort_key`` (a length), items of similar length share a batch (less padding); the results
    still come back in the input order.
    """
    if sort_key is not None:
        order = sorted(range(len(items)), key=lambda i: sort_key(items[i]), reverse=longest_first)
        done = batched(fn, [items[i] for i in order], batch_size, desc=desc, progress=progress)
        out_of_order: list = [None] * len(items)
        for i, r in zip(order, done):
            out_of_order[i] = r
        return out_of_order
    out: list[R] = []
    i = 0
    bar = tqdm(total=len(items), desc=desc, disable=not progress or desc is None, leave=False)
    while i < len(items):
        chunk = list(items[i:i + batch_size])
        try:
            out.extend(fn(chunk))
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e) or batch_size == 1:
                raise
            batch_size //= 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i += len(chunk)
        bar.update(len(chunk))
    bar.close()
    return out


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward_last_logits(model: Model, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits at the last position only (skips the vocabulary projection elsewhere)."""
    out = model.hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=position_ids(enc["attention_mask"]), use_cache=False, logits_to_keep=1)
    return out.logits[:, -1]


@torch.no_grad()
def greedy_tokens(model: Model, attention_mask: torch.Tensor, max_new_tokens: int, **inputs) -> list[list[int]]:
    """Greedy new tokens for a left-padded batch given as ``input_ids=`` or ``inputs_embeds=``, with a KV
    cache; each row is cut before its first end-of-turn token. Refuses a batch whose prompt and
    ``max_new_tokens`` together exceed the model's context (positions past it are not the model's)."""
    mask = attention_mask
    if model.context_length is not None and mask.shape[1] + max_new_tokens > model.context_length:
        raise PromptTooLongError(f"the longest prompt of the batch ({mask.shape[1]} tokens) and max_new_tokens="
                                 f"{max_new_tokens} exceed the model's context length {model.context_length}: lower "
                                 f"max_new_tokens or shorten the prompts")
    eos = eos_ids(model)
    cache = new_cache(model)
    cache_kw = cache_keyword(model)
    done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    new_tokens = []
    step, pos = inputs, position_ids(mask)
    for _ in range(max_new_tokens):
        out = model.hf(**step, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                       **{cache_kw: cache})  # the cache is updated in place
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, model.tokenizer.pad_token_id), nxt)
        new_tokens.append(nxt)
        done |= torch.isin(nxt, eos)
        if done.all():
            break
        step = {"input_ids": nxt.unsqueeze(1)}
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    eos_set = set(eos.tolist())
    rows = torch.stack(new_tokens, 1).tolist() if new_tokens else [[] for _ in range(mask.shape[0])]
    return [row[:next((i for i, t in enumerate(row) if t in eos_set), len(row))] for row in rows]


def _generate_batch(model: Model, prompts: list[str], max_new_tokens: int, formatted: bool = False) -> list[str]:
    enc = model.tokenize(prompts, formatted=formatted)
    rows = greedy_tokens(model, enc["attention_mask"], max_new_tokens, input_ids=enc["input_ids"])
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in rows]


def cache_keyword(model: Model) -> str:
    """transformers 5.x names the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    base = model.hf.get_base_model() if hasattr(model.hf, "get_base_model") else model.hf  # peft wraps the model
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: Model):
    """An empty KV cache laid out for the model's layers (sliding-window ones included), or a plain one
    where the config cannot be read."""
    from transformers import DynamicCache

    base = model.hf.get_base_model() if hasattr(model.hf, "get_base_model") else model.hf
    try:
        return DynamicCache(config=getattr(base, "config", None))
    except (TypeError, ValueError, AttributeError, KeyError):
        return DynamicCache()


def eos_ids(model: Model) -> torch.Tensor:
    ids = set()
    cfg = getattr(model.hf, "generation_config", None)
    for src in (getattr(cfg, "eos_token_id", None), model.tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return torch.tensor(sorted(ids), device=model.device)


def generate(model: Model, instructions: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16,
             progress: bool = True, desc: str = "generating", formatted: bool = False) -> list[str]:
    """Greedy completions of chat-formatted ``instructions`` (in input order).

    With ``formatted`` the texts are already in the chat template (e.g. with a prefilled answer start).
    """
    if not instructions:
        raise ValueError("empty prompt set: nothing to generate")
    length = lambda x: len(model.tokenizer(x if formatted else model.format(x), add_special_tokens=False)["input_ids"])  # noqa: E731
    return batched(lambda chunk: _generate_batch(model, chunk, max_new_tokens, formatted), instructions, batch_size,
                   desc=desc, progress=progress, sort_key=length)
