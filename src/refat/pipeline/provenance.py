"""What a run was made with: versions, git revision, seeds, data hashes, device and dtype."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from .. import catalog
from ..judges import judge_name
from ..models import Model, auto_device
from .config import ExperimentConfig
from .inputs import Inputs
from .runner import now

__all__ = ["model_id", "provenance", "revision"]


def model_id(cfg: ExperimentConfig, model: Model | None = None) -> dict:
    """What identifies the base model: its spec, its hub revision when pinned, and its concrete dtype
    (``cfg.dtype`` is resolved from "auto" when the config is built, so the same config on hardware where
    "auto" means another dtype gets other fingerprints and recomputes); for local files also their sizes
    and times, so that new weights written to the same path recompute everything downstream. A model
    passed in is identified by its name and source."""
    if model is not None:
        return {"name": model.name, "source": model.source, "dtype": str(model.dtype)}
    out = {"spec": cfg.model, "dtype": cfg.dtype}
    if cfg.model_revision is not None:  # absent when unpinned: fingerprints of earlier runs stay valid
        out["revision"] = cfg.model_revision
    if cfg.model in catalog.CATALOG:
        out["sha256"] = catalog.CATALOG[cfg.model].sha256
    else:
        path = Path(cfg.model).expanduser()
        files = sorted(path.iterdir()) if path.is_dir() else [path] if path.is_file() else []
        out["files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict | None:
    """The revision of the git checkout the run starts in, if it is one (git itself may be absent)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=30, check=False)
        return {"revision": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return None


def revision(git: dict | None) -> str | None:
    """``abc123 (uncommitted changes)`` when the checkout was dirty: the revision alone would overclaim."""
    if not git:
        return None
    return git["revision"] + (" (uncommitted changes)" if git.get("dirty") else "")


def _seeds(cfg: ExperimentConfig) -> dict:
    seeds = {"experiment": cfg.seed, "data": cfg.data.seed, "train": {d: cfg.train_config(d).seed for d in cfg.trained}}
    seeds["attacks"] = {a.label: getattr(a.parsed(), "seed", None) for a in cfg.attacks}
    for key in ("utility", "overrefusal"):
        if getattr(cfg, key) is not None:
            seeds[key] = getattr(cfg, key).seed
    return seeds


def provenance(cfg: ExperimentConfig, inputs: Inputs, model: Model | None) -> dict:
    import refat

    device = str(model.device) if model else str(torch.device(cfg.device) if cfg.device else auto_device())
    return {
        "name": cfg.name, "created": now(), "config_hash": cfg.hash(), "model": cfg.model if model is None else
        {"name": model.name, "source": model.source}, "device": device,
        "dtype": str(model.dtype).removeprefix("torch.") if model else cfg.dtype, "model_revision": cfg.model_revision,
        "versions": {"refat": _version("refat") or refat.__version__, "torch": torch.__version__,
                     "transformers": _version("transformers"), "peft": _version("peft"),
                     "python": platform.python_version()},
        "platform": platform.platform(), "argv": sys.argv, "git": _git(), "seeds": _seeds(cfg),
        "data_hashes": inputs.hashes, "judges": [judge_name(j) for j in cfg.judges],
        "attack_judge": judge_name(cfg.attack_judge),
    }
