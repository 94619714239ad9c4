"""A bigram "model" whose next-token logits are a table set by hand, so exact log-probabilities are known."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
from conftest import make_tokenizer
from torch import nn

from refat.models import Model


class Bigram(nn.Module):
    """logits[t] = table[token t]: every next-token distribution is set by hand."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(vocab, vocab, dtype=torch.float64), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0, **_):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def bigram_model() -> tuple[Model, Callable[[str, str, float], None]]:
    tok = make_tokenizer()
    tok.padding_side = "left"
    hf = Bigram(len(tok))
    model = Model(hf=hf, tokenizer=tok, name="bigram", blocks=nn.ModuleList([nn.Identity()]))

    def set_logit(after: str, nxt: str, value: float):
        (a,), (b,) = tok(after, add_special_tokens=False)["input_ids"], tok(nxt, add_special_tokens=False)["input_ids"]
        hf.table.data[a, b] = value
    return model, set_logit


def lp_uniform(model: Model, boosted: list[float] = ()) -> float:
    """log-prob of an unboosted token in a row where the given logits are raised (others 0)."""
    v = len(model.tokenizer)
    return -math.log(v - len(boosted) + sum(math.exp(b) for b in boosted))
