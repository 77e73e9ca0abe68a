"""Two grids on one run at once: the second stops (or waits) with one line; nothing is done twice.

Before the run lock, two grids on the same parameters both trained into one checkpoint folder
(duplicate steps in train_log.csv), deleted each other's generation parts, overwrote
stages.json and paid twice for most judge calls. Here grid A judges a run through the real
03_judge notebook against an API judge served on 127.0.0.1, whose first reply is held back
until the other grids have had their turn: while A holds the run, grid B (default) stops at
once naming A's pid, and grid C (``--wait-lock``) waits, then finds the judge stage up to date.
The server counts its replies: each prompt was paid for once. (The lock is held by the grid
for the whole run, train and evaluate included; the real pipeline under a lock also runs in
tests/test_slurm.py.)
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import yaml

from lib import config
from lib.fingerprint import read_stages
from lib.lock import LOCK_NAME, read_holder
from tests.fakes.chat_server import ChatServer, default_reply
from tests.fakes.judge_inputs import write_generations, write_prompts

pytestmark = pytest.mark.slow


def _grid(params: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(config.REPO_ROOT), "EM_LAB_LOCK_TEST_KEY": "dummy-key",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lib.grid", "run", params, "--stages", "judge", *extra],
                            cwd=config.REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen, into: list[str]) -> threading.Thread:
    t = threading.Thread(target=lambda: into.extend(ln.rstrip("\n") for ln in proc.stdout), daemon=True)
    t.start()
    return t


def test_second_grid_stops_third_waits_and_nothing_is_paid_twice(tmp_path):
    out = tmp_path / "outputs"
    write_generations(out, run_id="locked_run", n=8)
    gate = threading.Event()  # the judge's first reply waits for this
    arrived = threading.Event()  # set when A's first judge call reaches the server (server.requests
    # only lists a request once it is answered, so waiting on it sat out the 300 s loop)

    def reply(body):
        arrived.set()
        gate.wait(300)
        return default_reply(body)

    with ChatServer(reply=reply) as server:
        params = tmp_path / "run.yaml"
        params.write_text(yaml.safe_dump({
            "run_id": "locked_run", "outputs_dir": str(out), "judge_prompts": str(write_prompts(tmp_path)),
            "judge_backend": "openai", "judge_method": "logprob", "judge_model": "gpt-4o-mini-2024-07-18",
            "judge_base_url": server.url, "judge_api_key_env": "EM_LAB_LOCK_TEST_KEY", "judge_min_mass": 0.25,
            "judge_concurrency": 2, "device": "cpu",
            "judge_timeout_s": 900.0}))  # the held calls must not time out and be retried
        run_dir = out / "locked_run"
        lock = run_dir / LOCK_NAME
        try:
            a = _grid(str(params))
            for _ in range(3000):  # A holds the run and its judge is waiting for its first reply
                if (read_holder(lock) is not None and arrived.is_set()) or a.poll() is not None:
                    break
                time.sleep(0.1)
            holder = read_holder(lock)
            assert arrived.is_set(), "grid A's judge never called the server"
            assert holder is not None and holder.pid == a.pid, "grid A never took the run lock"

            b = _grid(str(params))
            b_out, b_err = b.communicate(timeout=300)
            c = _grid(str(params), "--wait-lock")
            c_lines: list[str] = []
            reader = _lines(c, c_lines)
            for _ in range(3000):
                if any(ln.startswith("waiting") or "waiting:" in ln for ln in c_lines) or c.poll() is not None:
                    break
                time.sleep(0.1)
        finally:
            gate.set()  # now A's judge gets its replies and finishes
        a_out, a_err = a.communicate(timeout=600)
        c.wait(timeout=600)
        reader.join(10)
        c_out = "\n".join(c_lines) + c.stderr.read()
        counts = server.ok_counts()

    assert a.returncode == 0, a_out + a_err
    assert "judge     done in" in a_out
    assert b.returncode == 2
    errors = [ln for ln in b_err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, b_err
    assert errors[0].startswith(f"error: run 'locked_run' is in use by pid {a.pid} on host {socket.gethostname()} "
                                "since ") and errors[0].endswith("wait for it to finish, or pass --wait-lock")
    assert "started" not in b_out

    assert c.returncode == 0, c_out
    assert f"waiting: run 'locked_run' is in use by pid {a.pid}" in c_out
    assert "judge     skipped (unchanged" in c_out and "started" not in c_out

    judgments = pd.read_parquet(next((run_dir / "judgments").glob("*.parquet")))
    assert len(judgments) == 16 and (judgments["label"] == "number").all()
    assert not judgments.duplicated(["answer_id", "metric"]).any()
    assert set(counts.values()) == {1} and len(counts) == judgments["cache_key"].nunique()  # each call paid once
    record = read_stages(run_dir)
    assert record["last"]["judge"]["status"] == "skipped" and record["judge"]["fingerprint"]  # C, after A's done
    assert not lock.exists()  # released


def test_notebook_opened_by_hand_stops_while_a_grid_holds_the_run(tmp_path):
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    from lib.lock import FolderLock

    out = tmp_path / "outputs"
    held = FolderLock(out / "hand_run", "run 'hand_run'").acquire()
    try:
        rendered = tmp_path / "01_train.ipynb"
        with pytest.raises(PapermillExecutionError) as e:
            pm.execute_notebook(str(config.REPO_ROOT / "notebooks" / "01_train.ipynb"), str(rendered),
                                parameters={"run_id": "hand_run", "outputs_dir": str(out), "device": "cpu"},
                                kernel_name="python3", progress_bar=False, cwd=str(config.REPO_ROOT))
        assert e.value.ename == "LockError"
        assert f"run 'hand_run' is in use by pid {os.getpid()}" in e.value.evalue
        assert not (out / "hand_run" / "checkpoints").exists()  # stopped in the config cell
    finally:
        held.release()
