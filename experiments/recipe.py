"""The recipe experiment: robust refusal without over-refusal (``configs/recipe.yaml``).

It runs the config one model at a time (:mod:`refat.pipeline.parts`): the base model, then each variant and seed
in the config's order, each written to ``results/recipe/<key>.json`` as soon as it is measured (commit them as they
come: a later sitting skips what is there, even without the run folder). After each model,
``results/overrefusal.json`` is rebuilt from the part files: one row per model under test (method, variant,
training seed), each measure a ``{"value", "n", "ci"}`` cell with its difference from the base model on the same
items (``vs_base``, 95 % paired-bootstrap interval); a variant measured at several seeds adds a row with seed
``"mean ± sd"``. RESULTS.md documents the schema.

    python experiments/recipe.py                        # every model not yet in results/recipe/
    python experiments/recipe.py --only refat-b25 rt    # these (and the base model) only
    python experiments/recipe.py seeds=[0,1,2]          # any config key, as `refat run`
    python experiments/recipe.py --summary-only         # the table from the part files, run nothing
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refat.pipeline import ExperimentConfig, load_config, parts
from refat.pipeline.stages.report import rfa_measure
from refat.storage import write_json

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "recipe.yaml"
PARTS = ROOT / "results" / "recipe"
RESULTS = ROOT / "results" / "overrefusal.json"
HARMLESS, EDGY = "harmless", "edgy"  # the over-refusal labels of configs/recipe.yaml
MEAN = "mean ± sd"  # the seed of a row averaged over training seeds


def summarize(cfg: ExperimentConfig, parts_dir: str | Path = PARTS) -> dict:
    """``{"rows": [{"method", "setting", "seed", "changes", "harmless_refusal", "edgy_refusal", "rfa_refusal",
    "utility", "train_seconds"}]}`` from the part files measured so far. ``setting`` is the variant's name,
    ``changes`` its pair and training options that differ from the run's; a measure the config does not make is
    null."""
    measured = parts.load_parts(cfg, parts_dir)
    paired = parts.paired(cfg, measured) or {}
    rfa = cfg.worst_case_rfa
    measures = {"harmless_refusal": HARMLESS, "edgy_refusal": EDGY, "utility": "utility",
                "rfa_refusal": rfa_measure(rfa.label) if rfa else None}
    rows = []
    for d in cfg.variants:
        keys = [(s.key, s.seed) for s in cfg.subjects if s.defense.name == d.name and s.key in paired]
        if len(keys) > 1:
            keys.append((f"{d.name} ({len(keys)} seeds)", MEAN))
        for key, seed in keys:
            cells = paired[key]
            train = measured[key]["seconds"].get(f"train/{key}") if key in measured else None
            rows.append({"method": d.method, "setting": d.name, "seed": seed,
                         "changes": {"pairs": d.pairs, "train": d.train}, "train_seconds": train,
                         **{name: cells.get(m) if m else None for name, m in measures.items()}})
    return {"experiment": cfg.name, "parts": sorted(measured), "judge": cfg.judges[0] if cfg.judges else None,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config keys, e.g. seeds=[0,1,2]")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="run folder root (runs/<name>)")
    parser.add_argument("--parts", type=Path, default=PARTS, help="one file per measured model")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="+", metavar="KEY", default=(), help="measure these models (and the base)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the table from the part files")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    unknown = set(args.only) - {s.key for s in cfg.trained}
    if unknown:
        parser.error(f"--only: no trained model {', '.join(sorted(unknown))}; choose from "
                     + ", ".join(s.key for s in cfg.trained))
    todo = [] if args.summary_only else [s.key for s in cfg.subjects if s.seed is not None
                                         and (not args.only or s.key in args.only)]
    for key in todo or [None]:  # one model at a time, the table rebuilt after each
        if key is not None:
            parts.run_parts(cfg, args.parts, args.out, keys=[key])
        write_json(args.results, summarize(cfg, args.parts))
        print(f"written: {args.results}", flush=True)


if __name__ == "__main__":
    main()
