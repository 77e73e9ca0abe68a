"""What a grid would do, and what it did: the dry run's plan and the summary table.

:func:`plan` says, per run and stage, whether the stage is up to date or runs, and why
(:func:`lib.grid_runner.why_run`), without running or downloading anything (``--dry-run``).
:func:`summary_table` is the table the grid prints when it finishes (run, stage, status, time),
with the error line of each stage that failed or is incomplete.
"""
from __future__ import annotations

from . import fingerprint as fp
from .config import ConfigError, RunConfig, report_em_definition
from .grid_jobs import Options, StageResult, one_line
from .grid_report import report_state
from .grid_runner import outputs_present, why_run
from .layout import REPORT_NOTEBOOK, RUN_STAGES
from .questions import NotCached


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
            rows.append((cfg.run_id, "-", one_line(str(e))))
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
                why = f"inputs not readable now: {one_line(f'{type(e).__name__}: {e}')}"
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
                ready, _, folder, finger = report_state(runs[0][1].outputs_dir, [c.run_id for _, c in runs],
                                                        save=False, em=report_em_definition(runs[0][1]))
                why = why_run("report", fp.read_stages(folder), finger, (folder / REPORT_NOTEBOOK).exists(), options)
                rows.append(("report", "report", "nothing to report" if not ready else
                             "up to date" if why is None else f"runs ({why})"))
            except Exception as e:
                why = one_line(f"{type(e).__name__}: {e}")
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
