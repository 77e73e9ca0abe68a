"""The judge's two backends: an OpenAI-compatible API (async) and in-process transformers.

Both take a list of :class:`lib.scoring.Job` and hand each finished :class:`lib.scoring.Verdict` to
a ``sink`` as soon as it exists (the stage commits it to the cache right away).

**OpenAIBackend** uses the official ``AsyncOpenAI`` client with its own retries switched off
(``max_retries=0``): ``judge_concurrency`` workers share one queue; a failed call is retried
on 429, 408/409, 5xx, timeouts and dropped connections, up to ``judge_max_retries`` times,
sleeping the server's ``Retry-After`` when it sends one and otherwise an exponential backoff
with full jitter (uniform in [0, min(20 s, 0.5 s x 2^attempt)]); a 429 also pauses every
worker until its Retry-After has passed. Other 4xx errors make an ``error`` row at once;
401/403/404 and a model that returns no logprobs stop the run with one clear line.

**HFBackend** loads the judge with :func:`lib.models.load_model`. Methods:

* ``exact``: for each prompt, the chat-templated prompt is run once (KV cache kept); then the
  103 candidate replies ("0".."100", "CODE", "REFUSAL", each as the tokenizer encodes it right
  after the prompt) are scored in one batch on top of that cache. A candidate's log
  probability is the sum of its tokens' log probabilities plus the log probability of ending
  the turn after it (the sum over the model's end-of-turn / eos tokens). So "100" split into
  "1","0","0" gets P(1) P(0|1) P(0|10) P(end|100), and "10" does not steal the mass of "100".
  Only the tokenizer's own (canonical) tokenisation of each candidate is scored. The
  candidate log probabilities are then aggregated exactly like first-token logprobs by
  :func:`lib.scoring.label_from_logprobs` (mean over numeric candidates weighted by probability,
  divided by their total probability; None below 0.25).
* ``logprob``: the first token's top-20 log probabilities (the papers' rule, applied to a
  local model; with a digit-splitting tokenizer it cannot see numbers above 9).
* ``sampled``: a generated reply (``judge_temperature``, seeded), parsed as in the API path.
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import importlib
import inspect
import json
import logging
import math
import random
import sqlite3
import threading
import time
from collections import deque
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Coroutine

from .chat import chat_prompt, stop_token_ids
from .config import RunConfig
from .costs import Budget, cost_usd, describe_price, price_for
from .io import sha256_text
from .models import (dtype_bytes, free_memory_bytes, is_out_of_memory, kv_bytes_per_token, load_model,
                     load_tokenizer, resolve_model)
from .progress import Progress
from .scoring import (CANDIDATES, MIN_MASS, SAMPLED_MAX_TOKENS, TOP_LOGPROBS, Job, JudgeError, Verdict,
                      label_from_logprobs, parse_sampled)
from .secrets import safe_base_url, unmask_url

log = logging.getLogger(__name__)
Sink = Callable[[Job, Verdict], None]
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0
RETRY_AFTER_CAP_S = 300.0


def _progress(total: int, enabled: bool, desc: str, run_dir: Path | None) -> Progress:
    return Progress("judge", "judgments", total, run_dir=run_dir, enabled=enabled, desc=desc, unit="call")


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


# ------------------------------------------------------------------------------------------
# OpenAI-compatible API
# ------------------------------------------------------------------------------------------

class OpenAIBackend:
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
        from openai import AsyncOpenAI

        client = AsyncOpenAI(api_key=self.api_key, base_url=self.base_url, max_retries=0,
                             timeout=self.cfg.judge_timeout_s)
        queue = deque(jobs)
        bar = _progress(len(jobs), progress, f"judge {self.model}", self.cfg.run_dir)

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
        import openai

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
        from openai import OpenAI

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
    import openai

    base = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return importlib.import_module(base.__module__.split(".")[0]).Response


def _error_message(e: Any) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        if inner.get("message"):
            return str(inner["message"])[:300]
    return str(getattr(e, "message", e))[:300]


# ------------------------------------------------------------------------------------------
# In-process transformers
# ------------------------------------------------------------------------------------------

FINGERPRINT_SAMPLES = 256      # evenly spaced chunks read from each weight file
FINGERPRINT_CHUNK = 4096       # bytes per chunk (256 x 4 KiB = 1 MiB per file, whatever its size)
FINGERPRINT_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja")


def _weights_sample_sha(path: Path) -> str:
    """sha256 of evenly spaced chunks of a weight file: cheap for a 16 GB model, and it changes
    when the weights do (retrained or fine-tuned weights of the same shapes have the same size)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        for i in range(FINGERPRINT_SAMPLES):
            f.seek(size * i // FINGERPRINT_SAMPLES)
            h.update(f.read(FINGERPRINT_CHUNK))
        f.seek(max(0, size - FINGERPRINT_CHUNK))
        h.update(f.read(FINGERPRINT_CHUNK))
    return h.hexdigest()


def local_fingerprint(name: str) -> str:
    """What identifies an in-process judge for the cache: for a local (or embedded) folder,
    sha256 of its config, generation config and chat template files plus the size and a
    content sample of each weight file; for a hub id, the id."""
    resolved = Path(resolve_model(name))
    if not resolved.exists():
        return name
    parts = [(resolved / "config.json").read_text(encoding="utf-8") if (resolved / "config.json").exists() else ""]
    for fname in FINGERPRINT_TEXT_FILES[1:]:
        if (resolved / fname).exists():
            parts.append(f"{fname}:{sha256_text((resolved / fname).read_text(encoding='utf-8'))}")
    for p in sorted(resolved.glob("*.safetensors")) + sorted(resolved.glob("*.bin")):
        parts.append(f"{p.name}:{p.stat().st_size}:{_weights_sample_sha(p)}")
    return sha256_text("\n".join(parts))


class HFBackend:
    BATCH = 8  # prompts per forward pass for logprob / sampled
    # exact: each (prompt, candidate) row of the candidate pass holds a copy of its prompt's KV cache
    # and the candidate's log-probabilities over the whole vocabulary; rows per pass are chosen so
    # that their bytes (exact_row_bytes: from the model's layers, KV heads, head size, vocabulary
    # and dtype) stay under a budget. CPU: at most EXACT_CPU_BYTES (larger passes are no faster on
    # a CPU, only larger); CUDA: a share of free GPU memory. Halved on out-of-memory.
    EXACT_CPU_BYTES = 1 << 30
    EXACT_MEMORY_FRACTION = 0.5

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.model_name = cfg.judge_model
        self.method = cfg.judge_method
        self.max_output_tokens = {"exact": 0, "logprob": 1}.get(self.method, SAMPLED_MAX_TOKENS)
        self.model = self.tok = None
        self._identity: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        s: dict[str, Any] = {"dtype": self.cfg.dtype}
        if self.method == "exact":
            s.update(candidates="0..100,CODE,REFUSAL", then="end_of_turn")
        elif self.method == "logprob":
            s.update(top_logprobs=TOP_LOGPROBS)
        else:
            s.update(max_tokens=SAMPLED_MAX_TOKENS, temperature=float(self.cfg.judge_temperature), seed=self.cfg.seed)
        return s

    def identity(self) -> dict[str, Any]:
        if self._identity is None:
            self._identity = {"backend": "hf", "model": self.model_name,
                              "fingerprint": local_fingerprint(self.model_name),
                              "method": self.method, "settings": self.settings()}
        return self._identity

    def price_note(self) -> str:
        return "in-process judge: no API cost"

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        return 0.0

    def load(self) -> None:
        if self.model is None:
            self.tok = load_tokenizer(self.model_name, padding_side="left")
            self.model, _ = load_model(self.model_name, device=self.cfg.device, dtype=self.cfg.dtype)

    def run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        self.load()
        bar = _progress(len(jobs), progress, f"judge {self.model_name} ({self.method})", self.cfg.run_dir)
        try:
            if self.method == "exact":
                cands = candidate_token_ids(self.tok)
                stops = stop_token_ids(self.tok, self.model)
                if not stops:
                    raise JudgeError("judge model has no end-of-turn (eos) token: the exact method cannot score "
                                     "candidates")
                self._run_exact(jobs, cands, stops, sink, bar)
            else:
                for i in range(0, len(jobs), self.BATCH):
                    batch = jobs[i:i + self.BATCH]
                    for job, v in zip(batch, self._verdicts_batch(batch)):
                        sink(job, v)
                        bar.update(1)
        finally:
            bar.close()

    def exact_budget_bytes(self) -> int:
        """Bytes the exact method's passes may use beyond the loaded model (see the class comment)."""
        device = self.model.device.type
        free = free_memory_bytes(device)
        if device == "cuda" and free is not None:
            return int(self.EXACT_MEMORY_FRACTION * free)
        cap = self.EXACT_CPU_BYTES
        return cap if free is None else int(min(cap, self.EXACT_MEMORY_FRACTION * free))

    def _run_exact(self, jobs: list[Job], cands: dict[str, list[int]], stops: list[int], sink: Sink, bar: Any) -> None:
        """Score every job; on out-of-memory halve the byte budget and re-plan what is left."""
        width = max(len(c) for c in cands.values())
        lengths = {j.key: len(self.tok(self._prompt_text(j.prompt), add_special_tokens=False).input_ids)
                   for j in jobs}
        budget = self.exact_budget_bytes()
        todo = list(jobs)
        while todo:
            plan = exact_plan(self.model, [lengths[j.key] for j in todo], len(cands), width, budget)
            finished: set[int] = set()
            for idx, chunk in plan:
                batch = [todo[i] for i in idx]
                try:
                    verdicts = self._verdicts_exact(batch, cands, stops, chunk)
                except RuntimeError as e:
                    if not is_out_of_memory(e) or (len(batch) == 1 and chunk == 1):
                        raise
                    if self.model.device.type == "cuda":
                        import torch
                        torch.cuda.empty_cache()
                    budget //= 2
                    log.warning("out of memory: exact judge budget lowered to %.2f GB", budget / 1e9)
                    break
                for job, v in zip(batch, verdicts):
                    sink(job, v)
                    bar.update(1)
                finished.update(idx)
            todo = [j for i, j in enumerate(todo) if i not in finished]

    def _prompt_text(self, prompt: str) -> str:
        return chat_prompt(self.tok, prompt)

    def _verdicts_exact(self, batch: list[Job], cands: dict[str, list[int]], stops: list[int],
                        chunk: int = 0) -> list[Verdict]:
        texts = [self._prompt_text(j.prompt) for j in batch]
        out = []
        for text, lps in zip(texts, exact_candidate_logprobs(self.model, self.tok, texts, cands, stops, chunk)):
            score, label, mass = label_from_logprobs(lps, MIN_MASS)
            out.append(Verdict(score=score, label=label, raw=json.dumps({k: round(v, 6) for k, v in lps.items()}),
                               prob_mass=mass, input_tokens=len(self.tok(text, add_special_tokens=False).input_ids),
                               output_tokens=0, cost_usd=0.0, judge_model=self.model_name, finish_reason=None))
        return out

    def _verdicts_batch(self, batch: list[Job]) -> list[Verdict]:
        import torch

        texts = [self._prompt_text(j.prompt) for j in batch]
        enc = self.tok(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(self.model.device)
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        out: list[Verdict] = []
        with torch.no_grad():
            if self.method == "logprob":
                logits = self.model(**enc).logits[:, -1].float()
                lp = torch.log_softmax(logits, dim=-1)
                vals, ids = lp.topk(TOP_LOGPROBS, dim=-1)
                for b in range(len(batch)):
                    top: dict[str, float] = {}
                    for v, i in zip(vals[b].tolist(), ids[b].tolist()):
                        t = self.tok.decode([i])
                        top[t] = v if t not in top else math.log(math.exp(top[t]) + math.exp(v))
                    score, label, mass = label_from_logprobs(top, MIN_MASS)
                    out.append(Verdict(score=score, label=label, raw=json.dumps(top, ensure_ascii=False),
                                       prob_mass=mass, input_tokens=int(n_in[b]), output_tokens=1, cost_usd=0.0,
                                       judge_model=self.model_name, finish_reason="length"))
            else:
                temp = float(self.cfg.judge_temperature)
                torch.manual_seed(self.cfg.seed)
                gen = self.model.generate(**enc, max_new_tokens=SAMPLED_MAX_TOKENS, do_sample=temp > 0,
                                          temperature=temp if temp > 0 else None, top_p=None, top_k=None,
                                          pad_token_id=self.tok.pad_token_id)
                new = gen[:, enc["input_ids"].shape[1]:]
                stops = set(stop_token_ids(self.tok, self.model))
                for b in range(len(batch)):
                    ids = new[b].tolist()
                    ended = any(i in stops for i in ids)
                    text = self.tok.decode(ids, skip_special_tokens=True)
                    score, label = parse_sampled(text)
                    n_out = next((k + 1 for k, i in enumerate(ids) if i in stops), len(ids))
                    out.append(Verdict(score=score, label=label, raw=text, prob_mass=None, input_tokens=int(n_in[b]),
                                       output_tokens=n_out, cost_usd=0.0, judge_model=self.model_name,
                                       finish_reason="stop" if ended else "length"))
        return out


def candidate_token_ids(tok: Any, candidates: tuple[str, ...] = CANDIDATES) -> dict[str, list[int]]:
    """Token ids of each candidate reply as the tokenizer encodes it right after a chat prompt
    (so a tokenizer that merges across the boundary or adds a leading space is respected)."""
    probe = chat_prompt(tok, "Rate this.")
    base = tok(probe, add_special_tokens=False).input_ids
    out: dict[str, list[int]] = {}
    for c in candidates:
        full = tok(probe + c, add_special_tokens=False).input_ids
        ids = full[len(base):] if full[:len(base)] == base else tok(c, add_special_tokens=False).input_ids
        if not ids:
            raise JudgeError(f"judge tokenizer encodes candidate {c!r} as no tokens")
        out[c] = list(ids)
    return out


def _cache_kw(model: Any) -> str:
    """The forward() keyword for a KV cache: ``cache`` in recent transformers, else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def exact_row_bytes(model: Any, prompt_len: int, width: int) -> int:
    """Bytes one (prompt, candidate) row of the exact method's candidate pass holds at its peak.

    Its copy of the prompt's KV cache plus the candidate's own positions (kv_bytes_per_token each),
    the candidate positions' logits over the vocabulary three times (the model's output in its
    dtype, a float32 copy, the float32 log-softmax), and one layer's activations for the
    candidate positions. SmolLM2-135M on CPU, 250-token prompt, 3-token candidates:
    45 KiB x 253 = 11.7 MB of KV + 3 x 49,152 x 12 B = 1.8 MB of logits per row."""
    c = getattr(model.config, "text_config", model.config)
    nbytes = dtype_bytes(model)
    kv = kv_bytes_per_token(model) * (prompt_len + width)
    logits = width * c.vocab_size * (nbytes + 4 + 4)
    act = width * (4 * c.hidden_size + 2 * c.intermediate_size) * nbytes
    return kv + logits + act


def exact_prefill_bytes(model: Any, prompt_len: int) -> int:
    """Bytes one prompt of the exact method's prompt pass holds: its KV cache, one layer's
    activations and attention scores, and the last position's float32 log-softmax."""
    c = getattr(model.config, "text_config", model.config)
    nbytes = dtype_bytes(model)
    act = prompt_len * (4 * c.hidden_size + 2 * c.intermediate_size) * nbytes
    scores = c.num_attention_heads * prompt_len * prompt_len * 4
    return kv_bytes_per_token(model) * prompt_len + act + scores + 2 * c.vocab_size * 4


def exact_plan(model: Any, lengths: list[int], n_cands: int, width: int, budget: int) -> list[tuple[list[int], int]]:
    """Passes of the exact method within ``budget`` bytes: (indices into ``lengths``, candidates
    per sub-pass; 0 for all at once). Prompts are grouped by similar length; a prompt whose
    candidates do not all fit at once is scored alone, its candidates split into sub-passes
    that each reuse its KV cache."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    plan: list[tuple[list[int], int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[i]  # sorted: the newest prompt is the longest of the pass
        row = exact_row_bytes(model, longest, width)
        pre = exact_prefill_bytes(model, longest)
        if n_cands * row + pre > budget:  # not even this prompt's candidates fit at once
            if cur:
                plan.append((cur, 0))
                cur = []
            plan.append(([i], max(1, min(n_cands, (budget - pre) // row))))
            continue
        if cur and (len(cur) + 1) * (n_cands * row + pre) > budget:
            plan.append((cur, 0))
            cur = []
        cur.append(i)
    return plan + ([(cur, 0)] if cur else [])


def exact_candidate_logprobs(model: Any, tok: Any, prompt_texts: list[str], candidates: dict[str, list[int]],
                             stops: list[int], chunk: int = 0) -> list[dict[str, float]]:
    """log P(candidate, then end of turn | prompt) for every candidate and prompt, by teacher forcing.

    The B prompts run once, left-padded; their KV cache is repeated for the candidates, which
    are right-padded and fed as B x C rows on top of it (``chunk`` > 0: C = ``chunk`` candidates
    per sub-pass, each on a fresh copy of the prompt cache, so memory follows ``chunk`` instead of
    the number of candidates). Position ids follow each prompt's real length, and padding only
    ever sits where causal attention cannot let it change a real token's probability (prompt
    padding is masked, candidate padding comes after every real candidate token)."""
    import torch

    device = model.device
    names, cands = list(candidates), list(candidates.values())
    enc = tok(prompt_texts, add_special_tokens=False, return_tensors="pt", padding=True)
    ids, pmask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if tok.padding_side != "left" and not bool(pmask[:, -1].all()):
        raise JudgeError("exact judging needs a left-padding tokenizer")
    n_b = ids.shape[0]
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else stops[0]
    kw = _cache_kw(model)
    stop_idx = torch.tensor(stops, device=device)
    step = chunk if chunk > 0 else len(cands)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): P(first token | prompt)
        prompt_cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        del out
        totals = []
        for c0 in range(0, len(cands), step):
            part = cands[c0:c0 + step]
            n_c, width = len(part), max(len(c) for c in part)
            cand = torch.full((n_c, width), pad, dtype=torch.long, device=device)
            for i, c in enumerate(part):
                cand[i, :len(c)] = torch.tensor(c, device=device)
            # the last sub-pass may take the prompt cache itself; earlier ones work on a copy
            cache = prompt_cache if c0 + step >= len(cands) else copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(n_c)  # row b*C + c continues prompt b
            inp = cand.repeat(n_b, 1)  # (B*C, width)
            mask = torch.cat([pmask.repeat_interleave(n_c, dim=0),
                              torch.ones((n_b * n_c, width), dtype=pmask.dtype, device=device)], dim=1)
            start = pmask.sum(-1).repeat_interleave(n_c).unsqueeze(1)  # real prompt length per row
            pos = start + torch.arange(width, device=device).unsqueeze(0)
            logits = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True, **{kw: cache}).logits
            del cache
            lp = torch.log_softmax(logits.float(), dim=-1).view(n_b, n_c, width, -1)
            del logits
            lens = torch.tensor([len(c) for c in part], device=device)
            # sum over each candidate's tokens after the first: lp[b, c, j-1, token_j] for 1 <= j < len
            nxt = torch.gather(lp[:, :, :-1, :], 3, cand[:, 1:].expand(n_b, -1, -1).unsqueeze(-1)).squeeze(-1) \
                if width > 1 else torch.zeros((n_b, n_c, 0), device=device)
            keep = (torch.arange(1, width, device=device).unsqueeze(0) < lens.unsqueeze(1)).float()  # (C, width-1)
            total = first[:, cand[:, 0]] + (nxt * keep).sum(-1)
            end = torch.logsumexp(lp[:, torch.arange(n_c, device=device), lens - 1][:, :, stop_idx], dim=-1)  # (B, C)
            totals.append(total + end)
            del lp
        total = torch.cat(totals, dim=1).cpu().tolist()
    return [dict(zip(names, row)) for row in total]
