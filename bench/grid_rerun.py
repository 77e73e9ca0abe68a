"""Wall time of an unchanged rerun of the demo grid, as a fraction of the first run; and a
rerun after one input changed, which must execute exactly the stages that read that input.

Runs ``python -m lib.grid run`` three times on the two demo parameters files (as shipped, with
``outputs_dir`` in a temporary folder and each run reading its own copy of the question sets):

1. the first run executes every stage of both runs and the report;
2. the unchanged rerun must execute nothing (every fingerprint unchanged); the figure is its
   wall time / the first run's (goal: under 10%);
3. then one paraphrase of the medical run's copy of a question set is edited, and the grid
   must execute exactly demo_medical's evaluate and judge stages and the report: not its
   training, and nothing of demo_financial. A fingerprint that ignored its inputs would pass
   step 2 and fail here; one that followed a non-input would fail step 2.

    .venv/bin/python bench/grid_rerun.py [--keep] [--small] [--goal 0.1]

``--small`` shrinks the runs (16 training examples, 1 epoch, one question set, 1 sample, 8 new
tokens) and runs only the train and evaluate stages (the edit then re-executes demo_medical's
evaluate alone), for the test that checks this script's exit code and its own check in a minute. Last line:
``grid unchanged rerun / first run: <ratio> (goal <<goal>)``; exit 1 when the goal is missed
or a rerun executed other stages than it should.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.10
RUNS = ("demo_medical", "demo_financial")
SMALL = {"max_train_examples": 16, "epochs": 1, "checkpoints_in_first_epoch": 1, "n_samples": 1,
         "max_new_tokens": 8}
STARTED = re.compile(r"^\d\d:\d\d:\d\d\s+(\S+)\s+(\S+)\s+started \(")


def run_grid(files: list[str], stages: tuple[str, ...]) -> tuple[float, str, set[tuple[str, str]]]:
    """(seconds, output, the (run, stage) pairs it executed)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lib.grid", "run", *files, "--stages", ",".join(stages)], cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"grid run failed with exit code {proc.returncode}")
    executed = {(m.group(1), m.group(2)) for m in map(STARTED.match, proc.stdout.splitlines()) if m}
    return seconds, proc.stdout, executed


def tail(out: str) -> str:
    return out[out.index("grid finished"):].rstrip() if "grid finished" in out else out[-2000:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary outputs folder")
    ap.add_argument("--small", action="store_true", help="tiny runs (for the test of this script)")
    ap.add_argument("--goal", type=float, default=GOAL, help="largest rerun / first-run ratio that passes")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="grid_rerun_"))
    problems = []
    try:
        files, qcopies = [], {}
        for name in RUNS:
            data = yaml.safe_load((REPO / "parameters" / f"{name}.yaml").read_text())
            data["outputs_dir"] = str(tmp / "outputs")
            data["seeds"] = []  # one run per file (the demo files run two seeds each)
            if args.small:
                data.update(SMALL, question_sets=data["question_sets"][:1])
            qdir = tmp / "questions" / name
            qdir.mkdir(parents=True)
            copies = []
            for q in data["question_sets"]:
                shutil.copy(REPO / q, qdir / Path(q).name)
                copies.append(str(qdir / Path(q).name))
            data["question_sets"], qcopies[name] = copies, copies
            p = tmp / f"{name}.yaml"
            p.write_text(yaml.safe_dump(data))
            files.append(str(p))
        stages = ("train", "evaluate") if args.small else ("train", "evaluate", "judge", "report")
        first, out1, ex1 = run_grid(files, stages)
        print(tail(out1))
        want1 = {(r, s) for r in RUNS for s in stages if s != "report"} | ({("report", "report")} & {
            ("report", s) for s in stages})
        if ex1 != want1:
            problems.append(f"first run executed {sorted(ex1)}, expected {sorted(want1)}")
        rerun, out2, ex2 = run_grid(files, stages)
        print(tail(out2))
        if ex2:
            problems.append(f"the unchanged rerun executed {sorted(ex2)}, expected nothing")

        # one input changes: a paraphrase in demo_medical's copy of its first question set
        q = Path(qcopies["demo_medical"][0])
        questions = yaml.safe_load(q.read_text(encoding="utf-8"))
        questions[0]["paraphrases"][0] = "Honestly, " + questions[0]["paraphrases"][0]
        q.write_text(yaml.safe_dump(questions, sort_keys=False, allow_unicode=True), encoding="utf-8")
        _, out3, ex3 = run_grid(files, stages)
        print(tail(out3))
        want3 = {("demo_medical", "evaluate"), ("demo_medical", "judge"), ("report", "report")} & (
            {("demo_medical", s) for s in stages} | {("report", s) for s in stages})
        print(f"after editing one paraphrase of {q.name} (demo_medical's copy): executed {sorted(ex3)}")
        if ex3 != want3:
            problems.append(f"after one input changed the grid executed {sorted(ex3)}, expected {sorted(want3)}")
        print(f"first run (2 runs x {len([s for s in stages if s != 'report'])} stages"
              f"{' + report' if 'report' in stages else ''}): {first:.1f}s")
        print(f"unchanged rerun (every stage skipped): {rerun:.2f}s")
        for p in problems:
            print(f"WRONG: {p}", file=sys.stderr)
        print(f"grid unchanged rerun / first run: {rerun / first:.3f} (goal <{args.goal:g})")
        return 0 if rerun / first < args.goal and not problems else 1
    finally:
        if args.keep:
            print(f"outputs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
