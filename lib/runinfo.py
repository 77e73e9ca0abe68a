"""`outputs/<run>/run.json`: what makes a run reproducible.

Each stage writes its own section (``train``, ``evaluate``, ``judge``) of the same file, with
the parameters it ran with (``<stage>.parameters``: a later stage never overwrites an earlier
one's) and the environment it ran in (``environment.<stage>``: git commit, package versions);
the top level holds the run id, seed and time of the last update. The sections' keys are the
typed dicts below, which the writers (the stages) and the readers (the report) share. The
file is rewritten atomically, so a killed stage never corrupts it.

Files written before stages recorded their own parameters have one top-level ``parameters``
(the last stage's); :func:`stage_parameters` reads both shapes.
"""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from .config import REPO_ROOT, RunConfig
from .io import write_json_atomic
from .layout import RUN_STAGES, run_json_path
from .secrets import mask_parameters


PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tokenizers",
            "bitsandbytes", "openai", "pandas", "pyarrow", "papermill", "altair", "em-lab")


class TrainSection(TypedDict, total=False):
    """``run.json["train"]``, written by :func:`lib.train.train_run`."""
    parameters: dict[str, Any]         # RunConfig.to_dict() as this stage ran
    peak_memory: dict[str, Any]        # rss_peak_gb, cuda_peak_gb of the stage (peak_memory())
    dataset: dict[str, Any]            # lib.data.DatasetInfo: name, path, sha256, n_examples, ...
    n_examples: int
    n_train_examples: int
    n_dropped_too_long: int
    n_truncated: int
    steps_per_epoch: int
    total_steps: int
    effective_batch_size: int
    checkpoints: list[dict[str, Any]]  # lib.train.schedule_table rows: step, epoch, ...
    model: dict[str, Any]              # lib.models.model_revision_info
    device: str
    dtype: str
    quantization: str
    trainable_parameters: int
    tokens_seen: int
    wall_time_s: float
    resumed_from_step: int | None
    fingerprint: str
    completed: str


class EvaluateSection(TypedDict, total=False):
    """``run.json["evaluate"]``, written by the evaluate stage."""
    parameters: dict[str, Any]
    peak_memory: dict[str, Any]        # rss_peak_gb, cuda_peak_gb of the stage (peak_memory())
    question_sets: list[dict[str, Any]]  # lib.questions.question_set_info: name, source, sha256
    n_questions: int
    n_rows: int
    sampling: dict[str, Any]
    batch_size: int
    checkpoints: list[dict[str, Any]]    # step, epoch, path, adapter_sha256
    model: dict[str, Any]
    finish_reasons: dict[str, int]
    mean_new_tokens: float | None
    answers_generated_this_session: int
    wall_time_s: float
    fingerprint: str
    engine: dict[str, Any]             # name (hf | vllm); vllm: its version, device, load_s, generate_s


class JudgeInfo(TypedDict, total=False):
    """One judge's entry in ``run.json["judge"]["judges"]``, written by :func:`lib.judge.judge_run`."""
    judge_name: str
    backend: str
    model: str
    models_reported: list[str]
    method: str
    base_url: str | None
    identity: dict[str, Any]
    metrics: list[str]
    prompts: dict[str, Any]          # source, sha256 (one file) and template_sha256: {metric: [sha256]}
    path: str
    rows: int
    pending: int
    complete: bool
    labels: dict[str, dict[str, int]]
    skipped_no_prompt: dict[str, int]
    this_session: dict[str, Any]
    table_cost_usd: float | None     # one cost per distinct call in the table; None: a price unknown
    batches: list[dict[str, Any]] | None
    server: dict[str, Any] | None    # judge_backend vllm: engine version, served name, weights sha256 (lib.judge_vllm)
    price: str
    estimate: dict[str, Any]


class JudgeSection(TypedDict, total=False):
    """``run.json["judge"]``: every judge that scored this run, and the last one."""
    parameters: dict[str, Any]
    peak_memory: dict[str, Any]        # rss_peak_gb, cuda_peak_gb of the stage (peak_memory())
    judges: dict[str, JudgeInfo]
    last: str


class RunJson(TypedDict, total=False):
    run_id: str
    seed: int
    updated: str
    environment: dict[str, dict[str, Any]]  # stage -> python, platform, packages, git, cuda, gpu
    train: TrainSection
    evaluate: EvaluateSection
    judge: JudgeSection
    phase: dict[str, Any]                   # lib.phase (05_phase_transition), with its parameters
    parameters: dict[str, Any]              # files of earlier versions only (the last stage's)


class RunJsonError(ValueError):
    """run.json cannot be read: one line naming the file and the line."""


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
        import torch  # heavy: loaded only when a model runs
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
        import resource  # Unix only: absent on Windows, hence inside the try

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_peak_gb"] = round(rss * (1 if sys.platform == "darwin" else 1024) / 1e9, 3)  # KiB on Linux
    except (ImportError, OSError):  # no resource module on Windows
        pass
    torch = sys.modules.get("torch")  # a stage that never imported torch used no GPU
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return out


def read_run_json(run_dir: str | Path) -> RunJson:
    """run.json of a run folder ({} when there is none yet)."""
    p = run_json_path(run_dir)
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RunJsonError(f"{p}: line {e.lineno}: invalid JSON ({e.msg})") from None


def stage_parameters(info: RunJson | dict[str, Any], stage: str | None = None) -> dict[str, Any]:
    """The parameters one stage ran with; without ``stage``, those of the first stage recorded
    (train, evaluate, judge). Files of earlier versions: their one top-level ``parameters``."""
    for s in ([stage] if stage else RUN_STAGES):
        p = (info.get(s) or {}).get("parameters")
        if isinstance(p, dict):
            return p
    legacy = info.get("parameters")
    return legacy if isinstance(legacy, dict) else {}


def update_run_json(cfg: RunConfig, section: str, data: dict[str, Any]) -> Path:
    """Merge one stage's section (with the parameters it ran with) and environment into run.json."""
    info: dict[str, Any] = dict(read_run_json(cfg.run_dir))
    info["run_id"] = cfg.run_id
    info["seed"] = cfg.seed
    info["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    info.setdefault("environment", {})[section] = environment()
    info[section] = {**info.get(section, {}), **data, "peak_memory": peak_memory(),
                     "parameters": mask_parameters(cfg.to_dict())[0]}  # no password of an URL in the record
    return write_json_atomic(run_json_path(cfg.run_dir), info)
