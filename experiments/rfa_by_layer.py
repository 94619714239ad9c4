"""Refusal rate of held-out harmful prompts under RFA with the direction of each given layer.

Answers "how much does the selection filter cost the attack?": the demo's filters reject the
strongest candidates for moving harmless outputs too much; this measures what they would have done.
With ``--behaviours`` (a JSONL of ``goal`` and ``id``, e.g. a run's ``data/behaviours.jsonl``) it attacks those
instead, and ``--part`` writes the completions and verdicts as a part file that ``defenses_read.py`` reads: what
a member other than the sweep's choice does to the defenses table's behaviours.

    python experiments/rfa_by_layer.py --directions runs/demo/directions/base --layers 14 16 18 --position -1
    python experiments/rfa_by_layer.py --directions runs/defenses/directions/base --layers 16 \\
        --behaviours runs/defenses/data/behaviours.jsonl --n 100 --max-new-tokens 128 \\
        --part results/defenses/members/base-layer16.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refat import hooks
from refat.data import prompt_sets
from refat.directions import Directions
from refat.generation import generate
from refat.judges import from_spec
from refat.models import load
from refat.pipeline.demo import demo_config
from refat.storage import read_jsonl, write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--directions", type=Path, default=Path("runs/demo/directions/base"))
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--position", type=int, default=-1)
    p.add_argument("--behaviours", type=Path, default=None, help="JSONL of goal and id (default: the demo's test set)")
    p.add_argument("--n", type=int, default=None, help="the first n behaviours only")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the demo's RFA attack's")
    p.add_argument("--judge", default="refusal-strings:default", help="a judge spec (default: the demo's)")
    p.add_argument("--model", default=None, help="default: the demo's model")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: DIRECTIONS/rfa_by_layer.json)")
    p.add_argument("--part", type=Path, default=None, help="also write the completions as a part file here")
    args = p.parse_args(argv)
    demo = demo_config()
    d = Directions.load(args.directions)
    model = load(args.model or demo.model, dtype=demo.dtype)
    if args.behaviours is None:
        goals = prompt_sets(demo.data).prompts("harmful", "test")
        ids = [str(i) for i in range(len(goals))]
    else:
        rows = read_jsonl(args.behaviours)
        goals, ids = [r["goal"] for r in rows], [str(r["id"]) for r in rows]
    goals, ids = goals[:args.n], ids[:args.n]
    max_new_tokens = args.max_new_tokens or demo.first_rfa.parsed().max_new_tokens
    judge = from_spec(args.judge)
    result, completions, verdicts = {}, {}, []
    for layer in args.layers:
        with hooks.ablate(model, d.vector(layer, args.position)):
            texts = generate(model, goals, max_new_tokens=max_new_tokens, desc=f"RFA layer {layer}")
        broken = judge.verdicts(goals, texts)  # jailbroken: not refused, for a refusal-string judge
        result[layer] = 1 - sum(broken) / len(broken)
        column = f"rfa-layer{layer}"
        completions |= {f"{column}/{i}": {"goal": g, "completion": t} for i, g, t in zip(ids, goals, texts)}
        verdicts += [{"attack": column, "behaviour_id": i, "jailbroken": bool(b)} for i, b in zip(ids, broken)]
        print(f"layer {layer} position {args.position}: harmful refused under RFA {result[layer]:.0%} (n={len(goals)})")
    out = {"position": args.position, "judge": judge.name, "n": len(goals), "max_new_tokens": max_new_tokens,
           "behaviours": str(args.behaviours) if args.behaviours else "demo test split", "refusal_rate_rfa": result}
    write_json(args.out or args.directions / "rfa_by_layer.json", out)
    if args.part is not None:
        write_json(args.part, {"key": args.part.stem, "directions": str(args.directions), **out,
                               "completions": completions, "verdicts": {judge.name: verdicts}})
    return out


if __name__ == "__main__":
    main()
