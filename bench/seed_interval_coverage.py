"""Coverage of the seed-aggregated EM interval (lib.replication.seed_aggregate) by simulation.

A configuration is trained with S seeds. Each seed's population EM rate p_s is drawn from a Beta
distribution with mean p (the configuration's rate, the target) and between-seed sd tau_p; within a
seed, each of m questions has its own rate from a Beta with mean p_s and intra-class correlation
ICC; each question gets 50 answers. Every seed's final rate gets the report's headline interval
(lib.metrics.cluster_cp_arrays); the seeds are pooled by seed_aggregate; we count how often the
pooled interval contains p. For comparison, the naive interval that pools every answer of every
seed as if they were one run (clusters = questions x seeds, no between-seed term) is scored too.

    python bench/seed_interval_coverage.py [--reps 2000] [--goal 0.93]

Last line: ``seed-aggregated interval coverage, worst cell: <value> (goal >= 0.93)``; exit 1 when
it misses the goal or a check of the method fails.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time

import numpy as np

from lib.metrics import cluster_cp_arrays
from lib.replication import seed_aggregate

ANSWERS = 50


def beta_draw(rng: np.random.Generator, mean: np.ndarray, sd_or_icc: float, size, icc: bool) -> np.ndarray:
    """Beta draws with the given mean and either an sd or an ICC (var = icc * mean * (1 - mean))."""
    mean = np.clip(mean, 1e-4, 1 - 1e-4)
    var = sd_or_icc * mean * (1 - mean) if icc else np.minimum(sd_or_icc ** 2, 0.9 * mean * (1 - mean))
    if np.all(var <= 0):
        return np.broadcast_to(mean, size).copy()
    k = mean * (1 - mean) / np.maximum(var, 1e-12) - 1
    return rng.beta(mean * k, (1 - mean) * k, size=size)


def simulate(rng: np.random.Generator, p: float, tau_p: float, seeds: int, m: int, icc: float, reps: int):
    seed_rates = beta_draw(rng, np.full((reps, seeds), p), tau_p, (reps, seeds), icc=False) if tau_p > 0 \
        else np.full((reps, seeds), p)
    q_rates = beta_draw(rng, np.repeat(seed_rates[..., None], m, axis=2), icc, (reps, seeds, m), icc=True)
    k = rng.binomial(ANSWERS, q_rates).astype(float)
    n = np.full_like(k, ANSWERS)
    rate, lo, hi, _ = cluster_cp_arrays(k, n)          # (reps, seeds)
    covered = np.empty(reps, dtype=bool)
    width = np.empty(reps)
    for r in range(reps):
        agg = seed_aggregate(rate[r], lo[r], hi[r])
        covered[r] = agg["lo"] <= p <= agg["hi"]
        width[r] = agg["hi"] - agg["lo"]
    # naive: every answer pooled as one run, clusters = question x seed
    _, nlo, nhi, _ = cluster_cp_arrays(k.reshape(reps, -1), n.reshape(reps, -1))
    naive = (nlo <= p) & (p <= nhi)
    return covered.mean(), naive.mean(), float(np.median(width))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000, help="simulated studies per cell")
    ap.add_argument("--goal", type=float, default=0.93, help="least coverage of the worst cell")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    # check of the method on a case worked by hand (tests/test_replication.py has more)
    v = 0.02 ** 2
    z = 1.959963984540054
    agg = seed_aggregate([0.1, 0.6], [0.1 - z * 0.02, 0.6 - z * 0.02], [0.1 + z * 0.02, 0.6 + z * 0.02])
    if not (abs(agg["rate"] - 0.35) < 1e-9 and abs(agg["tau"] - np.sqrt(0.125 - v)) < 1e-9):
        print(f"check failed: seed_aggregate gave {agg}", file=sys.stderr)
        return 1

    rng = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    print(f"{'seeds':>5} {'questions':>9} {'rate':>6} {'seed sd':>7} {'ICC':>4} {'coverage':>8} {'naive':>6} "
          f"{'median width':>12}")
    worst = 1.0
    for seeds, m, p, tau_rel, icc in itertools.product((2, 3, 5), (8, 24), (0.05, 0.2, 0.5), (0.0, 0.5), (0.3, 0.6)):
        tau_p = tau_rel * p if p <= 0.5 else tau_rel * (1 - p)   # between-seed sd: half the rate (or 0)
        cov, naive, width = simulate(rng, p, tau_p, seeds, m, icc, args.reps)
        worst = min(worst, cov)
        print(f"{seeds:>5} {m:>9} {p:>6.0%} {tau_p:>7.3f} {icc:>4.1f} {cov:>8.3f} {naive:>6.3f} {width:>12.3f}")
    print(f"({args.reps} simulated studies per cell, {time.monotonic() - t0:.0f} s; 95% nominal; 'naive' pools every "
          "answer of every seed as one run)")
    print(f"seed-aggregated interval coverage, worst cell: {worst:.3f} (goal >= {args.goal})")
    return 0 if worst >= args.goal else 1


if __name__ == "__main__":
    raise SystemExit(main())
