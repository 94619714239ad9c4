"""Weight orthogonalization: bake ``project`` ablation of one direction into the weights.

Every module that writes into the residual stream (token and position embeddings, and each block's
attention and MLP output projections) has its output made orthogonal to r̂, so the direction never
enters the stream: the edited model matches ``hooks.ablate(model, r)`` with no hooks attached, and
can be saved as an ordinary Hugging Face checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .models import Model
from .storage import atomic_dir

__all__ = ["orthogonalize", "save_orthogonalized"]


def _embeddings(model: Model) -> list[nn.Embedding]:
    """Input embeddings plus learned position embeddings (anything outside the blocks that writes d_model)."""
    inside = {id(m) for b in model.blocks for m in b.modules()}
    found = [model.hf.get_input_embeddings()]
    for m in model.hf.modules():
        if isinstance(m, nn.Embedding) and id(m) not in inside and m is not found[0] and m.embedding_dim == model.d_model:
            found.append(m)
    return found


@torch.no_grad()
def orthogonalize(model: Model, direction: Tensor) -> Model:
    """Edit ``model`` in place so no weight writes along ``direction`` (a [d_model] vector)."""
    if direction.dim() != 1 or direction.shape[0] != model.d_model:
        raise ValueError(f"orthogonalize takes one [d_model={model.d_model}] direction, got {tuple(direction.shape)}")
    d64 = direction.detach().to(torch.float64)  # normalise in float64: a float32 r̂ is not unit to 1e-8
    u = d64 / d64.norm()

    def out_rows(w: Tensor) -> None:  # rows live in the residual space: w [n, d]
        w64, uw = w.double(), u.to(w.device)  # directions live on the CPU; the model may not
        w.copy_(w64 - torch.outer(w64 @ uw, uw))

    out_emb = model.hf.get_output_embeddings()
    inp = model.hf.get_input_embeddings()
    if out_emb is not None and out_emb.weight is inp.weight:  # tied: untie before editing the input side
        out_emb.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
        model.hf.config.tie_word_embeddings = False
        if hasattr(model.hf.config, "get_text_config"):
            model.hf.config.get_text_config().tie_word_embeddings = False
    for emb in _embeddings(model):
        out_rows(emb.weight)
    for writers in model.writers:
        for w in writers:
            if isinstance(w, nn.Linear):  # weight [d_out = d, d_in]: project the output side
                out_rows(w.weight.T)
                if w.bias is not None:
                    out_rows(w.bias.unsqueeze(0))
            else:  # GPT-2 Conv1D: weight [d_in, d_out = d]
                out_rows(w.weight)
                if w.bias is not None:
                    out_rows(w.bias.unsqueeze(0))
    return model


def save_orthogonalized(model: Model, direction: Tensor, out_dir: str | Path) -> Path:
    """Orthogonalize ``model`` in place and save it with its tokenizer as a plain HF checkpoint."""
    with atomic_dir(out_dir, replace=False) as tmp:
        orthogonalize(model, direction)
        model.hf.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
    return Path(out_dir)
