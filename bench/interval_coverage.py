"""Interval coverage: how often the report's EM intervals contain the truth, and how wide they are.

Two simulations of runs like the ones people report, 50 scored answers per question.

**Headline (one rate).** m questions (4, 8, 24, 48). Each question's EM rate p_i is drawn from a
Beta distribution with mean p (the true rate: 0.5%, 5%, 20%, 50%) and intra-question correlation
ICC = 1 / (a + b + 1) (0.2, 0.3, 0.6, 0.9: answers to one question are far more alike than answers
to different questions), then its EM count from Binomial(50, p_i). The estimand is p, the EM rate
of a question drawn from the same population.

  * beta_binomial     - lib.metrics.beta_binomial_arrays, **the headline** (lib.metrics.cluster_interval):
                        beta-binomial profile-likelihood interval, F(1, m-1)-calibrated, exact
                        all-or-nothing bound at 0 EM.
  * kg_monotone       - the previous headline (lib.metrics.cluster_cp_arrays): Korn & Graubard's
                        Clopper-Pearson on the design-effect sample size, n_eff = m x (z/t)^2 at 0 EM,
                        bounds floored at the 0-EM bound whatever the data (the width baseline).
  * kg_edge_m         - the same without the floor.
  * cluster_bootstrap - questions resampled with replacement, percentile interval.
  * wilson            - all answers as if independent (lib.metrics.wilson).

**Differences (treated minus control).** Two sides of m questions (8, 24; 4 shown, never reported).
Control EM rate 0 ("one side at 0": no EM possible), 2% or 10%; true difference 0, 5 or 20 points;
ICC 0.2, 0.5, 0.9 on both sides. Designs: *unpaired* (each side its own questions); *paired* (the
same questions: each question's two rates are linked by a Gaussian copula with correlation 0.5 or
0.9 between their latent normals, so a question that provokes EM in one run tends to in the other);
*identical* (the same question rates on both sides, difference 0: the counts differ only by which
answers were sampled). Methods:

  * mover             - lib.metrics.rate_difference: each side's headline interval, combined by
                        square-and-add (MOVER), crediting the paired correlation only as far as its
                        lower confidence bound (Fisher z) shows it.
  * mover_r0          - the same, sides treated as independent (r = 0).
  * mover_rhat        - the same with the raw correlation estimate.
  * bootstrap         - the previous method (lib.metrics.bootstrap_difference until this issue):
                        percentile bootstrap over questions, paired when questions are shared.

Before the tables the vectorised code is checked against the library's functions on simulated runs.
The last three lines are the goals:

    python bench/interval_coverage.py                  # 4,000 headline / 1,500 difference runs per cell
    python bench/interval_coverage.py --reps 200 --diff-reps 100   # quick check
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import beta as beta_dist, norm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import metrics  # noqa: E402

QUESTIONS = (4, 8, 24, 48)
ANSWERS = 50
RATES = (0.005, 0.05, 0.20, 0.50)
ICCS = (0.2, 0.3, 0.6, 0.9)
HEADLINE, BASELINE = "beta_binomial", "kg_monotone"
DIFF_HEADLINE = "mover"
MIN_QUESTIONS = metrics.MIN_QUESTIONS  # goals are judged on cells with at least this many questions
# the width goal: mean per-run width ratio (headline / previous headline) on these cells
WIDTH_CELLS = {"questions": 24, "icc": 0.2, "max_rate": 0.10}

DIFF_QUESTIONS = (4, 8, 24)
DIFF_CONTROL = (0.0, 0.02, 0.10)
DIFF_DELTA = (0.0, 0.05, 0.20)
DIFF_ICCS = (0.2, 0.5, 0.9)
DESIGNS = {"unpaired": None, "paired 0.5": 0.5, "paired 0.9": 0.9, "identical": 1.0}


# ------------------------------------------------------------------------------------------
# headline
# ------------------------------------------------------------------------------------------

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


def intervals(k: np.ndarray, n: np.ndarray, rng: np.random.Generator, n_boot: int) -> dict[str, tuple]:
    z = float(norm.ppf(0.975))
    out = {}
    _, lo, hi = metrics.beta_binomial_arrays(k, n, 0.95)
    out["beta_binomial"] = (lo, hi)
    _, lo, hi, _ = metrics.cluster_cp_arrays(k, n, 0.95)
    out["kg_monotone"] = (lo, hi)
    _, lo, hi, _ = metrics.cluster_cp_arrays(k, n, 0.95, monotone=False)
    out["kg_edge_m"] = (lo, hi)
    out["cluster_bootstrap"] = bootstrap_arrays(k, n, rng, n_boot)
    out["wilson"] = wilson_arrays(k.sum(1), n.sum(1), z)
    return out


def simulated_cells(cells, reps: int, n_boot: int, rng: np.random.Generator,
                    boot_rng: np.random.Generator | None = None):
    """The one simulation loop: per (questions, icc, rate) cell, ``reps`` simulated runs and every
    method's interval. Yields (cell, k, n, intervals). ``rng`` draws the runs and, unless
    ``boot_rng`` is given, the bootstrap resamples too (in that order, cell by cell)."""
    for m, icc, p in cells:
        k, n = simulate(rng, reps, m, p, icc)
        yield (m, icc, p), k, n, intervals(k, n, boot_rng or rng, n_boot)


def as_answers(k: np.ndarray, n: np.ndarray, question_set: str = "sim") -> pd.DataFrame:
    """One simulated run as an answer table (question clusters, boolean em)."""
    rows = []
    for i, (ki, ni) in enumerate(zip(k.astype(int), n.astype(int))):
        rows += [{"question_set": question_set, "question_id": f"q{i:02d}", "em": j < ki} for j in range(ni)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# differences
# ------------------------------------------------------------------------------------------

def _question_rates(u: np.ndarray, p: float, icc: float) -> np.ndarray:
    """Question rates with mean p and the given ICC at uniform quantiles u (0 when p is 0)."""
    if p <= 0:
        return np.zeros_like(u)
    s = 1 / icc - 1
    return beta_dist.ppf(u, p * s, (1 - p) * s)


def simulate_pair(rng: np.random.Generator, reps: int, m: int, control: float, delta: float, icc: float,
                  design: str) -> tuple[np.ndarray, ...]:
    """(kt, nt, kc, nc): treated and control EM counts, reps x m, for one difference cell."""
    link = DESIGNS[design]
    z_c = rng.standard_normal((reps, m))
    if link is None:                      # unpaired: the treated run has its own questions
        z_t = rng.standard_normal((reps, m))
    else:
        z_t = link * z_c + np.sqrt(max(0.0, 1 - link ** 2)) * rng.standard_normal((reps, m))
    p_c = _question_rates(norm.cdf(z_c), control, icc)
    p_t = p_c.copy() if design == "identical" else _question_rates(norm.cdf(z_t), control + delta, icc)
    kc = rng.binomial(ANSWERS, p_c).astype(float)
    kt = rng.binomial(ANSWERS, p_t).astype(float)
    n = np.full_like(kc, float(ANSWERS))
    return kt, n, kc, n.copy()


def diff_cells():
    for design in DESIGNS:
        for m, icc, control in itertools.product(DIFF_QUESTIONS, DIFF_ICCS, DIFF_CONTROL):
            for delta in ((0.0,) if design == "identical" else DIFF_DELTA):
                yield design, m, icc, control, delta


def paired_bootstrap_arrays(kt, nt, kc, nc, rng, n_boot: int, paired: bool, chunk: int = 100):
    reps, m = kt.shape
    lo, hi = np.empty(reps), np.empty(reps)
    for s in range(0, reps, chunk):
        sl = slice(s, s + chunk)
        r = len(kt[sl])
        i_t = rng.integers(0, m, size=(r, n_boot, m))
        i_c = i_t if paired else rng.integers(0, m, size=(r, n_boot, m))

        def ratio(k, nn, idx):
            return (np.take_along_axis(k[sl][:, None, :], idx, axis=2).sum(-1)
                    / np.take_along_axis(nn[sl][:, None, :], idx, axis=2).sum(-1))
        draws = ratio(kt, nt, i_t) - ratio(kc, nc, i_c)
        lo[sl], hi[sl] = np.quantile(draws, [0.025, 0.975], axis=1)
    return lo, hi


def diff_intervals(kt, nt, kc, nc, paired: bool, rng, n_boot: int) -> dict[str, tuple]:
    pt, lt, ut = metrics.beta_binomial_arrays(kt, nt, 0.95)
    pc, lc, uc = metrics.beta_binomial_arrays(kc, nc, 0.95)
    out = {}
    r = metrics.difference_correlation(kt, nt, kc, nc) if paired else 0.0
    out["mover"] = metrics.mover_bounds(pt, lt, ut, pc, lc, uc, r)
    out["mover_r0"] = metrics.mover_bounds(pt, lt, ut, pc, lc, uc, 0.0)
    r_hat = metrics.paired_correlation(kt, nt, kc, nc) if paired else 0.0
    out["mover_rhat"] = metrics.mover_bounds(pt, lt, ut, pc, lc, uc, r_hat)
    out["bootstrap"] = paired_bootstrap_arrays(kt, nt, kc, nc, rng, n_boot, paired)
    return out


# ------------------------------------------------------------------------------------------
# the extreme the cells stop short of: every question all-or-nothing (ICC 1), computed exactly
# ------------------------------------------------------------------------------------------

def all_or_nothing(m: int, rates: np.ndarray, edge_alpha: float | None = None) -> np.ndarray:
    """Exact coverage of the headline at each true rate when every question is all-or-nothing: the
    number of EM questions is Binomial(m, p) and a run with x of them has x questions at 50/50 and the
    rest at 0/50, so coverage(p) = sum over x of P(x) [p inside the interval of x]. ``edge_alpha``
    replaces the 0-EM / all-EM bound by 1 - edge_alpha^(1/m) (0.025: Clopper-Pearson's, the bound
    before this round) to show what the edge rule alone changes."""
    from scipy.stats import binom
    x = np.arange(m + 1)
    k = (np.arange(m)[None, :] < x[:, None]) * float(ANSWERS)
    _, lo, hi = metrics.beta_binomial_arrays(k, np.full_like(k, float(ANSWERS)), 0.95)
    if edge_alpha is not None:
        hi[0], lo[m] = 1 - edge_alpha ** (1 / m), edge_alpha ** (1 / m)
    inside = (lo[None, :] <= rates[:, None]) & (rates[:, None] <= hi[None, :])
    return (binom.pmf(x[None, :], m, rates[:, None]) * inside).sum(1)


def all_or_nothing_table() -> pd.DataFrame:
    rates = np.arange(1, 1000) / 1000
    rows = []
    for m in QUESTIONS[1:]:
        for label, alpha in (("headline", None), ("previous edge (alpha/2)", 0.025)):
            e = metrics.edge_bound(m) if alpha is None else 1 - alpha ** (1 / m)   # each rule's own 0-EM bound
            near = (rates > e) & (rates <= e + 0.01)
            cov = all_or_nothing(m, rates, alpha)
            rows.append({"questions": m, "edge rule": label, "worst coverage": round(float(cov.min()), 3),
                         "at rate": float(rates[cov.argmin()]),
                         "worst, rates <= 0.01 above its 0-EM bound": round(float(cov[near].min()), 3)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------
# the check against the library
# ------------------------------------------------------------------------------------------

def check_against_library(seed: int, n_boot: int) -> None:
    """The vectorised code computes what the report computes (same inputs, same numbers)."""
    cells = ((8, 0.3, 0.05), (24, 0.6, 0.2), (4, 0.9, 0.5), (8, 0.9, 0.005))  # (questions, icc, rate)
    for (m, icc, p), k, n, ours in simulated_cells(cells, 3, n_boot, np.random.default_rng(seed + 1),
                                                   np.random.default_rng(7)):
        for r in range(len(k)):
            df = as_answers(k[r], n[r])
            rate, lo, hi = metrics.cluster_interval(df, "em")
            assert np.allclose([lo, hi], [ours[HEADLINE][0][r], ours[HEADLINE][1][r]], atol=1e-9, equal_nan=True), \
                (m, p, icc, r)
            assert abs(rate - k[r].sum() / n[r].sum()) < 1e-12
            w = metrics.wilson(int(k[r].sum()), int(n[r].sum()))
            assert np.allclose(w, [ours["wilson"][0][r], ours["wilson"][1][r]], atol=1e-9), (w, m, p, icc, r)
        # the bootstrap with the library's own draws: same seed -> same interval
        df = as_answers(k[0], n[0])
        _, blo, bhi = metrics.cluster_bootstrap(df, "em", n_boot=n_boot, seed=11)
        idx = np.random.default_rng(11).integers(0, m, size=(n_boot, m))
        draws = k[0][idx].sum(1) / n[0][idx].sum(1)
        assert np.allclose([blo, bhi], np.quantile(draws, [0.025, 0.975]), atol=1e-12)
    rng = np.random.default_rng(seed + 2)
    for design, m, icc, control, delta in (("paired 0.9", 8, 0.5, 0.02, 0.05), ("unpaired", 24, 0.2, 0.10, 0.20),
                                            ("identical", 8, 0.9, 0.10, 0.0), ("paired 0.5", 24, 0.9, 0.0, 0.05)):
        kt, nt, kc, nc = simulate_pair(rng, 3, m, control, delta, icc, design)
        paired = DESIGNS[design] is not None
        ours = diff_intervals(kt, nt, kc, nc, paired, rng, 20)["mover"]
        for r in range(3):
            got = metrics.rate_difference(as_answers(kt[r], nt[r], "t"),
                                          as_answers(kc[r], nc[r], "t" if paired else "c"), "em")
            assert got["paired"] == paired and got["interval"] == "mover", got
            assert np.allclose([got["lo"], got["hi"]], [ours[0][r], ours[1][r]], atol=1e-9), (design, got, ours)


# ------------------------------------------------------------------------------------------

def _worst(frame: pd.DataFrame, method: str, qcol: str = "questions") -> pd.Series:
    d = frame[(frame["method"] == method) & (frame[qcol] >= MIN_QUESTIONS)]
    return d.loc[d["coverage"].idxmin()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4000, help="simulated runs per headline cell")
    ap.add_argument("--diff-reps", type=int, default=1500, help="simulated run pairs per difference cell")
    ap.add_argument("--n-boot", type=int, default=400, help="bootstrap resamples per simulated run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--goal", type=float, default=0.93, help="least headline coverage in any cell with >= 8 questions")
    ap.add_argument("--diff-goal", type=float, default=0.93,
                    help="least difference coverage in any cell with >= 8 questions")
    ap.add_argument("--width-goal", type=float, default=0.6,
                    help="largest mean width ratio (headline / previous headline) on the width cells")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    check_against_library(args.seed, min(args.n_boot, 200))
    pd.set_option("display.width", 220)
    pd.set_option("display.max_rows", 500)
    rng = np.random.default_rng(args.seed)

    # --- headline -------------------------------------------------------------------------
    rows, ratios = [], []
    for (m, icc, p), k, n, found in simulated_cells(itertools.product(QUESTIONS, ICCS, RATES), args.reps,
                                                    args.n_boot, rng):
        for method, (lo, hi) in found.items():
            cover = (lo <= p) & (p <= hi)  # NaN bounds compare False: a missing interval misses
            rows.append({"questions": m, "icc": icc, "rate": p, "method": method,
                         "coverage": float(cover.mean()), "mean_width": float(np.nanmean(hi - lo)),
                         "zero_em_share": float((k.sum(1) == 0).mean())})
        if m == WIDTH_CELLS["questions"] and icc == WIDTH_CELLS["icc"] and p <= WIDTH_CELLS["max_rate"]:
            new = found[HEADLINE][1] - found[HEADLINE][0]
            old = found[BASELINE][1] - found[BASELINE][0]
            ratios.append({"rate": p, "mean_ratio": float(np.mean(new / old)),
                           "ratio_of_means": float(new.mean() / old.mean())})
    res = pd.DataFrame(rows)
    order = list(dict.fromkeys(res["method"]))
    print(f"HEADLINE: coverage of nominal 95% intervals, {args.reps} simulated runs per cell, {ANSWERS} answers "
          f"per question (Monte Carlo s.e. ~{np.sqrt(0.95 * 0.05 / args.reps):.3f})")
    print(res.pivot_table(index=["questions", "icc", "rate"], columns="method", values="coverage")[order]
          .round(3).to_string())
    print("\nmean interval width:")
    print(res.pivot_table(index=["questions", "icc", "rate"], columns="method", values="mean_width")[order]
          .round(3).to_string())
    print("\nworst cell per method and question count:")
    print(res.pivot_table(index="method", columns="questions", values="coverage", aggfunc="min")
          .loc[order].round(3).to_string())
    print("\nmean width (mean over cells) per method and question count:")
    print(res.pivot_table(index="method", columns="questions", values="mean_width", aggfunc="mean")
          .loc[order].round(3).to_string())
    print("\nevery question all-or-nothing (ICC 1, exact; beyond the cells above, not a goal): coverage over true "
          "rates 0.001-0.999; the 0-EM bound is the headline's (1 - 0.05^(1/m)) or the previous 1 - 0.025^(1/m)")
    print(all_or_nothing_table().to_string(index=False))
    wr = pd.DataFrame(ratios)
    print(f"\nwidth ratio {HEADLINE} / {BASELINE}, {WIDTH_CELLS['questions']} questions, ICC {WIDTH_CELLS['icc']}:")
    print(wr.round(3).to_string(index=False))

    # --- differences ----------------------------------------------------------------------
    drows = []
    for design, m, icc, control, delta in diff_cells():
        kt, nt, kc, nc = simulate_pair(rng, args.diff_reps, m, control, delta, icc, design)
        found = diff_intervals(kt, nt, kc, nc, DESIGNS[design] is not None, rng, args.n_boot)
        for method, (lo, hi) in found.items():
            cover = (lo <= delta) & (delta <= hi)
            drows.append({"design": design, "questions": m, "icc": icc, "control": control, "delta": delta,
                          "method": method, "coverage": float(cover.mean()), "mean_width": float(np.mean(hi - lo)),
                          "miss_below": float((hi < delta).mean()), "miss_above": float((lo > delta).mean()),
                          "zero_width": float((hi - lo <= 1e-12).mean())})
    dres = pd.DataFrame(drows)
    dorder = list(dict.fromkeys(dres["method"]))
    print(f"\nDIFFERENCES (treated - control): coverage of nominal 95% intervals, {args.diff_reps} simulated pairs "
          f"per cell (Monte Carlo s.e. ~{np.sqrt(0.95 * 0.05 / args.diff_reps):.3f})")
    print(dres.pivot_table(index=["design", "questions", "icc", "control", "delta"], columns="method",
                           values="coverage")[dorder].round(3).to_string())
    print("\nworst cell per method, design and question count:")
    print(dres.pivot_table(index=["method", "design"], columns="questions", values="coverage", aggfunc="min")
          .round(3).to_string())
    print("\nmean width (mean over cells) per method, design and question count:")
    print(dres.pivot_table(index=["method", "design"], columns="questions", values="mean_width", aggfunc="mean")
          .round(3).to_string())
    print("\nshare of zero-width intervals, largest over cells:")
    print(dres.pivot_table(index="method", columns="design", values="zero_width", aggfunc="max").round(3).to_string())

    hw = _worst(res, HEADLINE)
    dw = _worst(dres, DIFF_HEADLINE)
    width = float(wr["mean_ratio"].mean())
    print(f"\nworst headline cell: {int(hw.questions)} questions, ICC {hw.icc}, rate {hw.rate}; worst difference "
          f"cell: {dw.design}, {int(dw.questions)} questions, ICC {dw.icc}, control {dw.control}, difference "
          f"{dw.delta}; {time.perf_counter() - t0:.0f} s")
    print(f"headline interval coverage, worst cell with >= {MIN_QUESTIONS} questions: {hw.coverage:.3f} "
          f"(goal >= {args.goal})")
    print(f"difference interval coverage, worst cell with >= {MIN_QUESTIONS} questions: {dw.coverage:.3f} "
          f"(goal >= {args.diff_goal})")
    print(f"headline interval width vs the current method, {WIDTH_CELLS['questions']} questions, rates <= "
          f"{WIDTH_CELLS['max_rate']:.0%}, ICC {WIDTH_CELLS['icc']}: {width:.3f} (goal <= {args.width_goal})")
    ok = hw.coverage >= args.goal and dw.coverage >= args.diff_goal and width <= args.width_goal
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
