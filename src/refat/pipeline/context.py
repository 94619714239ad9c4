"""What every stage body gets: the config, the checked inputs, the run's layout and the models."""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configs import ConfigError
from ..judges import Judge
from ..models import Model, load, merge_adapter, wrap
from .config import ExperimentConfig, Subject
from .inputs import Inputs
from .layout import Layout

__all__ = ["Context", "Models", "defended_model"]

log = logging.getLogger("refat.pipeline")


def defended_model(base: Model, train_dir: Path, defense: str) -> Model:
    """The trained model of ``train_dir``: its LoRA adapter merged into a copy of the base (or the full model)."""
    if (train_dir / "model").is_dir():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(train_dir / "model", dtype=base.dtype).to(base.device)
    else:
        hf = merge_adapter(copy.deepcopy(base.hf), train_dir / "adapter")
    hf.eval()
    hf.requires_grad_(False)
    model = wrap(hf, base.tokenizer, name=f"{base.name}+{defense}", system_prompt=base.system_prompt,
                 max_prompt_tokens=base.max_prompt_tokens)
    model.source = {**base.source, "defense": defense, "trained": str(train_dir)}
    return model


class Models:
    """Loads the base model on first use (a fully skipped run loads nothing) and one defended model at a time."""

    def __init__(self, cfg: ExperimentConfig, layout: Layout, given: Model | None):
        self.cfg, self.layout, self._base, self._current = cfg, layout, given, (None, None)
        self._checked, self._owns_base = False, given is None

    def base(self) -> Model:
        if self._base is None:
            log.info("loading %s (%s)", self.cfg.model, self.cfg.dtype)
            self._base = load(self.cfg.model, dtype=self.cfg.dtype, device=self.cfg.device,
                              revision=self.cfg.model_revision)
        if not self._checked:  # layer indices need the model: checked before any training starts
            for d in self.cfg.variants:
                try:
                    if d.method != "base":
                        self.cfg.train_config(d).validate(self._base.n_layers)
                except ValueError as e:
                    raise ConfigError(f"train ({d.name}): {e}") from None
            self._checked = True
        return self._base

    def get(self, subject: Subject) -> Model:
        """The model under test (the previous defended model is freed first)."""
        if subject.seed is None:
            return self.base()
        if self._current[0] != subject.key:
            self.release()
            self._current = (subject.key, defended_model(self.base(), self.layout.train(subject.key), subject.key))
        return self._current[1]

    def release(self, *, base: bool = False) -> None:
        """Drop the defended model (and with ``base``, the base model this object loaded itself)."""
        self._current = (None, None)
        if base and self._owns_base:
            self._base = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass
class Context:
    cfg: ExperimentConfig
    inputs: Inputs
    layout: Layout
    models: Models
    attack_judge: Judge  # stamps the attacks' own records (ExperimentConfig.attack_judge)
