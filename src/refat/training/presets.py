"""The baselines as their authors define them: named sets of TrainConfig fields that turn ``cat`` and ``lat``
into Xhonneux et al.'s CAT and Sheshadri et al.'s (targeted) LAT, with their published settings.

A preset sets what makes the method: the attack (where, in what ball, how many and which steps, toward and away
from what) and the training objective (its terms, weights and floors) and CAT's batch mix. The training budget
(LoRA rank, learning rate, batch size, number of steps) stays the experiment's, shared by every defense it
compares; the authors' own values are listed beside the presets in docs/baselines.md, with the files they were
read from.

Reach a preset from an experiment YAML (``defenses: [{name: cat-paper, method: cat, preset: cat-paper}]``; the
defense's own ``train`` changes it further) or from Python (:func:`preset_config`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ..configs import ConfigError, from_dict

__all__ = ["PRESETS", "preset", "preset_config", "merge"]

PRESETS: dict[str, dict[str, Any]] = {
    # Xhonneux et al. 2024 (arXiv 2405.15589), sophie-xhonneux/Continuous-AdvTrain: config/adv_train_ul.yaml (CAT, the
    # "UL" trainer), src/embedding_attack.py (the attack), src/adversarial_training.py (the losses)
    "cat-paper": {
        "method": "cat",
        "harmful_share": 0.125,  # dataset.probabilities: 0.125 adversarial, 0.875 utility (UltraChat 200k there)
        "adversarial": {
            "layers": [0],  # init_type: instruction: the instruction's (and template's) token embeddings
            "scale": "embedding-mean", "epsilon": 0.05,  # eps: 0.05 x the mean L2 norm of the embedding matrix's rows
            "steps": 10, "optimizer": "sign", "lr": 1.0e-4,  # iters: 10; opt_config: {type: sign, lr: 1.0e-04}
            "away_weight": 0.0,  # the attack only pulls toward the harmful target
            "away_loss": "negative-ce", "away_cutoff": -5.0,  # away_loss_type: negative_cross_entropy, away_cutoff
            "toward_weight": 0.5, "toward_cutoff": 0.5,  # toward_weight, toward_cutoff
            "train_away_weight": 0.5,  # away_weight
            "utility_weight": 1.0,  # utility_weight
        },
    },
    # Sheshadri et al. 2024 (arXiv 2407.15549), aengusl/latent-adversarial-training: notebooks/jailbreaks.ipynb at
    # e9c1477 (the paper's Llama-3-8B-Instruct branch), latent_at/lat_methods.py and lat_helpers.py (the losses),
    # latent_at/laa/attacks.py (GDAdversary)
    "lat-paper": {
        "method": "lat",
        "adversarial": {
            # pgd_layers: ["embedding", 8, 16, 24, 30], each hooked at the output of layer i's MLP = the input of
            # block i + 1 here; written for Llama-3-8B's 32 layers and rescaled on other depths
            "layers": [0, 9, 17, 25, 31], "layers_depth": 32,
            "scale": "absolute", "epsilon": 6.0,  # epsilon: 6.0, a plain L2 norm per token at every layer
            "steps": 16, "optimizer": "adamw", "lr": 1.0e-3,  # pgd_iterations_per_step, inner_learning_rate
            "attack_completions": True,  # add_completions_pgd=True
            # adv_loss_coefs {toward: 0.5, away: 0.5} (normalised to sum 1): the harmful completion's
            # cross-entropy plus the refusal's log(1 - p), HarmBench's threshold -5
            "away_weight": 1.0, "away_loss": "unlikelihood", "away_cutoff": -5.0,
            # def_loss_coefs {kl: 0.1, toward: 0.5, away: 0.5}, normalised by their sum 1.1; no SFT term
            "toward_weight": 0.5 / 1.1, "train_away_weight": 0.5 / 1.1, "kl_weight": 0.1 / 1.1,
            "utility_weight": 0.0,
        },
    },
}


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` written over it, nested mappings merged key by key."""
    out = dict(base)
    for k, v in changes.items():
        out[k] = merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
    return out


def preset(name: str) -> dict[str, Any]:
    """The TrainConfig fields preset ``name`` sets (a fresh copy)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def preset_config(name: str, base=None, **changes: Any):
    """A TrainConfig: ``base`` (default: TrainConfig()) with preset ``name`` written over it, then ``changes``
    (TrainConfig fields; nested sections as mappings, merged key by key)."""
    from .trainer import TrainConfig

    data = merge(merge(asdict(base if base is not None else TrainConfig()), preset(name)), changes)
    return from_dict(TrainConfig, data, f"preset {name}")
