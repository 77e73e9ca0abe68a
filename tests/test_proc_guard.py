"""lib/proc_guard.py: a served judge does not outlive the process that started it, even when that
process is killed with SIGKILL (a restarted kernel): the guard sees its stdin close and stops its
whole process group (the server and what the server started). No vLLM needed: the "server" here is
a Python process that starts a child of its own and sleeps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lib import judge_vllm, proc_guard

REPO = Path(__file__).resolve().parents[1]
# a stand-in server: starts a grandchild, writes both pids, sleeps until killed
SERVER = textwrap.dedent("""
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    open(sys.argv[1] + ".tmp", "w").write(json.dumps({"server": __import__("os").getpid(), "child": child.pid}))
    __import__("os").replace(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(3600)
""")


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (in a container, pid 1 may not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_for(cond, what: str, limit_s: float = 120.0) -> None:
    """Wait on a condition (checked every 50 ms); the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pids(path: Path) -> dict[str, int]:
    _wait_for(path.exists, "the stand-in server to start")
    return json.loads(path.read_text())


def _kill_group_quietly(pids: dict[str, int]) -> None:
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_guard_exits_with_the_commands_code_and_passes_sigterm_on(tmp_path):
    guard = str(Path(proc_guard.__file__))
    # started without a session of its own: it makes one (stopping its group never reaches this one)
    done = subprocess.Popen([sys.executable, guard, "5", "--", sys.executable, "-c", "raise SystemExit(3)"],
                            stdin=subprocess.PIPE)
    assert done.wait(timeout=120) == 3
    done.stdin.close()
    pids_file = tmp_path / "pids.json"
    p = subprocess.Popen([sys.executable, guard, "5", "--", sys.executable, "-c", SERVER, str(pids_file)],
                         stdin=subprocess.PIPE, start_new_session=True)
    pids = _pids(pids_file)
    try:
        p.send_signal(signal.SIGTERM)                       # what VllmServer.stop sends first
        assert p.wait(timeout=120) == 128 + signal.SIGTERM  # the server got it and died of it
        _wait_for(lambda: _gone(pids["server"]), "the server to end")
    finally:
        _kill_group_quietly(pids)
        p.stdin.close()
    assert subprocess.run([sys.executable, guard, "5"], capture_output=True).returncode == 2   # usage


def test_a_sigkilled_starter_takes_its_served_judge_and_the_judges_children_with_it(tmp_path):
    """The real VllmServer.start (its vLLM command replaced by the stand-in) in a starter process;
    SIGKILL the starter: the server and its child end, nothing is left holding memory or the port."""
    pids_file = tmp_path / "pids.json"
    starter = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from lib import judge_vllm
        judge_vllm.require_vllm = lambda what: sys.executable
        judge_vllm.VllmServer.command = lambda self, python: [python, "-c", {SERVER!r}, {str(pids_file)!r}]
        pinned = judge_vllm.Pinned("stand-in", Path("."), "r0", {{}}, "0" * 64, "0" * 64)
        server = judge_vllm.VllmServer(pinned, port=1)
        server.start()
        print(server.proc.pid, flush=True)
        time.sleep(3600)
    """)
    s = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE, text=True)
    guard_pid = int(s.stdout.readline())
    pids = _pids(pids_file)
    try:
        assert not any(_gone(p) for p in (guard_pid, *pids.values()))
        os.kill(s.pid, signal.SIGKILL)
        s.wait(timeout=120)
        for name, pid in {"guard": guard_pid, **pids}.items():
            _wait_for(lambda: _gone(pid), f"the {name} (pid {pid}) to end after its starter was killed")
    finally:
        _kill_group_quietly({"guard": guard_pid, **pids})


def test_vllm_server_stop_ends_the_guarded_group(tmp_path, monkeypatch):
    """The normal path: stop() (SIGTERM, then SIGKILL to the group) ends guard, server and child."""
    pids_file = tmp_path / "pids.json"
    monkeypatch.setattr(judge_vllm, "require_vllm", lambda what: sys.executable)
    monkeypatch.setattr(judge_vllm.VllmServer, "command",
                        lambda self, python: [python, "-c", SERVER, str(pids_file)])
    server = judge_vllm.VllmServer(judge_vllm.Pinned("stand-in", Path("."), "r0", {}, "0" * 64, "0" * 64), port=1)
    server.start()
    guard_pid = server.proc.pid
    pids = _pids(pids_file)
    try:
        assert server.proc.args[:2] == [sys.executable, str(judge_vllm.GUARD)]
        server.stop()
        assert server.proc is None
        for pid in (guard_pid, *pids.values()):
            _wait_for(lambda: _gone(pid), f"pid {pid} to end after stop()")
    finally:
        _kill_group_quietly(pids)


def test_closing_the_pipe_stops_the_group_and_never_the_starters_own(tmp_path):
    """Started without start_new_session, the guard still stops only its own group: this test process
    (the starter) is alive to see the server end."""
    guard = str(Path(proc_guard.__file__))
    pids_file = tmp_path / "pids.json"
    p = subprocess.Popen([sys.executable, guard, "5", "--", sys.executable, "-c", SERVER, str(pids_file)],
                         stdin=subprocess.PIPE)
    pids = _pids(pids_file)
    try:
        assert os.getpgid(p.pid) != os.getpgrp()
        p.stdin.close()
        assert p.wait(timeout=120) in (128 + signal.SIGTERM, -signal.SIGKILL)  # the guard ends with its group
        for pid in pids.values():
            _wait_for(lambda: _gone(pid), f"pid {pid} to end after the pipe closed")
    finally:
        _kill_group_quietly(pids)
