"""Small helpers shared by the benchmarks: interleaved timing, machine info, atomic JSON output.

The machine may be shared with other jobs, so absolute times are noisy; only ratios of variants
timed side by side (interleaved A, B, A, B, ...) are meaningful.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from refat.data import affirmative_target, load_dataset
from refat.training import Pair
from refat.training.data import NATURAL_REFUSALS

# A few fixed, ordinary instructions of varied length (the same set for every benchmark).
PROMPTS = [
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in two sentences.",
    "Give me three tips for writing clean Python code.",
    "What is the capital of Australia?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Write a Python function that reverses a string.",
    "List the planets of the solar system in order from the Sun.",
    "How do I make a cup of green tea?",
    "Translate 'good morning, how are you?' into French.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small bakery that sells sourdough bread.",
    "Explain recursion to a ten-year-old.",
    "Write a SQL query that counts the rows of a table named orders.",
    "Why is the sky blue?",
    "Describe the water cycle briefly.",
    "Write a short thank-you note to a colleague who helped me with a project.",
]


def interleave(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time callables interleaved (A, B, ..., A, B, ...) after ``warmup`` untimed rounds.

    Returns per name ``{"median_s", "times_s", "result"}``, ``result`` being the last call's return value.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "times_s": v, "result": results[k]} for k, v in times.items()}


def machine_info() -> dict:
    import transformers

    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def row(name: str, value: float, target: str | None = None, met: bool | None = None) -> dict:
    """One line of the results table."""
    return {"name": name, "value": value, "target": target, "met": met}


def offline_pairs() -> list[Pair]:
    """32 harmful and 32 harmless pairs (enough for ReFAT's default N = 32 feature prompts) from the offline
    data a real run trains on: AdvBench prompts with natural refusals, Alpaca prompts with Alpaca's answers.
    Real answer lengths matter: the recomputation's cost is fixed, a step's grows with its tokens."""
    harmful = [Pair(e.prompt, NATURAL_REFUSALS[i % len(NATURAL_REFUSALS)], True, "template",
                    e.target or affirmative_target(e.prompt))
               for i, e in enumerate(load_dataset("advbench")[-32:])]
    harmless = [Pair(e.prompt, e.target, False, "dataset") for e in load_dataset("alpaca")[-32:]]
    return harmful + harmless
