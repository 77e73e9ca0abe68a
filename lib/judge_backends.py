"""The judge's backends by name: a run's ``judge_backend`` (``-batch`` with
``judge_use_batch_api``) -> a :class:`lib.judge_protocol.JudgeBackend`.

* ``openai``: an OpenAI-compatible chat-completions API, async and retried (:mod:`lib.judge_openai`);
* ``openai-batch``: the OpenAI Batch API, half price, collected across runs (:mod:`lib.judge_openai`);
* ``hf``: a transformers model in this process, by the exact, logprob or sampled method
  (:mod:`lib.judge_hf`);
* ``vllm``: an open-weights model on a vLLM server the judge stage starts and stops, pinned by its
  weights' sha256 (:mod:`lib.judge_vllm`).

A new backend (a vLLM-served judge, a panel of judges) is one module whose class satisfies the
protocol, one line in :data:`BACKENDS`, and its name among RunConfig's ``judge_backend`` choices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import RunConfig
from .judge_hf import HFBackend
from .judge_openai import OpenAIBackend, OpenAIBatchBackend
from .judge_protocol import JudgeBackend
from .judge_vllm import VllmBackend
from .scoring import JudgeError

# (cfg, api key, judge cache file) -> a backend, not started: the key is "" for a judge that needs
# none; the Batch API backend keeps its submitted batches in the judge cache file
Factory = Callable[[RunConfig, str, Path], JudgeBackend]

BACKENDS: dict[str, Factory] = {
    "openai": lambda cfg, api_key, cache_path: OpenAIBackend(cfg, api_key),
    "openai-batch": lambda cfg, api_key, cache_path: OpenAIBatchBackend(cfg, api_key, cache_path),
    "hf": lambda cfg, api_key, cache_path: HFBackend(cfg),
    "vllm": lambda cfg, api_key, cache_path: VllmBackend(cfg),
}


def backend_name(cfg: RunConfig) -> str:
    """The registry name of a run's judge: ``judge_backend``, plus ``-batch`` for the Batch API
    (RunConfig allows ``judge_use_batch_api`` only where such a variant exists)."""
    return f"{cfg.judge_backend}-batch" if cfg.judge_use_batch_api else cfg.judge_backend


def make_backend(cfg: RunConfig, api_key: str | None, cache_path: Path) -> JudgeBackend:
    """The judge backend ``cfg`` asks for. ``api_key``: :func:`lib.judge.check_credentials`'s
    answer (None for a judge that needs none); ``cache_path``: the judge cache file
    (:func:`lib.judge.cache_path`)."""
    name = backend_name(cfg)
    if name not in BACKENDS:
        raise JudgeError(f"key 'judge_backend': no judge backend '{name}' (known: {', '.join(BACKENDS)})")
    return BACKENDS[name](cfg, api_key or "", cache_path)
