"""A long experiment run one model under test at a time, each model's measurements kept in a small file.

An experiment of several defenses × seeds takes many CPU hours: more than one sitting, and its run folder
(gigabytes of adapters and caches, never committed) may not survive to the next. :func:`run_parts` runs the
config narrowed to one model (:meth:`ExperimentConfig.only`, same folder, same stages) and, as soon as that
model is measured, writes ``<results>/<key>.json``: its per-item outcomes, every judge's
verdicts, the completions judged and the over-refusal answers, each attack's summary (and the attacker's
choices), its training config, the stages' seconds and the provenance (a few hundred kB at most, meant to be
committed). A rerun skips each model whose file is there; the tables (:func:`paired`, :func:`asr`) and the
report (:func:`write_report`) are computed from the files alone. A file measured under another config is an
error, never overwritten.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from ..attacks.rfa_sweep import degenerate
from ..errors import RunError
from ..judges import judge_name
from ..models import Model
from ..stats import rate
from ..storage import digest, read_json, read_jsonl, write_json
from .config import ExperimentConfig, Subject, load_config
from .layout import Layout
from .plan import plan
from .provenance import model_id
from .run import run_experiment
from .runner import read_marker
from .stages.judges import rate_tables
from .stages.report import judge_agreement, outcomes, paired_table, rate_cell, samples, with_seed_means

__all__ = ["asr", "asr_cells", "degenerate_cells", "experiment_main", "load_parts", "measure", "paired", "part_id",
           "run_parts", "verdicts", "write_report"]

log = logging.getLogger("refat.pipeline")
FORMAT = 1  # the part file's schema


def part_id(cfg: ExperimentConfig, key: str, model: Model | None = None) -> str:
    """What a part's measurements depend on: every stage of the config narrowed to it, by the config values each
    stage reads and the stages it reads (the report left out). A part stays valid exactly as long as its stages
    would be skipped: a config field added later that no stage reads, or reads only when set (the plan's rule,
    pinned in tests/pipeline/test_variants.py), leaves it valid."""
    narrowed = cfg.only(key)
    return digest({s.name: {"config": s.config, "reads": list(s.reads)}
                   for s in plan(narrowed, model_id(narrowed, model)) if s.name != "report"})


def measure(cfg: ExperimentConfig, layout: Layout, s: Subject, model: Model | None = None) -> dict:
    """One model's part file from a run folder holding its finished stages."""
    verdicts, completions = {}, {}
    for j in cfg.judges:
        rows = [r for r in read_jsonl(layout.judge(j) / "verdicts.jsonl") if r["defense"] == s.key]
        verdicts[j] = [{k: r[k] for k in ("attack", "behaviour_id", "behaviour", "score", "jailbroken")}
                       for r in rows]
        for r in rows:
            completions.setdefault(f"{r['attack']}/{r['behaviour_id']}",
                                   {"goal": r["goal"], "completion": r["completion"]})
    attacks = {}
    for a in cfg.attacks_on(s):  # the attacker's choices (the sweep's member, the chosen template) and summaries
        folder = layout.attack(s.key, a.label)
        attacks[a.label] = {f.stem: read_json(f) for f in (folder / "summary.json", folder / "choice.json")
                            if f.is_file()}
    overrefusal = {o.column: [{k: r[k] for k in ("prompt", "completion", "refused")} for r in
                              read_jsonl(layout.overrefusal(s.key, o.label) / "overrefusal_records.jsonl")]
                   for o in cfg.overrefusals}  # the benign prompts' answers, to read beside the rates
    seconds, cpu_seconds = {}, {}  # wall clock, and the CPU time that pauses and a busy machine do not inflate
    for marker in sorted(layout.root.glob("*/**/stage.json")):
        rel = marker.parent.relative_to(layout.root)
        if rel.parts[0] != "stale" and s.key in rel.parts[1:2]:
            stage = read_marker(marker.parent) or {}
            seconds[rel.as_posix()], cpu_seconds[rel.as_posix()] = stage.get("seconds"), stage.get("cpu_seconds")
    prov = read_json(layout.provenance)
    return {"format": FORMAT, "key": s.key, "defense": s.defense.name, "method": s.defense.method, "seed": s.seed,
            "changes": {"pairs": s.defense.pairs, "train": s.defense.train}, "part": part_id(cfg, s.key, model),
            "train": None if s.seed is None else asdict(cfg.train_config(s.defense, s.seed)),
            "outcomes": outcomes(cfg, layout, s), "verdicts": verdicts, "attacks": attacks, "completions": completions,
            "overrefusal": overrefusal, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "provenance": {k: prov.get(k) for k in ("git", "versions", "platform", "data_hashes")}}


def _check(path: Path, cfg: ExperimentConfig, key: str, model: Model | None = None) -> dict:
    record = read_json(path)
    if record.get("format") != FORMAT or record.get("key") != key:
        raise RunError(f"{path}: not a part file of {key!r} (format {FORMAT}); move it away")
    if record["part"] != part_id(cfg, key, model):
        raise RunError(f"{path}: measured under another config than {cfg.name!r} now describes for {key!r}; "
                       "move the file away to measure it again (it is never overwritten)")
    return record


def run_parts(cfg: ExperimentConfig, results: str | Path, out_root: str | Path = "runs", *,
              keys: Sequence[str] = (), model: Model | None = None) -> list[Path]:
    """Measure every model under test (or only ``keys``) that has no part file in ``results`` yet, one at a time,
    writing its file as soon as it is done; returns every part file of the config that exists afterwards."""
    results = Path(results)
    subjects = cfg.subjects
    unknown = set(keys) - {s.key for s in subjects}
    if unknown:
        raise RunError(f"no model under test {', '.join(map(repr, sorted(unknown)))} in {cfg.name!r}; it has: "
                       + ", ".join(s.key for s in subjects))
    order = [s for s in subjects if s.seed is None] + [s for s in subjects if s.seed is not None]
    for s in order:
        path = results / f"{s.key}.json"
        if path.exists():
            _check(path, cfg, s.key, model)
            continue
        if keys and s.key not in keys and s.seed is not None:
            continue
        log.info("part %s: measuring (%s)", s.key, path)
        narrowed = cfg.only(s.key)
        layout = Layout(run_experiment(narrowed, out_root, model=model))
        write_json(path, measure(narrowed, layout, s, model))
        log.info("part %s: written %s", s.key, path)
    return [results / f"{s.key}.json" for s in subjects if (results / f"{s.key}.json").exists()]


def load_parts(cfg: ExperimentConfig, results: str | Path) -> dict[str, dict]:
    """{key: part record} of every model of ``cfg`` measured in ``results`` (checked against the config)."""
    results = Path(results)
    return {s.key: _check(results / f"{s.key}.json", cfg, s.key) for s in cfg.subjects
            if (results / f"{s.key}.json").exists()}


def paired(cfg: ExperimentConfig, parts: dict[str, dict]) -> dict | None:
    """The report's paired.json table (each measure with its difference from the base model) from part files."""
    return paired_table(cfg, {k: p["outcomes"] for k, p in parts.items()})


def asr(cfg: ExperimentConfig, parts: dict[str, dict]) -> dict[str, dict]:
    """{judge: rate tables} as the judges stage writes them (``rates``, ``n``, ``ci`` by model and attack) from
    part files: each judge's ASR with its behaviours and 95 % interval."""
    out = {}
    for j in cfg.judges:
        hits: dict[tuple[str, str], list[tuple[str, bool]]] = defaultdict(list)
        for key, p in parts.items():
            for r in p["verdicts"].get(j, []):
                hits[key, r["attack"]].append((r["behaviour"], r["jailbroken"]))
        out[j] = {"judge": judge_name(j), **rate_tables(hits)}
    return out


def asr_cells(cfg: ExperimentConfig, parts: dict[str, dict]) -> dict[str, dict]:
    """{model: {attack: {judge: {"value", "n", "ci"}}}}, the report's asr.json, from part files."""
    cells: dict[str, dict] = {}
    for t in asr(cfg, parts).values():
        for key, row in t["rates"].items():
            for col in row:
                cells.setdefault(key, {}).setdefault(col, {})[t["judge"]] = rate_cell(t, key, col)
    return cells


def degenerate_cells(parts: dict[str, dict]) -> dict[str, dict]:
    """{model: {attack: {"value", "n", "ci"}}}: the share of each attack's judged completions that are degenerate
    (:func:`refat.attacks.rfa_sweep.degenerate`), to read beside its ASR: a string judge counts such nonsense as
    compliance, so a success rate without it overstates what the attacker got."""
    out: dict[str, dict] = {}
    for key, p in parts.items():
        by_attack: dict[str, list[bool]] = defaultdict(list)
        for name, c in p["completions"].items():
            by_attack[name.split("/", 1)[0]].append(degenerate(c["completion"]))
        out[key] = {a: rate(flags).to_dict() for a, flags in by_attack.items()}
    return out


def verdicts(cfg: ExperimentConfig, parts: dict[str, dict]) -> dict[str, list[dict]]:
    """Each judge's verdict rows with their completions, as the judges stages write them (by judge name)."""
    return {judge_name(j): [{"defense": key, **r, **p["completions"][f"{r['attack']}/{r['behaviour_id']}"]}
                            for key, p in parts.items() for r in p["verdicts"].get(j, [])] for j in cfg.judges}


def write_report(cfg: ExperimentConfig, parts: dict[str, dict], folder: str | Path) -> Path:
    """The report (refat.report: report.md, report.html, plots) of the models measured so far, from their part
    files: each judge's ASR with n and interval, the judges' agreement, the differences from the base model with
    the robustness and over-refusal trade-off, and sample completions to read. Returns report.md."""
    from ..report import PlotsUnavailableError
    from ..report import write_report as render

    folder = Path(folder)
    cells, judged = asr_cells(cfg, parts), verdicts(cfg, parts)
    write_json(folder / "run.json", {"experiment": cfg.name, "models measured": ", ".join(parts),
                                     "judges": ", ".join(cfg.judges)})
    write_json(folder / "asr.json", cells)
    write_json(folder / "paired.json", paired(cfg, parts))
    by_item = {k: p["outcomes"] for k, p in parts.items()}
    if cfg.utility is not None:  # per task, from the items' correctness (lm-eval's acc_norm is not in a part)
        write_json(folder / "utility.json",
                   with_seed_means(cfg, {k: _by_task(o["utility"]) for k, o in by_item.items()}))
    if cfg.overrefusals:
        write_json(folder / "overrefusal.json", with_seed_means(cfg, {
            k: {r.column: rate(list(o[r.column].values())).to_dict() for r in cfg.overrefusals}
            for k, o in by_item.items()}))
    write_json(folder / "compute.json", {k: _stage_seconds(k, p["seconds"])
                                         | _stage_seconds(k, p.get("cpu_seconds") or {}, "CPU seconds")
                                         for k, p in parts.items()})
    if len(judged) > 1:
        write_json(folder / "judge_agreement.json", judge_agreement(judged, cells))
    if any(judged.values()):
        write_json(folder / "samples.json", samples(judged))
    try:
        return render(folder, title=cfg.name)[0]
    except PlotsUnavailableError as e:  # as the report stage: the tables without plots
        log.warning("report without plots: %s", e)
        return render(folder, plots=False, title=cfg.name)[0]


def _stage_seconds(key: str, seconds: dict[str, float | None], unit: str = "seconds") -> dict[str, float]:
    """The report's compute row of one model: each of its stages' time on the machine that measured it,
    ``{"train seconds": …, "rfa seconds": …, "overrefusal edgy seconds": …}`` (wall clock), or with
    ``unit="CPU seconds"`` the CPU time, which pauses do not inflate (parts written before it have none)."""
    return {" ".join(p for p in stage.split("/") if p not in (key, "attacks")) + f" {unit}": round(s, 1)
            for stage, s in seconds.items() if s is not None}


def _by_task(correct: dict[str, float]) -> dict[str, dict]:
    """{task: accuracy cell} from ``{"<task>/<id>": 0 or 1}``."""
    tasks: dict[str, list[bool]] = defaultdict(list)
    for item, c in correct.items():
        tasks[item.split("/", 1)[0]].append(bool(c))
    return {t: rate(flags).to_dict() for t, flags in tasks.items()}


def experiment_main(argv: Sequence[str] | None, *, description: str, config: Path, parts_dir: Path, results: Path,
                    summarize: Callable[[ExperimentConfig, Path], dict]) -> None:
    """The command line of an experiment script (``experiments/*.py``): measure the models not yet in
    ``parts_dir``, one at a time, rebuilding ``results`` (``summarize(cfg, parts_dir)``) after each."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("overrides", nargs="*", help="config keys, e.g. seeds=[0,1,2] (as `refat run`)")
    parser.add_argument("--config", type=Path, default=config)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="run folder root (runs/<name>)")
    parser.add_argument("--parts", type=Path, default=parts_dir, help="one file per measured model")
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--only", nargs="+", metavar="KEY", default=(), help="measure these models (and the base)")
    parser.add_argument("--summary-only", action="store_true", help="rebuild the table from the part files")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    unknown = set(args.only) - {s.key for s in cfg.trained}
    if unknown:
        parser.error(f"--only: no trained model {', '.join(sorted(unknown))}; choose from "
                     + ", ".join(s.key for s in cfg.trained))
    # seed-major: every defense at one seed before any at the next, so a sitting that stops leaves a comparison
    trained = sorted(cfg.trained, key=lambda s: cfg.seeds.index(s.seed) if s.seed in cfg.seeds else 0)
    todo = [] if args.summary_only else [s.key for s in trained if not args.only or s.key in args.only]
    for key in todo or [None]:
        if key is not None:
            run_parts(cfg, args.parts, args.out, keys=[key])
        write_json(args.results, summarize(cfg, args.parts))
        report = write_report(cfg, load_parts(cfg, args.parts), args.parts / "report")
        print(f"written: {args.results}, {report}", flush=True)
