"""The recipe experiment: robust refusal without over-refusal (``configs/recipe.yaml``).

It is ``refat run configs/recipe.yaml`` (resumable: a rerun skips every finished stage) followed by
:func:`summarize`, which turns the run's ``report/paired.json`` into ``results/overrefusal.json``: one row per
model under test (method, variant, training seed), each measure a ``{"value", "n", "ci"}`` cell with its
difference from the base model on the same items (``vs_base``, 95 % paired-bootstrap interval); a variant
trained at several seeds adds a row with seed ``"mean ± sd"``. RESULTS.md documents the schema.

    python experiments/recipe.py                               # runs/recipe/, results/overrefusal.json
    python experiments/recipe.py seeds=[0,1,2]                  # any config key, as `refat run`
    python experiments/recipe.py --summary-only runs/recipe     # the table from a finished run folder
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refat.pipeline import Layout, load_config, run_experiment
from refat.pipeline.stages.report import rfa_measure
from refat.storage import read_json, write_json

CONFIG = Path(__file__).parents[1] / "configs" / "recipe.yaml"
RESULTS = Path(__file__).parents[1] / "results" / "overrefusal.json"
HARMLESS, EDGY = "harmless", "edgy"  # the over-refusal labels of configs/recipe.yaml
MEAN = "mean ± sd"  # the seed of a row averaged over training seeds


def summarize(run_dir: str | Path) -> dict:
    """``{"rows": [{"method", "setting", "seed", "harmless_refusal", "edgy_refusal", "rfa_refusal", "utility"}]}``
    from a finished run folder. ``setting`` is the variant's name, ``changes`` its pair and training options that
    differ from the run's; a measure the config does not make is null."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    paired = read_json(Layout(run_dir).report / "paired.json")
    rfa = cfg.worst_case_rfa
    measures = {"harmless_refusal": HARMLESS, "edgy_refusal": EDGY, "utility": "utility",
                "rfa_refusal": rfa_measure(rfa.label) if rfa else None}
    rows = []
    for d in cfg.variants:
        keys = [(s.key, s.seed) for s in cfg.subjects if s.defense.name == d.name]
        if len(keys) > 1:
            keys.append((f"{d.name} ({len(keys)} seeds)", MEAN))
        for key, seed in keys:
            cells = paired[key]
            rows.append({"method": d.method, "setting": d.name, "seed": seed,
                         "changes": {"pairs": d.pairs, "train": d.train},
                         **{name: cells.get(m) if m else None for name, m in measures.items()}})
    return {"run": str(run_dir), "config_hash": cfg.hash(), "judge": cfg.judges[0] if cfg.judges else None,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config keys, e.g. seeds=[0,1,2] train.steps=40")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="runs are written to OUT/<name>")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--summary-only", type=Path, metavar="RUN_DIR", help="summarize a finished run, run nothing")
    args = parser.parse_args(argv)
    run_dir = args.summary_only or run_experiment(load_config(args.config, args.overrides), args.out)
    write_json(args.results, summarize(run_dir))
    print(f"written: {args.results}")


if __name__ == "__main__":
    main()
