"""Mechanism analysis: what attacks do to the refusal feature, layer by layer (Yu et al. 2025, §3).

The paper's claim is that jailbreaks work by suppressing the refusal feature r (difference of mean
harmful and harmless activations). Three measurements test it on any model:

- the *attack-induced direction* and its cosine with r at every layer: near 1 means the attack moves
  activations along −r, as RFA does. It is paired: the mean over behaviours of (a behaviour's clean
  activation − the mean of its attacked activations), over the behaviours with both; a clean prompt is
  never compared with an attack on another behaviour, whose own content would read as the attack's effect;
- the mean projection onto r̂ of harmless, harmful and each attacked-harmful set, per layer;
- a 2-D PCA at the selected layer, fitted on the clean sets, showing where attacked prompts land.

A fourth answers "is RFA what an optimised latent attack would do anyway?": a PGD perturbation
toward an affirmative target at one layer, and its cosine with RFA's edit −(h·r̂)r̂.

Activations are block inputs (resid_pre), as everywhere in refat; a "sample" is one (prompt,
position) pair, prompt-major. Means and projections are computed in float64.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import hooks
from .directions import Directions
from .generation import batched, forward_last_logits
from .losses import target_cross_entropy
from .models import Model
from .pgd import Ball, default_step, pgd
from .storage import atomic_path, write_json

__all__ = ["residuals", "projections", "induced_direction", "cosine_by_layer", "pca_2d", "paired_prompts",
           "LatentAttack", "pgd_latent_perturbation", "cosine_to_rfa", "AnalysisResult", "analyse"]

CLEAN_SETS = ("harmless", "harmful")


def _act_dtype(model: Model) -> torch.dtype:
    """Keep float64 models exact (tests); store anything else as float32 (bf16 would lose the small components)."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


@torch.no_grad()
def residuals(model: Model, prompts: Sequence[str], positions: Sequence[int] = (-1,),
              layers: Sequence[int] | None = None, *, batch_size: int = 32, progress: bool = True,
              desc: str = "residuals") -> Tensor:
    """Block-input residuals of chat-formatted ``prompts``: [n_prompts × len(positions), len(layers), d] on CPU.

    Rows are prompt-major (prompt 0 at every position, then prompt 1, ...); the layer axis follows
    ``layers`` sorted (all layers by default). Runs under whatever refat hooks are active, so an
    attack applied as a hook (e.g. ``hooks.ablate``) is seen by the capture.
    """
    if not prompts:
        raise ValueError("residuals needs at least one prompt")
    positions = list(positions)
    if not positions:
        raise ValueError("residuals needs at least one position")
    layer_ids = hooks._layers(model, layers)
    dtype = _act_dtype(model)

    def run(chunk: list[str]) -> list[Tensor]:
        with hooks.capture(model, layer_ids, positions=positions) as store:
            forward_last_logits(model, model.tokenize(chunk))
        x = torch.stack([store[l][0] for l in layer_ids], 1)  # [b, L, P, d]
        x = x.transpose(1, 2).reshape(-1, len(layer_ids), model.d_model)  # [b·P, L, d], prompt-major
        return list(x.to(device="cpu", dtype=dtype))

    return torch.stack(batched(run, list(prompts), batch_size, desc=desc, progress=progress))


def _check_acts(acts: Tensor, name: str) -> None:
    if acts.dim() != 3:
        raise ValueError(f"{name} must be [n, layers, d], got shape {tuple(acts.shape)}")
    if acts.shape[0] == 0:
        raise ValueError(f"{name} is empty (no samples)")


def projections(acts: Tensor, directions_per_layer: Tensor) -> Tensor:
    """Scalar projections h·r̂ₗ of every sample at every layer: [n, L] float64 (``directions``: [L, d] or [d])."""
    _check_acts(acts, "acts")
    r = directions_per_layer.double().to(acts.device)
    if r.shape[-1] != acts.shape[-1] or (r.dim() == 2 and r.shape[0] != acts.shape[1]) or r.dim() not in (1, 2):
        raise ValueError(f"directions of shape {tuple(r.shape)} do not match activations {tuple(acts.shape)}")
    return (acts.double() * hooks.unit(r)).sum(-1)


def _pairs(pairs: Sequence[int] | None, n_clean: int, n_attacked: int, name: str) -> Tensor:
    """``pairs`` checked as an index of clean rows, one per attacked row; None: attacked row i is clean row i."""
    if pairs is None:
        if n_attacked != n_clean:
            raise ValueError(f"{name}: {n_attacked} attacked rows for {n_clean} clean ones; without pairs (the clean "
                             "row each attacked row attacks) the attacked rows must be the clean ones', in order")
        return torch.arange(n_clean)
    idx = torch.as_tensor(list(pairs), dtype=torch.long)
    if idx.dim() != 1 or idx.numel() != n_attacked:
        raise ValueError(f"{name}: {idx.numel()} pairs for {n_attacked} attacked rows; give one clean row per attacked row")
    if n_attacked and (idx.min() < 0 or idx.max() >= n_clean):
        raise ValueError(f"{name}: pairs must index the {n_clean} clean rows, got {idx.min().item()}..{idx.max().item()}")
    return idx


def induced_direction(clean_acts: Tensor, attacked_acts: Tensor, pairs: Sequence[int] | None = None) -> Tensor:
    """The paired attack-induced direction per layer: [L, d] float64, the mean over behaviours of (clean activation
    − mean of its attacked activations).

    ``pairs[i]``: the row of ``clean_acts`` (the behaviour) that attacked row i attacks; several attacked rows may
    share one (a behaviour's template variants) and count once together. Clean rows no attacked row pairs with
    are left out. Default: attacked row i attacks clean row i. Positive cosine with r means the attack moves
    activations toward the harmless side, as RFA does.
    """
    _check_acts(clean_acts, "clean_acts")
    _check_acts(attacked_acts, "attacked_acts")
    if clean_acts.shape[1:] != attacked_acts.shape[1:]:
        raise ValueError(f"clean {tuple(clean_acts.shape)} and attacked {tuple(attacked_acts.shape)} activations "
                         "differ in layers or width")
    idx = _pairs(pairs, clean_acts.shape[0], attacked_acts.shape[0], "induced_direction").to(attacked_acts.device)
    clean, attacked = clean_acts.double(), attacked_acts.double()
    sums = torch.zeros_like(clean).index_add_(0, idx, attacked)
    counts = torch.bincount(idx, minlength=clean.shape[0])
    used = counts > 0
    return (clean[used] - sums[used] / counts[used, None, None]).mean(0)


def cosine_by_layer(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of matching rows of two [L, d] tensors: [L] float64; a zero row gives 0, not NaN."""
    if a.shape != b.shape:
        raise ValueError(f"cosine_by_layer needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    return (hooks.unit(a) * hooks.unit(b)).sum(-1)


def pca_2d(acts_at_layer: Tensor, labels: Sequence[str] | None = None, *,
           fit_labels: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
    """Coordinates on the first two principal components, [n, 2], and their explained-variance ratios, [2].

    Exact SVD of the centred data in float64, so the result is deterministic; each component's sign
    makes its largest-magnitude loading positive. With ``fit_labels`` the components (and the centre)
    are fitted on the samples carrying those labels only, and every sample is projected on them; the
    ratios are then of the fitted samples' variance.
    """
    x = acts_at_layer.double()
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"pca_2d needs [n ≥ 2, d] activations, got shape {tuple(x.shape)}")
    fit = x
    if fit_labels is not None:
        if labels is None or len(labels) != x.shape[0]:
            raise ValueError("fit_labels needs labels, one per sample")
        keep = torch.tensor([lab in set(fit_labels) for lab in labels])
        if int(keep.sum()) < 2:
            raise ValueError(f"fewer than 2 samples carry fit_labels {list(fit_labels)}")
        fit = x[keep]
    elif labels is not None and len(labels) != x.shape[0]:
        raise ValueError(f"{len(labels)} labels for {x.shape[0]} samples")
    centre = fit.mean(0)
    _, s, vh = torch.linalg.svd(fit - centre, full_matrices=False)
    comps = vh[:2]
    if comps.shape[0] < 2:  # d == 1: a second axis of zeros
        comps = torch.cat([comps, torch.zeros_like(comps)])
        s = torch.cat([s, torch.zeros(1, dtype=s.dtype)])
    pivot = comps.abs().argmax(1)
    signs = torch.sign(comps[torch.arange(2), pivot])
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs).unsqueeze(1)
    total = (s ** 2).sum()
    explained = s[:2] ** 2 / total if total > 0 else torch.zeros(2, dtype=torch.float64)
    return (x - centre) @ comps.T, explained


def paired_prompts(behaviour_ids: Sequence[str], attacked: Sequence[tuple[str, str]],
                   limit: int | None = None) -> tuple[list[str], list[int]]:
    """The attacked prompts of the behaviours in ``behaviour_ids`` and, per prompt, the index of its behaviour
    there: the ``attacked`` and ``pairs`` :func:`analyse` takes. ``attacked``: (behaviour id, prompt) per attacked
    prompt; those of other behaviours are left out (nothing to pair them with). At most ``limit`` prompts, taken
    round-robin (every behaviour's first prompt, then every one's second, ...) so as many behaviours as possible
    are paired; each behaviour's prompts keep their order."""
    row: dict[str, int] = {}
    for i, b in enumerate(behaviour_ids):
        row.setdefault(b, i)
    by_behaviour: dict[int, list[str]] = {}
    for b, prompt in attacked:
        if b in row:
            by_behaviour.setdefault(row[b], []).append(prompt)
    ranked = sorted(((k, i, p) for i, ps in by_behaviour.items() for k, p in enumerate(ps)), key=lambda t: t[:2])
    ranked = ranked[:limit] if limit is not None else ranked
    return [p for _, _, p in ranked], [i for _, i, _ in ranked]


# ---- latent PGD ---------------------------------------------------------------------------------------

@dataclass
class LatentAttack:
    """A PGD perturbation of block ``layer``'s input on the prompt tokens, and what it did to the target loss."""

    delta: Tensor  # [n, W, d] (W: longest chat-formatted prompt), zero outside each prompt
    clean: Tensor  # [n, W, d] the unperturbed activations there
    mask: Tensor  # [n, W] bool: prompt tokens
    layer: int
    eps: float  # per-token L2 budget, relative to each prompt's median token norm at ``layer``
    loss_before: Tensor  # [n] mean cross-entropy of the target tokens without / with the perturbation
    loss_after: Tensor


def _target_batch(model: Model, prompts: list[str], targets: list[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded prompt+target ids (prompts start at position 0, as hooks.perturb wants), labels on
    the target tokens only, and the prompt lengths."""
    tok = model.tokenizer
    rows, lengths = [], []
    for p, t in zip(prompts, targets):
        p_ids = tok(model.format(p), add_special_tokens=False)["input_ids"]
        t_ids = tok(t, add_special_tokens=False)["input_ids"]
        if not t_ids:
            raise ValueError(f"empty target for prompt {p[:60]!r}")
        rows.append((p_ids, t_ids))
        lengths.append(len(p_ids))
    width = max(len(p) + len(t) for p, t in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, t) in enumerate(rows):
        ids[i, :len(p) + len(t)] = torch.tensor(p + t)
        mask[i, :len(p) + len(t)] = 1
        labels[i, len(p):len(p) + len(t)] = torch.tensor(t)
    dev = model.device
    return ids.to(dev), mask.to(dev), labels.to(dev), torch.tensor(lengths, device=dev)


def pgd_latent_perturbation(model: Model, prompts: Sequence[str], targets: Sequence[str], layer: int,
                            eps: float = 0.5, steps: int = 16, *, step_size: float | None = None,
                            batch_size: int = 8, progress: bool = True) -> LatentAttack:
    """PGD on block ``layer``'s input toward ``targets`` (e.g. "Sure, here is ..."), as LAT's inner attack.

    The same :func:`refat.pgd.pgd` as training's adversarial perturbation (signed-gradient steps of L2
    length ``step_size`` per token, projection onto a per-token L2 ball, prompt tokens only), except
    that the budget is relative to each prompt's own median token norm and the loss is each prompt's
    mean, so a prompt's result does not depend on its batch.
    """
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"pgd_latent_perturbation needs one target per prompt, got {len(prompts)} prompts "
                         f"and {len(targets)} targets")
    if eps < 0 or steps < 1:
        raise ValueError("eps must be ≥ 0 and steps ≥ 1")
    layer = hooks._layers(model, [layer])[0]
    step_rel = step_size if step_size is not None else default_step(eps, steps)

    def run(chunk: list[tuple[str, str]]) -> list[tuple]:
        ids, attn, labels, lengths = _target_batch(model, [p for p, _ in chunk], [t for _, t in chunk])
        width = int(lengths.max())
        pmask = torch.arange(width, device=ids.device)[None] < lengths[:, None]  # [b, w]

        def target_ce() -> Tensor:  # [b]
            return target_cross_entropy(model.hf(input_ids=ids, attention_mask=attn).logits[:, :-1], labels[:, 1:])

        with torch.no_grad(), hooks.capture(model, [layer], positions=slice(0, width)) as store:
            before = target_ce()
        clean = store[layer][0]
        norms = clean.double().norm(dim=-1).masked_fill(~pmask, float("nan"))
        scale = norms.nanmedian(dim=1).values.to(clean.dtype)[:, None, None]  # [b, 1, 1]
        ball = Ball(step=step_rel * scale, radius=eps * scale, mask=pmask.unsqueeze(-1).to(clean.dtype))
        delta = torch.zeros_like(clean, requires_grad=True)

        def loss() -> Tensor:
            with hooks.perturb(model, {layer: delta}):
                return target_ce().sum()

        pgd(loss, [delta], [ball], steps)
        delta = delta.detach()
        with torch.no_grad(), hooks.perturb(model, {layer: delta}):
            after = target_ce()
        dt = _act_dtype(model)
        return [(delta[i].to("cpu", dt), clean[i].to("cpu", dt), pmask[i].cpu(), before[i].item(), after[i].item())
                for i in range(len(chunk))]

    out = batched(run, list(zip(prompts, targets)), batch_size, desc=f"latent PGD (layer {layer})", progress=progress)
    width = max(o[0].shape[0] for o in out)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[0]))  # noqa: E731
    return LatentAttack(delta=torch.stack([pad(o[0]) for o in out]), clean=torch.stack([pad(o[1]) for o in out]),
                        mask=torch.stack([torch.nn.functional.pad(o[2], (0, width - o[2].shape[0])) for o in out]),
                        layer=layer, eps=eps, loss_before=torch.tensor([o[3] for o in out], dtype=torch.float64),
                        loss_after=torch.tensor([o[4] for o in out], dtype=torch.float64))


def cosine_to_rfa(attack: LatentAttack, r: Tensor, *, reduce: bool = True) -> float | Tensor:
    """Cosine between the PGD perturbation δ and RFA's edit −(h·r̂)r̂ at each prompt token, averaged
    over prompts and tokens (``reduce``) or returned per token ([m] over tokens where both are non-zero).

    ``r``: [d] or per layer [n_layers, d] (then row ``attack.layer`` is used). 1 means PGD found exactly
    the RFA edit; values near 0 mean it uses other directions.
    """
    r = r[attack.layer] if r.dim() == 2 else r
    h, delta = attack.clean.double(), attack.delta.double()
    u = hooks.unit(r.double().to(h.device))
    rfa = -(h @ u).unsqueeze(-1) * u
    cos = (hooks.unit(delta) * hooks.unit(rfa)).sum(-1)
    valid = attack.mask & (delta.norm(dim=-1) > 0) & (rfa.norm(dim=-1) > 0)
    if not valid.any():
        raise ValueError("no prompt token with both a non-zero perturbation and a non-zero RFA edit")
    return cos[valid].mean().item() if reduce else cos[valid]


# ---- the analysis -------------------------------------------------------------------------------------

@dataclass
class AnalysisResult:
    """Per-layer geometry of the refusal feature under each attack. Lists are indexed by layer."""

    model: str
    layer: int  # the selected layer (PCA is taken there)
    position: int  # the post-instruction position activations are read at
    n_layers: int
    counts: dict[str, int]  # samples per set: harmless, harmful, each attack
    cosines: dict[str, list[float]]  # attack -> cos(induced direction, r) per layer
    induced_norms: dict[str, list[float]]  # attack -> |induced direction| per layer
    refusal_norms: list[float]  # |r| per layer
    projections: dict[str, list[float]]  # set -> mean h·r̂ per layer
    projection_std: dict[str, list[float]]
    pca: dict  # {"layer", "coords" [[x, y]], "labels", "explained" [2], "fit_on"}
    refusal: Tensor = field(repr=False)  # [L, d] the refusal feature per layer
    induced: dict[str, Tensor] = field(default_factory=dict, repr=False)  # attack -> [L, d]
    paired: dict[str, int] = field(default_factory=dict)  # attack -> behaviours its induced direction averages over
    min_paired: int = 1  # fewer paired behaviours than this: the attack's note says its numbers are thin
    notes: dict[str, str] = field(default_factory=dict)  # attack -> what a reader must know (few pairs, left out)
    ablation: dict | None = None  # the RFA set's ablation (attack label, direction, what was ablated)

    def info(self) -> dict:
        d = asdict(self)
        d.pop("refusal"), d.pop("induced")
        return {"schema": 2, **d}

    def save(self, out_dir: str | Path) -> Path:
        """``analysis.json`` (everything the report reads) and ``analysis.safetensors`` (r and the induced
        directions), each written atomically."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        tensors = {"refusal": self.refusal.contiguous()} | {f"induced/{k}": v.contiguous() for k, v in self.induced.items()}
        with atomic_path(out / "analysis.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(out / "analysis.json", self.info())
        return out

    @classmethod
    def load(cls, path: str | Path) -> "AnalysisResult":
        from safetensors.torch import load_file

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if not (folder / "analysis.json").is_file():
            raise FileNotFoundError(f"no analysis.json in {folder}")
        info = json.loads((folder / "analysis.json").read_text(encoding="utf-8"))
        info.pop("schema", None)
        tensors = load_file(str(folder / "analysis.safetensors")) if (folder / "analysis.safetensors").is_file() else {}
        if "refusal" not in tensors:
            raise FileNotFoundError(f"{folder / 'analysis.safetensors'} is missing or holds no refusal feature")
        induced = {k.removeprefix("induced/"): v for k, v in tensors.items() if k.startswith("induced/")}
        return cls(**info, refusal=tensors["refusal"], induced=induced)


def _finite(xs: Tensor) -> list[float]:
    return [float(x) if math.isfinite(float(x)) else None for x in xs]


def analyse(model: Model, directions: Directions | Tensor, harmful: Sequence[str], harmless: Sequence[str],
            attacked: Mapping[str, Sequence[str] | Tensor], *, pairs: Mapping[str, Sequence[int]] | None = None,
            min_paired: int = 1, layer: int | None = None, position: int | None = None,
            batch_size: int = 32, progress: bool = True) -> AnalysisResult:
    """Cosines of each attack's paired induced direction with r, projections onto r̂, and PCA, at every layer.

    ``directions``: a :class:`Directions` (its selected layer and position are the defaults) or an
    [n_layers, d] tensor (then ``layer`` is required). ``attacked`` maps an attack name to the attacked
    harmful prompts (user messages with suffix, template...), or to activations already taken with
    :func:`residuals` ([n, n_layers, d] at the same position) for attacks that are hooks (RFA, latent PGD).
    ``pairs[name][i]``: the index in ``harmful`` of the behaviour attacked prompt i attacks (see
    :func:`paired_prompts`); an attack without pairs must attack every ``harmful`` prompt, in order. An attack
    pairing fewer than ``min_paired`` behaviours gets a note saying so (its numbers are still given, with n).
    """
    if isinstance(directions, Directions):
        sel = directions.selection
        position = position if position is not None else (sel.position if sel else -1)
        layer = layer if layer is not None else (sel.layer if sel else None)
        r = directions.per_layer(position).double()
    else:
        r, position = directions.double(), -1 if position is None else position
    if layer is None:
        raise ValueError("analyse needs `layer` (the directions have no selection)")
    if r.shape != (model.n_layers, model.d_model):
        raise ValueError(f"directions must be [n_layers={model.n_layers}, d={model.d_model}], got {tuple(r.shape)}")
    layer = hooks._layers(model, [layer])[0]
    clash = set(attacked) & set(CLEAN_SETS)
    if clash:
        raise ValueError(f"attack name(s) {sorted(clash)} clash with the clean sets; rename them")
    pairs = dict(pairs or {})
    if set(pairs) - set(attacked):
        raise ValueError(f"pairs for attack(s) {sorted(set(pairs) - set(attacked))} not in attacked")
    index = {k: _pairs(pairs.get(k), len(harmful), len(v), k) for k, v in attacked.items()}  # before any forward
    sets: dict[str, Tensor] = {}
    for name, prompts in (("harmless", harmless), ("harmful", harmful), *attacked.items()):
        if isinstance(prompts, Tensor):
            if prompts.dim() != 3 or prompts.shape[1:] != (model.n_layers, model.d_model):
                raise ValueError(f"activations for {name!r} must be [n, {model.n_layers}, {model.d_model}], "
                                 f"got {tuple(prompts.shape)}")
            sets[name] = prompts.cpu()
        else:
            sets[name] = residuals(model, prompts, [position], batch_size=batch_size, progress=progress,
                                   desc=f"residuals ({name})")
    proj = {k: projections(v, r) for k, v in sets.items()}
    induced = {k: induced_direction(sets["harmful"], sets[k], index[k]) for k in attacked}
    paired = {k: len(set(v.tolist())) for k, v in index.items()}
    notes = {k: f"{n} paired behaviour{'s' * (n != 1)}, fewer than {min_paired}: its induced direction is noisy"
             for k, n in paired.items() if n < min_paired}
    labels = [k for k, v in sets.items() for _ in range(v.shape[0])]
    coords, explained = pca_2d(torch.cat([v[:, layer].double() for v in sets.values()]), labels,
                               fit_labels=CLEAN_SETS)
    return AnalysisResult(
        model=model.name, layer=layer, position=position, n_layers=model.n_layers,
        counts={k: v.shape[0] for k, v in sets.items()},
        cosines={k: _finite(cosine_by_layer(v, r)) for k, v in induced.items()},
        induced_norms={k: _finite(v.norm(dim=-1)) for k, v in induced.items()},
        refusal_norms=_finite(r.norm(dim=-1)),
        projections={k: _finite(p.mean(0)) for k, p in proj.items()},
        projection_std={k: _finite(p.std(0) if p.shape[0] > 1 else torch.zeros(p.shape[1])) for k, p in proj.items()},
        pca={"layer": layer, "coords": coords.tolist(), "labels": labels, "explained": explained.tolist(),
             "fit_on": list(CLEAN_SETS)},
        refusal=r, induced=induced, paired=paired, min_paired=min_paired, notes=notes)
