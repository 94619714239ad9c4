"""Run all refat benchmarks, print a table and write the results (with machine info) as JSON."""

from __future__ import annotations

import argparse
import time

from refat.models import load

from . import generation_throughput, hooks_overhead, training_step
from refat.storage import write_json

from .common import machine_info


def _fmt(v) -> str:
    return "-" if v is None else ("yes" if v is True else "no" if v is False else str(v))


def print_table(rows: list[dict]) -> None:
    w = max(len(r["name"]) for r in rows)
    print(f"{'name':<{w}}  {'value':>8}  {'target':>7}  met")
    for r in rows:
        print(f"{r['name']:<{w}}  {r['value']:>8.3f}  {_fmt(r['target']):>7}  {_fmt(r['met'])}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="catalog name, local directory, .gguf or hub id")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--only", choices=["hooks", "generation", "training"], default=None, help="run one benchmark only")
    p.add_argument("--train-steps", type=int, default=8, help="steps per method per round (a multiple of ReFAT's k)")
    p.add_argument("--out", default="bench/results.json")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = load(args.model, dtype=args.dtype, device=args.device)
    load_s = time.perf_counter() - t0
    rows, details = [], {}
    if args.only in (None, "hooks"):
        r, details["hooks_overhead"] = hooks_overhead.run(model, args.repeats, args.batch_size)
        rows += r
    if args.only in (None, "generation"):
        r, details["generation_throughput"] = generation_throughput.run(
            model, args.repeats, args.batch_size, args.max_new_tokens)
        rows += r
    if args.only in (None, "training"):
        r, details["training_step"] = training_step.run(model, max(1, args.repeats // 2), args.train_steps)
        rows += r
    print_table(rows)
    result = {
        "model": args.model,
        "source": model.source,
        "settings": vars(args) | {"dtype": str(model.dtype).removeprefix("torch.")},
        "machine": machine_info(),
        "load_s": load_s,
        "results": rows,
        "details": details,
    }
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
