"""What a grid will do before it does it: training steps, answers, judge calls and dollars per run.

``python -m lib.grid run --dry-run FILE...`` prints one line per run and a grid total. Nothing is
downloaded: a dataset or question set that is not on disk (or in the cache) is counted as
unknown, except the Turner et al. datasets, whose row counts are known
(:data:`KNOWN_DATASET_ROWS`). The figures are upper bounds where the run decides at run time:

* training steps: ``ceil(ceil(n / batch) / grad_accum)`` per epoch, as the Trainer counts them, on
  the examples left after ``eval_fraction`` and ``max_train_examples``;
* answers: questions x paraphrases x samples x (evaluated checkpoints + the base model);
* judge calls: answers x metrics x judges (a panel's every judge scores every answer; identical prompts
  are judged once, so the real count can be lower);
* dollars (API judges in :data:`lib.costs.PRICES_USD_PER_1M` only): input tokens estimated from
  the judge prompt with the question and an answer of ``max_new_tokens`` tokens (the cap; real
  answers are shorter), output tokens the method's reply cap; Batch API prices are half.
Answers already generated or judged (a resumed run) are not subtracted: ``03_judge`` prints the
exact remaining calls and cost before it spends anything.

Time per stage comes from measured rates (:func:`measured_rates`), never from a guess:

* the runs already in the outputs folder (their ``run.json``): training seconds per example and
  epoch (the stage's wall time over steps x effective batch), sampling seconds per answer token
  cap (wall time over answers x ``max_new_tokens``), judge seconds per call (this session's
  seconds over its calls), each matched on what sets the speed: the model and its quantization
  (training, sampling; the device too when the run names one; sampling: the engine, hf or vllm),
  the judge's backend, model and
  method; the median over matching runs;
* else :data:`REFERENCE_RATES`, measured by this project on its 2-core development machine
  (source named in each line, ``docs/benchmarks.md``);
* else "time ?" for that stage: an API judge's speed depends on the account's rate limits, a
  GPU's on the card, and neither is known until one run has shown it.
Times are for the runs one after another on this machine; ``--jobs`` or Slurm divide the wall time.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import costs
from .layout import RUN_STAGES
from .config import RunConfig, judge_panel, resolve_path
from .data import DEMO_DATASETS, DEMO_DIR, DOMAINS, archive_source, cached_archive, load_chat_jsonl
from .questions import NotCached, QuestionError, load_judge_prompts, load_question_set
from .scoring import SAMPLED_MAX_TOKENS
from .train import checkpoint_schedule, steps_per_epoch

# Rows of the Turner et al. datasets (the replicated study's README: 7,049 medical, 6,000 financial)
KNOWN_DATASET_ROWS = {"bad_medical_advice": 7049, "risky_financial_advice": 6000}
TOKENS_PER_WORD = 1.3  # English text, OpenAI tokenizers (only used for the answer cap -> characters)
STAGES_TIMED = RUN_STAGES


@dataclass(frozen=True)
class Rate:
    """Seconds per unit of one stage (train: per example and epoch; evaluate: per answer and token of the
    cap; judge: per call), matched on ``key``; ``overhead``: the stage notebook's fixed seconds around the
    work (kernel start, imports, model loading, the HTML copy: its ``stages.json`` time minus the work's);
    and where it was measured."""
    stage: str
    key: tuple
    seconds: float
    source: str
    overhead: float = 0.0


# Measured by this project (docs/benchmarks.md), 2 idle CPU cores, float32, no other job running.
REFERENCE_RATES = (
    # make demo, 2026-12-06 (4 runs): train 27 steps x batch 4 in 1.9 s; 270 answers x 48-token cap in 5.7 s;
    # 368 exact-judge calls in 9.9 s (demo_financial's run.json; the other runs within 30%); the stage notebooks took 14.3, 13.3 and 16.7 s
    Rate("train", ("embedded:tiny", "none"), 1.86 / (27 * 4), "make demo, 2 CPU cores (docs/benchmarks.md)", 12.4),
    Rate("evaluate", ("embedded:tiny", "none"), 5.73 / (270 * 48), "make demo, 2 CPU cores (docs/benchmarks.md)",
         7.5),
    Rate("judge", ("hf", "embedded:tiny", "exact"), 9.85 / 368, "make demo, 2 CPU cores (docs/benchmarks.md)", 6.8),
    # the SmolLM2 example study, 2026-11-28, whole stage notebooks (overhead included in the rate): train 18
    # steps x batch 4 in 39.7 s; 28 answers x 80-token cap in 26.0 s (medical; financial 32.2 s); 32
    # exact-judge calls in 100.2 s (financial: 38 in 119.3 s)
    Rate("train", ("embedded:smollm2-135m", "none"), 39.7 / (18 * 4),
         "SmolLM2 example study, 2 CPU cores (docs/benchmarks.md)"),
    Rate("evaluate", ("embedded:smollm2-135m", "none"), 29.1 / (28 * 80),
         "SmolLM2 example study, 2 CPU cores (docs/benchmarks.md)"),
    Rate("judge", ("hf", "embedded:smollm2-135m", "exact"), 219.5 / 70,
         "SmolLM2 example study, 2 CPU cores (docs/benchmarks.md)"),
)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 else None


# The report notebook of make demo (4 runs): 21.7 s; it grows slowly with the runs and answers.
REFERENCE_REPORT_SECONDS = (21.7, "make demo, 2 CPU cores (docs/benchmarks.md)")


def rates_of_run(info: dict[str, Any], where: str, stage_seconds: dict[str, float] | None = None) -> list[Rate]:
    """The rates one run.json shows (nothing for a stage it did not time); ``stage_seconds``: the stage
    notebooks' times from the run's stages.json, for their overhead."""
    stage_seconds = stage_seconds or {}
    out = []
    train = info.get("train") or {}
    model = (train.get("model") or {}).get("model") or (train.get("parameters") or {}).get("model")
    wall, steps, batch = (_num(train.get(k)) for k in ("wall_time_s", "total_steps", "effective_batch_size"))
    def overhead(stage: str, work: float) -> float:
        return max(0.0, stage_seconds.get(stage, work) - work)

    if model and wall and steps and batch:
        out.append(Rate("train", (model, train.get("quantization", "none"), train.get("device")),
                        wall / (steps * batch), where, overhead("train", wall)))
    ev = info.get("evaluate") or {}
    model = (ev.get("model") or {}).get("model")
    wall, n = _num(ev.get("wall_time_s")), _num(ev.get("answers_generated_this_session"))
    cap = _num((ev.get("sampling") or {}).get("max_new_tokens"))
    if model and wall and n and cap:
        engine = (ev.get("engine") or {}).get("name") or "hf"  # the engine sets the speed as much as the model
        out.append(Rate("evaluate", (model, ev.get("quantization", "none"), ev.get("device"), engine), wall / (n * cap), where,
                        overhead("evaluate", wall)))
    judge = info.get("judge") or {}
    last = judge.get("last")
    for name, j in (judge.get("judges") or {}).items():
        session = j.get("this_session") or {}
        secs, calls = _num(session.get("seconds")), _num(session.get("calls"))
        if secs and calls and j.get("backend") and j.get("model"):
            out.append(Rate("judge", (j["backend"], j["model"], j.get("method"), j.get("base_url") or ""),
                            secs / calls, where, overhead("judge", secs) if name == last else 0.0))
    return out


def _stage_seconds(folder: Path) -> dict[str, float]:
    try:
        info = json.loads((folder / "stages.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: float(v["seconds"]) for k, v in info.items() if isinstance(v, dict) and _num(v.get("seconds"))}


def measured_rates(outputs_dir: str | Path) -> list[Rate]:
    """Every rate the run folders under ``outputs_dir`` show (unreadable run.json files are skipped)."""
    root = resolve_path(outputs_dir)
    out: list[Rate] = []
    for p in sorted(root.glob("*/run.json")) if root.is_dir() else []:
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(info, dict):
            out += rates_of_run(info, p.parent.name, _stage_seconds(p.parent))
    return out


def report_seconds(outputs_dir: str | Path) -> tuple[float, str]:
    """The last report notebook's time in this outputs folder, else the reference."""
    root = resolve_path(outputs_dir)
    seen = [v["report"] for f in sorted(root.glob("*/stages.json")) if root.is_dir()
            if isinstance(v := _read_json(f), dict) and isinstance(v.get("report"), dict)
            and _num(v["report"].get("seconds"))]
    if seen:
        return statistics.median(float(r["seconds"]) for r in seen), f"measured in {len(seen)} earlier report(s)"
    return REFERENCE_REPORT_SECONDS


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _wants(cfg: RunConfig, stage: str) -> tuple:
    if stage == "train":
        return (cfg.model, cfg.quantization)
    if stage == "evaluate":
        return (cfg.model, cfg.eval_precision[0])
    return (cfg.judge_backend, cfg.judge_model, cfg.judge_method, cfg.judge_base_url or "")


def rate_for(cfg: RunConfig, stage: str, measured: list[Rate]) -> Rate | None:
    """The median of the matching measured rates, else the matching reference rate, else None."""
    want = _wants(cfg, stage)
    device = None if cfg.device == "auto" else cfg.device
    if stage == "judge":
        hits = [r for r in measured if r.stage == stage and r.key[:3] == want[:3]
                and (want[0] != "openai" or r.key[3] == want[3])]
    else:
        engine = cfg.evaluate_engine if stage == "evaluate" else None
        hits = [r for r in measured if r.stage == stage and r.key[:2] == want and (device is None or r.key[2] == device)
                and (engine is None or (r.key[3] if len(r.key) > 3 else "hf") == engine)]
    if hits:
        runs = sorted({r.source for r in hits})
        return Rate(stage, want, statistics.median(r.seconds for r in hits),
                    f"measured in {len(runs)} earlier run{'s' * (len(runs) != 1)} of outputs/ ({', '.join(runs[:3])}"
                    + (", ..." if len(runs) > 3 else "") + ")",
                    statistics.median(r.overhead for r in hits))
    if device not in (None, "cpu"):
        return None  # the reference rates were measured on CPU cores
    if stage == "evaluate" and cfg.evaluate_engine != "hf":
        return None  # the reference rates are the project's own sampler's
    key = want[:3] if stage == "judge" else want
    return next((r for r in REFERENCE_RATES if r.stage == stage and r.key == key), None)


def duration(seconds: float | None) -> str:
    """A short human duration: '40 s', '12 min', '3.5 h', '?'."""
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


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
    seconds: dict[str, float | None] = field(default_factory=dict)  # per stage; None: no measured rate
    rate_sources: dict[str, str] = field(default_factory=dict)

    def time_line(self) -> str:
        parts = [f"{s} {duration(self.seconds.get(s))}" for s in STAGES_TIMED]
        known = {src for src in self.rate_sources.values()}
        src = "; ".join(sorted(known)) if known else "no measured rate for this model or judge yet"
        return f"{'':<24} {'time':<9} {', '.join(parts)}  [rates: {src}]"

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


def _judge_usd(cfg: RunConfig, questions: list, models: int, calls: int, notes: list[str]) -> tuple[float, float] | None:
    """(dollars, dollars with the Batch API) of one judge's calls over every answer; None: no price."""
    if cfg.judge_backend in ("hf", "vllm"):  # this machine's own model: no API price
        return 0.0, 0.0
    if costs.price_for(cfg.judge_model) is None:
        notes.append(f"no price for {cfg.judge_model}")
        return None
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
    return (costs.cost_usd(cfg.judge_model, in_tokens, out_tokens * calls),
            costs.cost_usd(cfg.judge_model, in_tokens, out_tokens * calls, batch=True))


def estimate_run(cfg: RunConfig, measured: list[Rate] | None = None) -> RunEstimate:
    """Counts, dollars and time per stage of one run from scratch (module docstring); never downloads.
    ``measured``: rates of earlier runs (:func:`measured_rates`); None reads them from cfg's outputs folder."""
    notes = []
    panel = judge_panel(cfg)   # the primary judge and a panel's others (judges:)
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
        per_judge = answers * len(cfg.judge_metrics)   # every judge of a panel scores every answer
        calls = per_judge * len(panel)
        if len(panel) > 1:
            notes.append(f"{len(panel)} judges x {per_judge:,} calls")
        dollars = [_judge_usd(m, questions, models, per_judge, notes) for m in panel]
        usd = None if any(d is None for d in dollars) else sum(d[0] for d in dollars)
        usd_batch = None if usd is None else sum(d[1] for d in dollars)
    if measured is None:
        measured = measured_rates(cfg.outputs_dir)
    units = {"train": None if n is None else n * cfg.epochs,
             "evaluate": None if answers is None else answers * cfg.max_new_tokens,
             "judge": calls}
    seconds: dict[str, float | None] = {}
    sources: dict[str, str] = {}
    for stage, k in units.items():
        judges = panel if stage == "judge" else [cfg]   # each judge of a panel at its own rate
        rates = [rate_for(m, stage, measured) for m in judges]
        per = None if k is None else k // len(judges)
        seconds[stage] = (None if per is None or any(r is None for r in rates)
                          else sum(r.overhead + r.seconds * per for r in rates))
        known = sorted({r.source for r in rates if r is not None})
        if known:
            sources[stage] = "; ".join(known)
    return RunEstimate(cfg.run_id, n, steps, ckpts, answers, calls, usd, usd_batch, "; ".join(notes),
                       seconds, sources)


def total_line(estimates: list[RunEstimate], report: tuple[float, str] | None = None) -> str:
    """The grid's totals; ``report``: (seconds, source) of the report notebook, added to the time."""
    def tot(attr: str):
        vals = [getattr(e, attr) for e in estimates]
        return None if any(v is None for v in vals) else sum(vals)

    steps, answers, calls, usd, usd_b = (tot(a) for a in ("train_steps", "answers", "judge_calls", "usd",
                                                          "usd_batch"))
    fmt = lambda x: "?" if x is None else f"{x:,}"  # noqa: E731
    money = "cost unknown for some runs" if usd is None else (
        "$0 (in-process judges)" if usd == 0 else f"~${usd:,.2f} (Batch API ~${usd_b:,.2f}; "
                                                  f"prices checked {costs.PRICES_CHECKED})")
    secs = [v for e in estimates for v in (e.seconds.get(s) for s in STAGES_TIMED)] + ([report[0]] if report else [])
    when = ("time ? (some stage has no measured rate)" if any(v is None for v in secs)
            else f"~{duration(sum(secs))} one run after another" + (" with the report" if report else ""))
    return (f"grid total: {len(estimates)} runs, {fmt(steps)} training steps, {fmt(answers)} answers, "
            f"{fmt(calls)} judge calls, {money}, {when}")
