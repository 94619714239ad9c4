"""CAT's and LAT's training objective as their authors define it: separately weighted terms, each a mean over
its own tokens, instead of the one cross-entropy over every response token that RT and ReFAT train on (and
that CAT and LAT train on here by default).

- toward: cross-entropy of the harmful rows' refusals under the attack; Xhonneux et al. floor it
  (``toward_cutoff``: below it, it keeps only a 1e-3 slope);
- away: the harmful rows' affirmative target under the same attack, pushed away: its negative cross-entropy
  floored at ``away_cutoff`` (Xhonneux et al.), or its unlikelihood ``-log(1 - p)`` with tokens already below
  ``away_cutoff`` in log-probability dropped (Sheshadri et al.);
- utility: cross-entropy of the other rows' answers (harmless and borderline), unperturbed;
- kl: KL(model ‖ base model) over the vocabulary at those answers' positions, the base being the model with its
  LoRA adapters off, divided by its own detached value as Sheshadri et al. do (so ``kl_weight`` sets a
  relative step: the gradient is kl_weight · ∇ log KL).

Each mean is over the whole micro-batch of every data-parallel rank (token counts from the global batch, the
floors decided on the global value), so a data-parallel run optimises what a single process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..losses import FLOOR_SLOPE, target_cross_entropy, unlikelihood
from ..models import Model
from .data import Batch, response_logits

__all__ = ["TermTokens", "term_tokens", "objective_loss"]

TERMS = ("toward", "utility", "away", "kl")


@dataclass(frozen=True)
class TermTokens:
    """How many tokens each term averages over in the whole (global) micro-batch."""

    toward: int  # refusal tokens of the harmful rows
    utility: int  # answer tokens of the other rows (the KL term's positions too)
    away: int  # affirmative-target tokens of the harmful rows


def term_tokens(full: Batch) -> TermTokens:
    scored = full.labels[:, 1:] != -100
    away = 0 if full.affirm is None else int((full.affirm.labels[:, 1:] != -100).sum())
    return TermTokens(int(scored[full.harmful].sum()), int(scored[~full.harmful].sum()), away)


def objective_loss(model: Model, forward, batch: Batch, perturbation, cfg, tokens: TermTokens, world: int,
                   draw: int, autocast: Callable) -> tuple[Tensor, float, dict[str, float], dict[str, int]]:
    """This rank's loss to back-propagate (scaled so DDP's average is the global objective's gradient), the
    objective's global value, each term's global mean (the metrics row's ``toward``, ``utility``, ``away``,
    ``kl``) and the extra work (forwards, tokens, target tokens) beyond the training forward."""
    with autocast(), perturbation.context(batch, draw):
        logits, targets = response_logits(model, batch.input_ids, batch.attention_mask, batch.labels, forward=forward)
    ce = target_cross_entropy(logits, targets, "none")
    harmful = batch.harmful[(batch.labels[:, 1:] != -100).nonzero()[:, 0]].to(ce.device)  # each token's row
    sums = {"toward": ce[harmful].sum(), "utility": ce[~harmful].sum()}
    extra = {"forward": 0, "tokens": 0, "target_tokens": 0}
    zero = ce.sum() * 0
    if cfg.train_away_weight:
        sums["away"] = zero
        if batch.affirm is not None:  # a data-parallel shard may hold no harmful row
            a = batch.affirm
            # through the plain model, not the DDP wrapper: its gradients reach the same parameter hooks, and a
            # second wrapped forward on some ranks only would unpair DDP's buffer broadcasts
            with autocast(), perturbation.affirm_context(batch):
                away_logits, away_targets = response_logits(model, a.input_ids, a.attention_mask, a.labels)
            if cfg.away_loss == "unlikelihood":
                sums["away"] = unlikelihood(away_logits, away_targets, cfg.away_cutoff, "sum")
            else:
                sums["away"] = -target_cross_entropy(away_logits, away_targets, "sum")
            extra = {"forward": 1, "tokens": a.n_tokens, "target_tokens": len(away_targets)}
    if cfg.kl_weight:
        sums["kl"] = zero
        rows = ~batch.harmful.to(batch.input_ids.device)
        if rows.any():
            with torch.no_grad(), autocast(), model.hf.disable_adapter():
                base, _ = response_logits(model, batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
            new = torch.log_softmax(logits[~harmful].float(), dim=-1)
            old = torch.log_softmax(base.float(), dim=-1)
            sums["kl"] = (new.exp() * (new - old)).sum()
            extra = {k: extra[k] + v for k, v in {"forward": 1, "tokens": int(batch.attention_mask[rows].sum()),
                                                    "target_tokens": len(base)}.items()}
    counts = {"toward": tokens.toward, "utility": tokens.utility, "away": tokens.away, "kl": tokens.utility}
    totals = torch.stack([s.detach().float() for s in sums.values()])
    if world > 1:
        torch.distributed.all_reduce(totals)
    means = {k: v / max(counts[k], 1) for k, v in zip(sums, totals.tolist())}
    weights = {"toward": 1.0 if cfg.toward_weight is None else cfg.toward_weight,
               "utility": 1.0 if cfg.utility_weight is None else cfg.utility_weight,
               "away": cfg.train_away_weight, "kl": cfg.kl_weight}
    floors = {"toward": cfg.toward_cutoff, "away": cfg.away_cutoff if cfg.away_loss == "negative-ce" else None}
    loss, value = zero, 0.0
    for term, total in sums.items():
        weight, mean, n = weights[term], means[term], max(counts[term], 1)
        if not weight:
            continue
        if term == "kl":  # divided by its own global value (Sheshadri et al.): weight · KL / KL.detach()
            loss = loss + weight * total / n / (mean + 1e-8)
            value += weight * mean / (mean + 1e-8)
            continue
        floor = floors.get(term)
        slope, offset = (FLOOR_SLOPE, floor) if floor is not None and mean < floor else (1.0, 0.0)
        loss = loss + weight * slope * total / n
        value += weight * (offset + slope * mean)
    return loss * world, value, {k: means[k] for k in TERMS if k in means}, extra
