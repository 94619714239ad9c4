"""Training step time of each method relative to refusal training (RT), on the same pairs.

Each method trains a fresh LoRA copy of the same base model for ``steps`` steps (a multiple of
ReFAT's k, so its feature recomputation is counted at its true rate). RT and ReFAT run ``rounds``
(at least 3) interleaved rounds, the order alternating (rt, refat, refat-window, then the reverse); the ratio
reported is the median of the per-round ratios, with the lowest and highest round beside it. CAT and LAT, whose
every step costs the same and which have no target, run half the steps in the first round only.

ReFAT with a feature window (``RefatConfig.window``) recomputes from all n prompts once, to fill the window, and
from n / window afterwards: its steady state is timed over steps [steps, 2 steps) of a run twice as long, against
the same steps of RT's runs (which run 2 steps, their first half timed for the plain ratio).
Beside the times, an exact count that no busy machine disturbs: the tokens one ReFAT recomputation
feeds the model with the chat template's shared prefix run once, over those of the whole prompts.
"""

from __future__ import annotations

import copy
import statistics
import tempfile

from refat.models import Model, wrap
from refat.storage import read_jsonl
from refat.training import RefatConfig, TrainConfig, train

from .common import offline_pairs, row

TARGET_REFAT = 1.2
WINDOW = 4  # the feature window timed beside the paper's recomputation
METHODS = ("rt", "refat", "refat-window", "cat", "lat")
MIN_ROUNDS = 3


def whole_prompt_tokens(model: Model, prompts: list[str], batch_size: int = 32) -> int:
    """Token positions (padding included) of the prompts run whole, in batches of ``batch_size`` as before."""
    lengths = [len(model.tokenizer(model.format(p), add_special_tokens=False)["input_ids"]) for p in prompts]
    return sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size]) for i in range(0, len(lengths), batch_size))


def run(model: Model, repeats: int = MIN_ROUNDS, steps: int = 8, batch_size: int = 4) -> tuple[list[dict], dict]:
    pairs = offline_pairs()
    base = copy.deepcopy(model.hf)  # peft edits the model it wraps: every run starts from this copy
    rounds = max(MIN_ROUNDS, repeats)
    per_step: dict[str, list[float]] = {m: [] for m in METHODS}  # steps [0, steps)
    compute: dict[str, dict] = {}

    def one(method: str, n: int) -> list[float]:
        fresh = wrap(copy.deepcopy(base), model.tokenizer, name=model.name, system_prompt=model.system_prompt)
        name, extra = ("refat", {"refat": RefatConfig(window=WINDOW)}) if method == "refat-window" else (method, {})
        cfg = TrainConfig(method=name, steps=n, batch_size=batch_size, checkpoint_every=10**9, **extra)
        with tempfile.TemporaryDirectory() as out:
            result = train(fresh, pairs, cfg, out, progress=False)
            times = [r["seconds"] for r in read_jsonl(f"{out}/metrics.jsonl")]
        compute[method] = result.compute
        return times

    later: dict[str, list[float]] = {"rt": [], "refat-window": []}  # steps [steps, 2 steps): the window's steady state
    for r in range(rounds):
        for method in ("rt", "refat", "refat-window")[::1 if r % 2 == 0 else -1]:
            times = one(method, steps if method == "refat" else 2 * steps)
            per_step[method].append(statistics.mean(times[:steps]))
            if method in later:
                later[method].append(statistics.mean(times[steps:]))
        if r == 0:
            for method in ("cat", "lat"):
                per_step[method].append(statistics.mean(one(method, max(1, steps // 2))))
    ratios = [a / b for a, b in zip(per_step["refat"], per_step["rt"])]  # per round: side by side
    windowed = [a / b for a, b in zip(later["refat-window"], later["rt"])]
    med = {m: statistics.median(v) for m, v in per_step.items() if v}
    ratio = statistics.median(ratios)
    rows = [row(f"training: refat/rt seconds per step (batch {batch_size}, median of {rounds} rounds)", ratio,
                f"<= {TARGET_REFAT}", ratio <= TARGET_REFAT),
            row("training: refat/rt, lowest round", min(ratios)),
            row("training: refat/rt, highest round", max(ratios)),
            row(f"training: refat window {WINDOW}/rt seconds per step, steady state (median of {rounds} rounds)",
                statistics.median(windowed), f"<= {TARGET_REFAT}", statistics.median(windowed) <= TARGET_REFAT),
            row(f"training: refat window {WINDOW}/rt, lowest round", min(windowed)),
            row(f"training: refat window {WINDOW}/rt, highest round", max(windowed))]
    rows += [row(f"training: {m}/rt seconds per step (batch {batch_size}, 1 round)", med[m] / med["rt"])
             for m in ("cat", "lat")]
    n = RefatConfig().n
    harmful = [p.prompt for p in pairs if p.harmful][:n]
    harmless = [p.prompt for p in pairs if not p.harmful][:n]
    recomputes = -(-steps // RefatConfig().k)  # at steps 0, k, 2k, ...
    shared = compute["refat"]["perturbation"]["tokens"] / recomputes  # (all 32 + 32 pairs: n = 32 picks them all)
    whole = whole_prompt_tokens(model, harmful) + whole_prompt_tokens(model, harmless)
    rows.append(row("training: refat recomputation tokens, shared prefix / whole prompts", shared / whole))
    return rows, {"seconds_per_step": per_step, "seconds_per_step_later": later, "median": med,
                  "refat_rt_per_round": ratios, "refat_window_rt_per_round": windowed, "window": WINDOW,
                  "rounds": rounds,
                  "compute": compute, "steps": steps, "batch_size": batch_size,
                  "recompute_tokens": {"shared_prefix": shared, "whole_prompts": whole}}
