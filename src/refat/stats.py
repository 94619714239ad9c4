"""Uncertainty for every reported rate: Wilson and bootstrap intervals, paired differences, spread over seeds.

An ASR of 36 % on 50 behaviours is anything from about 24 % to 50 %; a cell that shows no n and no
interval invites reading noise as an effect. Pure Python (``random``, ``statistics``): deterministic
given a seed, no numpy.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["wilson", "bootstrap", "paired_bootstrap", "paired_difference", "Rate", "Spread", "rate", "clustered_rate",
           "mean_sd", "spread", "ranks", "spearman"]


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for ``k`` successes in ``n`` trials: unlike the normal approximation it stays inside
    [0, 1] and is not zero-width at 0/n or n/n, where attack and refusal rates often sit."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    z2 = _z(confidence) ** 2
    p = k / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2) / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values: Sequence[float] | Sequence[bool], statistic: Callable[[Sequence[float]], float] = statistics.fmean,
              n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over items (e.g. behaviours): resample the items with
    replacement ``n_resamples`` times and take the central ``confidence`` share of the statistic's values.
    For any statistic, not only proportions (a mean score, a difference); the same seed gives the same interval."""
    _z(confidence)
    values = [float(v) for v in values]
    if not values or n_resamples < 1:
        raise ValueError("bootstrap needs at least one value and one resample")
    rng = random.Random(seed)
    return _percentiles([statistic(rng.choices(values, k=len(values))) for _ in range(n_resamples)], confidence)


def _percentiles(stats: list[float], confidence: float) -> tuple[float, float]:
    """The central ``confidence`` share of a bootstrap's statistics: its percentile interval."""
    stats, tail = sorted(stats), (1 - confidence) / 2
    return stats[int(tail * len(stats))], stats[max(0, math.ceil((1 - tail) * len(stats)) - 1)]


def paired_bootstrap(a: Sequence[float] | Sequence[bool], b: Sequence[float] | Sequence[bool], n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(a) - mean(b) for paired outcomes (the same behaviours under two models or attacks),
    resampling pairs: the pairing removes the behaviours' shared difficulty, so it is narrower than two
    separate intervals suggest."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length, got {len(a)} and {len(b)}")
    return bootstrap([float(x) - float(y) for x, y in zip(a, b)], n_resamples=n_resamples, confidence=confidence,
                     seed=seed)


@dataclass(frozen=True)
class Rate:
    """A proportion with its sample size and 95 % interval: what every ASR / refusal cell shows."""

    value: float
    n: int
    ci: tuple[float, float]

    def to_dict(self) -> dict:
        return {"value": self.value, "n": self.n, "ci": list(self.ci)}

    def format(self) -> str:
        """E.g. ``36 % [24, 50] (n=50)``: percentages, rounded to whole points."""
        lo, hi = self.ci
        return f"{100 * self.value:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}] (n={self.n})"


def rate(flags: Sequence[bool], method: str = "wilson") -> Rate:
    """The share of true ``flags`` with a Wilson (default) or percentile-bootstrap interval."""
    if method not in ("wilson", "bootstrap"):
        raise ValueError(f"method must be 'wilson' or 'bootstrap', got {method!r}")
    n, k = len(flags), sum(bool(f) for f in flags)
    if n == 0:
        raise ValueError("no flags to rate")
    return Rate(k / n, n, wilson(k, n) if method == "wilson" else bootstrap(flags))


def clustered_rate(units: Sequence[Sequence[bool]], n_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> Rate:
    """The share of true flags over all records, with a percentile-bootstrap interval that resamples whole
    units (a behaviour with all its template variants): records of one behaviour are not independent, so
    resampling them singly would give too narrow an interval. ``n`` is the number of units."""
    units = [[bool(f) for f in u] for u in units]
    if not units or not all(units):
        raise ValueError("clustered_rate needs at least one unit and no empty unit")
    hits, sizes = [sum(u) for u in units], [len(u) for u in units]

    def share(indices: Sequence[float]) -> float:  # bootstrap resamples the units' indices
        return sum(hits[int(i)] for i in indices) / sum(sizes[int(i)] for i in indices)

    ci = bootstrap(range(len(units)), share, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return Rate(sum(hits) / sum(sizes), len(units), ci)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) over seeds; the sd of one value is 0."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Spread:
    """A result's mean and sample standard deviation over training seeds: how much it moves with the seed
    (each seed's own cell keeps its interval over items)."""

    mean: float
    sd: float
    n: int  # seeds

    def to_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "seeds": self.n}

    def format(self) -> str:
        """E.g. ``36 ± 4 % (3 seeds)``: percentages, rounded to whole points."""
        return f"{100 * self.mean:.0f} ± {100 * self.sd:.0f} % ({self.n} seeds)"


def spread(values: Sequence[float]) -> Spread:
    """:func:`mean_sd` of one result over seeds, with the number of seeds."""
    return Spread(*mean_sd(values), len(values))


def paired_difference(a: Mapping[str, float | bool], b: Mapping[str, float | bool], n_resamples: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> Rate:
    """mean(a) - mean(b) over the same items, matched by key (a prompt, a question id), with the
    :func:`paired_bootstrap` interval: e.g. a defended model's refusals minus the base model's on the same
    prompts. A :class:`Rate` whose value is a difference in [-1, 1]. The item sets must be equal: a difference
    over partly different items would mix the models' effect with the items'."""
    if set(a) != set(b):
        raise ValueError(f"paired outcomes need the same items: {len(set(a) - set(b))} only in the first, "
                         f"{len(set(b) - set(a))} only in the second")
    if not a:
        raise ValueError("no paired outcomes")
    keys = sorted(a)  # the interval does not depend on the mappings' order
    xs, ys = [float(a[k]) for k in keys], [float(b[k]) for k in keys]
    return Rate(statistics.fmean(xs) - statistics.fmean(ys), len(keys),
                paired_bootstrap(xs, ys, n_resamples=n_resamples, confidence=confidence, seed=seed))


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank (as Spearman's correlation needs)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(a positive scores above a negative), ties counting one half (Mann-Whitney, from ranks: O(n log n))."""
    if not positive or not negative:
        raise ValueError("the AUC needs at least one positive and one negative score")
    r = ranks(list(positive) + list(negative))
    n_pos = len(positive)
    return (sum(r[:n_pos]) - n_pos * (n_pos + 1) / 2) / (n_pos * len(negative))


def auc_interval(positive: Sequence[float], negative: Sequence[float], n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auc`, each class resampled apart (stratified: every resample keeps
    both classes and their sizes)."""
    _z(confidence)
    rng = random.Random(seed)
    return _percentiles([auc(rng.choices(positive, k=len(positive)), rng.choices(negative, k=len(negative)))
                         for _ in range(n_resamples)], confidence)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's of the tie-averaged ranks); 0 where it is undefined
    (fewer than two values, or all of one side equal): no evidence of agreement either way."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    ra, rb = ranks(a), ranks(b)
    if len(a) < 2 or len(set(ra)) < 2 or len(set(rb)) < 2:
        return 0.0
    return statistics.correlation(ra, rb)


def pareto_front(points: Mapping[str, Sequence[float]], maximize: Sequence[bool]) -> set[str]:
    """The names whose point no other point dominates (at least as good on every objective, better on one);
    ``maximize[i]`` says whether objective i is better high. Points with a missing (None) objective are left out."""
    sign = [1.0 if m else -1.0 for m in maximize]
    pts = {k: [s * v for s, v in zip(sign, p)] for k, p in points.items() if all(v is not None for v in p)}
    return {k for k, p in pts.items()
            if not any(all(b >= a for a, b in zip(p, q)) and any(b > a for a, b in zip(p, q))
                       for j, q in pts.items() if j != k)}
