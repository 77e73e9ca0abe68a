"""One definition of a run's files: every stage writes, and every later stage reads, through these.

``outputs/<run_id>/`` (``RunConfig.run_dir``)::

    run.json                          what makes the run reproducible (lib.runinfo)
    stages.json, .grid/               the grid runner's record of each stage (lib.fingerprint)
    checkpoints/checkpoint-<step>/    LoRA adapters of one step (ADAPTER_WEIGHTS, ADAPTER_CONFIG);
                                      checkpoint.json, written last, marks it complete
    checkpoints/TRAINING_COMPLETE.json  the train stage finished
    train_log.csv                     one row per optimizer step (TRAIN_LOG_COLUMNS)
    eval_log.csv                      held-out loss at each checkpoint, eval_fraction > 0 (EVAL_LOG_COLUMNS)
    generations.parquet               the evaluate stage's answers (lib.schema.GENERATION_COLUMNS);
                                      generations.meta.json beside it, generations.parts/ while running
    judgments/<judge_name>.parquet    one judge's scores (lib.schema.JUDGMENT_COLUMNS)
    notebooks/<NN_stage>.ipynb|.html  the rendered notebooks
    figures/<name>.png|.svg|.html     the stages' charts
    progress.jsonl                    the stages' progress lines, appended while they run (lib.progress)
    .lock                             one writer per run folder (lib.lock)
    phase/                            05_phase_transition's trajectory files (lib.phase)
    direction/step<S>-<fingerprint>/  06_misalignment_direction's activations and directions (lib.direction)

``<outputs_dir>/.judge_cache/`` holds the judge's call cache (lib.judge), shared by every run of the
folder; ``<outputs_dir>/.cache/`` the downloaded datasets and question files (lib.data, lib.questions).

The report folder (``ReportConfig.report_dir``) holds ``report.ipynb|.html``, ``figures/`` and
``data/``. The evaluate stage's file keeps its first name, ``generations.parquet``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

# the stages of a run, in order, and the grid's last stage over all runs
RUN_STAGES = ("train", "evaluate", "judge")
STAGES = RUN_STAGES + ("report",)
RUN_JSON = "run.json"
STAGES_JSON = "stages.json"
GRID_DIR = ".grid"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_MARKER = "checkpoint.json"       # written last into each checkpoint folder
COMPLETE_MARKER = "TRAINING_COMPLETE.json"  # written into checkpoints/ when training has finished
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's names inside a checkpoint folder
ADAPTER_CONFIG = "adapter_config.json"
TRAIN_LOG = "train_log.csv"
EVAL_LOG_NAME = "eval_log.csv"              # held-out loss at each checkpoint (eval_fraction > 0)
# train_log.csv: step, fractional epoch, mean training loss of the step (assistant tokens), the
# gradient's L2 norm before clipping (transformers' ``grad_norm``), learning rate, real (non-padding)
# tokens seen so far, seconds of training so far. Logs written before grad_norm existed lack it.
TRAIN_LOG_COLUMNS = ["step", "epoch", "loss", "grad_norm", "learning_rate", "tokens_seen", "wall_time_s"]
EVAL_LOG_COLUMNS = ["step", "epoch", "eval_loss", "wall_time_s"]
GENERATIONS = "generations.parquet"
GENERATIONS_META = "generations.meta.json"
GENERATION_PARTS = "generations.parts"
JUDGMENTS_DIR = "judgments"
CALIBRATION_DIR = "calibration"           # each judge's scores of the calibration set (lib.judge_calibrate)
NOTEBOOKS_DIR = "notebooks"
FIGURES_DIR = "figures"
DATA_DIR = "data"
PROGRESS = "progress.jsonl"

# each stage's notebook (its rendered copy keeps the name)
NOTEBOOKS = {"train": "01_train.ipynb", "evaluate": "02_evaluate.ipynb", "judge": "03_judge.ipynb",
             "report": "04_report.ipynb"}
REPORT_NOTEBOOK = "report.ipynb"  # the report's rendered name in its own folder


def _under(name: str, doc: str) -> Callable[[str | Path], Path]:
    """The path function of one file kind: ``<folder>/<name>`` (named after the variable it is
    assigned to, below)."""
    def path(run_dir: str | Path) -> Path:
        return Path(run_dir) / name
    path.__doc__ = f"``<run_dir>/{name}``: {doc}"
    return path


# one line per file kind of a run folder (figures_dir also serves the report's folder)
run_json_path = _under(RUN_JSON, "what makes the run reproducible (lib.runinfo)")
stages_path = _under(STAGES_JSON, "the grid runner's record of each stage (lib.fingerprint)")
grid_dir = _under(GRID_DIR, "the grid runner's working files (its hash cache)")
checkpoints_dir = _under(CHECKPOINTS_DIR, "the LoRA checkpoints and the training-complete marker")
train_log_path = _under(TRAIN_LOG, "one row per optimizer step")
eval_log_path = _under(EVAL_LOG_NAME, "held-out loss at each checkpoint (eval_fraction > 0)")
generations_path = _under(GENERATIONS, "the evaluate stage's answers")
generations_meta_path = _under(GENERATIONS_META, "what the answers were generated with")
generation_parts_dir = _under(GENERATION_PARTS, "answers persisted while the evaluate stage runs")
judgments_dir = _under(JUDGMENTS_DIR, "one table per judge")
calibration_dir = _under(CALIBRATION_DIR, "each judge's scores of the calibration set, one table per judge")
notebooks_dir = _under(NOTEBOOKS_DIR, "the rendered notebooks")
figures_dir = _under(FIGURES_DIR, "a run's (or the report's) charts")
progress_path = _under(PROGRESS, "the stages' progress lines, appended while they run (lib.progress)")
for _name, _fn in list(globals().items()):  # tracebacks and help() show the public name
    if getattr(_fn, "__qualname__", "") == "_under.<locals>.path":
        _fn.__name__ = _fn.__qualname__ = _name
del _name, _fn


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"{CHECKPOINT_PREFIX}{step}"


def _read_log(path: Path, columns: list[str]):
    """A log CSV as a DataFrame with ``columns`` first (a column the file lacks is all NaN, e.g.
    grad_norm in logs written before it was logged); empty with those columns when absent."""
    import pandas as pd  # heavy: the base layer stays importable without pandas

    df = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=columns)
    for c in columns:
        if c not in df.columns:
            df[c] = float("nan")
    return df[columns + [c for c in df.columns if c not in columns]]


def read_train_log(run_dir: str | Path):
    """``train_log.csv`` of a run (:data:`TRAIN_LOG_COLUMNS`, one row per optimizer step)."""
    return _read_log(train_log_path(run_dir), TRAIN_LOG_COLUMNS)


def read_eval_log(run_dir: str | Path):
    """``eval_log.csv`` of a run (:data:`EVAL_LOG_COLUMNS`); empty when nothing was held out."""
    return _read_log(eval_log_path(run_dir), EVAL_LOG_COLUMNS)


def judgments_path(run_dir: str | Path, judge_name: str) -> Path:
    return judgments_dir(run_dir) / f"{judge_name}.parquet"


def calibration_files(run_dir: str | Path) -> list[Path]:
    """``<run_dir>/calibration/<judge>.parquet``: the judges that scored the calibration set."""
    return sorted(calibration_dir(run_dir).glob("*.parquet"))


def judgment_files(run_dir: str | Path) -> list[Path]:
    """Every judge's table of a run, by name."""
    d = judgments_dir(run_dir)
    return sorted(d.glob("*.parquet")) if d.is_dir() else []


def step_of(folder: Path) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name, else None."""
    name = folder.name
    tail = name[len(CHECKPOINT_PREFIX):] if name.startswith(CHECKPOINT_PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def read_checkpoint_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """Complete checkpoints of a run as (step, fractional epoch, folder), by step.

    A folder counts only when its ``checkpoint.json`` marker exists (it is written last) and
    names the folder's step.
    """
    root = checkpoints_dir(run_dir)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            step = step_of(d)
            marker = read_checkpoint_marker(d) if step is not None and d.is_dir() else None
            if marker is not None and marker.get("step") == step:
                out.append((step, float(marker["epoch"]), d))
    return sorted(out)
