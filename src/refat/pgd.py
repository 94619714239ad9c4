"""Projected gradient descent by signed steps inside a per-token L2 ball.

One algorithm serves CAT's and LAT's inner attack (training), the analysis' latent attack and the
embedding attack: a perturbation δ [..., d] of embeddings or activations descends a loss by steps of
−α·sign(∇δ), is zeroed outside the attacked positions and has each token's vector (last axis) pulled
back onto the ball ‖δ‖ ≤ ε. Step and radius are both per-token L2 lengths (a sign step of coordinate
size α is √d·α long), so a caller states them in one unit, usually relative to a typical norm it
measures itself: the batch's median prompt-token norm (training), each prompt's own (analysis), the
median token-embedding norm (embedding attack). That reference differs between callers on purpose and
stays with them.

Sheshadri et al.'s latent adversarial training moves δ by AdamW steps instead (``optimizer="adamw"``); each
step is then followed by the same projection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["Ball", "default_step", "constrain", "signed_step", "pgd"]


@dataclass(frozen=True)
class Ball:
    """Where δ may go and how far a step moves it; each value a scalar or a tensor broadcast against δ
    (e.g. [b, 1, 1] for a budget per prompt)."""

    step: float | Tensor  # L2 length of one sign step, per token
    radius: float | Tensor | None = None  # per-token L2 budget; None: unconstrained
    mask: Tensor | None = None  # 1 (or True) where δ may be non-zero, e.g. the prompt tokens


def default_step(radius: float, steps: int) -> float:
    """The common 2.5 ε / steps: enough to cross the ball and still move along its surface."""
    return 2.5 * radius / steps


def constrain(delta: Tensor, ball: Ball) -> None:
    """In place: zero δ outside ``ball.mask`` and shrink each token's vector longer than ``ball.radius``
    onto the sphere (also after a step that was not a sign step, e.g. Adam's)."""
    if ball.mask is not None:
        delta *= ball.mask
    if ball.radius is not None:
        delta *= torch.clamp(ball.radius / (delta.norm(dim=-1, keepdim=True) + 1e-12), max=1.0)


def signed_step(delta: Tensor, grad: Tensor, ball: Ball) -> None:
    """In place: one descent step −sign(grad) of per-token L2 length ``ball.step``, then :func:`constrain`."""
    delta -= ball.step / delta.shape[-1] ** 0.5 * grad.sign()
    constrain(delta, ball)


def pgd(loss: Callable[[], Tensor], deltas: Sequence[Tensor], balls: Sequence[Ball], steps: int, *,
        optimizer: Literal["sign", "adamw"] = "sign") -> None:
    """``steps`` steps on every δ (leaf tensors that require grad, one ball each), in place.

    ``loss()`` runs the forward under the perturbations (e.g. inside ``hooks.perturb``) and returns the
    scalar to minimise. ``optimizer``: signed steps of ``ball.step``, or AdamW steps (torch's defaults
    otherwise, as Sheshadri et al.'s adversary) whose learning rate is the sign step's coordinate size,
    ``ball.step / sqrt(d)`` (Adam moves each coordinate about lr a step), each followed by :func:`constrain`.
    """
    opt = None
    if optimizer == "adamw":
        opt = torch.optim.AdamW([{"params": [d], "lr": float(b.step) / d.shape[-1] ** 0.5}
                                 for d, b in zip(deltas, balls, strict=True)])
    for _ in range(steps):
        grads = torch.autograd.grad(loss(), list(deltas))
        with torch.no_grad():
            for delta, grad, ball in zip(deltas, grads, balls, strict=True):
                if opt is None:
                    signed_step(delta, grad, ball)
                else:
                    delta.grad = grad
            if opt is not None:
                opt.step()
                for delta, ball in zip(deltas, balls):
                    delta.grad = None
                    constrain(delta, ball)
