"""The judge's retry loop, backoff and Retry-After reading, called directly with a scripted
client (no server, no real sleeping): which replies are retried, how long each wait is, what a
give-up records, and what stops the run. The stage-level behaviour (every answer judged
exactly once under faults, resume after a kill) is tests/test_judge_openai.py's; these stay in
a file of their own because that file's autouse fixture shortens the backoff these tests read."""
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
