"""Progress of a running stage, three ways: a live bar, text lines, and a file the grid tails.

A stage counts its work (training steps, answers, judgments) with :class:`Progress`:

* a ``tqdm.auto`` bar, as before (a widget in JupyterLab, a bar on a terminal);
* a plain-text line on stdout each time another tenth of the work is done (at most
  ``TEXT_STEPS`` lines per phase, however long the run), so a rendered notebook and its HTML
  export, where the widget renders blank, still show how the stage went;
* one JSON line per hundredth (at most ``FILE_STEPS`` + 1 lines per phase) appended to
  ``outputs/<run>/progress.jsonl`` (:func:`lib.layout.progress_path`). The grid runner tails
  that file from its own process (:class:`Tail`), whatever runs the stage: the grid's process,
  a worker, a submitit local job or a Slurm job on another node (the run folder is the one
  place they share), and prints a line now and then.

The rules count work, not time, so a phase always writes the same lines. Each JSON line::

    {"at": "2026-11-28T04:12:03+00:00", "stage": "train", "done": 12, "total": 40,
     "msg": "step 12/40 loss 2.31 (30%, 7 s)"}
"""
from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .layout import progress_path

TEXT_STEPS = 10   # text lines per phase: one per tenth of the work
FILE_STEPS = 100  # progress-file lines per phase: one per hundredth


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s} s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts one phase of a stage; see the module docstring.

    ``stage``: train | evaluate | judge (names the lines); ``label``: what is counted, as the
    lines say it (``step``, ``answers``, ``judgments``); ``run_dir``: where the progress file
    goes (None: no file); ``enabled`` False: nothing at all (no bar, no line, no file).
    ``set_postfix(loss=2.31)`` adds ``loss 2.31`` to the lines from then on.
    """

    def __init__(self, stage: str, label: str, total: int, *, run_dir: str | Path | None = None,
                 initial: int = 0, desc: str = "", unit: str = "", enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic, out: Any = None) -> None:
        self.stage, self.label, self.total, self.n = stage, label, max(int(total), 0), int(initial)
        self.enabled, self.clock, self.out = enabled, clock, out
        self.path = progress_path(run_dir) if run_dir is not None and enabled else None
        self.postfix: dict[str, Any] = {}
        self.t0 = clock()
        self._text_mark = self._mark(TEXT_STEPS)  # a line is due when the mark passes this
        self._file_mark = self._mark(FILE_STEPS)
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm  # loaded with the notebook's widgets; only when a bar is shown
            self.bar = tqdm(total=self.total, initial=self.n, desc=desc or stage, unit=unit or label)

    def _mark(self, steps: int) -> int:
        """How many 1/steps of the work are done (the total counts as all of it)."""
        return steps if self.total == 0 or self.n >= self.total else self.n * steps // self.total

    def message(self) -> str:
        """``step 12/40 loss 2.31 (30%, 7 s)``."""
        extra = "".join(f" {k} {_fmt(v)}" for k, v in self.postfix.items())
        pct = 100 if self.total == 0 else min(100, self.n * 100 // self.total)
        return f"{self.label} {self.n}/{self.total}{extra} ({pct}%, {_seconds(self.clock() - self.t0)})"

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)
        if self.bar is not None:
            self.bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)

    def set_description(self, desc: str) -> None:
        if self.bar is not None:
            self.bar.set_description(desc)

    def update(self, n: int = 1) -> None:
        self.set(self.n + n)

    def set(self, done: int) -> None:
        """Set the count (a trainer reports its global step); emits the lines that are due."""
        if done == self.n:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        self.n = done
        if not self.enabled:
            return
        text_mark, file_mark = self._mark(TEXT_STEPS), self._mark(FILE_STEPS)
        if text_mark > self._text_mark:
            self._text_mark = text_mark
            self._write_text()
        if file_mark > self._file_mark:
            self._file_mark = file_mark
            self._write_file()

    def _write_text(self) -> None:
        line = f"progress {self.stage}: {self.message()}"
        if self.out is not None:
            print(line, file=self.out, flush=True)
        elif self.bar is not None:
            self.bar.write(line, file=sys.stdout)  # above a terminal bar, not through it
        else:
            print(line, flush=True)

    def _write_file(self) -> None:
        if self.path is None:
            return
        record = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stage": self.stage,
                  "done": self.n, "total": self.total, "msg": self.message()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one write per line: a reader sees whole lines
                f.write(json.dumps(record) + "\n")
        except OSError:
            self.path = None  # progress is a convenience: a read-only folder must not stop the stage

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# The grid's side: tail every run's progress file
# ------------------------------------------------------------------------------------------

class Tail:
    """Follows the progress files of ``runs`` ({run id: run folder}) from where they end now and
    hands ``emit(run, stage, msg)`` at most one line per ``every`` seconds per (run, stage): the
    latest one, plus every line that ends a phase (done == total). ``every`` 0: every line.

    ``poll()`` reads what is new (call it to flush before printing a stage's end); ``start()``
    polls in a daemon thread every ``interval`` seconds until ``stop()``, which polls once more
    and hands over what is still held back."""

    def __init__(self, runs: dict[str, Path], emit: Callable[[str, str, str], None], every: float = 10.0,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.every, self.interval, self.clock = emit, every, interval, clock
        self.files = {run: progress_path(d) for run, d in runs.items()}
        self.offsets = {run: self._size(p) for run, p in self.files.items()}
        self.partial = {run: b"" for run in self.files}
        self.held: dict[tuple[str, str], str] = {}      # the latest line not shown yet
        self.shown: dict[tuple[str, str], float] = {}   # when a line was last shown
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def _read(self, run: str) -> list[dict[str, Any]]:
        path = self.files[run]
        size = self._size(path)
        if size < self.offsets[run]:  # the file was replaced: start over
            self.offsets[run], self.partial[run] = 0, b""
        if size == self.offsets[run]:
            return []
        try:
            with open(path, "rb") as f:
                f.seek(self.offsets[run])
                data = f.read(size - self.offsets[run])
        except OSError:
            return []
        self.offsets[run] += len(data)
        *lines, self.partial[run] = (self.partial[run] + data).split(b"\n")
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
                out.append({"stage": str(rec["stage"]), "msg": str(rec["msg"]),
                            "final": int(rec["done"]) >= int(rec["total"])})
            except (ValueError, KeyError, TypeError):
                continue  # not a progress line (a torn write after a crash): skip it
        return out

    def poll(self, flush: bool = False) -> None:
        """Read new lines; emit the due ones (``flush``: everything still held back)."""
        with self._lock:
            now = self.clock()
            for run in self.files:
                for rec in self._read(run):
                    key = (run, rec["stage"])
                    if rec["final"] or self.every <= 0:
                        self.held.pop(key, None)
                        self._show(key, rec["msg"], now)
                    else:
                        self.held[key] = rec["msg"]
            for key, msg in list(self.held.items()):
                if flush or now - self.shown.get(key, float("-inf")) >= self.every:
                    del self.held[key]
                    self._show(key, msg, now)

    def _show(self, key: tuple[str, str], msg: str, now: float) -> None:
        self.shown[key] = now
        self.emit(key[0], key[1], msg)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # progress is a convenience: never take the grid down
                pass

    def start(self) -> "Tail":
        self._thread = threading.Thread(target=self._loop, name="progress-tail", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.poll(flush=True)
