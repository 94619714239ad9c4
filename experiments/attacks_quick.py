"""ASR of every attack on the behaviours the default offline model refuses, at CPU-sized budgets.

The behaviours are screened once (the first ``--n`` of ``--behaviours`` that the model refuses without
attack, greedy, refusal-string judge), then each attack runs on exactly that set with the budget in
``BUDGETS`` (the same budgets go into the summary). Records land in ``OUT/<attack>/records.jsonl``: a
rerun resumes each attack where it stopped and skips finished ones; ``OUT/summary.json`` holds ASR and
mean cost per behaviour. ``--adapter`` attacks a defended model instead (same behaviours screened on it).

    python experiments/attacks_quick.py --attacks prefill templates embedding --out runs/attacks
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from refat.attacks import autodan, embedding, gcg, pair, prefill, templates
from refat.attacks.base import Behaviour, attack_success_rate, behaviours_from, read_records, refused_by
from refat.chat import LocalChat
from refat.models import load
from refat.storage import read_jsonl, write_json, write_jsonl

# Budgets for 2 CPU cores and the 0.5B model in fp32 (minutes for 20 behaviours, measured in RESULTS.md).
BUDGETS = {
    "prefill": prefill.PrefillConfig(n_words=5, max_new_tokens=64),
    "templates": templates.TemplatesConfig(source="pyrit", n=4, seed=0, max_new_tokens=48),
    "embedding": embedding.EmbeddingConfig(num_steps=20, step_size=0.1, max_new_tokens=64),
    "autodan": autodan.AutoDANConfig(num_steps=3, population=8, num_elites=1, max_new_tokens=48, check_every=1),
    "pair": pair.PAIRConfig(n_streams=2, n_iterations=2, attacker_max_new_tokens=200, target_max_new_tokens=64),
    "gcg": gcg.GCGConfig(num_steps=30, search_width=64, topk=64, max_new_tokens=64, early_stop=True),
}
MODULES = {"prefill": prefill, "templates": templates, "embedding": embedding, "autodan": autodan, "gcg": gcg}


def screened(model, args) -> list[Behaviour]:
    """The refused behaviours, screened once and kept (so every attack, and every rerun, sees the same set)."""
    path = args.out / "behaviours.jsonl"
    if path.exists():
        return [Behaviour(**r) for r in read_jsonl(path)]
    kept = refused_by(model, behaviours_from(args.behaviours), args.n)
    if len(kept) < args.n:
        raise SystemExit(f"only {len(kept)} behaviours of {args.behaviours} are refused; lower --n")
    write_jsonl(path, [{"goal": b.goal, "target": b.target} for b in kept])
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attacks", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--adapter", type=Path, default=None, help="a trained LoRA adapter: attack the defended model")
    p.add_argument("--behaviours", default="harmbench-test")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--n-gcg", type=int, default=10, help="GCG is the slowest: the first N screened behaviours")
    p.add_argument("--out", type=Path, default=Path("runs/attacks"))
    args = p.parse_args()

    model = load(args.model, dtype="float32", adapter=args.adapter)
    behaviours = screened(model, args)
    for name in args.attacks:
        out, cfg = args.out / name, BUDGETS[name]
        todo = behaviours[:args.n_gcg] if name == "gcg" else behaviours
        t0 = time.perf_counter()
        if name == "pair":  # the model attacks itself: a weak attacker, but an offline one
            pair.run(model, todo, cfg, attacker=LocalChat(model, seed=cfg.seed), out_dir=out)
        else:
            MODULES[name].run(model, todo, cfg, out)
        print(f"{name}: {time.perf_counter() - t0:.0f} s this run", flush=True)

    rows = {}
    for name in BUDGETS:
        path = args.out / name / "records.jsonl"
        if not path.exists():
            continue
        records = read_records(path)
        by_behaviour: dict[str, list] = {}
        for r in records:
            by_behaviour.setdefault(r.extra.get("behaviour_id", r.behaviour_id), []).append(r)
        rows[name] = {
            "behaviours": len(by_behaviour), "prompts": len(records),
            "asr": attack_success_rate(records),  # per prompt (templates: per template x behaviour)
            "asr_best_of_n": sum(any(not r.refused for r in rs) for rs in by_behaviour.values()) / len(by_behaviour),
            "seconds_per_behaviour": sum(r.cost.seconds for r in records) / len(by_behaviour),
            "forward_per_behaviour": sum(r.cost.forward for r in records) / len(by_behaviour),
            "backward_per_behaviour": sum(r.cost.backward for r in records) / len(by_behaviour),
            "budget": vars(BUDGETS[name]) | ({"attacker": "the target model itself (LocalChat, sampled)"}
                                             if name == "pair" else {}),
        }
        if name == "gcg":
            rows[name]["median_best_loss"] = statistics.median(r.extra["best_loss"] for r in records)
            rows[name]["median_init_loss"] = statistics.median(r.extra["init_loss"] for r in records)
    write_json(args.out / "summary.json", {"model": args.model, "adapter": str(args.adapter) if args.adapter else None,
                                          "behaviours": args.behaviours, "n_screened": len(behaviours),
                                          "judge": "refusal-strings:default", "attacks": rows})
    print("| attack | behaviours | ASR | best-of-n ASR | s / behaviour | fwd / bwd per behaviour |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['behaviours']} | {r['asr']:.0%} | {r['asr_best_of_n']:.0%} | "
              f"{r['seconds_per_behaviour']:.0f} | {r['forward_per_behaviour']:.0f} / {r['backward_per_behaviour']:.0f} |")


if __name__ == "__main__":
    main()
