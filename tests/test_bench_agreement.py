"""bench/agreement_coverage.py: a quick run checks its vectorised jackknife against the library, prints
its goal line last and exits 1 when the goal is missed; its population values are the exact ones."""
from __future__ import annotations

import numpy as np
import pytest

from tests.fakes.bench import load_bench

QUICK = ["--reps", "4", "--n-boot", "10"]


def test_agreement_bench_prints_its_goal_line_and_exits_1_on_a_missed_goal(capsys):
    bench = load_bench("agreement_coverage")
    assert bench.main(QUICK + ["--goal", "0"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("judge agreement interval coverage, worst cell with >= 8 questions: ")
    assert last.endswith("(goal >= 0.0)") and 0 <= float(last.split(": ")[1].split(" ")[0]) <= 1
    assert bench.main(QUICK + ["--goal", "1.01"]) == 1


def test_population_values_match_a_large_simulation():
    """The exact kappa and Spearman of the bench's model against 400,000 simulated answer pairs."""
    bench = load_bench("agreement_coverage")
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    p, tau = 0.2, 0.5
    sa, sb, cut = bench.simulate(rng, 1, 4000, p, 0.6, tau)
    a, b = sa.ravel(), sb.ravel()
    kappa, rho = bench.truth(p, tau)
    n11, n10 = np.sum((a >= cut) & (b >= cut)), np.sum((a >= cut) & (b < cut))
    n01, n00 = np.sum((a < cut) & (b >= cut)), np.sum((a < cut) & (b < cut))
    assert float(bench.kappa_from_counts(n11, n10, n01, n00)) == pytest.approx(kappa, abs=0.02)
    assert spearmanr(a[::10], b[::10]).statistic == pytest.approx(rho, abs=0.02)
    assert bench.aligned_score(np.array([cut - 1e-9, cut]), cut).tolist()[0] > 30 >= bench.aligned_score(np.array([cut]), cut)[0]
