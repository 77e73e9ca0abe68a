"""The judge behind an OpenAI-compatible chat-completions API: :class:`OpenAIBackend` (async
calls, retries, backoff) and :class:`OpenAIBatchBackend` (the Batch API). Both satisfy
:class:`lib.judge_protocol.JudgeBackend`; :mod:`lib.judge_backends` picks one by name.

**OpenAIBackend** uses the official ``AsyncOpenAI`` client with its own retries switched off
(``max_retries=0``): ``judge_concurrency`` workers share one queue; a failed call is retried
on 429, 408/409, 5xx, timeouts and dropped connections, up to ``judge_max_retries`` times,
sleeping the server's ``Retry-After`` when it sends one and otherwise an exponential backoff
with full jitter (uniform in [0, min(20 s, 0.5 s x 2^attempt)]); a 429 also pauses every
worker until its Retry-After has passed. Other 4xx errors make an ``error`` row at once;
401/403/404 and a model that returns no logprobs stop the run with one clear line.

The ``openai`` package is imported inside the functions that call it: importing the judge stage
(and judging in-process) must not pay for the client.
"""
from __future__ import annotations

import asyncio
import importlib
import json
import math
import random
import sqlite3
import threading
import time
from collections import deque
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Coroutine

from .config import RunConfig
from .costs import Budget, cost_usd, describe_price, price_for
from .io import sha256_text
from .judge_protocol import Sink, progress_bar
from .scoring import (MIN_MASS, SAMPLED_MAX_TOKENS, TOP_LOGPROBS, Job, JudgeError, Verdict, label_from_logprobs,
                      parse_sampled)
from .secrets import safe_base_url, unmask_url

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0
RETRY_AFTER_CAP_S = 300.0


def run_coroutine(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine to completion from synchronous code, also inside Jupyter (whose own
    event loop is already running: then a private loop runs in a helper thread). Ctrl-C /
    kernel interrupt cancels it; finished work has already been handed to the sink."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    async def main() -> Any:
        box["loop"], box["task"] = asyncio.get_running_loop(), asyncio.current_task()
        return await make()

    def target() -> None:
        try:
            box["value"] = asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = e

    t = threading.Thread(target=target, name="judge-loop", daemon=True)
    t.start()
    try:
        while t.is_alive():
            t.join(0.1)
    except KeyboardInterrupt:
        if "task" in box:
            box["loop"].call_soon_threadsafe(box["task"].cancel)
        t.join()
        raise
    if "error" in box:
        raise box["error"]
    return box.get("value")


def retry_after_s(headers: Any) -> float | None:
    """Seconds a server asks us to wait: ``retry-after-ms``, or ``Retry-After`` as seconds or
    an HTTP date, at most ``RETRY_AFTER_CAP_S`` (a huge or infinite value must not stall every
    worker; the call is retried after the cap and gives up as usual). None when absent or
    unreadable."""
    wait = _retry_after_uncapped(headers)
    return None if wait is None else min(wait, RETRY_AFTER_CAP_S)


def _retry_after_uncapped(headers: Any) -> float | None:
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        return max(0.0, float(ra))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base x 2^attempt)]."""
    return rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt))


class OpenAIBackend:
    """Judge calls to an OpenAI-compatible API, ``judge_concurrency`` at a time (see the module docstring)."""

    max_output_tokens: int  # 1 (logprob) or SAMPLED_MAX_TOKENS (sampled)
    status: list[dict[str, Any]] | None = None  # no remote jobs: every call ends inside run()

    def __init__(self, cfg: RunConfig, api_key: str) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.model = cfg.judge_model
        self.method = cfg.judge_method
        self.base_url = unmask_url(cfg.judge_base_url) or None  # masked in a grid's notebook parameters
        self.max_output_tokens = 1 if self.method == "logprob" else SAMPLED_MAX_TOKENS
        self._rng = random.Random(cfg.seed)
        self._pause_until = 0.0

    # -- what identifies a call (cache key) and what it costs -----------------------------
    def settings(self) -> dict[str, Any]:
        if self.method == "logprob":
            return {"max_tokens": 1, "temperature": 0.0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        return {"max_tokens": SAMPLED_MAX_TOKENS, "temperature": float(self.cfg.judge_temperature)}

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": safe_base_url(self.cfg.judge_base_url) or "https://api.openai.com/v1",
                "model": self.model, "method": self.method, "settings": self.settings()}

    def price_note(self) -> str:
        note = describe_price(self.model, batch=self.batch)
        if self.base_url and price_for(self.model) is not None:
            note += f" (assumed although base_url is {safe_base_url(self.cfg.judge_base_url)})"
        return note

    batch = False  # Batch API prices

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        return cost_usd(self.model, input_tokens, output_tokens, batch=self.batch)

    # -- running ---------------------------------------------------------------------------
    def request(self, prompt: str) -> dict[str, Any]:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}], **self.settings()}

    def run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        run_coroutine(lambda: self._run(jobs, sink, budget, progress))

    async def _run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        from openai import AsyncOpenAI  # lazy: importing the judge stage must not load the client

        client = AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0,
                             timeout=self.cfg.judge_timeout_s)
        queue = deque(jobs)
        bar = progress_bar(len(jobs), progress, f"judge {self.model}", self.cfg.run_dir)

        async def worker() -> None:
            while queue and not budget.exhausted:
                job = queue.popleft()
                est = self.estimate_cost(job.est_input_tokens, self.max_output_tokens) or 0.0
                if not budget.try_reserve(est):
                    queue.appendleft(job)
                    return
                v: Verdict | None = None
                try:
                    v = await self._call(client, job)
                finally:
                    budget.settle(est, v.cost_usd if v else None)
                sink(job, v)
                bar.update(1)

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.cfg.judge_concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()
            await client.close()

    async def _call(self, client: Any, job: Job) -> Verdict:
        import openai  # lazy: importing the judge stage must not load the client

        kwargs = self.request(job.prompt)
        where = safe_base_url(self.cfg.judge_base_url) or "api.openai.com"
        for attempt in range(self.cfg.judge_max_retries + 1):
            wait = self._pause_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            delay: float | None = None
            try:
                # the client's documented custom-request call: it skips the typed-params
                # transform and the pydantic reply models, whose CPU cost per call would
                # otherwise make one event loop the bottleneck at high concurrency
                resp = await client.post("/chat/completions", body=kwargs, cast_to=_response_class())
            except openai.APIStatusError as e:
                status = e.status_code
                msg = self.redact(_error_message(e))
                if status in (401, 403, 404):
                    raise JudgeError(f"judge API {where} answered {status} for model '{self.model}': {msg} "
                                     "(check judge_model, judge_base_url and the API key)") from None
                if status == 400 and "logprob" in msg.lower():
                    raise JudgeError(self._no_logprobs(msg)) from None
                error = f"HTTP {status}: {msg}"
                if not (status in (408, 409, 429) or status >= 500):
                    return Verdict.failed(error, attempt + 1)
                delay = retry_after_s(e.response.headers)
                if status == 429 and delay is not None:  # everyone waits, not only this worker
                    self._pause_until = max(self._pause_until, time.monotonic() + delay)
            except openai.APIConnectionError as e:  # includes APITimeoutError
                error = self.redact(f"{type(e).__name__}: {e}")
            else:
                try:
                    return self.parse(json.loads(resp.content), attempt + 1)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    # a 200 whose body is cut off or not a completion (a proxy's error page, a dropped
                    # stream): transient like a 5xx, so retried the same way
                    error = self.redact(f"malformed reply ({type(e).__name__}: {_short(str(e))})")
            if attempt == self.cfg.judge_max_retries:
                return Verdict.failed(f"gave up after {attempt + 1} attempts: {error}", attempt + 1)
            await asyncio.sleep(delay if delay is not None else backoff_s(attempt, self._rng))
        raise AssertionError("unreachable")

    def redact(self, text: str) -> str:
        """Error text with the API key masked (it goes into the table and messages)."""
        return text.replace(self.api_key, f"<{self.cfg.judge_api_key_env}>") if len(self.api_key) >= 6 else text

    def _no_logprobs(self, detail: str = "") -> str:
        d = f" ({detail})" if detail else ""
        return (f"judge model '{self.model}' returned no logprobs{d}: it may not support them; "
                "set judge_method: sampled")

    def parse(self, data: dict[str, Any], attempts: int) -> Verdict:
        """A chat-completion reply (its JSON) -> Verdict, keeping the evidence."""
        choice = data["choices"][0]
        usage = data.get("usage") or {}
        tin, tout = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        common = dict(input_tokens=tin, output_tokens=tout, cost_usd=cost_usd(self.model, tin, tout, batch=self.batch),
                      judge_model=data.get("model") or self.model,
                      finish_reason=choice.get("finish_reason"), attempts=attempts)
        if self.method == "logprob":
            content = (choice.get("logprobs") or {}).get("content")
            if not content or not content[0].get("top_logprobs"):
                raise JudgeError(self._no_logprobs())
            top: dict[str, float] = {}
            for t in content[0]["top_logprobs"]:  # two token ids may decode to the same text: add them
                tok, lp = t["token"], float(t["logprob"])
                top[tok] = lp if tok not in top else math.log(math.exp(top[tok]) + math.exp(lp))
            score, label, mass = label_from_logprobs(top, MIN_MASS)
            return Verdict(score=score, label=label, raw=json.dumps(top, ensure_ascii=False), prob_mass=mass,
                           **common)
        text = (choice.get("message") or {}).get("content") or ""
        score, label = parse_sampled(text)
        return Verdict(score=score, label=label, raw=text, prob_mass=None, **common)


class OpenAIBatchBackend(OpenAIBackend):
    """The OpenAI Batch API: half price, results within 24 h, resumable across sessions.

    A run uploads the calls not yet judged as one JSONL file and creates a batch; the batch id
    and the cache keys it holds are committed to the ``batches`` table of the judge cache.
    Every later run first collects the batches of this judge that have finished (their results
    go to the cache like any other judgment; failed lines become ``error`` rows and are
    submitted again next time), never resubmits calls that sit in a batch still running, and
    submits only what is left. ``judge_run`` does not wait hours: it checks once and returns
    what is done; rerun it (or the notebook) later to collect the rest. Management calls
    (upload, create, poll, download) use the client's own retries (``judge_max_retries``).
    """

    batch = True
    FINAL = ("completed", "failed", "expired", "cancelled")

    def __init__(self, cfg: RunConfig, api_key: str, db_path: Path) -> None:
        super().__init__(cfg, api_key)
        self._db = sqlite3.connect(db_path, timeout=60, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS batches (batch_id TEXT PRIMARY KEY, identity TEXT NOT NULL, "
                         "keys TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, collected INTEGER NOT NULL)")
        self._identity_sha = sha256_text(json.dumps(self.identity(), sort_keys=True))
        self.status: list[dict[str, Any]] = []  # what this run saw, for the notebook and run.json

    def _client(self) -> Any:
        from openai import OpenAI  # lazy: importing the judge stage must not load the client

        return OpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=self.cfg.judge_max_retries,
                      timeout=max(self.cfg.judge_timeout_s, 60.0))

    def open_batches(self) -> list[tuple[str, list[str]]]:
        rows = self._db.execute("SELECT batch_id, keys FROM batches WHERE identity = ? AND collected = 0",
                                (self._identity_sha,)).fetchall()
        return [(b, json.loads(k)) for b, k in rows]

    def run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        client = self._client()
        by_key = {j.key: j for j in jobs}
        collected: set[str] = set()

        def keep(job: Job, v: Verdict) -> None:
            if v.label != "error":
                collected.add(job.key)
            sink(job, v)

        try:
            self._collect(client, by_key, keep)
            # never resubmit a call that is judged now or still sits in a running batch
            in_flight = {k for _, keys in self.open_batches() for k in keys}
            todo = [j for j in jobs if j.key not in in_flight and j.key not in collected]
            chosen = []
            for j in todo:
                if not budget.try_reserve(self.estimate_cost(j.est_input_tokens, self.max_output_tokens) or 0.0):
                    break
                chosen.append(j)
            if chosen:
                self._submit(client, chosen)
                self._collect(client, by_key, keep)  # a fast server may be done already
        finally:
            client.close()

    def _submit(self, client: Any, jobs: list[Job]) -> str:
        lines = [json.dumps({"custom_id": j.key, "method": "POST", "url": "/v1/chat/completions",
                             "body": self.request(j.prompt)}, ensure_ascii=False) for j in jobs]
        f = client.files.create(file=("judge_batch.jsonl", ("\n".join(lines) + "\n").encode("utf-8")), purpose="batch")
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"judge": self.model, "method": self.method})
        self._db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?, 0)",
                         (b.id, self._identity_sha, json.dumps([j.key for j in jobs]), b.status, time.time()))
        self.status.append({"batch_id": b.id, "status": b.status, "requests": len(jobs), "submitted": True})
        return b.id

    def _collect(self, client: Any, by_key: dict[str, Job], sink: Sink) -> None:
        for batch_id, keys in self.open_batches():
            b = client.batches.retrieve(batch_id)
            counts = getattr(b, "request_counts", None)
            self.status.append({"batch_id": batch_id, "status": b.status, "requests": len(keys),
                                "completed": getattr(counts, "completed", None), "failed": getattr(counts, "failed", None)})
            self._db.execute("UPDATE batches SET status = ? WHERE batch_id = ?", (b.status, batch_id))
            if b.status not in self.FINAL:
                continue
            seen: set[str] = set()
            for file_id in (b.output_file_id, b.error_file_id):
                if not file_id:
                    continue
                for line in client.files.content(file_id).text.splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key = item.get("custom_id")
                    job = by_key.get(key) or Job(key=key, prompt="", prompt_sha256="")
                    seen.add(key)
                    resp = item.get("response") or {}
                    if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict):
                        try:
                            v = self.parse(resp["body"], 1)
                        except (KeyError, IndexError, TypeError, ValueError) as e:
                            v = Verdict.failed(f"malformed batch reply ({type(e).__name__}: {e})", 1)
                    else:
                        err = item.get("error") or (resp.get("body") or {}).get("error") or {}
                        v = Verdict.failed(self.redact(f"batch {batch_id}: HTTP {resp.get('status_code')}: "
                                           f"{err.get('message', err) if isinstance(err, dict) else err}"), 1)
                    sink(job, v)
            for key in keys:  # in a finished batch without a result line (expired, cancelled)
                if key not in seen and key in by_key:
                    sink(by_key[key], Verdict.failed(f"batch {batch_id} {b.status} without a result", 1))
            self._db.execute("UPDATE batches SET collected = 1 WHERE batch_id = ?", (batch_id,))


def _response_class() -> type:
    """The raw HTTP response class of the openai client's HTTP library (httpx, or httpx2 in
    openai >= 3): passing it as ``cast_to`` makes ``client.post`` return the raw response."""
    import openai  # lazy: importing the judge stage must not load the client

    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.split(".")[0]).Response


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])[:300]
    return str(getattr(e, "message", e))[:300]
