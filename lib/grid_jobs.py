"""The records every part of the grid runner shares, and its printing.

:class:`Options` (what to run and how), :class:`Job` (one run, as it travels to a worker
process or a Slurm node), :class:`StageResult` (one row of the summary table) and
:class:`GridError` (a problem found before anything runs). :func:`log` prints one line per event
(time, run, stage, message); while the grid runs stages, :func:`tailing_progress` also prints the
stages' progress lines from their run folders (:mod:`lib.progress`), and :func:`flush_progress`
prints what it still holds back, so a stage's last progress line comes before its 'done'.
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .config import REPO_ROOT
from .layout import STAGES
from .progress import Tail
from .secrets import redact


class GridError(Exception):
    """A problem found before anything runs: one line, exit code 2."""


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
    status: str          # done | skipped | failed | incomplete | not run
    seconds: float = 0.0
    notebook: str = ""
    error: str = ""


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def one_line(text: str, limit: int = 400) -> str:
    """The last non-empty line of ``text``, secrets redacted, at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = redact(lines[-1] if lines else str(text))
    return line if len(line) <= limit else line[: limit - 3] + "..."


_PRINT_LOCK = threading.Lock()  # the progress tail prints from its own thread


def log(run: str, stage: str, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')}  {run:<24} {stage:<9} {msg}\n"
    with _PRINT_LOCK:  # one write per line: the tail's lines never split one of ours
        sys.stdout.write(line)
        sys.stdout.flush()


# the grid's tail of its runs' progress files, while it runs stages in this process
_TAIL: Tail | None = None


@contextmanager
def tailing_progress(run_dirs: dict[str, Path], every: float, enabled: bool = True) -> Iterator[None]:
    """Print each stage's progress lines ({run id: run folder}'s progress files, at most one per
    ``every`` seconds per stage) through :func:`log` while the block runs; ``enabled`` False: nothing."""
    global _TAIL
    tail = Tail(run_dirs, log, every=every).start() if enabled else None
    _TAIL = tail
    try:
        yield
    finally:
        _TAIL = None
        if tail is not None:
            tail.stop()


def flush_progress() -> None:
    """Print what the tail has not printed yet, so a stage's last progress line precedes its 'done'."""
    if _TAIL is not None:
        _TAIL.poll(flush=True)
