"""Interval coverage: how often each EM-rate interval the report offers contains the true rate.

Simulated runs like the ones people report: m questions (4, 8, 24, 48) x 50 scored answers
each. Each question's EM rate p_i is drawn from a Beta distribution with mean p (the true
rate: 0.5%, 5%, 20%, 50%) and intra-question correlation ICC = 1 / (a + b + 1) (0.3, 0.6,
0.9: answers to one question are far more alike than answers to different questions), then
its EM count from Binomial(50, p_i). The estimand is p, the expected EM rate of a question
drawn from the same population, which is what a rate over "the questions" claims to say.

Methods (all at 95%):
  * cluster_cp        - lib.metrics.cluster_interval, the headline: Korn & Graubard's interval
                        (Clopper-Pearson on the design-effect sample size from the cluster-robust
                        variance, df-adjusted with t_{m-1}), n_eff = m at 0 EM, bounds monotone.
  * kg_edge_m         - the same without the monotone bounds.
  * kg_classic        - Korn & Graubard as published (n_eff = all answers at 0 EM, not monotone).
  * cluster_wilson_t  - Wilson's score interval on the same n_eff with a t_{m-1} quantile.
  * cluster_bootstrap - lib.metrics.cluster_bootstrap: questions resampled with replacement,
                        percentile interval (the report's headline before this benchmark; still
                        used for differences between runs).
  * wilson            - lib.metrics.wilson on all answers as if independent (shown beside).
  * cr_logit_t        - cluster-robust standard error on the logit scale, t with m - 1 df
                        (undefined at 0 EM: counted as a miss).

Before the table, the vectorised simulation code is checked against the library functions
on a few simulated runs (same numbers to 1e-9; the bootstrap with the same random draws).

    python bench/interval_coverage.py             # 4,000 runs per cell (~1-2 minutes on 2 cores)
    python bench/interval_coverage.py --reps 200  # quick check
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm, t as student_t

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import metrics  # noqa: E402

QUESTIONS = (4, 8, 24, 48)
ANSWERS = 50
RATES = (0.005, 0.05, 0.20, 0.50)
ICCS = (0.3, 0.6, 0.9)
HEADLINE = "cluster_cp"
MIN_QUESTIONS = metrics.MIN_QUESTIONS  # the goal is judged on cells with at least this many questions


def simulate(rng: np.random.Generator, reps: int, m: int, p: float, icc: float) -> tuple[np.ndarray, np.ndarray]:
    """(k, n): reps x m EM counts and scored answers of simulated runs."""
    s = 1 / icc - 1                       # a + b of the Beta: ICC = 1 / (a + b + 1)
    p_i = rng.beta(p * s, (1 - p) * s, size=(reps, m))
    k = rng.binomial(ANSWERS, p_i).astype(float)
    return k, np.full_like(k, float(ANSWERS))


def wilson_arrays(k: np.ndarray, n: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray]:
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def bootstrap_arrays(k: np.ndarray, n: np.ndarray, rng: np.random.Generator, n_boot: int,
                     chunk: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Percentile question-clustered bootstrap per row of k (same algorithm as metrics.cluster_bootstrap)."""
    reps, m = k.shape
    lo, hi = np.empty(reps), np.empty(reps)
    for s in range(0, reps, chunk):
        kk, nn = k[s:s + chunk], n[s:s + chunk]
        idx = rng.integers(0, m, size=(len(kk), n_boot, m))
        draws = (np.take_along_axis(kk[:, None, :], idx, axis=2).sum(-1)
                 / np.take_along_axis(nn[:, None, :], idx, axis=2).sum(-1))
        lo[s:s + chunk], hi[s:s + chunk] = np.quantile(draws, [0.025, 0.975], axis=1)
    return lo, hi


def cr_logit_arrays(k: np.ndarray, n: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    m = k.shape[1]
    big_n = n.sum(1)
    rate = k.sum(1) / big_n
    var = m / (m - 1) * ((k - rate[:, None] * n) ** 2).sum(1) / big_n ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = np.log(rate / (1 - rate))
        se = np.sqrt(var) / (rate * (1 - rate))
        lo, hi = 1 / (1 + np.exp(-(logit - q * se))), 1 / (1 + np.exp(-(logit + q * se)))
    bad = (rate <= 0) | (rate >= 1)
    lo[bad], hi[bad] = np.nan, np.nan
    return lo, hi


def wilson_t_arrays(k: np.ndarray, n: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's score interval on the CR1 design-effect sample size (n_eff = m at 0 EM), quantile q."""
    m = k.shape[1]
    big_n = n.sum(1)
    rate = k.sum(1) / big_n
    var = m / (m - 1) * ((k - rate[:, None] * n) ** 2).sum(1) / big_n ** 2
    pq = rate * (1 - rate)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.clip(np.where(pq > 0, np.where(var > 0, pq / var, big_n), m), 1, big_n)
    lo, hi = wilson_arrays(rate * n_eff, n_eff, q)
    return np.clip(lo, 0, 1), np.clip(hi, 0, 1)


def intervals(k: np.ndarray, n: np.ndarray, rng: np.random.Generator, n_boot: int) -> dict[str, tuple]:
    m = k.shape[1]
    z, t = float(norm.ppf(0.975)), float(student_t.ppf(0.975, m - 1))
    out = {}
    _, lo, hi, _ = metrics.cluster_cp_arrays(k, n, 0.95)
    out["cluster_cp"] = (lo, hi)
    _, lo, hi, _ = metrics.cluster_cp_arrays(k, n, 0.95, monotone=False)
    out["kg_edge_m"] = (lo, hi)
    _, lo, hi, _ = metrics.cluster_cp_arrays(k, n, 0.95, edge="n", monotone=False)
    out["kg_classic"] = (lo, hi)
    out["cluster_wilson_t"] = wilson_t_arrays(k, n, t)
    out["cluster_bootstrap"] = bootstrap_arrays(k, n, rng, n_boot)
    out["wilson"] = wilson_arrays(k.sum(1), n.sum(1), z)
    out["cr_logit_t"] = cr_logit_arrays(k, n, t)
    return out


def simulated_cells(cells, reps: int, n_boot: int, rng: np.random.Generator,
                    boot_rng: np.random.Generator | None = None):
    """The one simulation loop: per (questions, icc, rate) cell, ``reps`` simulated runs and every
    method's interval. Yields (cell, k, n, intervals). ``rng`` draws the runs and, unless
    ``boot_rng`` is given, the bootstrap resamples too (in that order, cell by cell)."""
    for m, icc, p in cells:
        k, n = simulate(rng, reps, m, p, icc)
        yield (m, icc, p), k, n, intervals(k, n, boot_rng or rng, n_boot)


def as_answers(k: np.ndarray, n: np.ndarray) -> pd.DataFrame:
    """One simulated run as an answer table (question clusters, boolean em)."""
    rows = []
    for i, (ki, ni) in enumerate(zip(k.astype(int), n.astype(int))):
        rows += [{"question_set": "sim", "question_id": f"q{i:02d}", "em": j < ki} for j in range(ni)]
    return pd.DataFrame(rows)


def check_against_library(seed: int, n_boot: int) -> None:
    """The vectorised code computes what the report computes (same inputs, same numbers)."""
    cells = ((8, 0.3, 0.05), (24, 0.6, 0.2), (4, 0.9, 0.5), (8, 0.9, 0.005))  # (questions, icc, rate)
    for (m, icc, p), k, n, ours in simulated_cells(cells, 3, n_boot, np.random.default_rng(seed + 1),
                                                   np.random.default_rng(7)):
        for r in range(len(k)):
            df = as_answers(k[r], n[r])
            rate, lo, hi = metrics.cluster_interval(df, "em")
            assert np.allclose([lo, hi], [ours[HEADLINE][0][r], ours[HEADLINE][1][r]],
                               atol=1e-9), (m, p, icc, r)
            assert abs(rate - k[r].sum() / n[r].sum()) < 1e-12
            w = metrics.wilson(int(k[r].sum()), int(n[r].sum()))
            assert np.allclose(w, [ours["wilson"][0][r], ours["wilson"][1][r]], atol=1e-9), (w, m, p, icc, r)
        # the bootstrap with the library's own draws: same seed -> same interval
        df = as_answers(k[0], n[0])
        _, blo, bhi = metrics.cluster_bootstrap(df, "em", n_boot=n_boot, seed=11)
        idx = np.random.default_rng(11).integers(0, m, size=(n_boot, m))
        draws = k[0][idx].sum(1) / n[0][idx].sum(1)
        assert np.allclose([blo, bhi], np.quantile(draws, [0.025, 0.975]), atol=1e-12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4000, help="simulated runs per cell")
    ap.add_argument("--n-boot", type=int, default=400, help="bootstrap resamples per simulated run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal", type=float, default=0.93, help="least headline coverage in any cell with >= 8 questions")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    check_against_library(args.seed, min(args.n_boot, 200))
    rng = np.random.default_rng(args.seed)
    rows = []
    for (m, icc, p), k, n, found in simulated_cells(itertools.product(QUESTIONS, ICCS, RATES), args.reps,
                                                    args.n_boot, rng):
        for method, (lo, hi) in found.items():
            cover = (lo <= p) & (p <= hi)  # NaN bounds compare False: a missing interval misses
            rows.append({"questions": m, "icc": icc, "rate": p, "method": method,
                         "coverage": float(cover.mean()), "median_width": float(np.nanmedian(hi - lo)),
                         "zero_em_share": float((k.sum(1) == 0).mean())})
    res = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    table = res.pivot_table(index=["questions", "icc", "rate"], columns="method", values="coverage")
    order = list(dict.fromkeys(res["method"]))
    table = table[order]
    print(f"coverage of nominal 95% intervals, {args.reps} simulated runs per cell, {ANSWERS} answers per question "
          f"(Monte Carlo s.e. ~{np.sqrt(0.95 * 0.05 / args.reps):.3f})")
    print(table.round(3).to_string())
    print("\nworst cell per method and question count:")
    print(res.pivot_table(index="method", columns="questions", values="coverage", aggfunc="min")
          .loc[order].round(3).to_string())
    print("\nmedian interval width (mean over cells) per method and question count:")
    print(res.pivot_table(index="method", columns="questions", values="median_width", aggfunc="mean")
          .loc[order].round(3).to_string())
    head = res[(res["method"] == HEADLINE) & (res["questions"] >= MIN_QUESTIONS)]
    worst = float(head["coverage"].min())
    w = head.loc[head["coverage"].idxmin()]
    print(f"\nworst headline cell: {int(w.questions)} questions, ICC {w.icc}, rate {w.rate}; "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"headline interval coverage, worst cell with >= {MIN_QUESTIONS} questions: {worst:.3f} (goal >= {args.goal})")
    return 0 if worst >= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
