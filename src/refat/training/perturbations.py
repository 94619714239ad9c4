"""What makes each training method: a perturbation of the harmful rows' forward pass.

All methods share one loss (cross-entropy on response tokens: refusals for harmful prompts,
answers for harmless ones); they differ only in the context the training forward runs under:

- ``rt``: none (refusal training).
- ``refat``: refusal feature ablation of harmful rows with probability p, the per-layer features
  recomputed from the model being trained every k steps (Yu et al. 2025). Which ablation
  (``RefatConfig.ablation``): each layer's own feature at that layer (the paper's); one layer's feature
  removed from the whole stream (the RFA attack's form); or each layer's own feature at random layers and token
  positions (DeepRefusal, Xie et al. 2025). ``positions`` draws the post-instruction position the per-layer or
  one-direction features are read at (the worst-case attack's candidates); ``window`` trades the features'
  freshness for a cheaper recomputation.
- ``cat``: an embedding-space attack (a perturbation of block 0's input, i.e. the embeddings) found
  by signed-gradient steps toward an affirmative target (Xhonneux et al. 2024).
- ``lat``: the same attack in the residual stream at middle layers, toward the affirmative target
  and away from the refusal (Sheshadri et al. 2024).

``AdversarialConfig``'s defaults are this toolkit's cheap versions of CAT and LAT (a few sign steps in a ball
measured in the batch's own token norms, and the shared loss). Its other fields express the authors' own
definitions: the ball's unit, AdamW steps, LAT's embedding-plus-layers placement and completion positions,
unlikelihood "away" terms, and the per-term training objective (:mod:`refat.training.objective`);
:mod:`refat.training.presets` sets them to the published values (docs/baselines.md).
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
from ..configs import added, at_least, require
from ..directions import extract
from ..losses import floored, target_cross_entropy, unlikelihood
from ..memory import release_freed_memory
from ..models import Model
from ..pgd import Ball, default_step, pgd
from ..prefix_cache import Work
from .data import Batch, response_logits, response_loss

__all__ = ["RefatConfig", "ABLATIONS", "AdversarialConfig", "SCALES", "AWAY_LOSSES", "ATTACK_OPTIMIZERS",
           "Perturbation", "RefatPerturbation", "AdversarialPerturbation", "make_perturbation", "METHODS", "Method",
           "Cost"]

Method = Literal["rt", "refat", "cat", "lat"]
METHODS: tuple[str, ...] = get_args(Method)
Ablation = Literal["per-layer", "one-direction", "random"]
ABLATIONS: tuple[str, ...] = get_args(Ablation)
Scale = Literal["prompt-median", "embedding-mean", "absolute"]
SCALES: tuple[str, ...] = get_args(Scale)
AwayLoss = Literal["negative-ce", "unlikelihood"]
AWAY_LOSSES: tuple[str, ...] = get_args(AwayLoss)
AttackOptimizer = Literal["sign", "adamw"]
ATTACK_OPTIMIZERS: tuple[str, ...] = get_args(AttackOptimizer)


@dataclass
class RefatConfig:
    p: float = 0.5  # probability that a harmful example is trained under RFA
    k: int = 4  # recompute the refusal features every k steps
    n: int = 32  # from n harmful and n harmless prompts
    # the features average the means of the last `window` recomputations, each over the next n / window prompts
    # of each kind in a fixed shuffle of the pool (the first runs all n; together the window's are n distinct):
    # 1 / window of the recomputation's forwards, with activations up to (window - 1) * k steps old (an
    # approximation: BENCHMARKS.md measures its features and the recipe its robustness). 1: every recomputation runs
    # all n afresh (Yu et al.)
    window: int = added(1)
    layers: list[int] | None = None  # default: from 25 % depth to the last layer
    mode: hooks.AblationMode = "project"
    position: int = -1  # post-instruction position the features are read at (an offset from the end)
    # what a drawn harmful row is trained under. per-layer: each layer of `layers` loses its own feature at that
    # layer, every position (Yu et al.). one-direction: the feature of one layer of `layers`, drawn per row,
    # removed from the whole stream as the RFA attack removes it (`subtract`: at that layer only, as the attack).
    # random: each layer of `layers` with probability layer_prob and each token position with probability
    # position_prob, drawn per row, lose that layer's own feature (DeepRefusal's probabilistic ablation).
    ablation: Ablation = "per-layer"
    # per-layer and one-direction: the post-instruction positions (negative offsets) the features are drawn from, one
    # per row: the worst-case RFA's own candidates (every layer x position, per-layer at each position). None:
    # `position` only
    positions: list[int] | None = added(None)
    layer_prob: float = 0.5  # random: probability that a layer of `layers` is ablated
    position_prob: float = 0.5  # random: probability that a token position is ablated

    def __post_init__(self):
        require(0.0 <= self.p <= 1.0, "p", f"must be in [0, 1], got {self.p}")
        require(self.ablation in ABLATIONS, "ablation", f"must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        for name in ("layer_prob", "position_prob"):
            require(0.0 < getattr(self, name) <= 1.0, name, f"must be in (0, 1], got {getattr(self, name)}")
        at_least(self, 1, "k", "n", "window")
        require(self.n % self.window == 0, "window", f"must divide n ({self.n}), got {self.window}")
        require(self.mode in hooks.ABLATION_MODES, "mode", f"must be one of {', '.join(hooks.ABLATION_MODES)}, "
                f"got {self.mode!r}")
        require(self.position < 0, "position", f"must be a negative offset from the end, got {self.position}")
        if self.positions is not None:
            require(bool(self.positions) and all(q < 0 for q in self.positions), "positions",
                    f"must be negative offsets from the end, got {self.positions}")
            require(self.ablation != "random", "positions", "draws the features' position for the per-layer and "
                    "one-direction ablations; random ablates position -1's features at random token positions")
        _check_layers(self.layers)

    def validate(self, n_layers: int) -> None:
        """The checks that need the model."""
        _check_layers(self.layers, n_layers)


@dataclass
class AdversarialConfig:
    """CAT's and LAT's inner attack and, optionally, their authors' training objective. Every field after
    ``away_weight`` is off by default (today's cheap CAT/LAT); :mod:`refat.training.presets` sets them to the
    authors' published values (``cat-paper``, ``lat-paper``; sources in docs/baselines.md)."""

    # the attack: PGD on the prompt tokens of the harmful rows toward their affirmative target
    layers: list[int] | None = None  # block inputs perturbed (0: the embeddings); cat: [0]; lat: [L/4, L/2, 3L/4]
    epsilon: float = 0.1  # per-token L2 budget, in `scale` units
    steps: int = 4  # steps of the inner attack
    step_size: float | None = None  # per-token L2 length of a sign step, in `scale` units; default 2.5 epsilon / steps
    away_weight: float | None = None  # weight of "away from the refusal" in the attack loss (cat: 0, lat: 1)
    # the unit of epsilon and step_size: the batch's median prompt-token norm at each perturbed layer (ours); the
    # mean norm of the token-embedding matrix's rows (CAT's: Xhonneux et al. scale eps by it; layer 0 only); or
    # absolute (LAT's: Sheshadri et al.'s epsilon is a plain L2 norm at every layer)
    scale: Scale = added("prompt-median")
    optimizer: AttackOptimizer = added("sign")  # sign steps (CAT's SignSGD), or AdamW (LAT's adversary)
    lr: float | None = added(None)  # absolute step per coordinate instead of step_size (sign: each step moves each
    #                                 coordinate by lr, CAT's 1e-4; adamw: its learning rate, LAT's 1e-3); None:
    #                                 step_size (adamw: lr = step_size / sqrt(d), the sign step's coordinate size)
    layers_depth: int | None = added(None)  # the model depth `layers` were written for: on another depth each
    #                                         layer l becomes round(l * n_layers / layers_depth); None: as given
    attack_completions: bool = added(False)  # also perturb the response positions of both continuations (LAT's
    #                                          add_completions_pgd); False: the prompt tokens only
    away_loss: AwayLoss = added("negative-ce")  # every "away" term (the attack's and the training one): negative
    #                                             cross-entropy (CAT), or unlikelihood -log(1 - p) (LAT, HarmBench)
    away_cutoff: float | None = added(None)  # negative-ce: its floor (CAT: -5); unlikelihood: tokens whose log p is
    #                                          below it drop out (LAT: -5); None: neither
    # the training objective; None/0 throughout: the one cross-entropy over every response token that all methods
    # share. Any of these set: separately weighted terms, each a mean over its own tokens (refat.training.objective):
    # toward = refusals of harmful rows under the attack, utility = answers of the other rows, away = the
    # affirmative target under the attack, kl = KL to the base model on the answers; an unset weight is then 1
    # (toward, utility) or 0 (away, kl).
    toward_weight: float | None = added(None)
    toward_cutoff: float | None = added(None)  # floor of the toward term (CAT: 0.5); None: none
    utility_weight: float | None = added(None)
    train_away_weight: float = added(0.0)
    kl_weight: float = added(0.0)  # divided by its own value as LAT does (a relative step); LoRA only

    def __post_init__(self):
        at_least(self, 0, "epsilon", "step_size", "lr", strict=True)
        at_least(self, 1, "steps", "layers_depth")
        at_least(self, 0, "away_weight", "toward_weight", "utility_weight", "train_away_weight", "kl_weight")
        for name, choices in (("scale", SCALES), ("optimizer", ATTACK_OPTIMIZERS), ("away_loss", AWAY_LOSSES)):
            require(getattr(self, name) in choices, name, f"must be one of {', '.join(choices)}, "
                    f"got {getattr(self, name)!r}")
        require(self.lr is None or self.step_size is None, "step_size", "set lr or step_size, not both")
        _check_layers(self.layers)
        if self.layers_depth is not None:
            require(all(l < self.layers_depth for l in self.layers or ()), "layers",
                    f"{self.layers} out of range for layers_depth {self.layers_depth}")

    @property
    def weighted(self) -> bool:
        """Whether training uses the per-term objective (:mod:`refat.training.objective`)."""
        return (self.toward_weight is not None or self.utility_weight is not None or self.toward_cutoff is not None
                or bool(self.train_away_weight) or bool(self.kl_weight))

    def resolved_layers(self, n_layers: int, method: str) -> list[int]:
        """The block inputs perturbed on a model of ``n_layers``: ``layers`` (rescaled from ``layers_depth``), or
        the method's default."""
        if self.layers is None:
            layers = [0] if method == "cat" else [n_layers // 4, n_layers // 2, 3 * n_layers // 4]
        elif self.layers_depth is None:
            layers = list(self.layers)
        else:
            layers = [min(n_layers - 1, round(l * n_layers / self.layers_depth)) for l in self.layers]
        layers = sorted(set(layers))  # a set: a shallow model repeats
        _check_layers(layers, n_layers)
        require(self.scale != "embedding-mean" or layers == [0], "scale", f"embedding-mean measures the token "
                f"embeddings: it suits layer 0 only, got layers {layers}")
        return layers

    def validate(self, n_layers: int, method: str | None = None) -> None:
        """The checks that need the model (and, for the default layers, the method)."""
        if self.layers is not None or method is not None:
            self.resolved_layers(n_layers, method or "lat")


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
        # the positions features are read at: `position` first, then the one-direction draw's others
        self.positions = list(dict.fromkeys([cfg.position, *(cfg.positions or [])]))
        self.drawn_positions = cfg.positions or [cfg.position]
        # [len(self.positions), n_layers, d]: every layer's feature and harmless mean at each position (float32)
        self.features: Tensor | None = None
        self.feature_harmless: Tensor | None = None
        self.window: list[tuple[Tensor, Tensor]] = []  # (harmful, harmless) float64 [positions, n_layers, d] means
        self.history: list[dict] = []  # (step, per-layer norms, cosine to the previous features)

    @property
    def directions(self) -> Tensor | None:
        """[n_layers, d]: each layer's feature at ``position``."""
        return None if self.features is None else self.features[0]

    @property
    def harmless_mean(self) -> Tensor | None:
        """[n_layers, d]: each layer's harmless mean at ``position``."""
        return None if self.feature_harmless is None else self.feature_harmless[0]

    @torch.no_grad()
    def recompute(self, step: int) -> None:
        """Refusal features of the model as it is now (adapters active, dropout off): the first time from n
        prompts of each kind, which fill the window; then from n / window, which replace the oldest means."""
        t0 = time.perf_counter()
        harmful, harmless = self._prompts(step)
        was_training = self.model.hf.training
        self.model.hf.eval()
        work = Work()
        try:  # the chat template's shared prefix runs once (refat.prefix_cache): same features, fewer tokens;
            # batches of 16 prompts of similar length pad less than one of 32 (Qwen2.5, N = 32: 45 % of the
            # whole prompts' tokens instead of 57 %)
            d = extract(self.model, harmful, harmless, positions=self.positions, progress=False,
                        batch_size=16, share_prefix=True, work=work)
        finally:
            self.model.hf.train(was_training)
        means = (d.harmful_mean, d.harmless_mean)
        self.window = (self.window or [means] * self.cfg.window)[1:] + [means]
        harmful_mean, harmless_mean = (torch.stack(m).mean(0) for m in zip(*self.window))
        diff = (harmful_mean - harmless_mean).float()
        new = diff[0]
        cos = None
        if self.directions is not None:
            cos = torch.nn.functional.cosine_similarity(new, self.directions, dim=-1)[self.layers].mean().item()
        self.features, self.feature_harmless = diff, harmless_mean.float()
        self.cost.add(Cost(forward=work.forwards, tokens=work.tokens, seconds=time.perf_counter() - t0))
        self.history.append({"step": step, "mean_norm": new[self.layers].norm(dim=-1).mean().item(),
                             "cosine_to_previous": cos, "prompts": len(harmful) + len(harmless),
                             "tokens": work.tokens})

    def _prompts(self, step: int) -> tuple[list[str], list[str]]:
        """The harmful and harmless prompts a recomputation at ``step`` runs. Window 1: n of each drawn afresh (Yu
        et al.). A window of W: consecutive slices of one fixed shuffle of each pool (window 1's first draw), read
        cyclically: the first recomputation's n, then n / W each, so the W recomputations in the window cover n
        distinct prompts wherever the pool has that many: a fresh draw's sample size, only older."""
        n, window = self.cfg.n, self.cfg.window
        g = step_generator(self.seed, step if window == 1 else 0, 1)
        orders = [torch.randperm(len(xs), generator=g).tolist() for xs in (self.harmful, self.harmless)]
        if window == 1 or not self.window:  # all n: every draw of window 1, the first of a window
            start, count = 0, n
        else:  # the shuffle's next n / window, after the first n and the later recomputations' slices
            start, count = n + (step // self.cfg.k - 1) * (n // window), n // window
        return tuple([xs[order[i % len(xs)]] for i in range(start, start + min(count, len(xs)))]
                     for xs, order in zip((self.harmful, self.harmless), orders))

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

    def direction_positions(self, batch: Batch, draw: int) -> Tensor:
        """Per row, the post-instruction position its features are read at (``positions``)."""
        n = len(self.drawn_positions)
        pick = (self._coins(batch, draw, 6) * n).long().clamp(max=n - 1)
        return torch.tensor(self.drawn_positions)[pick]

    def at_position(self, position: int) -> tuple[Tensor, Tensor]:
        """Every layer's feature read at ``position`` and the harmless means there, [n_layers, d] each."""
        i = self.positions.index(position)
        return self.features[i], self.feature_harmless[i]

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
        if self.cfg.ablation == "per-layer" and not self.cfg.positions:
            return hooks.ablate(self.model, self.directions, mode=self.cfg.mode, layers=self.layers,
                                rows=rows.to(device), harmless_mean=mean)
        parts = []
        at = self.direction_positions(batch, draw) if self.cfg.positions else None
        if self.cfg.ablation == "per-layer":
            for position in sorted(set(at[rows].tolist())):
                features, harmless = self.at_position(position)
                parts.append(hooks.ablate(self.model, features, mode=self.cfg.mode, layers=self.layers,
                                          rows=(rows & (at == position)).to(device),
                                          harmless_mean=harmless if self.cfg.mode == "mean" else None))
        elif self.cfg.ablation == "one-direction":
            drawn = self.direction_layers(batch, draw)
            at = at if at is not None else torch.full_like(drawn, self.cfg.position)
            for layer, position in sorted(set(zip(drawn[rows].tolist(), at[rows].tolist()))):
                where = None if self.cfg.mode != "subtract" else [layer]  # as the RFA attack does
                features, harmless = self.at_position(position)
                parts.append(hooks.ablate(self.model, features[layer], mode=self.cfg.mode, layers=where,
                                          rows=(rows & (drawn == layer) & (at == position)).to(device),
                                          harmless_mean=harmless if self.cfg.mode == "mean" else None))
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
        if self.directions is None:
            return {}
        state = {"directions": self.directions, "harmless_mean": self.harmless_mean}
        if len(self.positions) > 1:  # the other positions' (the checkpoint keys of `position`'s are as before)
            state["candidates"], state["candidate_harmless"] = self.features, self.feature_harmless
        if self.cfg.window > 1:
            state["window"] = torch.stack([torch.stack(m) for m in self.window])  # [window, 2, pos, layers, d]
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        if "candidates" in state:
            self.features, self.feature_harmless = state["candidates"], state["candidate_harmless"]
        elif "directions" in state:
            self.features, self.feature_harmless = state["directions"][None], state["harmless_mean"][None]
        if "window" in state:
            self.window = [(m[0], m[1]) for m in state["window"]]


class AdversarialPerturbation(Perturbation):
    """CAT (layer 0, the embeddings) or LAT (middle layers): PGD on the prompt tokens of harmful rows."""

    def __init__(self, model: Model, cfg: AdversarialConfig, method: str, seed: int = 0):
        super().__init__(model, seed)
        self.name, self.cfg = method, cfg
        self.layers = cfg.resolved_layers(model.n_layers, method)
        self.away = cfg.away_weight if cfg.away_weight is not None else (0.0 if method == "cat" else 1.0)
        self.deltas: dict[int, Tensor] | None = None  # the last attack's [n_harmful, P, d] (the objective's away term)

    def _scales(self, batch: Batch, width: int, prompt_mask: Tensor) -> tuple[dict[int, float], int]:
        """The unit of epsilon and step_size at each perturbed layer, and the forwards it took to measure."""
        if self.cfg.scale == "absolute":
            return {l: 1.0 for l in self.layers}, 0
        if self.cfg.scale == "embedding-mean":  # Xhonneux et al.: the mean L2 norm of the embedding matrix's rows
            norm = self.model.hf.get_input_embeddings().weight.detach().float().norm(dim=-1).mean().item()
            return {l: norm for l in self.layers}, 0
        affirm = batch.affirm
        with hooks.capture(self.model, self.layers, positions=slice(0, width)) as acts, torch.no_grad():
            self.model.hf(input_ids=affirm.input_ids, attention_mask=affirm.attention_mask)
        # typical norm of the real prompt tokens: padding left out, and the median because the first
        # token's activation is often orders of magnitude larger than the rest (an attention sink)
        return {l: acts[l][0].norm(dim=-1)[prompt_mask.squeeze(-1)].median().item() for l in self.layers}, 1

    def _away_term(self, logits: Tensor, targets: Tensor, n: int | None) -> Tensor:
        """The attack's "away from the refusal" term: a mean over the refusal tokens (``n`` of them in the global
        batch when this is a data-parallel shard)."""
        if self.cfg.away_loss == "unlikelihood":
            return unlikelihood(logits, targets, self.cfg.away_cutoff, "mean" if n is None else "sum") / (n or 1)
        ce = target_cross_entropy(logits, targets, "mean") if n is None else target_cross_entropy(logits, targets,
                                                                                                   "sum") / n
        return floored(-ce, self.cfg.away_cutoff)  # a shard floors its own share (no preset floors the attack)

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
        scale, measured = self._scales(batch, width, prompt_mask)
        mask = prompt_mask
        if self.cfg.attack_completions:  # every position either continuation fills (Sheshadri et al.)
            width = max(affirm.input_ids.shape[1], refusal_ids.shape[1])
            fill = lambda m: torch.nn.functional.pad(m, (0, width - m.shape[1])).bool()  # noqa: E731
            mask = (fill(affirm.attention_mask) | fill(refusal_mask.to(affirm.input_ids.device))).unsqueeze(-1)
        cfg, dim = self.cfg, self.model.d_model
        rel = cfg.step_size if cfg.step_size is not None else default_step(cfg.epsilon, cfg.steps)
        balls = [Ball(step=cfg.lr * dim ** 0.5 if cfg.lr is not None else rel * scale[l],
                      radius=cfg.epsilon * scale[l], mask=mask) for l in self.layers]
        deltas = {l: torch.zeros(len(harmful_idx), width, dim, device=affirm.input_ids.device,
                                 dtype=self.model.dtype, requires_grad=True) for l in self.layers}

        # means over the global batch's tokens: a data-parallel shard's rows get the gradients a single process
        # would give them (AdamW is not blind to their scale, nor a sum of toward and away terms to their ratio)
        n_refusal, n_affirm = batch.global_scored or (None, None)

        def loss() -> Tensor:
            with hooks.perturb(self.model, _fit(deltas, affirm.input_ids.shape[1])):
                out = response_loss(self.model, affirm.input_ids, affirm.attention_mask, affirm.labels,
                                    reduction="mean" if n_affirm is None else "sum") / (n_affirm or 1)
            if self.away:
                with hooks.perturb(self.model, _fit(deltas, refusal_ids.shape[1])):
                    away = self._away_term(*response_logits(self.model, refusal_ids, refusal_mask, refusal_labels),
                                           n_refusal)
                out = out + self.away * away
            return out

        pgd(loss, list(deltas.values()), balls, cfg.steps, optimizer=cfg.optimizer)
        fwd = cfg.steps * (2 if self.away else 1)
        release_freed_memory()  # the attack's buffers, before the training forward
        self.cost.add(Cost(forward=fwd + measured, backward=cfg.steps, tokens=(fwd + measured) * affirm.n_tokens,
                           seconds=time.perf_counter() - t0))
        return {l: d.detach() for l, d in deltas.items()}

    def context(self, batch: Batch, draw: int):
        if batch.affirm is None:
            self.deltas = None
            return nullcontext()
        small = self.deltas = self._attack(batch)
        harmful_idx = batch.harmful.nonzero().flatten()
        full = {}
        for l, d in _fit(small, batch.input_ids.shape[1]).items():
            full[l] = torch.zeros(len(batch.harmful), d.shape[1], d.shape[2], dtype=d.dtype, device=d.device)
            full[l][harmful_idx.to(d.device)] = d
        return hooks.perturb(self.model, full, rows=batch.harmful.to(batch.input_ids.device))

    def affirm_context(self, batch: Batch):
        """The last attack applied to ``batch.affirm`` (the harmful rows with their affirmative targets, in the
        same order): the training objective's away term runs under it."""
        if self.deltas is None or batch.affirm is None:
            return nullcontext()
        return hooks.perturb(self.model, _fit(self.deltas, batch.affirm.input_ids.shape[1]))


def _fit(deltas: dict[int, Tensor], width: int) -> dict[int, Tensor]:
    """Perturbations cut to a sequence of ``width`` positions (those covering the responses may be longer)."""
    return {l: d[:, :width] for l, d in deltas.items()}


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
