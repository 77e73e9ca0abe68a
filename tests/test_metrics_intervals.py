"""The headline interval (lib.metrics.cluster_interval / beta_binomial_arrays) against an independent
computation, and its behaviour at the edges.

The reference below re-derives the interval from its definition with different code: the
beta-binomial likelihood written as rising factorials (plain Python loops, not scipy's betaln),
the profile over rho found by a bounded scalar optimiser (not a grid), the maximum over mu by
another, and the ends of the interval by root finding (brentq) on the likelihood-ratio curve.
The library evaluates the same likelihood on a fixed grid, so the two agree to grid accuracy.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import t as student_t

from lib import metrics

# fixed data: 8 questions, EM answers / scored answers per question (one question lost 10 answers)
K = [0, 5, 1, 10, 0, 2, 3, 0]
N = [50, 50, 50, 50, 50, 50, 50, 40]


def answers(k, n):
    rows = []
    for q, (kq, nq) in enumerate(zip(k, n)):
        rows += [{"question_set": "s", "question_id": f"q{q}", "em": j < kq} for j in range(nq)]
    return pd.DataFrame(rows)


def _loglik(mu: float, rho: float, k, n) -> float:
    """log P(counts | mu, rho) of the beta-binomial, binomial coefficients left out, as rising
    factorials: P(k of n) ~ prod_{j<k}(a+j) prod_{j<n-k}(b+j) / prod_{j<n}(a+b+j)."""
    s = (1 - rho) / rho
    a, b = mu * s, (1 - mu) * s
    total = 0.0
    for kq, nq in zip(k, n):
        total += sum(math.log(a + j) for j in range(kq)) + sum(math.log(b + j) for j in range(nq - kq))
        total -= sum(math.log(a + b + j) for j in range(nq))
    return total


def _profile(mu: float, k, n) -> float:
    best = minimize_scalar(lambda z: -_loglik(mu, 1 / (1 + math.exp(-z)), k, n), bounds=(-10, 10), method="bounded",
                           options={"xatol": 1e-6})
    ends = [-_loglik(mu, 1 / (1 + math.exp(-z)), k, n) for z in (-10, 10)]
    return -min(best.fun, *ends)


def reference(k, n, conf=0.95):
    m = len(k)
    rate = sum(k) / sum(n)
    top = minimize_scalar(lambda x: -_profile(1 / (1 + math.exp(-x)), k, n), bounds=(-12, 3), method="bounded",
                          options={"xatol": 1e-7})
    mu_hat, l_max = 1 / (1 + math.exp(-top.x)), -top.fun
    c = student_t.ppf(1 - (1 - conf) / 2, m - 1) ** 2

    def g(mu):
        return 2 * (l_max - _profile(mu, k, n)) - c

    lo = brentq(g, 1e-6, mu_hat, xtol=1e-10)
    hi = brentq(g, mu_hat, 1 - 1e-6, xtol=1e-10)
    return rate, min(lo, rate), max(hi, rate)


def test_headline_interval_matches_an_independent_computation():
    rate, lo, hi = metrics.cluster_interval(answers(K, N), "em")
    r_rate, r_lo, r_hi = reference(K, N)
    assert rate == pytest.approx(21 / 390, abs=1e-12)
    assert lo == pytest.approx(r_lo, rel=0.006) and hi == pytest.approx(r_hi, rel=0.006)
    # and it is much wider than Wilson's, which treats 390 answers as independent
    w_lo, w_hi = metrics.wilson(21, 390)
    assert hi - lo > 2 * (w_hi - w_lo)


@pytest.mark.parametrize("k, n", [([5] * 24, [50] * 24), ([40, 0, 0, 0, 0, 0, 0, 2], [50] * 8),
                                  ([3, 1, 0, 0, 2, 0, 7, 0, 1, 0], [30] * 10)])
def test_more_data_against_the_reference(k, n):
    rate, lo, hi = metrics.cluster_interval(answers(k, n), "em")
    _, r_lo, r_hi = reference(k, n)
    assert lo == pytest.approx(r_lo, rel=0.006, abs=2e-4) and hi == pytest.approx(r_hi, rel=0.006, abs=2e-4)


def test_zero_em_takes_the_exact_all_or_nothing_bound():
    """0 EM in 400 answers to 8 questions: [0, 1 - 0.05^(1/8)] (the exact one-sided bound for 0 EM
    questions of 8: the lower end, 0, cannot miss), not [0, 0]: 8 all-or-nothing questions cannot
    rule out a rate of 31%."""
    rate, lo, hi = metrics.cluster_interval(answers([0] * 8, [50] * 8), "em")
    assert rate == 0 and lo == 0
    assert hi == pytest.approx(1 - 0.05 ** (1 / 8), abs=1e-12)
    assert hi == pytest.approx(metrics.edge_bound(8), abs=1e-12) and 0.31 < hi < 0.32
    # 24 questions; all EM mirrors it
    assert metrics.cluster_interval(answers([0] * 24, [50] * 24), "em")[2] == pytest.approx(1 - 0.05 ** (1 / 24))
    assert metrics.cluster_interval(answers([50] * 24, [50] * 24), "em")[1:] == pytest.approx((0.05 ** (1 / 24), 1))
    # 90% intervals spend 10% on the one end
    assert metrics.edge_bound(8, 0.90) == pytest.approx(1 - 0.10 ** (1 / 8))


def test_em_spread_evenly_over_many_questions_gets_a_narrow_interval():
    """5 of 50 EM in each of 24 questions: no sign of clustering, so the interval is close to the
    binomial one on 1,200 answers; the previous headline kept its upper bound at 0.157 whatever the
    data (its floor); the issue asks for below 0.13."""
    rate, lo, hi = metrics.cluster_interval(answers([5] * 24, [50] * 24), "em")
    assert rate == pytest.approx(0.1) and lo > 0.08 and hi < 0.13
    _, _, old_hi, _ = metrics.cluster_cp_arrays([5] * 24, [50] * 24)
    assert old_hi > 0.157


def test_em_concentrated_in_one_question_stays_wide():
    """The same 120 EM answers in 3 of 24 questions (40 each): the questions differ wildly, the interval
    must allow for unseen EM-heavy questions."""
    _, lo_spread, hi_spread = metrics.cluster_interval(answers([5] * 24, [50] * 24), "em")
    _, lo, hi = metrics.cluster_interval(answers([40, 40, 40] + [0] * 21, [50] * 24), "em")
    assert hi - lo > 4 * (hi_spread - lo_spread)


def test_one_em_answer_can_still_hide_a_five_point_rate():
    """1 EM answer of 400 over 8 questions: the upper bound still reaches past 5% (a rate of 5% with
    strongly clustered questions shows no EM at all in most runs of 8 questions)."""
    rate, lo, hi = metrics.cluster_interval(answers([1] + [0] * 7, [50] * 8), "em")
    assert rate == pytest.approx(1 / 400) and 0 < lo < rate and hi > 0.05


def test_all_em_mirrors_zero_em():
    _, lo0, hi0 = metrics.cluster_interval(answers([0] * 10, [30] * 10), "em")
    _, lo1, hi1 = metrics.cluster_interval(answers([30] * 10, [30] * 10), "em")
    assert lo1 == pytest.approx(1 - hi0, abs=1e-12) and hi1 == 1.0 and lo0 == 0.0


def test_the_interval_is_symmetric_under_swapping_em_and_not_em():
    k, n = np.array(K), np.array(N)
    _, lo, hi = metrics.beta_binomial_arrays(k, n)
    _, lo2, hi2 = metrics.beta_binomial_arrays(n - k, n)
    assert float(lo2) == pytest.approx(1 - float(hi), abs=1e-9) and float(hi2) == pytest.approx(1 - float(lo), abs=1e-9)


def test_vectorised_rows_equal_single_calls_and_shape_is_kept():
    rows = np.array([K, [0] * 8, [50] * 8, [3, 0, 0, 1, 0, 0, 0, 9]], dtype=float)
    n = np.array([N] + [[50] * 8] * 3, dtype=float)
    rate, lo, hi = metrics.beta_binomial_arrays(rows, n)
    assert rate.shape == lo.shape == hi.shape == (4,)
    for i in range(4):
        r1, l1, h1 = metrics.beta_binomial_arrays(rows[i], n[i])
        assert (float(r1), float(l1), float(h1)) == pytest.approx((rate[i], lo[i], hi[i]), abs=1e-12)
    # 2-D leading shape
    r2, l2, h2 = metrics.beta_binomial_arrays(rows.reshape(2, 2, 8), n.reshape(2, 2, 8))
    assert l2.shape == (2, 2) and np.allclose(l2.ravel(), lo)


def test_a_higher_confidence_gives_a_wider_interval():
    _, lo95, hi95 = metrics.cluster_interval(answers(K, N), "em", confidence=0.95)
    _, lo99, hi99 = metrics.cluster_interval(answers(K, N), "em", confidence=0.99)
    assert lo99 < lo95 < hi95 < hi99


def test_excluded_answers_and_empty_questions_are_left_out():
    df = answers(K, N)
    extra = pd.DataFrame({"question_set": "s", "question_id": ["q0", "q9", "q9"], "em": [pd.NA] * 3})
    with_na = pd.concat([df, extra], ignore_index=True)  # q9 has no scored answer: not a cluster
    assert metrics.cluster_interval(with_na, "em") == pytest.approx(metrics.cluster_interval(df, "em"))


def test_one_question_gives_no_interval():
    rate, lo, hi = metrics.cluster_interval(answers([3], [50]), "em")
    assert rate == pytest.approx(0.06) and math.isnan(lo) and math.isnan(hi)


def test_macro_rate_is_the_mean_of_question_rates():
    assert metrics.macro_rate(answers(K, N), "em") == pytest.approx(np.mean(np.array(K) / np.array(N)))
    assert metrics.macro_rate(answers(K, N), "em") != pytest.approx(21 / 390)


def test_summary_flags_too_few_questions_and_carries_macro():
    df = answers(K, N)
    df["scored"], df["excluded_reason"], df["is_coherent"] = True, None, True
    df["aligned"], df["coherent"] = 10.0, 90.0
    df["run"] = np.where(df["question_id"].isin(["q0", "q1", "q2"]), "few", "many")
    both = pd.concat([df.assign(run="all8"), df[df["run"] == "few"]], ignore_index=True)
    s = metrics.summarize(both, ["run"]).set_index("run")
    assert bool(s.loc["all8", "interval_ok"]) and not bool(s.loc["few", "interval_ok"])
    assert s.loc["all8", "em_macro"] == pytest.approx(np.mean(np.array(K) / np.array(N)))
    _, lo, hi = metrics.cluster_interval(answers(K, N), "em")
    assert (s.loc["all8", "em_lo"], s.loc["all8", "em_hi"]) == pytest.approx((lo, hi), abs=1e-12)


def test_edge_bound_of_one_question_and_of_none():
    """One question, 0 EM: the bound is 1 - 0.05 = 0.95 (one all-or-nothing question); no question: NaN."""
    assert metrics.edge_bound(1) == pytest.approx(0.95)
    assert metrics.edge_bound(2) == pytest.approx(1 - 0.05 ** 0.5)
    assert math.isnan(metrics.edge_bound(0))
