"""bench/interval_coverage.py: a quick run checks its own code against the library, prints the
three goal lines last, and exits 1 when any goal is missed (here impossible ones)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.fakes.bench import load_bench

QUICK = ["--reps", "20", "--diff-reps", "10", "--n-boot", "30"]


def _goal_lines(out: str) -> list[str]:
    return out.strip().splitlines()[-3:]


def test_interval_bench_prints_three_goal_lines_and_exits_1_on_any_missed_goal(capsys):
    bench = load_bench("interval_coverage")
    easy = ["--goal", "0", "--diff-goal", "0", "--width-goal", "100"]
    assert bench.main(QUICK + easy) == 0
    lines = _goal_lines(capsys.readouterr().out)
    assert lines[0].startswith("headline interval coverage, worst cell with >= 8 questions: ")
    assert lines[1].startswith("difference interval coverage, worst cell with >= 8 questions: ")
    assert lines[2].startswith("headline interval width vs the current method, 24 questions, rates <= 10%, ICC 0.2: ")
    for line in lines[:2]:
        assert 0 < float(line.split(": ")[1].split(" ")[0]) <= 1
    assert 0 < float(lines[2].split(": ")[1].split(" ")[0]) < 2
    for impossible in (["--goal", "1.01"], ["--diff-goal", "1.01"], ["--width-goal", "0"]):
        args = dict(zip(easy[::2], easy[1::2]))
        args[impossible[0]] = impossible[1]
        assert bench.main(QUICK + [x for kv in args.items() for x in kv]) == 1, impossible
        assert _goal_lines(capsys.readouterr().out)[-1].endswith(f"(goal <= {float(args['--width-goal'])})")


def test_one_simulation_loop_serves_the_check_and_the_table():
    """simulated_cells draws each cell's runs, then its bootstrap, from one generator, cell by
    cell in the order given: the same numbers as doing it by hand."""
    bench = load_bench("interval_coverage")
    cells = list(itertools.product((4, 8), (0.3,), (0.05, 0.5)))
    got = list(bench.simulated_cells(cells, 5, 20, np.random.default_rng(3)))
    by_hand = np.random.default_rng(3)
    assert [c for c, *_ in got] == cells
    for (m, icc, p), k, n, found in got:
        k2, n2 = bench.simulate(by_hand, 5, m, p, icc)
        want = bench.intervals(k2, n2, by_hand, 20)
        assert np.array_equal(k, k2) and np.array_equal(n, n2) and k.shape == (5, m)
        assert set(found) == set(want) and bench.HEADLINE in found and bench.BASELINE in found
        for method in want:
            assert np.allclose(found[method], want[method], equal_nan=True), method


def test_difference_simulation_designs():
    """The paired designs link the two sides' question rates, 'identical' gives both sides the same
    rates (difference 0), 'unpaired' draws them independently; a control at 0 never shows EM."""
    bench = load_bench("interval_coverage")
    rng = np.random.default_rng(0)
    kt, nt, kc, nc = bench.simulate_pair(rng, 400, 24, 0.0, 0.05, 0.5, "paired 0.9")
    assert kc.sum() == 0 and kt.sum() > 0 and (nt == 50).all() and (nc == 50).all()
    corr = {}
    for design in ("unpaired", "paired 0.9", "identical"):
        kt, _, kc, _ = bench.simulate_pair(rng, 2000, 8, 0.2, 0.0, 0.5, design)
        corr[design] = np.corrcoef(kt.ravel(), kc.ravel())[0, 1]
    assert abs(corr["unpaired"]) < 0.05 < corr["paired 0.9"] < corr["identical"]
    cells = list(bench.diff_cells())
    assert ("identical", 8, 0.2, 0.0, 0.0) in cells and not any(c[0] == "identical" and c[4] > 0 for c in cells)


def test_all_or_nothing_coverage_is_exact_and_agrees_with_simulation():
    """The exact ICC-1 coverage: at the 0-EM bound's own rate the 0-EM runs (probability 0.05) are
    the only upper misses, and the exact figure agrees with simulated all-or-nothing runs."""
    bench = load_bench("interval_coverage")
    from lib import metrics
    m = 8
    e = metrics.edge_bound(m)
    just_above = np.array([e + 1e-6])
    exact = bench.all_or_nothing(m, just_above)[0]
    assert (1 - e) ** m == pytest.approx(0.05)          # the 0-EM bound spends alpha on its one end
    assert exact <= 0.95 + 1e-9
    assert bench.all_or_nothing(m, just_above, edge_alpha=0.025)[0] > exact   # the old edge covered more
    rng = np.random.default_rng(5)
    p = 0.2
    x = rng.binomial(1, p, size=(20000, m)) * 50.0
    _, lo, hi = metrics.beta_binomial_arrays(x, np.full_like(x, 50.0))
    simulated = float(((lo <= p) & (p <= hi)).mean())
    assert simulated == pytest.approx(bench.all_or_nothing(m, np.array([p]))[0], abs=0.006)
    table = bench.all_or_nothing_table()
    assert set(table["questions"]) == {8, 24, 48} and table["worst coverage"].between(0.5, 1).all()
