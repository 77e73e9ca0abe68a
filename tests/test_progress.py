"""lib.progress: the text lines a rendered notebook keeps, the progress file, and the grid's tail of it.

A fake clock drives every case, so the lines (and their seconds) are exact; nothing here sleeps.
The grid end to end: tests/test_grid.py (stand-in notebooks, inline and submitit local jobs) and
tests/test_grid_demo.py (the real notebooks).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from lib import grid_jobs
from lib.layout import progress_path
from lib.progress import FILE_STEPS, TEXT_STEPS, Progress, Tail


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _count(total: int, run_dir: Path | None, clock: Clock, initial: int = 0, **postfix) -> tuple[list[str], Path]:
    out = io.StringIO()
    p = Progress("train", "step", total, run_dir=run_dir, initial=initial, clock=clock, out=out)
    for _ in range(total - initial):
        clock.t += 1.5
        if postfix:
            p.set_postfix(**postfix)
        p.update()
    p.close()
    return out.getvalue().splitlines(), progress_path(run_dir) if run_dir else Path()


def _file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_one_text_line_per_tenth_one_file_line_per_step_below_a_hundred(tmp_path):
    clock = Clock()
    text, path = _count(40, tmp_path, clock, loss=2.3125)
    assert len(text) == TEXT_STEPS == 10
    assert text[0] == "progress train: step 4/40 loss 2.312 (10%, 6 s)"  # 4 steps x 1.5 s
    assert text[-1] == "progress train: step 40/40 loss 2.312 (100%, 1m00s)"
    assert [int(t.split()[3].split("/")[0]) for t in text] == list(range(4, 41, 4))
    rows = _file(path)
    assert [r["done"] for r in rows] == list(range(1, 41)) and {r["total"] for r in rows} == {40}
    assert {r["stage"] for r in rows} == {"train"}
    assert rows[11]["msg"] == "step 12/40 loss 2.312 (30%, 18 s)"


def test_long_phases_stay_short(tmp_path):
    """20,000 judgments: 10 text lines and 100 file lines, at each tenth and hundredth."""
    clock = Clock()
    out = io.StringIO()
    p = Progress("judge", "judgments", 20_000, run_dir=tmp_path, clock=clock, out=out)
    for _ in range(2_000):
        p.update(10)  # a backend may count several at once
    text = out.getvalue().splitlines()
    assert len(text) == TEXT_STEPS
    assert text[4] == "progress judge: judgments 10000/20000 (50%, 0 s)"
    rows = _file(progress_path(tmp_path))
    assert len(rows) == FILE_STEPS and [r["done"] for r in rows] == list(range(200, 20_001, 200))


def test_resumed_phase_counts_from_where_it_stopped(tmp_path):
    clock = Clock()
    text, path = _count(40, tmp_path, clock, initial=20)
    assert [t.split()[3] for t in text] == ["24/40", "28/40", "32/40", "36/40", "40/40"]
    assert [r["done"] for r in _file(path)] == list(range(21, 41))


def test_set_moves_to_a_count_and_repeats_nothing(tmp_path):
    out = io.StringIO()
    p = Progress("train", "step", 4, run_dir=tmp_path, clock=Clock(), out=out)
    p.set(2)
    p.set(2)
    p.set(4)
    assert out.getvalue().splitlines() == ["progress train: step 2/4 (50%, 0 s)",
                                           "progress train: step 4/4 (100%, 0 s)"]
    assert [r["done"] for r in _file(progress_path(tmp_path))] == [2, 4]


def test_disabled_progress_writes_nothing(tmp_path, capsys):
    p = Progress("evaluate", "answers", 5, run_dir=tmp_path, enabled=False)
    for _ in range(5):
        p.update()
    p.close()
    assert not progress_path(tmp_path).exists()
    assert capsys.readouterr() == ("", "")


def test_without_a_run_folder_only_text(tmp_path, capsys):
    p = Progress("evaluate", "answers", 2, run_dir=None, clock=Clock())
    p.update()
    p.update()
    p.close()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("progress")]
    assert lines == ["progress evaluate: answers 1/2 (50%, 0 s)", "progress evaluate: answers 2/2 (100%, 0 s)"]
    assert list(tmp_path.iterdir()) == []


# --- the grid's tail ---------------------------------------------------------------------------

def _append(run_dir: Path, stage: str, done: int, total: int, raw: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    line = raw if raw is not None else json.dumps({"at": "x", "stage": stage, "done": done, "total": total,
                                                   "msg": f"n {done}/{total}"}) + "\n"
    with open(progress_path(run_dir), "a", encoding="utf-8") as f:
        f.write(line)


def test_tail_shows_the_latest_line_per_interval_and_every_final_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _append(a, "train", 1, 1)  # written before the grid started: not shown
    clock, got = Clock(), []
    tail = Tail({"a": a, "b": b}, lambda run, stage, msg: got.append((run, stage, msg)), every=10, clock=clock)
    for k in range(1, 6):
        _append(a, "evaluate", k, 10)
    _append(b, "train", 1, 3)
    tail.poll()  # first lines of each (run, stage): shown at once, the latest of them
    assert got == [("a", "evaluate", "n 5/10"), ("b", "train", "n 1/3")]
    clock.t = 5
    for k in range(6, 10):
        _append(a, "evaluate", k, 10)
    tail.poll()  # within 10 s of the last one shown: held back
    assert len(got) == 2
    clock.t = 10
    tail.poll()  # 10 s on: the latest held line
    assert got[2:] == [("a", "evaluate", "n 9/10")]
    _append(a, "evaluate", 10, 10)
    _append(a, "judge", 1, 4)
    clock.t = 11
    tail.poll()  # a phase's end is always shown; another stage has its own interval
    assert got[3:] == [("a", "evaluate", "n 10/10"), ("a", "judge", "n 1/4")]
    _append(b, "train", 2, 3)
    tail.stop()  # the last poll hands over what is held back
    assert got[5:] == [("b", "train", "n 2/3")]


def test_tail_every_zero_shows_every_line_and_waits_for_whole_lines(tmp_path):
    got: list[str] = []
    tail = Tail({"r": tmp_path}, lambda run, stage, msg: got.append(msg), every=0, clock=Clock())
    _append(tmp_path, "train", 1, 3)
    line = json.dumps({"at": "x", "stage": "train", "done": 2, "total": 3, "msg": "n 2/3"}) + "\n"
    _append(tmp_path, "", 0, 0, raw=line[:20])  # a line being written
    tail.poll()
    assert got == ["n 1/3"]
    _append(tmp_path, "", 0, 0, raw=line[20:] + "not json\n")
    _append(tmp_path, "train", 3, 3)
    tail.poll()
    assert got == ["n 1/3", "n 2/3", "n 3/3"]  # the torn line completed; garbage skipped
    progress_path(tmp_path).write_text("")  # the file was replaced: read it from its start
    _append(tmp_path, "judge", 1, 2)
    tail.poll()
    assert got[-1] == "n 1/2"


def test_grid_log_lines_carry_time_run_stage_and_message(capsys):
    grid_jobs.log("demo_medical", "train", "step 12/40 loss 2.31 (30%, 7 s)")
    line = capsys.readouterr().out
    assert line.endswith("  demo_medical             train     step 12/40 loss 2.31 (30%, 7 s)\n")
    assert line[2] == ":" and line[5] == ":" and line.count("\n") == 1
