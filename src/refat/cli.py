"""The ``refat`` command: thin wrappers over the Python API."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import catalog
from .configs import ConfigError, add_arguments, from_arguments
from .data import DataConfig, DatasetError
from .directions import SelectionConfig
from .errors import user_message
from .storage import claim_output, folder_lock, replacing, write_json


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=catalog.DEFAULT_MODEL,
                   help=f"catalog name ({', '.join(catalog.CATALOG)}), local HF dir, .gguf file or hub id")
    p.add_argument("--revision", default=None, help="a hub model's branch, tag or commit (hub ids only)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default: auto = bfloat16 "
                                                  "on a GPU that has it, float16 on older GPUs, float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:1 ... (default: this process's GPU "
                                                  "(LOCAL_RANK under torchrun), else CPU)")
    p.add_argument("--device-map", default=None, metavar="auto",
                   help="spread a model larger than one GPU over all GPUs (accelerate's device_map; not with --device)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
    p.add_argument("--adapter", default=None, type=Path, help="a LoRA adapter folder to merge in (a defended model)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="refuse longer prompts (a clear error, not OOM)")


# what `refat directions` and `refat train` read: the data splits (no test split for directions, which
# uses train and val only) and the demo's relaxed screening of candidates
DIRECTIONS_DATA = DataConfig(n_test=0)
DIRECTIONS_SELECTION = SelectionConfig(screen_prompts=8, screen_keep=12)


def _attack_parsers(attacks) -> None:
    """One sub-command per registered attack: its options are its config dataclass's fields, plus the
    context resources it needs; and ``replay``, which re-sends another run's prompts."""
    from .attacks import REGISTRY

    for entry in REGISTRY.values():
        a = attacks.add_parser(entry.name, help=entry.help)
        _model_args(a)
        a.add_argument("--behaviours", default="advbench", help="registry name, .csv/.jsonl/.json file or hf:org/name")
        a.add_argument("--n-behaviours", type=int, default=10, help="the first N behaviours")
        a.add_argument("--only-refused", action="store_true",
                       help="keep only behaviours the model refuses without attack (screened before taking N)")
        if entry.resumable:
            a.add_argument("--out", required=True, type=Path,
                           help="records.jsonl goes here; a rerun of the same model, config and behaviours resumes it")
        else:
            a.add_argument("--out", required=True, type=Path, help="records.jsonl and summary.json go here")
        a.add_argument("--overwrite", action="store_true",
                       help="a fresh run replacing --out's records once it finishes (the old ones stay until then)")
        if "directions" in entry.needs:
            a.add_argument("--directions", required=True, type=Path, help="folder written by `refat directions`")
        if "harmless" in entry.needs:
            a.add_argument("--harmless", default="alpaca",
                           help="harmless prompts whose refusal is also measured: registry name, file or hf:org/name")
            a.add_argument("--n-harmless", type=int, default=10, help="the first N harmless prompts")
        if entry.name == "rfa":
            a.add_argument("--validation", default=None,
                           help="harmful prompts the worst-case attacker chooses its ablation on: registry name, file "
                                "or hf:org/name (default: the --behaviours dataset); attacked behaviours are left out")
            a.add_argument("--n-validation", type=int, default=32,
                           help="the first N prompts of --validation that are not attacked behaviours")
        add_arguments(a, entry.config)
    a = attacks.add_parser("replay", help="send another run's attack prompts to this model (transfer)")
    _model_args(a)
    a.add_argument("--records", required=True, type=Path, help="records.jsonl (or its folder) of an earlier attack")
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--overwrite", action="store_true", help="a fresh run replacing --out's records once it finishes")
    from .attacks.transfer import ReplayConfig
    add_arguments(a, ReplayConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refat", description="Refusal feature adversarial training toolkit")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and assemble offline catalog models and datasets")
    p.add_argument("names", nargs="*", default=[catalog.DEFAULT_MODEL],
                   help=f"catalog models ({', '.join(catalog.CATALOG)}) or dataset names")

    p = sub.add_parser("directions", help="extract and select the refusal direction")
    _model_args(p)
    add_arguments(p, DataConfig, defaults=DIRECTIONS_DATA)
    add_arguments(p, SelectionConfig, defaults=DIRECTIONS_SELECTION)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overwrite", action="store_true",
                   help="replace directions of another model in --out (the old ones stay until the new are done)")

    p = sub.add_parser("attack", help="run an attack")
    _attack_parsers(p.add_subparsers(dest="attack", required=True))

    p = sub.add_parser("report", help="write report.md and report.html (tables, plots) for a run folder")
    p.add_argument("run_dir", type=Path, help="a run folder (asr.json, utility.json, train/*/metrics.jsonl, ...)")
    p.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")

    p = sub.add_parser("orthogonalize", help="write a checkpoint with the refusal direction removed from the weights")
    _model_args(p)
    p.add_argument("--directions", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("train", help="fine-tune with rt | refat | cat | lat (LoRA by default)", allow_abbrev=False)
    _model_args(p)
    add_arguments(p, DataConfig)
    from .training import METHODS, PairsConfig, TrainConfig
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, type=Path)
    add_arguments(p, PairsConfig)  # --n-harmful, --n-harmless, --borderline, ... (the training pairs, as `refat run`)
    # every other TrainConfig field (--seed is the data option's, shared); long names, no abbreviations:
    # torchrun takes any script option that abbreviates one of its own (``--n``, ``--no``)
    add_arguments(p, TrainConfig, skip=("method", "seed"), aliases=TRAIN_ALIASES)
    p.add_argument("--train-layers", type=int, nargs="*", default=None,
                   help="old name of --refat-layers (refat) and --adversarial-layers (cat, lat)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("run", help="an experiment from a YAML config, end to end and resumable: train, attack, "
                                   "judge, evaluate, report")
    p.add_argument("config", help="experiment YAML, e.g. configs/quick.yaml, or a packaged preset (demo)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="change single keys, checked like the file: train.steps=10 attacks.1.n_behaviours=5")
    p.add_argument("--out-root", type=Path, default=Path("runs"), help="the run goes to OUT_ROOT/<name>")
    p.add_argument("--force", nargs="+", default=[], metavar="STAGE",
                   help="recompute these stages even if unchanged (a prefix such as 'attacks' or 'train/refat' "
                        "covers the stages under it; their downstream stages follow)")

    from .judges.classifiers import CHAT_PROMPTS, DEFAULT_CHAT_PROMPT  # no model library: cheap at start-up

    p = sub.add_parser("judge-agreement", help="each judge's agreement with JailbreakBench's 100 human-labelled "
                                               "responses (and the published judges' for comparison)")
    p.add_argument("judges", nargs="+", metavar="JUDGE",
                   help="refusal-strings:<list> | refusal-prefix:<list> | llm:<model>[#<prompt>] | harmbench:<model> | "
                        "llama-guard:<model> | ensemble:<file>; a model judge takes @<threshold> on P(jailbroken), "
                        f"default 0.5; the llm judge's prompts: {DEFAULT_CHAT_PROMPT} (default), {', '.join(CHAT_PROMPTS)}")
    p.add_argument("--dtype", default="auto", help="for model judges (default: auto; see refat train --help)")
    p.add_argument("--device", default=None)
    p.add_argument("--device-map", default=None, metavar="auto", help="spread a large judge over all GPUs")
    p.add_argument("--behaviour-field", default="goal", choices=["goal", "prompt"],
                   help="what the judge sees as the request: the behaviour, or the jailbreak prompt that was sent")
    p.add_argument("--calibrate", action="store_true",
                   help="also fit each model judge's threshold to the labels (best Cohen's kappa) and report the "
                        "kappa such a threshold reaches on held-out rows (2-fold cross-validation, 20 splits)")
    p.add_argument("--fit-ensemble", type=Path, default=None, metavar="FILE",
                   help="also fit a logistic combination of the judges to the labels, measure it by nested "
                        "cross-validation (members, weights and threshold chosen inside the training folds) and "
                        "write it to FILE, usable as the judge ensemble:FILE")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("demo", help="find the refusal direction of the default model, ablate it, report refusal rates "
                                     "(`refat run demo`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="change any key of the demo config (src/refat/pipeline/presets/demo.yaml), e.g. "
                        "model=qwen2.5-coder-1.5b data.n_test=20 attacks.0.config.max_new_tokens=64")
    p.add_argument("--out", default=Path("runs/demo"), type=Path, help="the run folder (default: runs/demo)")
    return parser


def _judge_agreement(args) -> int:
    from . import catalog
    from .judges import (
        cache_path,
        cached_scores,
        calibrate_threshold,
        load_classifier_comparison,
        parse_spec,
        published_agreement,
        score_agreement,
    )
    from .judges.ensemble import fit, nested_cv
    from .storage import write_json

    for path in (args.out, args.fit_ensemble):
        if path is not None and path.exists() and not args.overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    specs = [parse_spec(spec, f"judge {i + 1}") for i, spec in enumerate(args.judges)]  # before any model loads
    rows = load_classifier_comparison()
    truth = [r.human_majority for r in rows]
    pairs = [(getattr(r, args.behaviour_field), r.response) for r in rows]
    cache = catalog.cache_dir() / "judge-agreement" / args.behaviour_field  # a rerun judges nothing again
    results, member_scores = [], {}
    for spec, parsed in zip(args.judges, specs):
        scores = cached_scores(spec, pairs, cache_path(cache, spec), dtype=args.dtype, device=args.device,
                               device_map=args.device_map)
        member_scores[spec] = scores
        result = {"spec": spec, **score_agreement(parsed.name, scores, parsed.threshold or 0.5, truth)}
        if args.calibrate and parsed.needs_model:
            result["calibration"] = calibrate_threshold(scores, truth)
        results.append(result)
    if args.fit_ensemble is not None:
        cv = nested_cv(member_scores, truth)
        chosen = max(cv["chosen"], key=cv["chosen"].get).split("+")
        fitted = fit(member_scores, truth, chosen)
        fitted = type(fitted)(fitted.members, fitted.weights, fitted.bias, fitted.threshold,
                              {"fitted_on": "jailbreakbench classifier_comparison.csv, human majority (n=100)",
                               "behaviour_field": args.behaviour_field, "nested_cv": cv})
        fitted.save(args.fit_ensemble)
        probs = fitted.probability([member_scores[m] for m in fitted.members])
        results.append({"spec": f"ensemble:{args.fit_ensemble}",
                        **score_agreement(f"ensemble:{args.fit_ensemble.stem}#{fitted.version} (in sample)", probs,
                                          fitted.threshold, truth), "nested_cv": cv})
    results += published_agreement(rows)
    print(f"{'judge':44s} {'acc':>5s} {'prec':>5s} {'rec':>5s} {'F1':>5s} {'kappa':>6s} {'AUC':>5s}")
    for r in results:
        kappa = "-" if r["cohen_kappa"] is None else f"{r['cohen_kappa']:.3f}"
        auc = "-" if r.get("auc") is None else f"{r['auc']:.2f}"
        print(f"{r['judge'][:44]:44s} {r['accuracy']:5.2f} {r['precision']:5.2f} {r['recall']:5.2f} {r['f1']:5.2f} "
              f"{kappa:>6s} {auc:>5s}")
        if "calibration" in r:
            c, cv = r["calibration"], r["calibration"]["cross_validated"]
            print(f"  calibrated: threshold {c['threshold']:.3g} (in-sample kappa {c['in_sample']['cohen_kappa']:.3f}); "
                  f"held-out kappa {cv['cohen_kappa']:.3f} [{cv['cohen_kappa_range'][0]:.2f}, "
                  f"{cv['cohen_kappa_range'][1]:.2f}], accuracy {cv['accuracy']:.2f}; use {r['spec'].split('@')[0]}"
                  f"@{c['threshold']:.3g}")
        if "nested_cv" in r:
            cv = r["nested_cv"]
            print(f"  nested cross-validation: kappa {cv['cohen_kappa']:.3f} ± {cv['cohen_kappa_se']:.3f} (SE) "
                  f"[{cv['cohen_kappa_range'][0]:.2f}, {cv['cohen_kappa_range'][1]:.2f} over {cv['repeats']} repeats]; "
                  f"members chosen: {cv['chosen']}; written to {args.fit_ensemble}")
    if args.out is not None:
        write_json(args.out, {"labels": "jailbreakbench classifier_comparison.csv, human majority (n=100)",
                              "behaviour_field": args.behaviour_field, "results": results})
    return 0


def _load(args):
    from .models import load
    return load(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code,
                adapter=getattr(args, "adapter", None), max_prompt_tokens=args.max_prompt_tokens,
                device_map=args.device_map, revision=args.revision)


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error the user can fix (:class:`refat.errors.RefatError`, or a file that is missing,
    exists, is not writable or does not fit on the disk) is one line and exit status 2; anything else is a
    bug and keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("refat: interrupted; finished outputs are intact", file=sys.stderr)
        return 130
    except Exception as e:
        message = user_message(e)
        if message is None:
            raise
        print(f"refat: error: {message}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "fetch":
        from .data import REGISTRY, load_dataset
        for name in args.names:
            if name in REGISTRY:
                print(f"{name}: {len(load_dataset(name))} prompts")
            else:
                print(f"{name}: {catalog.ensure_model(catalog.entry(name).name)}")
        return 0
    if args.command == "run":
        from .pipeline import load_config, run_experiment
        from .pipeline.demo import preset
        run_dir = run_experiment(load_config(preset(args.config), args.overrides), args.out_root,
                                 force_stages=args.force)
        print(f"run finished: {run_dir} (report/report.md, report/asr.json, provenance.json)")
        return 0
    if args.command == "train":
        return _train(args, from_arguments(DataConfig, args))
    if args.command == "demo":
        from .pipeline.demo import demo
        demo(args.out, args.overrides)
        return 0
    if args.command == "directions":
        from .data import prompt_sets
        from .directions import find_directions
        with _output(args.out, args.overwrite) as out:
            d = find_directions(_load(args), prompt_sets(from_arguments(DataConfig, args)),
                                from_arguments(SelectionConfig, args), out)
        s = d.selection
        print(f"selected layer {s.layer}, position {s.position}: refusal score {s.baseline_refusal_score:.2f} -> "
              f"{s.refusal_score:.2f} under ablation (KL {s.kl:.3f}, induced {s.induce_score:.2f}); saved in {args.out}")
        return 0
    if args.command == "report":
        from .report import write_report
        md, page = write_report(args.run_dir, plots=not args.no_plots)
        print(f"report written to {md} and {page}")
        return 0
    if args.command == "judge-agreement":
        return _judge_agreement(args)
    if args.command == "attack":
        return _attack(args)
    from .directions import Directions
    directions = Directions.load(args.directions)
    if args.command == "orthogonalize":
        from .orthogonalize import save_orthogonalized
        out = save_orthogonalized(_load(args), directions.vector(), args.out)
        print(f"orthogonalized checkpoint written to {out}")
        return 0
    raise AssertionError(args.command)


def _attack(args) -> int:
    """Any registered attack through one call (or ``replay``); prints its ASR, or RFA's refusal-rate table."""
    from .attacks import get
    from .attacks.base import AttackContext, behaviours_from, claim_model, refused_by

    _check_counts(args, "max_prompt_tokens", "n_behaviours", "n_harmless")
    if args.attack == "replay":
        return _replay(args)
    entry = get(args.attack)
    config = from_arguments(entry.config, args)
    if hasattr(config, "check_inputs"):
        config.check_inputs()
    behaviours = behaviours_from(args.behaviours)  # a bad file fails before the model loads
    directions = _directions(args) if "directions" in entry.needs else None
    harmless = _harmless(args) if "harmless" in entry.needs else []
    with _output(args.out, args.overwrite) as out:
        if not entry.resumable:
            claim_output(out, "records.jsonl")
        model = _load(args)
        behaviours = (refused_by(model, behaviours, args.n_behaviours) if args.only_refused
                      else behaviours[:args.n_behaviours])
        if not behaviours:
            raise DatasetError(f"no behaviours left in {args.behaviours} (--only-refused: the model refuses none)")
        if entry.resumable:
            claim_model(out, model)
        validation = _validation(args, behaviours) if getattr(config, "direction", None) == "worst-case" else []
        context = AttackContext(directions, harmless, validation, dtype=args.dtype, device=args.device)
        records = entry.run(model, behaviours, config, out, context=context)
        if entry.name == "rfa":
            from .attacks import rfa
            from .pipeline.demo import format_table
            summary = {**rfa.summary(records, context.directions), "model": model.name}
            write_json(out / "summary.json", summary)
    if entry.name == "rfa":
        print(format_table(summary))
        return 0
    _print_asr(args.attack, records, args.out)
    if entry.name == "templates":
        from .attacks.templates import summarize
        s = summarize(records)
        print(f"{s['n_templates']} templates × {s['n_behaviours']} behaviours: mean ASR per template "
              f"{s['asr_mean']:.0%}, best-of-N ASR {s['asr_best_of_n']:.0%}")
    return 0


@contextmanager
def _output(out: Path, overwrite: bool, *, main: bool = True, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """The folder a command writes into, locked against a second writer (by the main process only, under
    torchrun); with ``overwrite``, a fresh sibling that replaces ``out`` only when the command succeeds."""
    with folder_lock(out) if main else nullcontext():
        if overwrite:
            with replacing(out, keep=keep, main=main) as fresh:
                yield fresh
        else:
            yield out


def _check_counts(args, *names: str) -> None:
    """The attack command's own count options are >= 1 (``--n-behaviours -2`` would slice off the last two)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")


def _directions(args):
    from .directions import Directions
    return Directions.load(args.directions)


def _harmless(args) -> list[str]:
    from .data import load_dataset
    return [e.prompt for e in load_dataset(args.harmless)][:args.n_harmless]


def _validation(args, behaviours) -> list[str]:
    """Worst-case RFA's validation prompts: the first --n-validation prompts of --validation (default: the
    --behaviours dataset) that are not attacked behaviours, so the attacker never chooses on what it is scored on."""
    from .data import load_dataset, prompt_key

    if args.n_validation < 1:
        raise ConfigError(f"--n-validation must be >= 1, got {args.n_validation}")
    spec = args.validation or args.behaviours
    attacked = {prompt_key(b.goal) for b in behaviours}
    prompts = [e.prompt for e in load_dataset(spec) if prompt_key(e.prompt) not in attacked][:args.n_validation]
    if not prompts:
        raise ConfigError(f"--validation {spec}: every prompt is an attacked behaviour; pass --validation with other "
                         "harmful prompts (or --direction selected)")
    return prompts


def _replay(args) -> int:
    from .attacks.base import claim_model, read_records
    from .attacks.transfer import ReplayConfig, replay

    config = from_arguments(ReplayConfig, args)
    path = args.records / "records.jsonl" if args.records.is_dir() else args.records
    records = read_records(path)
    if not records:
        raise FileNotFoundError(f"no attack records in {path}")
    with _output(args.out, args.overwrite) as out:
        model = _load(args)
        claim_model(out, model)
        replayed = replay(model, records, out, config=config)
    _print_asr(args.attack, replayed, args.out)
    return 0


def _print_asr(name: str, records, out: Path) -> None:
    from .attacks.base import attack_success_rate
    print(f"{name}: ASR {attack_success_rate(records):.0%} over {len(records)} records "
          f"(judge {records[0].judge}); records in {out / 'records.jsonl'}")


# earlier names of `refat train` options, still accepted
TRAIN_ALIASES = {"refat.p": "--rfa-prob", "refat.k": "--recompute-every", "refat.n": "--feature-prompts",
                 "refat.mode": "--rfa-mode", "adversarial.epsilon": "--epsilon", "adversarial.steps": "--attack-steps"}


def _train_config(args):
    """The TrainConfig ``refat train``'s options describe."""
    from dataclasses import replace

    from .training import TrainConfig

    cfg = from_arguments(TrainConfig, args)
    if args.train_layers is not None and args.method != "rt":
        section = "refat" if args.method == "refat" else "adversarial"
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), layers=args.train_layers)})
    return cfg


def _train(args, data) -> int:
    from .training import PairsConfig, train, training_pairs
    from .training.distributed import rank_and_world

    cfg = _train_config(args)
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one")
    main_process = rank_and_world()[0] == 0
    with _output(args.out, args.overwrite, main=main_process, keep=(PAIRS_FILE,)) as out:
        claim_output(out, "train_summary.json", overwrite=args.resume)
        model = _load(args)
        cfg.validate(model.n_layers)  # before any long work
        pairs = training_pairs(model, data, from_arguments(PairsConfig, args), out / PAIRS_FILE)
        result = train(model, pairs, cfg, out, resume=args.resume)
    c = result.compute
    saved = args.out / ("model" if cfg.full_finetune else "adapter")
    if main_process:
        print(f"{args.method}: final loss {result.final_loss:.3f}; {c['train_forward']} training forwards, "
              f"{c['perturbation']['forward']} extra forwards, {c['seconds']:.0f} s; {saved.name} in {saved}")
    return 0


PAIRS_FILE = "pairs.jsonl"  # the training pairs, cached in the run folder (kept by --overwrite: same inputs)


if __name__ == "__main__":
    sys.exit(main())
