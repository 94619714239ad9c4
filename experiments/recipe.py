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

from pathlib import Path

from refat.pipeline import ExperimentConfig, parts
from refat.pipeline.stages.report import rfa_measure

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "recipe.yaml"
PARTS = ROOT / "results" / "recipe"
RESULTS = ROOT / "results" / "overrefusal.json"
HARMLESS, EDGY = "harmless", "edgy"  # the over-refusal labels of configs/recipe.yaml
MEAN = "mean ± sd"  # the seed of a row averaged over training seeds


def summarize(cfg: ExperimentConfig, parts_dir: str | Path = PARTS) -> dict:
    """``{"rows": [{"method", "setting", "seed", "changes", "harmless_refusal", "edgy_refusal", "rfa_refusal",
    "rfa_degenerate", "utility", "train_seconds"}]}`` from the part files measured so far. ``setting`` is the
    variant's name, ``changes`` its pair and training options that differ from the run's; ``rfa_degenerate`` the
    share of the attacked completions that are degenerate (a seed mean row has none); a measure the config does not
    make is null."""
    measured = parts.load_parts(cfg, parts_dir)
    paired = parts.paired(cfg, measured) or {}
    degenerate = parts.degenerate_cells(measured)
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
                         "rfa_degenerate": degenerate.get(key, {}).get(rfa.label) if rfa else None,
                         **{name: cells.get(m) if m else None for name, m in measures.items()}})
    return {"experiment": cfg.name, "parts": sorted(measured), "judge": cfg.judges[0] if cfg.judges else None,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parts.experiment_main(argv, description=__doc__.split("\n\n")[0], config=CONFIG, parts_dir=PARTS,
                          results=RESULTS, summarize=summarize)


if __name__ == "__main__":
    main()
