"""Where a GCG step's time goes: torch.profiler over one step of refat's GCG on the benchmark's prompt.

The gcg case measures the ratio to nanoGCG; this explains it. One unprofiled step warms up, then
``--steps`` steps run under the profiler; operators are grouped into matmuls (the useful work),
attention, cache and tensor copies, and the rest, and the matmul share is compared with the FLOP
count of the candidate forwards (achieved GFLOP/s of the step).

    python -m bench.profile_gcg                         # qwen2.5-coder-0.5b, width 128, 1 step
    python -m bench.profile_gcg --out bench/results-profile-gcg.json
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from refat import hooks
from refat.attacks.gcg import GCG, GCGConfig
from refat.models import load
from refat.storage import write_json

from .common import machine_info
from .gcg_vs_nanogcg import GOAL, TARGET

GROUPS = {  # operator name -> group (first match wins)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::softmax", "aten::_softmax"),
    "copies and cache": ("aten::copy_", "aten::cat", "aten::index", "aten::expand", "aten::repeat", "aten::clone",
                         "aten::contiguous", "aten::to", "aten::_to_copy", "aten::index_select", "aten::gather"),
    "elementwise": ("aten::mul", "aten::add", "aten::silu", "aten::pow", "aten::mean", "aten::rsqrt", "aten::neg",
                    "aten::sub", "aten::div", "aten::exp", "aten::log_softmax", "aten::_log_softmax"),
}


def _rows(args, kwargs) -> int:
    """Token positions in a module's input (batch × length), however it was passed."""
    h = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return h.shape[0] * h.shape[1]


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "other"


def profile(model_spec: str = "qwen2.5-coder-0.5b", *, steps: int = 1, search_width: int = 128, topk: int = 256,
            dtype: str = "float32") -> dict:
    model = load(model_spec, dtype=dtype)
    cfg = GCGConfig(num_steps=1, search_width=search_width, topk=topk, seed=0)
    GCG(model, cfg, progress=False).attack(GOAL, TARGET)  # warm-up (allocations, kernels)
    cfg.num_steps = steps
    attacker = GCG(model, cfg, progress=False)
    fed = {"tokens": 0, "head_rows": 0}  # exact operation counts, unaffected by a busy machine
    count_in = lambda m, args, kw: fed.__setitem__("tokens", fed["tokens"] + _rows(args, kw))  # noqa: E731
    count_out = lambda m, args, kw: fed.__setitem__("head_rows", fed["head_rows"] + _rows(args, kw))  # noqa: E731
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            hooks.hooked(pre=[(model.blocks[0], count_in), (model.hf.get_output_embeddings(), count_out)]):
        result = attacker.attack(GOAL, TARGET)
    wall = time.perf_counter() - t0
    ops = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(s for _, s, _ in ops)
    groups: dict[str, float] = defaultdict(float)
    for name, s, _ in ops:
        groups[group_of(name)] += s
    top = sorted(ops, key=lambda x: -x[1])[:15]
    head, blocks = model.hf.get_output_embeddings().weight.numel(), sum(p.numel() for p in model.blocks.parameters())
    flops = {"blocks": 2 * blocks * fed["tokens"], "vocabulary projection": 2 * head * fed["head_rows"]}
    return {"model": model_spec, "dtype": dtype, "steps": steps, "search_width": search_width,
            "wall_seconds": wall, "step_seconds": result.step_seconds, "profiled_cpu_seconds": total,
            "groups": {g: {"seconds": s, "share": s / total} for g, s in sorted(groups.items(), key=lambda x: -x[1])},
            "tokens_fed": fed["tokens"], "head_rows": fed["head_rows"], "target_scored": result.target_scored,
            "matmul_gflop": {k: v / 1e9 for k, v in flops.items()},
            "top_ops": [{"op": n, "seconds": s, "share": s / total, "calls": c} for n, s, c in top],
            "threads": torch.get_num_threads(), "machine": machine_info()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--search-width", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None, help="also write the profile as JSON here")
    args = p.parse_args(argv)
    res = profile(args.model, steps=args.steps, search_width=args.search_width, dtype=args.dtype)
    print(f"GCG, {args.steps} step(s) at width {args.search_width}: {res['wall_seconds']:.1f} s wall, "
          f"{res['profiled_cpu_seconds']:.1f} s in operators (self time)")
    print(f"  {res['tokens_fed']} token positions through the blocks, {res['head_rows']} rows through the vocabulary "
          "projection: " + ", ".join(f"{k} {v:.1f} GFLOP" for k, v in res["matmul_gflop"].items()))
    for g, v in res["groups"].items():
        print(f"  {g:18s} {v['seconds']:7.1f} s  {100 * v['share']:5.1f} %")
    print("top operators:")
    for o in res["top_ops"]:
        print(f"  {o['op'][:40]:40s} {o['seconds']:7.1f} s  {100 * o['share']:5.1f} %  {o['calls']:6d} calls")
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
