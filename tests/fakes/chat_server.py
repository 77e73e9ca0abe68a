"""A real chat-completions server on 127.0.0.1 for tests and benchmarks.

It speaks enough of the OpenAI chat-completions protocol (``POST /v1/chat/completions``) for
the official client: a reply message, optional ``logprobs`` with ``top_logprobs``, usage,
``max_tokens`` truncation; and the Batch API's file upload, batch create / retrieve and file
content. It records every request it sees and can inject the faults a real
API throws at a client: 429 with ``Retry-After``, 500s, responses slower than the client's
timeout, connections dropped without a response, a 200 whose JSON body is cut off
(``malformed``), and a plain 400 (not worth retrying).

    with ChatServer(latency_s=0.1, fault=fail_first(1, "429")) as server:
        client = AsyncOpenAI(base_url=server.url, api_key="dummy")
        ...
        server.requests        # every request seen, with its outcome
        server.ok_counts()     # prompt -> number of 200 replies sent

Replies are deterministic: by default the "judge" answers a number derived from the sha256 of
the prompt (see :func:`default_reply`); pass ``reply=`` to script your own.

Run it standalone (the benchmark does): ``python -m tests.fakes.chat_server --latency 0.1`` (from the repository root); it
prints ``URL http://127.0.0.1:PORT/v1`` and serves until killed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

FAULTS = ("429", "500", "drop", "slow", "malformed", "400")


@dataclass(frozen=True)
class Reply:
    """What the fake model answers: its text, and its first token's top logprobs."""

    content: str
    top_logprobs: dict[str, float] | None = None  # token -> natural-log probability
    prompt_tokens: int | None = None  # None: ~4 characters per token
    completion_tokens: int | None = None


@dataclass(frozen=True)
class Seen:
    """One request the server saw."""

    path: str
    body: dict[str, Any] | None
    prompt: str          # content of the last message ("" when the body is not chat)
    attempt: int         # 0 for the first request carrying this prompt, 1 for the second, ...
    outcome: str         # ok | 429 | 500 | drop | slow | bad_request | not_found
    t_start: float
    t_end: float = 0.0


def prompt_score(prompt: str) -> int:
    """The number the default fake judge gives a prompt: stable, spread over 0..100."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:8], 16) % 101


def default_reply(body: dict[str, Any]) -> Reply:
    """A judge-like reply: the prompt's number, with 0.6 / 0.3 / 0.1 of the first token's
    probability on that number, the next number, and a non-numeric token."""
    prompt = _prompt_of(body)
    n = prompt_score(prompt)
    top = {str(n): math.log(0.6), str((n + 1) % 101): math.log(0.3), "I": math.log(0.1)}
    return Reply(content=str(n), top_logprobs=top)


def fail_first(n: int, kind: str) -> Callable[[str, int], str | None]:
    """A fault plan: the first ``n`` attempts of every prompt fail with ``kind``."""
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r} (known: {', '.join(FAULTS)})")
    return lambda prompt, attempt: kind if attempt < n else None


def random_faults(rates: dict[str, float], seed: int = 0, max_per_prompt: int = 3) -> Callable[[str, int], str | None]:
    """A fault plan: each attempt fails with ``kind`` with probability ``rates[kind]``, at most
    ``max_per_prompt`` times per prompt (so every prompt eventually succeeds). Deterministic:
    the draw depends on (seed, prompt, attempt) only, not on thread timing."""
    bad = set(rates) - set(FAULTS)
    if bad:
        raise ValueError(f"unknown fault(s) {sorted(bad)} (known: {', '.join(FAULTS)})")

    def plan(prompt: str, attempt: int) -> str | None:
        if attempt >= max_per_prompt:
            return None
        r = random.Random(f"{seed}\x1f{prompt}\x1f{attempt}").random()
        acc = 0.0
        for kind in FAULTS:
            acc += rates.get(kind, 0.0)
            if r < acc:
                return kind
        return None

    return plan


def _prompt_of(body: dict[str, Any] | None) -> str:
    try:
        content = body["messages"][-1]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return ""
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


class ChatServer:
    """A threaded HTTP server on 127.0.0.1 (port 0 = any free port), started on construction.

    latency_s:   seconds every reply takes (sleep before answering).
    logprobs:    False = behave like a model without logprobs (``logprobs: null``).
    reply:       body -> :class:`Reply`; default :func:`default_reply`.
    fault:       (prompt, attempt) -> None or one of 429 | 500 | drop | slow | malformed | 400.
    retry_after: value of the Retry-After header on a 429 (seconds, as a string).
    slow_s:      how long a "slow" reply sleeps (make it exceed the client's timeout).
    model:       the ``model`` field of replies; default echoes the request's model.
    models:      model ids served; another id gets 404 model_not_found (None: any id).
    batch_polls: Batch API: a batch stays in_progress for this many status polls, then runs
                 (0: it runs when created). Batch lines count in ``requests`` like calls.
    api_key:     when set, a request without ``Authorization: Bearer <api_key>`` gets 401.
    """

    def __init__(self, *, latency_s: float = 0.0, logprobs: bool = True,
                 reply: Callable[[dict[str, Any]], Reply] | None = None,
                 fault: Callable[[str, int], str | None] | None = None,
                 retry_after: str = "0", slow_s: float = 2.0, model: str | None = None,
                 models: set[str] | None = None, batch_polls: int = 0, port: int = 0,
                 api_key: str | None = None) -> None:
        self.api_key = api_key
        self.latency_s = latency_s
        self.logprobs = logprobs
        self.reply = reply or default_reply
        self.fault = fault
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.model = model
        self.models = models
        self.batch_polls = batch_polls
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self._attempts: Counter[str] = Counter()
        self._in_flight = 0
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="chat-server", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public API
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL for an OpenAI client (``.../v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def ok_counts(self) -> Counter[str]:
        """prompt -> number of successful (200) chat replies sent."""
        return Counter(s.prompt for s in self.requests if s.outcome == "ok")

    def outcomes(self) -> Counter[str]:
        return Counter(s.outcome for s in self.requests)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being handled (e.g. a slow reply the client gave up on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._in_flight == 0:
                    return True
            time.sleep(0.01)
        return False

    def reset(self) -> None:
        """Forget the requests seen so far (attempt numbering restarts too)."""
        with self._lock:
            self._seen.clear()
            self._attempts.clear()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ChatServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- Batch API (files + batches)
    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids:06d}"

    def _batch_post(self, path: str, raw: bytes, ctype: str, body: Any) -> tuple[int, dict[str, Any]]:
        if path == "/v1/files":  # multipart upload: fields purpose, file
            from email.parser import BytesParser
            from email.policy import HTTP

            msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + raw)
            data = next((p.get_payload(decode=True) for p in msg.iter_parts()
                         if p.get_param("name", header="content-disposition") == "file"), None)
            if data is None:
                return 400, {"error": {"message": "no file part"}}
            with self._lock:
                fid = self._new_id("file")
                self._files[fid] = data
            return 200, {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                         "filename": "batch.jsonl", "purpose": "batch", "status": "processed"}
        if not isinstance(body, dict) or body.get("input_file_id") not in self._files:
            return 400, {"error": {"message": "unknown input_file_id"}}
        with self._lock:
            bid = self._new_id("batch")
            b = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                 "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window", "24h"),
                 "status": "in_progress", "output_file_id": None, "error_file_id": None,
                 "created_at": int(time.time()), "metadata": body.get("metadata"),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_polls": 0}
            self._batches[bid] = b
            if self.batch_polls == 0:
                self._finish_batch(b)
            return 200, {k: v for k, v in b.items() if not k.startswith("_")}

    def _finish_batch(self, b: dict[str, Any]) -> None:
        """Run every line of a batch (under the lock); each counts as a request seen."""
        out, err = [], []
        for line in self._files[b["input_file_id"]].decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            body, prompt = item["body"], _prompt_of(item["body"])
            attempt = self._attempts[prompt]
            self._attempts[prompt] += 1
            kind = self.fault(prompt, attempt) if self.fault else None
            now = time.monotonic()
            if kind in ("429", "500"):
                self._seen.append(Seen("/v1/batches", body, prompt, attempt, kind, now, now))
                err.append({"id": self._new_id("batch_req"), "custom_id": item["custom_id"],
                            "response": {"status_code": int(kind), "body": {"error": {"message": "injected"}}},
                            "error": None})
                continue
            self._seen.append(Seen("/v1/batches", body, prompt, attempt, "ok", now, now))
            out.append({"id": self._new_id("batch_req"), "custom_id": item["custom_id"],
                        "response": {"status_code": 200, "request_id": "req", "body": self.completion(body)},
                        "error": None})
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = self._new_id("file")
                self._files[fid] = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
                b[name] = fid
        b["status"] = "completed"
        b["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}

    # ---------------------------------------------------------------- internals
    def _register(self, path: str, body: dict[str, Any] | None, prompt: str) -> tuple[int, float]:
        with self._lock:
            attempt = self._attempts[prompt]
            self._attempts[prompt] += 1
            self._in_flight += 1
            return attempt, time.monotonic()

    def _record(self, seen: Seen, done: bool = False) -> None:
        with self._lock:
            self._seen.append(seen)
            if done:
                self._in_flight -= 1

    def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON body of a successful chat completion for a request body."""
        r = self.reply(body)
        prompt = _prompt_of(body)
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        content, finish = r.content, "stop"
        if max_tokens == 1 and r.top_logprobs:
            first = max(r.top_logprobs, key=r.top_logprobs.get)  # greedy first token
            if first != content:
                content, finish = first, "length"
        logprobs = None
        if body.get("logprobs") and self.logprobs and r.top_logprobs is not None:
            k = int(body.get("top_logprobs") or 0)
            top = sorted(r.top_logprobs.items(), key=lambda kv: -kv[1])[:k]
            first_tok = max(r.top_logprobs, key=r.top_logprobs.get)
            logprobs = {"content": [{
                "token": first_tok, "logprob": r.top_logprobs[first_tok], "bytes": list(first_tok.encode()),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top],
            }], "refusal": None}
        pt = r.prompt_tokens if r.prompt_tokens is not None else len(prompt) // 4 + 7
        ct = r.completion_tokens if r.completion_tokens is not None else max(1, len(content) // 4)
        return {
            "id": "chatcmpl-" + hashlib.sha256(f"{time.time_ns()}{prompt}".encode()).hexdigest()[:24],
            "object": "chat.completion", "created": int(time.time()),
            "model": self.model or body.get("model", "fake-judge"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024  # the client may open many connections at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # a client that gave up or was killed: expected in fault tests
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict[str, Any] | None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode() if payload is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        owner: ChatServer = self.server.owner  # type: ignore[attr-defined]
        path = self.path.split("?")[0].rstrip("/")
        parts = path.split("/")
        if path.startswith("/v1/batches/") and len(parts) == 4:
            with owner._lock:
                b = owner._batches.get(parts[3])
                if b is not None:
                    b["_polls"] += 1
                    if b["status"] == "in_progress" and b["_polls"] > owner.batch_polls:
                        owner._finish_batch(b)
                    payload = {k: v for k, v in b.items() if not k.startswith("_")}
            if b is None:
                self._send(404, {"error": {"message": f"no batch {parts[3]}"}})
            else:
                self._send(200, payload)
            return
        if path.startswith("/v1/files/") and path.endswith("/content") and len(parts) == 5:
            data = owner._files.get(parts[3])
            if data is None:
                self._send(404, {"error": {"message": f"no file {parts[3]}"}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._send(404, {"error": {"message": f"no route {path}"}})

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        owner: ChatServer = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        t0 = time.monotonic()
        try:
            body = json.loads(raw or b"null")
        except json.JSONDecodeError:
            body = None
        path = self.path.split("?")[0].rstrip("/")
        if owner.api_key is not None and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
            self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                       "code": "invalid_api_key"}})
            return
        if path in ("/v1/files", "/v1/batches"):
            status, payload = owner._batch_post(path, raw, self.headers.get("Content-Type", ""), body)
            self._send(status, payload)
            return
        if path != "/v1/chat/completions":
            owner._record(Seen(path, body, "", 0, "not_found", t0, time.monotonic()))
            self._send(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
            return
        if not isinstance(body, dict) or "messages" not in body or "model" not in body:
            owner._record(Seen(path, body, "", 0, "bad_request", t0, time.monotonic()))
            self._send(400, {"error": {"message": "messages and model are required", "type": "invalid_request_error"}})
            return
        if owner.models is not None and body["model"] not in owner.models:
            owner._record(Seen(path, body, "", 0, "not_found", t0, time.monotonic()))
            self._send(404, {"error": {"message": f"The model `{body['model']}` does not exist",
                                       "type": "invalid_request_error", "code": "model_not_found"}})
            return
        prompt = _prompt_of(body)
        attempt, _ = owner._register(path, body, prompt)
        kind = owner.fault(prompt, attempt) if owner.fault else None
        if owner.latency_s:
            time.sleep(owner.latency_s)
        seen = Seen(path, body, prompt, attempt, kind or "ok", t0)
        try:
            if kind == "drop":
                self.close_connection = True  # close the socket without a response
                return
            if kind == "slow":
                time.sleep(owner.slow_s)
            if kind == "429":
                self._send(429, {"error": {"message": "Rate limit reached (injected)", "type": "requests",
                                           "code": "rate_limit_exceeded"}},
                           {"Retry-After": owner.retry_after})
            elif kind == "500":
                self._send(500, {"error": {"message": "The server had an error (injected)", "type": "server_error"}})
            elif kind == "400":
                self._send(400, {"error": {"message": "Invalid prompt (injected)", "type": "invalid_request_error"}})
            elif kind == "malformed":  # a 200 whose JSON body is cut off half-way
                data = json.dumps(owner.completion(body)).encode()
                data = data[: len(data) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self._send(200, owner.completion(body))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            owner._record(Seen(seen.path, seen.body, seen.prompt, seen.attempt, seen.outcome, t0, time.monotonic()),
                          done=True)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    ap.add_argument("--no-logprobs", action="store_true")
    args = ap.parse_args(argv)
    server = ChatServer(latency_s=args.latency, logprobs=not args.no_logprobs, port=args.port)
    print(f"URL {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
