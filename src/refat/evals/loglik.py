"""Log-likelihood primitives shared by the utility benchmarks and the classifier judges.

``continuation_logprobs`` scores (context, continuation) pairs the way lm-evaluation-harness does
(trailing context whitespace moved into the continuation, the continuation's tokens taken from the
tokenized whole); requests sharing the same input (every choice of a one-token-answer question) share
one forward pass, and only the continuation positions go through the vocabulary projection.
``next_token_logprobs`` reads a verdict token (Yes/No, safe/unsafe) off one forward pass.
Both run under any refat hook, since they call the model's ordinary forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..generation import batched, cache_keyword, new_cache
from ..models import Model, PromptTooLongError
from ..prefix_cache import shared_prefix_length

__all__ = ["LogLik", "continuation_logprobs", "next_token_logprobs", "bos_prefix"]


@dataclass(frozen=True)
class LogLik:
    logprob: float  # sum of the continuation's token log-probabilities
    n_tokens: int
    greedy: bool  # every continuation token is the argmax given what precedes it


def bos_prefix(tokenizer) -> str:
    """The BOS token's text when the tokenizer adds one by default (Llama, Gemma), else ''.

    Raw-text prompts are tokenized without special tokens throughout refat, so the BOS a model was
    trained with is put back as text.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return ""
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """Token ids of context + continuation and the number of continuation tokens (lm-eval's rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    if n_ctx == 0:
        raise ValueError(f"empty context for continuation {continuation!r}: nothing to condition on")
    n_cont = len(whole) - n_ctx
    if n_cont < 1:
        raise ValueError(f"continuation {continuation!r} adds no tokens to its context "
                         f"(context ends {context[-40:]!r})")
    return whole, n_cont


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _forward(model: Model, rows: Sequence[Sequence[int]], keep: int) -> torch.Tensor:
    """Log-softmax over the vocabulary (at least float32) at the last ``keep`` positions of each left-padded row."""
    enc = _left_pad(rows, model.tokenizer.pad_token_id, model.device)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model.hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], position_ids=positions,
                   use_cache=False, logits_to_keep=keep)
    logits = out.logits[:, -keep:]
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


@torch.no_grad()
def continuation_logprobs(model: Model, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                          max_length: int | None = None, progress: bool = True,
                          desc: str = "scoring") -> list[LogLik]:
    """Log-probability of each continuation given its context (raw text, no chat template).

    Contexts longer than ``max_length`` tokens (default: the model's ``max_prompt_tokens``) lose
    their oldest tokens, as in lm-eval.
    """
    if not pairs:
        raise ValueError("no (context, continuation) pairs to score")
    max_length = max_length or model.max_prompt_tokens
    rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # model input -> [(request, targets)]
    for i, (context, continuation) in enumerate(pairs):
        whole, n_cont = _encode_pair(model.tokenizer, context, continuation)
        if n_cont > max_length:
            raise ValueError(f"pair #{i}: the continuation alone has {n_cont} tokens, over max_length={max_length}")
        inp = tuple(whole[:-1][-max_length:])
        rows.setdefault(inp, []).append((i, whole[-n_cont:]))
    order = sorted(rows, key=len, reverse=True)  # longest first: an out-of-memory shows up at once

    def run(chunk: list[tuple[int, ...]]) -> list[list[tuple[int, LogLik]]]:
        keep = max(len(t) for inp in chunk for _, t in rows[inp])
        logp = _forward(model, chunk, keep)
        out = []
        for r, inp in enumerate(chunk):
            scored = []
            for i, targets in rows[inp]:
                lp = logp[r, keep - len(targets):]
                t = torch.tensor(targets, device=lp.device)
                scored.append((i, LogLik(float(lp.gather(-1, t[:, None]).sum()), len(targets),
                                         bool((lp.argmax(-1) == t).all()))))
            out.append(scored)
        return out

    result: list[LogLik | None] = [None] * len(pairs)
    for scored in batched(run, order, batch_size, desc=desc, progress=progress):
        for i, ll in scored:
            result[i] = ll
    return result  # type: ignore[return-value]


@torch.no_grad()
def next_token_logprobs(model: Model, prompts: Sequence[str], token_ids: Sequence[int], *, batch_size: int = 8,
                        skip_whitespace: int = 2, progress: bool = True, desc: str = "judging",
                        reuse_prefix: bool = False) -> torch.Tensor:
    """Log-probabilities ``[len(prompts), len(token_ids)]`` of the given tokens after each raw-text prompt.

    Where the most likely next token is only whitespace (a template that answers after a newline), it
    is appended and the next position read instead, up to ``skip_whitespace`` times. With ``reuse_prefix``
    the prompts' longest common token prefix (a few-shot judge's worked examples) is run once and its
    key/value cache reused for each prompt's remainder, one prompt at a time.
    """
    if not prompts:
        raise ValueError("no prompts to score")
    tok = model.tokenizer
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    too_long = [i for i, r in enumerate(rows) if len(r) > model.max_prompt_tokens]
    if too_long:
        raise PromptTooLongError(f"{len(too_long)} judge prompt(s) exceed max_prompt_tokens={model.max_prompt_tokens} "
                         f"(prompt #{too_long[0]} has {len(rows[too_long[0]])} tokens); shorten the completions")
    wanted = torch.tensor(list(token_ids), dtype=torch.long)
    is_space: dict[int, bool] = {}

    def blank(t: int) -> bool:
        if t not in is_space:
            is_space[t] = t not in wanted and tok.decode([t]).strip() == "" and t not in tok.all_special_ids
        return is_space[t]

    def skip(lp: torch.Tensor, row: list[int], forward) -> torch.Tensor:
        """Past up to ``skip_whitespace`` whitespace tokens (``forward`` reads the next position after a token)."""
        for _ in range(skip_whitespace):
            top = int(lp.argmax())
            if not blank(top):
                break
            row = row + [top]
            lp = forward(row)
        return lp[wanted]

    n_shared = shared_prefix_length(rows, keep=1) if reuse_prefix and len(rows) > 1 else 0
    if n_shared:
        return torch.stack(_with_prefix_cache(model, rows, n_shared, skip, progress=progress, desc=desc))

    def run(chunk: list[list[int]]) -> list[torch.Tensor]:
        logp = _forward(model, chunk, 1)[:, -1].cpu()
        return [skip(logp[r], row, lambda longer: _forward(model, [longer], 1)[0, -1].cpu())
                for r, row in enumerate(chunk)]

    return torch.stack(batched(run, rows, batch_size, desc=desc, progress=progress, sort_key=len, longest_first=True))


def _with_prefix_cache(model: Model, rows: Sequence[list[int]], n_shared: int, skip, *, progress: bool,
                       desc: str) -> list[torch.Tensor]:
    """Each row's next-token log-probabilities, its first ``n_shared`` tokens (shared by all rows) run once:
    every row's remainder runs on the shared key/value cache, which is cropped back to the prefix after it."""
    device, cache, cache_kw = model.device, new_cache(model), cache_keyword(model)
    model.hf(input_ids=torch.tensor([rows[0][:n_shared]], device=device), use_cache=True, logits_to_keep=1,
             **{cache_kw: cache})  # the cache is filled in place

    def forward(ids: list[int], start: int) -> torch.Tensor:
        out = model.hf(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1,
                       position_ids=torch.arange(start, start + len(ids), device=device)[None], **{cache_kw: cache})
        logits = out.logits[0, -1]
        return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1).cpu()

    def one(row: list[int]) -> torch.Tensor:
        try:
            lp = forward(row[n_shared:], n_shared)

            def after(longer: list[int]) -> torch.Tensor:  # one more (whitespace) token, on the cache of the row
                return forward(longer[-1:], len(longer) - 1)
            return skip(lp, row, after)
        finally:
            extra = cache.get_seq_length() - n_shared
            if extra > 0:
                cache.crop(-extra)  # back to the shared prefix

    return batched(lambda chunk: [one(r) for r in chunk], rows, 1, desc=desc, progress=progress)
