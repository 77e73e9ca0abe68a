"""The judge's retry loop, backoff and Retry-After reading, called directly with a scripted
client (no server, no real sleeping): which replies are retried, how long each wait is, what a
give-up records, and what stops the run. The stage-level behaviour (every answer judged
exactly once under faults, resume after a kill) is tests/test_judge_openai.py's."""
from __future__ import annotations

import asyncio
import importlib
import json
import random
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import openai
import pytest

from lib import judge_openai as jb
from lib.config import RunConfig
from lib.scoring import Job, Verdict

KEY = "sk-test-0123456789"
URL = "http://judge.example:8080/v1"
_http = importlib.import_module(jb._response_class().__module__.split(".")[0])  # httpx or httpx2
_REQ = _http.Request("POST", URL + "/chat/completions")


def status(code: int, message: str = "boom", headers: dict | None = None) -> openai.APIStatusError:
    return openai.APIStatusError(message, response=_http.Response(code, headers=headers or {}, request=_REQ),
                                 body={"error": {"message": message}})


def reply(tokens: dict[str, float], model: str = "gpt-4o-mini-2024-07-18") -> dict:
    return {"model": model, "usage": {"prompt_tokens": 120, "completion_tokens": 1},
            "choices": [{"finish_reason": "length", "logprobs": {"content": [{"top_logprobs": [
                {"token": t, "logprob": lp} for t, lp in tokens.items()]}]}}]}


class Client:
    """client.post as the backend calls it; each call takes the next scripted outcome."""

    def __init__(self, *outcomes):
        self.outcomes, self.calls = list(outcomes), []

    async def post(self, path, body, cast_to):
        self.calls.append((path, body, cast_to))
        o = self.outcomes.pop(0)
        if isinstance(o, BaseException):
            raise o
        return type("Raw", (), {"content": (o if isinstance(o, bytes) else json.dumps(o).encode())})()


@pytest.fixture
def sleeps(monkeypatch):
    waited: list[float] = []

    async def sleep(s):
        waited.append(s)
    monkeypatch.setattr(jb.asyncio, "sleep", sleep)
    return waited


def backend(retries: int = 2, **over) -> jb.OpenAIBackend:
    cfg = RunConfig(judge_backend="openai", judge_model="gpt-4o-mini-2024-07-18", judge_method="logprob",
                    judge_base_url=URL, judge_max_retries=retries, seed=3, **over)
    return jb.OpenAIBackend(cfg, KEY)


def call(b: jb.OpenAIBackend, client: Client) -> Verdict:
    return asyncio.run(b._call(client, Job(key="k", prompt="Rate this answer.", prompt_sha256="s")))


def expected_backoff(seed: int, attempts: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0, min(jb.BACKOFF_CAP_S, jb.BACKOFF_BASE_S * 2 ** a)) for a in range(attempts)]


def test_a_good_reply_is_one_call_with_the_backends_request(sleeps):
    b = backend()
    client = Client(reply({"85": 0.0}))
    v = call(b, client)
    assert (v.score, v.label, v.attempts, v.input_tokens, v.error) == (85.0, "number", 1, 120, None)
    assert client.calls == [("/chat/completions", b.request("Rate this answer."), jb._response_class())]
    assert sleeps == []


@pytest.mark.parametrize("code", [408, 409, 429, 500, 502, 503])
def test_transient_statuses_are_retried_with_jittered_backoff(code, sleeps):
    b = backend(retries=2)
    v = call(b, Client(status(code), status(code), reply({"40": 0.0})))
    assert (v.score, v.label, v.attempts) == (40.0, "number", 3)
    assert sleeps == expected_backoff(3, 2)  # full jitter from the run's seed: [0, 0.5], then [0, 1]


def test_give_up_after_the_last_retry_records_the_error_without_a_last_sleep(sleeps):
    v = call(backend(retries=2), Client(status(500), status(500), status(500, "still down")))
    assert v == Verdict.failed("gave up after 3 attempts: HTTP 500: still down", 3)
    assert len(sleeps) == 2
    sleeps.clear()
    v = call(backend(retries=0), Client(status(503)))
    assert v == Verdict.failed("gave up after 1 attempts: HTTP 503: boom", 1) and sleeps == []


@pytest.mark.parametrize("code", [400, 413, 418, 422])
def test_other_client_errors_fail_the_answer_at_once(code, sleeps):
    v = call(backend(), Client(status(code, "bad request")))
    assert v == Verdict.failed(f"HTTP {code}: bad request", 1) and sleeps == []


@pytest.mark.parametrize("code", [401, 403, 404])
def test_auth_and_unknown_model_stop_the_run_naming_the_server(code, sleeps):
    with pytest.raises(jb.JudgeError) as e:
        call(backend(), Client(status(code, "no such model")))
    assert str(e.value) == (f"judge API http://judge.example:8080/v1 answered {code} for model 'gpt-4o-mini-2024-07-18': "
                            "no such model (check judge_model, judge_base_url and the API key)")


def test_a_400_about_logprobs_says_to_use_the_sampled_method():
    with pytest.raises(jb.JudgeError, match=r"^judge model 'gpt-4o-mini-2024-07-18' returned no logprobs "
                                            r"\(LogProbs are not supported\): .*set judge_method: sampled$"):
        call(backend(), Client(status(400, "LogProbs are not supported")))


def test_retry_after_sets_the_wait_and_a_429_pauses_every_worker(sleeps):
    b = backend()
    v = call(b, Client(status(503, headers={"retry-after": "2"}), reply({"10": 0.0})))
    assert v.attempts == 2 and sleeps == [2.0] and b._pause_until == 0.0  # a 503 pauses only this call
    sleeps.clear()
    before = time.monotonic()
    v = call(b, Client(status(429, headers={"retry-after-ms": "1500"}), reply({"10": 0.0})))
    # the pause is shared: the next attempt (of any worker) first waits out what is left of it
    assert before + 1.5 <= b._pause_until <= time.monotonic() + 1.5
    assert v.attempts == 2 and sleeps[0] == 1.5 and len(sleeps) == 2 and 1.0 < sleeps[1] <= 1.5
    sleeps.clear()
    b._pause_until = 0.0  # a 429 without Retry-After: backoff, no shared pause
    call(b, Client(status(429), reply({"10": 0.0})))
    assert b._pause_until == 0.0 and sleeps == [random.Random(3).uniform(0, 0.5)]


def test_connection_errors_and_malformed_replies_are_retried_then_recorded(sleeps):
    conn = openai.APIConnectionError(request=_REQ)
    assert call(backend(retries=1), Client(conn, reply({"7": 0.0}))).attempts == 2
    v = call(backend(retries=1), Client(conn, conn))
    assert v == Verdict.failed("gave up after 2 attempts: APIConnectionError: Connection error.", 2)
    v = call(backend(retries=1), Client({"choices": []}, b"<html>proxy error</html>"))
    assert v.label == "error" and v.attempts == 2
    assert v.error.startswith("gave up after 2 attempts: malformed reply (JSONDecodeError: Expecting value")
    v = call(backend(retries=0), Client({"choices": []}))
    assert v.error == "gave up after 1 attempts: malformed reply (IndexError: list index out of range)"


def test_the_api_key_never_reaches_an_error_text(sleeps):
    v = call(backend(), Client(status(400, f"invalid key {KEY} given")))
    assert v.error == "HTTP 400: invalid key <OPENAI_API_KEY> given" and KEY not in v.error
    with pytest.raises(jb.JudgeError) as e:
        call(backend(), Client(status(401, f"key {KEY}")))
    assert KEY not in str(e.value) and "<OPENAI_API_KEY>" in str(e.value)


def test_backoff_is_full_jitter_under_a_doubling_cap():
    class Rec:
        def __init__(self):
            self.args = []

        def uniform(self, a, b):
            self.args.append((a, b))
            return b
    r = Rec()
    waits = [jb.backoff_s(a, r) for a in range(8)]
    assert r.args == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 4.0), (0, 8.0), (0, 16.0), (0, 20.0), (0, 20.0)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]


def test_retry_after_readings():
    ra = jb.retry_after_s
    assert ra({"retry-after-ms": "250"}) == 0.25
    assert ra({"retry-after-ms": "-40", "retry-after": "9"}) == 0.0  # negative waits are none
    assert ra({"retry-after": "-3"}) == 0.0 and ra({"retry-after": "0"}) == 0.0
    assert ra({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0  # unreadable ms: the seconds header
    assert ra({"retry-after-ms": "", "retry-after": "4"}) == 4.0
    assert ra({"retry-after": ""}) is None and ra({"retry-after-ms": "x"}) is None
    assert ra({"retry-after": str(jb.RETRY_AFTER_CAP_S - 1)}) == jb.RETRY_AFTER_CAP_S - 1  # below the cap: as asked
    future = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=90), usegmt=True)
    assert 80 <= ra({"retry-after": future}) <= 90  # an HTTP date: seconds from now
    assert ra({"retry-after": "Wed, 99 Foo 2015 07:28:00 GMT"}) is None
    # the openai client's headers object is case-insensitive; a plain dict must be lower-case already
    assert jb._retry_after_uncapped({"retry-after": "86400"}) == 86400.0


# ------------------------------------------------------------------------------------------
# the judge cache (lib.judge): what is paid for once stays paid for
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
