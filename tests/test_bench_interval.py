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
