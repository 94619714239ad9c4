"""Greedy Coordinate Gradient (GCG, Zou et al. 2023): optimise an adversarial string by token gradients.

nanoGCG's algorithm and shape (config and result dataclasses, the chat template split at an
``{optim_str}`` placeholder, attack buffer, mellowmax, early stop, batch halving on out-of-memory),
made cheaper per step without changing what is chosen:

- the KV cache of the text before the optimised string is computed once per behaviour;
- the gradient forward also yields the KV cache of the current string, so candidates whose first
  changed token is at position p or later reuse those keys/values and run only positions p.. (candidates
  are sorted by that position and batched; with one replaced token this skips about 40 % of the
  optimised span at 32 candidates per batch);
- the last target token is never fed (its output would predict past the target) and the vocabulary
  projection runs only at the target positions (``logits_to_keep``): no (batch x length x vocab) logits,
  and it gets those positions as one contiguous matrix (a strided slice made it a slow batched matmul);
- a candidate equal to another, or to the current string, is evaluated once;
- the target's last positions (``prune_tail``, 40 %) run only for candidates that can still be the step's best:
  a candidate's loss over the earlier positions bounds its loss from below, and once one candidate is scored in
  full, those already above it are not finished (97.6 % of them in BENCHMARKS.md's 0.5B case: 1.18x per step);
- everything stays in the model's dtype (only the small target-position logits are upcast for the loss).

Caches with sliding-window or recurrent layers cannot be cropped: the optimised-prefix reuse is then
skipped (the ``before`` cache is still used).

Probe sampling (``GCGConfig.probe_sampling``, Zhao et al. 2024, nanoGCG's algorithm) is the one option
that changes what is computed: a draft model of the same tokenizer scores every candidate and the target
only a probe set plus the draft's best (``GCGResult.target_scored`` counts them). Its probe draws come
from their own random stream, so the candidates match a plain search's; with a draft that ranks as the
target does, it chooses what the plain search chooses.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from tqdm.auto import tqdm

from .. import hooks
from ..configs import added, at_least, require
from ..errors import InputError
from ..generation import cache_keyword, generate, is_oom, new_cache
from ..judges import RefusalStringJudge
from ..losses import target_cross_entropy
from ..models import Model
from ..stats import spearman
from .base import AttackContext, AttackCost, AttackRecord, Behaviour, run_attack

__all__ = ["GCGConfig", "ProbeSamplingConfig", "GCGResult", "PromptSplit", "GCG", "split_prompt", "run_one", "run", "PLACEHOLDER"]

PLACEHOLDER = "{optim_str}"
GOAL = "{goal}"
# nanoGCG's characters for random buffer initialisations
INIT_CHARS = [".", ",", "!", "?", ";", ":", "(", ")", "[", "]", "{", "}", "@", "#", "$", "%", "&", "*",
              "w", "x", "y", "z"]


@dataclass
class ProbeSamplingConfig:
    """Probe sampling (Zhao et al. 2024, as nanoGCG 0.3's ``ProbeSamplingConfig``): a small draft model
    scores every candidate, the target a random probe set of 1/``sampling_factor`` of them; the two rankings'
    agreement on the probe (Spearman ρ, α = (1 + ρ) / 2) sets how many of the draft's best the target then
    scores, (1 - α) · candidates / ``r``, at least one. The step's best is the best the target scored.
    The draft must share the target's tokenizer (candidates are token ids)."""

    draft: str | None = None  # model spec of the draft (loaded with the attack context's dtype/device); None: off
    r: int = 8
    sampling_factor: int = 16

    def __post_init__(self):
        at_least(self, 1, "r", "sampling_factor")


@dataclass
class GCGConfig:
    """nanoGCG's options (same names and defaults, except a fixed default seed) plus refat's.

    The dtype is the loaded model's: load in bf16 on a GPU for speed; on CPU fp32 is faster than bf16.
    """

    num_steps: int = 250
    optim_str_init: str = "x x x x x x x x x x x x x x x x x x x x"
    search_width: int = 512
    topk: int = 256
    n_replace: int = 1
    buffer_size: int = 0
    use_mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    early_stop: bool = False
    batch_size: int | None = 32  # candidates per forward (halved on OOM); None: all at once
    seed: int | None = 0
    allow_non_ascii: bool = False
    filter_ids: bool = True
    placement: str = "{goal} {optim_str}"  # the user message; "{optim_str} {goal}" puts the string first
    use_prefix_cache: bool = True
    max_new_tokens: int = 64  # completion of the final attack prompt (``run``)
    probe_sampling: ProbeSamplingConfig = field(default_factory=ProbeSamplingConfig)  # off unless a draft is set
    # share of the target's last positions run only for candidates that can still be the step's best (branch
    # and bound: the step's choice and loss do not change); 0: every position for every candidate
    prune_tail: float = added(0.4)

    def __post_init__(self):
        at_least(self, 1, "num_steps", "search_width", "topk", "n_replace", "batch_size", "max_new_tokens")
        at_least(self, 0, "buffer_size", "seed")
        at_least(self, 0, "mellowmax_alpha", strict=True)
        require(0 <= self.prune_tail < 1, "prune_tail", f"must be in [0, 1), got {self.prune_tail}")
        require(self.placement.count(PLACEHOLDER) == 1 and self.placement.count(GOAL) == 1, "placement",
                f"must contain {GOAL} and {PLACEHOLDER} exactly once each, got {self.placement!r}")
        require(bool(self.optim_str_init), "optim_str_init", "empty")


@dataclass
class GCGResult:
    best_loss: float
    best_string: str
    losses: list[float]  # per step: the loss of the best candidate
    strings: list[str]  # per step: that candidate's string
    init_loss: float = math.nan  # loss of optim_str_init
    n_forward: int = 0  # model calls (batches), the gradient's included
    n_backward: int = 0
    seconds: float = 0.0
    early_stopped: bool = False
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    target_scored: list[int] = field(default_factory=list)  # per step: candidates the target model scored
    probe_agreement: list[float] = field(default_factory=list)  # probe sampling, per step: Spearman ρ on the probe
    n_draft_forward: int = 0  # probe sampling: the draft's model calls
    pruned: list[int] = field(default_factory=list)  # per step: candidates whose last target positions never ran


@dataclass(frozen=True)
class PromptSplit:
    """The chat-formatted prompt around the optimised string, tokenized piece by piece."""

    before: str
    after: str
    target: str
    before_ids: list[int]
    after_ids: list[int]
    target_ids: list[int]

    def text(self, optim_str: str) -> str:
        """The full formatted prompt (without the target) for an optimised string."""
        return self.before + optim_str + self.after


def user_message(goal: str, optim_str: str, placement: str = GCGConfig.placement) -> str:
    head, tail = placement.split(PLACEHOLDER)
    return head.replace(GOAL, goal) + optim_str + tail.replace(GOAL, goal)


def split_prompt(model: Model, goal: str, target: str, placement: str = GCGConfig.placement) -> PromptSplit:
    """Render the model's own chat template around the placeholder and split there.

    ``before`` and ``after`` are tokenized separately (no hand-made slices); the target follows ``after``.
    """
    if not target:
        raise ValueError("the GCG target is empty")
    text = model.format(user_message(goal, PLACEHOLDER, placement))
    n = text.count(PLACEHOLDER)
    if n != 1:
        why = ("the chat template does not put the user message into the prompt" if n == 0 else
               f"{PLACEHOLDER} occurs {n} times (does the goal or system prompt contain it?)")
        raise InputError(f"cannot place the GCG string for {model.name}: {why}; rendered: {text[:200]!r}")
    before, after = text.split(PLACEHOLDER)
    tok = model.tokenizer
    ids = [tok(s, add_special_tokens=False)["input_ids"] if s else [] for s in (before, after, target)]
    if not ids[2]:
        raise ValueError(f"the GCG target {target!r} tokenizes to no tokens")
    return PromptSplit(before, after, target, *ids)


def _disallowed(tokenizer, rows: int, allow_non_ascii: bool) -> torch.Tensor:
    """Boolean mask over embedding rows: special/added tokens, rows past the tokenizer, and (by default)
    tokens that do not decode to non-empty printable ASCII."""
    n = min(len(tokenizer), rows)
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[n:] = True
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", True)}
    bad[[i for i in special if i < rows]] = True
    if not allow_non_ascii:
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        for i, s in enumerate(texts):
            if not (s and s.isascii() and s.isprintable()):
                bad[i] = True
    return bad


def sample_candidates(ids: torch.Tensor, grad: torch.Tensor, width: int, topk: int, n_replace: int,
                      disallowed: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """``width`` copies of ``ids`` with ``n_replace`` random positions set to one of the top-k tokens
    of the negative one-hot gradient at that position (nanoGCG's sampler)."""
    n = ids.shape[0]
    grad = grad.clone()
    if disallowed is not None:
        grad[:, disallowed.to(grad.device)] = math.inf
    top = (-grad).topk(topk, dim=1).indices  # (n, topk)
    pos = torch.rand((width, n), generator=generator).argsort(dim=1)[:, :n_replace].to(ids.device)
    pick = torch.randint(0, topk, (width, n_replace), generator=generator).to(ids.device)
    return ids.repeat(width, 1).scatter_(1, pos, top[pos, pick])


def filter_candidates(cands: torch.Tensor, tokenizer) -> torch.Tensor:
    """Keep the candidates whose decoded string re-encodes to the same ids (what the model will see)."""
    rows = cands.tolist()
    enc = tokenizer(tokenizer.batch_decode(rows), add_special_tokens=False)["input_ids"]
    keep = [i for i, (r, e) in enumerate(zip(rows, enc)) if r == e]
    if not keep:
        raise RuntimeError("no GCG candidate survives decoding and re-encoding; set GCGConfig.filter_ids=False "
                           "or choose another GCGConfig.optim_str_init")
    return cands[keep]


def _mellowmax(t: torch.Tensor, alpha: float) -> torch.Tensor:
    return (torch.logsumexp(alpha * t, dim=-1) - math.log(t.shape[-1])) / alpha


class GCG:
    """A GCG attacker for one model; :meth:`attack` runs one behaviour (model-level setup is done once)."""

    def __init__(self, model: Model, config: GCGConfig = GCGConfig(), *, progress: bool = True,
                 draft: Model | None = None):
        """``draft``: the loaded draft model for probe sampling (``config.probe_sampling.draft`` names it
        for :func:`run`, which loads it); given here, probe sampling is on."""
        self.model, self.config, self.progress = model, config, progress
        if config.probe_sampling.draft is not None and draft is None:
            raise InputError(f"GCGConfig.probe_sampling.draft={config.probe_sampling.draft!r}: pass the loaded "
                             "draft model (GCG(..., draft=...)); gcg.run loads it from the spec")
        self.draft = None if draft is None else GCG(_same_tokenizer(draft, model), replace(
            config, probe_sampling=ProbeSamplingConfig()), progress=False)
        self.embed = model.hf.get_input_embeddings()
        rows = self.embed.weight.shape[0]
        self.disallowed = _disallowed(model.tokenizer, rows, config.allow_non_ascii).to(model.device)
        allowed = int((~self.disallowed).sum())
        if allowed == 0:
            raise InputError(f"{model.name}: no token is allowed for GCG (try GCGConfig.allow_non_ascii=True)")
        self.topk = min(config.topk, allowed)
        base = model.hf.get_base_model() if hasattr(model.hf, "get_base_model") else model.hf
        params = inspect.signature(base.forward).parameters
        self._cache_kw = cache_keyword(model)
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)
        self.batch_size = config.batch_size  # halved for good on out-of-memory
        self.n_forward = self.n_backward = 0

    # -- model calls -----------------------------------------------------------------------------------

    def _new_cache(self):
        return new_cache(self.model)

    def _logits(self, *, ids=None, embeds=None, cache=None, n: int) -> torch.Tensor:
        """Logits at the last ``n`` input positions; ``cache`` (if any) is extended in place."""
        kw = {self._keep_kw: n} if self._keep_kw else {}
        if cache is not None:
            kw[self._cache_kw] = cache
        with hooks.hooked(pre=[(self.model.hf.get_output_embeddings(), _contiguous_input)]):
            out = self.model.hf(input_ids=ids, inputs_embeds=embeds, use_cache=cache is not None, **kw)
        self.n_forward += 1
        return out.logits[:, -n:]

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row loss over the target positions and whether greedy decoding would emit the target."""
        match = (logits.argmax(-1) == target).all(-1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.config.use_mellowmax:
            picked = logits.gather(-1, target.expand(logits.shape[0], -1).unsqueeze(-1)).squeeze(-1)
            return _mellowmax(-picked, self.config.mellowmax_alpha), match
        return target_cross_entropy(logits, target.expand(logits.shape[0], -1)), match

    def _batched(self, n: int, fn) -> list:
        """``fn(start, stop)`` over consecutive slices of ``range(n)``; the batch halves on out-of-memory."""
        out, i = [], 0
        while i < n:
            bs = self.batch_size or n
            try:
                out.append(fn(i, min(i + bs, n)))
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e) or bs == 1:
                    raise
                self.batch_size = max(1, bs // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            i += bs
        return out

    # -- one behaviour ---------------------------------------------------------------------------------

    def _prepare(self, split: PromptSplit):
        dev = self.model.device
        t = lambda ids: torch.tensor(ids, dtype=torch.long, device=dev)
        self.before_ids, self.after_ids, self.target_ids = t(split.before_ids), t(split.after_ids), t(split.target_ids)
        # fed after the optimised string: `after` and the target without its last token
        self.tail_ids = torch.cat([self.after_ids, self.target_ids[:-1]])
        self.before_cache = None
        if self.config.use_prefix_cache and len(self.before_ids):
            self.before_cache = self._new_cache()
            with torch.no_grad():
                self._logits(ids=self.before_ids[None], cache=self.before_cache, n=1)

    def _gradient(self, ids: torch.Tensor):
        """One-hot token gradient (n, vocab rows), the current loss and match, and the current string's cache."""
        cache = copy.deepcopy(self.before_cache) if self.before_cache is not None else None
        if self.config.use_prefix_cache and cache is None:
            cache = self._new_cache()
        W = self.embed.weight
        with torch.enable_grad():
            e = self.embed(ids[None]).detach().requires_grad_(True)
            parts = [e, self.embed(self.tail_ids[None])]
            if self.before_cache is None and len(self.before_ids):
                parts.insert(0, self.embed(self.before_ids[None]))
            logits = self._logits(embeds=torch.cat(parts, 1), cache=cache, n=len(self.target_ids))
            loss, match = self._loss(logits, self.target_ids)
            (g,) = torch.autograd.grad(loss.sum(), e)
        self.n_backward += 1
        if cache is not None:  # keep the keys/values, drop the graph
            for layer in getattr(cache, "layers", ()):
                for name in ("keys", "values"):
                    if isinstance(getattr(layer, name, None), torch.Tensor):
                        setattr(layer, name, getattr(layer, name).detach())
        grad = g[0] @ W.T  # d loss / d one-hot = (d loss / d embedding) @ Wᵀ
        return grad, float(loss[0].detach()), bool(match[0]), cache

    def _evaluate(self, cands: torch.Tensor, cur: torch.Tensor | None, cache, *, prune: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses and target matches of candidate rows. With a cache of ``before`` + ``cur`` + tail, candidates
        are sorted by their first token that differs from ``cur`` and cut into batches; each batch runs from its
        earliest such token (``cur=None``: from the start). Full batches beat one small batch per position.

        ``prune`` (the step's search, not a probe or the buffer): the target's last positions
        (``GCGConfig.prune_tail``) run only for a candidate whose loss over the earlier ones, a lower bound on
        its loss (cross-entropy terms are >= 0), is still below the best loss completed so far, or, with
        ``early_stop``, whose earlier positions all match. Such a candidate's loss is inf: it cannot be the
        step's best, and every candidate that can, or can match, is scored in full."""
        n_before, n_target = len(self.before_ids), len(self.target_ids)
        if cache is not None and cur is not None and getattr(cache, "is_croppable", False):
            first = (cands != cur).int().argmax(1)
        else:
            first = torch.zeros(len(cands), dtype=torch.long, device=cands.device)
            cache = self.before_cache if cache is not None else None
        order = first.argsort(stable=True)
        deferred = self._deferred(cache) if prune else 0
        head = n_target - deferred  # target positions every candidate runs
        tail = self.tail_ids[:len(self.tail_ids) - deferred]
        bound = [math.inf]  # the lowest complete loss so far, summed over the target positions

        def chunk(a: int, b: int):
            idx = order[a:b]
            rows, p = cands[idx], int(first[idx].min())
            parts = [rows[:, p:], tail.expand(len(rows), -1)]
            c = None
            if cache is not None and n_before + p > 0:
                c = copy.deepcopy(cache)
                extra = c.get_seq_length() - (n_before + p)
                if extra > 0:
                    c.crop(-extra)
                c.batch_repeat_interleave(len(rows))
            elif cache is None and len(self.before_ids):
                parts.insert(0, self.before_ids.expand(len(rows), -1))
            if deferred and c is None:
                c = self._new_cache()  # the deferred positions continue from it
            with torch.no_grad():
                logits = self._logits(ids=torch.cat(parts, 1), cache=c, n=head)
            return idx.cpu(), *(self._complete(logits, c, bound) if deferred else self._loss(logits, self.target_ids))

        losses = torch.empty(len(cands), dtype=torch.float64)
        matches = torch.empty(len(cands), dtype=torch.bool)
        for idx, loss, match in self._batched(len(cands), chunk):
            losses[idx], matches[idx] = loss.double().cpu(), match.cpu()
        return losses, matches

    def _deferred(self, cache) -> int:
        """How many of the target's last positions :meth:`_evaluate` defers (0: none, e.g. with mellowmax, whose
        loss is not a sum of non-negative terms, or a cache that cannot select rows)."""
        usable = cache is None or hasattr(cache, "batch_select_indices")
        if self.config.use_mellowmax or not usable:
            return 0
        return min(round(self.config.prune_tail * len(self.target_ids)), len(self.target_ids) - 1)

    def _complete(self, head_logits: torch.Tensor, cache, bound: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's losses and matches from its logits at the first target positions and ``cache`` (everything
        fed so far): the deferred positions run for the rows that can still beat ``bound[0]`` (the lowest complete
        loss so far times the target length, updated). While there is no bound yet, the row with the lowest
        partial loss runs first and alone, so that the bound is tight for the rest."""
        target, head = self.target_ids, head_logits.shape[1]
        labels = target[:head].expand(len(head_logits), -1)
        partial = target_cross_entropy(head_logits, labels, reduction="none").double().sum(-1)
        head_match = (head_logits.argmax(-1) == labels).all(-1)
        loss = torch.full_like(partial, math.inf)
        match = torch.zeros_like(head_match)
        done = torch.zeros_like(head_match)
        while True:
            todo = ~done & ((partial < bound[0]) | (head_match if self.config.early_stop else False))
            if not todo.any():
                return loss, match
            rows = todo.nonzero()[:, 0]
            if bound[0] == math.inf and len(rows) > 2:
                rows = rows[partial[rows].argmin()][None]
            c = copy.deepcopy(cache)
            c.batch_select_indices(rows)
            with torch.no_grad():
                logits = self._logits(ids=target[head - 1:-1].expand(len(rows), -1), cache=c, n=len(target) - head)
            rest = target[head:].expand(len(rows), -1)
            total = partial[rows] + target_cross_entropy(logits, rest, reduction="none").double().sum(-1)
            loss[rows] = total / len(target)
            match[rows] = head_match[rows] & (logits.argmax(-1) == rest).all(-1)
            done[rows] = True
            bound[0] = min(bound[0], float(total.min()))

    def _probe_sample(self, cands: torch.Tensor, cur: torch.Tensor, cache, generator: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Probe sampling over ``cands``: losses and matches (inf and False where the target did not score),
        the mask of the candidates it scored, and the draft/target rank agreement on the probe."""
        ps, n = self.config.probe_sampling, len(cands)
        draft_loss, _ = self.draft._evaluate(cands, None, self.draft.before_cache)
        probe = torch.randperm(n, generator=generator)[:min(n, max(2, n // ps.sampling_factor))]
        probe_loss, probe_match = self._evaluate(cands[probe.to(cands.device)], cur, cache)
        rho = spearman(probe_loss.tolist(), draft_loss[probe].tolist())
        n_best = max(1, min(n, int((1 - (1 + rho) / 2) * n / ps.r)))
        scored = torch.zeros(n, dtype=torch.bool)
        scored[probe] = True
        best = draft_loss.argsort(stable=True)[:n_best]
        rest = best[~scored[best]]  # the draft's best the probe has not scored already
        loss = torch.full((n,), math.inf, dtype=torch.float64)
        match = torch.zeros(n, dtype=torch.bool)
        loss[probe], match[probe] = probe_loss, probe_match
        if len(rest):
            loss[rest], match[rest] = self._evaluate(cands[rest.to(cands.device)], cur, cache)
            scored[rest] = True
        return loss, match, scored, rho

    def _init_buffer(self, init: torch.Tensor, generator: torch.Generator) -> list[tuple[float, torch.Tensor]]:
        size = self.config.buffer_size
        if size <= 1:
            return [(math.nan, init)]  # its loss comes with the first gradient
        tok = self.model.tokenizer
        chars = [ids[0] for ids in tok(INIT_CHARS, add_special_tokens=False)["input_ids"]
                 if len(ids) == 1 and not self.disallowed[ids[0]]]
        if not chars:
            raise ValueError(f"{self.model.name}: no single-token initialisation character for buffer_size > 1")
        chars_t = torch.tensor(chars, device=init.device)
        rand = chars_t[torch.randint(0, len(chars), (size - 1, len(init)), generator=generator).to(init.device)]
        rows = torch.cat([init[None], rand])
        losses, _ = self._evaluate(rows, None, self.before_cache)
        return sorted(((float(l), r) for l, r in zip(losses, rows)), key=lambda x: x[0])

    def attack(self, goal: str, target: str) -> GCGResult:
        """Optimise the string for one (goal, target)."""
        cfg, tok = self.config, self.model.tokenizer
        t0 = time.perf_counter()
        f0, b0 = self.n_forward, self.n_backward
        split = split_prompt(self.model, goal, target, cfg.placement)
        self._prepare(split)
        if self.draft is not None:  # the same tokens: the target's template around the string
            self.draft._prepare(split)
            d0 = self.draft.n_forward
        init = torch.tensor(tok(cfg.optim_str_init, add_special_tokens=False)["input_ids"], device=self.model.device)
        if len(init) == 0:
            raise InputError(f"GCGConfig.optim_str_init {cfg.optim_str_init!r} tokenizes to no tokens")
        if cfg.n_replace > len(init):
            raise InputError(f"GCGConfig.n_replace={cfg.n_replace} exceeds the {len(init)} optimised tokens")
        seed = cfg.seed if cfg.seed is not None else torch.seed()
        generator = torch.Generator().manual_seed(seed)
        # the probe's own stream: the candidates drawn match a plain search's with the same seed
        probe_generator = torch.Generator().manual_seed((seed + 1) % 2**63)
        buffer = self._init_buffer(init, generator)
        ids = buffer[0][1]
        init_loss = buffer[0][0] if cfg.buffer_size > 1 else math.nan
        losses: list[float] = []
        strings: list[str] = []
        step_seconds: list[float] = []
        target_scored: list[int] = []
        agreement: list[float] = []
        pruned: list[int] = []
        stopped = False
        for step in tqdm(range(cfg.num_steps), desc="GCG", leave=False, disable=not self.progress):
            t_step = time.perf_counter()
            grad, cur_loss, cur_match, cache = self._gradient(ids)
            if step == 0 and math.isnan(init_loss):
                init_loss = cur_loss
            if math.isnan(buffer[0][0]):
                buffer[0] = (cur_loss, ids)
            with torch.no_grad():
                cands = sample_candidates(ids, grad, cfg.search_width, self.topk, cfg.n_replace,
                                          self.disallowed, generator)
                if cfg.filter_ids:
                    cands = filter_candidates(cands, tok)
                cands = torch.unique(cands, dim=0)  # each distinct candidate once
                same = (cands == ids).all(1)
                new = cands[~same]
                loss = torch.full((len(cands),), cur_loss, dtype=torch.float64)
                match = torch.full((len(cands),), cur_match, dtype=torch.bool)
                keep = ~same.cpu()
                if len(new) and self.draft is not None:
                    loss[keep], match[keep], scored, rho = self._probe_sample(new, ids, cache, probe_generator)
                    target_scored.append(int(scored.sum()))
                    agreement.append(rho)
                elif len(new):
                    loss[keep], match[keep] = self._evaluate(new, ids, cache, prune=True)
                    target_scored.append(len(new))
                    pruned.append(int(loss[keep].isinf().sum()))  # only pruning leaves a loss at inf here
            del cache
            if cfg.early_stop and match.any():
                best = int(torch.where(match, loss, torch.full_like(loss, math.inf)).argmin())
                stopped = True
            else:
                best = int(loss.argmin())
            step_loss, step_ids = float(loss[best]), cands[best]
            losses.append(step_loss)
            strings.append(tok.decode(step_ids.tolist()))
            if cfg.buffer_size == 0:  # plain GCG: always move to the step's best
                buffer = [(step_loss, step_ids)]
            elif step_loss < buffer[-1][0]:  # nanoGCG: enter the buffer by beating its worst
                kept = buffer if len(buffer) < cfg.buffer_size else buffer[:-1]
                buffer = sorted(kept + [(step_loss, step_ids)], key=lambda x: x[0])
            ids = buffer[0][1]
            step_seconds.append(time.perf_counter() - t_step)
            if stopped:
                break
        i = min(range(len(losses)), key=losses.__getitem__)
        return GCGResult(best_loss=losses[i], best_string=strings[i], losses=losses, strings=strings,
                         init_loss=init_loss, n_forward=self.n_forward - f0, n_backward=self.n_backward - b0,
                         seconds=round(time.perf_counter() - t0, 3), early_stopped=stopped,
                         step_seconds=step_seconds, target_scored=target_scored, probe_agreement=agreement,
                         pruned=pruned,
                         n_draft_forward=self.draft.n_forward - d0 if self.draft is not None else 0)


def _same_tokenizer(draft: Model, target: Model) -> Model:
    """``draft``, checked to share ``target``'s tokenizer (candidates pass between them as token ids)."""
    a, b = draft.tokenizer, target.tokenizer
    if len(a) != len(b) or a.get_vocab() != b.get_vocab() or a.all_special_ids != b.all_special_ids:
        raise InputError(f"probe sampling: the draft model {draft.name} does not share the tokenizer of {target.name} "
                         f"({len(a)} vs {len(b)} tokens, or other ids); choose a draft of the same family")
    return draft


def _contiguous_input(module, args, kwargs):
    """The kept target positions reach the vocabulary projection as a strided slice of the hidden states,
    which ``F.linear`` multiplies by a broadcast batched matmul at about a third of the speed of one
    matrix product (34 % of a step's time on the 0.5B model; BENCHMARKS.md): a 2 MB copy avoids it."""
    return (args[0].contiguous(), *args[1:]), kwargs


def _goal_target(behaviour: Behaviour | tuple[str, str]) -> tuple[str, str]:
    if isinstance(behaviour, Behaviour):
        return behaviour.goal, behaviour.target
    goal, target = behaviour
    return goal, target


def _draft(model: Model, config: GCGConfig, context: AttackContext | None, draft: Model | None) -> Model | None:
    """The probe-sampling draft: ``draft`` if given, else ``config.probe_sampling.draft`` loaded with the
    context's dtype and device (the target itself when the spec is its name), else None (off)."""
    if draft is not None or config.probe_sampling.draft is None:
        return draft
    return (context or AttackContext()).load(config.probe_sampling.draft, model)


def run_one(model: Model, behaviour: Behaviour | tuple[str, str], config: GCGConfig = GCGConfig(), *,
            progress: bool = True, context: AttackContext | None = None, draft: Model | None = None) -> GCGResult:
    """GCG on one behaviour or ``(goal, target)``; ``draft`` (or ``config.probe_sampling.draft``, loaded
    with ``context``) turns on probe sampling."""
    goal, target = _goal_target(behaviour)
    return GCG(model, config, progress=progress, draft=_draft(model, config, context, draft)).attack(goal, target)


def run(model: Model, behaviours: Sequence[Behaviour], config: GCGConfig = GCGConfig(), out_dir=None,
        *, judge: RefusalStringJudge | None = None,
        context: AttackContext | None = None, progress: bool = True, draft: Model | None = None) -> list[AttackRecord]:
    """GCG on each behaviour (resumable with ``out_dir``); the record's completion answers the best string.
    ``draft``: a loaded probe-sampling draft (else ``config.probe_sampling.draft`` is loaded with ``context``)."""
    if not behaviours:
        raise InputError("the behaviour set is empty: nothing to attack")
    attacker: list[GCG] = []  # built on first use: a fully resumed run never pays for the vocabulary scan

    def one(b: Behaviour) -> AttackRecord:
        t0 = time.perf_counter()
        if not attacker:
            attacker.append(GCG(model, config, progress=progress, draft=_draft(model, config, context, draft)))
        res = attacker[0].attack(b.goal, b.target)
        split = split_prompt(model, b.goal, b.target, config.placement)
        text = split.text(res.best_string)
        completion = generate(model, [text], max_new_tokens=config.max_new_tokens, batch_size=1, progress=False,
                              formatted=True)[0]
        optim_ids = model.tokenizer(res.best_string, add_special_tokens=False)["input_ids"]
        exact = model.tokenizer(text, add_special_tokens=False)["input_ids"] == \
            split.before_ids + optim_ids + split.after_ids
        return AttackRecord(
            attack="gcg", behaviour_id=b.id, goal=b.goal, target=b.target,
            prompt=user_message(b.goal, res.best_string, config.placement), completion=completion,
            history=[{"step": i + 1, "loss": loss, "string": s} for i, (loss, s) in enumerate(zip(res.losses, res.strings))],
            cost=AttackCost(forward=res.n_forward, backward=res.n_backward,
                            seconds=round(time.perf_counter() - t0, 3)),
            extra={"best_loss": res.best_loss, "best_string": res.best_string, "init_loss": res.init_loss,
                   "steps": len(res.losses), "early_stopped": res.early_stopped,
                   "optim_tokens": len(optim_ids), "prompt_tokenizes_as_optimized": exact,
                   "target_scored": res.target_scored}
            | ({"probe_agreement": res.probe_agreement, "draft_forward": res.n_draft_forward}
               if res.probe_agreement else {}))

    return run_attack("gcg", behaviours, one, config=config, out_dir=out_dir, judge=judge, progress=progress)
