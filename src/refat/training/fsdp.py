"""Sharded full fine-tuning: FSDP2 through accelerate (``accelerate launch --config_file
configs/accelerate/fsdp.yaml``), which runs may use it, and their checkpoints.

accelerate shards with torch's ``fully_shard``, which converts the model in place: ``model.hf``, its
decoder blocks (where ReFAT's ablation hooks sit) and the perturbations' own forwards (ReFAT's feature
recomputation) are the sharded model's, each block gathering its weights for its forward. So every
process must run the same forwards: the perturbations do, as every random choice is a function of
(seed, step). FSDP1 is refused: it wraps the blocks and its inner modules cannot be run directly.

Only full fine-tuning shards (LoRA's frozen base fits each GPU: it trains data parallel). A sharded
run's checkpoints hold the weights and the optimizer state as accelerate writes them for the config's
``fsdp_state_dict_type`` (``SHARDED_STATE_DICT``: each process writes its own shards through
``torch.distributed.checkpoint``, nothing is gathered); the rest of the checkpoint is as without FSDP.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..configs import ConfigError

if TYPE_CHECKING:
    from .trainer import TrainConfig

__all__ = ["STATE_DIR", "requested", "check", "sharded", "save_state", "load_state", "full_state_dict", "scalar"]

STATE_DIR = "fsdp"  # a checkpoint's folder of weights and optimizer state written by accelerate


def requested() -> bool:
    """The launch asked for FSDP (``accelerate launch`` with an FSDP config sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def sharded(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def check(acc, cfg: "TrainConfig", world: int) -> None:
    """Refuse what would not train as asked: FSDP asked but not set up (accelerate 1.15 sets it up only
    for GPU processes: on CPU, or without ``accelerate launch``, it would run unsharded), FSDP1, LoRA, and
    a CAT/LAT batch that leaves a process without a harmful row (it would skip the attack's forwards,
    which the other processes wait on)."""
    if requested() and not sharded(acc):
        raise ConfigError(f"the launch asks for FSDP (ACCELERATE_USE_FSDP) but accelerate set up "
                          f"{acc.distributed_type.value}: accelerate shards only GPU processes started by "
                          "accelerate launch; on CPU launch with torchrun (data parallel) instead")
    if not sharded(acc):
        return
    if acc.state.fsdp_plugin.fsdp_version != 2:
        raise ConfigError("refat trains sharded with FSDP2 only: set fsdp_version: 2 in the accelerate config "
                          "(FSDP1 wraps the decoder blocks the perturbations hook and run); see "
                          "configs/accelerate/fsdp.yaml")
    if not cfg.full_finetune:
        raise ConfigError("FSDP shards full fine-tuning (--full-finetune); LoRA keeps the base frozen and trains "
                          "data parallel: launch with configs/accelerate/ddp.yaml")
    if cfg.method in ("cat", "lat") and (cfg.batch_size + 1) // 2 < world:
        raise ConfigError(f"--batch-size {cfg.batch_size} gives {(cfg.batch_size + 1) // 2} harmful row(s) for "
                          f"{world} sharded processes: {cfg.method} needs one per process (--batch-size >= "
                          f"{2 * world - 1})")


def _plugin(acc):
    return acc.state.fsdp_plugin


def save_state(acc, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """The weights and optimizer state into ``folder`` (every process calls it; each writes its shards)."""
    from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

    save_fsdp_model(_plugin(acc), acc, model, str(folder))
    save_fsdp_optimizer(_plugin(acc), acc, optimizer, model, str(folder))


def load_state(acc, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Read back what :func:`save_state` wrote (every process calls it)."""
    from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

    load_fsdp_model(_plugin(acc), acc, model, str(folder))
    load_fsdp_optimizer(_plugin(acc), acc, optimizer, model, str(folder))


def full_state_dict(acc, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on the main process, on CPU (every process calls it; the others
    get an empty dict), floating ones in ``dtype``: under mixed precision accelerate keeps fp32 master
    weights, and the saved model keeps the dtype it was loaded in."""
    state = acc.get_state_dict(model)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def scalar(t: torch.Tensor) -> float:
    """A replicated DTensor (FSDP2's gradient norm) or a plain tensor, as a float."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)
