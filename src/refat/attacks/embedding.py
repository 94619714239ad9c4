"""Embedding-space attack (Schwinn et al. 2024, "Soft Prompt Threats"): optimise input embeddings.

Open weights let an attacker skip the token vocabulary and perturb the prompt's embeddings directly,
toward the target answer, by signed gradient descent (the reference code's choice) or Adam. Either
``n_suffix`` positions appended to the goal (initialised from the embedding of ``init_token``) or the
goal tokens themselves are perturbed. As in the reference code the search stops once the target is
the greedy answer under teacher forcing (read off logits already computed). Step size and the
optional per-position L2 budget ``eps`` are relative to the median norm of the model's token
embeddings, so one setting means the same across models. The answer is generated greedily from the
perturbed embeddings. The perturbation is not a string: the record's prompt is the goal, the
perturbation's norms go in ``extra``, and such records cannot be replayed on another model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..configs import at_least, require
from ..errors import InputError
from ..generation import greedy_tokens
from ..judges import RefusalStringJudge
from ..losses import target_cross_entropy
from ..models import Model, PromptTooLongError
from ..pgd import Ball, constrain, signed_step
from .base import AttackContext, AttackCost, AttackRecord, Behaviour, run_attack, string_judge

__all__ = ["EmbeddingConfig", "Segments", "segments", "target_loss", "generate_from_embeds", "run"]

_PLACEHOLDER = "\uE000refat-goal\uE000"


@dataclass
class EmbeddingConfig:
    mode: Literal["suffix", "prompt"] = "suffix"  # perturb appended suffix positions, or the goal's own tokens
    n_suffix: int = 20
    init_token: str = "x"
    num_steps: int = 100
    optimizer: Literal["sign", "adam"] = "sign"
    step_size: float = 0.1  # per-position L2 length of a step, relative to the median token-embedding norm
    eps: float | None = None  # per-position L2 budget, same units; None: unconstrained (Schwinn et al.)
    max_new_tokens: int = 64
    stop_on_target: bool = True  # stop once greedy decoding, teacher-forced, would emit the whole target
    check_every: int = 0  # judge a generation every this many steps and stop when not refused (0: only at the end)

    def __post_init__(self):
        require(self.mode in ("suffix", "prompt"), "mode", f"unknown mode {self.mode!r}; use 'suffix' or 'prompt'")
        require(self.optimizer in ("sign", "adam"), "optimizer",
                f"unknown optimizer {self.optimizer!r}; use 'sign' or 'adam'")
        at_least(self, 1 if self.mode == "suffix" else 0, "n_suffix")
        at_least(self, 0, "num_steps", "check_every")
        at_least(self, 1, "max_new_tokens")
        at_least(self, 0, "step_size", "eps", strict=True)


@dataclass
class Segments:
    """Token ids around the perturbed span: before | goal | suffix | after (chat template) | target."""

    before: list[int]
    goal: list[int]
    suffix: list[int]
    after: list[int]
    target: list[int]


def segments(model: Model, b: Behaviour, config: EmbeddingConfig) -> Segments:
    """The chat template split at the user message (as nanoGCG does), each piece tokenized alone."""
    tok = model.tokenizer
    text = model.format(_PLACEHOLDER)
    before, after = text.split(_PLACEHOLDER)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    suffix = []
    if config.mode == "suffix":
        init = ids(config.init_token)
        if len(init) != 1:
            raise InputError(f"init_token {config.init_token!r} is {len(init)} tokens for {model.name}; use one token")
        suffix = init * config.n_suffix
    seg = Segments(ids(before), ids(b.goal), suffix, ids(after), ids(b.target))
    if not seg.target:
        raise InputError(f"behaviour {b.id} has an empty target: nothing to optimise toward")
    n = len(seg.before) + len(seg.goal) + len(seg.suffix) + len(seg.after)
    if n > model.max_prompt_tokens:
        raise PromptTooLongError(f"behaviour {b.id}: prompt has {n} tokens > "
                                 f"max_prompt_tokens={model.max_prompt_tokens}")
    return seg


def _embed(model: Model, ids: list[int]) -> torch.Tensor:
    return model.hf.get_input_embeddings()(torch.tensor([ids], dtype=torch.long, device=model.device))


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 gradients and losses are too coarse; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _loss_and_match(model: Model, prompt_embeds: torch.Tensor, target: list[int]) -> tuple[torch.Tensor, bool]:
    t = len(target)
    embeds = torch.cat([prompt_embeds, _embed(model, target)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    out = model.hf(inputs_embeds=embeds, attention_mask=mask, use_cache=False, logits_to_keep=t + 1)
    logits = out.logits[0, :-1]  # the positions that predict the target
    labels = torch.tensor(target, device=embeds.device)
    return target_cross_entropy(logits, labels, "mean"), bool((logits.argmax(-1) == labels).all())


def target_loss(model: Model, prompt_embeds: torch.Tensor, target: list[int]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens after ``prompt_embeds`` [1, P, d] (differentiable)."""
    return _loss_and_match(model, prompt_embeds, target)[0]


@torch.no_grad()
def generate_from_embeds(model: Model, prompt_embeds: torch.Tensor, max_new_tokens: int = 64) -> str:
    """Greedy answer to one prompt given as embeddings [1, P, d], with a KV cache."""
    mask = torch.ones(1, prompt_embeds.shape[1], dtype=torch.long, device=prompt_embeds.device)
    tokens = greedy_tokens(model, mask, max_new_tokens, inputs_embeds=prompt_embeds)[0]
    return model.tokenizer.decode(tokens, skip_special_tokens=True)


def run(model: Model, behaviours: Sequence[Behaviour], config: EmbeddingConfig = EmbeddingConfig(),
        out_dir: str | Path | None = None, *, judge: RefusalStringJudge | None = None,
        context: AttackContext | None = None, progress: bool = True) -> list[AttackRecord]:
    """One record per behaviour: the answer under the lowest-loss perturbation (or the first that the judge
    saw comply), the loss per step and the perturbation's norms."""
    judge = string_judge(judge)
    weight = model.hf.get_input_embeddings().weight
    scale = float(_wide(weight.detach()).norm(dim=-1).median())
    ball = Ball(step=config.step_size * scale, radius=config.eps * scale if config.eps is not None else None)

    def attack_one(b: Behaviour) -> AttackRecord:
        t0 = time.perf_counter()
        seg = segments(model, b, config)
        with torch.no_grad():
            parts = [_wide(_embed(model, ids)) for ids in (seg.before, seg.goal, seg.suffix, seg.after)]
        span = 1 if config.mode == "prompt" else 2  # which part is perturbed
        delta = torch.zeros_like(parts[span], requires_grad=True)
        # Adam's steps are about lr per coordinate: the sign step's coordinate size
        opt = torch.optim.Adam([delta], lr=ball.step / weight.shape[1] ** 0.5) if config.optimizer == "adam" else None

        def prompt_embeds() -> torch.Tensor:
            ps = list(parts)
            ps[span] = ps[span] + delta
            return torch.cat(ps, dim=1).to(model.dtype)

        history, cost = [], AttackCost()
        best_loss, best_delta, best_step, answer, stopped = float("inf"), delta.detach().clone(), 0, None, False
        for step in tqdm(range(config.num_steps + 1), desc=f"embedding {b.id}", leave=False, disable=not progress):
            last = step == config.num_steps
            with torch.enable_grad():
                loss, match = _loss_and_match(model, prompt_embeds(), seg.target)
            cost.forward += 1
            value = loss.item()
            history.append({"step": step, "loss": value})
            if value < best_loss:
                best_loss, best_delta, best_step = value, delta.detach().clone(), step
            if match and config.stop_on_target:
                stopped, best_delta, best_step = True, delta.detach().clone(), step
                break
            if config.check_every and step and step % config.check_every == 0 and not last:
                with torch.no_grad():
                    text = generate_from_embeds(model, prompt_embeds(), config.max_new_tokens)
                if not judge.refuses(text):
                    answer, stopped, best_delta, best_step = text, True, delta.detach().clone(), step
                    break
            if last:
                break
            (grad,) = torch.autograd.grad(loss, [delta])
            cost.backward += 1
            with torch.no_grad():
                if opt is None:
                    signed_step(delta, grad, ball)
                else:
                    delta.grad = grad
                    opt.step()
                    constrain(delta, ball)
        with torch.no_grad():
            delta.copy_(best_delta)
            if answer is None:
                answer = generate_from_embeds(model, prompt_embeds(), config.max_new_tokens)
            norms = best_delta[0].norm(dim=-1)
        cost.seconds = round(time.perf_counter() - t0, 3)
        return AttackRecord("embedding", b.id, b.goal, b.target, b.goal, answer, history=history, cost=cost, extra={
            "transferable": False, "mode": config.mode, "n_positions": int(norms.numel()),
            "initial_loss": history[0]["loss"], "best_loss": best_loss, "used_step": best_step,
            "stopped_early": stopped, "embedding_norm": scale,
            "perturbation": {"l2_mean": float(norms.mean()), "l2_max": float(norms.max()),
                             "linf": float(best_delta.abs().max()), "relative_l2_mean": float(norms.mean()) / scale},
        })

    return run_attack("embedding", behaviours, attack_one, config=asdict(config), out_dir=out_dir, judge=judge,
                      progress=progress)
