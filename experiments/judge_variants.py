"""What each change to the offline judge buys, measured on JailbreakBench's 100 human labels by nested cross-validation.

Each step is a pool of judges; :func:`refat.judges.ensemble.nested_cv` picks the members (up to ``max_members``),
their weights and the threshold inside the training folds only, so a step's κ is what a user can expect on rows the
choices never saw (a single judge's step fits only its threshold). The pools are fixed here in advance; every
prompt variant scored is in them, so choosing among prompts is also made inside the folds (the "all" step).

    python experiments/judge_variants.py --out results/judges/jbb-variants.json

Scores are read from (and missing ones added to) the cache ``refat judge-agreement`` keeps, so a rerun judges
nothing again; a missing 1.5B judge's scores take about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from refat import catalog
from refat.judges import cache_path, cached_scores, load_classifier_comparison, parse_spec, rank_auc
from refat.judges.ensemble import nested_cv
from refat.storage import write_json

STRINGS = ["refusal-strings:default", "refusal-strings:arditi", "refusal-strings:gcg", "refusal-prefix:default"]
HARMBENCH_QUESTION = ["llm:qwen2.5-coder-0.5b", "llm:qwen2.5-coder-1.5b"]
VARIANTS = ["llm:qwen2.5-coder-0.5b#comply", "llm:qwen2.5-coder-0.5b#comply-fewshot", "llm:qwen2.5-coder-0.5b#content",
            "llm:qwen2.5-coder-1.5b#comply", "llm:qwen2.5-coder-1.5b#comply-fewshot"]
ANCHOR = "refusal-prefix:default"  # the best string judge (κ 0.647, as arditi's on these rows)


def default_steps(variants: Sequence[str] = VARIANTS) -> list[dict]:
    """The steps, in the order the report reads them: the baselines, each variant alone and beside the string
    judge, and everything together."""
    steps = [{"step": "best string judge, chosen in the folds", "pool": STRINGS, "max_members": 1},
             *({"step": f"{s} (threshold fitted in the folds)", "pool": [s], "max_members": 1} for s in HARMBENCH_QUESTION),
             {"step": "committed ensemble pool (strings + HarmBench question)", "pool": STRINGS + HARMBENCH_QUESTION,
              "max_members": 3}]
    for v in variants:
        steps += [{"step": f"{v} (threshold fitted in the folds)", "pool": [v], "max_members": 1},
                  {"step": f"{ANCHOR} + {v}", "pool": [ANCHOR, v], "max_members": 2}]
    chat = HARMBENCH_QUESTION + list(variants)
    for model in dict.fromkeys(parse_spec(s).arg for s in chat):
        prompts = [s for s in chat if parse_spec(s).arg == model]
        steps.append({"step": f"llm:{model}, its prompt chosen in the folds", "pool": prompts, "max_members": 1})
    steps += [{"step": "any one chat judge (model and prompt chosen in the folds)", "pool": chat, "max_members": 1},
              {"step": "all judges (strings, both questions, every variant)",
               "pool": STRINGS + HARMBENCH_QUESTION + list(variants), "max_members": 3}]
    return steps


def variant_table(scores: dict[str, Sequence[float]], truth: Sequence[bool], steps: Sequence[dict], *,
                  anchor: str | None = ANCHOR, **cv) -> dict:
    """Per judge: AUC over all rows and among the rows ``anchor`` calls jailbroken (can it tell a real jailbreak
    from a non-refusal that is harmless, the string judge's mistakes?); per step: the nested cross-validation."""
    judges = {}
    for spec, s in scores.items():
        judges[spec] = {"auc": rank_auc(s, truth)}
        if anchor is not None and spec != anchor:
            rows = [i for i, a in enumerate(scores[anchor]) if a > 0.5]
            judges[spec]["auc_where_anchor_says_jailbroken"] = rank_auc([s[i] for i in rows], [truth[i] for i in rows])
    out = []
    for step in steps:
        result = nested_cv({m: scores[m] for m in step["pool"]}, truth, max_members=step["max_members"], **cv)
        out.append({**step, "cohen_kappa": result["cohen_kappa"], "cohen_kappa_se": result["cohen_kappa_se"],
                    "cohen_kappa_range": result["cohen_kappa_range"], "accuracy": result["accuracy"],
                    "chosen": result["chosen"]})
    return {"anchor": anchor, "judges": judges, "steps": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=VARIANTS, help="the prompt variants scored (judge specs)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", type=Path, default=Path("results/judges/jbb-variants.json"))
    args = p.parse_args()
    steps = default_steps(args.variants)
    rows = load_classifier_comparison()
    truth, pairs = [r.human_majority for r in rows], [(r.goal, r.response) for r in rows]
    cache = catalog.cache_dir() / "judge-agreement" / "goal"
    specs = list(dict.fromkeys(s for step in steps for s in step["pool"]))
    for s in specs:
        parse_spec(s)  # every spec checked before any model loads
    scores = {s: cached_scores(s, pairs, cache_path(cache, s), dtype=args.dtype) for s in specs}
    table = variant_table(scores, truth, steps)
    print(f"{'step':78s} {'kappa':>6s} {'SE':>5s}  range")
    for r in table["steps"]:
        print(f"{r['step'][:78]:78s} {r['cohen_kappa']:6.3f} {r['cohen_kappa_se']:5.3f}  "
              f"{r['cohen_kappa_range'][0]:.3f}-{r['cohen_kappa_range'][1]:.3f}")
    write_json(args.out, {"labels": "jailbreakbench classifier_comparison.csv, human majority (n=100)",
                          "behaviour_field": "goal", "nested_cv": "5 outer x 5 inner folds, 5 repeats, l2 1, seed 0",
                          **table})


if __name__ == "__main__":
    main()
