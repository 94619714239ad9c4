"""The defenses table's second RFA column: each model attacked along its own defender-style refusal direction.

The table's RFA column takes the sweep's worst case, chosen on validation prompts by the fewest refused or looping
answers. Read, that member's answers on the base model mostly carry out nothing (RESULTS.md, "The completions
read"): it removes refusal by breaking the model. An attacker who wants answers has a second obvious choice: the
direction Arditi et al.'s selection picks on the attacked model's own features (the one whose ablation keeps
harmless outputs closest to the model's own), made on the training data's validation split, never on a test
behaviour. This measures it on the table's behaviours with the table's judges, outside the frozen part files
(whose keys would change with a new attack), from the run folder while it holds the model's stages (or its
``stale/`` once the next model's run moved them there): run it in the sitting that measures the model.

    python experiments/defenses_selected.py --keys base rt   # results/defenses/selected/<key>.json, then:
    python experiments/defenses_read.py sample --parts results/defenses/selected --whole rfa-selected

Per model about 4 minutes of generation and 3 of judging on 2 CPU cores; a model whose file exists is skipped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from refat.attacks.rfa import RFAConfig, ablation
from refat.directions import Directions
from refat.generation import generate
from refat.judges import cached_scores, judge_threshold
from refat.models import load
from refat.pipeline import load_config
from refat.pipeline.context import defended_model
from refat.pipeline.provenance import git_state
from refat.pipeline.runner import read_marker
from refat.stats import rate
from refat.storage import read_json, read_jsonl, write_json

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "defenses.yaml"
OUT = ROOT / "results" / "defenses" / "selected"
COLUMN = "rfa-selected"


def stage(run: Path, name: str) -> Path | None:
    """A finished stage's folder: in the run, or in its ``stale/`` once the next model's run moved it there."""
    for folder in (run / name, run / "stale" / name):
        if (read_marker(folder) or {}).get("status") == "done":
            return folder
    return None


def read_stages(run: Path, key: str) -> dict[str, Path]:
    """The model's finished stage folders (``directions``, and ``train`` unless it is the base model), checked to
    belong together: the directions stage must have read this very training result, which a ``stale/`` copy from
    an older run may not have."""
    kinds = ["directions"] + ([] if key == "base" else ["train"])
    folders = {kind: stage(run, f"{kind}/{key}") for kind in kinds}
    missing = [f"{kind}/{key}" for kind, folder in folders.items() if folder is None]
    if missing:
        raise SystemExit(f"{run}: no finished stage {', '.join(missing)}")
    if "train" in folders:
        extracted_from = read_marker(folders["directions"])["inputs"]["reads"].get(f"train/{key}")
        trained = read_marker(folders["train"]).get("result")
        if extracted_from != trained:
            raise SystemExit(f"{folders['directions']} was extracted from training result {extracted_from}, but "
                             f"{folders['train']} holds {trained}: rerun the run's directions stage for {key}")
    return folders


def measure(cfg, run: Path, key: str, stages: dict[str, Path], base, n: int | None, max_new_tokens: int,
            batch_size: int, cache: Path) -> dict:
    """One model's column (its ``stages`` from :func:`read_stages`): completions under its own selected direction,
    and every judge's verdicts on them."""
    rows = read_jsonl(run / "data" / "behaviours.jsonl")[:n]  # the table's behaviours, in the attacks' order
    goals, ids = [r["goal"] for r in rows], [str(r["id"]) for r in rows]
    directions = Directions.load(stages["directions"])
    model = base if "train" not in stages else defended_model(base, stages["train"], key)
    rfa = RFAConfig(direction="selected", max_new_tokens=max_new_tokens, batch_size=batch_size)
    with ablation(model, directions, rfa):
        texts = generate(model, goals, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=f"{COLUMN} {key}")
    if model is not base:
        del model
    sel = directions.selection
    verdicts, asr = {}, {}
    for spec in cfg.judges:
        scores = cached_scores(spec, list(zip(goals, texts)), cache, dtype=cfg.dtype)
        broken = [s > judge_threshold(spec) for s in scores]
        verdicts[spec] = [{"attack": COLUMN, "behaviour_id": i, "score": s, "jailbroken": b}
                          for i, s, b in zip(ids, scores, broken)]
        asr[spec] = rate(broken, "bootstrap").to_dict()  # as the table's cells
    return {"key": key, "column": COLUMN, "n": len(goals), "max_new_tokens": max_new_tokens,
            "direction": {"layer": sel.layer, "position": sel.position, "mode": rfa.mode, "kl": sel.kl,
                          "refusal_score": sel.refusal_score, "induce_score": sel.induce_score},
            "asr": asr, "completions": {f"{COLUMN}/{i}": {"goal": g, "completion": t}
                                        for i, g, t in zip(ids, goals, texts)},
            "verdicts": verdicts, "git": git_state(), "run_provenance": read_json(run / "provenance.json").get("git")}


def table_column_size(cfg) -> int | None:
    """How many behaviours the table's RFA column attacks (None: all), so the two columns pair behaviour by
    behaviour."""
    rfa = next((a for a in cfg.attacks if a.name == "rfa"), None)
    if rfa is None:
        raise SystemExit(f"{cfg.name}: the config has no rfa attack to take the column's size from; pass --n")
    return rfa.n_behaviours


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--run", default="runs/defenses", help="the run folder holding the models' stages")
    p.add_argument("--keys", nargs="+", required=True, help="models under test (base, rt, refat@seed1, ...)")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--n", type=int, default=None,
                   help="behaviours: the first n (default: as many as the config's RFA column attacks)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        p.error(f"--n: at least 1 behaviour, got {args.n}")
    cfg, run, out = load_config(args.config), Path(args.run), Path(args.out)
    n = args.n if args.n is not None else table_column_size(cfg)
    stages = {key: read_stages(run, key) for key in args.keys}  # fail before loading the model
    todo = [k for k in args.keys if not (out / f"{k}.json").exists()]
    written = []
    if todo:
        base = load(cfg.model, dtype=cfg.dtype, device=cfg.device, revision=cfg.model_revision)
        for key in todo:
            write_json(out / f"{key}.json", measure(cfg, run, key, stages[key], base, n, args.max_new_tokens,
                                                    args.batch_size, out / "judge_cache.jsonl"))
            written.append(out / f"{key}.json")
            print(f"written {out / f'{key}.json'}")
    return written


if __name__ == "__main__":
    main()
