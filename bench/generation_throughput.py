"""Greedy generation throughput: refat ``generate`` batched vs one-by-one, and vs plain ``hf.generate``.

Tokens are counted per row up to (not including) the first EOS: refat returns texts cut at EOS, so
every variant's output is decoded the same way and re-tokenized with one counting function.
"""

from __future__ import annotations

import torch

from refat.generation import eos_ids, generate
from refat.models import Model

from .common import PROMPTS, interleave, row

TARGET_BATCHED = 3.0


def count_tokens(model: Model, texts: list[str]) -> int:
    return sum(len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def hf_generate(model: Model, prompts: list[str], max_new_tokens: int, eos: list[int]) -> tuple[list[str], int]:
    """Plain ``model.hf.generate`` on the same left-padded batch; returns texts cut at EOS and the exact id count."""
    enc = model.tokenize(prompts)
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        out = model.hf.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                eos_token_id=eos, temperature=None, top_p=None, top_k=None)
    texts, n_ids = [], 0
    for r in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(r) if t in eos), len(r))
        n_ids += cut
        texts.append(model.tokenizer.decode(r[:cut], skip_special_tokens=True))
    return texts, n_ids


def run(model: Model, repeats: int = 5, batch_size: int = 16, max_new_tokens: int = 32) -> tuple[list[dict], dict]:
    prompts = (PROMPTS * (batch_size // len(PROMPTS) + 1))[:batch_size]
    eos = eos_ids(model).tolist()
    fns = {
        "batched": lambda: generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False),
        "one_by_one": lambda: generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=1, progress=False),
        "hf_generate": lambda: hf_generate(model, prompts, max_new_tokens, eos),
    }
    # warm-up: each code path once on a small input (lazy allocations), not a full untimed round
    generate(model, prompts[:2], max_new_tokens=2, batch_size=2, progress=False)
    generate(model, prompts[:1], max_new_tokens=2, batch_size=1, progress=False)
    hf_generate(model, prompts[:2], 2, eos)
    t = interleave(fns, repeats, warmup=0)
    texts = {"batched": t["batched"]["result"], "one_by_one": t["one_by_one"]["result"],
             "hf_generate": t["hf_generate"]["result"][0]}
    tokens = {k: count_tokens(model, v) for k, v in texts.items()}
    tps = {k: tokens[k] / t[k]["median_s"] for k in fns}
    speedup, vs_hf = tps["batched"] / tps["one_by_one"], tps["batched"] / tps["hf_generate"]
    rows = [
        row(f"generate: batched/one-by-one tokens/s (bs={batch_size})", speedup, f">= {TARGET_BATCHED}",
            speedup >= TARGET_BATCHED),
        row(f"generate: ours/hf.generate tokens/s (bs={batch_size})", vs_hf),
    ]
    same = lambda a, b: sum(x == y for x, y in zip(texts[a], texts[b]))  # noqa: E731
    details = {
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "tokens": tokens,
        "hf_generate_exact_ids": t["hf_generate"]["result"][1],
        "tokens_per_s": tps,
        "median_s": {k: v["median_s"] for k, v in t.items()},
        "times_s": {k: v["times_s"] for k, v in t.items()},
        "identical_rows": {"batched_vs_one_by_one": same("batched", "one_by_one"),
                           "batched_vs_hf_generate": same("batched", "hf_generate"), "of": len(prompts)},
    }
    return rows, details
