"""Executors: where a grid's run jobs and its report run, behind one registry.

:data:`EXECUTORS` maps each ``--executor`` name to a function of one signature: it takes the
:class:`Grid` (the runs' jobs, the report's inputs, how many at once, which GPUs, the Slurm
options) and returns the stage results in the order of the runs, then the report's row, or an
exit code when it does not wait for them (Slurm).

* ``inline``: this machine, in this process (``--jobs 1``) or in worker processes
  (:func:`run_inline`); the report then runs here.
* ``local``: one submitit local job per run, then one for the report (:func:`run_submitit_local`):
  each stage runs in its own process, as on a cluster.
* ``slurm``: one Slurm job per run through submitit, and a report job that depends on them
  (``afterany``); a job sbatch refuses cancels those already submitted (:func:`submit_error`).

``--jobs`` and ``--gpus`` (inline, local) keep up to N jobs running, each with its own GPU
(:func:`_schedule`). A job process that dies (killed, timed out, out of memory) becomes a failed
row for the stage it was in (:func:`_failed_job`).
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit
from submitit.core.utils import FailedJobError
from submitit.slurm.slurm import SlurmInfoWatcher

from . import fingerprint as fp
from . import layout
from .config import ConfigError, resolve_path
from .grid_jobs import GridError, Job, Options, StageResult, log, one_line
from .grid_report import run_report
from .grid_runner import run_job
from .layout import RUN_STAGES


@dataclass(frozen=True)
class SlurmOptions:
    partition: str = ""
    time_min: int = 24 * 60
    gpus_per_job: int | None = None  # None: 1 when the partition's nodes have GPU GRES, else 0
    cpus_per_job: int = 0
    mem_gb: int = 0
    account: str = ""
    extra: tuple[tuple[str, str], ...] = ()  # --slurm-arg key=value
    wait: bool = True


@dataclass(frozen=True)
class Grid:
    """What an executor runs: one job per run, then the report over the runs."""

    jobs: tuple[Job, ...]       # one per run, in the order of the parameters files
    outputs_dir: str            # the runs' shared outputs_dir (the report reads them all there)
    em: dict[str, Any]          # the runs' shared EM definition, for the report
    options: Options
    parallel: int = 1           # --jobs: runs at once (inline, local; Slurm schedules its own)
    gpus: tuple[str, ...] = ()  # --gpus: each running job holds one (inline, local)
    slurm: SlurmOptions = SlurmOptions()  # the local jobs' time limit; every sbatch option

    @property
    def run_ids(self) -> list[str]:
        return [job.run_id for job in self.jobs]

    @property
    def runs_stages(self) -> bool:
        return any(s in RUN_STAGES for s in self.options.stages)

    @property
    def runs_report(self) -> bool:
        return "report" in self.options.stages

    @property
    def folder(self) -> Path:
        """submitit's job folders (pickled job, stdout and stderr per job id)."""
        return layout.grid_dir(resolve_path(self.outputs_dir)) / "submitit"


# ------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------

def execute_inline(grid: Grid) -> list[StageResult] | int:
    """The runs on this machine (``--jobs`` at once), then the report in this process."""
    results = run_inline(list(grid.jobs), grid.parallel, list(grid.gpus)) if grid.runs_stages else []
    if grid.runs_report:
        results.append(run_report(grid.outputs_dir, grid.run_ids, grid.options, grid.em))
    return results


def execute_local(grid: Grid) -> list[StageResult] | int:
    """Each run (``--jobs`` at once), then the report, in its own submitit local job."""
    results = (run_submitit_local(list(grid.jobs), grid.parallel, list(grid.gpus), grid.folder, grid.slurm)
               if grid.runs_stages else [])
    if grid.runs_report:
        ex = submitit.LocalExecutor(folder=grid.folder / "%j")
        ex.update_parameters(timeout_min=grid.slurm.time_min)
        handle = ex.submit(run_report, grid.outputs_dir, grid.run_ids, grid.options, grid.em)
        log("report", "report", f"submitted local job {handle.job_id}")
        results.append(_report_result(handle))
    return results


def execute_slurm(grid: Grid) -> list[StageResult] | int:
    """One Slurm job per run and a report job after them; their results, or exit code 2 when
    sbatch refused a job (nothing stays queued), 0 with ``--no-wait`` once all are submitted."""
    slurm = grid.slurm
    gpus_per_job = slurm.gpus_per_job
    if gpus_per_job is None:
        gpus_per_job = partition_gpus(slurm.partition)
        print(f"slurm: {gpus_per_job} GPU per run job (the partition's nodes have "
              f"{'GPU' if gpus_per_job else 'no GPU'} GRES; --gpus-per-job N to choose)", flush=True)
    run_handles = []
    report_handle = None
    try:
        if grid.runs_stages:
            for job in grid.jobs:
                ex = _slurm_executor(grid.folder, slurm, f"em-{job.run_id}", gpus_per_job)
                handle = _submit(ex, run_job, job)
                log(job.run_id, "-", f"submitted Slurm job {handle.job_id}")
                run_handles.append((job, handle))
        if grid.runs_report:
            dep = "afterany:" + ":".join(h.job_id for _, h in run_handles) if run_handles else ""
            ex = _slurm_executor(grid.folder, slurm, "em-report", 0, dependency=dep)
            report_handle = _submit(ex, run_report, grid.outputs_dir, grid.run_ids, grid.options, grid.em)
            log("report", "report", f"submitted Slurm job {report_handle.job_id}" + (f" ({dep})" if dep else ""))
    except GridError as e:
        for _, h in run_handles:  # nothing half-submitted stays queued
            h.cancel(check=False)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if not slurm.wait:
        print(f"submitted; logs under {grid.folder}", flush=True)
        return 0
    results: list[StageResult] = []
    for job, handle in run_handles:
        results += _submitit_collect(job, handle)
    if report_handle is not None:
        results.append(_report_result(report_handle))
    return results


# --executor NAME -> the function that runs a grid there
EXECUTORS: dict[str, Callable[[Grid], list[StageResult] | int]] = {
    "inline": execute_inline,
    "local": execute_local,
    "slurm": execute_slurm,
}


# ------------------------------------------------------------------------------------------
# Jobs at once, job processes, submitit local jobs
# ------------------------------------------------------------------------------------------

def _failed_job(job: Job, error: BaseException, log_path: str = "") -> list[StageResult]:
    """Results for a job process that died (killed, timed out): the stage it was in failed."""
    msg = one_line(f"{type(error).__name__}: {error}")
    log(job.run_id, "-", f"FAILED (job): {msg}" + (f"; log: {log_path}" if log_path else ""))
    run_dir = resolve_path(job.config["outputs_dir"]) / job.run_id
    try:
        last = fp.read_stages(run_dir).get("last", {})
    except ConfigError:
        last = {}
    out: list[StageResult] = []
    failed = False
    for s in (s for s in job.options.stages if s in RUN_STAGES):
        status = last.get(s, {}).get("status")
        if failed:
            out.append(StageResult(job.run_id, s, "not run"))
        elif status == "running" or status is None:
            out.append(StageResult(job.run_id, s, "failed", 0.0, log_path, msg))
            failed = True
        else:  # finished (or failed on its own) before the job died
            out.append(StageResult(job.run_id, s, status))
            failed = status == "failed"
    return out


def _schedule(jobs: list[Job], parallel: int, gpus: list[str], start: Callable[[Job], Any],
              collect: Callable[[Job, Any], list[StageResult]]) -> list[StageResult]:
    """Keep up to ``parallel`` jobs running; each holds one GPU from ``gpus`` (if any) while it runs."""
    pending = list(jobs)
    running: list[tuple[Job, Any, str | None]] = []
    free = list(gpus)
    out: dict[str, list[StageResult]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            gpu = free.pop(0) if gpus else None
            if gpu is not None:
                job = Job(job.params_file, job.config, job.options, {**job.env, "CUDA_VISIBLE_DEVICES": gpu})
            running.append((job, start(job), gpu))
        time.sleep(0.2)
        for item in [r for r in running if r[1].done()]:
            job, handle, gpu = item
            running.remove(item)
            if gpu is not None:
                free.append(gpu)
            out[job.run_id] = collect(job, handle)
    return [r for job in jobs for r in out[job.run_id]]


def run_inline(jobs: list[Job], parallel: int, gpus: list[str]) -> list[StageResult]:
    if parallel <= 1:  # in this process: simplest to follow, and papermill's progress bar works
        out = []
        for job in jobs:
            if gpus:
                job = Job(job.params_file, job.config, job.options, {**job.env, "CUDA_VISIBLE_DEVICES": gpus[0]})
            out += run_job(job)
        return out
    with ProcessPoolExecutor(max_workers=parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        def collect(job: Job, fut: Any) -> list[StageResult]:
            try:
                return fut.result()
            except BaseException as e:  # a worker that died (killed, out of memory)
                return _failed_job(job, e)
        return _schedule(jobs, parallel, gpus, lambda j: pool.submit(run_job, j), collect)


def _submitit_collect(job: Job, handle: Any) -> list[StageResult]:
    try:
        return handle.result()
    except BaseException as e:  # the job itself failed: timeout, killed, node failure
        return _failed_job(job, e, str(handle.paths.stderr))


def _report_result(handle: Any) -> StageResult:
    """The report job's result, or a failed row when the job itself died."""
    try:
        return handle.result()
    except BaseException as e:
        return StageResult("report", "report", "failed", 0.0, str(handle.paths.stderr),
                           one_line(f"{type(e).__name__}: {e}"))


def run_submitit_local(jobs: list[Job], parallel: int, gpus: list[str], folder: Path,
                       slurm: SlurmOptions) -> list[StageResult]:
    """submitit's LocalExecutor: every run (and then the report) in its own job process, as on Slurm."""
    def start(job: Job) -> Any:
        ex = submitit.LocalExecutor(folder=folder / "%j")
        params: dict[str, Any] = {"timeout_min": slurm.time_min}
        gpu = job.env.get("CUDA_VISIBLE_DEVICES")
        if gpus and gpu is not None:
            params.update(gpus_per_node=1, visible_gpus=[int(gpu)])
        else:  # LocalExecutor would hide every GPU; keep the caller's view instead
            job = Job(job.params_file, job.config, job.options,
                      {**job.env, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")})
        ex.update_parameters(**params)
        handle = ex.submit(run_job, job)
        log(job.run_id, "-", f"submitted local job {handle.job_id} (logs: {handle.paths.stdout})")
        return handle

    return _schedule(jobs, parallel, gpus, start, _submitit_collect)


# ------------------------------------------------------------------------------------------
# Slurm
# ------------------------------------------------------------------------------------------

def _submit(ex: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``ex.submit(fn, *args)``; a job sbatch refused raises GridError (:func:`submit_error`)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr itself
            return ex.submit(fn, *args)
    except (FailedJobError, OSError, subprocess.SubprocessError) as e:
        raise GridError(submit_error(e)) from None


def _slurm_executor(folder: Path, slurm: SlurmOptions, name: str, gpus: int, dependency: str = "") -> _SlurmExecutor:
    ex = _SlurmExecutor(folder=folder / "%j")
    params: dict[str, Any] = {"time": slurm.time_min, "job_name": name, "gpus_per_node": gpus or None}
    if slurm.partition:
        params["partition"] = slurm.partition
    if slurm.cpus_per_job:
        params["cpus_per_task"] = slurm.cpus_per_job
    if slurm.mem_gb:
        params["mem"] = f"{slurm.mem_gb}GB"
    if slurm.account:
        params["account"] = slurm.account
    if dependency:
        params["dependency"] = dependency
    if slurm.extra:
        params["additional_parameters"] = dict(slurm.extra)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


class _SqueueWatcher(SlurmInfoWatcher):
    """submitit's Slurm job-state watcher, made to work without accounting.

    submitit asks ``sacct`` for job states. Where accounting is off (the usual on a small
    cluster) every poll fails, submitit logs "Bypassing sacct error" each time, and a job that
    ended without writing its result (scancel, node failure) is never seen as finished: the
    runner would wait forever. This watcher asks ``squeue`` instead when ``sacct`` does not
    work: a job the queue no longer lists has ended (its result file says how)."""

    accounting: bool | None = None

    def update(self) -> None:
        if _SqueueWatcher.accounting is None:
            _SqueueWatcher.accounting = _sacct_works()
        if _SqueueWatcher.accounting:
            super().update()
            return
        to_check = {x.split("_")[0] for x in self._registered - self._finished}
        if not to_check:
            return
        self._num_calls += 1
        try:
            out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%N", "-j", ",".join(sorted(to_check))],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0:
            info = {}
            for line in out.stdout.splitlines():
                jid, _, rest = line.strip().partition("|")
                state, _, nodes = rest.partition("|")
                info[jid] = {"JobID": jid, "State": state, "NodeList": nodes}
            for jid in to_check:
                info.setdefault(jid, {"JobID": jid, "State": "ENDED", "NodeList": ""})  # left the queue
            self._info_dict.update(info)
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)


class _SlurmJob(submitit.SlurmJob):
    watcher = _SqueueWatcher(delay_s=15)  # a cancelled job is noticed within 15 s, not minutes


class _SlurmExecutor(submitit.SlurmExecutor):
    job_class = _SlurmJob


def _sacct_works() -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def partition_gpus(partition: str = "") -> int:
    """1 when the nodes of ``partition`` (default partition when empty) have GPU GRES, else 0."""
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return 1 if re.search(r"(^|[,\s])gpu[:(]", out) else 0


# sbatch message fragment -> the option to change
_SBATCH_HINTS = (
    ("gres", "--gpus-per-job (0 for a partition without GPUs)"),
    ("gpu", "--gpus-per-job (0 for a partition without GPUs)"),
    ("partition", "--partition"),
    ("time limit", "--time"),
    ("account", "--account"),
    ("memory", "--mem-gb"),
    ("cpu", "--cpus-per-job"),
    ("qos", "--slurm-arg qos=..."),
)


def submit_error(e: BaseException) -> str:
    """One line for a job sbatch refused: its message and the option to change."""
    msg = one_line(str(e) or type(e).__name__)
    msg = re.sub(r"^sbatch: error: ", "", msg)
    low = msg.lower()
    hint = next((h for frag, h in _SBATCH_HINTS if frag in low), "the --slurm-arg options")
    return f"sbatch refused the job: {msg}; change {hint}"
