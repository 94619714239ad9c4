"""The losses every attack and training method optimises: cross-entropy of a target continuation, and the two
forms of pushing a continuation away (its negative cross-entropy, or its unlikelihood ``-log(1 - p)``)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["target_cross_entropy", "unlikelihood", "floored", "FLOOR_SLOPE"]

FLOOR_SLOPE = 1e-3  # the slope a floored loss keeps below its floor (Xhonneux et al.'s cutoffs)


def target_cross_entropy(logits: Tensor, labels: Tensor,
                         reduction: Literal["row", "mean", "sum", "none"] = "row") -> Tensor:
    """Cross-entropy of ``labels`` [..., T] under the ``logits`` [..., T, V] that predict them (already shifted).

    Computed in at least float32 (bf16 losses and gradients are too coarse; float64 stays float64);
    labels -100 (prompt, padding) are left out. ``"row"``: each row's mean over its scored tokens, [...] (a
    per-prompt loss that does not depend on the batch); ``"mean"`` / ``"sum"``: over all scored tokens
    of the batch, a scalar (training's token-weighted loss); ``"none"``: each token's, shaped as ``labels``
    (0 where left out).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    flat = logits.flatten(0, -2), labels.flatten()
    if reduction in ("mean", "sum"):
        return torch.nn.functional.cross_entropy(*flat, ignore_index=-100, reduction=reduction)
    ce = torch.nn.functional.cross_entropy(*flat, ignore_index=-100, reduction="none").view(labels.shape)
    return ce if reduction == "none" else ce.sum(-1) / (labels != -100).sum(-1).clamp(min=1)


def unlikelihood(logits: Tensor, labels: Tensor, threshold: float | None = None,
                 reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """``-log(1 - p(label))`` per scored token (labels -100 left out): zero when the label is never predicted,
    growing without bound as it becomes certain, so minimising it pushes a continuation away without the
    runaway of a negative cross-entropy. ``threshold``: tokens whose ``log p`` is already below it count 0
    (they stay in the mean's denominator), as in HarmBench's and Sheshadri et al.'s ``log_1_minus_p_loss``.
    ``"mean"``/``"sum"`` over the scored tokens, or ``"none"`` shaped as ``labels``. Computed from the
    log-sum-exp of the other logits, which stays finite where ``p`` rounds to 1."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    scored = labels != -100
    index = labels.masked_fill(~scored, 0).unsqueeze(-1)
    total = torch.logsumexp(logits, dim=-1)
    log_p = logits.gather(-1, index).squeeze(-1) - total
    log_rest = torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1) - total  # log(1 - p)
    loss = -log_rest
    keep = scored if threshold is None else scored & (log_p >= threshold)
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / scored.sum().clamp(min=1)


def floored(value: Tensor, floor: float | None) -> Tensor:
    """``value`` where it is at least ``floor``; below it ``floor + 1e-3 · value``, so the loss stops pushing
    (almost) once it has gone far enough (Xhonneux et al.'s ``toward_cutoff`` / ``away_cutoff``). None: as is."""
    if floor is None or value.item() >= floor:
        return value
    return floor + FLOOR_SLOPE * value
