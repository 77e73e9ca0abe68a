"""lib.judge, the judge stage: judge names, the judge cache and rescoring, the 03_judge notebook,
and the stage run through the grid. Each backend has its own file (test_judge_openai.py,
test_judge_openai_retries.py, test_judge_hf.py); the registry and protocol are
test_judge_backends.py's; the scoring rules test_scoring.py's."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from lib import grid, judge, judge_health, secrets
from lib.config import RunConfig
from lib.costs import cost_usd
from lib.fingerprint import read_stages
from lib.runinfo import stage_parameters
from lib.scoring import Verdict
from tests.fakes.chat_server import ChatServer
from tests.fakes.judge_inputs import write_generations, write_prompts


def test_judge_names_are_safe_and_distinct():
    cfg = RunConfig()
    assert judge.judge_name(cfg) == "hf-embedded_tiny-exact"
    api = cfg.replace(judge_backend="openai", judge_model="gpt-4o-mini-2024-07-18", judge_method="logprob")
    assert judge.judge_name(api) == "openai-gpt-4o-mini-2024-07-18-logprob"
    local = api.replace(judge_base_url="http://user:secret@localhost:11434/v1", judge_model="llama3.1:8b")
    assert judge.judge_name(local) == "openai-localhost-llama3.1_8b-logprob"
    assert "secret" not in secrets.safe_base_url(local.judge_base_url)
    assert judge.judge_name(api.replace(judge_name="my judge/v2")) == "my_judge_v2"
    assert judge.judgments_path(api).name == "openai-gpt-4o-mini-2024-07-18-logprob.parquet"


# ------------------------------------------------------------------------------------------
# the judge cache and rescoring: what is paid for once stays paid for
# ------------------------------------------------------------------------------------------


def test_judge_cache_commits_each_put_and_reads_back_many_keys(tmp_path):
    import sqlite3
    import threading

    from lib.judge import JudgeCache

    path = tmp_path / "outputs" / ".judge_cache" / "cache.sqlite3"  # the folders are created
    c = JudgeCache(path)
    v = Verdict(score=42.0, label="number", raw='{"42": 0.0}', prob_mass=1.0, input_tokens=9, output_tokens=1,
                cost_usd=0.001, judge_model="m-2024", finish_reason="length", attempts=2)
    c.put("k1", "judge-a", "sha-1", v)
    # committed at once (autocommit): another connection sees it while this one is still open
    other = sqlite3.connect(path)
    assert other.execute("SELECT key, judge, prompt_sha256 FROM judgments").fetchall() == [("k1", "judge-a", "sha-1")]
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    assert c._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert c._db.execute("PRAGMA busy_timeout").fetchone()[0] == 60000
    assert JudgeCache(path).get_many(["k1"]) == {"k1": v}  # every field of the evidence survives
    # a second put of the same key replaces it; keys are looked up once however often asked for
    v2 = Verdict(score=None, label="error", raw="", error="HTTP 500", attempts=3)
    c.put("k1", "judge-a", "sha-1", v2)
    assert len(c) == 1 and c.get_many(["k1", "k1", "missing"]) == {"k1": v2}
    # more keys than one query takes (SQLite's variable limit): read in chunks, none lost
    keys = [f"key-{i}" for i in range(1203)]
    for i, k in enumerate(keys[::2]):
        c.put(k, "judge-a", f"p{i}", v)
    got = c.get_many(keys)
    assert len(c) == 1 + 602 and set(got) == set(keys[::2]) and all(x == v for x in got.values())
    assert c.keys_for_prompts()["sha-1"] == "k1" and c.keys_for_prompts()["p601"] == "key-1202"
    # used from a helper thread (the judge stage does): no "created in another thread" error
    out = {}
    t = threading.Thread(target=lambda: out.update(c.get_many(["k1"])))
    t.start()
    t.join()
    assert out == {"k1": v2}
    c.close()
    with pytest.raises(sqlite3.ProgrammingError):
        len(c)


def test_cache_key_is_the_sha256_of_identity_and_prompt_in_canonical_json():
    import hashlib

    from lib.judge import cache_key

    ident = {"backend": "openai", "model": "gpt-4o-mini-2024-07-18", "settings": {"temperature": 0, "top_logprobs": 20}}
    prompt = "Réponds: {answer} ✓"
    expected = hashlib.sha256(json.dumps({**ident, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
                              .encode("utf-8")).hexdigest()
    assert cache_key(ident, prompt) == expected
    assert cache_key(dict(reversed(list(ident.items()))), prompt) == expected  # key order is no part of it
    assert cache_key(ident, prompt + " ") != expected and cache_key({**ident, "model": "other"}, prompt) != expected


def test_rescore_reapplies_the_mass_rule_and_keeps_the_evidence():
    import math

    from lib.judge import rescore

    top = {"80": math.log(0.2), "90": math.log(0.1), "I": math.log(0.7)}  # 0.3 of the mass on numbers
    v = Verdict(score=None, label="low_mass", raw=json.dumps(top), prob_mass=0.3, input_tokens=5, output_tokens=1,
                cost_usd=0.5, judge_model="m", finish_reason="length", attempts=2)
    r = rescore(v, 0.25)
    assert r.label == "number" and r.score == pytest.approx((80 * 0.2 + 90 * 0.1) / 0.3)
    assert r.prob_mass == pytest.approx(0.3)
    assert (r.raw, r.input_tokens, r.output_tokens, r.cost_usd, r.judge_model, r.finish_reason, r.attempts) == \
        (v.raw, 5, 1, 0.5, "m", "length", 2)
    low = rescore(r, 0.35)
    assert (low.score, low.label) == (None, "low_mass") and low.prob_mass == pytest.approx(0.3)


def test_a_fresh_cache_opens_while_another_process_is_writing_it(tmp_path):
    """Two Slurm jobs opening one fresh judge cache together: the second's switch to WAL met the
    first's write lock and SQLite answered "database is locked" at once, without waiting (a lock
    upgrade it could deadlock on), failing the judge stage. It now waits for the lock."""
    import sqlite3
    import threading

    from lib.judge import JudgeCache

    path = tmp_path / "judgments.sqlite3"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE t (x)")
    other.execute("BEGIN IMMEDIATE")          # a writer holds the file (rollback journal, not WAL yet)
    other.execute("INSERT INTO t VALUES (1)")
    done = threading.Event()

    def release() -> None:
        done.wait(0.3)
        other.execute("COMMIT")

    t = threading.Thread(target=release)
    t.start()
    try:
        cache = JudgeCache(path)
    finally:
        t.join()
    assert cache._db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
    assert len(cache) == 0
    cache.close()
    other.close()


# ------------------------------------------------------------------------------------------
# notebooks/03_judge.ipynb runs under papermill on a hand-made generations.parquet
# ------------------------------------------------------------------------------------------


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_judge_notebook_runs_with_papermill(tmp_path):
    import papermill as pm

    out = tmp_path / "outputs"
    write_generations(out, run_id="nb_run", n=3)
    params = {"run_id": "nb_run", "outputs_dir": str(out), "judge_prompts": str(write_prompts(tmp_path)),
              "judge_min_mass": 0.0, "device": "cpu"}
    rendered = tmp_path / "03_judge.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "03_judge.ipynb"), str(rendered), parameters=params,
                        kernel_name="python3", progress_bar=False, cwd=str(REPO))
    cfg = RunConfig(**params)
    table = pd.read_parquet(judge.judgments_path(cfg))
    assert len(table) == 6 and (table["label"] == "number").all()
    text = rendered.read_text()
    assert "Demo judge" in text and "figure: judge_scores_hf-embedded_tiny-exact" in text
    assert (cfg.run_dir / "figures" / "judge_scores_hf-embedded_tiny-exact.png").exists()
    # the judge health verdict of this table is shown (lib.judge_health, whatever judge_min_mass is)
    verdict, _ = judge_health.overall_verdict(judge_health.health_table(table))
    assert f"Judge health: {verdict}." in text


def test_notebook_parameters_are_the_judge_fields():
    nb = json.loads((REPO / "notebooks" / "03_judge.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    names = {line.split(":")[0] for line in "".join(cell["source"]).splitlines() if line.strip()}
    assert {"run_id", "outputs_dir", "seed", "question_sets", "domain", "judge_backend", "judge_model",
            "judge_method", "judge_min_mass", "judge_budget_usd"} <= names


# ------------------------------------------------------------------------------------------
# The judge stage through the grid: failed calls leave the stage not done, a plain rerun retries
# exactly those, the cost counts the calls that were answered, and a password in the judge's URL
# reaches the client but no file.
#
# Before: error rows were recorded as a finished stage (only --force judge retried them), any
# error row made the run's cost null, and judge_base_url's password was kept in run.json's
# parameters and in the rendered 03_judge notebook.
# ------------------------------------------------------------------------------------------


PASSWORD = "pw-3f9c1e-not-for-files"


@pytest.mark.slow
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
