"""Refusal directions: the base model's (defender-style selection) and each defended model's own."""

from __future__ import annotations

import math
from pathlib import Path

from ...directions import Directions, SelectionConfig, find_directions
from ..config import Subject


def base(ctx, folder: Path) -> None:
    selection = ctx.cfg.selection
    find_directions(ctx.models.base(), ctx.inputs.sets, selection, folder, batch_size=selection.batch_size)


def adaptive(ctx, folder: Path, *, subject: Subject) -> None:
    """The defended model's own refusal features: every layer × position candidate (what worst-case RFA
    sweeps), with the selection forced to the base model's layer and position (selected-direction RFA's
    reference)."""
    sel = Directions.load(ctx.layout.directions("base")).selection
    batch_size = ctx.cfg.selection.batch_size
    forced = SelectionConfig(kl_threshold=math.inf, induce_refusal_threshold=-math.inf, prune_layer_fraction=0.0,
                             layers=[sel.layer], positions=[sel.position], batch_size=batch_size)
    find_directions(ctx.models.get(subject), ctx.inputs.sets, forced, folder, batch_size=batch_size)
