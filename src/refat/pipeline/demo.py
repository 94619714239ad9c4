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
    writes ``summary.json`` beside the run's stages)."""
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
    write_json(at.root / "summary.json", summary)
    print(format_table(summary))
    print(f"\nwritten: {at.root / 'summary.json'}, {at.records('base', rfa.label)}, {at.directions('base')}, "
          f"{at.report / 'report.md'}")
    return summary


def format_table(summary: dict) -> str:
    pct = lambda k: f"{100 * summary[k]:5.1f} %"  # noqa: E731
    return "\n".join([
        f"model {summary['model']}  ·  direction: layer {summary['layer']}, position {summary['position']}"
        f"  ·  judge {summary['judge']}",
        f"{'prompts':<22}{'no attack':>12}{'RFA':>12}",
        f"{'harmful refused':<22}{pct('harmful_refusal_rate'):>12}{pct('harmful_refusal_rate_rfa'):>12}"
        f"   (n={summary['n_harmful']})",
        f"{'harmless refused':<22}{pct('harmless_refusal_rate'):>12}{pct('harmless_refusal_rate_rfa'):>12}"
        f"   (n={summary['n_harmless']})",
    ])
