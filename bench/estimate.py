"""Up-front wall-time estimate of a benchmark run, from the 0.5B model's measured timings.

The unit costs below were measured on 2 CPU cores, float32, ``qwen2.5-coder-0.5b`` (RESULTS.md and
bench/results-*.json); they are scaled linearly by the model's matmul parameters and by the work each
case does (prompts, tokens, steps, rounds). A rough guide for sizing runs, not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

# P_blocks + P_head of Qwen2.5-0.5B (24 layers, d 896, MLP 4864, 14/2 heads of 64, vocabulary 151936).
REF_PARAMS = 493_961_216
FORWARD_S_PER_PROMPT = 5.72 / 16  # forward_last_logits, batch 16, 45 tokens (results-hooks.json)
BATCHED_S_PER_TOKEN = 28.3 / (16 * 32)  # greedy generate at batch 16, per prompt and new token
ONE_BY_ONE_S_PER_TOKEN = 107.5 / (16 * 32)  # the same prompts one at a time
# real AdvBench/Alpaca pairs, k=4 for refat (bench/results.json, 2026-11-26)
REFAT_RECOMPUTE_S = 32.7  # refusal features from 32 + 32 prompts (a fresh process: the memory case)
# medians of the last training case (bench/results.json: `--only training gcg`); refat-window (not timed yet): RT's
# step plus a quarter of ReFAT's extra cost
STEP_S_BATCH4 = {"rt": 7.8, "refat": 10.9, "refat-window": 8.6, "cat": 13.7, "lat": 24.8}
# width 128 (bench/results-gcg.json, 2026-12-02: medians of 3 rounds; nanoGCG's has ranged 33-64 s between runs)
GCG_S_PER_STEP = {"refat": 16.5, "refat-unpruned": 19.5, "nanogcg": 52.0}
GCG_SETUP_S = 50.0  # both implementations: load, vocabulary scan, first evaluation
LOAD_S = 8.0
CHILD_OVERHEAD_S = 6.0  # a fresh interpreter importing torch, transformers and peft


@dataclass
class Plan:
    """What one run will do; each case reads only its own fields."""

    cases: list[str]
    repeats: dict[str, int]
    batch_size: int = 16
    max_new_tokens: int = 32
    train_steps: int = 4
    roofline_steps: int = 2
    memory_steps: int = 2
    gcg_steps: int = 10
    gcg_search_width: int = 128


def case_seconds(plan: Plan, case: str) -> float:
    """Estimated seconds of one case on the 0.5B model (2 cores)."""
    r, bs, fwd = plan.repeats.get(case, 1), plan.batch_size, FORWARD_S_PER_PROMPT
    if case == "hooks":  # 2 warm-up rounds, 3 variants
        return 3 * (r + 2) * bs * fwd
    if case == "generation":  # 3 variants (hf.generate costs what ours does); the warm-up is tiny
        return r * bs * plan.max_new_tokens * (2 * BATCHED_S_PER_TOKEN + ONE_BY_ONE_S_PER_TOKEN)
    if case == "training":  # >= 3 rounds of RT and ReFAT-with-window at k + steps (its first k steps plain ReFAT's);
        s, k = STEP_S_BATCH4, 4  # CAT and LAT: half the steps, one round (training_step.run)
        window_run = k * s["refat"] + plan.train_steps * s["refat-window"]
        return (max(3, r) * ((k + plan.train_steps) * s["rt"] + window_run)
                + max(1, plan.train_steps // 2) * (s["cat"] + s["lat"]))
    if case == "probe":  # 1.5B target (about 3x the 0.5B's cost per step), 0.5B draft; plain and probe-sampled
        # the unpruned rate: probe scoring does not prune (the plain runs do, so this errs high)
        per_step = GCG_S_PER_STEP["refat-unpruned"] * plan.gcg_search_width / 128 * 3
        return 2 * GCG_SETUP_S * 3 + plan.gcg_steps * per_step * 1.5
    if case == "extraction":  # 1 warm-up round; bare and extract each run bs harmful + bs harmless prompts
        return (r + 1) * 2 * (2 * bs) * fwd
    if case == "roofline":
        return (r + 1) * bs * fwd + r * (plan.roofline_steps * STEP_S_BATCH4["rt"] + 3)
    if case == "memory":
        return CHILD_OVERHEAD_S + LOAD_S + REFAT_RECOMPUTE_S + plan.memory_steps * STEP_S_BATCH4["rt"] * 1.1
    if case == "gcg":  # each step scores search_width candidates: nanoGCG, refat, refat without the tail pruning
        per_step = sum(GCG_S_PER_STEP.values()) * plan.gcg_search_width / 128
        return GCG_SETUP_S + plan.gcg_steps * per_step
    raise ValueError(f"no estimate for case {case!r}")


def estimate(plan: Plan, params: int) -> dict[str, float]:
    """Seconds per case (and ``total``, with loading), scaled to a model of ``params`` matmul parameters."""
    scale = params / REF_PARAMS
    per = {c: case_seconds(plan, c) * scale for c in plan.cases}
    return per | {"total": sum(per.values()) + LOAD_S * scale}
