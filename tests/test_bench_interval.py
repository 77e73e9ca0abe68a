"""bench/interval_coverage.py: a quick run checks its own code against the library, and the
script exits 1 when its goal is missed (here an impossible goal)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("interval_coverage", REPO / "bench" / "interval_coverage.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interval_bench_exits_1_on_a_missed_goal(capsys):
    bench = _bench()
    assert bench.main(["--reps", "30", "--n-boot", "50", "--goal", "1.01"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("headline interval coverage, worst cell with >= 8 questions: ")
    assert last.endswith("(goal >= 1.01)")
    value = float(last.split(": ")[1].split(" ")[0])
    assert 0 < value <= 1
    assert bench.main(["--reps", "30", "--n-boot", "50", "--goal", "0"]) == 0


def test_one_simulation_loop_serves_the_check_and_the_table():
    """simulated_cells draws each cell's runs, then its bootstrap, from one generator, cell by
    cell in the order given: the same numbers as doing it by hand."""
    import itertools

    import numpy as np

    bench = _bench()
    cells = list(itertools.product((4, 8), (0.3,), (0.05, 0.5)))
    got = list(bench.simulated_cells(cells, 5, 20, np.random.default_rng(3)))
    by_hand = np.random.default_rng(3)
    assert [c for c, *_ in got] == cells
    for (m, icc, p), k, n, found in got:
        k2, n2 = bench.simulate(by_hand, 5, m, p, icc)
        want = bench.intervals(k2, n2, by_hand, 20)
        assert np.array_equal(k, k2) and np.array_equal(n, n2) and k.shape == (5, m)
        assert set(found) == set(want) and "cluster_cp" in found
        for method in want:
            assert np.allclose(found[method], want[method], equal_nan=True), method
