"""The shared signed-step L2-ball PGD (refat.pgd) and target cross-entropy (refat.losses) on hand-sized tensors."""

from __future__ import annotations

import math

import pytest
import torch

from refat.losses import target_cross_entropy
from refat.pgd import Ball, constrain, default_step, pgd, signed_step


def test_signed_step_has_the_per_token_length_of_the_step():
    delta = torch.zeros(2, 3, 4)
    grad = torch.tensor([1.0, -2.0, 3.0, -0.5]).expand(2, 3, 4)
    signed_step(delta, grad, Ball(step=0.8))
    assert torch.equal(delta[0, 0], torch.tensor([-0.4, 0.4, -0.4, 0.4]))  # 0.8 / √4 per coordinate, against sign
    assert torch.allclose(delta.norm(dim=-1), torch.full((2, 3), 0.8))
    still = torch.zeros(1, 4)
    signed_step(still, torch.zeros(1, 4), Ball(step=1.0))
    assert still.eq(0).all(), "a zero gradient does not move"


def test_constrain_masks_then_projects_each_token():
    delta = torch.tensor([[[3.0, 4.0], [0.3, 0.4], [6.0, 8.0]]])  # token norms 5, 0.5, 10
    constrain(delta, Ball(step=1.0, radius=1.0, mask=torch.tensor([[[1.0], [1.0], [0.0]]])))
    assert torch.allclose(delta[0, 0], torch.tensor([0.6, 0.8]))  # onto the sphere, same direction
    assert torch.equal(delta[0, 1], torch.tensor([0.3, 0.4]))  # inside the ball: untouched
    assert delta[0, 2].eq(0).all()  # masked out


def test_radius_per_row_and_none():
    delta = torch.full((2, 1, 4), 1.0)  # every token has norm 2
    constrain(delta, Ball(step=1.0, radius=torch.tensor([0.5, 4.0])[:, None, None]))
    assert torch.allclose(delta.norm(dim=-1).flatten(), torch.tensor([0.5, 2.0]))
    free = torch.full((1, 4), 10.0)
    constrain(free, Ball(step=1.0))
    assert free.eq(10.0).all()


def test_pgd_stays_in_the_ball_and_descends():
    torch.manual_seed(0)
    target = torch.randn(2, 5, 8) * 3  # far outside the ball: the loss pulls every token out
    mask = torch.ones(2, 5, 1)
    mask[1, 3:] = 0
    ball = Ball(step=default_step(0.5, 6), radius=0.5, mask=mask)
    delta = torch.zeros(2, 5, 8, requires_grad=True)
    losses, norms = [], []

    def loss():
        norms.append(delta.detach().norm(dim=-1).max().item())
        out = ((delta - target) ** 2).sum()
        losses.append(out.item())
        return out

    pgd(loss, [delta], [ball], 6)
    assert len(losses) == 6 and losses[-1] < losses[0]  # fixed-length sign steps may overshoot near the end
    assert max(norms) <= 0.5 + 1e-6 and delta.norm(dim=-1).max() <= 0.5 + 1e-6
    assert delta[1, 3:].eq(0).all()
    assert torch.allclose(delta.norm(dim=-1)[mask[..., 0] > 0], torch.tensor(0.5))  # the budget is used


def test_pgd_one_step_is_a_hand_signed_step_on_every_delta():
    a, b = torch.zeros(1, 2, 4, requires_grad=True), torch.zeros(1, 2, 4, requires_grad=True)
    ca, cb = torch.arange(8.0).view(1, 2, 4) - 3.5, -torch.ones(1, 2, 4)
    pgd(lambda: ((a - ca) ** 2).sum() + ((b - cb) ** 2).sum(), [a, b], [Ball(step=2.0), Ball(step=0.2, radius=0.1)], 1)
    assert torch.equal(a.detach(), torch.sign(ca))  # gradient −2(c−0): a step of 2/√4 = 1 toward c
    assert torch.allclose(b.detach(), torch.full((1, 2, 4), -0.05))  # 0.1 per coordinate, projected to norm 0.1
    with pytest.raises(ValueError):  # one ball per perturbation
        pgd(lambda: (a ** 2).sum(), [a], [], 1)


def test_default_step():
    assert default_step(0.1, 4) == pytest.approx(0.0625)


def _hand_ce(logits: list[float], label: int) -> float:
    return math.log(sum(math.exp(x) for x in logits)) - logits[label]


def test_target_cross_entropy_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, -1.0, 2.0], [0.0, 0.0, 0.0]],
                           [[3.0, 1.0, 1.0], [0.0, 1.0, 0.0], [2.0, 2.0, 1.0]]])
    labels = torch.tensor([[1, 2, -100], [0, 0, 2]])
    ce = [[_hand_ce(logits[r, t].tolist(), labels[r, t].item()) for t in range(3) if labels[r, t] >= 0]
          for r in range(2)]
    assert torch.allclose(target_cross_entropy(logits, labels), torch.tensor([sum(c) / len(c) for c in ce]))
    flat = [x for row in ce for x in row]
    assert target_cross_entropy(logits, labels, "sum").item() == pytest.approx(sum(flat), rel=1e-6)
    assert target_cross_entropy(logits, labels, "mean").item() == pytest.approx(sum(flat) / 5, rel=1e-6)
    assert target_cross_entropy(logits[0, :2], labels[0, :2]).item() == pytest.approx(sum(ce[0]) / 2, rel=1e-6)


def test_target_cross_entropy_dtype_and_an_unscored_row():
    logits = torch.randn(2, 3, 5)
    assert target_cross_entropy(logits.bfloat16(), torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float32
    assert target_cross_entropy(logits.double(), torch.zeros(2, 3, dtype=torch.long)).dtype == torch.float64
    none = target_cross_entropy(logits, torch.full((2, 3), -100))
    assert none.eq(0).all()
