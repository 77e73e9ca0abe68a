"""Stage fingerprints: what a stage's result depends on, hashed.

A stage's fingerprint is the sha256 of its parameters (``RunConfig.stage_params(stage)``) and
the sha256 of every input file it reads:

=========  ===================================================================================
train      the training dataset file and the base model's files (hub ids: id + revision)
evaluate   the adapter files of every complete checkpoint, the question-set texts, the base model,
           the vLLM distribution and version (evaluate_engine: vllm),
           the conditions' in-context examples files (lib.conditions)
judge      generations.parquet, the prompt sources (question sets, judge_prompts file), the
           judge model's files when it runs in-process; the same for every judge of a panel
           (``judges:``), and the calibration set (``judge_calibration: true``)
report     every run's generations.parquet, judgments/*.parquet and run.json, the report params
=========  ===================================================================================

The grid runner stores a stage's fingerprint in ``outputs/<run>/stages.json`` once the stage
has finished, and skips the stage next time when the fingerprint is the same. Hashing large
files (model weights, adapters) every time would make an unchanged rerun slow, so digests are
cached by (size, mtime_ns, inode) in a small JSON file; a file rewritten in place gets a new
mtime and is hashed again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

from . import calibration, layout
from .config import ConfigError, ReportConfig, RunConfig, judge_panel, resolve_path
from .data import DEMO_DATASETS, DEMO_DIR, DOMAINS
from .io import sha256_file, sha256_text, write_json_atomic
from .models import is_embedded, resolve_model
from .questions import fetch_text
from .secrets import mask_url_credentials
from .vllm_env import vllm_version


class HashCache:
    """sha256 of files, remembered by (size, mtime_ns, inode) so unchanged files are not re-read."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self._data: dict[str, list] = {}
        self._dirty = False
        if self.path and self.path.exists():
            try:
                self._data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                self._data = {}  # a damaged cache only costs re-hashing

    def sha256(self, path: str | Path) -> str:
        p = Path(path).resolve()
        st = p.stat()
        key = str(p)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self._data.get(key)
        if hit and hit[:3] == stamp:
            return hit[3]
        digest = sha256_file(p)
        self._data[key] = stamp + [digest]
        self._dirty = True
        return digest

    def tree(self, folder: str | Path, keep: Callable[[Path], bool] = lambda p: True) -> dict[str, str]:
        """relative path -> sha256 of every file below ``folder`` that ``keep`` accepts
        (hidden files, such as a writer's temp files, excluded)."""
        folder = Path(folder)
        out = {}
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts) and keep(rel):
                out[rel.as_posix()] = self.sha256(p)
        return out

    def save(self) -> None:
        if self.path and self._dirty:
            write_json_atomic(self.path, self._data)
            self._dirty = False


# ------------------------------------------------------------------------------------------
# Input identities
# ------------------------------------------------------------------------------------------

def model_identity(name: str, revision: str, cache: HashCache) -> dict[str, Any]:
    """The model's files when it is local (embedded models are built here if missing), else id + revision."""
    if is_embedded(name):
        return {"model": name, "files": cache.tree(resolve_model(name))}
    p = resolve_path(name)
    if p.exists():
        return {"model": name, "files": cache.tree(p) if p.is_dir() else {p.name: cache.sha256(p)}}
    return {"model": name, "revision": revision or "default branch"}


def dataset_identity(cfg: RunConfig, cache: HashCache) -> dict[str, Any]:
    """sha256 of the training file; an archive domain is named (its bytes are pinned by lib.data)."""
    if cfg.dataset in DEMO_DATASETS:
        return {"dataset": cfg.dataset, "sha256": cache.sha256(DEMO_DIR / f"{cfg.dataset}.jsonl")}
    if cfg.dataset in DOMAINS:
        return {"dataset": cfg.dataset, "source": "archive"}
    return {"dataset": cfg.dataset, "sha256": cache.sha256(resolve_path(cfg.dataset))}


def text_sources_identity(sources: Iterable[str], outputs_dir: str | None = None,
                          offline: bool = False) -> list[dict[str, str]]:
    """sha256 of the text of each question set / prompt file (paths or cached URLs; offline:
    an URL not downloaded yet raises lib.questions.NotCached)."""
    return [{"source": mask_url_credentials(s), "sha256": fetch_text(s, outputs_dir=outputs_dir, offline=offline)[1]}
            for s in sources]


def list_complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each complete checkpoint (its checkpoint.json marker is written last)."""
    return [(step, folder) for step, _, folder in layout.list_checkpoints(run_dir)]


# Files in a checkpoint folder that say how training went, not what the model is: hashing them
# would make an identical re-save (new timestamp, new optimizer state) look like a new model.
TRAINER_STATE = {layout.CHECKPOINT_MARKER, "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt",
                 "README.md"}


def checkpoint_files(folder: Path, cache: HashCache) -> dict[str, str]:
    """sha256 of what defines a checkpoint's model: the adapter files (weights + config), or for a
    full checkpoint everything except trainer state."""
    if any(p.name.startswith("adapter_") for p in folder.iterdir()):
        return cache.tree(folder, keep=lambda rel: rel.name.startswith("adapter_"))
    return cache.tree(folder, keep=lambda rel: rel.name not in TRAINER_STATE and not rel.name.startswith("rng_state"))


def checkpoints_identity(run_dir: Path, cache: HashCache) -> dict[str, dict[str, str]]:
    return {str(step): checkpoint_files(folder, cache) for step, folder in list_complete_checkpoints(run_dir)}


def stage_inputs(stage: str, cfg: RunConfig, cache: HashCache, offline: bool = False) -> dict[str, Any]:
    """Everything besides the parameters that a run stage's result depends on (offline: never
    download a question set; see text_sources_identity)."""
    run_dir = cfg.run_dir
    if stage == "train":
        return {"dataset": dataset_identity(cfg, cache),
                "model": model_identity(cfg.model, cfg.model_revision, cache)}
    if stage == "evaluate":
        inputs = {"checkpoints": checkpoints_identity(run_dir, cache),
                  "question_sets": text_sources_identity(cfg.question_sets, cfg.outputs_dir, offline),
                  "model": model_identity(cfg.model, cfg.model_revision, cache)}
        if cfg.evaluate_engine == "vllm":  # the engine is a parameter; which vLLM samples is an input
            inputs["engine"] = {"name": "vllm", "version": vllm_version()}
        examples = {c["name"]: dataset_identity(cfg.replace(dataset=c["examples"]), cache)
                    for c in cfg.conditions if isinstance(c, dict) and c.get("examples")}
        return {**inputs, "condition_examples": examples} if examples else inputs
    if stage == "judge":
        gens = layout.generations_path(run_dir)
        inputs: dict[str, Any] = {
            "generations": cache.sha256(gens) if gens.exists() else None,
            "question_sets": text_sources_identity(cfg.question_sets, cfg.outputs_dir, offline),
            "judge_prompts": (text_sources_identity([cfg.judge_prompts], cfg.outputs_dir, offline)
                              if cfg.judge_prompts else None),
        }
        if cfg.judge_backend in ("hf", "vllm"):  # a model on this machine: its files
            inputs["judge_model"] = model_identity(cfg.judge_model, "", cache)
        for i, m in enumerate(judge_panel(cfg)[1:]):  # a panel's judges (their parameters: cfg.judges)
            inputs[f"judges[{i}]"] = {
                "judge_prompts": (text_sources_identity([m.judge_prompts], m.outputs_dir, offline)
                                  if m.judge_prompts else None),
                "judge_model": (model_identity(m.judge_model, "", cache) if m.judge_backend in ("hf", "vllm")
                                else None)}
        if cfg.judge_calibration:  # the calibration set's labels and answers
            inputs["calibration_set"] = cache.sha256(calibration.DEFAULT_SET)
        return inputs
    raise ValueError(f"unknown run stage {stage!r}")


def fingerprint(params: dict[str, Any], inputs: dict[str, Any]) -> str:
    return sha256_text(json.dumps({"params": params, "inputs": inputs}, sort_keys=True, default=str))


def stage_fingerprint(stage: str, cfg: RunConfig, cache: HashCache, offline: bool = False) -> str:
    return fingerprint(cfg.stage_params(stage), stage_inputs(stage, cfg, cache, offline))


def report_inputs(rcfg: ReportConfig, cache: HashCache) -> dict[str, Any]:
    outputs_dir = resolve_path(rcfg.outputs_dir)
    runs: dict[str, Any] = {}
    for run in rcfg.runs:
        d = outputs_dir / run
        files = [layout.generations_path(d), layout.run_json_path(d), *layout.judgment_files(d)]
        runs[run] = {f.relative_to(d).as_posix(): cache.sha256(f) for f in files if f.exists()}
    external = {p: cache.sha256(resolve_path(p)) for p in rcfg.external_csv if resolve_path(p).exists()}
    return {"runs": runs, "external_csv": external}


def report_fingerprint(rcfg: ReportConfig, cache: HashCache) -> str:
    return fingerprint(rcfg.to_dict(), report_inputs(rcfg, cache))


# ------------------------------------------------------------------------------------------
# stages.json: the record of finished stages
# ------------------------------------------------------------------------------------------

def read_stages(folder: Path) -> dict[str, Any]:
    p = layout.stages_path(folder)
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{p}: not valid JSON (delete it to rerun every stage of this run)") from None


def write_stages(folder: Path, data: dict[str, Any]) -> None:
    write_json_atomic(layout.stages_path(folder), data)


def hash_cache_for(folder: Path) -> HashCache:
    """One cache per run folder, so parallel jobs never write the same cache file."""
    return HashCache(layout.grid_dir(folder) / "hashes.json")
