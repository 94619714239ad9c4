"""Intervals for reported rates: Wilson against textbook values, bootstrap behaviour, Rate formatting."""

from __future__ import annotations

import statistics

import pytest

from refat.stats import Rate, bootstrap, mean_sd, paired_bootstrap, pareto_front, rate, wilson


@pytest.mark.parametrize("k, n, expected", [(0, 10, (0.0, 0.27753)), (5, 10, (0.23659, 0.76341)),
                                            (10, 10, (0.72247, 1.0))])
def test_wilson_known_values(k, n, expected):
    assert wilson(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_confidence_and_errors():
    assert wilson(5, 10, confidence=0.99)[0] < wilson(5, 10)[0]
    for k, n in [(0, 0), (3, 2), (-1, 5)]:
        with pytest.raises(ValueError):
            wilson(k, n)
    with pytest.raises(ValueError, match="confidence"):
        wilson(1, 2, confidence=1.0)


def test_bootstrap_contains_mean_shrinks_with_n_and_is_deterministic():
    small = [True, False, False, True, False] * 4
    large = small * 10
    lo, hi = bootstrap(small)
    assert lo <= statistics.fmean(small) <= hi
    lo_l, hi_l = bootstrap(large)
    assert lo_l <= statistics.fmean(large) <= hi_l and hi_l - lo_l < (hi - lo) / 2
    scores = [(i * 0.37) % 1 for i in range(30)]
    assert bootstrap(scores, seed=3) == bootstrap(scores, seed=3) != bootstrap(scores, seed=4)
    assert bootstrap([2.0, 4.0, 9.0], statistic=statistics.median, n_resamples=50) >= (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap([])


def test_paired_bootstrap():
    a = [True, False, True, True, False, False, True, False]
    assert paired_bootstrap(a, a) == (0.0, 0.0)
    lo, hi = paired_bootstrap([True] * 20, [False] * 10 + [True] * 10)
    assert 0.0 < lo <= 0.5 <= hi <= 1.0
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([True], [True, False])


def test_rate_and_format():
    flags = [True] * 18 + [False] * 32
    r = rate(flags)
    assert r.value == 0.36 and r.n == 50 and r.ci == wilson(18, 50)
    assert r.format() == "36 % [24, 50] (n=50)"
    assert r.to_dict() == {"value": 0.36, "n": 50, "ci": list(wilson(18, 50))}
    b = rate(flags, method="bootstrap")
    assert isinstance(b, Rate) and b.value == 0.36 and b.ci[0] < 0.36 < b.ci[1]
    with pytest.raises(ValueError):
        rate([])
    with pytest.raises(ValueError, match="method"):
        rate(flags, method="normal")


def test_mean_sd():
    assert mean_sd([0.2]) == (0.2, 0.0)
    m, sd = mean_sd([1.0, 2.0, 3.0])
    assert m == 2.0 and sd == pytest.approx(1.0)  # n - 1 in the denominator
    with pytest.raises(ValueError):
        mean_sd([])


def test_spearman_averages_tied_ranks_and_is_zero_when_undefined():
    from refat.stats import ranks, spearman

    assert ranks([3, 1, 1, 2]) == [4.0, 1.5, 1.5, 3.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 4], [2, 1, 1, 3]) == pytest.approx(1 / 3)  # scipy.stats.spearmanr gives the same
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0 and spearman([5], [6]) == 0.0
    with pytest.raises(ValueError, match="paired"):
        spearman([1, 2], [1])


def test_pareto_front():
    # objectives: robustness (higher), over-refusal (lower)
    points = {"a": (0.9, 0.5), "b": (0.7, 0.1), "c": (0.6, 0.2), "d": (0.9, 0.6), "e": (0.7, 0.1), "f": (None, 0.0)}
    assert pareto_front(points, [True, False]) == {"a", "b", "e"}  # c is worse than b on both; d than a on one
    assert pareto_front({"x": (1, 1)}, [True, True]) == {"x"}
    assert pareto_front(points, [False, True]) == {"c", "d"}


def test_auc_counts_ties_half_matches_the_pairwise_count_and_its_interval_holds_it():
    import random

    from refat.stats import auc, auc_interval

    assert auc([3, 4], [1, 2]) == 1.0 and auc([1, 2], [3, 4]) == 0.0 and auc([1, 1], [1]) == 0.5
    rng = random.Random(0)
    pos = [rng.randint(0, 9) + 2 for _ in range(40)]  # shifted up, with many ties
    neg = [rng.randint(0, 9) for _ in range(60)]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auc(pos, neg) == pytest.approx(pairwise)
    lo, hi = auc_interval(pos, neg)
    assert lo < pairwise < hi and 0.5 < lo and hi < 1.0
    assert auc_interval(pos, neg) == (lo, hi)  # seeded
    assert auc_interval([5] * 3, [5] * 4) == (0.5, 0.5)
    with pytest.raises(ValueError, match="one positive and one negative"):
        auc([], [1.0])
