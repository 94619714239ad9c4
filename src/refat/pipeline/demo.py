"""``refat demo``: ``refat run`` of the packaged ``demo`` preset, then its refusal-rate table and ``summary.json``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..models import Model
from ..storage import read_json, write_json
from .config import ExperimentConfig, load_config
from .layout import Layout
from .run import run_experiment

__all__ = ["PRESETS", "preset", "demo", "demo_config", "format_table"]

PRESETS = Path(__file__).with_name("presets")


def preset(name_or_path: str | Path) -> Path:
    """A config file: an existing path, else a packaged preset by name (``demo``)."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix:
        return path
    packaged = PRESETS / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(f"experiment config not found: {path} (and no packaged preset of that name: "
                            f"{', '.join(p.stem for p in sorted(PRESETS.glob('*.yaml')))})")


def demo_config(out_dir: str | Path = "runs/demo", overrides: Sequence[str] = ()) -> ExperimentConfig:
    return load_config(PRESETS / "demo.yaml", [f"name={Path(out_dir).name}", *overrides])


def demo(out_dir: str | Path = "runs/demo", overrides: Sequence[str] = (), *, model: Model | None = None) -> dict:
    """Find the refusal direction of a model, ablate it, and compare refusal rates (prints a table and
    writes ``summary.json`` beside the run's stages): the top-level numbers are the first RFA attack's (the
    preset's defender-style selection); a worst-case RFA attack's are under ``worst_case``."""
    out_dir = Path(out_dir)
    cfg = demo_config(out_dir, overrides)
    at = Layout(run_experiment(cfg, out_dir.parent, model=model))
    rfa = cfg.first_rfa
    stage = read_json(at.attack("base", rfa.label) / "stage.json")
    directions = read_json(at.directions("base") / "directions.json")
    prov = read_json(at.provenance)
    rates = read_json(at.attack("base", rfa.label) / "summary.json")
    summary = {k: rates[k] for k in ("harmful_refusal_rate", "harmful_refusal_rate_rfa", "harmless_refusal_rate",
                                     "harmless_refusal_rate_rfa", "layer", "position", "n_harmful", "n_harmless",
                                     "judge")}
    summary |= {"model": cfg.model if model is None else model.name,
                "model_source": directions.get("meta", {}).get("model_source"),
                "config": {"rfa": rfa.config, "data": cfg.resolved()["data"], "selection": cfg.resolved()["selection"],
                           "dtype": cfg.dtype},
                "seconds": stage["seconds"], "versions": prov["versions"]}
    worst = next((a for a in cfg.attacks if a.name == "rfa" and a is not rfa and a.parsed().direction == "worst-case"),
                 None)
    if worst is not None:
        w = read_json(at.attack("base", worst.label) / "summary.json")
        summary["worst_case"] = {**{k: w[k] for k in ("harmful_refusal_rate_rfa", "harmless_refusal_rate_rfa",
                                                      "n_harmful", "n_harmless", "direction", "member")},
                                 "label": worst.label, "config": worst.config,
                                 "seconds": read_json(at.attack("base", worst.label) / "stage.json")["seconds"]}
    write_json(at.root / "summary.json", summary)
    print(format_table(summary))
    print(f"\nwritten: {at.root / 'summary.json'}, {at.records('base', rfa.label)}, {at.directions('base')}, "
          f"{at.report / 'report.md'}")
    return summary


def _direction(summary: dict) -> str:
    """What an RFA summary ablated: the selected layer and position, or the worst-case member and its
    validation refusal rate."""
    if summary.get("direction") == "worst-case":
        member = summary["member"]
        return f"worst case: {member['description']} (validation refusal {100 * member['val_refusal_rate']:.0f} %)"
    return f"direction: layer {summary['layer']}, position {summary['position']}"


def format_table(summary: dict) -> str:
    """Refusal rates without attack and under RFA; with a ``worst_case`` entry, a column for each RFA."""
    columns = [("RFA", summary)]
    if "worst_case" in summary:
        columns = [("RFA selected", summary), ("RFA worst case", summary["worst_case"])]
    pct = lambda s, k: f"{100 * s[k]:5.1f} %"  # noqa: E731
    w = max(12, *(len(name) + 2 for name, _ in columns))
    row = lambda kind: (f"{kind + ' refused':<22}{pct(summary, f'{kind}_refusal_rate'):>12}"  # noqa: E731
                        + "".join(f"{pct(s, f'{kind}_refusal_rate_rfa'):>{w}}" for _, s in columns)
                        + f"   (n={summary[f'n_{kind}']})")
    return "\n".join([
        f"model {summary['model']}  ·  " + "  ·  ".join(_direction(s) for _, s in columns)
        + f"  ·  judge {summary['judge']}",
        f"{'prompts':<22}{'no attack':>12}" + "".join(f"{name:>{w}}" for name, _ in columns),
        row("harmful"),
        row("harmless"),
    ])
