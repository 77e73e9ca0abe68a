"""lib.lock: one writer per run folder, a clear line naming the holder, stale locks taken over."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib import lock
from lib.lock import LOCK_NAME, FolderLock, LockError, read_holder

HOLD = """
import sys, time
from lib.lock import FolderLock
lk = FolderLock(sys.argv[1], "run 'x'").acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lk.release()
"""


def _holder_process(folder: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(lock.__file__).parent.parent)})
    assert p.stdout.readline().strip() == "held"
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"pid": 1, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00", "token": "old",
            "what": "run 'x'", **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(data))
    return path


def test_second_process_stops_with_one_line_naming_the_holder(tmp_path):
    p = _holder_process(tmp_path / "run", 30)
    try:
        with pytest.raises(LockError) as e:
            FolderLock(tmp_path / "run", "run 'x'").acquire(wait=0)
        msg = str(e.value)
        assert "\n" not in msg
        assert f"run 'x' is in use by pid {p.pid} on host {socket.gethostname()} since 20" in msg
        assert str(tmp_path / "run" / LOCK_NAME) in msg
        holder = read_holder(tmp_path / "run" / LOCK_NAME)
        assert holder.pid == p.pid
    finally:
        p.kill()
        p.wait()


def test_waiter_gets_the_lock_when_the_holder_releases(tmp_path):
    p = _holder_process(tmp_path / "run", 1.5)
    lines: list[str] = []
    lk = FolderLock(tmp_path / "run", "run 'x'").acquire(wait=None, poll_s=0.1, on_wait=lines.append)
    try:
        assert p.wait(timeout=30) == 0
        assert len(lines) == 1 and lines[0].startswith(f"waiting: run 'x' is in use by pid {p.pid}")
        assert read_holder(lk.path).pid == os.getpid()
        assert lk.took_over is None  # released cleanly, not taken over
    finally:
        lk.release()
    assert not lk.path.exists()


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    dead = _dead_pid()
    _write_lock(tmp_path / "run", pid=dead)
    lk = FolderLock(tmp_path / "run").acquire(wait=0)
    try:
        assert lk.took_over is not None and lk.took_over.pid == dead
        assert read_holder(lk.path).pid == os.getpid()
    finally:
        lk.release()


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path):
    # the pid is alive (this process) but started at another time: a different process
    _write_lock(tmp_path / "run", pid=os.getpid(), proc_start=12345.0)
    lk = FolderLock(tmp_path / "run").acquire(wait=0)
    assert lk.took_over is not None
    lk.release()


def test_other_host_lock_is_stale_only_after_its_heartbeat_stops(tmp_path):
    path = _write_lock(tmp_path / "run", host="node-17", pid=4242)
    with pytest.raises(LockError, match="pid 4242 on host node-17"):
        FolderLock(tmp_path / "run", stale_after_s=60).acquire(wait=0)
    old = time.time() - 600
    os.utime(path, (old, old))  # no heartbeat for 10 minutes
    lk = FolderLock(tmp_path / "run", stale_after_s=60).acquire(wait=0)
    assert lk.took_over.host == "node-17"
    lk.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    lk = FolderLock(tmp_path / "run", heartbeat_s=0.05).acquire()
    try:
        old = time.time() - 600
        os.utime(lk.path, (old, old))
        for _ in range(200):
            if time.time() - lk.path.stat().st_mtime < 60:
                break
            time.sleep(0.02)
        assert time.time() - lk.path.stat().st_mtime < 60
    finally:
        lk.release()


def _race(folder: str, barrier, results) -> None:
    barrier.wait()
    try:
        lk = FolderLock(folder).acquire(wait=0)
    except LockError:
        results.put("busy")
        return
    results.put("got")
    time.sleep(1.0)  # hold it while the others try
    lk.release()


def test_many_processes_breaking_one_stale_lock_leave_exactly_one_holder(tmp_path):
    _write_lock(tmp_path / "run", pid=_dead_pid())
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "run"), barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["busy"] * 5 + ["got"]


def test_a_child_of_the_holder_inherits_the_lock_through_the_environment(tmp_path, monkeypatch):
    parent = FolderLock(tmp_path / "run").acquire()
    try:
        monkeypatch.setenv(lock.ENV_HELD, parent.env()[lock.ENV_HELD])
        child = FolderLock(tmp_path / "run").acquire(wait=0)
        assert child.inherited
        child.release()
        assert parent.path.exists()  # the child's release leaves the parent's lock alone
        # an env entry naming another token (a previous grid's) grants nothing
        monkeypatch.setenv(lock.ENV_HELD, json.dumps({str(parent.folder): "someone-else"}))
        with pytest.raises(LockError):
            FolderLock(tmp_path / "run").acquire(wait=0)
    finally:
        parent.release()
