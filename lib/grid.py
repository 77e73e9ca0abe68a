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
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import fingerprint as fp
from . import layout
from .layout import RUN_STAGES, STAGES
from .config import (REPO_ROOT, ConfigError, ReportConfig, RunConfig, expand_seeds, from_mapping,
                     load_run_config, report_em_definition, resolve_path)
from .data import check_dataset_param
from .estimate import estimate_run, measured_rates, report_seconds, total_line
from .io import write_text_atomic
from .judge import JudgeError, check_credentials, judgments_path
from .judge import run_info as judge_run_info
from .lock import ENV_HELD, LOCK_NAME, FolderLock, LockError, is_stale, read_holder
from .models import ModelUnavailable, check_model, pick_device
from .progress import Tail
from .questions import NotCached, QuestionError, check_question_sources, load_judge_prompts
from .notebook_html import export_html
from .secrets import ENV_URL_SECRETS, mask_parameters, mask_url_credentials, redact
from .train import check_train_config

NOTEBOOKS = layout.NOTEBOOKS
REPORT_NOTEBOOK = layout.REPORT_NOTEBOOK  # the rendered 04_report inside report_dir (outputs/report/report.ipynb)
EXECUTORS = ("inline", "local", "slurm")


class GridError(Exception):
    """A problem found before anything runs: one line, exit code 2."""


# ------------------------------------------------------------------------------------------
# What to run
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    stages: tuple[str, ...] = STAGES
    force: frozenset[str] = frozenset()
    notebooks_dir: str = str(REPO_ROOT / "notebooks")
    kernel_name: str = "python3"
    progress_bar: bool = False  # papermill's per-cell bar (only when one run at a time on a terminal)
    log_output: bool = False    # stream the kernels' output to the terminal
    progress_every: float = 10.0  # seconds between a stage's progress lines (lib.progress; 0: every line it writes)
    lock_wait: float | None = 0.0  # seconds to wait for a run (or report) folder another process holds; None: no limit


@dataclass(frozen=True)
class Job:
    """One run: its stages in order. Picklable, so it can go to a worker process or a Slurm node."""

    params_file: str
    config: dict[str, Any]
    options: Options
    env: dict[str, str | None] = field(default_factory=dict)  # e.g. CUDA_VISIBLE_DEVICES; None = unset

    @property
    def run_id(self) -> str:
        return self.config["run_id"]


@dataclass
class StageResult:
    run: str
    stage: str
    status: str          # done | skipped | failed | not run
    seconds: float = 0.0
    notebook: str = ""
    error: str = ""


# ------------------------------------------------------------------------------------------
# Validation: everything that can be checked cheaply, before any notebook starts
# ------------------------------------------------------------------------------------------

def _check_model(name: str, key: str, revision: str = "", offline: bool = False) -> None:
    """The model can be loaded (lib.models.check_model: nothing is built or downloaded now)."""
    try:
        check_model(name, revision, offline)
    except ModelUnavailable as e:
        raise ConfigError(f"key '{key}': {e}") from None


def _check_device(cfg: RunConfig) -> None:
    """device: cuda / mps is there (auto and cpu always are)."""
    if cfg.device not in ("cuda", "mps"):
        return
    try:
        pick_device(cfg.device, "auto")
    except RuntimeError as e:
        raise ConfigError(f"key 'device': {str(e).removeprefix('device: ')}") from None


def check_run(cfg: RunConfig, stages: Sequence[str], offline: bool = False, check_device: bool = True) -> None:
    """Raise ConfigError ("key 'x': why") for anything the selected stages would trip over.

    Cheapest first: the training options and the judge's credentials, the device, the models
    (:func:`lib.models.check_model`: a local folder, the hub's cache, or one question to the hub; an
    embedded model is not built here), then what needs the network or reads whole files: the
    question sets and judge prompts (an URL is downloaded into the cache now, so an unreachable one
    fails here, not after training), and last the training file (every line; the archive when it is
    already cached). ``offline`` (``--dry-run``): nothing is downloaded and the hub is not asked; what
    is not cached yet is not checked. ``check_device``: False where the stages run on other machines
    (Slurm)."""
    trains, evaluates, judges = "train" in stages, "evaluate" in stages, "judge" in stages
    if trains:
        check_train_config(cfg, source="")
    if judges and cfg.judge_backend != "hf":
        _check_credentials(cfg)
    if check_device and (trains or evaluates or (judges and cfg.judge_backend == "hf")):
        _check_device(cfg)
    if trains or evaluates:
        _check_model(cfg.model, "model", cfg.model_revision, offline)
    if judges and cfg.judge_backend == "hf":
        _check_model(cfg.judge_model, "judge_model", offline=offline)
    questions = None
    if evaluates or judges:
        questions = check_question_sources(list(cfg.question_sets), cfg.outputs_dir, offline)
    if judges:
        if cfg.judge_prompts:
            try:
                prompts = load_judge_prompts(cfg.judge_prompts, cfg.outputs_dir, offline)
            except NotCached:
                prompts = None
            except QuestionError as e:
                raise ConfigError(f"key 'judge_prompts': {e}") from None
            missing = [m for m in cfg.judge_metrics if prompts is not None and m not in prompts]
            if missing:
                raise ConfigError(f"key 'judge_metrics': metric '{missing[0]}' has no prompt in judge_prompts "
                                  f"({mask_url_credentials(cfg.judge_prompts)} has {', '.join(sorted(prompts))})")
        elif questions is not None:
            missing = [m for m in cfg.judge_metrics if not any(m in q.judge_prompts for q in questions)]
            if missing:
                raise ConfigError(f"key 'judge_metrics': no question in question_sets has a judge prompt for metric "
                                  f"'{missing[0]}' (add it to the questions' judge_prompts, set judge_prompts: FILE, "
                                  "or drop the metric)")
    if trains:
        check_dataset_param(cfg, offline=offline)


def _check_credentials(cfg: RunConfig) -> None:
    """The judge stage's own check (lib.judge.check_credentials), as a ConfigError."""
    try:
        check_credentials(cfg)
    except JudgeError as e:
        raise ConfigError(str(e)) from None


def validate(files: Sequence[str], options: Options, offline: bool = False,
             check_device: bool = True) -> list[tuple[str, RunConfig]]:
    """Load and check every parameters file; raise GridError naming the file and key (see
    :func:`check_run` for ``offline`` and ``check_device``)."""
    if not files:
        raise GridError("no parameters files given")
    run_stages = [s for s in options.stages if s in RUN_STAGES]
    out: list[tuple[str, RunConfig]] = []
    by_id: dict[str, str] = {}
    for f, cfg in _expanded(files):
        try:
            check_run(cfg, run_stages, offline=offline, check_device=check_device)
        except ConfigError as e:
            msg = str(e)
            raise GridError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
        if cfg.run_id in by_id:
            raise GridError(f"{f}: key 'run_id': '{cfg.run_id}' is also the run_id of {by_id[cfg.run_id]}")
        by_id[cfg.run_id] = f
        if out and cfg.run_dir.parent != out[0][1].run_dir.parent:
            raise GridError(f"{f}: key 'outputs_dir': '{cfg.outputs_dir}' differs from '{out[0][1].outputs_dir}' "
                            f"in {out[0][0]}; all runs of one grid share one outputs_dir (the report reads them all)")
        if out and report_em_definition(cfg) != report_em_definition(out[0][1]):
            raise GridError(f"{f}: keys 'em_aligned_threshold', 'em_comparison', 'em_coherent_threshold', "
                            f"'em_coherent_comparison': "
                            f"{report_em_definition(cfg)} differ from {report_em_definition(out[0][1])} in {out[0][0]}; "
                            "one report applies one EM definition (compare study and paper runs with the "
                            "*_papers_eval variants)")
        out.append((f, cfg))
    _check_controls(out)
    for stage in options.stages:
        nb = Path(options.notebooks_dir) / NOTEBOOKS[stage]
        if not nb.exists():
            raise GridError(f"{nb}: notebook for stage '{stage}' not found")
    return out


def _expanded(files: Sequence[str]) -> Iterator[tuple[str, RunConfig]]:
    """(file, run config) per run: a file with ``seeds`` gives one run per seed."""
    for f in files:
        try:
            runs = expand_seeds(load_run_config(f), source=str(f))
        except ConfigError as e:
            msg = str(e)
            raise GridError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
        yield from ((f, cfg) for cfg in runs)


def _check_controls(runs: list[tuple[str, RunConfig]]) -> None:
    """``control_of`` names a run or seed group of this grid, or a run already under outputs_dir."""
    known = {cfg.run_id for _, cfg in runs} | {cfg.seed_group for _, cfg in runs if cfg.seed_group}
    for f, cfg in runs:
        if not cfg.control_of or cfg.control_of in known:
            continue
        root = cfg.run_dir.parent
        if (root / cfg.control_of).is_dir() or any(root.glob(f"{cfg.control_of}_s*")):
            continue
        raise GridError(f"{f}: key 'control_of': no run or seed group '{cfg.control_of}' in this grid "
                        f"or under {cfg.outputs_dir}")


def busy_folders(runs: list[tuple[str, RunConfig]], options: Options) -> list[str]:
    """One line per run (or report) folder that another live process holds now (lib.lock)."""
    folders: list[tuple[Path, str]] = []
    if any(s in RUN_STAGES for s in options.stages):
        folders += [(cfg.run_dir, f"run '{cfg.run_id}'") for _, cfg in runs]
    if "report" in options.stages and runs:
        folder = resolve_path(runs[0][1].outputs_dir) / "report"
        folders.append((folder, f"report folder {folder}"))
    out = []
    for folder, what in folders:
        path = folder / LOCK_NAME
        holder = read_holder(path)
        if holder is not None and not is_stale(path, holder):
            out.append(f"{what} is in use by {holder.describe()} (lock {path})")
    return out


# ------------------------------------------------------------------------------------------
# One stage
# ------------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_PRINT_LOCK = threading.Lock()  # the progress tail prints from its own thread


def log(run: str, stage: str, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')}  {run:<24} {stage:<9} {msg}\n"
    with _PRINT_LOCK:  # one write per line: the tail's lines never split one of ours
        sys.stdout.write(line)
        sys.stdout.flush()


# the grid's tail of its runs' progress files (lib.progress.Tail), while it runs stages in this process
_TAIL: Tail | None = None


def _flush_progress() -> None:
    """Print what the tail has not printed yet, so a stage's last progress line precedes its 'done'."""
    if _TAIL is not None:
        _TAIL.poll(flush=True)


def _one_line(text: str, limit: int = 400) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = redact(lines[-1] if lines else str(text))
    return line if len(line) <= limit else line[: limit - 3] + "..."


class _QuietPapermill(logging.Filter):
    """Drop papermill's warnings about parameters: 'unknown parameter' (the notebook validates them
    itself, with a clear error) and 'unable to parse' (comments papermill's parser cannot read)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Passed unknown parameter") or msg.startswith("Unable to parse line"))


def _quiet_papermill_logs() -> None:
    for name in ("papermill", "papermill.translators"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _QuietPapermill) for f in lg.filters):
            lg.addFilter(_QuietPapermill())


def _kernel_manager_with_log(log_path: Path) -> type:
    """A kernel manager whose kernel writes its stdout/stderr (ipykernel's own warnings, C-level
    messages, a crash's last words) to ``log_path`` instead of the runner's terminal. What a
    cell prints still goes into the rendered notebook as usual."""
    from jupyter_client import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def start_kernel(self, **kw: Any) -> None:
            self._grid_log = open(log_path, "ab")  # closed with the kernel process
            kw.setdefault("stdout", self._grid_log)
            kw.setdefault("stderr", self._grid_log)
            await super().start_kernel(**kw)

        async def cleanup_resources(self, restart: bool = False) -> None:
            await super().cleanup_resources(restart=restart)
            if getattr(self, "_grid_log", None) and not restart:
                self._grid_log.close()

    return LoggedKernelManager


def execute_notebook(nb_in: Path, nb_out: Path, parameters: dict[str, Any], options: Options) -> str | None:
    """Run a notebook with papermill; None on success, else the error's last line.

    papermill writes the output notebook after every cell, so a failed run leaves the rendered
    notebook up to (and including) the failing cell, with papermill's error banner on top.
    """
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    nb_out.parent.mkdir(parents=True, exist_ok=True)
    _quiet_papermill_logs()
    if options.log_output and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        # kernel "python3" resolves to this interpreter: jupyter_client replaces the kernelspec's
        # "python" with sys.executable, so the kernel sees the same venv as the runner.
        pm.execute_notebook(str(nb_in), str(nb_out), parameters=parameters, kernel_name=options.kernel_name,
                            cwd=str(nb_in.parent), progress_bar=options.progress_bar,
                            log_output=options.log_output,
                            kernel_manager_class=_kernel_manager_with_log(nb_out.with_suffix(".kernel.log")))
    except PapermillExecutionError as e:
        evalue = _one_line(e.evalue) if str(e.evalue).strip() else ""
        return f"{e.ename}: {evalue}" if evalue else e.ename
    except Exception as e:  # a dead kernel, a kernel that never started, an unreadable notebook ...
        return _one_line(f"{type(e).__name__}: {e}")
    return None


def outputs_present(stage: str, cfg: RunConfig) -> bool:
    """The stage's main output still exists (a recorded fingerprint alone is not enough)."""
    run_dir = cfg.run_dir
    if stage == "train":
        return bool(fp.list_complete_checkpoints(run_dir))
    if stage == "evaluate":
        return layout.generations_path(run_dir).exists()
    if stage == "judge":
        return judgments_path(cfg).exists()
    raise ValueError(stage)


def why_run(stage: str, record: dict[str, Any], finger: str, present: bool, options: Options) -> str | None:
    """Why a stage must execute, or None when it is up to date (same fingerprint, output present)."""
    done = record.get(stage, {})
    if stage in options.force:
        return "forced"
    # the latest attempt counts even when an older success matches: it may have rewritten outputs
    last = record.get("last", {}).get(stage, {}).get("status")
    if last == "failed":
        return "retry after a failure"
    if last == "incomplete":
        return "retry what is missing"
    if last == "running":
        return "resume after an interrupted attempt"
    if done.get("fingerprint") == finger and present:
        return None
    if not done:
        return "first run"
    return "inputs or parameters changed" if present else "output missing"


def _run_notebook_stage(run: str, stage: str, folder: Path, finger: str, present: bool,
                        nb_in: Path, nb_out: Path, parameters: dict[str, Any], options: Options,
                        extra: dict[str, Any], incomplete: Callable[[], str | None] | None = None) -> StageResult:
    """Skip-or-execute one notebook, then record the outcome in ``folder/stages.json``.
    ``incomplete``: after a successful notebook, why its work is not all done (None: it is);
    such a stage is recorded 'incomplete', not done, so a plain rerun executes it again."""
    record = fp.read_stages(folder)
    done = record.get(stage, {})
    why = why_run(stage, record, finger, present, options)
    if why is None:
        log(run, stage, f"skipped (unchanged since {done.get('finished', '?')})")
        result = StageResult(run, stage, "skipped", 0.0, done.get("notebook", str(nb_out)))
    else:
        log(run, stage, f"started ({why}) -> {nb_out}")
        # 'running' stays if this process is killed: the report leaves the run out, the next attempt resumes
        record.setdefault("last", {})[stage] = {"status": "running", "at": _now()}
        fp.write_stages(folder, record)
        t0 = time.monotonic()
        error = execute_notebook(nb_in, nb_out, parameters, options)
        _flush_progress()
        html = nb_out.with_suffix(".html")
        if nb_out.exists():
            try:
                export_html(nb_out, html, hide_code=stage == "report")
            except Exception as e:  # the notebook is still there; the export is a convenience
                log(run, stage, f"warning: HTML export failed: {_one_line(f'{type(e).__name__}: {e}')}")
        seconds = time.monotonic() - t0
        missing = incomplete() if error is None and incomplete is not None else None
        if missing:
            log(run, stage, f"incomplete after {seconds:.1f}s: {missing}; a plain rerun retries only those -> {html}")
            result = StageResult(run, stage, "incomplete", seconds, str(nb_out), missing)
            record = fp.read_stages(folder)
        elif error is None:
            log(run, stage, f"done in {seconds:.1f}s -> {html}")
            result = StageResult(run, stage, "done", seconds, str(nb_out))
            record = fp.read_stages(folder)  # re-read: the stage itself may not touch it, but be safe
            record[stage] = {"fingerprint": finger, "finished": _now(), "seconds": round(seconds, 2),
                             "notebook": str(nb_out), **extra}
        else:
            log(run, stage, f"FAILED after {seconds:.1f}s: {error}")
            log(run, stage, f"notebook: {nb_out}")
            result = StageResult(run, stage, "failed", seconds, str(nb_out), error)
            record = fp.read_stages(folder)
    record.setdefault("last", {})[stage] = {"status": result.status, "at": _now()}
    fp.write_stages(folder, record)
    return result


def run_stage(stage: str, cfg: RunConfig, options: Options, params_file: str = "") -> StageResult:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = fp.hash_cache_for(run_dir)
    try:
        finger = fp.stage_fingerprint(stage, cfg, cache)
    except Exception as e:  # an input vanished between validation and now
        log(cfg.run_id, stage, f"FAILED: cannot fingerprint inputs: {_one_line(str(e))}")
        return StageResult(cfg.run_id, stage, "failed", error=_one_line(f"{type(e).__name__}: {e}"))
    finally:
        cache.save()
    nb_in = Path(options.notebooks_dir) / NOTEBOOKS[stage]
    nb_out = layout.notebooks_dir(run_dir) / NOTEBOOKS[stage]
    return _run_notebook_stage(cfg.run_id, stage, run_dir, finger, outputs_present(stage, cfg), nb_in, nb_out,
                               mask_parameters(cfg.to_dict())[0], options, {"params_file": params_file},
                               (lambda: judge_missing(cfg)) if stage == "judge" else None)


def judge_missing(cfg: RunConfig) -> str | None:
    """What the judge stage left undone (error rows, judgments a budget cap held back), or None."""
    info = judge_run_info(cfg)
    if not info or info.get("complete", True):
        return None
    errors = info.get("errors")
    if errors is None:
        errors = sum(labels.get("error", 0) for labels in info.get("labels", {}).values())
    parts = ([f"{errors} judge call(s) failed (error rows)"] if errors else []) + \
            ([f"{info['pending']} judgment(s) not made (budget cap)"] if info.get("pending") else [])
    return ", ".join(parts) or "judgments incomplete"


@contextmanager
def _folder_locked(folder: Path, what: str, run: str, stage: str, options: Options) -> Iterator[FolderLock]:
    """Hold ``folder``'s lock (see :mod:`lib.lock`) and let the notebooks started meanwhile see
    it through the environment; raises LockError (one line) when another process holds it."""
    lk = FolderLock(folder, what)
    lk.acquire(wait=options.lock_wait, on_wait=lambda line: log(run, stage, line))
    if lk.took_over is not None:
        log(run, stage, f"took over a stale lock left by {lk.took_over.describe()}")
    saved = os.environ.get(ENV_HELD)
    os.environ.update(lk.env())
    try:
        yield lk
    finally:
        if saved is None:
            os.environ.pop(ENV_HELD, None)
        else:
            os.environ[ENV_HELD] = saved
        lk.release()


def run_job(job: Job) -> list[StageResult]:
    """A run's stages, in order, holding the run folder's lock; after a failure the rest are
    'not run'. Entry point of workers and Slurm jobs."""
    saved = {k: os.environ.get(k) for k in job.env}
    try:
        for k, v in job.env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if job.env.get("CUDA_VISIBLE_DEVICES"):
            log(job.run_id, "-", f"CUDA_VISIBLE_DEVICES={job.env['CUDA_VISIBLE_DEVICES']}")
        cfg = from_mapping(job.config, source=job.params_file)
        # the notebooks get URL credentials masked in their (rendered) parameters, the real URLs
        # through the environment their kernels inherit (lib.secrets.unmask_url)
        _, url_secrets = mask_parameters(cfg.to_dict())
        if url_secrets:
            saved.setdefault(ENV_URL_SECRETS, os.environ.get(ENV_URL_SECRETS))
            os.environ[ENV_URL_SECRETS] = json.dumps(url_secrets)
        stages = [s for s in job.options.stages if s in RUN_STAGES]
        results: list[StageResult] = []
        try:
            with _folder_locked(cfg.run_dir, f"run '{cfg.run_id}'", cfg.run_id, "-", job.options):
                for stage in stages:
                    if results and results[-1].status in ("failed", "not run"):
                        results.append(StageResult(cfg.run_id, stage, "not run"))
                        continue
                    results.append(run_stage(stage, cfg, job.options, job.params_file))
        except LockError as e:
            log(cfg.run_id, "-", f"not run: {e}")
            return [StageResult(cfg.run_id, s, "failed" if i == 0 else "not run", error=str(e) if i == 0 else "")
                    for i, s in enumerate(stages)]
        return results
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------

def run_is_complete(run_dir: Path) -> bool:
    """The run's latest attempt of every stage succeeded and it has generations to report."""
    last = fp.read_stages(run_dir).get("last", {})
    return layout.generations_path(run_dir).exists() and all(
        v.get("status") in ("done", "skipped", "incomplete") for v in last.values())


def _report_state(outputs_dir: str, runs: list[str], save: bool = True,
                  em: dict[str, Any] | None = None) -> tuple[list[str], ReportConfig, Path, str]:
    """The runs ready for the report, its config (with the runs' shared EM definition), its
    folder and its fingerprint."""
    root = resolve_path(outputs_dir)
    # sorted: the same runs given in another order are the same report (and the same fingerprint)
    ready = sorted(r for r in runs if run_is_complete(root / r))
    report_dir = str(Path(outputs_dir) / "report")
    rcfg = ReportConfig(outputs_dir=outputs_dir, report_dir=report_dir, runs=ready, **(em or {}))
    folder = resolve_path(report_dir)
    cache = fp.hash_cache_for(folder)
    finger = fp.report_fingerprint(rcfg, cache)
    if save and ready:
        folder.mkdir(parents=True, exist_ok=True)
        cache.save()
    return ready, rcfg, folder, finger


def run_report(outputs_dir: str, runs: list[str], options: Options, em: dict[str, Any] | None = None) -> StageResult:
    """04_report over the grid's runs that completed (all of them, unless one failed)."""
    ready, rcfg, folder, finger = _report_state(outputs_dir, runs, em=em)
    left_out = [r for r in runs if r not in ready]
    if not ready:
        log("report", "report", "not run: no run of this grid completed its stages")
        return StageResult("report", "report", "not run", error="no run completed")
    if left_out:
        log("report", "report", f"leaving out runs that did not complete: {', '.join(left_out)}")
    report_dir = rcfg.report_dir
    nb_in = Path(options.notebooks_dir) / NOTEBOOKS["report"]
    nb_out = folder / REPORT_NOTEBOOK
    params = {"outputs_dir": outputs_dir, "report_dir": report_dir, "runs": ready, **(em or {})}
    try:
        with _folder_locked(folder, f"report folder {folder}", "report", "report", options):
            return _run_notebook_stage("report", "report", folder, finger, nb_out.exists(), nb_in, nb_out, params,
                                       options, {"runs": ready})
    except LockError as e:
        log("report", "report", f"not run: {e}")
        return StageResult("report", "report", "failed", error=str(e))


def _report_job(outputs_dir: str, runs: list[str], options: Options, em: dict[str, Any] | None = None) -> StageResult:
    return run_report(outputs_dir, runs, options, em)


# ------------------------------------------------------------------------------------------
# Executors
# ------------------------------------------------------------------------------------------

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


def _failed_job(job: Job, error: BaseException, log_path: str = "") -> list[StageResult]:
    """Results for a job process that died (killed, timed out): the stage it was in failed."""
    msg = _one_line(f"{type(error).__name__}: {error}")
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
                           _one_line(f"{type(e).__name__}: {e}"))


def run_submitit_local(jobs: list[Job], parallel: int, gpus: list[str], folder: Path,
                       slurm: SlurmOptions) -> list[StageResult]:
    """submitit's LocalExecutor: every run (and then the report) in its own job process, as on Slurm."""
    import submitit

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


def _slurm_executor(folder: Path, slurm: SlurmOptions, name: str, gpus: int, dependency: str = ""):
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


def _slurm_classes() -> tuple[type, type]:
    """submitit's Slurm executor with a job-state watcher that also works without accounting.

    submitit asks ``sacct`` for job states. Where accounting is off (the usual on a small
    cluster) every poll fails, submitit logs "Bypassing sacct error" each time, and a job that
    ended without writing its result (scancel, node failure) is never seen as finished: the
    runner would wait forever. This watcher asks ``squeue`` instead when ``sacct`` does not
    work: a job the queue no longer lists has ended (its result file says how)."""
    import submitit
    from submitit.slurm.slurm import SlurmInfoWatcher

    class Watcher(SlurmInfoWatcher):
        accounting: bool | None = None

        def update(self) -> None:
            if Watcher.accounting is None:
                Watcher.accounting = _sacct_works()
            if Watcher.accounting:
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

    class Job(submitit.SlurmJob):
        watcher = Watcher(delay_s=15)  # a cancelled job is noticed within 15 s, not minutes

    class Executor(submitit.SlurmExecutor):
        job_class = Job

    return Executor, Job


def _sacct_works() -> bool:
    try:
        return subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _SlurmExecutor(folder: Path) -> Any:  # noqa: N802 (a class made on first use)
    global _SLURM_CLASSES
    if _SLURM_CLASSES is None:
        _SLURM_CLASSES = _slurm_classes()
    return _SLURM_CLASSES[0](folder=folder)


_SLURM_CLASSES: tuple[type, type] | None = None


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
    msg = _one_line(str(e) or type(e).__name__)
    msg = re.sub(r"^sbatch: error: ", "", msg)
    low = msg.lower()
    hint = next((h for frag, h in _SBATCH_HINTS if frag in low), "the --slurm-arg options")
    return f"sbatch refused the job: {msg}; change {hint}"


# ------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------

def plan(runs: list[tuple[str, RunConfig]], options: Options) -> list[tuple[str, str, str]]:
    """(run, stage, what would happen) without running anything. A stage after one that runs
    is 'after <stage>': its inputs are only known once that stage has written them."""
    rows: list[tuple[str, str, str]] = []
    any_runs = False
    for _, cfg in runs:
        cache = fp.hash_cache_for(cfg.run_dir)
        try:
            record = fp.read_stages(cfg.run_dir)
        except ConfigError as e:  # a damaged stages.json: every stage would run
            rows.append((cfg.run_id, "-", _one_line(str(e))))
            record = {}
        upstream = ""
        for stage in (s for s in options.stages if s in RUN_STAGES):
            if upstream:
                rows.append((cfg.run_id, stage, f"after {upstream}"))
                continue
            try:  # offline: a dry run never downloads; it must not crash on what it cannot know either
                finger = fp.stage_fingerprint(stage, cfg, cache, offline=True)
            except NotCached as e:
                why = f"inputs not known yet: {e}"
            except Exception as e:
                why = f"inputs not readable now: {_one_line(f'{type(e).__name__}: {e}')}"
            else:
                why = why_run(stage, record, finger, outputs_present(stage, cfg), options)
            rows.append((cfg.run_id, stage, "up to date" if why is None else f"runs ({why})"))
            if why is not None:
                upstream, any_runs = stage, True
        if cfg.run_dir.exists():
            cache.save()
    if "report" in options.stages:
        if any_runs:
            rows.append(("report", "report", "after the runs"))
        else:
            try:
                ready, _, folder, finger = _report_state(runs[0][1].outputs_dir, [c.run_id for _, c in runs],
                                                         save=False, em=report_em_definition(runs[0][1]))
                why = why_run("report", fp.read_stages(folder), finger, (folder / REPORT_NOTEBOOK).exists(), options)
                rows.append(("report", "report", "nothing to report" if not ready else
                             "up to date" if why is None else f"runs ({why})"))
            except Exception as e:
                why = _one_line(f"{type(e).__name__}: {e}")
                rows.append(("report", "report", f"runs (inputs not readable now: {why})"))
    return rows


def summary_table(results: list[StageResult]) -> str:
    rows = [("run", "stage", "status", "time")] + [
        (r.run, r.stage, r.status, f"{r.seconds:.1f}s" if r.status in ("done", "failed", "incomplete") else "-")
        for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if r.status in ("failed", "incomplete"):
            lines.append(f"{r.status}: {r.run} {r.stage}: {r.error}" + (f"  ({r.notebook})" if r.notebook else ""))
    return "\n".join(lines)


def _execute(grid_jobs: list[Job], run_ids: list[str], outputs_dir: str, em: dict[str, Any], options: Options,
             executor: str, jobs: int, gpus: Sequence[str], slurm: SlurmOptions) -> list[StageResult] | int:
    """Run (or submit) the grid's jobs and the report; their results, or an exit code when
    Slurm refused a job (2) or the grid does not wait for its jobs (0)."""
    do_runs = any(s in RUN_STAGES for s in options.stages)
    do_report = "report" in options.stages
    folder = resolve_path(outputs_dir) / ".grid" / "submitit"
    results: list[StageResult] = []

    if executor == "slurm":
        gpus_per_job = slurm.gpus_per_job
        if gpus_per_job is None:
            gpus_per_job = partition_gpus(slurm.partition)
            print(f"slurm: {gpus_per_job} GPU per run job (the partition's nodes have "
                  f"{'GPU' if gpus_per_job else 'no GPU'} GRES; --gpus-per-job N to choose)", flush=True)

        def submit(ex: Any, fn: Callable[..., Any], *args: Any) -> Any:
            from submitit.core.utils import FailedJobError

            try:
                with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's stderr itself
                    return ex.submit(fn, *args)
            except (FailedJobError, OSError, subprocess.SubprocessError) as e:
                raise GridError(submit_error(e)) from None

        run_handles = []
        report_handle = None
        try:
            if do_runs:
                for job in grid_jobs:
                    ex = _slurm_executor(folder, slurm, f"em-{job.run_id}", gpus_per_job)
                    handle = submit(ex, run_job, job)
                    log(job.run_id, "-", f"submitted Slurm job {handle.job_id}")
                    run_handles.append((job, handle))
            if do_report:
                dep = "afterany:" + ":".join(h.job_id for _, h in run_handles) if run_handles else ""
                ex = _slurm_executor(folder, slurm, "em-report", 0, dependency=dep)
                report_handle = submit(ex, _report_job, outputs_dir, run_ids, options, em)
                log("report", "report", f"submitted Slurm job {report_handle.job_id}" + (f" ({dep})" if dep else ""))
        except GridError as e:
            for _, h in run_handles:  # nothing half-submitted stays queued
                h.cancel(check=False)
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 2
        if not slurm.wait:
            print(f"submitted; logs under {folder}", flush=True)
            return 0
        for job, handle in run_handles:
            results += _submitit_collect(job, handle)
        if report_handle is not None:
            results.append(_report_result(report_handle))
    else:
        if do_runs:
            if executor == "local":
                results += run_submitit_local(grid_jobs, jobs, list(gpus), folder, slurm)
            else:
                results += run_inline(grid_jobs, jobs, list(gpus))
        if do_report:
            if executor == "local":
                import submitit
                ex = submitit.LocalExecutor(folder=folder / "%j")
                ex.update_parameters(timeout_min=slurm.time_min)
                handle = ex.submit(_report_job, outputs_dir, run_ids, options, em)
                log("report", "report", f"submitted local job {handle.job_id}")
                results.append(_report_result(handle))
            else:
                results.append(run_report(outputs_dir, run_ids, options, em))

    return results


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
    outputs_dir = runs[0][1].outputs_dir
    em = report_em_definition(runs[0][1])  # validate() made sure every run shares it
    grid_jobs = [Job(f, cfg.to_dict(), options) for f, cfg in runs]
    run_ids = [cfg.run_id for _, cfg in runs]
    print(f"grid: {len(runs)} run(s) [{', '.join(run_ids)}], stages {','.join(options.stages)}, "
          f"executor {executor}, jobs {jobs}" + (f", gpus {','.join(gpus)}" if gpus else ""), flush=True)
    t0 = time.monotonic()
    global _TAIL
    # a stage's progress lines, from its run folder's progress file (the one place a worker, a
    # local job or a Slurm job shares with this process); --log-output inline streams the
    # notebooks' own text lines instead
    tail = None if executor == "inline" and options.log_output else Tail(
        {cfg.run_id: cfg.run_dir for _, cfg in runs}, log, every=options.progress_every).start()
    _TAIL = tail
    try:
        results = _execute(grid_jobs, run_ids, outputs_dir, em, options, executor, jobs, gpus, slurm)
    finally:
        _TAIL = None
        if tail is not None:
            tail.stop()
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
    # `python -m lib.grid` runs this file as __main__: run the imported lib.grid instead, so the
    # functions submitit pickles for a job (run_job, ...) are found by reference, not copied by
    # value with this module's globals (the progress tail's thread and the print lock)
    from .grid import main as _main
    raise SystemExit(_main())
