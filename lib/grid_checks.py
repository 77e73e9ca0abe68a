"""Validation: everything about a grid that can be checked cheaply, before any notebook starts.

:func:`validate` loads every parameters file (a file with ``seeds`` gives one run per seed) and
checks each run for the stages it will run (:func:`check_run`: training options, the judge's
credentials, vLLM's environment when evaluate_engine is vllm, the device, the models, question sets
and judge prompts, the training file), then what the runs of one grid must share (distinct run ids,
one outputs_dir, one EM definition, the runs ``control_of`` names) and that each stage's notebook
exists. Every problem is one :class:`~lib.grid_jobs.GridError` line naming the file and the key.
:func:`busy_folders` lists the run (and report) folders another live process holds now (:mod:`lib.lock`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from .config import ConfigError, RunConfig, expand_seeds, load_run_config, report_em_definition, resolve_path
from .data import check_dataset_param, check_examples_params
from .evaluate_vllm import check_engine
from .grid_jobs import GridError, Options
from .judge import JudgeError, check_credentials, panel
from .layout import NOTEBOOKS, RUN_STAGES
from .lock import LOCK_NAME, is_stale, read_holder
from .models import ModelUnavailable, check_model, pick_device
from .questions import NotCached, QuestionError, check_question_sources, load_judge_prompts
from .secrets import mask_url_credentials
from .train import check_train_config


def _check_model(name: str, key: str, revision: str = "", offline: bool = False) -> None:
    """The model can be loaded (lib.models.check_model: nothing is built or downloaded now)."""
    try:
        check_model(name, revision, offline)
    except ModelUnavailable as e:
        raise ConfigError(f"key '{key}': {e}") from None


def _check_device(cfg: RunConfig) -> None:
    """device: cuda / mps is there (auto and cpu always are)."""
    if cfg.device not in ("cuda", "mps"):
        return
    try:
        pick_device(cfg.device, "auto")
    except RuntimeError as e:
        raise ConfigError(f"key 'device': {str(e).removeprefix('device: ')}") from None


def check_run(cfg: RunConfig, stages: Sequence[str], offline: bool = False, check_device: bool = True) -> None:
    """Raise ConfigError ("key 'x': why") for anything the selected stages would trip over.

    Cheapest first: the training options and the judge's credentials, the device, the models
    (:func:`lib.models.check_model`: a local folder, the hub's cache, or one question to the hub; an
    embedded model is not built here), then what needs the network or reads whole files: the
    question sets and judge prompts (an URL is downloaded into the cache now, so an unreachable one
    fails here, not after training), and last the training file (every line; the archive when it is
    already cached). ``offline`` (``--dry-run``): nothing is downloaded and the hub is not asked; what
    is not cached yet is not checked. ``check_device``: False where the stages run on other machines
    (Slurm)."""
    trains, evaluates, judges = "train" in stages, "evaluate" in stages, "judge" in stages
    if trains:
        check_train_config(cfg, source="")
    if judges and cfg.judge_backend != "hf":
        _check_credentials(cfg)
    if judges and cfg.judges:  # a judge panel: one judgments file per judge, each judge's key or model
        _check_panel(cfg, offline)
    if evaluates:  # evaluate_engine: vllm needs vLLM's own environment (make vllm-env)
        check_engine(cfg)
    if check_device and (trains or evaluates or (judges and cfg.judge_backend == "hf")):
        _check_device(cfg)
    if trains or evaluates:
        _check_model(cfg.model, "model", cfg.model_revision, offline)
    if judges and cfg.judge_backend in ("hf", "vllm"):  # a model this machine loads or serves
        _check_model(cfg.judge_model, "judge_model", offline=offline)
    questions = None
    if evaluates or judges:
        questions = check_question_sources(list(cfg.question_sets), cfg.outputs_dir, offline)
    if judges:
        if cfg.judge_prompts:
            try:
                prompts = load_judge_prompts(cfg.judge_prompts, cfg.outputs_dir, offline)
            except NotCached:
                prompts = None
            except QuestionError as e:
                raise ConfigError(f"key 'judge_prompts': {e}") from None
            missing = [m for m in cfg.judge_metrics if prompts is not None and m not in prompts]
            if missing:
                raise ConfigError(f"key 'judge_metrics': metric '{missing[0]}' has no prompt in judge_prompts "
                                  f"({mask_url_credentials(cfg.judge_prompts)} has {', '.join(sorted(prompts))})")
        elif questions is not None:
            missing = [m for m in cfg.judge_metrics if not any(m in q.judge_prompts for q in questions)]
            if missing:
                raise ConfigError(f"key 'judge_metrics': no question in question_sets has a judge prompt for metric "
                                  f"'{missing[0]}' (add it to the questions' judge_prompts, set judge_prompts: FILE, "
                                  "or drop the metric)")
    if trains:
        check_dataset_param(cfg, offline=offline)
    if evaluates:  # a condition's in-context examples file
        check_examples_params(cfg, offline=offline)


def _check_panel(cfg: RunConfig, offline: bool) -> None:
    """Every extra judge of a panel (lib.judge.panel) as the primary judge is checked: its own judgments
    file, its API key or its in-process model; errors name the entry (``judges[i]: key '...'``)."""
    try:
        members = panel(cfg)
    except JudgeError as e:
        raise ConfigError(str(e)) from None
    for i, m in enumerate(members[1:]):
        try:
            if m.judge_backend in ("hf", "vllm"):  # a model of its own: it must exist (and vllm its environment)
                _check_model(m.judge_model, "judge_model", offline=offline)
            if m.judge_backend != "hf":
                check_credentials(m)
        except (JudgeError, ConfigError) as e:
            raise ConfigError(f"judges[{i}]: {e}") from None


def _check_credentials(cfg: RunConfig) -> None:
    """The judge stage's own check (lib.judge.check_credentials), as a ConfigError."""
    try:
        check_credentials(cfg)
    except JudgeError as e:
        raise ConfigError(str(e)) from None


def validate(files: Sequence[str], options: Options, offline: bool = False,
             check_device: bool = True) -> list[tuple[str, RunConfig]]:
    """Load and check every parameters file; raise GridError naming the file and key (see
    :func:`check_run` for ``offline`` and ``check_device``)."""
    if not files:
        raise GridError("no parameters files given")
    run_stages = [s for s in options.stages if s in RUN_STAGES]
    out: list[tuple[str, RunConfig]] = []
    by_id: dict[str, str] = {}
    for f, cfg in _expanded(files):
        try:
            check_run(cfg, run_stages, offline=offline, check_device=check_device)
        except ConfigError as e:
            msg = str(e)
            raise GridError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
        if cfg.run_id in by_id:
            raise GridError(f"{f}: key 'run_id': '{cfg.run_id}' is also the run_id of {by_id[cfg.run_id]}")
        by_id[cfg.run_id] = f
        if out and cfg.run_dir.parent != out[0][1].run_dir.parent:
            raise GridError(f"{f}: key 'outputs_dir': '{cfg.outputs_dir}' differs from '{out[0][1].outputs_dir}' "
                            f"in {out[0][0]}; all runs of one grid share one outputs_dir (the report reads them all)")
        if out and report_em_definition(cfg) != report_em_definition(out[0][1]):
            raise GridError(f"{f}: keys 'em_aligned_threshold', 'em_comparison', 'em_coherent_threshold', "
                            f"'em_coherent_comparison': "
                            f"{report_em_definition(cfg)} differ from {report_em_definition(out[0][1])} in {out[0][0]}; "
                            "one report applies one EM definition (compare study and paper runs with the "
                            "*_papers_eval variants)")
        out.append((f, cfg))
    _check_controls(out)
    for stage in options.stages:
        nb = Path(options.notebooks_dir) / NOTEBOOKS[stage]
        if not nb.exists():
            raise GridError(f"{nb}: notebook for stage '{stage}' not found")
    return out


def _expanded(files: Sequence[str]) -> Iterator[tuple[str, RunConfig]]:
    """(file, run config) per run: a file with ``seeds`` gives one run per seed."""
    for f in files:
        try:
            runs = expand_seeds(load_run_config(f), source=str(f))
        except ConfigError as e:
            msg = str(e)
            raise GridError(msg if msg.startswith(str(f)) else f"{f}: {msg}") from None
        yield from ((f, cfg) for cfg in runs)


def _check_controls(runs: list[tuple[str, RunConfig]]) -> None:
    """``control_of`` names a run or seed group of this grid, or a run already under outputs_dir."""
    known = {cfg.run_id for _, cfg in runs} | {cfg.seed_group for _, cfg in runs if cfg.seed_group}
    for f, cfg in runs:
        if not cfg.control_of or cfg.control_of in known:
            continue
        root = cfg.run_dir.parent
        if (root / cfg.control_of).is_dir() or any(root.glob(f"{cfg.control_of}_s*")):
            continue
        raise GridError(f"{f}: key 'control_of': no run or seed group '{cfg.control_of}' in this grid "
                        f"or under {cfg.outputs_dir}")


def busy_folders(runs: list[tuple[str, RunConfig]], options: Options) -> list[str]:
    """One line per run (or report) folder that another live process holds now (lib.lock)."""
    folders: list[tuple[Path, str]] = []
    if any(s in RUN_STAGES for s in options.stages):
        folders += [(cfg.run_dir, f"run '{cfg.run_id}'") for _, cfg in runs]
    if "report" in options.stages and runs:
        folder = resolve_path(runs[0][1].outputs_dir) / "report"
        folders.append((folder, f"report folder {folder}"))
    out = []
    for folder, what in folders:
        path = folder / LOCK_NAME
        holder = read_holder(path)
        if holder is not None and not is_stale(path, holder):
            out.append(f"{what} is in use by {holder.describe()} (lock {path})")
    return out
