"""Intervals checked against an independent computation on fixed data.

The question-clustered bootstrap resamples m questions with replacement, so the number of
times each question is drawn follows a multinomial(m, 1/m) distribution. For a handful of
questions every outcome can be enumerated, which gives the bootstrap distribution of the
pooled rate *exactly* (no random numbers). A Monte-Carlo percentile interval from ``n_boot``
resamples must then put its lower end at the exact distribution's (1 - confidence)/2 quantile
and its upper end at the 1 - (1 - confidence)/2 quantile, up to the Monte-Carlo error of an
empirical quantile: the exact CDF at the estimate is within a few sqrt(a (1 - a) / n_boot)
of a. Tests that only check seeding, relative width or lo <= rate <= hi pass for a
bootstrap that never draws one of the questions or that returns a 90% interval; these do not.
"""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

from lib import metrics

N_BOOT = 20_000
Z = 4.5  # Monte-Carlo standard errors allowed: a false alarm about once in 150,000 seeds


def _frame(k: list[int], n: list[int], question_set: str = "qs", value: str = "em") -> pd.DataFrame:
    """Answers of len(k) questions; question i has n[i] answers of which k[i] are True."""
    rows = []
    for i, (ki, ni) in enumerate(zip(k, n)):
        rows += [{"question_set": question_set, "question_id": f"q{i}", value: j < ki} for j in range(ni)]
    return pd.DataFrame(rows)


def _compositions(m: int):
    """Every way m draws can land on m questions (counts per question), with its probability."""
    for cut in itertools.combinations(range(2 * m - 1), m - 1):  # stars and bars
        bounds = (-1,) + cut + (2 * m - 1,)
        c = [bounds[i + 1] - bounds[i] - 1 for i in range(m)]
        p = Fraction(math.factorial(m), math.prod(math.factorial(x) for x in c) * m ** m)
        yield c, p


def exact_distribution(stat) -> list[tuple[float, float]]:
    """(value, probability) of a statistic of the per-question draw counts, values sorted."""
    dist: dict[float, Fraction] = {}
    for c, p in stat.compositions():
        v = stat(c)
        if v is not None:
            dist[v] = dist.get(v, Fraction(0)) + p
    total = sum(dist.values())
    return sorted((v, float(p / total)) for v, p in dist.items())


class PooledRate:
    """sum(c_i k_i) / sum(c_i n_i): the pooled rate of one bootstrap replicate."""

    def __init__(self, k, n):
        self.k, self.n = k, n

    def compositions(self):
        return _compositions(len(self.k))

    def __call__(self, c):
        den = sum(ci * ni for ci, ni in zip(c, self.n))
        return None if den == 0 else round(sum(ci * ki for ci, ki in zip(c, self.k)) / den, 12)


def cdf_below_and_at(dist, x: float) -> tuple[float, float]:
    """P(X < x) and P(X <= x) under an exact distribution (1e-9 slack for float rounding)."""
    below = sum(p for v, p in dist if v < x - 1e-9)
    at = sum(p for v, p in dist if v <= x + 1e-9)
    return below, at


def assert_quantile(dist, estimate: float, a: float, n_boot: int, what: str) -> None:
    """estimate is an empirical a-quantile of n_boot draws from dist (within Monte-Carlo error)."""
    tol = Z * math.sqrt(a * (1 - a) / n_boot)
    below, at = cdf_below_and_at(dist, estimate)
    assert below <= a + tol and at >= a - tol, (
        f"{what}: P(X < {estimate:.4f}) = {below:.4f}, P(X <= {estimate:.4f}) = {at:.4f}; "
        f"an {a:.3f}-quantile needs {a:.3f} in between (+/- {tol:.4f})")


# Seven questions with different sizes and rates (few ties, so the distribution has no big atoms);
# the last one is all-EM, so a bootstrap that never draws it shifts the whole distribution down.
K = [0, 1, 5, 2, 6, 3, 10]
N = [3, 5, 7, 4, 6, 8, 10]


def test_exact_reference_is_itself_right():
    """The enumeration sums to one and its mean is the pooled rate's bootstrap mean by brute force."""
    dist = exact_distribution(PooledRate(K, N))
    assert sum(p for _, p in dist) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(123)  # a plain resampling loop, nothing shared with lib.metrics
    k, n = np.array(K), np.array(N)
    draws = [k[c].sum() / n[c].sum() for c in (rng.choice(len(K), len(K)) for _ in range(20_000))]
    assert sum(v * p for v, p in dist) == pytest.approx(np.mean(draws), abs=4 * np.std(draws) / math.sqrt(20_000))


@pytest.mark.parametrize("confidence", [0.95, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_cluster_bootstrap_matches_the_exact_bootstrap_distribution(confidence, seed):
    dist = exact_distribution(PooledRate(K, N))
    rate, lo, hi = metrics.cluster_bootstrap(_frame(K, N), n_boot=N_BOOT, confidence=confidence, seed=seed)
    assert rate == sum(K) / sum(N)
    a = (1 - confidence) / 2
    assert_quantile(dist, lo, a, N_BOOT, "lower end")
    assert_quantile(dist, hi, 1 - a, N_BOOT, "upper end")


def test_cluster_bootstrap_default_is_a_95_percent_interval():
    dist = exact_distribution(PooledRate(K, N))
    _, lo, hi = metrics.cluster_bootstrap(_frame(K, N), n_boot=N_BOOT)
    assert_quantile(dist, lo, 0.025, N_BOOT, "lower end")
    assert_quantile(dist, hi, 0.975, N_BOOT, "upper end")


def test_every_question_is_drawn():
    """With one all-EM question among all-zero ones, the upper end is the exact 97.5% quantile
    (a bootstrap that never draws the last question gives an interval of [0, 0])."""
    k, n = [0, 0, 0, 0, 5], [5, 5, 5, 5, 5]
    dist = exact_distribution(PooledRate(k, n))
    _, lo, hi = metrics.cluster_bootstrap(_frame(k, n), n_boot=N_BOOT, seed=3)
    assert hi >= 0.4  # P(rate >= 0.4) = P(question 4 drawn twice or more) = 0.26
    assert_quantile(dist, hi, 0.975, N_BOOT, "upper end")
    assert_quantile(dist, lo, 0.025, N_BOOT, "lower end")


def test_summarize_passes_its_confidence_to_the_em_interval():
    d = _frame(K, N).assign(scored=True, excluded_reason=None, aligned=10.0, coherent=90.0)
    d["is_coherent"] = d["em"]  # any boolean column with the same counts
    dist = exact_distribution(PooledRate(K, N))
    for confidence in (0.95, 0.9):
        row = metrics.summarize(d.assign(group="g"), by=["group"], n_boot=N_BOOT, confidence=confidence).iloc[0]
        a = (1 - confidence) / 2
        assert row.em_k == sum(K) and row.n_scored == sum(N) and row.n_questions == len(K)
        # the bootstrap columns (em_lo/em_hi are the headline interval, tests/test_metrics_intervals.py)
        assert_quantile(dist, row.em_boot_lo, a, N_BOOT, f"em_boot_lo at {confidence}")
        assert_quantile(dist, row.em_boot_hi, 1 - a, N_BOOT, f"em_boot_hi at {confidence}")
        # the headline interval gets the same confidence
        _, lo, hi = metrics.beta_binomial_arrays(np.array(K, float), np.array(N, float), confidence)
        assert (row.em_lo, row.em_hi, row.coherent_lo) == pytest.approx((float(lo), float(hi), float(lo)), abs=1e-12)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 1), (17, 230), (500, 1000)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_against_the_textbook_formula(k, n, confidence):
    """Wilson (1927): (p + z^2/2n +/- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z from the normal."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    assert metrics.wilson(k, n, confidence) == pytest.approx((max(lo, 0.0), min(hi, 1.0)), abs=1e-9)
