"""How far a feature window's refusal features stray from freshly recomputed ones during ReFAT training.

ReFAT at the library defaults (batch 4, k 4, n 32; the benchmark's pairs: 32 AdvBench prompts with natural
refusals, 32 Alpaca prompts with their answers) trains ``--steps`` steps with ``RefatConfig(window=W)``. At every
recomputation the features the window gives are compared, layer by layer over ReFAT's layers, with the features
window 1 would compute at that step: all n prompts drawn at that step, run on the model as it is then. Beside them,
how far window 1's own features move between two recomputations (k steps), the drift the window averages over.

    python experiments/feature_window.py                          # qwen2.5-coder-0.5b, window 4, 32 steps
    python experiments/feature_window.py --window 2 --out results/feature_window-2.json

About 6 minutes on 2 idle CPU cores (32 steps, and 8 extra recomputations for the comparison).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from refat.models import Model, load
from refat.storage import write_json
from refat.training import RefatConfig, TrainConfig, train
from refat.training.perturbations import RefatPerturbation

ROOT = Path(__file__).parents[1]


@contextmanager
def compared_with_fresh_features(records: list[dict]):
    """Every ReFAT recomputation also computes window 1's features at that step and records their per-layer
    cosine to the window's (and window 1's drift since the previous recomputation)."""
    recompute = RefatPerturbation.recompute
    previous: list[torch.Tensor] = []

    def both(self: RefatPerturbation, step: int) -> None:
        recompute(self, step)
        fresh = RefatPerturbation(self.model, dataclasses.replace(self.cfg, window=1), self.harmful, self.harmless,
                                  self.seed)
        recompute(fresh, step)
        cos = torch.nn.functional.cosine_similarity(self.directions, fresh.directions, dim=-1)[self.layers]
        drift = None
        if previous:
            drift = torch.nn.functional.cosine_similarity(fresh.directions, previous[-1], dim=-1)[self.layers]
        previous.append(fresh.directions)
        records.append({"step": step, "cosine_min": cos.min().item(), "cosine_mean": cos.mean().item(),
                        "cosine_per_layer": dict(zip(self.layers, cos.tolist())),
                        "fresh_drift_since_previous_min": None if drift is None else drift.min().item(),
                        "fresh_drift_since_previous_mean": None if drift is None else drift.mean().item()})

    RefatPerturbation.recompute = both
    try:
        yield
    finally:
        RefatPerturbation.recompute = recompute


def measure(model: Model, pairs: list, window: int, steps: int) -> dict:
    """The comparison over one training run of ``steps`` steps."""
    cfg = TrainConfig(method="refat", steps=steps, checkpoint_every=10**9, refat=RefatConfig(window=window))
    records: list[dict] = []
    with compared_with_fresh_features(records), tempfile.TemporaryDirectory() as out:
        train(model, pairs, cfg, out, progress=True)
    full = [r for r in records if r["step"] >= cfg.refat.k * window]  # every mean in the window from after step 0
    return {"model": model.name, "window": window, "steps": steps, "k": cfg.refat.k, "n": cfg.refat.n,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "recomputations": records,
            "turned_over": {"from_step": cfg.refat.k * window,
                            "cosine_min": min((r["cosine_min"] for r in full), default=None),
                            "cosine_mean": (sum(r["cosine_mean"] for r in full) / len(full)) if full else None}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "results" / "feature_window.json"))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.common import offline_pairs  # the benchmark's pairs: its timing and this comparison train alike

    torch.manual_seed(0)
    result = measure(load(args.model, dtype=args.dtype), offline_pairs(), args.window, args.steps)
    write_json(args.out, result)
    t = result["turned_over"]
    print(f"window {args.window}: per-layer cosine to fresh features from step {t['from_step']}: "
          f"min {t['cosine_min']}, mean {t['cosine_mean']}")
    return result


if __name__ == "__main__":
    main()
