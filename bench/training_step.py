"""Training step time of each method relative to refusal training (RT), on the same pairs.

Each method trains a fresh LoRA copy of the same base model for ``steps`` steps (a multiple of
ReFAT's k, so its feature recomputation is counted at its true rate; CAT and LAT, whose every step
costs the same, run half as many); rounds are interleaved (rt, refat, cat, lat, rt, ...) and the
median seconds per step of each method is compared to RT's.
"""

from __future__ import annotations

import copy
import statistics
import tempfile

from refat.models import Model, wrap
from refat.storage import read_jsonl
from refat.training import TrainConfig, train

from .common import offline_pairs, row

TARGET_REFAT = 1.2
METHODS = ("rt", "refat", "cat", "lat")


def run(model: Model, repeats: int = 2, steps: int = 8, batch_size: int = 4) -> tuple[list[dict], dict]:
    pairs = offline_pairs()
    base = copy.deepcopy(model.hf)  # peft edits the model it wraps: every run starts from this copy
    per_step: dict[str, list[float]] = {m: [] for m in METHODS}
    compute: dict[str, dict] = {}
    for _ in range(repeats):
        for method in METHODS:
            fresh = wrap(copy.deepcopy(base), model.tokenizer, name=model.name, system_prompt=model.system_prompt)
            n = steps if method in ("rt", "refat") else max(1, steps // 2)  # CAT/LAT: no periodic cost to average
            cfg = TrainConfig(method=method, steps=n, batch_size=batch_size, checkpoint_every=10**9)
            with tempfile.TemporaryDirectory() as out:
                result = train(fresh, pairs, cfg, out, progress=False)
                times = [r["seconds"] for r in read_jsonl(f"{out}/metrics.jsonl")]
            per_step[method].append(statistics.mean(times))
            compute[method] = result.compute
    med = {m: statistics.median(v) for m, v in per_step.items()}
    rows = []
    for m in METHODS[1:]:
        ratio = med[m] / med["rt"]
        target = f"<= {TARGET_REFAT}" if m == "refat" else None
        rows.append(row(f"training: {m}/rt seconds per step (batch {batch_size})", ratio, target,
                        ratio <= TARGET_REFAT if m == "refat" else None))
    return rows, {"seconds_per_step": per_step, "median": med, "compute": compute, "steps": steps,
                  "batch_size": batch_size}
