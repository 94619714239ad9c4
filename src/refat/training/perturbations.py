"""What makes each training method: a perturbation of the harmful rows' forward pass.

All methods share one loss (cross-entropy on response tokens: refusals for harmful prompts,
answers for harmless ones); they differ only in the context the training forward runs under:

- ``rt``: none (refusal training).
- ``refat``: refusal feature ablation of harmful rows with probability p, the per-layer features
  recomputed from the model being trained every k steps (Yu et al. 2025). Which ablation
  (``RefatConfig.ablation``): each layer's own feature at that layer (the paper's); one layer's feature
  removed from the whole stream (the RFA attack's form); or each layer's own feature at random layers and
  token positions (DeepRefusal, Xie et al. 2025).
- ``cat``: an embedding-space attack (a perturbation of block 0's input, i.e. the embeddings) found
  by signed-gradient steps toward an affirmative target (Xhonneux et al. 2024).
- ``lat``: the same attack in the residual stream at middle layers, toward the affirmative target
  and away from the refusal (Sheshadri et al. 2024).
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .. import hooks
from ..configs import at_least, require
from ..directions import extract
from ..memory import release_freed_memory
from ..models import Model
from ..pgd import Ball, default_step, pgd
from ..prefix_cache import Work
from .data import Batch, response_loss

__all__ = ["RefatConfig", "ABLATIONS", "AdversarialConfig", "Perturbation", "RefatPerturbation",
           "AdversarialPerturbation", "make_perturbation", "METHODS", "Method", "Cost"]

Method = Literal["rt", "refat", "cat", "lat"]
METHODS: tuple[str, ...] = get_args(Method)
Ablation = Literal["per-layer", "one-direction", "random"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)


@dataclass
class RefatConfig:
    p: float = 0.5  # probability that a harmful example is trained under RFA
    k: int = 4  # recompute the refusal features every k steps
    n: int = 32  # from n harmful and n harmless prompts
    layers: list[int] | None = None  # default: from 25 % depth to the last layer
    mode: hooks.AblationMode = "project"
    position: int = -1  # post-instruction position the features are read at (an offset from the end)
    # what a drawn harmful row is trained under. per-layer: each layer of `layers` loses its own feature at that
    # layer, every position (Yu et al.). one-direction: the feature of one layer of `layers`, drawn per row,
    # removed from the whole stream as the RFA attack removes it (`subtract`: at that layer only, as the attack).
    # random: each layer of `layers` with probability layer_prob and each token position with probability
    # position_prob, drawn per row, lose that layer's own feature (DeepRefusal's probabilistic ablation).
    ablation: Ablation = "per-layer"
    layer_prob: float = 0.5  # random: probability that a layer of `layers` is ablated
    position_prob: float = 0.5  # random: probability that a token position is ablated

    def __post_init__(self):
        require(0.0 <= self.p <= 1.0, "p", f"must be in [0, 1], got {self.p}")
        require(self.ablation in ABLATIONS, "ablation", f"must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        for name in ("layer_prob", "position_prob"):
            require(0.0 < getattr(self, name) <= 1.0, name, f"must be in (0, 1], got {getattr(self, name)}")
        at_least(self, 1, "k", "n")
        require(self.mode in hooks.ABLATION_MODES, "mode", f"must be one of {', '.join(hooks.ABLATION_MODES)}, "
                f"got {self.mode!r}")
        require(self.position < 0, "position", f"must be a negative offset from the end, got {self.position}")
        _check_layers(self.layers)

    def validate(self, n_layers: int) -> None:
        """The checks that need the model."""
        _check_layers(self.layers, n_layers)


@dataclass
class AdversarialConfig:
    layers: list[int] | None = None  # cat: [0] (the embeddings); lat: default [L/4, L/2, 3L/4]
    epsilon: float = 0.1  # per-token L2 budget, relative to the median prompt-token norm at that layer
    steps: int = 4  # signed-gradient steps of the inner attack
    step_size: float | None = None  # per-token L2 length of a step, relative like epsilon; default 2.5 epsilon / steps
    away_weight: float | None = None  # weight of "away from the refusal" in the attack loss (cat: 0, lat: 1)

    def __post_init__(self):
        at_least(self, 0, "epsilon", "step_size", strict=True)
        at_least(self, 1, "steps")
        at_least(self, 0, "away_weight")
        _check_layers(self.layers)

    def validate(self, n_layers: int) -> None:
        """The checks that need the model."""
        _check_layers(self.layers, n_layers)


def _check_layers(layers: list[int] | None, n_layers: int | None = None) -> None:
    """Layer indices are >= 0 (checked on construction) and < n_layers (once the model is known)."""
    bad = [l for l in layers or () if not 0 <= l < (math.inf if n_layers is None else n_layers)]
    require(not bad, "layers", f"layer(s) {bad} out of range " + ("(must be >= 0)" if n_layers is None
                                                                  else f"0..{n_layers - 1}"))


@dataclass
class Cost:
    """Extra work a perturbation adds to plain refusal training."""

    forward: int = 0  # forward passes (batches) beyond the training forward
    backward: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, other: "Cost") -> None:
        self.forward += other.forward
        self.backward += other.backward
        self.tokens += other.tokens
        self.seconds += other.seconds


def step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    """Randomness that depends only on (seed, step): resumed runs draw exactly the same numbers."""
    return torch.Generator().manual_seed(hash((seed, step, salt)) & 0x7FFF_FFFF_FFFF)


class Perturbation:
    """The ``rt`` method: train under no perturbation. Subclasses override :meth:`context`."""

    name = "rt"

    def __init__(self, model: Model, seed: int = 0):
        self.model, self.seed, self.cost = model, seed, Cost()

    def before_step(self, step: int) -> None:
        """Called before each optimisation step (ReFAT recomputes its features here)."""

    def context(self, batch: Batch, draw: int):
        """The context manager the training forward of ``batch`` runs under (``draw``: the micro-batch's
        index over the whole run, step × grad_accum + micro, which seeds any random choice)."""
        return nullcontext()

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


class RefatPerturbation(Perturbation):
    name = "refat"

    def __init__(self, model: Model, cfg: RefatConfig, harmful: list[str], harmless: list[str], seed: int = 0):
        super().__init__(model, seed)
        cfg.validate(model.n_layers)
        self.cfg = cfg
        self.layers = cfg.layers if cfg.layers is not None else list(range(model.n_layers // 4, model.n_layers))
        self.harmful, self.harmless = harmful, harmless
        self.directions: Tensor | None = None  # [n_layers, d]
        self.harmless_mean: Tensor | None = None
        self.history: list[dict] = []  # (step, per-layer norms, cosine to the previous features)

    @torch.no_grad()
    def recompute(self, step: int) -> None:
        """Refusal features of the model as it is now (adapters active, dropout off)."""
        t0 = time.perf_counter()
        g = step_generator(self.seed, step, 1)
        pick = lambda xs: [xs[i] for i in torch.randperm(len(xs), generator=g)[:self.cfg.n].tolist()]  # noqa: E731
        harmful, harmless = pick(self.harmful), pick(self.harmless)
        was_training = self.model.hf.training
        self.model.hf.eval()
        work = Work()
        try:  # the chat template's shared prefix runs once (refat.prefix_cache): same features, fewer tokens;
            # batches of 16 prompts of similar length pad less than one of 32 (Qwen2.5, N = 32: 45 % of the
            # whole prompts' tokens instead of 57 %)
            d = extract(self.model, harmful, harmless, positions=[self.cfg.position], progress=False,
                        batch_size=16, share_prefix=True, work=work)
        finally:
            self.model.hf.train(was_training)
        new = d.per_layer(self.cfg.position)
        cos = None
        if self.directions is not None:
            cos = torch.nn.functional.cosine_similarity(new, self.directions, dim=-1)[self.layers].mean().item()
        self.directions, self.harmless_mean = new, d.harmless(self.cfg.position)
        self.cost.add(Cost(forward=work.forwards, tokens=work.tokens, seconds=time.perf_counter() - t0))
        self.history.append({"step": step, "mean_norm": new[self.layers].norm(dim=-1).mean().item(),
                             "cosine_to_previous": cos})

    def before_step(self, step: int) -> None:
        if step % self.cfg.k == 0 or self.directions is None:
            self.recompute(step)

    def rows(self, batch: Batch, draw: int) -> Tensor:
        """Harmful rows drawn for RFA in this micro-batch, each with probability p."""
        size = batch.global_size or len(batch.harmful)
        coin = torch.rand(size, generator=step_generator(self.seed, draw, 2)) < self.cfg.p
        if batch.rows is not None:  # a shard of the global batch draws the global batch's coins
            coin = coin[batch.rows]
        return batch.harmful.cpu() & coin

    def _coins(self, batch: Batch, draw: int, salt: int, *shape: int) -> Tensor:
        """Uniform [0, 1) numbers [rows, *shape] for this micro-batch: drawn for the global batch from
        (seed, draw, salt), so a data-parallel shard gets exactly its rows' numbers."""
        size = batch.global_size or len(batch.harmful)
        u = torch.rand(size, *shape, generator=step_generator(self.seed, draw, salt))
        return u if batch.rows is None else u[batch.rows]

    def direction_layers(self, batch: Batch, draw: int) -> Tensor:
        """one-direction: per row, the layer (one of ``self.layers``) whose feature it loses."""
        pick = (self._coins(batch, draw, 3) * len(self.layers)).long().clamp(max=len(self.layers) - 1)
        return torch.tensor(self.layers)[pick]

    def random_sites(self, batch: Batch, draw: int) -> tuple[Tensor, Tensor]:
        """random: per row, which of ``self.layers`` ([rows, len(layers)] bool) and which token positions
        ([rows, seq] bool) are ablated."""
        layers = self._coins(batch, draw, 4, len(self.layers)) < self.cfg.layer_prob
        positions = self._coins(batch, draw, 5, batch.input_ids.shape[1]) < self.cfg.position_prob
        return layers, positions

    def context(self, batch: Batch, draw: int):
        rows = self.rows(batch, draw)
        if not rows.any():
            return nullcontext()
        mean = self.harmless_mean if self.cfg.mode == "mean" else None
        device = batch.input_ids.device
        if self.cfg.ablation == "per-layer":
            return hooks.ablate(self.model, self.directions, mode=self.cfg.mode, layers=self.layers,
                                rows=rows.to(device), harmless_mean=mean)
        parts = []
        if self.cfg.ablation == "one-direction":
            drawn = self.direction_layers(batch, draw)
            for layer in sorted(set(drawn[rows].tolist())):
                where = None if self.cfg.mode != "subtract" else [layer]  # as the RFA attack does
                parts.append(hooks.ablate(self.model, self.directions[layer], mode=self.cfg.mode, layers=where,
                                          rows=(rows & (drawn == layer)).to(device), harmless_mean=mean))
        else:
            layers, positions = self.random_sites(batch, draw)
            for i in rows.nonzero().flatten().tolist():
                at = [l for l, on in zip(self.layers, layers[i].tolist()) if on]
                if at and positions[i].any():
                    parts.append(hooks.ablate(self.model, self.directions, mode=self.cfg.mode, layers=at,
                                              positions=positions[i].nonzero().flatten().tolist(), rows=[i],
                                              harmless_mean=mean))
        return _all(parts)

    def state(self) -> dict[str, Tensor]:
        return {} if self.directions is None else {"directions": self.directions, "harmless_mean": self.harmless_mean}

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "directions" in state:
            self.directions, self.harmless_mean = state["directions"], state["harmless_mean"]


class AdversarialPerturbation(Perturbation):
    """CAT (layer 0, the embeddings) or LAT (middle layers): PGD on the prompt tokens of harmful rows."""

    def __init__(self, model: Model, cfg: AdversarialConfig, method: str, seed: int = 0):
        super().__init__(model, seed)
        cfg.validate(model.n_layers)
        self.name, self.cfg = method, cfg
        n = model.n_layers
        default = [0] if method == "cat" else sorted({n // 4, n // 2, 3 * n // 4})  # a set: a shallow model repeats
        self.layers = cfg.layers if cfg.layers is not None else default
        self.away = cfg.away_weight if cfg.away_weight is not None else (0.0 if method == "cat" else 1.0)

    def _attack(self, batch: Batch) -> dict[int, Tensor]:
        """Per-layer perturbations [n_harmful, P, d] that push harmful prompts toward compliance."""
        t0 = time.perf_counter()
        affirm = batch.affirm
        harmful_idx = batch.harmful.nonzero().flatten()
        refusal_ids = batch.input_ids[harmful_idx]
        refusal_mask, refusal_labels = batch.attention_mask[harmful_idx], batch.labels[harmful_idx]
        width = int(batch.prompt_lengths[harmful_idx].max())
        prompt_mask = (torch.arange(width, device=affirm.input_ids.device)[None] <
                       batch.prompt_lengths[harmful_idx][:, None].to(affirm.input_ids.device)).unsqueeze(-1)
        with hooks.capture(self.model, self.layers, positions=slice(0, width)) as acts, torch.no_grad():
            self.model.hf(input_ids=affirm.input_ids, attention_mask=affirm.attention_mask)
        # typical norm of the real prompt tokens: padding left out, and the median because the first
        # token's activation is often orders of magnitude larger than the rest (an attention sink)
        scale = {l: acts[l][0].norm(dim=-1)[prompt_mask.squeeze(-1)].median().item() for l in self.layers}
        step = self.cfg.step_size if self.cfg.step_size is not None else default_step(self.cfg.epsilon, self.cfg.steps)
        balls = [Ball(step=step * scale[l], radius=self.cfg.epsilon * scale[l], mask=prompt_mask) for l in self.layers]
        deltas = {l: torch.zeros(len(harmful_idx), width, self.model.d_model, device=affirm.input_ids.device,
                                 dtype=self.model.dtype, requires_grad=True) for l in self.layers}

        def loss() -> Tensor:
            with hooks.perturb(self.model, deltas):
                out = response_loss(self.model, affirm.input_ids, affirm.attention_mask, affirm.labels,
                                    reduction="mean")
                if self.away:
                    out = out - self.away * response_loss(self.model, refusal_ids, refusal_mask, refusal_labels,
                                                          reduction="mean")
            return out

        pgd(loss, list(deltas.values()), balls, self.cfg.steps)
        fwd = self.cfg.steps * (2 if self.away else 1)
        release_freed_memory()  # the attack's buffers, before the training forward
        self.cost.add(Cost(forward=fwd + 1, backward=self.cfg.steps, tokens=(fwd + 1) * affirm.n_tokens,
                           seconds=time.perf_counter() - t0))
        return {l: d.detach() for l, d in deltas.items()}

    def context(self, batch: Batch, draw: int):
        if batch.affirm is None:
            return nullcontext()
        small = self._attack(batch)
        harmful_idx = batch.harmful.nonzero().flatten()
        full = {}
        for l, d in small.items():
            full[l] = torch.zeros(len(batch.harmful), d.shape[1], d.shape[2], dtype=d.dtype, device=d.device)
            full[l][harmful_idx.to(d.device)] = d
        return hooks.perturb(self.model, full, rows=batch.harmful.to(batch.input_ids.device))


@contextmanager
def _all(contexts):
    """Enter every context (each an ablation of some rows) for the duration of the block."""
    with ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def make_perturbation(method: str, model: Model, *, refat: RefatConfig, adversarial: AdversarialConfig,
                      harmful: list[str], harmless: list[str], seed: int) -> Perturbation:
    if method == "rt":
        return Perturbation(model, seed)
    if method == "refat":
        return RefatPerturbation(model, refat, harmful, harmless, seed)
    if method in ("cat", "lat"):
        return AdversarialPerturbation(model, adversarial, method, seed)
    raise ValueError(f"unknown training method {method!r}; choose from {', '.join(METHODS)}")
