"""Training step time of each method relative to refusal training (RT), on the same pairs.

Each round trains fresh LoRA copies of the same base model, interleaved, the order alternating: RT, and ReFAT
with a feature window of 4 (``RefatConfig.window``), each for k + ``steps`` steps (k: ReFAT's recomputation
interval, ``steps`` a multiple of it, so recomputations are counted at their true rate). Two ratios come from
the same runs:

- plain ReFAT (the paper's recomputation from all n prompts every k steps): steps [0, k), against RT's. The
  window's first recomputation runs all n prompts and fills the window, so these k steps are plain ReFAT's,
  operation for operation (tests/test_training.py checks the features are the same);
- ReFAT with the window, in its steady state (each recomputation from the next n / 4 prompts of a fixed shuffle): steps
  [k, k + steps), against RT's.

Each ratio is the median of the per-round ratios of ``rounds`` (at least 3) rounds, with the lowest and highest
round beside it. CAT and LAT, whose every step costs the same and which have no target, run half the steps in
the first round only. Beside the times, an exact count that no busy machine disturbs: the tokens one ReFAT
recomputation feeds the model with the chat template's shared prefix run once, over those of the whole prompts.
"""

from __future__ import annotations

import copy
import statistics
import tempfile

from refat.models import Model, wrap
from refat.storage import read_json, read_jsonl
from refat.training import RefatConfig, TrainConfig, train

from .common import offline_pairs, row

TARGET_REFAT = 1.2
WINDOW = 4  # the feature window timed beside the paper's recomputation
METHODS = ("rt", "refat", "cat", "lat")  # refat: ReFAT with the window (plain ReFAT for its first k steps)
MIN_ROUNDS = 3


def whole_prompt_tokens(model: Model, prompts: list[str], batch_size: int = 32) -> int:
    """Token positions (padding included) of the prompts run whole, in batches of ``batch_size`` as before."""
    lengths = [len(model.tokenizer(model.format(p), add_special_tokens=False)["input_ids"]) for p in prompts]
    return sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size))


def run(model: Model, repeats: int = MIN_ROUNDS, steps: int = 8, batch_size: int = 4) -> tuple[list[dict], dict]:
    pairs = offline_pairs()
    base = copy.deepcopy(model.hf)  # peft edits the model it wraps: every run starts from this copy
    rounds = max(MIN_ROUNDS, repeats)
    k = RefatConfig().k
    blocks: dict[str, list[list[float]]] = {m: [] for m in METHODS}  # per round: mean s/step of each timed block
    compute: dict[str, dict] = {}
    history: list[dict] = []  # the last window run's recomputations

    def one(method: str, n: int) -> list[float]:
        fresh = wrap(copy.deepcopy(base), model.tokenizer, name=model.name, system_prompt=model.system_prompt)
        extra = {"refat": RefatConfig(window=WINDOW)} if method == "refat" else {}
        cfg = TrainConfig(method=method, steps=n, batch_size=batch_size, checkpoint_every=10**9, **extra)
        with tempfile.TemporaryDirectory() as out:
            result = train(fresh, pairs, cfg, out, progress=False)
            times = [r["seconds"] for r in read_jsonl(f"{out}/metrics.jsonl")]
            if method == "refat":
                history[:] = read_json(f"{out}/train_summary.json")["direction_history"]
        compute[method] = result.compute
        return times

    for r in range(rounds):
        for method in ("rt", "refat") if r % 2 == 0 else ("refat", "rt"):
            times = one(method, k + steps)
            blocks[method].append([statistics.mean(times[:k]), statistics.mean(times[k:])])
        if r == 0:
            for method in ("cat", "lat"):
                blocks[method].append([statistics.mean(one(method, max(1, steps // 2)))])
    # per round, side by side: plain ReFAT over steps [0, k), the window's steady state over [k, k + steps)
    ratios = [a[0] / b[0] for a, b in zip(blocks["refat"], blocks["rt"])]
    windowed = [a[1] / b[1] for a, b in zip(blocks["refat"], blocks["rt"])]
    med = {m: statistics.median(b[0] for b in v) for m, v in blocks.items()}
    ratio, ratio_window = statistics.median(ratios), statistics.median(windowed)
    rows = [row(f"training: refat/rt seconds per step (batch {batch_size}, median of {rounds} rounds)", ratio,
                f"<= {TARGET_REFAT}", ratio <= TARGET_REFAT),
            row("training: refat/rt, lowest round", min(ratios)),
            row("training: refat/rt, highest round", max(ratios)),
            row(f"training: refat window {WINDOW}/rt seconds per step, steady state (median of {rounds} rounds)",
                ratio_window, f"<= {TARGET_REFAT}", ratio_window <= TARGET_REFAT),
            row(f"training: refat window {WINDOW}/rt, lowest round", min(windowed)),
            row(f"training: refat window {WINDOW}/rt, highest round", max(windowed))]
    rows += [row(f"training: {m}/rt seconds per step (batch {batch_size}, 1 round)", med[m] / med["rt"])
             for m in ("cat", "lat")]
    n = RefatConfig().n
    harmful = [p.prompt for p in pairs if p.harmful][:n]
    harmless = [p.prompt for p in pairs if not p.harmful][:n]
    shared = history[0]["tokens"]  # the first recomputation: all n (32 + 32 pairs: n = 32 picks them all)
    steady = statistics.mean(h["tokens"] for h in history[1:])  # each later one: the next n / window prompts
    whole = whole_prompt_tokens(model, harmful) + whole_prompt_tokens(model, harmless)
    rows.append(row("training: refat recomputation tokens, shared prefix / whole prompts", shared / whole))
    rows.append(row(f"training: refat window {WINDOW} recomputation tokens, steady state / all n", steady / shared))
    return rows, {"seconds_per_step": {m: [b[0] for b in v] for m, v in blocks.items()},
                  "seconds_per_step_steady": {m: [b[1] for b in v] for m, v in blocks.items() if m in ("rt", "refat")},
                  "median": med, "refat_rt_per_round": ratios, "refat_window_rt_per_round": windowed,
                  "window": WINDOW, "k": k, "rounds": rounds, "compute": compute, "steps": steps,
                  "batch_size": batch_size, "recompute_history": history,
                  "recompute_tokens": {"shared_prefix": shared, "whole_prompts": whole, "window_steady": steady}}
