"""The grid runner: every run of a study through the four notebooks, unattended.

    python -m lib.grid run parameters/demo_medical.yaml parameters/demo_financial.yaml
    python -m lib.grid run parameters/study_*.yaml --jobs 2 --gpus 0,1
    python -m lib.grid run parameters/study_*.yaml --executor slurm --partition gpu --time 12:00:00

1. Every parameters file is validated first (unknown key, wrong type or NaN, a parameters file
   that is not UTF-8, every line of the training JSONL, question sets and judge prompts, URLs
   included: downloaded into ``<outputs_dir>/.cache/questions`` now, a judge prompt for every
   metric, the device, a judge without credentials): one line naming the file and the key,
   exit code 2, nothing run. ``--dry-run`` validates without downloading anything.
   A run folder (and the report folder) is written by one process at a time (:mod:`lib.lock`):
   when another grid or notebook holds it, the grid stops with one line naming the holder
   (pid, host, start time), or with ``--wait-lock`` waits for it.
2. Each run executes 01_train, 02_evaluate, 03_judge in order with papermill: the full
   validated config is injected, the rendered notebook and its HTML export land in
   ``outputs/<run>/notebooks/``. Runs are independent: ``--jobs N`` runs N at once, ``--gpus``
   gives each its own GPU (CUDA_VISIBLE_DEVICES), ``--executor slurm`` submits one Slurm job per
   run through submitit. While a stage runs, the grid prints its progress (training steps,
   answers, judgments) at most every ``--progress-every`` seconds: the stage appends lines to
   ``outputs/<run>/progress.jsonl`` (:mod:`lib.progress`) and the grid tails that file, so this
   works for every executor, Slurm nodes included.
3. 04_report runs once over the runs of the grid (``outputs/report/report.ipynb`` + ``.html``);
   on Slurm it is a job that depends on the run jobs.

A stage is skipped when its fingerprint (its parameters and the sha256 of its input files, see
:mod:`lib.fingerprint`) equals the one recorded in ``outputs/<run>/stages.json`` when it last
finished. ``--force STAGE`` re-executes its notebook anyway (the stage's own resume logic still
reuses finished work). The runner never deletes anything a stage wrote: a stage that failed or
was killed (``stages.json`` says 'running') is executed again and resumes from its own persisted
state (checkpoints, generation parts, the judge cache). ``--dry-run`` shows what would run.

A failing stage keeps its rendered notebook up to the failing cell; the runner prints the
error's last line and the notebook path, skips the rest of that run, finishes the other runs,
and exits 1 after a summary table (run, stage, status, time).

This module is the command line and :func:`run_grid`, which ties the parts together; each part
lives in its own module:

* :mod:`lib.grid_jobs`: the records they share (Options, Job, StageResult, GridError) and the
  printing (one line per event, the progress tail);
* :mod:`lib.grid_checks`: step 1, validation, and the folders other processes hold;
* :mod:`lib.grid_runner`: step 2, one run's stage notebooks through papermill, skipped when up to
  date, under the run folder's lock (this is what a worker or a Slurm job runs);
* :mod:`lib.grid_report`: step 3, the report over the runs that completed;
* :mod:`lib.grid_executors`: where the runs and the report run (``--executor`` inline, local,
  slurm), one function each in a registry;
* :mod:`lib.grid_plan`: what ``--dry-run`` prints per stage, and the summary table.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

from .config import REPO_ROOT, report_em_definition
from .estimate import estimate_run, measured_rates, report_seconds, total_line
from .grid_checks import busy_folders, validate
from .grid_executors import EXECUTORS, Grid, SlurmOptions
from .grid_jobs import GridError, Job, Options, tailing_progress
from .grid_plan import plan, summary_table
from .layout import STAGES


def run_grid(files: Sequence[str], options: Options, executor: str = "inline", jobs: int = 1,
             gpus: Sequence[str] = (), slurm: SlurmOptions = SlurmOptions(), dry_run: bool = False) -> int:
    """Validate, run, summarise. Returns the exit code (0 ok, 1 a stage failed, 2 bad input)."""
    try:
        if executor not in EXECUTORS:
            raise GridError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if gpus and jobs > len(gpus):
            raise GridError(f"--jobs {jobs} needs as many GPUs, but --gpus names {len(gpus)}: {','.join(gpus)}")
        if executor == "slurm":
            missing = [c for c in ("sbatch", "srun") if not shutil.which(c)]
            if missing:
                raise GridError(f"--executor slurm: {' and '.join(missing)} not found on PATH (not a Slurm login node?)")
        runs = validate(files, options, offline=dry_run, check_device=executor != "slurm")
        busy = busy_folders(runs, options)
        if busy and options.lock_wait == 0 and not dry_run:
            raise GridError(f"{busy[0]}; wait for it to finish, or pass --wait-lock")
    except GridError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    if dry_run:
        for run, stage, what in plan(runs, options):
            print(f"{run:<24} {stage:<9} {what}")
        print("\nwhat the runs cost from scratch (lib/estimate.py; a resumed run does less):")
        measured = measured_rates(runs[0][1].outputs_dir) if runs else []
        estimates = [estimate_run(cfg, measured) for _, cfg in runs]
        for e in estimates:
            print(e.line())
            print(e.time_line())
        print(total_line(estimates, report_seconds(runs[0][1].outputs_dir) if runs and "report" in options.stages
                         else None))
        for line in busy:
            print(f"note: {line}")
        return 0
    grid = Grid(jobs=tuple(Job(f, cfg.to_dict(), options) for f, cfg in runs), outputs_dir=runs[0][1].outputs_dir,
                em=report_em_definition(runs[0][1]),  # validate() made sure every run shares it
                options=options, parallel=jobs, gpus=tuple(gpus), slurm=slurm)
    print(f"grid: {len(runs)} run(s) [{', '.join(grid.run_ids)}], stages {','.join(options.stages)}, "
          f"executor {executor}, jobs {jobs}" + (f", gpus {','.join(gpus)}" if gpus else ""), flush=True)
    t0 = time.monotonic()
    # a stage's progress lines, from its run folder's progress file (the one place a worker, a
    # local job or a Slurm job shares with this process); --log-output inline streams the
    # notebooks' own text lines instead
    with tailing_progress({cfg.run_id: cfg.run_dir for _, cfg in runs}, options.progress_every,
                          enabled=not (executor == "inline" and options.log_output)):
        results = EXECUTORS[executor](grid)
    if isinstance(results, int):  # sbatch refused a job (2), or submitted without waiting (0)
        return results

    print(f"\ngrid finished in {time.monotonic() - t0:.1f}s", flush=True)
    print(summary_table(results), flush=True)
    report = [r for r in results if r.stage == "report" and r.status in ("done", "skipped")]
    if report:
        html = Path(report[0].notebook).with_suffix(".html")
        print(f"report: {html}", flush=True)
    return 1 if any(r.status in ("failed", "incomplete") for r in results) else 0


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def _stage_list(text: str, what: str, allow_all: bool = False) -> tuple[str, ...]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if allow_all and names == ["all"]:
        return STAGES
    bad = [s for s in names if s not in STAGES]
    if bad or not names:
        raise GridError(f"{what}: unknown stage '{bad[0] if bad else text}' (stages: {', '.join(STAGES)})")
    return tuple(s for s in STAGES if s in names)  # pipeline order


def parse_time(text: str) -> int:
    """Minutes from Slurm's time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (seconds round up)."""
    t = text.strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", t)
    if not m:
        raise GridError(f"--time: expected minutes, H:MM:SS or D-HH:MM:SS, got {text!r}")
    days, rest = m.group(1), [int(x) for x in m.group(2).split(":")]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = (rest + [0, 0])[:3]
        total = int(days) * 1440 + h * 60 + mi + (1 if s else 0)
    elif len(rest) == 1:
        total = rest[0]
    elif len(rest) == 2:  # M:S
        total = rest[0] + (1 if rest[1] else 0)
    else:
        total = rest[0] * 60 + rest[1] + (1 if rest[2] else 0)
    if total <= 0:
        raise GridError(f"--time: must be positive, got {text!r}")
    return total


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m lib.grid", description=__doc__.split("\n\n")[0],
        epilog="examples:\n"
               "  python -m lib.grid run parameters/demo_*.yaml                 # the demo\n"
               "  python -m lib.grid run --dry-run parameters/study_1b_*.yaml   # what would run, and its cost\n"
               "  python -m lib.grid run --jobs 2 --gpus 0,1 parameters/study_1b_*.yaml\n"
               "  python -m lib.grid run --executor slurm parameters/study_*.yaml\n"
               "  python -m lib.grid run --stages report parameters/study_*.yaml  # the report only\n"
               "python -m lib.grid run --help lists every option.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run stages 01-03 for each parameters file, then 04_report once")
    r.add_argument("params", nargs="+", help="parameters YAML files, one per run")
    r.add_argument("--stages", default="all", help="comma list of train,evaluate,judge,report (default: all)")
    r.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="re-execute STAGE's notebook even if unchanged (repeatable, or a comma list; 'all'); "
                        "the stage itself still reuses its finished work, e.g. complete checkpoints")
    r.add_argument("--jobs", type=int, default=0,
                   help="runs at once (default 1, or one per --gpus entry; Slurm: the cluster schedules every job)")
    r.add_argument("--gpus", default="", help="comma list of GPU ids; each job gets its own (CUDA_VISIBLE_DEVICES)")
    r.add_argument("--executor", default="inline", choices=EXECUTORS,
                   help="inline: this machine (default); local: submitit local jobs; slurm: submitit Slurm jobs")
    r.add_argument("--partition", default="", help="Slurm partition")
    r.add_argument("--time", default="24:00:00", help="job time limit (minutes, H:MM:SS or D-HH:MM:SS)")
    r.add_argument("--gpus-per-job", type=int, default=None,
                   help="Slurm GPUs per run job (default: 1 when the partition's nodes have GPU GRES, else 0; "
                        "the report job gets none)")
    r.add_argument("--cpus-per-job", type=int, default=0, help="Slurm CPUs per job (0 = cluster default)")
    r.add_argument("--mem-gb", type=int, default=0, help="Slurm memory per job in GB (0 = cluster default)")
    r.add_argument("--account", default="", help="Slurm account")
    r.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm-arg qos=high (repeatable)")
    r.add_argument("--no-wait", action="store_true", help="Slurm: submit and return (the report job waits for the runs)")
    r.add_argument("--notebooks", default=str(REPO_ROOT / "notebooks"), help="folder holding 01..04 notebooks")
    r.add_argument("--log-output", action="store_true", help="stream the notebooks' output to the terminal")
    r.add_argument("--progress-every", type=float, default=Options.progress_every, metavar="SECONDS",
                   help="print a running stage's progress (steps, answers, judgments) at most this often "
                        "(default %(default)s; 0: every line the stage writes, about one per percent)")
    r.add_argument("--dry-run", action="store_true", help="validate and show which stages would run; run nothing")
    r.add_argument("--wait-lock", nargs="?", type=float, const=-1.0, default=0.0, metavar="SECONDS",
                   help="when another grid or notebook is using a run (or the report) folder, wait for it "
                        "(without a limit, or up to SECONDS) instead of stopping")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stages = _stage_list(args.stages, "--stages", allow_all=True)
        force: set[str] = set()
        for f in args.force:
            force.update(_stage_list(f, "--force", allow_all=True))
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
        if any(not g.isdigit() for g in gpus):
            raise GridError(f"--gpus: expected a comma list of GPU ids, got {args.gpus!r}")
        jobs = args.jobs or max(1, len(gpus))
        if not args.progress_every >= 0:
            raise GridError(f"--progress-every: must be >= 0 seconds, got {args.progress_every}")
        if jobs < 1:
            raise GridError("--jobs: must be >= 1")
        extra = []
        for kv in args.slurm_arg:
            k, sep, v = kv.partition("=")
            if not sep or not k:
                raise GridError(f"--slurm-arg: expected KEY=VALUE, got {kv!r}")
            extra.append((k.strip(), v.strip()))
        slurm = SlurmOptions(partition=args.partition, time_min=parse_time(args.time), gpus_per_job=args.gpus_per_job,
                             cpus_per_job=args.cpus_per_job, mem_gb=args.mem_gb, account=args.account,
                             extra=tuple(extra), wait=not args.no_wait)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = Options(stages=stages, force=frozenset(force), notebooks_dir=str(Path(args.notebooks).resolve()),
                      progress_bar=jobs == 1 and args.executor == "inline" and sys.stderr.isatty(),
                      log_output=args.log_output, progress_every=args.progress_every,
                      lock_wait=None if args.wait_lock < 0 else args.wait_lock)
    return run_grid(args.params, options, executor=args.executor, jobs=jobs, gpus=gpus, slurm=slurm,
                    dry_run=args.dry_run)


if __name__ == "__main__":
    raise SystemExit(main())
