"""The report stage: 04_report once over the runs of a grid that completed their stages.

:func:`run_report` is what the grid (or a submitit / Slurm job that waits for the run jobs) runs:
it leaves out the runs whose latest attempt of a stage did not succeed (:func:`run_is_complete`),
holds the report folder's lock and runs the notebook through the same skip-or-execute step as a
run's stages (:func:`lib.grid_runner.run_notebook_stage`), with the fingerprint of the runs'
results (:func:`report_state`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import fingerprint as fp
from . import layout
from .config import ReportConfig, resolve_path
from .grid_jobs import Options, StageResult, log
from .grid_runner import folder_locked, run_notebook_stage
from .layout import NOTEBOOKS, REPORT_NOTEBOOK
from .lock import LockError


def run_is_complete(run_dir: Path) -> bool:
    """The run's latest attempt of every stage succeeded and it has generations to report."""
    last = fp.read_stages(run_dir).get("last", {})
    return layout.generations_path(run_dir).exists() and all(
        v.get("status") in ("done", "skipped", "incomplete") for v in last.values())


def report_state(outputs_dir: str, runs: list[str], save: bool = True,
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
    ready, rcfg, folder, finger = report_state(outputs_dir, runs, em=em)
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
        with folder_locked(folder, f"report folder {folder}", "report", "report", options):
            return run_notebook_stage("report", "report", folder, finger, nb_out.exists(), nb_in, nb_out, params,
                                      options, {"runs": ready})
    except LockError as e:
        log("report", "report", f"not run: {e}")
        return StageResult("report", "report", "failed", error=str(e))
