"""Refusal rate of held-out harmful prompts under RFA with the direction of each given layer.

Answers "how much does the selection filter cost the attack?": the demo's filters reject the
strongest candidates for moving harmless outputs too much; this measures what they would have done.

    python experiments/rfa_by_layer.py --directions runs/demo/directions/base --layers 14 16 18 --position -1
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refat import hooks
from refat.data import prompt_sets
from refat.directions import Directions
from refat.generation import generate
from refat.judges import RefusalStringJudge, rate, refusal_records
from refat.models import load
from refat.pipeline.demo import demo_config
from refat.storage import write_json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--directions", type=Path, default=Path("runs/demo/directions/base"))
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--position", type=int, default=-1)
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: DIRECTIONS/rfa_by_layer.json)")
    args = p.parse_args()
    demo = demo_config()
    d = Directions.load(args.directions)
    model = load(demo.model, dtype=demo.dtype)
    harmful = prompt_sets(demo.data).prompts("harmful", "test")
    max_new_tokens = demo.first_rfa.parsed().max_new_tokens
    judge = RefusalStringJudge()
    result = {}
    for layer in args.layers:
        with hooks.ablate(model, d.vector(layer, args.position)):
            completions = generate(model, harmful, max_new_tokens=max_new_tokens, desc=f"RFA layer {layer}")
        result[layer] = rate(refusal_records(harmful, completions, judge))
        print(f"layer {layer} position {args.position}: harmful refused under RFA {result[layer]:.0%} (n={len(harmful)})")
    write_json(args.out or args.directions / "rfa_by_layer.json",
               {"position": args.position, "judge": judge.name, "n": len(harmful), "refusal_rate_rfa": result})


if __name__ == "__main__":
    main()
