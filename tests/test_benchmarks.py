"""Every benchmark exits 1 when its goal is missed: each runs here at a small size with a goal
raised out of reach (its ``--goal`` flag) and must exit 1 *because of the goal*: its
correctness checks pass (they are printed) and its last line is the ``(goal ...)`` line.
No timing is asserted; only the exit code and the checks.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.fakes.bench import load_bench

REPO = Path(__file__).resolve().parent.parent
GOAL_LINE = re.compile(r"^[^:]+: [-+0-9.e]+x? \(goal [<>=]+ ?[-+0-9.e]+x?\)$")


def run_bench(script: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def last_line(p: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert lines, p.stderr[-3000:]
    return lines[-1]


def test_generate_benchmark_fails_an_impossible_goal_and_passes_a_trivial_one():
    small = ["--answers", "6", "--tokens", "3", "--rounds", "1", "--check-prompts", "6"]
    p = run_bench("generate_throughput.py", *small, "--goal", "1e9")
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert GOAL_LINE.match(last_line(p)) and "(goal >= 1e+09x)" in last_line(p)
    assert "every timed answer has 3 new tokens: yes" in p.stdout and "6 identical, 0 differ" in p.stdout
    p = run_bench("generate_throughput.py", *small, "--goal", "0")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


def test_generate_waste_benchmark_fails_an_impossible_goal_and_passes_a_trivial_one():
    # 18 demo paraphrases x 1 sample, 4 slots, 8 new tokens: a few seconds on the tiny model
    small = ["--samples", "1", "--batch-size", "4", "--max-new-tokens", "8"]
    p = run_bench("generate_waste.py", *small, "--goal", "0")  # idle < 0 cannot hold
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert GOAL_LINE.match(last_line(p)) and last_line(p).endswith("(goal < 0.00)")
    assert last_line(p).startswith("idle decode slots, natural stopping: ")
    assert "FAILED" not in p.stdout  # it failed on the goal, not on its checks
    # the check on what was timed: both samplers give the same answers (float64, where rounding cannot differ)
    assert re.search(r"^same answers, static vs continuous: .*, float64 18/18$", p.stdout, re.M), p.stdout
    p = run_bench("generate_waste.py", *small, "--goal", "1.01")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


def test_judge_benchmark_fails_an_impossible_goal_and_passes_a_trivial_one():
    small = ["--n", "60", "--latency", "0.01", "--serial-calls", "3", "--serial-sleep", "0.01",
             "--speedup-goal", "0", "--no-sleep-goal", "0"]
    p = run_bench("judge_throughput.py", *small, "--goal", "0")
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert last_line(p).startswith("judge calling phase / floor: ") and last_line(p).endswith("(goal <= 0)")
    assert "scores checked against the server's: all 60 right" in p.stdout
    assert p.stderr.strip().splitlines()[-1] == "MISSED: calling phase / floor"
    p = run_bench("judge_throughput.py", *small, "--goal", "1e9")
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


def test_judge_benchmark_score_check_catches_wrong_scores():
    """The check the benchmark runs on what it timed: scores forced to 0, or off by one, are wrong."""
    bench = load_bench("judge_throughput")
    from lib.io import sha256_text

    prompts = [f"judge prompt {i}" for i in range(300)]
    right = pd.DataFrame({"answer_id": [f"a{i}" for i in range(300)], "metric": "aligned", "label": "number",
                          "prompt_sha256": [sha256_text(p) for p in prompts],
                          "score": [bench.expected_score(p) for p in prompts]})
    by_sha = {sha256_text(p): p for p in prompts}
    assert bench.check_scores(right, by_sha) == []
    assert bench.check_scores(right.assign(score=0.0), by_sha)
    assert bench.check_scores(right.assign(score=right.score + 1), by_sha)
    assert bench.check_scores(right.assign(label="low_mass"), by_sha)


@pytest.mark.slow
def test_train_padding_benchmark_fails_an_impossible_goal():
    p = run_bench("train_padding.py", "--n", "48", "--n-speed", "8", "--repeats", "1", "--goal", "0")
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert last_line(p).startswith("padding fraction (ours): ") and last_line(p).endswith("(goal < 0)")
    check = next(ln for ln in p.stdout.splitlines() if ln.startswith("check:"))
    assert check.count("(same)") == 2, check  # same real tokens and the same training loss both ways


@pytest.mark.slow
def test_grid_rerun_benchmark_fails_an_impossible_goal():
    """Also runs the benchmark's own check (--small: train and evaluate stages only): after one
    paraphrase of one run's question set changes, exactly that run's evaluate stage executes."""
    p = run_bench("grid_rerun.py", "--small", "--goal", "0")
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    assert last_line(p).startswith("grid unchanged rerun / first run: ") and last_line(p).endswith("(goal <0)")
    assert "WRONG" not in p.stderr, p.stderr[-3000:]
    assert "executed [('demo_medical', 'evaluate')]" in p.stdout


def test_planted_mutants_script_names_a_test_for_each_of_the_seven():
    """bench/planted_mutants.py plants each once-surviving bug; here only its table is checked
    (anchors present exactly once, named tests exist); running it takes ~1 minute."""
    bench = load_bench("planted_mutants")
    assert len(bench.MUTANTS) == 7
    for m in bench.MUTANTS:
        assert (REPO / m.file).read_text(encoding="utf-8").count(m.old) == 1, m.name
        for t in m.tests:
            path, _, name = t.partition("::")
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), t


def test_stale_figures_flags_a_section_whose_modules_changed(tmp_path):
    """bench/stale_figures.py: a record whose modules' content hash no longer matches is stale (exit 1)."""
    bench = load_bench("stale_figures")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.py").write_text("print('fast')\n")
    (tmp_path / "lib.py").write_text("X = 1\n")
    mods = ["bench/b.py", "lib.py"]
    record = f"Measured at: commit abc1234; modules: {' '.join(mods)}; content sha256: {bench.content_hash(mods, tmp_path)}"
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# B\n\n{record}\n")
    assert bench.check(doc, tmp_path) == (0, 1)
    (tmp_path / "lib.py").write_text("X = 2\n")  # the measured code changed: the figure is stale
    assert bench.check(doc, tmp_path) == (1, 1)
    (tmp_path / "lib.py").unlink()
    assert bench.check(doc, tmp_path) == (1, 1)


def test_benchmark_doc_records_every_benchmark_it_reports():
    """docs/benchmarks.md: every bench script with a section has a well-formed record naming
    files that exist (whether the figures are fresh is bench/stale_figures.py's job)."""
    bench = load_bench("stale_figures")
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    records = bench.RECORD.findall(text)
    recorded = {m for _, mods, _ in records for m in mods.split()}
    recorded |= {m for _, mods in bench.NOT_YET.findall(text) for m in mods.split()}  # declared unmeasured
    for section in re.findall(r"^## .*\(`(bench/[a-z_]+\.py)`\)", text, re.M):
        assert section in recorded, f"docs/benchmarks.md: no 'Measured at' record names {section}"
    for _, mods, _ in records:
        for m in mods.split():
            assert (REPO / m).exists(), f"docs/benchmarks.md records a module that does not exist: {m}"
