"""Quick CPU comparison of defenses on the default offline model: base vs RT vs ReFAT (vs CAT, LAT).

For each method: build training pairs once (outside the demo's val/test prompts), train with the
quick config, then attack the trained model with RFA using directions re-extracted from *that*
model (the adaptive attack) at the layer and position selected on the base model, and measure
refusal rates on the demo's 50 + 50 held-out prompts. Writes ``OUT/<method>/summary.json`` and a
table ``OUT/defenses.json``.

    python experiments/defenses_quick.py --methods rt refat --out runs/defenses
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

from refat.directions import Directions, SelectionConfig
from refat.models import load
from refat.storage import write_json
from refat.training import TrainConfig, train
from refat.workflow import DemoConfig, attack_rfa, find_directions, prompt_sets, training_pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=["rt", "refat"], choices=["rt", "refat", "cat", "lat"])
    p.add_argument("--base-directions", type=Path, default=Path("runs/demo"), help="folder of the base model's demo")
    p.add_argument("--out", type=Path, default=Path("runs/defenses"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--n-harmful", type=int, default=64)
    p.add_argument("--n-harmless", type=int, default=64)
    args = p.parse_args()

    demo = DemoConfig()
    base_dirs = Directions.load(args.base_directions)
    layer, position = base_dirs.selection.layer, base_dirs.selection.position
    # the adaptive attacker re-extracts the feature from each defended model at the base model's choice
    forced = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, layers=[layer],
                             positions=[position])
    sets = prompt_sets(demo.data)
    base = load(demo.model, dtype=demo.dtype)
    pairs = training_pairs(base, demo.data, args.n_harmful, args.n_harmless, args.out / "pairs.jsonl")
    rows = {}
    for method in args.methods:
        out = args.out / method
        if (out / "summary.json").exists():
            rows[method] = json.loads((out / "summary.json").read_text())
            continue
        model = copy.deepcopy(base)  # training wraps the model it is given: each method starts from the base
        result = train(model, pairs, TrainConfig(method=method, steps=args.steps), out / "train", resume=True)
        directions = find_directions(result.model, sets, forced, out)
        summary = attack_rfa(result.model, directions, sets, demo.rfa, out,
                             extra={"method": method, "train": json.loads((out / "train" / "train_config.json").read_text()),
                                    "compute": result.compute})
        rows[method] = summary
    for method in ("rt", "refat", "cat", "lat"):  # the table keeps every method run into this folder, not just these
        if method not in rows and (args.out / method / "summary.json").exists():
            rows[method] = json.loads((args.out / method / "summary.json").read_text())
    table = {m: {k: s[k] for k in ("harmful_refusal_rate", "harmful_refusal_rate_rfa", "harmless_refusal_rate",
                                   "harmless_refusal_rate_rfa")} | {"train_seconds": s["config"].get("compute", {}).get("seconds")}
             for m, s in rows.items()}
    write_json(args.out / "defenses.json", table)
    for m, r in table.items():
        print(m, json.dumps(r))


if __name__ == "__main__":
    main()
