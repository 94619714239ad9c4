"""Direction extraction throughput: ``refat.directions.extract`` vs the bare forward passes it needs.

Both variants tokenize the same harmful and harmless prompts in the same batches and run the same
``forward_last_logits``; extraction adds the capture hooks at every layer and the float64 running
means. Their prompts/s ratio is what the bookkeeping costs (target: about 1).
"""

from __future__ import annotations

import torch

from refat.directions import extract
from refat.generation import batched, forward_last_logits
from refat.models import Model

from .common import PROMPTS, interleave, offline_pairs, row

TARGET = 0.95


def prompt_sets(n: int) -> tuple[list[str], list[str]]:
    """``n`` harmful and ``n`` harmless prompts (cycled from the fixed benchmark sets)."""
    harmful = [p.prompt for p in offline_pairs() if p.harmful]
    cycle = lambda xs: (xs * (n // len(xs) + 1))[:n]  # noqa: E731
    return cycle(harmful), cycle(PROMPTS)


def run(model: Model, repeats: int = 3, batch_size: int = 16, n_prompts: int | None = None) -> tuple[list[dict], dict]:
    """``n_prompts`` per side (default: one batch each)."""
    n = n_prompts or batch_size
    harmful, harmless = prompt_sets(n)

    def bare():
        for prompts in (harmful, harmless):
            batched(lambda c: [forward_last_logits(model, model.tokenize(c))], prompts, batch_size, progress=False)

    def extraction():
        return extract(model, harmful, harmless, batch_size=batch_size, progress=False)

    with torch.no_grad():
        t = interleave({"bare_forward": bare, "extract": extraction}, repeats, warmup=1)
    d = t["extract"]["result"]
    assert torch.isfinite(d.diff).all(), "extraction produced non-finite means"
    pps = {k: 2 * n / v["median_s"] for k, v in t.items()}
    ratio = pps["extract"] / pps["bare_forward"]
    rows = [row(f"extraction: extract/bare forwards prompts/s (bs={batch_size})", ratio, f">= {TARGET}",
                ratio >= TARGET)]
    details = {"batch_size": batch_size, "prompts_per_side": n, "positions": d.positions, "repeats": repeats,
               "prompts_per_s": pps, "median_s": {k: v["median_s"] for k, v in t.items()},
               "times_s": {k: v["times_s"] for k, v in t.items()}}
    return rows, details
