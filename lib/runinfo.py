"""`outputs/<run>/run.json`: what makes a run reproducible.

Each stage adds its own section (``train``, ``evaluate``, ``judge``) to the same file; the
top level holds the parameters, seed, git commit and package versions. The file is rewritten
atomically, so a killed stage never corrupts it.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, RunConfig
from .io import write_json_atomic

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
            "bitsandbytes", "openai", "pandas", "pyarrow", "papermill", "altair", "em-lab")


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception:
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "packages": package_versions(), "git": git_commit()}
    try:
        import torch
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return env


def peak_memory() -> dict[str, Any]:
    """Peak memory of this process so far, in GB (1e9 bytes): resident RAM, and GPU memory torch
    allocated where CUDA is in use. papermill runs each stage in its own kernel, so in run.json
    this is the stage's peak; in one process running several stages (tests) it is the process's."""
    out: dict[str, Any] = {"rss_peak_gb": None, "cuda_peak_gb": None}
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_peak_gb"] = round(rss * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)  # KiB on Linux
    except (ImportError, OSError):  # no resource module on Windows
        pass
    torch = sys.modules.get("torch")  # a stage that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    p = Path(run_dir) / "run.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def update_run_json(cfg: RunConfig, section: str | None = None, data: dict[str, Any] | None = None) -> Path:
    """Merge the parameters, the environment and one stage's section (with the stage's peak
    memory, :func:`peak_memory`) into run.json."""
    run_dir = cfg.run_dir
    info = read_run_json(run_dir)
    info["run_id"] = cfg.run_id
    info["seed"] = cfg.seed
    info["parameters"] = cfg.to_dict()
    info["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if section:
        info.setdefault("environment", {})[section] = environment()
        info[section] = {**info.get(section, {}), **(data or {}), "peak_memory": peak_memory()}
    return write_json_atomic(run_dir / "run.json", info)
