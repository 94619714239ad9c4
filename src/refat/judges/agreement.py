"""How well does a judge agree with people? JailbreakBench's human labels, agreement and threshold calibration.

:func:`judge_agreement` measures a judge against the 100 human-labelled responses JailbreakBench
ships (``classifier_comparison.csv``, majority of three annotators); :func:`published_agreement`
gives the same numbers for the judges whose verdicts it ships, the yardstick for a local judge; and
:func:`calibrate_threshold` fits a threshold (small chat judges rank well but are miscalibrated).
"""

from __future__ import annotations

import csv
import io
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..data import JBB, PackageFile, read_package_file
from ..stats import auc
from .base import Judge, check_pair

__all__ = ["LabelledResponse", "load_classifier_comparison", "agreement", "judge_agreement", "score_agreement",
           "published_agreement", "rank_auc", "calibrate_threshold"]

CLASSIFIER_COMPARISON = PackageFile(JBB, "jailbreakbench/data/classifier_comparison.csv")
REFERENCE_JUDGES = ("TDC", "GCG", "BERT", "llama_guard", "gpt_4_turbo", "gpt_4")


@dataclass(frozen=True)
class LabelledResponse:
    goal: str  # the harmful behaviour
    prompt: str  # the jailbreak prompt that was sent
    response: str
    human_majority: bool  # jailbroken, by at least two of three annotators
    humans: tuple[bool, ...]
    reference: dict[str, bool] = field(default_factory=dict)  # the published judges' verdicts (GCG, gpt_4, ...)


def load_classifier_comparison() -> list[LabelledResponse]:
    """JailbreakBench's 100 jailbreak responses with three human labels and six judges' verdicts."""
    text = read_package_file(CLASSIFIER_COMPARISON).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    need = {"goal", "prompt", "target_response", "human1", "human2", "human3", "human_majority"}
    missing = need - set(rows[0]) if rows else need
    if missing:
        raise ValueError(f"{CLASSIFIER_COMPARISON.path}: missing column(s) {', '.join(sorted(missing))}")

    def flag(v: str) -> bool:
        if v.strip() not in ("0", "1"):
            raise ValueError(f"{CLASSIFIER_COMPARISON.path}: expected a 0/1 label, got {v!r}")
        return v.strip() == "1"

    return [LabelledResponse(r["goal"], r["prompt"], r["target_response"], flag(r["human_majority"]),
                             tuple(flag(r[f"human{i}"]) for i in (1, 2, 3)),
                             {k: flag(r[k]) for k in REFERENCE_JUDGES if k in r})
            for r in rows]


def agreement(predicted: Sequence[bool], truth: Sequence[bool]) -> dict:
    """Accuracy, precision, recall, F1 ("jailbroken" is the positive class) and Cohen's kappa."""
    check_pair(len(predicted), len(truth))
    n = len(truth)
    if n == 0:
        raise ValueError("no labels to compare")
    tp = sum(p and t for p, t in zip(predicted, truth))
    fp = sum(p and not t for p, t in zip(predicted, truth))
    fn = sum(t and not p for p, t in zip(predicted, truth))
    tn = n - tp - fp - fn
    accuracy = (tp + tn) / n
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    p_yes = ((tp + fp) / n) * ((tp + fn) / n)
    p_no = ((tn + fn) / n) * ((tn + fp) / n)
    chance = p_yes + p_no
    kappa = (accuracy - chance) / (1 - chance) if not math.isclose(chance, 1.0) else None  # one class only
    return {"n": n, "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "cohen_kappa": kappa,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def judge_agreement(judge: Judge, rows: Sequence[LabelledResponse] | None = None, *,
                    behaviour_field: str = "goal") -> dict:
    """How often ``judge`` agrees with the human majority (default: JailbreakBench's 100 responses).

    The judge sees each row's ``goal`` as the behaviour (``behaviour_field="prompt"`` passes the
    jailbreak prompt that was actually sent, as JailbreakBench does for Llama Guard).
    """
    rows = load_classifier_comparison() if rows is None else list(rows)
    if behaviour_field not in ("goal", "prompt"):
        raise ValueError(f"behaviour_field must be 'goal' or 'prompt', got {behaviour_field!r}")
    scores = judge.scores([getattr(r, behaviour_field) for r in rows], [r.response for r in rows])
    return score_agreement(judge.name, scores, judge.threshold, [r.human_majority for r in rows])


def score_agreement(name: str, scores: Sequence[float], threshold: float, truth: Sequence[bool]) -> dict:
    """:func:`judge_agreement` from scores already computed (e.g. cached) by the judge called ``name``."""
    return {"judge": name, **agreement([s > threshold for s in scores], truth), "threshold": threshold,
            "auc": rank_auc(scores, truth), "scores": list(scores)}


def rank_auc(scores: Sequence[float], truth: Sequence[bool]) -> float | None:
    """P(a jailbroken row scores above a safe one), ties counting one half: whether the scores rank well
    even where the threshold is off. None with a single class."""
    pos = [s for s, t in zip(scores, truth) if t]
    neg = [s for s, t in zip(scores, truth) if not t]
    return auc(pos, neg) if pos and neg else None


def calibrate_threshold(scores: Sequence[float], truth: Sequence[bool], *, folds: int = 2, repeats: int = 20,
                        seed: int = 0) -> dict:
    """The threshold on ``scores`` with the best Cohen's κ against ``truth``, and what such a fitted
    threshold is worth on rows it never saw: ``folds``-fold cross-validation over ``repeats`` random
    splits (the in-sample κ of a threshold fitted on the same 100 rows flatters it)."""
    check_pair(len(scores), len(truth))
    scores, truth = [float(s) for s in scores], [bool(t) for t in truth]
    if len(set(truth)) < 2 or folds < 2 or len(truth) < 2 * folds:
        raise ValueError("calibration needs both labels and at least two rows per fold (folds >= 2)")

    def kappa(rows: Sequence[int], t: float) -> float:
        k = agreement([scores[i] > t for i in rows], [truth[i] for i in rows])["cohen_kappa"]
        return -1.0 if k is None else k

    def fit(rows: Sequence[int]) -> float:
        levels = sorted({scores[i] for i in rows})
        cuts = [(a + b) / 2 for a, b in zip(levels, levels[1:])] or levels
        return max(cuts, key=lambda t: kappa(rows, t))

    threshold = fit(range(len(scores)))
    rng, runs = random.Random(seed), []
    for _ in range(repeats):
        order = list(range(len(scores)))
        rng.shuffle(order)
        predicted = [False] * len(scores)
        for f in range(folds):
            held = set(order[f::folds])
            t = fit([i for i in order if i not in held])
            for i in held:
                predicted[i] = scores[i] > t
        runs.append(agreement(predicted, truth))
    kappas = [r["cohen_kappa"] if r["cohen_kappa"] is not None else 0.0 for r in runs]
    return {"threshold": threshold, "in_sample": agreement([s > threshold for s in scores], truth),
            "cross_validated": {"folds": folds, "repeats": repeats, "seed": seed,
                                "accuracy": statistics.fmean(r["accuracy"] for r in runs),
                                "cohen_kappa": statistics.fmean(kappas), "cohen_kappa_range": [min(kappas), max(kappas)]}}


def published_agreement(rows: Sequence[LabelledResponse] | None = None) -> list[dict]:
    """The same agreement for the judges whose verdicts JailbreakBench ships with the rows (GPT-4, Llama Guard,
    HarmBench's classifier as "TDC", ...): the yardstick a local judge is measured against."""
    rows = load_classifier_comparison() if rows is None else list(rows)
    truth = [r.human_majority for r in rows]
    return [{"judge": f"published:{name}", **agreement([r.reference[name] for r in rows], truth)}
            for name in REFERENCE_JUDGES if all(name in r.reference for r in rows)]
