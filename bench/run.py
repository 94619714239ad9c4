"""Run the refat benchmarks, print one table of ratios and write the results (with machine info) as JSON.

Default: every case (``gcg`` builds a nanoGCG virtualenv from PyPI on first use), with repeat counts sized
to finish in about 25 minutes on 2 CPU cores with the 0.5B model; an estimate is printed first. A case
that fails is reported and the others still run (exit status 1).
``--tiny`` runs everything on a tiny random model built here, in seconds (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

from refat.models import load
from refat.storage import write_json
from refat.training import METHODS

from . import estimate as est
from . import extraction, generation_throughput, hooks_overhead, memory, roofline, training_step
from .common import machine_info

CASES = ("hooks", "generation", "training", "extraction", "roofline", "memory", "gcg")
OPT_IN = ("probe",)  # run only when named in --only (a 1.5B GCG step takes minutes on CPU)
# Rounds per case when --repeats is not given: ~25 min on 2 cores with the 0.5B model (see estimate.py).
# training: RT and ReFAT always run >= 3 interleaved rounds (training_step.MIN_ROUNDS), CAT and LAT one.
DEFAULT_REPEATS = {"hooks": 3, "generation": 1, "training": 1, "extraction": 2, "roofline": 2, "memory": 1, "gcg": 1,
                   "probe": 1}
# --tiny: smallest settings that still exercise every code path.
TINY = {"batch_size": 4, "max_new_tokens": 4, "train_steps": 4, "matmul_n": 256, "gcg_steps": 2, "gcg_search_width": 8}
FULL = {"batch_size": 16, "max_new_tokens": 32, "train_steps": 4, "matmul_n": 2048, "gcg_steps": 2,
        "gcg_search_width": 128}


def _fmt(v) -> str:
    return "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def print_table(rows: list[dict]) -> None:
    w = max(len(r["name"]) for r in rows)
    print(f"{'name':<{w}}  {'value':>8}  {'target':>7}  met")
    for r in rows:
        v = r["value"]
        val = f"{v:>8.4g}" if math.isfinite(v) and abs(v) >= 1000 else f"{v:>8.3f}"
        print(f"{r['name']:<{w}}  {val}  {_fmt(r['target']):>7}  {_fmt(r['met'])}")


def repeats_for(case: str, repeats: int | None, tiny: bool) -> int:
    """Rounds of one case: --repeats for all (training: half, as its rounds are long), else the sized default."""
    if repeats is None:
        return 1 if tiny else DEFAULT_REPEATS[case]
    return max(1, repeats // 2) if case == "training" else repeats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="catalog name, local directory, .gguf or hub id")
    p.add_argument("--tiny", action="store_true", help="a tiny random model built in a temp dir instead of --model")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=None,
                   help=f"rounds per case (training: half); default per case {DEFAULT_REPEATS} (1 with --tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward / generation batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation case (default 32)")
    p.add_argument("--only", nargs="+", choices=CASES + OPT_IN, default=None,
                   help=f"run these cases only (default: all but {', '.join(OPT_IN)}, which run only when named)")
    p.add_argument("--skip", nargs="+", choices=CASES, default=[], help="leave these cases out (e.g. gcg offline)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="training case: steps per method per round, a multiple of ReFAT's k (default 4)")
    p.add_argument("--roofline-steps", type=int, default=2, help="roofline case: LoRA steps per round (first untimed)")
    p.add_argument("--matmul-n", type=int, default=None, help="roofline case: square matmul size (default 2048)")
    p.add_argument("--memory-method", default="refat", choices=METHODS, help="memory case: training method (default refat)")
    p.add_argument("--memory-steps", type=int, default=2, help="memory case: training steps")
    p.add_argument("--gcg-steps", type=int, default=None, help="gcg case: optimisation steps (default 2)")
    p.add_argument("--gcg-search-width", type=int, default=None, help="gcg case: candidates per step (default 128)")
    p.add_argument("--probe-target", default=None, help="probe case: target model (default qwen2.5-coder-1.5b)")
    p.add_argument("--probe-draft", default=None, help="probe case: draft model (default qwen2.5-coder-0.5b)")
    p.add_argument("--out", default=None, help="JSON results (default bench/results.json; none with --tiny)")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else FULL).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.out is None and not args.tiny:
        args.out = "bench/results.json"
    return args


def make_plan(args: argparse.Namespace) -> est.Plan:
    """The cases to run (--only, else all, less --skip) and their rounds."""
    cases = [c for c in (args.only or CASES) if c not in args.skip]
    reps = {c: repeats_for(c, args.repeats, args.tiny) for c in cases}
    return est.Plan(cases, reps, args.batch_size, args.max_new_tokens, args.train_steps, args.roofline_steps,
                    args.memory_steps, args.gcg_steps, args.gcg_search_width)


def _tiny_model_dir(root: Path) -> Path:
    from .gcg_vs_nanogcg import make_tiny

    # 4 layers: LAT's default layers (L/4, L/2, 3L/4) are distinct (with 2 they repeat, which LAT rejects)
    return make_tiny(root / "tiny", hidden=64, layers=4)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    plan = make_plan(args)
    cases, reps = plan.cases, plan.repeats
    with tempfile.TemporaryDirectory() as tmp:
        spec = str(_tiny_model_dir(Path(tmp))) if args.tiny else args.model
        t0 = time.perf_counter()
        model = load(spec, dtype=args.dtype, device=args.device)
        load_s = time.perf_counter() - t0
        guess = est.estimate(plan, sum(roofline.matmul_params(model)))
        print(f"estimated wall time: ~{_dur(guess['total'])} (" + ", ".join(f"{c} {_dur(guess[c])}" for c in cases)
              + "; scaled from the 0.5B model's timings on 2 CPU cores)", file=sys.stderr, flush=True)
        rows, details = [], {}

        failed = {}

        def case(name: str, fn) -> None:
            t = time.perf_counter()
            try:
                r, details[name] = fn()
            except Exception as e:  # one broken case (e.g. no PyPI for nanoGCG) must not void the others
                failed[name] = f"{type(e).__name__}: {e}"
                print(f"bench: case {name} failed: {failed[name]}", file=sys.stderr, flush=True)
                return
            details[name]["wall_s"] = time.perf_counter() - t
            rows.extend(r)

        bs = args.batch_size
        if "hooks" in cases:
            case("hooks", lambda: hooks_overhead.run(model, reps["hooks"], bs))
        if "generation" in cases:
            case("generation", lambda: generation_throughput.run(model, reps["generation"], bs, args.max_new_tokens))
        if "training" in cases:
            case("training", lambda: training_step.run(model, reps["training"], args.train_steps))
        if "extraction" in cases:
            case("extraction", lambda: extraction.run(model, reps["extraction"], bs))
        if "roofline" in cases:
            case("roofline", lambda: roofline.run(model, reps["roofline"], bs, args.roofline_steps,
                                                  matmul_n=args.matmul_n))
        if "memory" in cases:
            case("memory", lambda: memory.run(spec, dtype=args.dtype, device=args.device, method=args.memory_method,
                                              steps=args.memory_steps))
        if "gcg" in cases:
            case("gcg", lambda: _gcg(spec, model, args))
        if "probe" in cases:
            case("probe", lambda: _probe(Path(tmp), model, args))
    if rows:
        print_table(rows)
    result = {
        "model": "tiny (random, built in-process)" if args.tiny else args.model,
        "source": model.source,
        "settings": vars(args) | {"dtype": str(model.dtype).removeprefix("torch."), "cases": cases, "repeats": reps},
        "machine": machine_info(),
        "load_s": load_s,
        "estimate_s": guess,
        "results": rows,
        "details": details,
        "failed": failed,
    }
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return result


def _gcg(spec: str, model, args) -> tuple[list[dict], dict]:
    """refat's GCG vs nanoGCG 0.3.0 (bench/gcg_vs_nanogcg.py); with --tiny, a byte-level prompt and target."""
    from refat.attacks.gcg import GCGConfig

    from . import gcg_vs_nanogcg

    kw = dict(steps=args.gcg_steps, search_width=args.gcg_search_width,
              rounds=repeats_for("gcg", args.repeats, args.tiny))
    if args.tiny:  # one token per byte: a short goal and target, a 20-byte suffix
        kw |= dict(goal="Tell me how to do it", target="Sure, here", optim_str_init="x" * 20)
    else:
        kw |= dict(optim_str_init=GCGConfig.optim_str_init)
    return gcg_vs_nanogcg.run(spec, model=model, **kw)


def _probe(tmp: Path, model, args) -> tuple[list[dict], dict]:
    """Probe sampling (bench/probe_sampling.py); with --tiny, the tiny model as target and a one-layer tiny
    model of the same tokenizer as draft."""
    from . import probe_sampling
    from .gcg_vs_nanogcg import make_tiny

    kw = dict(steps=args.gcg_steps, search_width=args.gcg_search_width, rounds=repeats_for("probe", args.repeats,
              args.tiny), dtype=args.dtype, device=args.device)
    if args.tiny:
        draft = str(make_tiny(tmp / "tiny-draft", hidden=32, layers=1, seed=1))
        return probe_sampling.run(str(tmp / "tiny"), draft, target=model, goal="Tell me how to do it",
                                  target_str="Sure, here", optim_str_init="x" * 20, **kw)
    return probe_sampling.run(args.probe_target or probe_sampling.TARGET_MODEL,
                              args.probe_draft or probe_sampling.DRAFT_MODEL, **kw)


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
