"""Wall time of an unchanged rerun of the demo grid, as a fraction of the first run.

Runs ``python -m lib.grid run`` twice on the two demo parameters files (as shipped, with
``outputs_dir`` pointed at a temporary folder): the first run executes every stage of both runs
and the report; the second finds every fingerprint unchanged and skips them all. The figure is
rerun seconds / first-run seconds (goal: under 10%).

    .venv/bin/python bench/grid_rerun.py [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GOAL = 0.10


def run_grid(files: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lib.grid", "run", *files], cwd=REPO,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"grid run failed with exit code {proc.returncode}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true", help="keep the temporary outputs folder")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="grid_rerun_"))
    try:
        files = []
        for name in ("demo_medical", "demo_financial"):
            data = yaml.safe_load((REPO / "parameters" / f"{name}.yaml").read_text())
            data["outputs_dir"] = str(tmp / "outputs")
            p = tmp / f"{name}.yaml"
            p.write_text(yaml.safe_dump(data))
            files.append(str(p))
        first, out1 = run_grid(files)
        print(out1[out1.index("grid finished"):].rstrip())
        rerun, out2 = run_grid(files)
        print(out2[out2.index("grid finished"):].rstrip())
        executed = [ln for ln in out2.splitlines() if "started (" in ln]
        if executed:  # then the rerun was not "unchanged": an input moved under us (e.g. an edit to data/)
            raise SystemExit("the rerun executed stages:\n" + "\n".join(executed))
        print(f"first run (2 runs x 3 stages + report): {first:.1f}s")
        print(f"unchanged rerun (every stage skipped): {rerun:.2f}s")
        print(f"rerun / first run: {rerun / first:.2%} (goal < {GOAL:.0%})")
        print(f"grid unchanged rerun / first run: {rerun / first:.3f} (goal <{GOAL})")
    finally:
        if args.keep:
            print(f"outputs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
