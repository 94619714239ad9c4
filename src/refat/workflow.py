"""The foundation's end-to-end job: find the refusal direction, attack with it, measure refusals.

Stages write into one output folder (``directions.*``, ``records.jsonl``, ``summary.json``), each
atomically; a finished directions stage with the same inputs is reused, so an interrupted run
resumes, and a finished summary is never overwritten without ``overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import catalog
from .attacks.rfa import RFAConfig, evaluate
from .configs import at_least, require
from .data import Example, load_dataset, prompt_key, split
from .directions import Directions, SelectionConfig, extract, select
from .judges import RefusalStringJudge
from .models import Model, load
from .storage import claim_output, write_json, write_jsonl

__all__ = ["DataConfig", "PromptSets", "DemoConfig", "prompt_sets", "find_directions", "attack_rfa", "demo",
           "training_pairs"]


@dataclass
class DataConfig:
    harmful: str = "advbench"
    harmless: str = "alpaca"
    n_train: int = 128
    n_val: int = 32
    n_test: int = 50
    seed: int = 0

    def __post_init__(self):
        require(bool(self.harmful), "harmful", "empty")
        require(bool(self.harmless), "harmless", "empty")
        at_least(self, 0, "n_train", "n_val", "n_test")


@dataclass
class PromptSets:
    """Disjoint train / val / test prompts, harmful and harmless."""

    harmful: dict[str, list[Example]]
    harmless: dict[str, list[Example]]

    def prompts(self, kind: str, split_name: str) -> list[str]:
        return [e.prompt for e in getattr(self, kind)[split_name]]


def prompt_sets(cfg: DataConfig) -> PromptSets:
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test}
    return PromptSets(split(load_dataset(cfg.harmful), sizes, seed=cfg.seed),
                      split(load_dataset(cfg.harmless), sizes, seed=cfg.seed))


def training_pairs(model: Model, data: DataConfig, n_harmful: int, n_harmless: int, cache: str | Path) -> list:
    """Training pairs drawn from outside the val and test splits of ``data`` (cached at ``cache``)."""
    from .training import load_or_build_pairs

    sets = prompt_sets(data)
    held_out = [e.prompt for kind in ("harmful", "harmless") for s in ("val", "test") for e in getattr(sets, kind)[s]]
    banned = {prompt_key(p) for p in held_out}
    pool = lambda spec, n: [e for e in load_dataset(spec) if prompt_key(e.prompt) not in banned][:n]  # noqa: E731
    harmful, harmless = pool(data.harmful, n_harmful), pool(data.harmless, n_harmless)
    return load_or_build_pairs(cache, model, harmful, harmless, exclude=held_out)


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def find_directions(model: Model, sets: PromptSets, selection: SelectionConfig, out_dir: str | Path | None = None,
                    *, batch_size: int = 32) -> Directions:
    """Extract on the train split and select on the val split. Each stage is saved as it finishes and
    reused when its inputs are unchanged: a new selection config reuses the extraction."""
    extract_key = _fingerprint(model.name, model.source, sets.prompts("harmful", "train"),
                               sets.prompts("harmless", "train"))
    select_key = _fingerprint(extract_key, sets.prompts("harmful", "val"), sets.prompts("harmless", "val"),
                              asdict(selection))
    d = None
    if out_dir is not None and (Path(out_dir) / "directions.safetensors").exists():
        saved = Directions.load(out_dir)
        if saved.meta.get("extract_fingerprint") == extract_key:
            if saved.selection is not None and saved.meta.get("select_fingerprint") == select_key:
                print(f"refat: reusing directions in {out_dir} (same model, data and selection config)", file=sys.stderr)
                return saved
            print(f"refat: reusing the extraction in {out_dir}; selecting anew", file=sys.stderr)
            d, d.selection = saved, None
    if d is None:
        t0 = time.perf_counter()
        d = extract(model, sets.prompts("harmful", "train"), sets.prompts("harmless", "train"), batch_size=batch_size)
        d.meta = {"extract_fingerprint": extract_key, "model_source": model.source,
                  "seconds": {"extract": round(time.perf_counter() - t0, 1)}}
        if out_dir is not None:
            d.save(out_dir)
    t0 = time.perf_counter()
    select(model, d, sets.prompts("harmful", "val"), sets.prompts("harmless", "val"), selection)
    d.meta |= {"select_fingerprint": select_key, "selection_config": asdict(selection)}
    d.meta["seconds"] = d.meta.get("seconds", {}) | {"select": round(time.perf_counter() - t0, 1)}
    if out_dir is not None:
        d.save(out_dir)
    return d


def attack_rfa(model: Model, directions: Directions, sets: PromptSets, config: RFAConfig, out_dir: str | Path,
               *, judge: RefusalStringJudge = RefusalStringJudge(), extra: dict | None = None) -> dict:
    """Refusal rates with and without RFA on the test split; writes records.jsonl and summary.json."""
    t0 = time.perf_counter()
    result = evaluate(model, directions, sets.prompts("harmful", "test"), sets.prompts("harmless", "test"), config, judge)
    sel = directions.selection
    summary = {
        **result.rates,
        "layer": sel.layer, "position": sel.position,
        "n_harmful": len(sets.harmful["test"]), "n_harmless": len(sets.harmless["test"]),
        "judge": judge.name, "model": model.name, "model_source": model.source,
        "config": {"rfa": asdict(config), **(extra or {})},
        "seconds": round(time.perf_counter() - t0, 1),
        "versions": _versions(),
    }
    out = Path(out_dir)
    write_jsonl(out / "records.jsonl", result.records)
    write_json(out / "summary.json", summary)
    return summary


def _versions() -> dict:
    import torch
    import transformers

    import refat
    return {"refat": refat.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class DemoConfig:
    model: str = catalog.DEFAULT_MODEL
    dtype: str = "float32"  # pinned so numbers reproduce; outputs differ between fp32 and bf16
    device: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    # Arditi et al.'s filters (KL ≤ 0.1, induced refusal log-odds > 0) were set on 1.8B-72B chat models. On
    # qwen2.5-coder-0.5b no candidate passes both: the strongest ablations move harmless next-token
    # distributions by KL 0.2-1.3, and adding one direction at one layer lifts the harmless refusal log-odds
    # from about -2.5 to at most -0.4. The demo keeps both filters, relaxed to KL ≤ 0.2 and log-odds > -1.5
    # (still at least one nat above the harmless baseline); every candidate's verdict is in directions.json.
    selection: SelectionConfig = field(default_factory=lambda: SelectionConfig(
        kl_threshold=0.2, induce_refusal_threshold=-1.5, screen_prompts=8, screen_keep=12))
    rfa: RFAConfig = field(default_factory=lambda: RFAConfig(max_new_tokens=48))


def demo(cfg: DemoConfig = DemoConfig(), out_dir: str | Path = "runs/demo", *, overwrite: bool = False,
         model: Model | None = None) -> dict:
    """Find the refusal direction of a model, ablate it, and compare refusal rates (prints a table)."""
    out = claim_output(out_dir, "summary.json", overwrite=overwrite)
    sets = prompt_sets(cfg.data)  # fails on bad data before the model loads
    model = model or load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    directions = find_directions(model, sets, cfg.selection, out)
    summary = attack_rfa(model, directions, sets, cfg.rfa, out, extra={"data": asdict(cfg.data),
                         "selection": asdict(cfg.selection), "dtype": cfg.dtype})
    print(format_table(summary))
    print(f"\nwritten: {out / 'summary.json'}, {out / 'records.jsonl'}, {out / 'directions.json'}")
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
