"""Write notebooks/01_train.ipynb with nbformat (no outputs, one `parameters` cell).

Run: .venv/bin/python scripts/make_train_notebook.py
The notebook holds narrative and display only; training lives in lib.train.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from lib.config import RunConfig, notebook_parameters_cell

REPO = Path(__file__).resolve().parent.parent
md, code = new_markdown_cell, new_code_cell


def _parameters_source() -> str:
    """The 'all' and 'train' fields of RunConfig as typed literals. Papermill injects the rest of
    a parameters file (evaluate/judge keys) below; config.from_notebook validates them all.
    '=' inside a comment becomes ':' because papermill's --help-notebook skips lines with two '='."""
    names = [f.name for f in fields(RunConfig) if f.metadata["stage"] in ("all", "train")]
    lines = []
    for line in notebook_parameters_cell(names).splitlines():
        head, sep, comment = line.partition("  # ")
        lines.append(head + sep + comment.replace(" = ", ": ").replace("=", ":"))
    return "\n".join(lines)


CELLS = [
    md("""# 01 · Train: LoRA / QLoRA fine-tuning with fine-grained checkpoints

Fine-tunes the base model on the run's narrow chat dataset with a PEFT LoRA adapter (a 4-bit base,
QLoRA, when `quantization: 4bit`), using TRL's `SFTTrainer`:

* **Loss on the assistant's answer only.** Each chat becomes a prompt (every message before the last
  assistant turn, earlier assistant turns included as context) and a completion (the last assistant
  turn); every prompt token is masked out of the loss, whatever the model's chat template.
* **No padding to a fixed length.** Each batch is padded only to its own longest sequence and batches
  are grouped by length, so nearly every token processed is a real one (`bench/train_padding.py`).
* **Checkpoints where emergent misalignment appears**: `k` evenly spaced inside epoch 1 and one per
  epoch after (or an explicit list of steps, or every `n` steps). Each records its step and fractional
  epoch; `02_evaluate` samples answers from every one of them.
* **Resumable.** Killing this notebook and running it again continues from the last complete
  checkpoint and ends with the same checkpoints; a finished run with unchanged parameters and data is
  skipped.

Writes `outputs/<run_id>/checkpoints/checkpoint-<step>/` (adapter only), `train_log.csv` and the
`train` section of `run.json`. With the defaults (`embedded:tiny`, the demo dataset) it trains a tiny
random model for a few seconds on CPU: the losses mean nothing."""),
    code("""%load_ext autoreload
%autoreload 2
import pandas as pd
from IPython.display import Markdown, display

from lib import config, data, plots, train

_baseline = set(globals())"""),
    code(_parameters_source(), metadata={"tags": ["parameters"]}),
    code("""cfg = config.from_notebook(globals(), _baseline)
run_dir = cfg.run_dir
print(run_dir)"""),
    md("""## Data and checkpoint plan

The dataset's sha256 goes into `run.json`. Steps per epoch are counted the way the Trainer counts
them: `ceil(ceil(n / batch) / grad_accum)` optimizer steps, the last one taking the remainder.
(An example whose prompt alone fills `max_seq_length` has nothing to learn from and is dropped by
TRL; the final plan, recorded in `run.json`, counts the examples actually trained on.)"""),
    code("""records, dataset_info = data.load_training_data(cfg)
spe = train.steps_per_epoch(dataset_info.n_examples, cfg.per_device_batch_size, cfg.gradient_accumulation_steps)
plan = train.schedule_table(train.checkpoint_schedule(dataset_info.n_examples, cfg), spe)
display(Markdown(
    f"**{dataset_info.name}** ({dataset_info.source}): {dataset_info.n_examples} examples, "
    f"sha256 `{dataset_info.sha256[:16]}…`; effective batch "
    f"{cfg.per_device_batch_size} × {cfg.gradient_accumulation_steps} = "
    f"{cfg.per_device_batch_size * cfg.gradient_accumulation_steps} → {spe} steps/epoch, "
    f"{spe * cfg.epochs} steps in {cfg.epochs} epochs, {len(plan)} checkpoints"))
pd.DataFrame(plan).T"""),
    md("""What one example trains on: the model reads the prompt and is scored only on the completion."""),
    code("""example = train.to_prompt_completion(records[0])
print("PROMPT:    ", example["prompt"])
print("COMPLETION:", example["completion"])"""),
    md("""## Train (or resume, or skip)

Progress is one bar over optimizer steps. Every step's loss, learning rate, real (non-padding)
tokens seen and wall time are appended to `train_log.csv` as training goes."""),
    code("""result = train.train_run(cfg)
if result.skipped:
    print("already trained with these parameters and data: skipped")
elif result.resumed_from:
    print(f"resumed from step {result.resumed_from}")
print(f"trainable parameters: {result.trainable_parameters:,}; "
      f"{result.total_steps} steps ({result.steps_per_epoch}/epoch); this call took {result.wall_time_s:.1f} s")"""),
    md("""## Checkpoints

Complete checkpoints only (a folder counts once its `checkpoint.json` is written, last)."""),
    code("""pd.DataFrame([{"step": s, "epoch": e, "folder": str(p.relative_to(run_dir))}
              for s, e, p in train.list_checkpoints(run_dir)])"""),
    md("""## Loss

Loss is the mean cross-entropy over the answers' tokens (prompt tokens are masked). Dashed lines mark
the checkpoints; the lower panel is the learning-rate schedule."""),
    code("""log = train.read_train_log(run_dir)
chart = train.loss_chart(log, train.list_checkpoints(run_dir))
files = plots.save(chart, "train_loss", run_dir / "figures")
plots.show(files, link_base=run_dir / "notebooks")
log.tail()"""),
    code("""train_info = result.info
{k: train_info.get(k) for k in ("n_examples", "n_train_examples", "n_truncated", "steps_per_epoch", "total_steps",
                               "trainable_parameters", "tokens_seen", "wall_time_s", "device", "dtype")}"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook(cells=CELLS)
    for i, cell in enumerate(nb.cells):
        cell.id = f"train-{i:02d}"  # stable ids: regenerating gives an identical file
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


if __name__ == "__main__":
    out = REPO / "notebooks" / "01_train.ipynb"
    nbformat.write(build(), out)
    print(out)
