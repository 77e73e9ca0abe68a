"""The judge stage through the grid: failed calls leave the stage not done, a plain rerun retries
exactly those, the cost counts the calls that were answered, and a password in the judge's URL
reaches the client but no file.

Before: error rows were recorded as a finished stage (only ``--force judge`` retried them), any
error row made the run's cost ``null``, and ``judge_base_url``'s password was kept in run.json's
parameters and in the rendered 03_judge notebook.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from lib import grid
from lib.costs import cost_usd
from lib.fingerprint import read_stages
from lib.runinfo import stage_parameters
from tests.fakes.chat_server import ChatServer
from tests.fakes.judge_inputs import write_generations, write_prompts

pytestmark = pytest.mark.slow

PASSWORD = "pw-3f9c1e-not-for-files"


def test_error_rows_leave_the_judge_not_done_and_a_plain_rerun_retries_only_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EM_LAB_GAPS_KEY", "dummy")
    out = tmp_path / "outputs"
    write_generations(out, run_id="gap_run", n=6)
    # the first attempt at every prompt about answer 1 or 4 gets a 400 (not retried: an error row)
    fail = ("Answer 1:", "Answer 4:")
    with ChatServer(fault=lambda prompt, attempt: "400" if attempt == 0 and any(f in prompt for f in fail) else None
                    ) as server:
        url = server.url.replace("http://", f"http://judge:{PASSWORD}@")
        params = tmp_path / "gap_run.yaml"
        params.write_text(yaml.safe_dump({
            "run_id": "gap_run", "outputs_dir": str(out), "judge_prompts": str(write_prompts(tmp_path)),
            "judge_backend": "openai", "judge_method": "logprob", "judge_model": "gpt-4o-mini-2024-07-18",
            "judge_base_url": url, "judge_api_key_env": "EM_LAB_GAPS_KEY", "judge_max_retries": 1,
            "judge_min_mass": 0.25, "device": "cpu"}))
        run = ["run", str(params), "--stages", "judge"]

        assert grid.main(run) == 1
        text = capsys.readouterr().out
        assert "incomplete: gap_run judge: 4 judge call(s) failed (error rows)" in text, text
        assert read_stages(out / "gap_run")["last"]["judge"]["status"] == "incomplete"
        assert "judge" not in read_stages(out / "gap_run")  # no fingerprint recorded as done
        table = pd.read_parquet(next((out / "gap_run" / "judgments").glob("*.parquet")))
        failed = set(table.loc[table["label"] == "error", "prompt_sha256"])
        assert len(table) == 12 and len(failed) == 4
        info = json.loads((out / "gap_run" / "run.json").read_text())["judge"]["judges"]
        (judge_info,) = info.values()
        answered = table[table["label"] != "error"]
        expected = sum(cost_usd("gpt-4o-mini", i, o) for i, o in zip(answered["input_tokens"], answered["output_tokens"]))
        assert judge_info["complete"] is False and judge_info["errors"] == 4
        assert judge_info["table_cost_usd"] == pytest.approx(expected) and expected > 0  # not null
        assert judge_info["this_session"]["cost_usd"] == pytest.approx(expected)
        seen_first = len(server.requests)

        assert grid.main(run) == 0  # plain rerun: no --force
        text = capsys.readouterr().out
        assert "judge     started (retry what is missing)" in text
        retried = server.requests[seen_first:]
        import hashlib
        assert {hashlib.sha256(s.prompt.encode()).hexdigest() for s in retried} == failed
        assert len(retried) == 4 and all(s.outcome == "ok" for s in retried)

        assert grid.main(run) == 0
        assert "judge     skipped (unchanged" in capsys.readouterr().out
        assert len(server.requests) == seen_first + 4
        assert set(server.ok_counts().values()) == {1}  # no answered call made twice
    table = pd.read_parquet(next((out / "gap_run" / "judgments").glob("*.parquet")))
    assert len(table) == 12 and (table["label"] == "number").all()

    # the password reached the client (requests were answered) but no file
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "03_judge.ipynb" for p in files) and any(p.name == "03_judge.html" for p in files)
    leaks = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not leaks, f"password written to {leaks}"
    params_json = stage_parameters(json.loads((out / "gap_run" / "run.json").read_text()), "judge")
    assert params_json["judge_base_url"] == url.replace(PASSWORD, "***")
