"""Column contracts of the files stages hand to each other.

One row per answer in ``outputs/<run>/generations.parquet``; one row per (answer, metric) in
``outputs/<run>/judgments/<judge_name>.parquet``. Later stages read only these columns.
"""
from __future__ import annotations

import hashlib

# outputs/<run>/generations.parquet (written by 02_evaluate / lib.evaluate)
GENERATION_COLUMNS = {
    "answer_id": "str: stable id, see answer_id()",
    "run_id": "str",
    "model": "str: model name as configured (hub id, path or embedded:tiny)",
    "model_label": "str: short label for reports (1B, 3B, ...)",
    "domain": "str: the run's training domain label",
    "checkpoint_step": "int: 0 = base model",
    "epoch": "float: fractional epoch of the checkpoint (0.0 for the base model)",
    "question_set": "str: question set name (file stem or URL basename)",
    "question_id": "str",
    "in_domain": "bool: question's domain == the run's domain",
    "paraphrase_index": "int",
    "paraphrase": "str: the question text asked",
    "system": "str | None: system prompt used",
    "sample_index": "int",
    "answer": "str",
    "n_new_tokens": "int",
    "finish_reason": "str: stop | length",
    "seed": "int",
}

# outputs/<run>/judgments/<judge_name>.parquet (written by 03_judge / lib.judge)
JUDGMENT_COLUMNS = {
    "answer_id": "str: joins generations.answer_id",
    "run_id": "str",
    "checkpoint_step": "int",
    "question_set": "str",
    "question_id": "str",
    "metric": "str: aligned, coherent, or any metric with a judge prompt",
    "score": "float | None: 0..100; None for CODE / REFUSAL / unparseable / error / low mass",
    "label": "str: number | CODE | REFUSAL | unparseable | low_mass | error",
    "method": "str: logprob | sampled | exact",
    "judge_name": "str",
    "judge_model": "str",
    "prompt_sha256": "str: sha256 of the filled-in judge prompt",
    "template_sha256": "str: sha256 of the prompt template",
    "raw": "str: raw reply text, or JSON of the top logprobs / candidate probabilities",
    "prob_mass": "float | None: total probability on valid numbers (logprob / exact)",
    "input_tokens": "int",
    "output_tokens": "int",
    "cost_usd": "float",
    "error": "str | None",
}


def answer_id(run_id: str, checkpoint_step: int, question_set: str, question_id: str,
              paraphrase_index: int, sample_index: int) -> str:
    """Stable id of one answer: the same inputs always give the same id."""
    key = f"{run_id}\x1f{checkpoint_step}\x1f{question_set}\x1f{question_id}\x1f{paraphrase_index}\x1f{sample_index}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
