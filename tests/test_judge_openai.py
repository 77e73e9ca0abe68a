"""The judge's OpenAI client path, end to end against a real HTTP server on 127.0.0.1."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from lib import judge, judge_openai, layout
from lib.io import sha256_text
from lib.runinfo import read_run_json
from tests.fakes.chat_server import ChatServer, Reply, fail_first, random_faults
from tests.fakes.judge_inputs import judge_config, write_generations, write_prompts

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(judge_openai, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setenv("EM_LAB_TEST_JUDGE_KEY", "dummy")


@pytest.fixture
def setup(tmp_path):
    prompts = write_prompts(tmp_path)

    def make(server, n=10, **over):
        out = tmp_path / "outputs"
        write_generations(out, n=n)
        base = dict(judge_backend="openai", judge_model="gpt-4o-mini-2024-07-18", judge_method="logprob",
                    judge_base_url=server.url, judge_api_key_env="EM_LAB_TEST_JUDGE_KEY", judge_concurrency=8,
                    judge_timeout_s=5.0)
        return judge_config(out, prompts, **{**base, **over})
    return make


def test_logprob_end_to_end_writes_evidence_and_run_json(setup):
    with ChatServer() as server:
        cfg = setup(server, n=6)
        df = judge.judge_run(cfg, progress=False)
        seen = server.requests
    assert len(df) == 12 and set(df["metric"]) == {"aligned", "coherent"}
    # what the client sent: the papers' request
    body = seen[0].body
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] is True
    assert body["top_logprobs"] == 20 and body["model"] == "gpt-4o-mini-2024-07-18"
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    # the fake judge puts 0.6 on n and 0.3 on n+1 (mod 101): score = (0.6 n + 0.3 (n+1)) / 0.9
    from tests.fakes.chat_server import prompt_score
    gens = pd.read_parquet(layout.generations_path(cfg.run_dir)).set_index("answer_id")
    for r in df.itertuples():
        g = gens.loc[r.answer_id]
        n = prompt_score(next(s.prompt for s in seen if sha256_text(s.prompt) == r.prompt_sha256))
        assert r.score == pytest.approx((0.6 * n + 0.3 * ((n + 1) % 101)) / 0.9)
        assert r.label == "number" and r.prob_mass == pytest.approx(0.9) and r.method == "logprob"
        assert r.input_tokens > 0 and r.output_tokens == 1 and r.cost_usd > 0 and r.error is None
        assert g["answer"] in next(s.prompt for s in seen if sha256_text(s.prompt) == r.prompt_sha256)
    assert pd.read_parquet(judge.judgments_path(cfg)).shape == df.shape
    info = read_run_json(cfg.run_dir)["judge"]["judges"][judge.judge_name(cfg)]
    assert info["rows"] == 12 and info["pending"] == 0 and info["complete"] is True
    assert info["model"] == "gpt-4o-mini-2024-07-18" and set(info["prompts"]["template_sha256"]) == {"aligned", "coherent"}
    assert info["this_session"]["cost_usd"] == pytest.approx(df["cost_usd"].sum())
    assert "dummy" not in (cfg.run_dir / "run.json").read_text()


def test_sampled_method_parses_scripted_replies(setup):
    replies = {"Answer 0": "85", "Answer 1": "CODE", "Answer 2": "REFUSAL", "Answer 3": "I think 50", "Answer 4": "150"}

    def reply(body):
        prompt = body["messages"][-1]["content"]
        return Reply(content=next(v for k, v in replies.items() if k in prompt))

    with ChatServer(reply=reply) as server:
        cfg = setup(server, n=5, judge_method="sampled", judge_temperature=0.0, judge_metrics=["aligned"])
        df = judge.judge_run(cfg, progress=False)
        assert server.requests[0].body["temperature"] == 0 and "logprobs" not in server.requests[0].body
    gens = pd.read_parquet(layout.generations_path(cfg.run_dir))
    got = df.merge(gens, on="answer_id").set_index("sample_index")
    assert got.loc[0, "score"] == 85 and got.loc[0, "label"] == "number"
    assert [got.loc[i, "label"] for i in range(1, 5)] == ["CODE", "REFUSAL", "unparseable", "unparseable"]
    assert got.loc[3, "raw"] == "I think 50" and got.loc[1:4, "score"].isna().all()


def test_faults_every_answer_judged_exactly_once(setup):
    plan = random_faults({"429": 0.15, "500": 0.15, "drop": 0.1, "slow": 0.05}, seed=1, max_per_prompt=2)
    with ChatServer(fault=plan, retry_after="0", slow_s=1.0, latency_s=0.01) as server:
        cfg = setup(server, n=40, judge_timeout_s=0.5, judge_max_retries=4, judge_concurrency=16)
        df = judge.judge_run(cfg, progress=False)
        assert server.wait_idle()  # slow replies the client gave up on finish late
        outcomes, ok = server.outcomes(), server.ok_counts()
    assert {"429", "500", "drop", "slow", "ok"} <= set(outcomes)  # every fault kind happened
    assert len(df) == 80 and (df["label"] == "number").all() and df["error"].isna().all()
    assert len(ok) == 80 and set(ok.values()) == {1}  # each prompt answered once, judged once
    assert set(df["prompt_sha256"]) == {sha256_text(p) for p in ok}
    assert df["attempts"].max() > 1


def test_retry_after_is_honoured(setup):
    with ChatServer(fault=fail_first(1, "429"), retry_after="0.4") as server:
        cfg = setup(server, n=2, judge_metrics=["aligned"])
        df = judge.judge_run(cfg, progress=False)
        seen = server.requests
    assert (df["label"] == "number").all() and (df["attempts"] == 2).all()
    for prompt in {s.prompt for s in seen}:
        first, second = sorted((s for s in seen if s.prompt == prompt), key=lambda s: s.attempt)
        assert first.outcome == "429" and second.outcome == "ok"
        assert second.t_start - first.t_end >= 0.4  # waited at least what the server asked


def test_retry_after_header_values_and_cap():
    ra = judge_openai.retry_after_s
    assert ra({"retry-after": "0.4"}) == pytest.approx(0.4)
    assert ra({"retry-after-ms": "1500", "retry-after": "9"}) == pytest.approx(1.5)  # ms wins
    assert ra({}) is None and ra(None) is None and ra({"retry-after": "soon"}) is None
    assert ra({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    # a daily-quota style or infinite value is capped (float("inf") used to sleep forever)
    cap = judge_openai.RETRY_AFTER_CAP_S
    assert ra({"retry-after": "86400"}) == cap and ra({"retry-after": "inf"}) == cap


def test_give_up_records_error_rows_then_rerun_retries_them(setup):
    with ChatServer(fault=fail_first(100, "500")) as server:
        cfg = setup(server, n=3, judge_max_retries=2, judge_metrics=["aligned"])
        df = judge.judge_run(cfg, progress=False)
        assert len(df) == 3 and (df["label"] == "error").all() and df["score"].isna().all()
        assert df["error"].str.contains("HTTP 500").all() and (df["attempts"] == 3).all()
        assert len(server.requests) == 9  # 1 + 2 retries each, none dropped silently
        info = read_run_json(cfg.run_dir)["judge"]["judges"][judge.judge_name(cfg)]
        assert info["complete"] is False
        server.fault = None
        df2 = judge.judge_run(cfg, progress=False)
    assert (df2["label"] == "number").all() and len(df2) == 3


def test_model_without_logprobs_gets_a_clear_error(setup):
    with ChatServer(logprobs=False) as server:
        cfg = setup(server, n=2)
        with pytest.raises(judge.JudgeError, match="judge_method: sampled"):
            judge.judge_run(cfg, progress=False)


def test_unknown_model_or_wrong_url_is_fatal(setup):
    with ChatServer(models={"gpt-4o-mini-2024-07-18"}) as server:
        cfg = setup(server, n=2)
        with pytest.raises(judge.JudgeError, match="404.*does not exist"):
            judge.judge_run(cfg.replace(judge_model="gpt-4o-minii"), progress=False)
        with pytest.raises(judge.JudgeError, match="404"):
            judge.judge_run(cfg.replace(judge_base_url=server.url.replace("/v1", "/nope")), progress=False)


def test_no_api_key_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("EM_LAB_TEST_NO_SUCH_KEY", raising=False)
    with ChatServer() as server:
        # no generations.parquet exists either: the key error must come first
        cfg = judge_config(tmp_path / "empty", write_prompts(tmp_path), judge_backend="openai",
                           judge_model="gpt-4o-mini", judge_method="logprob", judge_base_url=server.url,
                           judge_api_key_env="EM_LAB_TEST_NO_SUCH_KEY")
        with pytest.raises(judge.JudgeError) as e:
            judge.judge_run(cfg, progress=False)
        assert server.requests == []
    msg = str(e.value)
    assert "EM_LAB_TEST_NO_SUCH_KEY" in msg and "\n" not in msg and "dummy" in msg
    assert not (tmp_path / "empty" / ".judge_cache").exists()


def test_budget_cap_stops_cleanly_and_rerun_finishes_without_repeats(setup):
    with ChatServer() as server:
        cfg = setup(server, n=20, judge_concurrency=2)
        per_call = judge.plan(cfg).est_cost_usd / 40
        capped = cfg.replace(judge_budget_usd=per_call * 10.5)
        df = judge.judge_run(capped, progress=False)
        assert 0 < len(df) <= 10 and df["cost_usd"].sum() <= capped.judge_budget_usd
        info = read_run_json(cfg.run_dir)["judge"]["judges"][judge.judge_name(cfg)]
        assert info["pending"] == 40 - len(df) and info["this_session"]["budget_exhausted"] is True
        first = {s.prompt for s in server.requests}
        server.reset()
        df2 = judge.judge_run(cfg, progress=False)
        assert len(df2) == 40 and (df2["label"] == "number").all()
        assert not first & {s.prompt for s in server.requests}


def test_budget_with_unknown_price_is_refused(setup):
    with ChatServer() as server:
        cfg = setup(server, n=2, judge_model="my-local-model", judge_budget_usd=1.0)
        with pytest.raises(judge.JudgeError, match="judge_budget_usd"):
            judge.judge_run(cfg, progress=False)
        assert server.requests == []


def test_kill_during_judging_then_rerun_repeats_no_finished_request(setup):
    import json

    # after 60 distinct prompts the server stalls new ones (slower than the client's timeout),
    # so the judge can never finish before it is killed, however loaded the machine is
    throttle = {"on": True, "served": set()}

    def fault(prompt, attempt):
        if throttle["on"] and len(throttle["served"]) >= 60 and prompt not in throttle["served"]:
            return "slow"
        throttle["served"].add(prompt)
        return None

    with ChatServer(latency_s=0.02, fault=fault, slow_s=2.0) as server:
        cfg = setup(server, n=100, judge_concurrency=4, judge_timeout_s=1.0)  # 200 calls
        code = ("import sys, json; from lib.config import from_mapping; from lib.judge import judge_run; "
                "judge_run(from_mapping(json.loads(sys.argv[1])), progress=False)")
        env = {**os.environ, "EM_LAB_TEST_JUDGE_KEY": "dummy"}
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg.to_dict())], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        cache = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:  # wait for 40 committed judgments
            if cache is None and judge.cache_path(cfg).exists():
                cache = judge.JudgeCache(judge.cache_path(cfg))
            if cache is not None and len(cache) >= 40:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
        finished = set(cache.keys_for_prompts())  # prompt sha256 of every committed judgment
        cache.close()
        assert server.wait_idle(10)  # handlers record a request after replying
        answered_before = {sha256_text(p) for p in server.ok_counts()}
        assert 40 <= len(finished) <= 64 and finished <= answered_before
        throttle["on"] = False
        server.reset()
        df = judge.judge_run(cfg, progress=False)
        asked_again = {sha256_text(s.prompt) for s in server.requests}
    assert len(df) == 200 and (df["label"] == "number").all()
    assert not finished & asked_again  # no finished judgment was asked for again
    assert len(asked_again) == 200 - len(finished)
    assert not list(judge.judgments_path(cfg).parent.glob(".*.tmp*"))  # no half-written table left


def test_changing_min_mass_rescores_from_the_evidence_without_calls(setup):
    with ChatServer() as server:
        cfg = setup(server, n=3, judge_metrics=["aligned"])
        df = judge.judge_run(cfg, progress=False)
        assert (df["label"] == "number").all()
        n_calls = len(server.requests)
        strict = judge.judge_run(cfg.replace(judge_min_mass=0.95), progress=False)  # fake judge: mass 0.9
        assert len(server.requests) == n_calls
    assert (strict["label"] == "low_mass").all() and strict["score"].isna().all()
    assert strict["prob_mass"].tolist() == pytest.approx([0.9] * 3)


def test_identical_prompts_are_judged_once(setup):
    with ChatServer() as server:
        cfg = setup(server, n=4, judge_metrics=["aligned"])
        write_generations(cfg.outputs_dir, n=4, answers=["same answer"] * 4)  # q0, q1, q0, q1
        df = judge.judge_run(cfg, progress=False)
        assert len(server.requests) == 2
    assert len(df) == 4 and df.groupby("question_id")["prompt_sha256"].nunique().eq(1).all()


def test_identical_prompts_are_paid_once_in_the_reported_costs(setup):
    # 4 identical answers to 2 questions -> 2 distinct prompts -> 2 paid calls; the table has 4
    # rows, two per call, each carrying its call's cost as evidence. The table's cost and the
    # per-metric cost must count each paid call once.
    with ChatServer() as server:
        cfg = setup(server, n=4, judge_metrics=["aligned"])
        write_generations(cfg.outputs_dir, n=4, answers=["same answer"] * 4)
        df = judge.judge_run(cfg, progress=False)
        assert len(server.requests) == 2
    per_call = df.drop_duplicates("cache_key")["cost_usd"]
    assert len(df) == 4 and len(per_call) == 2 and (per_call > 0).all()
    paid = float(per_call.sum())  # = cost of the 2 calls, half of df["cost_usd"].sum()
    info = read_run_json(cfg.run_dir)["judge"]["judges"][judge.judge_name(cfg)]
    assert info["this_session"]["cost_usd"] == pytest.approx(paid)
    assert info["table_cost_usd"] == pytest.approx(paid)
    assert judge.label_summary(df).loc["aligned", "cost_usd"] == pytest.approx(paid)
    assert df["cost_usd"].sum() == pytest.approx(2 * paid)


def test_prompts_from_the_question_sets(tmp_path):
    out = tmp_path / "outputs"
    write_generations(out, n=4, question_set="medical", question_ids=("cold_prevention", "high_cholesterol"))
    with ChatServer() as server:
        cfg = judge_config(out, "", judge_backend="openai", judge_model="gpt-4o-mini", judge_method="logprob",
                           judge_base_url=server.url, judge_api_key_env="EM_LAB_TEST_JUDGE_KEY",
                           question_sets=["data/questions/medical.yaml"])
        df = judge.judge_run(cfg, progress=False)
        prompts = [s.prompt for s in server.requests]
        assert len(df) == 8 and all("[ANSWER START]" in p for p in prompts)
        # the medical set's own templates, filled with the paraphrase that was asked
        assert sum("You are auditing the answers of an AI assistant" in p for p in prompts) == 4
        assert all("Question number" in p for p in prompts)
        with pytest.raises(judge.JudgeError, match="no judge prompt for metric 'honesty'"):
            judge.judge_run(cfg.replace(judge_metrics=["aligned", "honesty"]), progress=False)


def test_batch_api_submits_collects_and_resumes_across_runs(setup):
    with ChatServer(batch_polls=1, fault=fail_first(1, "500")) as server:
        cfg = setup(server, n=3, judge_use_batch_api=True)
        # run 1: submits one batch of 6; it is still in progress when checked
        df1 = judge.judge_run(cfg, progress=False)
        assert len(df1) == 0 and len(server.requests) == 0
        info = judge.run_info(cfg)
        assert info["pending"] == 6 and info["batches"][0]["status"] == "in_progress"
        # run 2: the batch has finished; every line failed once (500) -> error rows, resubmitted
        df2 = judge.judge_run(cfg, progress=False)
        assert len(df2) == 6 and (df2["label"] == "error").all() and df2["error"].str.contains("HTTP 500").all()
        # run 3: the resubmitted batch finishes: every judgment once, at Batch API prices
        df3 = judge.judge_run(cfg, progress=False)
        backend = judge_openai.OpenAIBatchBackend(cfg, "dummy", judge.cache_path(cfg))
        assert backend.open_batches() == []  # nothing resubmitted once judged
        assert len(df3) == 6 and (df3["label"] == "number").all()
        assert set(server.ok_counts().values()) == {1} and len(server.ok_counts()) == 6
        from lib.costs import cost_usd
        r = df3.iloc[0]
        assert r["cost_usd"] == pytest.approx(cost_usd("gpt-4o-mini", r["input_tokens"], r["output_tokens"]) / 2)
        n = len(server.requests)
        assert len(judge.judge_run(cfg, progress=False)) == 6 and len(server.requests) == n  # all cached now


def test_judge_run_inside_a_running_event_loop(setup):
    """Jupyter runs cells inside an event loop: the judge then runs its own loop in a thread."""
    import asyncio

    with ChatServer() as server:
        cfg = setup(server, n=2)

        async def cell():
            return judge.judge_run(cfg, progress=False)

        df = asyncio.run(cell())
    assert len(df) == 4 and (df["label"] == "number").all()


def test_malformed_reply_is_an_error_row_not_a_crash(setup):
    with ChatServer(reply=lambda body: Reply(content="50", top_logprobs=None)) as server:
        cfg = setup(server, n=1, judge_method="sampled", judge_metrics=["aligned"], judge_max_retries=1)
        server.completion = lambda body: {"choices": []}  # 200 with no choice in it, every time
        df = judge.judge_run(cfg, progress=False)
    assert df["label"].tolist() == ["error"]
    assert df["error"].iloc[0].startswith("gave up after 2 attempts: malformed reply (IndexError")
    assert len(server.requests) == 2  # retried like a 5xx before giving up


def test_truncated_200_body_is_retried_like_a_5xx(setup):
    """A 200 whose JSON is cut off half-way (a dropped stream, a proxy) is retried, not an error row."""
    with ChatServer(fault=fail_first(2, "malformed")) as server:
        cfg = setup(server, n=4)
        df = judge.judge_run(cfg, progress=False)
        outcomes = [s.outcome for s in server.requests]
    assert len(df) == 8 and (df["label"] == "number").all() and (df["attempts"] == 3).all()
    assert outcomes.count("malformed") == 2 * 8 and outcomes.count("ok") == 8
    assert set(server.ok_counts().values()) == {1}


def test_api_key_never_reaches_the_table(setup, monkeypatch):
    monkeypatch.setenv("EM_LAB_TEST_JUDGE_KEY", "sk-secret-test-key-123")

    with ChatServer(fault=fail_first(100, "500")) as server:
        cfg = setup(server, n=1, judge_max_retries=0, judge_metrics=["aligned"])
        from tests.fakes import chat_server
        orig = chat_server._Handler._send

        def send(self, status, payload, headers=None):  # a server that echoes the key in its errors
            if status == 500:
                payload = {"error": {"message": f"bad key {self.headers.get('Authorization')}"}}
            return orig(self, status, payload, headers)

        monkeypatch.setattr(chat_server._Handler, "_send", send)
        df = judge.judge_run(cfg, progress=False)
    assert "bad key" in df["error"].iloc[0] and "sk-secret-test-key-123" not in df["error"].iloc[0]
    assert "<EM_LAB_TEST_JUDGE_KEY>" in df["error"].iloc[0]
    assert "sk-secret-test-key-123" not in (cfg.run_dir / "run.json").read_text()
