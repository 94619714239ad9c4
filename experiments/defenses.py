"""The defenses table: base, RT and ReFAT under the attacker's worst case on out-of-distribution behaviours.

``configs/defenses.yaml`` run one model at a time (:mod:`refat.pipeline.parts`): each model's measurements go to
``results/defenses/<key>.json`` as soon as it is done (commit them as they come; a later sitting skips them), and
``results/defenses.json`` is rebuilt from those files after each. Its schema (RESULTS.md):

- ``behaviours``: the attacked set; ``judges``: the judges, in order; ``models``: per model its method, seed,
  training config and stage seconds;
- ``rows``: one per model × attack column: ``method``, ``setting`` (the defense's name), ``seed``, ``attack``,
  ``n`` (behaviours), ``asr`` and ``ci`` (judge → rate in [0, 1], and its 95 % interval over behaviours),
  ``degenerate`` (the share of the column's completions that are degenerate, with its interval: a string judge
  counts such nonsense as a success), ``disagreement`` (the share of completions the first two judges call
  differently) and ``choice`` (the attacker's choice on validation prompts: the worst-case RFA member, the chosen
  template);
- ``means``: per defense × attack with several seeds, each judge's mean ± sd over seeds.

    python experiments/defenses.py                     # every model not yet in results/defenses/
    python experiments/defenses.py --only refat rt     # these (and the base model) only
    python experiments/defenses.py --summary-only      # the table from the part files, run nothing
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from refat.pipeline import ExperimentConfig, parts
from refat.pipeline.stages.report import judge_agreement
from refat.stats import spread

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "defenses.yaml"
PARTS = ROOT / "results" / "defenses"
RESULTS = ROOT / "results" / "defenses.json"


def _choice(part: dict, attack: str) -> dict | None:
    """What the attacker chose on validation prompts for this column, from the attack's own files."""
    files = part["attacks"].get(attack, {})
    summary, choice = files.get("summary", {}), files.get("choice")
    if "member" in summary:  # what RFA ablated (worst-case: the sweep's member, with its validation scores)
        return {"direction": summary.get("direction"), "member": summary["member"]}
    if choice is not None:
        return {"templates": choice["chosen"], "validation_prompts": choice["validation_prompts"]}
    return None


def summarize(cfg: ExperimentConfig, parts_dir: str | Path = PARTS) -> dict:
    measured = parts.load_parts(cfg, parts_dir)
    tables, judges = parts.asr(cfg, measured), cfg.judges
    judged = parts.verdicts(cfg, measured)
    degenerate = parts.degenerate_cells(measured)
    disagree = {} if len(judged) < 2 else {  # the first two judges, as the report's judge agreement shows them
        (c["defense"], c["attack"]): c["disagree"]["value"]
        for c in judge_agreement(judged, parts.asr_cells(cfg, measured))[0]["cells"]}
    rows, by_setting = [], defaultdict(lambda: defaultdict(list))
    for s in cfg.subjects:
        if s.key not in measured:
            continue
        p, first = measured[s.key], tables[judges[0]]
        for attack in first["rates"].get(s.key, {}):
            row = {"method": p["method"], "setting": p["defense"], "seed": p["seed"], "attack": attack,
                   "n": first["n"][s.key][attack],
                   "asr": {j: tables[j]["rates"][s.key][attack] for j in judges},
                   "ci": {j: tables[j]["ci"][s.key][attack] for j in judges},
                   "degenerate": degenerate[s.key].get(attack),
                   "disagreement": disagree.get((s.key, attack)), "choice": _choice(p, attack)}
            rows.append(row)
            if s.seed is not None:
                by_setting[p["defense"], attack][s.seed] = row
    means = [{"setting": d, "attack": a, "seeds": sorted(seeds), "n": [r["n"] for r in seeds.values()],
              "asr": {j: spread([r["asr"][j] for r in seeds.values()]).to_dict() for j in judges}}
             for (d, a), seeds in by_setting.items() if len(seeds) > 1]
    models = {k: {x: p[x] for x in ("method", "defense", "seed", "train", "seconds", "provenance")}
              for k, p in measured.items()}
    return {"experiment": cfg.name, "behaviours": _behaviours(cfg), "judges": judges, "models": models,
            "rows": rows, "means": means}


def _behaviours(cfg: ExperimentConfig) -> str:
    kept = f", less near duplicates of training prompts (similarity >= {cfg.near_duplicates})" \
        if cfg.near_duplicates is not None and cfg.behaviours is not None else ""
    return f"{cfg.behaviours or cfg.data.harmful + ' test split'}{kept}; attacker's choices on " \
           f"{cfg.validation or cfg.data.harmful + ' val split'}"


def main(argv: list[str] | None = None) -> None:
    parts.experiment_main(argv, description=__doc__.split("\n\n")[0], config=CONFIG, parts_dir=PARTS,
                          results=RESULTS, summarize=summarize)


if __name__ == "__main__":
    main()
