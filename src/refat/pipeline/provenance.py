"""What a run was made with: versions, git revision, seeds, data hashes, device and dtype."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata

import torch

from ..chat import redact
from ..judges import judge_name
from ..models import Model, auto_device, identity, spec_identity
from .config import ExperimentConfig
from .inputs import Inputs
from .runner import now

__all__ = ["git_state", "model_id", "provenance", "revision"]


def model_id(cfg: ExperimentConfig, model: Model | None = None) -> dict:
    """What identifies the base model: :func:`refat.models.identity` (the sha256 of its weights, its hub revision
    when pinned, the concrete dtype and the device), computed from the spec without loading it, so that new
    weights written to the same path recompute everything downstream; ``cfg.dtype`` is resolved from "auto"
    when the config is built, so the same config on hardware where "auto" means another dtype recomputes. A model passed in is identified by its own identity (a model built in
    memory by its name and source)."""
    if model is not None:
        return identity(model)
    out = spec_identity(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if cfg.model_revision is not None:  # absent when unpinned: fingerprints of earlier runs stay valid
        out["revision"] = cfg.model_revision
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> dict | None:
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
    seeds = {"experiment": cfg.seed, "data": cfg.data.seed, "train": {s.key: s.seed for s in cfg.trained}}
    seeds["attacks"] = {a.label: getattr(a.parsed(), "seed", None) for a in cfg.attacks}
    if cfg.utility is not None:
        seeds["utility"] = cfg.utility.seed
    if cfg.overrefusals:  # the single form as before; a list: {label: seed}
        seeds["overrefusal"] = {o.label: o.config.seed for o in cfg.overrefusals} if isinstance(cfg.overrefusal, list) \
            else cfg.overrefusal.seed
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
        "platform": platform.platform(), "argv": redact(sys.argv), "git": git_state(), "seeds": _seeds(cfg),
        "data_hashes": inputs.hashes, "judges": [judge_name(j) for j in cfg.judges],
        "attack_judge": judge_name(cfg.attack_judge),
    }
