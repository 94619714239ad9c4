"""Cross-entropy of a target continuation: the loss every attack and training method optimises."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["target_cross_entropy"]


def target_cross_entropy(logits: Tensor, labels: Tensor, reduction: Literal["row", "mean", "sum"] = "row") -> Tensor:
    """Cross-entropy of ``labels`` [..., T] under the ``logits`` [..., T, V] that predict them (already shifted).

    Computed in at least float32 (bf16 losses and gradients are too coarse; float64 stays float64);
    labels -100 (prompt, padding) are left out. ``"row"``: each row's mean over its scored tokens, [...] (a
    per-prompt loss that does not depend on the batch); ``"mean"`` / ``"sum"``: over all scored tokens
    of the batch, a scalar (training's token-weighted loss).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = logits.flatten(0, -2), labels.flatten()
    if reduction != "row":
        return torch.nn.functional.cross_entropy(*flat, ignore_index=-100, reduction=reduction)
    ce = torch.nn.functional.cross_entropy(*flat, ignore_index=-100, reduction="none").view(labels.shape)
    return ce.sum(-1) / (labels != -100).sum(-1).clamp(min=1)
