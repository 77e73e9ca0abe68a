"""Column contracts of the files stages hand to each other.

One row per answer in ``outputs/<run>/generations.parquet``; one row per (answer, metric) in
``outputs/<run>/judgments/<judge_name>.parquet``. Later stages read only these columns.
"""
from __future__ import annotations

import hashlib

# where a question stands relative to the run's training domain (lib.questions.Question.scope)
IN_DOMAIN, NEAR_DOMAIN, OUT_OF_DOMAIN = "in-domain", "near-domain", "out-of-domain"
SCOPES = (IN_DOMAIN, NEAR_DOMAIN, OUT_OF_DOMAIN)

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
    "scope": "str: in-domain | near-domain (touches the run's domain, see lib.questions) | out-of-domain",
    "paraphrase_index": "int",
    "paraphrase": "str: the question text asked",
    "system": "str | None: system prompt used",
    "sample_index": "int",
    "answer": "str",
    "n_new_tokens": "int",
    "finish_reason": "str: stop | length",
    "seed": "int",
}
# written only by runs asked under more than one condition (lib.conditions); a file without it is all
# DEFAULT_CONDITION, so a single-condition run's generations.parquet is as it was before conditions
DEFAULT_CONDITION = "default"
OPTIONAL_GENERATION_COLUMNS = {
    "condition": "str: how the question was asked (lib.conditions); absent: every answer is 'default'",
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
    "prompt_family": "str: the judge-prompt family that scored the answer, see prompt_family()",
    "raw": "str: raw reply text, or JSON of the top logprobs / candidate probabilities",
    "prob_mass": "float | None: total probability on valid numbers (logprob / exact)",
    "input_tokens": "int",
    "output_tokens": "int",
    "cost_usd": "float",
    "error": "str | None",
}


def prompt_family(template_sha256: dict[str, str]) -> str:
    """The judge-prompt family of one answer: a short hash of its templates, metric by metric.

    Answers scored with the same wording for every metric share a family, wherever the templates
    came from (a run-level judge_prompts file or the question sets); rates of different families
    are never pooled by the report without saying so."""
    key = "\x1e".join(f"{m}\x1f{t}" for m, t in sorted(template_sha256.items()))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def answer_id(run_id: str, checkpoint_step: int, question_set: str, question_id: str,
              paraphrase_index: int, sample_index: int, condition: str = DEFAULT_CONDITION) -> str:
    """Stable id of one answer: the same inputs always give the same id. The condition is part of
    the key except for the default one (ids of single-condition runs are as they always were)."""
    key = f"{run_id}\x1f{checkpoint_step}\x1f{question_set}\x1f{question_id}\x1f{paraphrase_index}\x1f{sample_index}"
    if condition != DEFAULT_CONDITION:
        key += f"\x1f{condition}"
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
