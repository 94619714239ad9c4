"""The report stage: the run's tables in report.py's schema, then report.md and report.html, all in its folder."""

from __future__ import annotations

import logging
from pathlib import Path

from ...attacks.base import read_records
from ...judges import judge_name
from ...storage import read_json, write_json
from ..config import NO_ATTACK
from ..provenance import revision
from ..runner import read_marker

log = logging.getLogger("refat.pipeline")


def _asr(ctx) -> dict:
    c, at = ctx.cfg, ctx.layout
    columns = [NO_ATTACK] + [x for a in c.attacks for x in (a.label, f"{a.label} best-of-n")]
    asr: dict[str, dict[str, dict]] = {d: {} for d in c.defenses}
    for j in c.judges:
        rates = read_json(at.judge(j) / "rates.json")
        for d in c.defenses:
            for col in columns:
                if col in rates["rates"].get(d, {}):
                    asr[d].setdefault(col, {})[rates["judge"]] = rates["rates"][d][col]
    return asr


def _utility(ctx) -> dict:
    out = {}
    for d in ctx.cfg.defenses:
        tasks = read_json(ctx.layout.utility(d) / "utility.json")["tasks"]
        out[d] = {}
        for t, s in tasks.items():  # acc, and lm-eval's length-normalised acc_norm where there is one
            out[d][t] = s["accuracy"]
            if s.get("accuracy_norm") is not None:
                out[d][f"{t} (norm)"] = s["accuracy_norm"]
    return out


def _overrefusal(ctx) -> dict:
    out = {}
    for d in ctx.cfg.defenses:
        s = read_json(ctx.layout.overrefusal(d) / "overrefusal.json")
        ds = s["dataset"]
        out[d] = {ds if ds.startswith("hf:") else Path(ds).name: s["rate"]}  # a file: its name only
    return out


def _compute(ctx) -> dict:
    """Per defense: training cost (the method's extra passes apart) and each attack's wall time."""
    out = {}
    for d in ctx.cfg.defenses:
        row: dict[str, float] = {}
        summary = ctx.layout.train(d) / "train_summary.json"
        if summary.is_file():
            comp = read_json(summary)["compute"]
            extra = comp.get("perturbation", {})
            row |= {"train seconds": round(comp["seconds"], 1),
                    "train passes": comp["train_forward"] + comp["train_backward"],
                    "method extra passes": extra.get("forward", 0) + extra.get("backward", 0),
                    "method extra seconds": round(extra.get("seconds", 0.0), 1)}
        for a in ctx.cfg.attacks:
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
            "defenses": ", ".join(c.defenses), "attacks": ", ".join(a.label for a in c.attacks),
            "judges": ", ".join(judge_name(j) for j in c.judges), "config_hash": c.hash(),
            "git": revision(prov["git"]), **prov["versions"]}


def run(ctx, folder: Path) -> None:
    """The tables this config makes (and only those: the folder is fresh), then report.md/html."""
    c = ctx.cfg
    compute = _compute(ctx)
    tables = {"asr.json": _asr(ctx) if c.attacks else None,
              "utility.json": _utility(ctx) if c.utility is not None else None,
              "overrefusal.json": _overrefusal(ctx) if c.overrefusal is not None else None,
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
