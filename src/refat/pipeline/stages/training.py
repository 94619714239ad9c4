"""Training pairs from the base model (one set per distinct pair options), and one fine-tune per defense and seed."""

from __future__ import annotations

import copy
import gc
from pathlib import Path

from ...storage import read_jsonl
from ...training import Pair, PairsConfig, training_pairs
from ...training import train as train_model
from ..config import Subject


def pairs(ctx, folder: Path, *, pairs: PairsConfig, key: str | None) -> None:
    training_pairs(ctx.models.base(), ctx.cfg.data, pairs, ctx.layout.pairs_file(key))


def train(ctx, folder: Path, *, subject: Subject) -> None:
    pairs = [Pair(**r) for r in read_jsonl(ctx.layout.pairs_file(ctx.cfg.pairs_key(subject.defense)))]
    model = copy.deepcopy(ctx.models.base())  # training wraps the model it gets in adapters
    config = ctx.cfg.train_config(subject.defense, subject.seed)
    train_model(model, pairs, config, folder, resume=True)  # resumes a crashed stage
    del model
    gc.collect()
