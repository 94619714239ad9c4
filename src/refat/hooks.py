"""One place for residual-stream hooks: capture, ablate, add.

Every hook is an *edit* ``h -> h'`` of a residual-stream tensor at a block's input (or at the output
of a module that writes into the stream), restricted to chosen batch rows and positions, and
attached inside a context manager that removes it however the block exits. Edits never modify a
tensor in place, so they are safe under autograd (training applies RFA through these same hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from .errors import InputError
from .models import Model

__all__ = ["hooked", "capture", "ablate", "add", "ablate_hidden", "unit", "perturb", "AblationMode", "Positions", "Rows"]

AblationMode = Literal["project", "mean", "subtract"]
ABLATION_MODES = ("project", "mean", "subtract")
Positions = slice | Sequence[int] | None
Rows = Sequence[int] | Tensor | None
Edit = Callable[[Tensor, int], Tensor]  # (hidden [batch, seq, d], layer) -> edited hidden


@contextmanager
def hooked(pre: Sequence[tuple[nn.Module, Callable]] = (), post: Sequence[tuple[nn.Module, Callable]] = ()) -> Iterator[None]:
    """Attach forward pre-hooks and forward hooks (both ``with_kwargs``) for the duration of the block."""
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        for module, fn in post:
            handles.append(module.register_forward_hook(fn, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _mask(h: Tensor, rows: Rows, positions: Positions) -> Tensor | None:
    """A [batch, seq, 1] boolean mask of the entries to edit, or None for all of them."""
    if rows is None and positions is None:
        return None
    b, t = h.shape[0], h.shape[1]
    m = torch.ones(b, t, 1, dtype=torch.bool, device=h.device)
    if rows is not None:
        r = torch.as_tensor(rows, device=h.device)
        row_mask = r.bool() if r.dtype == torch.bool else torch.zeros(b, dtype=torch.bool, device=h.device).index_fill(0, r.long(), True)
        m &= row_mask.view(b, 1, 1)
    if positions is not None:
        p = torch.zeros(t, dtype=torch.bool, device=h.device)
        if isinstance(positions, slice):
            p[positions] = True
        else:
            idx = [i for i in positions if -t <= i < t]  # during cached decoding, positions may fall outside
            if idx:
                p[torch.tensor(idx, device=h.device)] = True
        m &= p.view(1, t, 1)
    return m


def _restricted(edit: Edit, rows: Rows, positions: Positions) -> Edit:
    def restricted(h: Tensor, layer: int) -> Tensor:
        m = _mask(h, rows, positions)
        new = edit(h, layer)
        return new if m is None else torch.where(m, new, h)
    return restricted


def _input_hook(edit: Edit, layer: int):
    def hook(module, args, kwargs):
        if args:
            return (edit(args[0], layer), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"], layer)}
    return hook


def _output_hook(edit: Edit, layer: int):
    def hook(module, args, kwargs, output):
        if isinstance(output, tuple):
            return (edit(output[0], layer), *output[1:])
        return edit(output, layer)
    return hook


def _per_layer(vectors: Tensor, model: Model) -> Callable[[int, Tensor], Tensor]:
    """Index a [d] or [n_layers, d] tensor by layer, cast to the activations' dtype and device once."""
    cache: dict = {}

    def get(layer: int, like: Tensor) -> Tensor:
        key = (layer if vectors.dim() == 2 else -1, like.dtype, like.device)
        if key not in cache:
            v = vectors[layer] if vectors.dim() == 2 else vectors
            cache[key] = v.to(device=like.device, dtype=like.dtype)
        return cache[key]
    if vectors.dim() not in (1, 2) or vectors.shape[-1] != model.d_model:
        raise ValueError(f"direction must have shape [d_model] or [n_layers, d_model] with d_model={model.d_model}, "
                         f"got {tuple(vectors.shape)}")
    return get


def _layers(model: Model, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(model.n_layers))
    bad = [l for l in layers if not -model.n_layers <= l < model.n_layers]
    if bad:
        raise InputError(f"layer(s) {bad} out of range for {model.name} with {model.n_layers} layers")
    return sorted({l % model.n_layers for l in layers})


def unit(v: Tensor) -> Tensor:
    """``v / |v|`` along the last dim; a zero vector stays zero (no NaN, no data-dependent branch)."""
    n = v.norm(dim=-1, keepdim=True)
    return v / torch.where(n > 0, n, torch.ones_like(n))


def _check_mode(mode: str, mean: Tensor | None) -> None:
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; use one of {ABLATION_MODES}")
    if mode == "mean" and mean is None:
        raise InputError("mode='mean' needs the harmless mean activation (Directions.harmless)")


def _ablation_terms(r: Tensor, mode: str, mean: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(r̂, r̂ r̂ᵀμ for ``mean`` mode): what the edit needs, computed once, not per forward call."""
    u = unit(r)
    return u, ((mean * u).sum(-1, keepdim=True) * u if mode == "mean" else None)


def _ablated(h: Tensor, r: Tensor, u: Tensor, mean_term: Tensor | None, mode: str) -> Tensor:
    if mode == "subtract":
        return h - r
    out = h - (h @ u).unsqueeze(-1) * u
    return out if mean_term is None else out + mean_term


def ablate_hidden(h: Tensor, r: Tensor, mode: AblationMode = "project", mean: Tensor | None = None) -> Tensor:
    """Refusal feature ablation of one activation tensor.

    ``project``: h - r̂ r̂ᵀh.  ``mean``: h - r̂ r̂ᵀh + r̂ r̂ᵀμ (μ: harmless mean).  ``subtract``: h - r.
    """
    _check_mode(mode, mean)
    return _ablated(h, r, *_ablation_terms(r, mode, mean), mode)


@contextmanager
def ablate(model: Model, direction: Tensor, *, mode: AblationMode = "project", layers: Sequence[int] | None = None,
           positions: Positions = None, rows: Rows = None, harmless_mean: Tensor | None = None) -> Iterator[None]:
    """Ablate ``direction`` from the residual stream inside the block.

    ``direction`` and ``harmless_mean`` are [d] or per layer [n_layers, d]. The edit applies at the
    input of each block in ``layers``; with ``layers=None`` and mode ``project`` it also applies to the
    output of every module that writes into the residual stream, which removes the direction from the
    whole stream (Arditi et al.) and equals weight orthogonalization. ``rows`` and ``positions``
    restrict the edit to some batch rows and sequence positions.
    """
    _check_mode(mode, harmless_mean)
    u, mean_term = _ablation_terms(direction.double(), mode, None if harmless_mean is None else harmless_mean.double())
    r_at, u_at = _per_layer(direction, model), _per_layer(u, model)
    m_at = _per_layer(mean_term, model) if mean_term is not None else None

    def edit(h: Tensor, layer: int) -> Tensor:
        return _ablated(h, r_at(layer, h), u_at(layer, h), m_at(layer, h) if m_at else None, mode)

    edit = _restricted(edit, rows, positions)
    pre = [(model.blocks[l], _input_hook(edit, l)) for l in _layers(model, layers)]
    post = []
    if layers is None and mode == "project":
        post = [(w, _output_hook(edit, l)) for l, ws in enumerate(model.writers) for w in ws]
    with hooked(pre, post):
        yield


@contextmanager
def add(model: Model, direction: Tensor, *, layers: Sequence[int], coeff: float = 1.0, positions: Positions = None,
        rows: Rows = None) -> Iterator[None]:
    """Add ``coeff * direction`` to the residual stream at the input of each block in ``layers``."""
    r_at = _per_layer(direction, model)
    edit = _restricted(lambda h, l: h + coeff * r_at(l, h), rows, positions)
    with hooked([(model.blocks[l], _input_hook(edit, l)) for l in _layers(model, layers)]):
        yield


@contextmanager
def perturb(model: Model, deltas: dict[int, Tensor], *, rows: Rows = None) -> Iterator[None]:
    """Add a per-token perturbation ``deltas[layer]`` ([batch, P, d], P ≤ seq) to the first P positions
    of block ``layer``'s input (layer 0: the embeddings). Adversarial training (CAT, LAT) uses it."""
    _layers(model, list(deltas))  # validates
    deltas = {l % model.n_layers: d for l, d in deltas.items()}

    def edit(h: Tensor, layer: int) -> Tensor:
        d = deltas[layer].to(h.dtype)
        pad = h.shape[1] - d.shape[1]
        if pad < 0:
            raise ValueError(f"perturbation covers {d.shape[1]} positions but the input has only {h.shape[1]}")
        return h + torch.nn.functional.pad(d, (0, 0, 0, pad))

    edit = _restricted(edit, rows, None)
    with hooked([(model.blocks[l], _input_hook(edit, l)) for l in deltas]):
        yield


@contextmanager
def capture(model: Model, layers: Sequence[int] | None = None, positions: Positions = None,
            detach: bool = True) -> Iterator[dict[int, list[Tensor]]]:
    """Record block-input residuals (resid_pre): yields ``{layer: [tensor per forward call]}``.

    Each tensor is [batch, len(positions) or seq, d]; with ``detach`` they carry no graph.
    """
    store: dict[int, list[Tensor]] = {l: [] for l in _layers(model, layers)}

    def record(h: Tensor, layer: int) -> Tensor:
        x = h if positions is None else h[:, positions]
        store[layer].append(x.detach() if detach else x)
        return h

    with hooked([(model.blocks[l], _input_hook(record, l)) for l in store]):
        yield store
