"""Refusal directions: difference of means per layer × post-instruction position, and selection.

Extraction follows the paper and Arditi et al.: block-input residuals at the tokens the chat
template puts after the instruction, means accumulated in float64, the harmless mean kept (RFA's
``mean`` mode needs it). Selection follows Arditi et al.: the candidate whose ablation lowers the
refusal score most on validation prompts, among those that barely move harmless predictions
(KL guard), whose addition induces refusal on harmless prompts, outside the last layers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import hooks
from .configs import at_least, require
from .data import PromptSets
from .errors import RefatError, RunError
from .generation import batched, forward_last_logits
from .models import Model, check_resumable, describe_identity, identity
from .prefix_cache import Work, mean_block_inputs
from .storage import FinishedRunError, atomic_path, digest, write_json

__all__ = ["Directions", "Selection", "SelectionConfig", "extract", "select", "refusal_token_ids", "refusal_scores",
           "mean_refusal_score", "REFUSAL_PHRASES", "DirectionsError", "DirectionsNotFoundError"]

class DirectionsError(RefatError, ValueError):
    """A file that holds no refusal directions."""


class DirectionsNotFoundError(DirectionsError, FileNotFoundError):
    pass


REFUSAL_PHRASES = ("I'm sorry", "I am sorry", "I apologize", "I cannot", "I can't", "Sorry", "As an AI",
                   "Unfortunately", "My apologies")


@dataclass
class Selection:
    layer: int
    position: int  # negative offset from the end of the prompt
    refusal_score: float  # mean refusal score on harmful validation prompts under ablation
    baseline_refusal_score: float  # the same without ablation
    kl: float  # mean KL(base || ablated) on harmless validation prompts
    induce_score: float  # mean refusal score on harmless validation prompts with the direction added
    candidates: list[dict] = field(default_factory=list)  # every candidate scored, with its filter verdicts


@dataclass
class Directions:
    """Harmful and harmless means, [n_positions, n_layers, d_model] float64, and the selected candidate."""

    harmful_mean: Tensor
    harmless_mean: Tensor
    positions: list[int]
    model: str
    n_harmful: int
    n_harmless: int
    selection: Selection | None = None
    meta: dict = field(default_factory=dict)

    @property
    def diff(self) -> Tensor:
        return self.harmful_mean - self.harmless_mean

    @property
    def n_layers(self) -> int:
        return self.diff.shape[1]

    def _index(self, position: int | None) -> int:
        if position is None:
            position = self._selected().position
        if position not in self.positions:
            raise ValueError(f"position {position} not among extracted positions {self.positions}")
        return self.positions.index(position)

    def _selected(self) -> Selection:
        if self.selection is None:
            raise ValueError("no direction selected yet: run directions.select or pass layer and position")
        return self.selection

    def vector(self, layer: int | None = None, position: int | None = None, *, unit: bool = False) -> Tensor:
        """The difference of means at (layer, position), by default the selected candidate, in float32."""
        layer = self._selected().layer if layer is None else layer
        v = self.diff[self._index(position), layer]
        return (hooks.unit(v) if unit else v).float()

    def per_layer(self, position: int | None = None, *, unit: bool = False) -> Tensor:
        """[n_layers, d] differences of means at one position (each layer its own feature, as ReFAT uses)."""
        v = self.diff[self._index(position)]
        return (hooks.unit(v) if unit else v).float()

    def harmless(self, position: int | None = None) -> Tensor:
        """[n_layers, d] harmless means at one position (for RFA's ``mean`` mode)."""
        return self.harmless_mean[self._index(position)].float()

    def save(self, out_dir: str | Path) -> Path:
        """Write ``directions.safetensors`` (means) and ``directions.json`` (metadata), each atomically."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        info = self.info()
        with atomic_path(out / "directions.safetensors") as tmp:
            save_file({"harmful_mean": self.harmful_mean.contiguous(), "harmless_mean": self.harmless_mean.contiguous()},
                      str(tmp), metadata={"refat": json.dumps(info)})
        write_json(out / "directions.json", info)
        return out

    def info(self) -> dict:
        return {"model": self.model, "positions": self.positions, "n_harmful": self.n_harmful,
                "n_harmless": self.n_harmless, "n_layers": self.n_layers, "d_model": self.diff.shape[-1],
                "selection": asdict(self.selection) if self.selection else None, "meta": self.meta}

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        file = path / "directions.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise DirectionsNotFoundError(f"no directions at {file}: pass the folder `refat directions --out` wrote")
        try:
            with safe_open(str(file), framework="pt") as f:
                info = json.loads((f.metadata() or {})["refat"])
                harmful, harmless = f.get_tensor("harmful_mean"), f.get_tensor("harmless_mean")
            sel = info.get("selection")
            return cls(harmful, harmless, info["positions"], info["model"], info["n_harmful"], info["n_harmless"],
                       Selection(**sel) if sel else None, info.get("meta", {}))
        except (SafetensorError, KeyError, TypeError, ValueError) as e:  # a model's weights, another file, an old format
            raise DirectionsError(f"{file} holds no refusal directions (not written by `refat directions`: "
                                  f"{type(e).__name__}: {e})") from None


def extract(model: Model, harmful: Sequence[str], harmless: Sequence[str], *, positions: list[int] | None = None,
            batch_size: int = 32, progress: bool = True, share_prefix: bool = False,
            work: Work | None = None) -> Directions:
    """Difference of means of block-input residuals, every layer × every post-instruction position.

    ``share_prefix``: run the chat template's common prefix once (:mod:`refat.prefix_cache`; equal up
    to float rounding, fewer tokens); ``work`` counts what was fed to the model.
    """
    if not harmful or not harmless:
        raise DirectionsError("extract needs non-empty harmful and harmless prompt sets")
    positions = positions or model.post_instruction_positions
    mu_harmful, mu_harmless = (
        mean_block_inputs(model, prompts, positions, batch_size=batch_size, share_prefix=share_prefix,
                          desc=f"activations ({kind})", progress=progress, work=work)
        for kind, prompts in (("harmful", harmful), ("harmless", harmless)))
    return Directions(mu_harmful, mu_harmless, list(positions), model.name, len(harmful), len(harmless))


def refusal_token_ids(model: Model, phrases: Sequence[str] = REFUSAL_PHRASES) -> list[int]:
    """First tokens of typical refusals, in this model's own tokenizer."""
    ids = set()
    for p in phrases:
        toks = model.tokenizer(p, add_special_tokens=False)["input_ids"]
        if toks:
            ids.add(toks[0])
    return sorted(ids)


def refusal_scores(logits: Tensor, refusal_ids: Sequence[int], eps: float = 1e-8) -> Tensor:
    """Log-odds that the first answer token starts a refusal (Arditi et al.), per prompt."""
    probs = logits.double().softmax(-1)
    p = probs[:, list(refusal_ids)].sum(-1)
    return torch.log(p + eps) - torch.log(1 - p + eps)


@dataclass
class SelectionConfig:
    kl_threshold: float = 0.1  # discard candidates whose ablation moves harmless predictions more
    induce_refusal_threshold: float = 0.0  # adding the direction must push harmless refusal score above this
    prune_layer_fraction: float = 0.2  # ignore the last 20 % of layers
    screen_prompts: int | None = None  # score every candidate on this many prompts first...
    screen_keep: int = 16  # ...and rescore only the best this many on all of them
    layers: list[int] | None = None  # candidate layers (default: all, before pruning)
    positions: list[int] | None = None  # candidate positions (default: all extracted)
    batch_size: int = 32

    def __post_init__(self):
        require(0 <= self.prune_layer_fraction < 1, "prune_layer_fraction",
                f"must be in [0, 1), got {self.prune_layer_fraction}")
        at_least(self, 1, "screen_prompts", "screen_keep", "batch_size")
        require(all(l >= 0 for l in self.layers or ()), "layers", f"must be >= 0, got {self.layers}")
        require(all(p < 0 for p in self.positions or ()), "positions",
                f"must be negative offsets from the end, got {self.positions}")


@torch.no_grad()
def _last_logits(model: Model, prompts: Sequence[str], batch_size: int) -> Tensor:
    chunks = batched(lambda c: [forward_last_logits(model, model.tokenize(c)).float().cpu()], list(prompts),
                     batch_size, progress=False)
    return torch.cat(chunks)


def mean_refusal_score(model: Model, prompts: Sequence[str], refusal_ids: Sequence[int], batch_size: int = 32) -> float:
    """Mean first-token refusal score of ``prompts`` under whatever hooks are active: the cheap screen that
    ranks candidate ablations (selection here, the worst-case RFA sweep in :mod:`refat.attacks.rfa_sweep`)."""
    return refusal_scores(_last_logits(model, prompts, batch_size), refusal_ids).mean().item()


def select(model: Model, directions: Directions, harmful_val: Sequence[str], harmless_val: Sequence[str],
           config: SelectionConfig = SelectionConfig()) -> Selection:
    """Choose the (layer, position) candidate as Arditi et al. do; stores and returns the :class:`Selection`."""
    if not harmful_val or not harmless_val:
        raise DirectionsError("select needs non-empty harmful and harmless validation prompts")
    ref_ids = refusal_token_ids(model)
    bs = config.batch_size

    def score(prompts, **ablation) -> float:
        with hooks.ablate(model, **ablation):
            return mean_refusal_score(model, prompts, ref_ids, bs)

    base_harmful = mean_refusal_score(model, harmful_val, ref_ids, bs)
    base_harmless_logp = _last_logits(model, harmless_val, bs).double().log_softmax(-1)
    max_layer = int(model.n_layers * (1 - config.prune_layer_fraction))
    cands = [{"layer": l, "position": p} for p in (config.positions or directions.positions)
             for l in (config.layers if config.layers is not None else range(model.n_layers))]
    for c in cands:
        c["pruned"] = c["layer"] >= max_layer
    live = [c for c in cands if not c["pruned"]]
    if not live:
        raise DirectionsError("every layer pruned: lower prune_layer_fraction")
    full = list(harmful_val)
    screen = bool(config.screen_prompts) and config.screen_prompts < len(full)
    key = "screen_score" if screen else "refusal_score"
    for c in tqdm(live, desc=f"scoring candidates ({config.screen_prompts if screen else len(full)} prompts)", leave=False):
        c[key] = score(full[:config.screen_prompts] if screen else full, direction=directions.vector(c["layer"], c["position"]))
    live.sort(key=lambda c: c[key])
    if screen:  # rescore the best on every prompt; the rest keep their screening order behind them
        head = live[:config.screen_keep]
        for c in tqdm(head, desc=f"rescoring best {len(head)} ({len(full)} prompts)", leave=False):
            c["refusal_score"] = score(full, direction=directions.vector(c["layer"], c["position"]))
        live = sorted(head, key=lambda c: c["refusal_score"]) + live[config.screen_keep:]
    for c in live:  # best first: the first to pass both filters is the selection
        v = directions.vector(c["layer"], c["position"])
        if "refusal_score" not in c:
            c["refusal_score"] = score(full, direction=v)
        with hooks.ablate(model, v):
            logp = _last_logits(model, harmless_val, bs).double().log_softmax(-1)
        c["kl"] = (base_harmless_logp.exp() * (base_harmless_logp - logp)).sum(-1).mean().item()
        verdict = f"layer {c['layer']:>2} position {c['position']}: refusal score {c['refusal_score']:.2f}, KL {c['kl']:.3f}"
        if c["kl"] > config.kl_threshold:
            tqdm.write(f"refat: {verdict} > {config.kl_threshold}: rejected", file=sys.stderr)
            continue
        with hooks.add(model, v, layers=[c["layer"]]):
            c["induce_score"] = mean_refusal_score(model, harmless_val, ref_ids, bs)
        verdict += f", induced refusal score {c['induce_score']:.2f}"
        if c["induce_score"] <= config.induce_refusal_threshold:
            tqdm.write(f"refat: {verdict} ≤ {config.induce_refusal_threshold}: rejected", file=sys.stderr)
            continue
        tqdm.write(f"refat: {verdict}: selected", file=sys.stderr)
        directions.selection = Selection(c["layer"], c["position"], c["refusal_score"], base_harmful, c["kl"],
                                         c["induce_score"], cands)
        return directions.selection
    best = "; ".join(f"layer {c['layer']} pos {c['position']}: score {c['refusal_score']:.2f}, KL {c['kl']:.3f}"
                     + (f", induced {c['induce_score']:.2f}" if "induce_score" in c else "") for c in live[:6])
    raise RunError(f"no candidate direction passed the filters (KL ≤ {config.kl_threshold}, induced refusal "
                       f"score > {config.induce_refusal_threshold}); best candidates: {best}. Relax kl_threshold / "
                       "induce_refusal_threshold or use more extraction prompts")


def _check_same_model(saved: Directions, model: Model, model_identity: dict, out_dir: str | Path) -> None:
    """Directions of this model, or of the model at the same place (spec and adapter) whose weights have since
    changed, may be replaced by new ones; another model's are refused."""
    stored = saved.meta.get("model_identity")
    if stored == model_identity:
        return
    same_place = (saved.model == model.name
                  and saved.meta.get("model_source", {}).get("adapter") == model.source.get("adapter"))
    if same_place:
        print(f"refat: the weights of {model.name} changed since the directions in {out_dir} were found "
              f"({describe_identity(stored)}, now {describe_identity(model_identity)}); extracting anew", file=sys.stderr)
        return
    raise FinishedRunError(f"{out_dir} holds the directions of another model ({saved.model}: {describe_identity(stored)}; "
                           f"this run: {model.name}: {describe_identity(model_identity)}); pass --overwrite to replace "
                           "them or choose another --out")


def find_directions(model: Model, sets: PromptSets, selection: SelectionConfig, out_dir: str | Path | None = None,
                    *, batch_size: int = 32) -> Directions:
    """Extract on the train split and select on the val split. Each step is saved as it finishes and
    reused when its inputs are unchanged: a new selection config reuses the extraction. Saved work is keyed by
    the model's :func:`~refat.models.identity` (its weights' sha256, adapter, dtype, device), so new weights
    at the same path are extracted anew; a folder holding another model's directions is refused."""
    model_identity = identity(model)
    extract_key = digest([model_identity, sets.prompts("harmful", "train"), sets.prompts("harmless", "train")])
    select_key = digest([extract_key, sets.prompts("harmful", "val"), sets.prompts("harmless", "val"),
                         asdict(selection)])
    d = None
    if out_dir is not None and (Path(out_dir) / "directions.safetensors").exists():
        saved = Directions.load(out_dir)
        _check_same_model(saved, model, model_identity, out_dir)
        if saved.meta.get("extract_fingerprint") == extract_key:
            check_resumable(model, out_dir)
            if saved.selection is not None and saved.meta.get("select_fingerprint") == select_key:
                print(f"refat: reusing directions in {out_dir} (same model, data and selection config)", file=sys.stderr)
                return saved
            print(f"refat: reusing the extraction in {out_dir}; selecting anew", file=sys.stderr)
            d, d.selection = saved, None
    if d is None:
        t0 = time.perf_counter()
        d = extract(model, sets.prompts("harmful", "train"), sets.prompts("harmless", "train"), batch_size=batch_size)
        d.meta = {"extract_fingerprint": extract_key, "model_source": model.source, "model_identity": model_identity,
                  "seconds": {"extract": round(time.perf_counter() - t0, 1)}}
        if out_dir is not None:
            d.save(out_dir)
    t0 = time.perf_counter()
    select(model, d, sets.prompts("harmful", "val"), sets.prompts("harmless", "val"), selection)
    d.meta |= {"select_fingerprint": select_key, "selection_config": asdict(selection)}
    d.meta["seconds"] = d.meta.get("seconds", {}) | {"select": round(time.perf_counter() - t0, 1)}
    if out_dir is not None:
        d.save(out_dir)
    return d
