"""Training pairs from the base model, and one fine-tune per defense."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

from ...storage import read_jsonl
from ...training import Pair, training_pairs
from ...training import train as train_model


def pairs(ctx, folder: Path) -> None:
    training_pairs(ctx.models.base(), ctx.cfg.data, ctx.cfg.pairs, ctx.layout.pairs_file)


def train(ctx, folder: Path, *, defense: str) -> None:
    pairs = [Pair(**r) for r in read_jsonl(ctx.layout.pairs_file)]
    model = copy.deepcopy(ctx.models.base())  # training wraps the model it gets in adapters
    train_model(model, pairs, ctx.cfg.train_config(defense), folder, resume=True)  # resumes a crashed stage
    del model
    gc.collect()
