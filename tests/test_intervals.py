"""The headline interval (lib.metrics.cluster_interval) against an independent computation.

The reference below re-derives the interval from its definition with different code: plain
Python loops for the cluster-robust variance, and the exact binomial bounds found by root
finding on the regularised incomplete beta function (scipy.special.betainc + brentq) rather
than by beta quantiles.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from scipy.special import betainc
from scipy.stats import norm, t as student_t

from lib import metrics

# fixed data: 8 questions, EM answers / scored answers per question (one question lost 10 answers)
K = [0, 5, 1, 10, 0, 2, 3, 0]
N = [50, 50, 50, 50, 50, 50, 50, 40]


def answers(k, n):
    rows = []
    for q, (kq, nq) in enumerate(zip(k, n)):
        rows += [{"question_set": "s", "question_id": f"q{q}", "em": j < kq} for j in range(nq)]
    return pd.DataFrame(rows)


def reference(k, n, conf=0.95):
    m = len(k)
    big_k, big_n = sum(k), sum(n)
    rate = big_k / big_n
    ss = 0.0
    for kq, nq in zip(k, n):
        ss += (kq - rate * nq) ** 2
    var = m / (m - 1) * ss / big_n ** 2
    n_eff = rate * (1 - rate) / var if 0 < rate < 1 else m
    n_eff = min(max(n_eff, 1.0), big_n)
    n_eff *= (norm.ppf(0.975) / student_t.ppf(0.975, m - 1)) ** 2
    x = rate * n_eff
    # P(Beta(a, b) <= p) = betainc(a, b, p): lo solves P(Beta(x, n-x+1) <= lo) = 0.025,
    # hi solves P(Beta(x+1, n-x) <= hi) = 0.975
    lo = 0.0 if x == 0 else brentq(lambda p: betainc(x, n_eff - x + 1, p) - 0.025, 1e-15, 1 - 1e-15, xtol=1e-14)
    hi = 1.0 if x == n_eff else brentq(lambda p: betainc(x + 1, n_eff - x, p) - 0.975, 1e-15, 1 - 1e-15, xtol=1e-14)
    e = m * (norm.ppf(0.975) / student_t.ppf(0.975, m - 1)) ** 2  # the 0-EM sample size
    hi = max(hi, 1 - 0.025 ** (1 / e))                          # its upper bound, closed form
    lo = min(lo, 0.025 ** (1 / e))                              # the all-EM lower bound
    return rate, lo, hi


def test_headline_interval_matches_an_independent_computation():
    rate, lo, hi = metrics.cluster_interval(answers(K, N), "em")
    r_rate, r_lo, r_hi = reference(K, N)
    assert rate == pytest.approx(21 / 390, abs=1e-12)
    assert lo == pytest.approx(r_lo, abs=1e-9) and hi == pytest.approx(r_hi, abs=1e-9)
    # and it is much wider than Wilson's, which treats 390 answers as independent
    w_lo, w_hi = metrics.wilson(21, 390)
    assert hi - lo > 2 * (w_hi - w_lo)


def test_zero_em_has_a_positive_upper_bound():
    """0 EM in 400 answers to 8 questions: [0, 1 - 0.025^(1/m*)], m* = 8 (z / t_7)^2, not [0, 0]."""
    rate, lo, hi = metrics.cluster_interval(answers([0] * 8, [50] * 8), "em")
    m_star = 8 * (norm.ppf(0.975) / student_t.ppf(0.975, 7)) ** 2
    assert rate == 0 and lo == 0
    assert hi == pytest.approx(1 - 0.025 ** (1 / m_star), abs=1e-12)
    assert hi > 0.3  # 8 all-or-nothing questions cannot rule out a rate of 30%


def test_one_em_answer_is_never_narrower_than_wilson_or_than_zero_em():
    _, _, hi0 = metrics.cluster_interval(answers([0] * 8, [50] * 8), "em")
    rate, lo, hi = metrics.cluster_interval(answers([1] + [0] * 7, [50] * 8), "em")
    w_lo, w_hi = metrics.wilson(1, 400)
    assert rate == pytest.approx(1 / 400)
    assert lo <= w_lo and hi >= w_hi and hi >= hi0


def test_all_em_mirrors_zero_em():
    _, lo0, hi0 = metrics.cluster_interval(answers([0] * 10, [30] * 10), "em")
    _, lo1, hi1 = metrics.cluster_interval(answers([30] * 10, [30] * 10), "em")
    assert lo1 == pytest.approx(1 - hi0, abs=1e-12) and hi1 == 1.0 and lo0 == 0.0


def test_identical_questions_reduce_to_clopper_pearson_on_all_answers():
    """No spread between questions: design effect 1, the exact interval on all answers (t-adjusted)."""
    k, n = [5] * 40, [50] * 40
    rate, lo, hi = metrics.cluster_interval(answers(k, n), "em")
    shrink = (norm.ppf(0.975) / student_t.ppf(0.975, 39)) ** 2
    from scipy.stats import beta
    x, ne = 0.1 * 2000 * shrink, 2000 * shrink
    assert lo == pytest.approx(beta.ppf(0.025, x, ne - x + 1), abs=1e-12)
    assert hi == pytest.approx(beta.ppf(0.975, x + 1, ne - x), abs=1e-12)


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
    assert (s.loc["all8", "em_lo"], s.loc["all8", "em_hi"]) == pytest.approx(reference(K, N)[1:], abs=1e-9)
