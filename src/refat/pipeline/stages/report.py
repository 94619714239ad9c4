"""The report stage: the run's tables in report.py's schema, then report.md and report.html, all in its folder."""

from __future__ import annotations

import logging
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from ...attacks.base import read_records
from ...judges import agreement, judge_name
from ...stats import Rate, paired_difference, rate, spread
from ...storage import read_json, read_jsonl, write_json
from ..config import NO_ATTACK, Subject
from ..provenance import revision
from ..runner import read_marker

log = logging.getLogger("refat.pipeline")
SAMPLES_PER_VERDICT = 2  # completions to read per cell: this many jailbroken and this many refused


def with_seed_means(cfg, table: dict) -> dict:
    """The table's rows (one per model under test, keyed by :attr:`Subject.key`) in the config's order, each
    defense trained at several seeds followed by a row ``<name> (<n> seeds)`` whose cells are the mean ± sd
    over its seeds' cells (:class:`refat.stats.Spread`); each seed's own row keeps its interval over items."""
    out = {}
    for d in cfg.variants:
        keys = [s.key for s in cfg.subjects if s.defense.name == d.name and s.key in table]
        out |= {k: table[k] for k in keys}
        if len(keys) > 1:
            out[f"{d.name} ({len(keys)} seeds)"] = _spread_cells([table[k] for k in keys])
    return out


def _spread_cells(rows: list) -> dict:
    """Mean ± sd over the leaves at the same place of nested rows (a leaf: a ``{"value", ...}`` cell or a number);
    a place some rows lack is left out."""
    if all(isinstance(r, dict) and "value" not in r for r in rows):
        return {k: _spread_cells([r[k] for r in rows]) for k in rows[0] if all(k in r for r in rows)}
    return spread([r["value"] if isinstance(r, dict) else r for r in rows]).to_dict()


def _asr(ctx) -> dict:
    """{model: {column: {judge: {"value", "n", "ci"}}}}: each judge's ASR with its behaviours and interval."""
    c, at = ctx.cfg, ctx.layout
    columns = [NO_ATTACK] + [x for a in c.attacks for x in (a.label, f"{a.label} best-of-n")]
    asr: dict[str, dict[str, dict]] = {s.key: {} for s in c.subjects}
    for j in c.judges:
        rates = read_json(at.judge(j) / "rates.json")
        for d, row in asr.items():
            for col in columns:
                if col in rates["rates"].get(d, {}):
                    row.setdefault(col, {})[rates["judge"]] = rate_cell(rates, d, col)
    return with_seed_means(ctx.cfg, asr)


def rate_cell(rates: dict, d: str, col: str) -> dict | float:
    """A judge's cell from its rates.json; one written before intervals were kept gives the plain rate."""
    n, ci = rates.get("n", {}).get(d, {}).get(col), rates.get("ci", {}).get(d, {}).get(col)
    value = rates["rates"][d][col]
    return value if n is None or ci is None else Rate(value, n, tuple(ci)).to_dict()


def _utility(ctx) -> dict:
    """{model: {task: accuracy cell}}: Wilson intervals over the task's scored items."""
    out = {}
    for d in (s.key for s in ctx.cfg.subjects):
        tasks = read_json(ctx.layout.utility(d) / "utility.json")["tasks"]
        path, items = ctx.layout.utility(d) / "utility_records.jsonl", defaultdict(list)
        for r in read_jsonl(path):
            items[r["task"]].append(r)
        out[d] = {}
        for t, s in tasks.items():  # acc, and lm-eval's length-normalised acc_norm where there is one
            if not items[t]:
                raise ValueError(f"{path}: no records of task {t!r}")
            out[d][t] = rate([r["correct"] for r in items[t]]).to_dict()
            if s.get("accuracy_norm") is not None:
                out[d][f"{t} (norm)"] = rate([r["correct_norm"] for r in items[t]]).to_dict()
    return with_seed_means(ctx.cfg, out)


def _overrefusal(ctx) -> dict:
    """{model: {set: refusal-rate cell}}: Wilson intervals over the benign prompts; a set's column is its label
    (the single ``overrefusal:`` mapping: its dataset's name, a file's name only)."""
    out = {}
    for s in ctx.cfg.subjects:
        out[s.key] = {o.column: rate(list(_refusals(ctx.layout, s.key, o).values())).to_dict() for o in ctx.cfg.overrefusals}
    return with_seed_means(ctx.cfg, out)


def _refusals(layout, key: str, o) -> dict[str, bool]:
    """{prompt: refused} of one over-refusal set on one model."""
    return {r["prompt"]: r["refused"] for r in read_jsonl(layout.overrefusal(key, o.label) / "overrefusal_records.jsonl")}


def outcomes(cfg, layout, s: Subject) -> dict[str, dict[str, float]]:
    """One model's per-item outcomes, by measure, for the paired comparison with the base model: each over-refusal
    set's refusals (by prompt), utility correctness over every task's items together (by task and id), and
    refusal under the first worst-case RFA attack as the first judge sees it (by behaviour)."""
    out = {}
    for o in cfg.overrefusals:
        out[o.column] = {p: float(r) for p, r in _refusals(layout, s.key, o).items()}
    if cfg.utility is not None:
        rows = read_jsonl(layout.utility(s.key) / "utility_records.jsonl")
        out["utility"] = {f"{r['task']}/{r['id']}": float(r["correct"]) for r in rows}
    worst = cfg.worst_case_rfa
    if worst is not None and cfg.judges:
        rows = read_jsonl(layout.judge(cfg.judges[0]) / "verdicts.jsonl")
        out[rfa_measure(worst.label)] = {str(r["behaviour_id"]): float(not r["jailbroken"]) for r in rows
                                         if r["defense"] == s.key and r["attack"] == worst.label}
    return out


def rfa_measure(label: str) -> str:
    """The column of paired.json that holds refusal under the RFA attack ``label``."""
    return f"{label} refusal"


def _paired(ctx) -> dict | None:
    c = ctx.cfg
    if len(c.subjects) < 2:  # nothing to compare with the base model
        return None
    return paired_table(c, {s.key: outcomes(c, ctx.layout, s) for s in c.subjects})


def paired_table(cfg, outcomes: dict[str, dict[str, dict[str, float]]]) -> dict | None:
    """{model: {measure: cell}}: each model's refusal rates and utility (:func:`outcomes`, by subject key) with
    ``vs_base``, the difference from the base model on the same items and its 95 % paired-bootstrap interval. A
    defense with several seeds in ``outcomes`` also gets a ``<name> (<n> seeds)`` row: the mean ± sd over its seeds,
    and the difference of its seed-averaged outcome per item from the base's (an interval over items, given these
    seeds). Models missing from ``outcomes`` are left out. None without a measured base model or a measure."""
    base = cfg.base_subject
    if base is None or base.key not in outcomes or not outcomes[base.key]:
        return None

    def cell(items: dict[str, float], key: str, measure: str) -> dict:
        own = rate([bool(v) for v in items.values()]).to_dict()
        vs_base = None if key == base.key else paired_difference(items, outcomes[base.key][measure]).to_dict()
        return own | {"vs_base": vs_base}

    out = {}
    for d in cfg.variants:
        keys = [s.key for s in cfg.subjects if s.defense.name == d.name and s.key in outcomes]
        for k in keys:
            out[k] = {m: cell(items, k, m) for m, items in outcomes[k].items()}
        if len(keys) > 1:
            row = {}
            for m in outcomes[keys[0]]:
                per_item = {i: sum(outcomes[k][m][i] for k in keys) / len(keys) for i in outcomes[keys[0]][m]}
                row[m] = spread([out[k][m]["value"] for k in keys]).to_dict() | {
                    "vs_base": paired_difference(per_item, outcomes[base.key][m]).to_dict()}
            out[f"{d.name} ({len(keys)} seeds)"] = row
    return out


def _verdicts(ctx) -> dict[str, list[dict]]:
    """Each judge's verdicts, in the judges' order. The judges stages judge the same completions in the same
    order, so rows pair up by position; a mismatch (a judges folder from another run) is an error."""
    out: dict[str, list[dict]] = {}
    for j in ctx.cfg.judges:
        path = ctx.layout.judge(j) / "verdicts.jsonl"
        rows = read_jsonl(path)
        if out and [_key(r) for r in rows] != [_key(r) for r in next(iter(out.values()))]:
            raise ValueError(f"{path}: judged other completions than {next(iter(out))}; rerun the judges stages")
        out[judge_name(j)] = rows
    return out


def _key(row: dict) -> tuple:
    return row["defense"], row["attack"], row["behaviour_id"], row["completion"]


def _cells(rows: list[dict]) -> dict[tuple[str, str], list[int]]:
    """Row indices per (defense, attack column), in the verdicts' order."""
    cells = defaultdict(list)
    for i, r in enumerate(rows):
        cells[r["defense"], r["attack"]].append(i)
    return cells


def judge_agreement(verdicts: dict[str, list[dict]], asr: dict) -> list[dict]:
    """For each pair of judges and each (defense, attack): both ASRs, the share of completions they disagree
    on (Wilson interval over completions) and Cohen's kappa (null when both judges gave one class only)."""
    out = []
    for a, b in combinations(verdicts, 2):
        cells = []
        for (d, col), idx in _cells(verdicts[a]).items():
            fa = [bool(verdicts[a][i]["jailbroken"]) for i in idx]
            fb = [bool(verdicts[b][i]["jailbroken"]) for i in idx]
            cells.append({"defense": d, "attack": col, "asr": {a: asr[d][col][a], b: asr[d][col][b]},
                          "disagree": rate([x != y for x, y in zip(fa, fb)]).to_dict(),
                          "kappa": agreement(fb, fa)["cohen_kappa"]})
        out.append({"judges": [a, b], "cells": cells})
    return out


def samples(verdicts: dict[str, list[dict]], per_verdict: int = SAMPLES_PER_VERDICT) -> dict:
    """Completions to read: per (defense, attack), the first ``per_verdict`` the first judge called jailbroken
    and the first it called refused, in behaviour-id order (deterministic), with every judge's verdict."""
    first = next(iter(verdicts))
    rows, samples = verdicts[first], []
    for idx in _cells(rows).values():
        idx = sorted(idx, key=lambda i: str(rows[i]["behaviour_id"]))
        picked = [i for i in idx if rows[i]["jailbroken"]][:per_verdict] + \
                 [i for i in idx if not rows[i]["jailbroken"]][:per_verdict]
        samples += [{k: rows[i][k] for k in ("defense", "attack", "behaviour_id", "goal", "completion")}
                    | {"verdicts": {j: bool(v[i]["jailbroken"]) for j, v in verdicts.items()}} for i in picked]
    return {"judge": first, "samples": samples}


def _compute(ctx) -> dict:
    """Per model: training cost (the method's extra passes apart) and each attack's wall time."""
    out = {}
    for s in ctx.cfg.subjects:
        d, row = s.key, {}
        summary = ctx.layout.train(d) / "train_summary.json"
        if summary.is_file():
            comp = read_json(summary)["compute"]
            extra = comp.get("perturbation", {})
            row |= {"train seconds": round(comp["seconds"], 1),
                    "train passes": comp["train_forward"] + comp["train_backward"],
                    "method extra passes": extra.get("forward", 0) + extra.get("backward", 0),
                    "method extra seconds": round(extra.get("seconds", 0.0), 1)}
        for a in ctx.cfg.attacks_on(s):
            if a.name == "rfa":  # one batched generation, not per-behaviour records: the stage's wall time
                seconds = (read_marker(ctx.layout.attack(d, a.label)) or {}).get("seconds")
            else:
                seconds = sum(r.cost.seconds for r in read_records(ctx.layout.records(d, a.label)))
            row[f"{a.label} seconds"] = round(seconds, 1) if seconds is not None else None
        out[d] = {k: v for k, v in row.items() if v is not None}
    return out


def _run_info(ctx) -> dict:
    c, prov = ctx.cfg, read_json(ctx.layout.provenance)
    return {"name": c.name, "model": c.model, "dtype": prov["dtype"], "device": prov["device"], "seed": c.seed,
            "data": f"{c.data.harmful} / {c.data.harmless}: train {c.data.n_train}, val {c.data.n_val}, "
                    f"test {c.data.n_test}, seed {c.data.seed}",
            "behaviours": f"{c.behaviours or c.data.harmful} ({len(ctx.inputs.behaviours)} held out)",
            "defenses": ", ".join(d.name if d.name == d.method else f"{d.name} ({d.method})" for d in c.variants),
            "seeds": ", ".join(map(str, c.seeds)), "attacks": ", ".join(a.label for a in c.attacks),
            "judges": ", ".join(judge_name(j) for j in c.judges), "config_hash": c.hash(),
            "git": revision(prov["git"]), **prov["versions"]}


def run(ctx, folder: Path) -> None:
    """The tables this config makes (and only those: the folder is fresh), then report.md/html."""
    c = ctx.cfg
    compute = _compute(ctx)
    asr = _asr(ctx) if c.attacks else None
    verdicts = _verdicts(ctx) if c.attacks else {}
    tables = {"asr.json": asr,
              "judge_agreement.json": judge_agreement(verdicts, asr) if len(verdicts) > 1 else None,
              "samples.json": samples(verdicts) if verdicts else None,
              "utility.json": _utility(ctx) if c.utility is not None else None,
              "overrefusal.json": _overrefusal(ctx) if c.overrefusals else None,
              "paired.json": _paired(ctx),
              "compute.json": compute if any(compute.values()) else None, "run.json": _run_info(ctx)}
    for name, table in tables.items():
        if table is not None:
            write_json(folder / name, table)
    if c.report:
        from ...report import PlotsUnavailableError, write_report

        try:
            write_report(ctx.layout.root)
        except PlotsUnavailableError as e:
            log.warning("report without plots: %s", e)
            write_report(ctx.layout.root, plots=False)
