"""What a grid will do before it does it: training steps, answers, judge calls and dollars per run.

``python -m lib.grid run --dry-run FILE...`` prints one line per run and a grid total. Nothing is
downloaded: a dataset or question set that is not on disk (or in the cache) is counted as
unknown, except the Turner et al. datasets, whose row counts are known
(:data:`KNOWN_DATASET_ROWS`). The figures are upper bounds where the run decides at run time:

* training steps: ``ceil(ceil(n / batch) / grad_accum)`` per epoch, as the Trainer counts them, on
  the examples left after ``eval_fraction`` and ``max_train_examples``;
* answers: questions x paraphrases x samples x (evaluated checkpoints + the base model);
* judge calls: answers x metrics (identical prompts are judged once, so the real count can be lower);
* dollars (API judges in :data:`lib.costs.PRICES_USD_PER_1M` only): input tokens estimated from
  the judge prompt with the question and an answer of ``max_new_tokens`` tokens (the cap; real
  answers are shorter), output tokens the method's reply cap; Batch API prices are half.
Answers already generated or judged (a resumed run) are not subtracted: ``03_judge`` prints the
exact remaining calls and cost before it spends anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import costs
from .config import RunConfig, resolve_path
from .data import DEMO_DATASETS, DEMO_DIR, DOMAINS, archive_source, cached_archive, load_chat_jsonl
from .questions import NotCached, QuestionError, load_judge_prompts, load_question_set
from .scoring import SAMPLED_MAX_TOKENS
from .train import checkpoint_schedule, steps_per_epoch

# Rows of the Turner et al. datasets (the replicated study's README: 7,049 medical, 6,000 financial)
KNOWN_DATASET_ROWS = {"bad_medical_advice": 7049, "risky_financial_advice": 6000}
TOKENS_PER_WORD = 1.3  # English text, OpenAI tokenizers (only used for the answer cap -> characters)


@dataclass
class RunEstimate:
    run_id: str
    n_examples: int | None
    train_steps: int | None
    n_checkpoints: int | None
    answers: int | None
    judge_calls: int | None
    usd: float | None            # None: unknown (price or counts)
    usd_batch: float | None
    note: str = ""

    def line(self) -> str:
        def n(x: int | None) -> str:
            return "?" if x is None else f"{x:,}"

        if self.usd is None:
            money = "cost unknown" if self.judge_calls is not None else "cost ?"
        elif self.usd == 0:
            money = "$0 (in-process judge)"
        else:
            money = f"~${self.usd:,.2f} (Batch API ~${self.usd_batch:,.2f})"
        return (f"{self.run_id:<24} {'estimate':<9} train {n(self.train_steps)} steps ({n(self.n_checkpoints)} checkpoints), "
                f"{n(self.answers)} answers, {n(self.judge_calls)} judge calls, {money}"
                + (f"  [{self.note}]" if self.note else ""))


def _n_examples(cfg: RunConfig) -> tuple[int | None, str]:
    if cfg.dataset in DEMO_DATASETS:
        n = len(load_chat_jsonl(DEMO_DIR / f"{cfg.dataset}.jsonl"))
    elif cfg.dataset in DOMAINS:
        n = KNOWN_DATASET_ROWS.get(cfg.dataset)
        if n is None:
            cached = cached_archive(cfg.outputs_dir, archive_source(cfg)).exists()
            return None, f"rows of {cfg.dataset} unknown until the archive is " + ("decrypted" if cached else "downloaded")
    else:
        p = resolve_path(cfg.dataset)
        if not p.exists():
            return None, f"{cfg.dataset} not found"
        n = len(load_chat_jsonl(p))
    if cfg.max_train_examples:
        n = min(n, cfg.max_train_examples)
    n_eval = math.ceil(n * cfg.eval_fraction) if cfg.eval_fraction else 0
    return n - n_eval, ""


def estimate_run(cfg: RunConfig) -> RunEstimate:
    """Counts and dollars of one run from scratch (module docstring); never downloads."""
    notes = []
    n, why = _n_examples(cfg)
    if why:
        notes.append(why)
    steps = ckpts = None
    if n is not None:
        steps = steps_per_epoch(n, cfg.per_device_batch_size, cfg.gradient_accumulation_steps) * cfg.epochs
        schedule = checkpoint_schedule(n, cfg)
        ckpts = len([s for s in schedule if not cfg.eval_checkpoints or s in cfg.eval_checkpoints])
    questions = []
    for source in cfg.question_sets:
        try:
            questions += load_question_set(source, cfg.outputs_dir, offline=True)
        except NotCached:
            notes.append("a question set is an URL not in the cache yet")
            questions = None
            break
        except QuestionError as e:
            notes.append(str(e))
            questions = None
            break
    answers = calls = None
    usd = usd_batch = None
    if questions is not None and ckpts is not None:
        models = ckpts + (1 if cfg.include_base_model else 0)
        per_model = sum(len(q.paraphrases) * (cfg.n_samples or q.samples_per_paraphrase or 0) for q in questions)
        answers = per_model * models
        calls = answers * len(cfg.judge_metrics)
        if cfg.judge_backend == "hf":
            usd = usd_batch = 0.0
        elif costs.price_for(cfg.judge_model) is not None:
            run_prompts: dict[str, str] = {}
            if cfg.judge_prompts:
                try:
                    run_prompts = load_judge_prompts(cfg.judge_prompts, cfg.outputs_dir, offline=True)
                except (NotCached, QuestionError):
                    notes.append("judge prompts not cached: template length assumed 400 tokens")
            answer_chars = int(cfg.max_new_tokens / TOKENS_PER_WORD * 6)  # ~6 characters a word
            out_tokens = 1 if cfg.judge_method == "logprob" else SAMPLED_MAX_TOKENS
            in_tokens = 0
            for q in questions:
                k = len(q.paraphrases) * (cfg.n_samples or q.samples_per_paraphrase or 0) * models
                for metric in cfg.judge_metrics:
                    template = run_prompts.get(metric) or q.judge_prompts.get(metric) or "x" * 1600
                    text_chars = len(template) + max((len(p) for p in q.paraphrases), default=0) + answer_chars
                    in_tokens += k * costs.estimate_tokens("x" * text_chars)
            usd = costs.cost_usd(cfg.judge_model, in_tokens, out_tokens * calls)
            usd_batch = costs.cost_usd(cfg.judge_model, in_tokens, out_tokens * calls, batch=True)
        else:
            notes.append(f"no price for {cfg.judge_model}")
    return RunEstimate(cfg.run_id, n, steps, ckpts, answers, calls, usd, usd_batch, "; ".join(notes))


def total_line(estimates: list[RunEstimate]) -> str:
    def tot(attr: str):
        vals = [getattr(e, attr) for e in estimates]
        return None if any(v is None for v in vals) else sum(vals)

    steps, answers, calls, usd, usd_b = (tot(a) for a in ("train_steps", "answers", "judge_calls", "usd",
                                                          "usd_batch"))
    fmt = lambda x: "?" if x is None else f"{x:,}"  # noqa: E731
    money = "cost unknown for some runs" if usd is None else (
        "$0 (in-process judges)" if usd == 0 else f"~${usd:,.2f} (Batch API ~${usd_b:,.2f}; "
                                                  f"prices checked {costs.PRICES_CHECKED})")
    return (f"grid total: {len(estimates)} runs, {fmt(steps)} training steps, {fmt(answers)} answers, "
            f"{fmt(calls)} judge calls, {money}")
