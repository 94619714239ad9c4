"""Overhead of refat hooks on a batched forward pass: none vs capture (every layer) vs ablate (project, all writers)."""

from __future__ import annotations

import torch

from refat import hooks
from refat.generation import forward_last_logits
from refat.models import Model

from .common import PROMPTS, interleave, row

TARGET = 1.05


def run(model: Model, repeats: int = 5, batch_size: int = 16, seed: int = 0) -> tuple[list[dict], dict]:
    prompts = (PROMPTS * (batch_size // len(PROMPTS) + 1))[:batch_size]
    enc = model.tokenize(prompts)
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(model.d_model, generator=g)
    direction = direction / direction.norm()

    def plain():
        forward_last_logits(model, enc)

    def capture():
        with hooks.capture(model) as store:
            forward_last_logits(model, enc)
        assert len(store) == model.n_layers and all(len(v) == 1 for v in store.values())

    def ablate():
        with hooks.ablate(model, direction, mode="project", layers=None):
            forward_last_logits(model, enc)

    with torch.no_grad():
        t = interleave({"none": plain, "capture": capture, "ablate": ablate}, repeats, warmup=2)
    base = t["none"]["median_s"]
    cap, abl = t["capture"]["median_s"] / base, t["ablate"]["median_s"] / base
    rows = [
        row("hooks: capture/none (every layer)", cap, f"<= {TARGET}", cap <= TARGET),
        row("hooks: ablate/none (project, all writers)", abl, f"<= {TARGET}", abl <= TARGET),
    ]
    details = {
        "batch_size": batch_size,
        "seq_len": int(enc["input_ids"].shape[1]),
        "n_layers": model.n_layers,
        "n_writer_hooks": sum(len(w) for w in model.writers),
        "repeats": repeats,
        "times_s": {k: v["times_s"] for k, v in t.items()},
        "median_s": {k: v["median_s"] for k, v in t.items()},
    }
    return rows, details
