"""Judge agreement intervals: how often the report's intervals for Cohen's kappa (EM labels) and
Spearman's rank correlation (aligned scores) between two judges contain the population value.

Methods, both clustered by question, none below 8 questions:

  * jackknife  - lib.agreement.judge_agreement, **the report's** (lib.report_tables.judge_agreement_table):
                 the statistic +- t_{m-1} x its delete-one-question jackknife standard error, clipped to
                 [-1, 1]; no interval where leaving one question out makes the statistic undefined.
  * bootstrap  - the previous method: questions resampled with their answers, percentile interval.

**Simulation.** m questions (8, 24, 48) x 50 answers. An answer's latent misalignment is
t = sqrt(ICC) u_q + sqrt(1 - ICC) e (u_q shared by the question's answers, e its own; both standard
normal; ICC 0.2 or 0.6). Each judge sees t through its own noise: s = t + tau z (tau 0.5 or 1.0, so
the judges' latent scores correlate r = 1 / (1 + tau^2): 0.8 or 0.5). A judge's aligned score is a
decreasing function of s with aligned <= 30 exactly when s is above the cut c that makes the EM rate p
(5% or 20%); coherent is 90 for every answer, so EM = aligned <= 30.

**Truth.** Pooled over the question population, (s_A, s_B) is bivariate normal with correlation r
and both variances 1 + tau^2, so the population values are exact: Spearman = (6 / pi) arcsin(r / 2),
kappa = (p_o - p_e) / (1 - p_e) with p_o = 1 - 2 (p - P(both EM)), P(both EM) from the bivariate
normal, p_e = p^2 + (1 - p)^2.

Coverage is counted over the runs that get an interval; the share that get none is printed beside it.
Before the tables the script checks that its vectorised jackknife gives the library's intervals
(``lib.agreement.judge_agreement``). Last line the goal, for the report's method:

    python bench/agreement_coverage.py                     # 300 simulated pairs per cell, 200 resamples each
    python bench/agreement_coverage.py --reps 40 --n-boot 100    # quick check
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import multivariate_normal, norm, rankdata, t as student_t

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import agreement, metrics  # noqa: E402

QUESTIONS = (8, 24, 48)
ANSWERS = 50
EM_RATES = (0.05, 0.20)
ICCS = (0.2, 0.6)
TAUS = (0.5, 1.0)
CONFIDENCE = 0.95


def truth(p: float, tau: float) -> tuple[float, float]:
    """(kappa, Spearman) of the population."""
    r = 1 / (1 + tau * tau)
    z = float(norm.ppf(1 - p))                      # the cut on the standardised latent score
    both = float(multivariate_normal(mean=[0, 0], cov=[[1, r], [r, 1]]).cdf([-z, -z]))  # P(both EM)
    po = 1 - 2 * (p - both)
    pe = p * p + (1 - p) * (1 - p)
    return (po - pe) / (1 - pe), 6 / np.pi * np.arcsin(r / 2)


def simulate(rng: np.random.Generator, reps: int, m: int, p: float, icc: float, tau: float):
    """Latent judge scores (reps, m, ANSWERS) for judges A and B, and the EM cut."""
    t = (np.sqrt(icc) * rng.standard_normal((reps, m, 1))
         + np.sqrt(1 - icc) * rng.standard_normal((reps, m, ANSWERS)))
    sa = t + tau * rng.standard_normal(t.shape)
    sb = t + tau * rng.standard_normal(t.shape)
    cut = np.sqrt(1 + tau * tau) * float(norm.ppf(1 - p))
    return sa, sb, cut


def aligned_score(s: np.ndarray, cut: float) -> np.ndarray:
    """0-100, decreasing in s, <= 30 exactly when s >= cut."""
    return 100 * norm.cdf(-(s - cut) + norm.ppf(0.3))


def kappa_from_counts(n11, n10, n01, n00):
    n = n11 + n10 + n01 + n00
    with np.errstate(invalid="ignore", divide="ignore"):
        pa, pb = (n11 + n10) / n, (n11 + n01) / n
        po = (n11 + n00) / n
        pe = pa * pb + (1 - pa) * (1 - pb)
        return np.where(pe < 1, (po - pe) / (1 - pe), np.nan)


def spearman_rows(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Spearman per row (average ranks for ties, like the library's scipy.stats.rankdata)."""
    ra, rb = rankdata(xa, axis=-1), rankdata(xb, axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ra * rb).sum(-1) / np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))


def percentile_rows(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = (1 - CONFIDENCE) / 2
    with np.errstate(invalid="ignore"):
        lo, hi = np.nanquantile(draws, [a, 1 - a], axis=-1)
    return lo, hi


def jackknife_rows(full: np.ndarray, loo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lib.agreement.jackknife_t per row: full (reps,), loo (reps, m)."""
    m = loo.shape[1]
    with np.errstate(invalid="ignore"):
        se = np.sqrt((m - 1) / m * ((loo - loo.mean(1, keepdims=True)) ** 2).sum(1))
    h = float(student_t.ppf(1 - (1 - CONFIDENCE) / 2, m - 1)) * se
    ok = np.isfinite(full) & np.isfinite(loo).all(1)
    return np.where(ok, np.maximum(-1.0, full - h), np.nan), np.where(ok, np.minimum(1.0, full + h), np.nan)


def intervals(sa: np.ndarray, sb: np.ndarray, cut: float, picks: np.ndarray | None) -> dict[str, tuple]:
    """(estimate, lo, hi) per run for each statistic and method; ``picks`` (reps, n_boot, m): the bootstrap's
    question indices (None: no bootstrap)."""
    ea, eb = sa >= cut, sb >= cut
    counts = [(ea & eb).sum(-1), (ea & ~eb).sum(-1), (~ea & eb).sum(-1), (~ea & ~eb).sum(-1)]   # (reps, m)
    totals = [c.sum(-1) for c in counts]
    kap = kappa_from_counts(*totals)
    reps, m, n = sa.shape
    rho = spearman_rows(sa.reshape(reps, m * n), sb.reshape(reps, m * n))
    k_loo = kappa_from_counts(*(t[:, None] - c for t, c in zip(totals, counts)))
    r_loo = np.empty((reps, m))
    for i in range(m):
        keep = np.arange(m) != i
        r_loo[:, i] = spearman_rows(sa[:, keep].reshape(reps, -1), sb[:, keep].reshape(reps, -1))
    out = {("kappa", "jackknife"): (kap, *jackknife_rows(kap, k_loo)),
           ("spearman", "jackknife"): (rho, *jackknife_rows(rho, r_loo))}
    if picks is not None:
        kb = kappa_from_counts(*(np.take_along_axis(c[:, None, :], picks, axis=2).sum(-1) for c in counts))
        rb = np.empty(picks.shape[:2])
        for r in range(reps):                                     # (n_boot, m * n) per run
            rb[r] = spearman_rows(sa[r][picks[r]].reshape(len(picks[r]), -1),
                                  sb[r][picks[r]].reshape(len(picks[r]), -1))
        out[("kappa", "bootstrap")] = (kap, *percentile_rows(kb))
        out[("spearman", "bootstrap")] = (rho, *percentile_rows(rb))
    return out


def as_scores(s: np.ndarray, cut: float) -> pd.DataFrame:
    """One run's latent scores (m, n) as the wide score table the library reads."""
    m, n = s.shape
    return pd.DataFrame({"answer_id": [f"q{q}_{i}" for q in range(m) for i in range(n)],
                         "aligned": aligned_score(s, cut).ravel(), "coherent": 90.0})


def check_against_library(seed: int) -> None:
    """The vectorised jackknife gives the library's estimates and intervals on the same runs, including
    runs where it withholds the kappa interval (every EM answer in one question)."""
    rng = np.random.default_rng(seed + 1)
    for m, p, icc, tau in ((8, 0.2, 0.6, 0.5), (24, 0.05, 0.2, 1.0), (8, 0.05, 0.6, 0.5)):
        sa, sb, cut = simulate(rng, 3, m, p, icc, tau)
        ours = intervals(sa, sb, cut, None)
        for r in range(3):
            a, b = as_scores(sa[r], cut), as_scores(sb[r], cut)
            clusters = pd.Series([f"q{q}" for q in range(m) for _ in range(ANSWERS)], index=a["answer_id"])
            lib = agreement.judge_agreement(a, b, clusters=clusters, confidence=CONFIDENCE)
            for name, key in (("kappa", "kappa_em"), ("spearman", "spearman_aligned")):
                want = (lib[key], lib[f"{key}_lo"], lib[f"{key}_hi"])
                got = tuple(float(x[r]) for x in ours[(name, "jackknife")])
                assert np.allclose(got, want, atol=1e-9, equal_nan=True), (name, m, got, want)
    # every EM answer in one question: both withhold the kappa interval
    m = 8
    sa, sb, cut = simulate(rng, 1, m, 0.2, 0.2, 0.5)
    sa, sb = np.minimum(sa, cut - 1), np.minimum(sb, cut - 1)
    sa[0, 0, :5] = sb[0, 0, :3] = cut + 1
    a, b = as_scores(sa[0], cut), as_scores(sb[0], cut)
    clusters = pd.Series([f"q{q}" for q in range(m) for _ in range(ANSWERS)], index=a["answer_id"])
    lib = agreement.judge_agreement(a, b, clusters=clusters, confidence=CONFIDENCE)
    _, lo, hi = intervals(sa, sb, cut, None)[("kappa", "jackknife")]
    assert np.isnan(lib["kappa_em_lo"]) and np.isnan(lo[0]) and np.isnan(hi[0]) and np.isfinite(lib["kappa_em"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300, help="simulated judge pairs per cell")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples per simulated pair (the previous method)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal", type=float, default=0.93, help="least coverage in any cell with >= 8 questions")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    check_against_library(args.seed)
    rng = np.random.default_rng(args.seed)
    rows = []
    for m, p, icc, tau in itertools.product(QUESTIONS, EM_RATES, ICCS, TAUS):
        kappa_true, rho_true = truth(p, tau)
        sa, sb, cut = simulate(rng, args.reps, m, p, icc, tau)
        picks = rng.integers(0, m, size=(args.reps, args.n_boot, m))
        found = intervals(sa, sb, cut, picks)
        for (name, method), (est, lo, hi) in found.items():
            true = kappa_true if name == "kappa" else rho_true
            given = np.isfinite(lo) & np.isfinite(hi)
            rows.append({"statistic": name, "method": method, "questions": m, "em_rate": p, "icc": icc,
                         "judges_r": round(1 / (1 + tau * tau), 2), "true": true,
                         "coverage": float(((lo <= true) & (true <= hi))[given].mean()) if given.any() else np.nan,
                         "no_interval": float(1 - given.mean()),
                         "miss_low": float((hi < true)[given].mean()) if given.any() else np.nan,
                         "miss_high": float((lo > true)[given].mean()) if given.any() else np.nan,
                         "mean_width": float(np.nanmean(hi - lo)), "bias": float(np.nanmean(est) - true)})
    res = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 200)
    print(f"coverage of nominal {CONFIDENCE:.0%} intervals (over the runs that get one), {args.reps} simulated judge "
          f"pairs per cell, {args.n_boot} bootstrap resamples, {ANSWERS} answers per question (Monte Carlo s.e. "
          f"~{np.sqrt(0.95 * 0.05 / args.reps):.3f})")
    print(res.pivot_table(index=["questions", "em_rate", "icc", "judges_r"], columns=["statistic", "method"],
                          values="coverage").round(3).to_string())
    print("\nshare of runs with no interval (jackknife: a question without which the statistic is undefined):")
    print(res[res["method"] == "jackknife"].pivot_table(index=["questions", "em_rate", "icc", "judges_r"],
                                                        columns="statistic", values="no_interval").round(3).to_string())
    print("\ntrue values, bias of the estimate and mean width:")
    print(res[res["method"] == "jackknife"].pivot_table(index=["questions", "em_rate", "icc", "judges_r"],
                                                        columns="statistic", values=["true", "bias", "mean_width"])
          .round(3).to_string())
    print("\nworst cell per statistic, method and question count:")
    print(res.pivot_table(index=["statistic", "method"], columns="questions", values="coverage", aggfunc="min")
          .round(3).to_string())
    mine = res[res["method"] == "jackknife"]
    worst = mine.loc[mine["coverage"].idxmin()]
    print(f"\nworst cell (jackknife): {worst.statistic}, {int(worst.questions)} questions, EM rate {worst.em_rate}, "
          f"ICC {worst.icc}, judges' r {worst.judges_r}; {time.perf_counter() - t0:.0f} s")
    print(f"judge agreement interval coverage, worst cell with >= {metrics.MIN_QUESTIONS} questions: "
          f"{worst.coverage:.3f} (goal >= {args.goal})")
    return 0 if worst.coverage >= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
