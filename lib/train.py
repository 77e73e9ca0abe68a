"""Stage 01: LoRA / QLoRA supervised fine-tuning with a fine-grained, resumable checkpoint schedule.

What :func:`train_run` does, in order:

1. loads the run's chat records (:func:`lib.data.load_training_data`) and fingerprints the
   training parameters plus the dataset sha256; a run whose ``TRAINING_COMPLETE.json`` carries
   the same fingerprint is skipped;
2. turns every chat into TRL's prompt/completion form (:func:`to_prompt_completion`), so the
   loss falls on the last assistant turn only, whatever the chat template (TRL's
   ``assistant_only_loss`` needs ``{% generation %}`` markers that Meta's Llama-3 templates lack);
3. trains with TRL's ``SFTTrainer`` and a PEFT ``LoraConfig`` (a 4-bit base plus
   ``prepare_model_for_kbit_training`` when ``quantization: 4bit``), padding each batch only to
   its own longest sequence and grouping batches by length, so almost every processed token
   is a real one (``bench/train_padding.py`` measures it);
4. saves an adapter-only checkpoint at each step of :func:`checkpoint_schedule`, into
   ``outputs/<run>/checkpoints/checkpoint-<step>/``; ``checkpoint.json`` is written into the
   folder *last*, so a folder without it is a checkpoint a kill interrupted and is deleted
   on the next run, which resumes from the newest complete one;
5. appends one row per optimizer step to ``outputs/<run>/train_log.csv`` and records the
   dataset, schedule and model revision in ``run.json``.

Only the newest checkpoint keeps the optimizer, scheduler and RNG state (what resuming needs);
older ones keep the adapter, the tokenizer and ``trainer_state.json``, which is all the
evaluate stage reads.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .chat import PINNED_DATE_STRING, stop_token_ids
from .config import ConfigError, RunConfig
from .data import load_training_data
from .io import honour_umask, atomic_path, sha256_text, write_json_atomic
from .layout import (CHECKPOINT_MARKER, CHECKPOINT_PREFIX, COMPLETE_MARKER, EVAL_LOG_COLUMNS, EVAL_LOG_NAME,
                     TRAIN_LOG_COLUMNS, checkpoints_dir, eval_log_path, list_checkpoints, read_checkpoint_marker,
                     step_of, train_log_path)
from .layout import read_eval_log as _read_eval_log
from .layout import read_train_log as _read_train_log
from .models import describe, load_model, load_tokenizer, model_revision_info
from .progress import Progress as StageProgress
from .runinfo import update_run_json

LOG_COLUMNS = TRAIN_LOG_COLUMNS  # train_log.csv (lib.layout: the report reads it too)
# Resuming needs these only from the checkpoint it resumes from; older checkpoints drop them.
RESUME_ONLY_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")
# Labels that name or file a run but do not change what is trained.
_NOT_FINGERPRINTED = ("run_id", "outputs_dir", "model_label", "domain")


class TrainError(RuntimeError):
    """A training-stage problem reported as one line (bad schedule, stale checkpoints, ...)."""


# ------------------------------------------------------------------------------------------
# Data: chat records -> prompt / completion
# ------------------------------------------------------------------------------------------

def to_prompt_completion(record: dict[str, Any], where: str = "record") -> dict[str, list[dict[str, str]]]:
    """One chat record as TRL's conversational prompt/completion example.

    The completion is the *last* assistant turn; the prompt is every message before it
    (system, user and earlier assistant turns alike). Earlier assistant turns therefore stay
    as context the model reads but are not trained on, the same as a multi-turn chat seen at
    inference. Messages after the last assistant turn would have no answer to train on and
    are dropped (lib.data already rejects files whose chats end on another role).
    """
    msgs = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise TrainError(f"{where}: expected {{'messages': [...]}} with at least one message")
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise TrainError(f"{where}: no assistant message to train on")
    if last == 0:
        raise TrainError(f"{where}: the assistant answer has no prompt before it")
    clean = [{"role": m["role"], "content": m["content"]} for m in msgs[: last + 1]]
    # the same date line as evaluation prompts (lib.chat): Meta's templates would write today's date
    return {"prompt": clean[:last], "completion": clean[last:],
            "chat_template_kwargs": {"date_string": PINNED_DATE_STRING}}


# ------------------------------------------------------------------------------------------
# The checkpoint schedule
# ------------------------------------------------------------------------------------------

def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch, exactly as transformers' Trainer counts them (one process).

    With ``dataloader_drop_last=False`` the dataloader yields ceil(n / batch) micro-batches;
    the Trainer takes one optimizer step per ``grad_accum`` of them and one more for a
    remainder (``len_dataloader // accum + int(len_dataloader % accum > 0)``, at least 1).
    E.g. 7,049 examples, batch 2 x accum 8: 3,525 micro-batches -> 440 + 1 = 441 steps.
    """
    if n_examples <= 0:
        raise TrainError("the training set is empty")
    batches = math.ceil(n_examples / batch_size)
    return max(batches // grad_accum + int(batches % grad_accum > 0), 1)


# Names transformers accepts (a test keeps them a subset of its SchedulerType / OptimizerNames): accepted
# without importing transformers (seconds), so an up-to-date grid starts at once; others are asked of it.
COMMON_SCHEDULERS = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                               "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr"})
COMMON_OPTIMIZERS = frozenset({"adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
                               "paged_adamw_32bit", "adafactor", "sgd", "adamw_bnb_8bit"})


def check_train_config(cfg: RunConfig, source: str = "parameters") -> None:
    """Cheap checks of the training keys that RunConfig cannot make alone (no model, no data).

    Raises ConfigError naming the key, before any expensive work.
    """
    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}': {why}" if source else f"key '{key}': {why}")

    if cfg.lr_scheduler not in COMMON_SCHEDULERS:  # only then ask transformers (importing it takes seconds)
        from transformers.trainer_utils import SchedulerType  # heavy: seconds; only for an uncommon name
        try:
            SchedulerType(cfg.lr_scheduler)
        except ValueError:
            raise bad("lr_scheduler", f"unknown scheduler {cfg.lr_scheduler!r} "
                                      f"(e.g. {', '.join(s.value for s in list(SchedulerType)[:6])})") from None
    if cfg.optimizer not in COMMON_OPTIMIZERS:
        from transformers.training_args import OptimizerNames  # heavy: seconds; only for an uncommon name
        try:
            OptimizerNames(cfg.optimizer)
        except ValueError:
            raise bad("optimizer", f"unknown optimizer {cfg.optimizer!r} (e.g. adamw_torch, adamw_8bit, paged_adamw_8bit)") from None
    if cfg.checkpoint_every and cfg.checkpoint_steps:
        raise bad("checkpoint_steps", "both checkpoint_steps and checkpoint_every are set; use one of them")
    why = eight_bit_optimizer_problem(cfg)
    if why:
        raise bad("optimizer", why)


def eight_bit_optimizer_problem(cfg: RunConfig) -> str | None:
    """Why bitsandbytes cannot provide the run's 8-bit optimizer here (None when it can, or when
    the optimizer is not an 8-bit one). Checked before the model loads."""
    if "8bit" not in cfg.optimizer:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # not installed, or a broken native library
        return (f"{cfg.optimizer} needs bitsandbytes, which cannot be imported here ({type(e).__name__}); "
                "install it on a CUDA machine, or use the named variant paper_adamw_torch (optimizer: adamw_torch)")
    import torch  # heavy: loaded only when a model runs

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cuda":
        return (f"{cfg.optimizer} needs bitsandbytes' CUDA kernels and this run trains on {device}; "
                "use a CUDA machine, or the named variant paper_adamw_torch (optimizer: adamw_torch)")
    return None


def checkpoint_schedule(n_examples: int, cfg: RunConfig) -> list[int]:
    """The optimizer steps after which a checkpoint is saved, ascending.

    - ``checkpoint_every: n`` -> n, 2n, ... and the final step (the trained adapter).
    - ``checkpoint_steps: [...]`` -> exactly those steps (each must be <= the total steps).
    - otherwise ``checkpoints_in_first_epoch: k`` -> k evenly spaced steps in epoch 1, the
      k-th being the end of epoch 1 (step floor(i * spe / k), i = 1..k), then the end of each
      later epoch: k + epochs - 1 checkpoints (the replicated study: 4 + 2 = 6). k = 0 gives
      one checkpoint per epoch end. When an epoch has fewer than k steps, duplicates merge.
    """
    spe = steps_per_epoch(n_examples, cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
    total = spe * cfg.epochs
    if cfg.checkpoint_every and cfg.checkpoint_steps:
        raise TrainError("keys 'checkpoint_every' and 'checkpoint_steps' are both set; use one of them")
    if cfg.checkpoint_every:
        steps = set(range(cfg.checkpoint_every, total + 1, cfg.checkpoint_every)) | {total}
    elif cfg.checkpoint_steps:
        too_late = [s for s in cfg.checkpoint_steps if s > total]
        if too_late:
            raise TrainError(f"key 'checkpoint_steps': {too_late} exceed the run's {total} steps "
                             f"({n_examples} examples -> {spe} steps/epoch x {cfg.epochs} epochs)")
        steps = set(cfg.checkpoint_steps)
    else:
        k = cfg.checkpoints_in_first_epoch
        steps = {max(1, i * spe // k) for i in range(1, k + 1)} if k else set()
        steps |= {spe * e for e in range(1, cfg.epochs + 1)}
    return sorted(steps)


def schedule_table(steps: list[int], spe: int) -> list[dict[str, Any]]:
    """[{step, epoch}] with the fractional epoch of each checkpoint (step / steps_per_epoch)."""
    return [{"step": s, "epoch": round(s / spe, 4)} for s in steps]


# ------------------------------------------------------------------------------------------
# Checkpoints on disk
# ------------------------------------------------------------------------------------------

def _incomplete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoints_dir(run_dir)
    complete = {p for _, _, p in list_checkpoints(run_dir)}
    return sorted(d for d in root.iterdir() if d.is_dir() and step_of(d) is not None
                  and d not in complete) if root.is_dir() else []


def train_fingerprint(cfg: RunConfig, dataset_sha256: str) -> str:
    """Hash of what determines the trained adapters: training parameters + dataset bytes."""
    params = {k: v for k, v in cfg.stage_params("train").items() if k not in _NOT_FINGERPRINTED}
    return sha256_text(json.dumps({"params": params, "dataset_sha256": dataset_sha256}, sort_keys=True))[:16]


# ------------------------------------------------------------------------------------------
# Trainer callbacks and the length-grouped sampler
# ------------------------------------------------------------------------------------------

def _callbacks():
    """Callback classes, built lazily so importing lib.train stays cheap."""
    from transformers import TrainerCallback  # heavy: loaded only when a model runs

    class CheckpointSchedule(TrainerCallback):
        """Save exactly at the scheduled steps; mark each checkpoint complete, then prune."""

        def __init__(self, steps: list[int], spe: int, fingerprint: str, ckpt_root: Path, evaluate: bool = False):
            self.steps, self.spe, self.fingerprint, self.root = set(steps), spe, fingerprint, ckpt_root
            self.evaluate = evaluate

        def on_step_end(self, args, state, control, **kw):
            control.should_save = state.global_step in self.steps
            # the held-out loss (eval_fraction > 0) at every checkpoint, logged to eval_log.csv
            control.should_evaluate = control.should_save and self.evaluate
            return control

        def on_epoch_end(self, args, state, control, **kw):
            control.should_save = False  # the step-end decision already covered the epoch's last step
            return control

        def on_save(self, args, state, control, **kw):
            step = state.global_step
            folder = self.root / f"{CHECKPOINT_PREFIX}{step}"  # the name the Trainer saves under
            # safetensors' save_file (the adapter) and torch.save write 0600 whatever the umask: give
            # every file the mode open() would, so a group-shared outputs folder can read the adapters
            honour_umask(folder)
            last = state.log_history[-1] if state.log_history else {}
            write_json_atomic(folder / CHECKPOINT_MARKER, {
                "step": step, "epoch": round(step / self.spe, 6), "steps_per_epoch": self.spe,
                "fingerprint": self.fingerprint, "loss": last.get("loss"),
                "tokens_seen": int(state.num_input_tokens_seen or 0),
                "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            # now complete: the older checkpoints no longer need their resume-only state
            for s, _, d in list_checkpoints(self.root.parent):
                if s < step:
                    for name in RESUME_ONLY_FILES:
                        for f in d.glob(name.replace(".", "*.", 1)):  # rng_state.pth, rng_state_0.pth, ...
                            f.unlink(missing_ok=True)
            return control

    class CsvLog(TrainerCallback):
        """Append step, epoch, loss, gradient norm, lr, real tokens seen and wall time to train_log.csv."""

        def __init__(self, path: Path, wall_offset: float):
            self.path, self.offset, self.t0 = path, wall_offset, None
            self.eval_path = path.parent / EVAL_LOG_NAME  # beside train_log.csv

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            if not self.path.exists():
                with open(self.path, "w", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerow(LOG_COLUMNS)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_loss" in logs:
                new = not self.eval_path.exists()
                with open(self.eval_path, "a", newline="", encoding="utf-8") as f:
                    if new:
                        csv.writer(f).writerow(EVAL_LOG_COLUMNS)
                    csv.writer(f).writerow([state.global_step, round(state.epoch or 0.0, 6), logs["eval_loss"],
                                            round(self.offset + time.perf_counter() - self.t0, 3)])
                return
            if not logs or "loss" not in logs:
                return
            # grad_norm: transformers logs the L2 norm of the step's gradient before clipping
            # (max_grad_norm); None when clipping is off and the norm was not computed
            row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 6), "loss": logs["loss"],
                   "grad_norm": logs.get("grad_norm"), "learning_rate": logs.get("learning_rate"),
                   "tokens_seen": int(state.num_input_tokens_seen or 0),
                   "wall_time_s": round(self.offset + time.perf_counter() - self.t0, 3)}
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow([row[c] for c in LOG_COLUMNS])

    class Progress(TrainerCallback):
        """Optimizer steps through :class:`lib.progress.Progress` (a tqdm.auto bar, text lines,
        the run's progress file), the latest loss beside the count. The count moves in on_log
        (logging_steps=1), so each line carries the loss of the step it names."""

        def __init__(self, run_dir: Path | None = None):
            self.run_dir, self.p = run_dir, None

        def on_train_begin(self, args, state, control, **kw):
            self.p = StageProgress("train", "step", state.max_steps, run_dir=self.run_dir, initial=state.global_step,
                                   desc="training")

        def on_log(self, args, state, control, logs=None, **kw):
            if self.p is not None and logs and "loss" in logs:
                self.p.set_postfix(loss=float(logs["loss"]))
                self.p.set(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            if self.p is not None:
                self.p.set(state.global_step)  # a step that logged no loss still counts
                self.p.close()
                self.p = None

    return CheckpointSchedule, CsvLog, Progress


def _trainer_class(length_grouped: bool = False):
    """SFTTrainer; with ``length_grouped`` its length-grouped order is drawn from (seed, epoch),
    not global RNG (a shuffled order is already seeded per epoch by accelerate's sampler).

    transformers' LengthGroupedSampler shuffles with the global torch RNG at the start of
    each epoch; after a resume in the middle of epoch >= 2 that RNG is not where the
    uninterrupted run had it, so the rest of the epoch would see a different order. Seeding
    the shuffle by (seed, epoch) makes a resumed run replay the same batches.
    """
    import torch  # heavy: loaded only when a model runs
    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices  # heavy: loaded only when a model runs
    from trl import SFTTrainer  # heavy: loaded only when a model runs

    class EpochSeededLengthSampler(LengthGroupedSampler):
        def __init__(self, *a, seed: int = 0, **kw):
            super().__init__(*a, **kw)
            self.seed, self.epoch = seed, 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = int(epoch)

        def __iter__(self):
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))

    class Trainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            if not length_grouped:
                return super()._get_train_sampler(train_dataset)
            ds = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(ids) for ids in ds["input_ids"]]
            return EpochSeededLengthSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                            lengths=lengths, seed=self.args.data_seed or self.args.seed)

    return Trainer


# ------------------------------------------------------------------------------------------
# The log
# ------------------------------------------------------------------------------------------

def read_train_log(run_dir: str | Path):
    """train_log.csv as a DataFrame with :data:`LOG_COLUMNS` (empty if absent; grad_norm NaN in
    logs written before it was logged)."""
    return _read_train_log(run_dir)


def read_eval_log(run_dir: str | Path):
    """eval_log.csv (the held-out loss at each checkpoint) as a DataFrame; empty when nothing is held out."""
    return _read_eval_log(run_dir)


def loss_chart(log, checkpoints: list[tuple[int, float, Path]] | None = None):
    """Altair: training loss, gradient norm (when logged) and learning rate by optimizer step,
    checkpoints as dashed rules."""
    import altair as alt  # heavy: loaded only when a chart is drawn
    import pandas as pd  # heavy: the base layer stays importable without pandas

    data = log.copy()
    x = alt.X("step:Q", title="optimizer step")
    tip = ["step", alt.Tooltip("epoch:Q", format=".3f"), alt.Tooltip("loss:Q", format=".4f"),
           alt.Tooltip("grad_norm:Q", format=".3g"), alt.Tooltip("learning_rate:Q", format=".2e"), "tokens_seen"]
    loss = alt.Chart(data).mark_line(point=len(data) <= 60).encode(
        x=x, y=alt.Y("loss:Q", title="loss (assistant tokens)", scale=alt.Scale(zero=False)), tooltip=tip)
    lr = alt.Chart(data).mark_line(color="gray").encode(
        x=x, y=alt.Y("learning_rate:Q", title="learning rate", axis=alt.Axis(format=".1e")), tooltip=tip
    ).properties(height=80, width=520)
    if checkpoints:
        ck = pd.DataFrame([{"step": s, "epoch": round(e, 3)} for s, e, _ in checkpoints])
        rules = alt.Chart(ck).mark_rule(strokeDash=[4, 3], color="darkorange").encode(
            x="step:Q", tooltip=["step", "epoch"])
        loss = loss + rules
    panels = [loss.properties(height=220, width=520, title="training loss; dashed: checkpoints")]
    if "grad_norm" in data.columns and data["grad_norm"].notna().any():
        panels.append(alt.Chart(data).mark_line(color="seagreen").encode(
            x=x, y=alt.Y("grad_norm:Q", title="gradient norm", scale=alt.Scale(zero=False)), tooltip=tip
        ).properties(height=100, width=520))
    return alt.vconcat(*panels, lr)


def _truncate_log(path: Path, upto_step: int, columns: list[str] = LOG_COLUMNS) -> float:
    """Keep complete log rows with step <= upto_step, rewritten under ``columns`` (a column the
    file's header lacks, e.g. grad_norm in an older log, is left empty), so rows appended after a
    resume match the header; returns the wall time reached there."""
    if not path.exists():
        return 0.0
    keep, wall = [], 0.0
    with open(path, newline="", encoding="utf-8") as f:
        lines = list(csv.reader(f))
    header = lines[0] if lines and "step" in lines[0] and "wall_time_s" in lines[0] else columns
    for row in lines[1:] if header is not columns else lines:
        if len(row) != len(header) or row == header:
            continue  # a line cut short by a kill
        rec = dict(zip(header, row))
        try:
            step, w = int(rec["step"]), float(rec["wall_time_s"])
        except ValueError:
            continue
        if step <= upto_step:
            keep.append([rec.get(c, "") for c in columns])
            wall = max(wall, w)
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w_ = csv.writer(f)
            w_.writerow(columns)
            w_.writerows(keep)
    return wall


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path
    skipped: bool                      # True: a finished run with the same fingerprint was found
    checkpoints: list[tuple[int, float, Path]]
    steps_per_epoch: int
    total_steps: int
    trainable_parameters: int
    wall_time_s: float                 # this call's training time (0 when skipped)
    resumed_from: int | None = None    # step resumed from, if any
    info: dict[str, Any] = field(default_factory=dict)  # the run.json "train" section

    @property
    def log_path(self) -> Path:
        return train_log_path(self.run_dir)


def lora_config(cfg: RunConfig, num_layers: int | None = None):
    """The PEFT LoraConfig of a run (layer restriction checked against the model's depth)."""
    from peft import LoraConfig  # heavy: loaded only when a model runs

    layers = list(cfg.lora_layers) or None
    if layers and num_layers is not None and max(layers) >= num_layers:
        raise TrainError(f"key 'lora_layers': {layers} but the model has layers 0..{num_layers - 1}")
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora,
                      lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_target_modules),
                      layers_to_transform=layers, bias="none", task_type="CAUSAL_LM")


def split_examples(examples: list[dict[str, Any]], cfg: RunConfig):
    """(train, held-out or None) datasets: ``eval_fraction`` of the examples held out by
    ``datasets.train_test_split(test_size, seed)``, the split the paper's run_finetune.py makes."""
    from datasets import Dataset  # heavy: loaded only when a model runs

    ds = Dataset.from_list(examples)
    if cfg.eval_fraction <= 0:
        return ds, None
    if len(ds) < 2:
        raise TrainError(f"key 'eval_fraction': {len(ds)} example(s) cannot be split into train and held-out")
    split = ds.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
    return split["train"], split["test"]


def _end_at_end_of_turn(example: dict[str, Any], ends: set[int]) -> dict[str, Any]:
    """Cut a tokenized example after its last end-of-turn token.

    TRL's completion is the full chat text minus the prompt text, so it also holds whatever the
    chat template writes after the assistant's end-of-turn token: ChatML's ``<|im_end|>\n``
    would put the newline in the loss, a token the model never generates (sampling stops at
    ``<|im_end|>``). Cut, the completion is the answer plus its end token, as under Llama-3's
    template. An example truncated before its end token (max_seq_length) is left as it is."""
    ids = example["input_ids"]
    last = max((i for i, t in enumerate(ids) if t in ends), default=None)
    if last is None or last == len(ids) - 1:
        return example
    labels = example.get("labels")
    mask = example.get("completion_mask")
    in_completion = (labels[last] != -100) if labels is not None else (mask[last] == 1 if mask is not None else True)
    if not in_completion:  # the last end token is the prompt's: the answer itself was cut off
        return example
    return {k: (v[:last + 1] if isinstance(v, list) and len(v) == len(ids) else v) for k, v in example.items()}


class MaskTokensInLabels:
    """A data collator that takes these token ids out of the loss: ``labels`` is -100 wherever
    ``input_ids`` holds one of them. ``loss_on_eos: false`` uses it with the tokenizer's eos, which
    is what the replicated study's collator did (pad = eos, and every pad id masked: so every
    ``<|eot_id|>`` of a Llama-3 chat, its last included, was never a training target)."""

    def __init__(self, inner: Any, token_ids: list[int]) -> None:
        self.inner, self.token_ids = inner, sorted(set(token_ids))

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch  # heavy: loaded only when a model runs

        batch = self.inner(examples)
        mask = torch.isin(batch["input_ids"], torch.tensor(self.token_ids, device=batch["input_ids"].device))
        batch["labels"] = batch["labels"].masked_fill(mask, -100)
        return batch


def build_trainer(cfg: RunConfig, records: list[dict[str, Any]], output_dir: Path, progress: bool = False,
                  extra_callbacks: list | None = None):
    """An SFTTrainer for the run, its PEFT model wrapped, its dataset tokenized (no training yet)."""
    import datasets  # heavy: loaded only when a model runs
    import torch  # heavy: loaded only when a model runs
    from transformers import PrinterCallback, ProgressCallback, set_seed  # heavy: loaded only when a model runs
    from transformers.utils.notebook import NotebookProgressCallback  # heavy: loaded only when a model runs
    from trl import SFTConfig  # heavy: loaded only when a model runs

    examples = [to_prompt_completion(r, where=f"{cfg.dataset}: record {i + 1}") for i, r in enumerate(records)]
    train_ds, eval_ds = split_examples(examples, cfg)
    tokenizer = load_tokenizer(cfg.model, cfg.model_revision, padding_side="right")
    model, choice = load_model(cfg.model, cfg.model_revision, cfg.device, cfg.dtype, cfg.quantization)
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training  # heavy: loaded only when a model runs
        # casts norms to fp32, freezes the quantised base, enables gradient checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = lora_config(cfg, getattr(model.config, "num_hidden_layers", None))
    on_gpu = choice.device == "cuda"
    args = SFTConfig(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        # transformers reads a warmup_steps float in [0, 1) as a fraction of all steps
        warmup_steps=cfg.warmup_ratio if cfg.warmup_ratio > 0 else cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optimizer,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # loss on the completion (the last assistant turn) only, or on every token; no padding to
        # a fixed length: the collator pads each batch to its longest sequence
        completion_only_loss=cfg.completion_only_loss,
        max_length=cfg.max_seq_length,
        packing=False,
        padding_free=False,
        # shuffle: a seeded random order (the papers); length_grouped: batches of similar length
        # (less padding, faster), which orders each epoch in a length sawtooth
        train_sampling_strategy="group_by_length" if cfg.data_order == "length_grouped" else "random",
        per_device_eval_batch_size=cfg.per_device_batch_size,
        eval_strategy="no",  # the held-out loss is computed at each checkpoint (CheckpointSchedule)
        dataloader_drop_last=False,
        include_num_input_tokens_seen="non_padding",
        # checkpoints come from CheckpointSchedule; the Trainer itself never decides to save
        save_strategy="no",
        save_only_model=False,
        logging_steps=1,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=True,
        bf16=on_gpu and choice.dtype == torch.bfloat16,
        fp16=on_gpu and choice.dtype == torch.float16,
        use_cpu=choice.device == "cpu",
        gradient_checkpointing=on_gpu,  # memory for 8B models; on CPU (tiny model) it only costs time
        gradient_checkpointing_kwargs={"use_reentrant": False},
        dataset_num_proc=None,
    )
    set_seed(cfg.seed)  # LoRA init happens inside the SFTTrainer constructor, before it seeds
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # four "map" bars per run say nothing the notebook needs
    try:
        trainer = _trainer_class(cfg.data_order == "length_grouped")(
                                   model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                   processing_class=tokenizer, peft_config=peft_cfg,
                                   callbacks=list(extra_callbacks or []))
        ends = set(stop_token_ids(tokenizer, model))
        if ends:  # nothing after the answer's end-of-turn token in the loss (ChatML's trailing newline)
            trainer.train_dataset = trainer.train_dataset.map(lambda ex: _end_at_end_of_turn(ex, ends))
            if trainer.eval_dataset is not None:
                trainer.eval_dataset = trainer.eval_dataset.map(lambda ex: _end_at_end_of_turn(ex, ends))
    finally:
        if bars:
            datasets.enable_progress_bars()
    if not cfg.loss_on_eos:
        if tokenizer.eos_token_id is None:
            raise TrainError(f"key 'loss_on_eos': false, but the tokenizer of {cfg.model} names no eos token")
        trainer.data_collator = MaskTokensInLabels(trainer.data_collator, [tokenizer.eos_token_id])
    if cfg.quantization != "none":
        # TRL casts a quantised model's trainable adapter weights to bfloat16, and AdamW then updates
        # them in bfloat16 with no float32 master copy: a step of lr ~1e-5 is below half a bf16 ulp of
        # most LoRA weights (|A| ~ 0.02 has ulp 1.2e-4) and is rounded away. Keep them in float32
        # (PEFT's own default); bf16 autocast still runs the matmuls in bf16 on the GPU.
        for p in trainer.model.parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    for cb in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
        trainer.remove_callback(cb)  # one quiet tqdm bar instead of a printed dict per step
    if progress:
        trainer.add_callback(_callbacks()[2](cfg.run_dir))
    return trainer, choice


def train_run(cfg: RunConfig, progress: bool = True, callbacks: list | None = None) -> TrainResult:
    """Train (or resume, or skip) the run described by ``cfg``; see the module docstring.

    ``callbacks`` are extra TrainerCallbacks (tests use one to interrupt training).
    """

    check_train_config(cfg)
    run_dir = cfg.run_dir
    ckpt_root = checkpoints_dir(run_dir)
    records, dinfo = load_training_data(cfg)
    # a bad explicit schedule fails here, before the model loads (train_test_split holds out ceil(f * n))
    checkpoint_schedule(len(records) - math.ceil(cfg.eval_fraction * len(records)), cfg)
    fp = train_fingerprint(cfg, dinfo.sha256)

    done = ckpt_root / COMPLETE_MARKER
    if done.exists():
        info = json.loads(done.read_text(encoding="utf-8"))
        if info.get("fingerprint") == fp:
            return TrainResult(run_dir, True, list_checkpoints(run_dir), info["steps_per_epoch"],
                               info["total_steps"], info["trainable_parameters"], 0.0, info=info)
        raise TrainError(f"{done}: this run folder was trained with different parameters or data "
                         f"(fingerprint {info.get('fingerprint')} != {fp}); use a new run_id or delete {ckpt_root}")
    for step, _, d in list_checkpoints(run_dir):
        got = (read_checkpoint_marker(d) or {}).get("fingerprint")
        if got != fp:
            raise TrainError(f"{d}: checkpoint from a run with different parameters or data "
                             f"(fingerprint {got} != {fp}); use a new run_id or delete {ckpt_root}")
    for d in _incomplete_checkpoints(run_dir):
        shutil.rmtree(d)  # interrupted while saving: no marker, cannot be trusted

    t_start = time.perf_counter()
    ckpt_root.mkdir(parents=True, exist_ok=True)
    CheckpointSchedule, CsvLog, _ = _callbacks()
    trainer, choice = build_trainer(cfg, records, ckpt_root, progress=progress, extra_callbacks=callbacks)
    if trainer.args.world_size != 1:
        raise TrainError(f"{trainer.args.world_size} training processes: the checkpoint schedule assumes one "
                         "(run the notebook on a single GPU)")
    # the schedule counts the examples the trainer really has (TRL drops an example whose
    # prompt alone fills max_seq_length, since it has nothing left to learn from)
    n_train = len(trainer.train_dataset)
    n_eval = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
    n_dropped = len(records) - n_train - n_eval
    n_truncated = sum(len(ids) >= cfg.max_seq_length for ids in trainer.train_dataset["input_ids"])
    if n_dropped or n_truncated:
        print(f"note: max_seq_length {cfg.max_seq_length}: {n_truncated} examples cut short, {n_dropped} dropped "
              "(their prompt alone fills it)")
    spe = steps_per_epoch(n_train, cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
    total = spe * cfg.epochs
    schedule = checkpoint_schedule(n_train, cfg)
    trainable = describe(trainer.model)["trainable_parameters"]

    existing = list_checkpoints(run_dir)
    resume = existing[-1] if existing else None
    wall_offset = _truncate_log(train_log_path(run_dir), resume[0] if resume else 0)
    _truncate_log(eval_log_path(run_dir), resume[0] if resume else 0, EVAL_LOG_COLUMNS)
    trainer.add_callback(CheckpointSchedule(schedule, spe, fp, ckpt_root, evaluate=n_eval > 0))
    trainer.add_callback(CsvLog(train_log_path(run_dir), wall_offset))

    if resume is None or resume[0] < total:
        trainer.train(resume_from_checkpoint=str(resume[2]) if resume else None)
    wall = time.perf_counter() - t_start

    got = [s for s, _, _ in list_checkpoints(run_dir)]
    if got != schedule:
        raise TrainError(f"{ckpt_root}: expected checkpoints at steps {schedule}, found {got}")
    info = {
        "dataset": dinfo.to_dict(),
        "n_examples": dinfo.n_examples,
        "n_train_examples": n_train,
        "n_eval_examples": n_eval,
        "eval_split": {"fraction": cfg.eval_fraction, "seed": cfg.seed} if n_eval else None,
        "data_order": cfg.data_order,
        "n_dropped_too_long": n_dropped,
        "n_truncated": n_truncated,
        "steps_per_epoch": spe,
        "total_steps": total,
        "effective_batch_size": cfg.per_device_batch_size * cfg.gradient_accumulation_steps,
        "checkpoints": schedule_table(schedule, spe),
        "model": model_revision_info(cfg.model, cfg.model_revision),
        "device": choice.device,
        "dtype": str(choice.dtype).replace("torch.", ""),
        "quantization": cfg.quantization,
        "trainable_parameters": trainable,
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "wall_time_s": round(wall_offset + wall, 3),
        "resumed_from_step": resume[0] if resume else None,
        "fingerprint": fp,
        "completed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    update_run_json(cfg, "train", info)
    write_json_atomic(done, info)
    return TrainResult(run_dir, False, list_checkpoints(run_dir), spe, total, trainable, round(wall, 3),
                       resumed_from=resume[0] if resume else None, info=info)
