"""Running one run's stage notebooks with papermill, and deciding which to skip.

:func:`run_job` is what a worker process, a submitit job or a Slurm job runs for one run: it
holds the run folder's lock (:func:`folder_locked`, :mod:`lib.lock`) and runs 01_train,
02_evaluate, 03_judge in order (:func:`run_stage`); after a failure the rest are 'not run'.
:func:`run_notebook_stage` skips a stage whose fingerprint (:mod:`lib.fingerprint`) and output
are unchanged (:func:`why_run` says why not), else executes its notebook
(:func:`execute_notebook`), exports the rendered notebook to HTML (:mod:`lib.notebook_html`) and
records the outcome in the folder's ``stages.json``. The report stage (:mod:`lib.grid_report`)
runs through the same two functions.
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from . import fingerprint as fp
from . import layout
from .config import RunConfig, from_mapping
from .grid_jobs import Job, Options, StageResult, flush_progress, log, one_line, utc_now
from .judge import judgments_path
from .judge import run_info as judge_run_info
from .layout import NOTEBOOKS, RUN_STAGES
from .lock import ENV_HELD, FolderLock, LockError
from .notebook_html import export_html
from .secrets import ENV_URL_SECRETS, mask_parameters


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
    from jupyter_client import AsyncKernelManager  # heavy: only when a notebook runs (an up-to-date grid starts at once)

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
    import papermill as pm  # heavy (~1 s): only when a notebook runs, so an up-to-date grid starts at once
    from papermill.exceptions import PapermillExecutionError  # heavy: with papermill

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
        evalue = one_line(e.evalue) if str(e.evalue).strip() else ""
        return f"{e.ename}: {evalue}" if evalue else e.ename
    except Exception as e:  # a dead kernel, a kernel that never started, an unreadable notebook ...
        return one_line(f"{type(e).__name__}: {e}")
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


def run_notebook_stage(run: str, stage: str, folder: Path, finger: str, present: bool,
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
        record.setdefault("last", {})[stage] = {"status": "running", "at": utc_now()}
        fp.write_stages(folder, record)
        t0 = time.monotonic()
        error = execute_notebook(nb_in, nb_out, parameters, options)
        flush_progress()
        html = nb_out.with_suffix(".html")
        if nb_out.exists():
            try:
                export_html(nb_out, html, hide_code=stage == "report")
            except Exception as e:  # the notebook is still there; the export is a convenience
                log(run, stage, f"warning: HTML export failed: {one_line(f'{type(e).__name__}: {e}')}")
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
            record[stage] = {"fingerprint": finger, "finished": utc_now(), "seconds": round(seconds, 2),
                             "notebook": str(nb_out), **extra}
        else:
            log(run, stage, f"FAILED after {seconds:.1f}s: {error}")
            log(run, stage, f"notebook: {nb_out}")
            result = StageResult(run, stage, "failed", seconds, str(nb_out), error)
            record = fp.read_stages(folder)
    record.setdefault("last", {})[stage] = {"status": result.status, "at": utc_now()}
    fp.write_stages(folder, record)
    return result


def run_stage(stage: str, cfg: RunConfig, options: Options, params_file: str = "") -> StageResult:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = fp.hash_cache_for(run_dir)
    try:
        finger = fp.stage_fingerprint(stage, cfg, cache)
    except Exception as e:  # an input vanished between validation and now
        log(cfg.run_id, stage, f"FAILED: cannot fingerprint inputs: {one_line(str(e))}")
        return StageResult(cfg.run_id, stage, "failed", error=one_line(f"{type(e).__name__}: {e}"))
    finally:
        cache.save()
    nb_in = Path(options.notebooks_dir) / NOTEBOOKS[stage]
    nb_out = layout.notebooks_dir(run_dir) / NOTEBOOKS[stage]
    return run_notebook_stage(cfg.run_id, stage, run_dir, finger, outputs_present(stage, cfg), nb_in, nb_out,
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
def folder_locked(folder: Path, what: str, run: str, stage: str, options: Options) -> Iterator[FolderLock]:
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
            with folder_locked(cfg.run_dir, f"run '{cfg.run_id}'", cfg.run_id, "-", job.options):
                for stage in stages:
                    if results and results[-1].status in ("failed", "not run"):
                        results.append(StageResult(cfg.run_id, stage, "not run"))
                        continue
                    if stage == "train" and cfg.epochs == 0:  # the base model only (in-context conditions)
                        log(cfg.run_id, stage, "skipped: epochs 0, no training")
                        results.append(StageResult(cfg.run_id, stage, "skipped"))
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
