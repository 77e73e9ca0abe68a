"""Stage 03: score every answer with an LLM judge, cheaply, resumably and with evidence.

For each row of ``outputs/<run>/generations.parquet`` and each configured metric (default
``aligned`` and ``coherent``) the judge model gets one user message: the metric's prompt
template with ``{question}`` and ``{answer}`` filled in. Templates come from the question sets
(per question and metric) or, when ``judge_prompts`` is set, from that YAML file or URL for
every question. The result is ``outputs/<run>/judgments/<judge_name>.parquet``, one row per
(answer, metric), with the columns of :data:`lib.schema.JUDGMENT_COLUMNS` plus
``finish_reason``, ``attempts`` and ``cache_key``.

Scoring methods (``judge_method``):

* ``logprob`` (Betley et al. / Turner et al.): ``max_tokens=1``, temperature 0, top-20
  logprobs of the first token; the score is :func:`lib.scoring.score_from_logprobs` of those.
* ``sampled`` (the replicated study): a short reply at ``judge_temperature``, parsed by
  :func:`lib.scoring.parse_sampled` as an integer 0..100, CODE or REFUSAL; anything else is
  ``unparseable``.
* ``exact`` (in-process Hugging Face judges only): the full probability of every candidate
  reply "0".."100", "CODE", "REFUSAL", each followed by end of turn, by teacher forcing
  (see :mod:`lib.judge_hf`); aggregated by the same rule as ``logprob``. Tokenizers that
  split "100" into "1","0","0" are handled, which the first-token rule cannot do.

Every finished judgment is committed at once to a persistent cache (SQLite, WAL mode) under
``<outputs_dir>/.judge_cache/``, keyed by (backend, base URL, model, method, sampling settings,
filled-in prompt): a rerun, a resumed crash or a second notebook over the same answers never
calls the judge again for a finished judgment. Failed calls (after ``judge_max_retries``
retries) are written as ``label="error"`` rows with the error text and are not cached, so the
next run retries them. A budget cap (``judge_budget_usd``) stops new calls cleanly; judgments
not made are left out of the table (and counted as ``pending`` in run.json) for a rerun.
With ``judge_use_batch_api`` the calls go through the OpenAI Batch API instead (half price;
each run collects finished batches and submits what is left, see
:class:`lib.judge_openai.OpenAIBatchBackend`).

The aggregation rule is re-applied from the stored evidence whenever the table is written, so
changing ``judge_min_mass`` rescores logprob/exact judgments without any new call.
"""
from __future__ import annotations

import json
import re
import random
import sqlite3
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from . import judge_backends, judge_health, judge_vllm, layout, questions
from .config import RunConfig, judge_panel, resolve_path
from .costs import Budget
from .io import sha256_text, write_parquet_atomic
from .judge_protocol import JudgeBackend
from .runinfo import read_run_json, update_run_json
from .schema import JUDGMENT_COLUMNS, prompt_family
from .scoring import Job, JudgeError, Verdict, fill_prompt, label_from_logprobs
from .secrets import get_secret, mask_url_credentials, safe_base_url

EXTRA_COLUMNS = ("finish_reason", "attempts", "cache_key")  # beyond schema.JUDGMENT_COLUMNS


# ------------------------------------------------------------------------------------------
# Cache: a SQLite file in WAL mode, one committed row per finished judgment
# ------------------------------------------------------------------------------------------

class JudgeCache:
    """Finished judgments by cache key. Safe with several processes (SQLite locking, WAL);
    each :meth:`put` is its own committed transaction, so a killed process loses only the
    calls that were in flight."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode; the connection may be used from a helper thread (one at a time)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=60000")
        # WAL is a property of the file: set once, by whichever process gets there first. Switching needs an
        # exclusive lock, and SQLite answers "database is locked" at once, without waiting, when another
        # connection holds a lock it might deadlock with (two Slurm jobs opening a fresh cache together did):
        # so look first, and retry the switch for up to a minute.
        deadline = time.monotonic() + 60
        while True:
            try:
                if str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge TEXT NOT NULL, "
                    "prompt_sha256 TEXT NOT NULL, verdict TEXT NOT NULL, created REAL NOT NULL)")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02 + 0.08 * random.random())
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process kill

    def get_many(self, keys: Iterable[str]) -> dict[str, Verdict]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, Verdict] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            q = f"SELECT key, verdict FROM judgments WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in self._db.execute(q, chunk):
                out[k] = Verdict(**json.loads(v))
        return out

    def put(self, key: str, judge: str, prompt_sha256: str, verdict: Verdict) -> None:
        self._db.execute("INSERT OR REPLACE INTO judgments VALUES (?, ?, ?, ?, ?)",
                         (key, judge, prompt_sha256, json.dumps(asdict(verdict)), time.time()))

    def keys_for_prompts(self) -> dict[str, str]:
        """prompt_sha256 -> key of every cached judgment (for audits and tests)."""
        return {p: k for k, p in self._db.execute("SELECT key, prompt_sha256 FROM judgments")}

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def cache_path(cfg: RunConfig) -> Path:
    return resolve_path(cfg.outputs_dir) / ".judge_cache" / "judgments.sqlite3"


def cache_key(identity: Mapping[str, Any], prompt: str) -> str:
    return sha256_text(json.dumps({**identity, "prompt": prompt}, sort_keys=True, ensure_ascii=False))


# ------------------------------------------------------------------------------------------
# Names and paths
# ------------------------------------------------------------------------------------------

def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_.") or "x"


def judge_name(cfg: RunConfig) -> str:
    """cfg.judge_name, or ``<backend>[-<host>]-<model>-<method>`` made safe for a file name."""
    if cfg.judge_name:
        return _safe(cfg.judge_name)
    parts = [cfg.judge_backend]
    if cfg.judge_backend == "openai" and cfg.judge_base_url:
        parts.append(urllib.parse.urlsplit(cfg.judge_base_url).hostname or "server")
    parts += [cfg.judge_model, cfg.judge_method]
    return _safe("-".join(parts))


def judgments_path(cfg: RunConfig) -> Path:
    return layout.judgments_path(cfg.run_dir, judge_name(cfg))


# ------------------------------------------------------------------------------------------
# Inputs: credentials, generations, prompts
# ------------------------------------------------------------------------------------------

def check_credentials(cfg: RunConfig) -> str | None:
    """The judge's API key (openai backend), or a one-line JudgeError when it is missing (or, for
    judge_backend vllm, when vLLM's environment is). Called before anything else; the grid runner can
    call it at validation time."""
    if cfg.judge_backend == "vllm":
        judge_vllm.check_judge(cfg)
    if cfg.judge_backend != "openai":
        return None
    key = get_secret(cfg.judge_api_key_env)
    if not key:
        where = f"the server at {safe_base_url(cfg.judge_base_url)}" if cfg.judge_base_url else "the OpenAI API"
        extra = " (a local server that ignores keys accepts any value, e.g. 'dummy')" if cfg.judge_base_url else ""
        raise JudgeError(f"key 'judge_api_key_env': environment variable {cfg.judge_api_key_env} is not set "
                         f"(nor in .env); the judge needs it for {where}{extra}")
    return key


def load_generations(cfg: RunConfig) -> pd.DataFrame:
    path = layout.generations_path(cfg.run_dir)
    if not path.exists():
        raise JudgeError(f"{path}: not found; run 02_evaluate for run '{cfg.run_id}' first")
    df = pd.read_parquet(path)
    need = ["answer_id", "run_id", "checkpoint_step", "question_set", "question_id", "paraphrase", "answer"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise JudgeError(f"{path}: missing column(s) {', '.join(missing)}")
    if df["answer_id"].duplicated().any():
        dup = df.loc[df["answer_id"].duplicated(), "answer_id"].iloc[0]
        raise JudgeError(f"{path}: answer_id {dup} appears more than once")
    return df


ROW_COLUMNS = ["answer_id", "run_id", "checkpoint_step", "question_set", "question_id", "metric",
               "prompt_sha256", "template_sha256", "prompt_family", "cache_key"]
PromptBook = Callable[[str, str, str], "str | None"]  # (question_set, question_id, metric) -> template


def prompt_book(cfg: RunConfig) -> tuple[PromptBook, dict[str, Any]]:
    """Where the judge prompts come from: ``judge_prompts`` (one file for every question) or
    the question sets (per question). Returns the lookup and a description for run.json."""
    try:
        if cfg.judge_prompts:
            templates = questions.load_judge_prompts(cfg.judge_prompts, cfg.outputs_dir)
            _, digest = questions.fetch_text(cfg.judge_prompts, outputs_dir=cfg.outputs_dir)
            return ((lambda qs, qid, metric: templates.get(metric)),
                    {"source": mask_url_credentials(cfg.judge_prompts), "sha256": digest})
        qs_list = questions.load_question_sets(list(cfg.question_sets), cfg.outputs_dir)
    except questions.QuestionError as e:
        raise JudgeError(str(e)) from None
    by_q = {(q.question_set, q.id): q.judge_prompts for q in qs_list}
    return ((lambda qs, qid, metric: by_q.get((qs, qid), {}).get(metric)),
            {"source": [mask_url_credentials(s) for s in cfg.question_sets]})


def build_rows(gens: pd.DataFrame, metrics: list[str], book: PromptBook,
               identity: Mapping[str, Any]) -> tuple[pd.DataFrame, dict[str, Job], dict[str, int]]:
    """One row per (answer, metric) that has a prompt, and the distinct jobs behind them.

    A metric for which no question has a prompt is an error; a metric that only some
    questions have (a domain-specific one) is judged where it exists: ``skipped`` counts the
    others per metric."""
    rows: list[dict[str, Any]] = []
    jobs: dict[str, Job] = {}
    skipped = {m: 0 for m in metrics}
    tcache: dict[str, str] = {}
    for g in gens.itertuples(index=False):
        templates = {m: book(g.question_set, g.question_id, m) for m in metrics}
        tshas = {m: tcache.get(t) or tcache.setdefault(t, sha256_text(t)) for m, t in templates.items() if t is not None}
        family = prompt_family(tshas)   # the wording that scores this answer, all metrics together
        for metric in metrics:
            template = templates[metric]
            if template is None:
                skipped[metric] += 1
                continue
            prompt = fill_prompt(template, g.paraphrase, g.answer)
            psha = sha256_text(prompt)
            key = cache_key(identity, prompt)
            jobs.setdefault(key, Job(key=key, prompt=prompt, prompt_sha256=psha))
            rows.append({"answer_id": g.answer_id, "run_id": g.run_id, "checkpoint_step": int(g.checkpoint_step),
                         "question_set": g.question_set, "question_id": g.question_id, "metric": metric,
                         "prompt_sha256": psha, "template_sha256": tshas[metric], "prompt_family": family,
                         "cache_key": key})
    for m in metrics:
        if len(gens) and skipped[m] == len(gens):
            raise JudgeError(f"key 'judge_metrics': no judge prompt for metric '{m}' in any question "
                             "(add it to the question sets or to judge_prompts, or drop the metric)")
    return pd.DataFrame(rows, columns=ROW_COLUMNS), jobs, skipped


# ------------------------------------------------------------------------------------------
# Plan: what a run will do and cost, before it calls anything
# ------------------------------------------------------------------------------------------

@dataclass
class Plan:
    judge_name: str
    backend: str
    model: str
    method: str
    n_answers: int
    n_rows: int              # (answer, metric) rows to fill
    n_unique: int            # distinct judge prompts (identical ones are judged once)
    n_cached: int            # already judged (cache)
    n_todo: int              # calls to make
    skipped: dict[str, int]  # rows without a prompt, per metric
    est_input_tokens: int
    est_output_tokens: int
    est_cost_usd: float | None  # None: price unknown (or not a paid API)
    price_note: str
    prompts: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        cost = ("unknown" if self.est_cost_usd is None else f"${self.est_cost_usd:,.4f}")
        lines = [
            f"judge {self.judge_name}: {self.backend} / {self.model} / {self.method}",
            f"  {self.n_answers} answers -> {self.n_rows} judgments ({self.n_unique} distinct prompts): "
            f"{self.n_cached} cached, {self.n_todo} to call",
            f"  estimate for the calls to make: ~{self.est_input_tokens:,} input + <= {self.est_output_tokens:,} "
            f"output tokens, cost {cost}",
            f"  {self.price_note}",
        ]
        if any(self.skipped.values()):
            lines.append(f"  rows without a prompt (skipped): {self.skipped}")
        return "\n".join(lines)

    def to_frame(self) -> pd.DataFrame:
        d = {k: v for k, v in asdict(self).items() if k not in ("prompts",)}
        d["skipped"] = json.dumps(d["skipped"])
        return pd.DataFrame([d]).T.rename(columns={0: "value"})


@dataclass
class _Prepared:
    plan: Plan
    rows: pd.DataFrame
    jobs: dict[str, Job]
    done: dict[str, Verdict]
    backend: JudgeBackend
    cache: JudgeCache


def _prepare(cfg: RunConfig) -> _Prepared:
    api_key = check_credentials(cfg)  # first: no key -> one line, before any work
    cache_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    backend = judge_backends.make_backend(cfg, api_key, cache_path(cfg))
    gens = load_generations(cfg)
    book, prompt_info = prompt_book(cfg)
    identity = backend.identity()
    rows, jobs, skipped = build_rows(gens, list(cfg.judge_metrics), book, identity)
    cache = JudgeCache(cache_path(cfg))
    done = cache.get_many(jobs)
    todo = [j for k, j in jobs.items() if k not in done]
    est_in = sum(j.est_input_tokens for j in todo)
    est_out = backend.max_output_tokens * len(todo)
    est_cost = backend.estimate_cost(est_in, est_out)
    templates: dict[str, list[str]] = {}
    if len(rows):
        for m, g in rows.groupby("metric"):
            templates[m] = sorted(g["template_sha256"].unique())
    plan = Plan(judge_name=judge_name(cfg), backend=cfg.judge_backend, model=cfg.judge_model,
                method=cfg.judge_method, n_answers=len(gens), n_rows=len(rows), n_unique=len(jobs),
                n_cached=len(jobs) - len(todo), n_todo=len(todo), skipped=skipped,
                est_input_tokens=est_in, est_output_tokens=est_out, est_cost_usd=est_cost,
                price_note=backend.price_note(),
                prompts={**prompt_info, "template_sha256": templates,
                         "prompt_families": sorted(rows["prompt_family"].unique()) if len(rows) else []})
    return _Prepared(plan, rows, jobs, done, backend, cache)


def plan(cfg: RunConfig) -> Plan:
    """What :func:`judge_run` would do now: counts, cached judgments, estimated tokens and cost."""
    p = _prepare(cfg)
    p.cache.close()
    return p.plan


# ------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------

def judge_run(cfg: RunConfig, progress: bool = True) -> pd.DataFrame:
    """Judge every (answer, metric) not judged yet, resume from the cache, write the table.

    Returns the full judgments table of this judge (``judgments_path(cfg)``): cached and new
    judgments, error rows included; judgments a budget cap left undone are absent.
    """
    prep = _prepare(cfg)
    plan_, backend, cache = prep.plan, prep.backend, prep.cache
    say = print if progress else (lambda *a, **k: None)
    say(str(plan_))
    if cfg.judge_budget_usd > 0 and plan_.n_todo and plan_.est_cost_usd is None:
        cache.close()
        raise JudgeError(f"key 'judge_budget_usd': cannot enforce a budget: {backend.price_note()}; "
                         "set judge_budget_usd: 0 or add the model's price to lib/costs.py")
    todo = [j for k, j in prep.jobs.items() if k not in prep.done]
    new: dict[str, Verdict] = {}
    name = judge_name(cfg)

    def sink(job: Job, v: Verdict) -> None:
        new[job.key] = v
        if v.label != "error":  # durable now; errors stay uncached so a rerun retries them
            cache.put(job.key, name, job.prompt_sha256, v)

    budget = Budget(cfg.judge_budget_usd)
    t0 = time.monotonic()
    try:
        if todo:
            backend.run(todo, sink, budget, progress)
    finally:
        cache.close()
    elapsed = time.monotonic() - t0
    for b in backend.status or []:
        say(f"batch {b['batch_id']}: {b['status']} ({b['requests']} requests)")
    verdicts = {**prep.done, **new}
    table = assemble(prep.rows, verdicts, cfg)
    write_parquet_atomic(table, judgments_path(cfg))

    # a failed call (error row) produced no reply to bill: the cost is that of the answered calls,
    # unknown only when an answered call's price is
    spent = [v.cost_usd for v in new.values() if v.label != "error"]
    new_cost = None if any(c is None for c in spent) else float(sum(spent))
    n_pending = int(len(prep.rows) - len(table))
    if budget.exhausted:
        say(f"budget cap ${cfg.judge_budget_usd:.4f} reached: stopped cleanly, {n_pending} judgments left "
            "for a rerun")
    cost_txt = "unknown" if new_cost is None else f"${new_cost:.4f}"
    say(f"judged {len(new)} prompts in {elapsed:.1f} s: {sum(v.input_tokens for v in new.values()):,} input + "
        f"{sum(v.output_tokens for v in new.values()):,} output tokens, cost {cost_txt}; "
        f"{int((table['label'] == 'error').sum()) if len(table) else 0} errors -> {judgments_path(cfg)}")
    health = judge_health.health_table(table, plan_.judge_name)
    verdict, why = judge_health.overall_verdict(health)
    if verdict != "ok":
        say(f"judge health: {verdict.upper()} ({why})")
    _record(cfg, plan_, table, new, new_cost, n_pending, budget, elapsed, backend,
            {"verdict": verdict, "reason": why})
    return table


def panel(cfg: RunConfig) -> list[RunConfig]:
    """The run's judges (:func:`lib.config.judge_panel`: the primary judge first), each with its own
    judgments file: two judges whose derived names would share one file are a one-line error."""
    members = judge_panel(cfg)
    names = [judge_name(m) for m in members]
    for i, n in enumerate(names):
        if n in names[:i]:
            first = names.index(n)
            raise JudgeError(f"key 'judges': judges[{i - 1}] and "
                             f"{'the primary judge' if first == 0 else f'judges[{first - 1}]'} would both write "
                             f"judgments/{n}.parquet (same backend, model and method); give one a name")
    return members


def judge_panel_run(cfg: RunConfig, progress: bool = True) -> dict[str, pd.DataFrame]:
    """:func:`judge_run` for every judge of the run's panel, one after another: every judge's credentials
    are checked before any runs; the extra judges run first and the primary judge last, so run.json's judge
    section ends with the run's own parameters and the primary judge as ``last`` (the report's headline).
    Returns judge name -> its table, the primary judge first."""
    members = panel(cfg)
    for m in members:
        check_credentials(m)
    extra = {judge_name(m): judge_run(m, progress=progress) for m in members[1:]}
    return {judge_name(cfg): judge_run(cfg, progress=progress), **extra}


def rescore(v: Verdict, min_mass: float) -> Verdict:
    """Re-apply the aggregation rule to a logprob/exact verdict's stored evidence (the cache
    keeps the log probabilities, so changing ``judge_min_mass`` needs no new call)."""
    score, label, mass = label_from_logprobs(json.loads(v.raw), min_mass)
    return Verdict(**{**asdict(v), "score": score, "label": label, "prob_mass": mass})


def assemble(rows: pd.DataFrame, verdicts: Mapping[str, Verdict], cfg: RunConfig) -> pd.DataFrame:
    """The judgments table: one row per (answer, metric) that has a verdict."""
    cols = [*JUDGMENT_COLUMNS, *EXTRA_COLUMNS]
    out = []
    name = judge_name(cfg)
    for r in rows.itertuples(index=False):
        v = verdicts.get(r.cache_key)
        if v is None:
            continue  # not judged yet (budget cap or interrupted): left for a rerun
        if cfg.judge_method in ("logprob", "exact") and v.label != "error":
            v = rescore(v, cfg.judge_min_mass)
        out.append({
            "answer_id": r.answer_id, "run_id": r.run_id, "checkpoint_step": r.checkpoint_step,
            "question_set": r.question_set, "question_id": r.question_id, "metric": r.metric,
            "score": v.score, "label": v.label, "method": cfg.judge_method, "judge_name": name,
            "judge_model": v.judge_model or cfg.judge_model, "prompt_sha256": r.prompt_sha256,
            "template_sha256": r.template_sha256, "prompt_family": r.prompt_family, "raw": v.raw,
            "prob_mass": v.prob_mass,
            "input_tokens": int(v.input_tokens), "output_tokens": int(v.output_tokens),
            "cost_usd": v.cost_usd, "error": v.error, "finish_reason": v.finish_reason,
            "attempts": int(v.attempts), "cache_key": r.cache_key,
        })
    df = pd.DataFrame(out, columns=cols)
    for c in ("score", "prob_mass", "cost_usd"):
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in ("input_tokens", "output_tokens", "attempts", "checkpoint_step"):
        df[c] = df[c].astype("int64")
    return df


def _record(cfg: RunConfig, plan_: Plan, table: pd.DataFrame, new: Mapping[str, Verdict],
            new_cost: float | None, n_pending: int, budget: Budget, elapsed: float, backend: JudgeBackend,
            health: dict[str, str]) -> None:
    labels = ({m: g["label"].value_counts().to_dict() for m, g in table.groupby("metric")} if len(table) else {})
    # one cost per distinct call: rows that share a cache key (identical prompts) share one paid call
    total_cost = table[table["label"] != "error"].drop_duplicates("cache_key")["cost_usd"]
    info = {
        "judge_name": plan_.judge_name, "backend": cfg.judge_backend, "model": cfg.judge_model,
        "models_reported": sorted(set(table["judge_model"])) if len(table) else [],
        "health": health,  # lib.judge_health: can this judge judge (evidence in the table)
        "method": cfg.judge_method, "base_url": safe_base_url(cfg.judge_base_url) or None,
        "identity": backend.identity(), "metrics": list(cfg.judge_metrics), "prompts": plan_.prompts,
        "path": str(judgments_path(cfg)), "rows": int(len(table)), "pending": n_pending,
        "complete": n_pending == 0 and not (table["label"] == "error").any() if len(table) else n_pending == 0,
        "labels": labels, "skipped_no_prompt": plan_.skipped,
        "this_session": {"calls": len(new), "cached": plan_.n_cached, "seconds": round(elapsed, 2),
                         "input_tokens": int(sum(v.input_tokens for v in new.values())),
                         "output_tokens": int(sum(v.output_tokens for v in new.values())),
                         "cost_usd": new_cost, "budget_usd": cfg.judge_budget_usd or None,
                         "budget_exhausted": budget.exhausted},
        "table_cost_usd": None if total_cost.isna().any() else float(total_cost.sum()),
        "errors": int((table["label"] == "error").sum()) if len(table) else 0,
        "batches": backend.status,
        "server": getattr(backend, "server", None),  # a judge served by the stage (lib.judge_vllm)
        "price": plan_.price_note, "estimate": {"cost_usd": plan_.est_cost_usd,
                                                 "input_tokens": plan_.est_input_tokens,
                                                 "output_tokens": plan_.est_output_tokens},
    }
    judges = dict(read_run_json(cfg.run_dir).get("judge", {}).get("judges", {}))
    judges[plan_.judge_name] = info
    update_run_json(cfg, "judge", {"judges": judges, "last": plan_.judge_name})


# ------------------------------------------------------------------------------------------
# Helpers for the notebook
# ------------------------------------------------------------------------------------------

def run_info(cfg: RunConfig) -> dict[str, Any]:
    """This judge's section of run.json (empty before its first run)."""
    return read_run_json(cfg.run_dir).get("judge", {}).get("judges", {}).get(judge_name(cfg), {})


def label_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Counts of each label per metric, with the mean score of numeric rows."""
    if table.empty:
        return pd.DataFrame()
    counts = table.pivot_table(index="metric", columns="label", values="answer_id", aggfunc="count", fill_value=0)
    counts["mean_score"] = table.groupby("metric")["score"].mean()
    # identical prompts share one paid call: count its cost once
    calls = table.drop_duplicates(["metric", "cache_key"]) if "cache_key" in table.columns else table
    counts["cost_usd"] = calls.groupby("metric")["cost_usd"].sum(min_count=1)
    return counts


def examples(cfg: RunConfig, table: pd.DataFrame, n: int = 4, seed: int = 0) -> pd.DataFrame:
    """A few judged answers with their evidence (question, answer, score, label, raw reply)."""
    if table.empty:
        return pd.DataFrame()
    gens = load_generations(cfg)[["answer_id", "paraphrase", "answer"]]
    pick = table.drop_duplicates("answer_id").sample(min(n, table["answer_id"].nunique()), random_state=seed)
    sub = table[table["answer_id"].isin(pick["answer_id"])].merge(gens, on="answer_id")
    sub = sub.assign(raw=sub["raw"].str.slice(0, 160), answer=sub["answer"].str.slice(0, 240))
    return sub[["answer_id", "paraphrase", "answer", "metric", "score", "label", "prob_mass", "judge_model",
                "raw", "error"]].sort_values(["answer_id", "metric"])


def score_histogram(table: pd.DataFrame):
    """Altair histogram of numeric scores per metric."""
    import altair as alt  # lazy: only the notebook's chart needs it

    data = table.loc[table["score"].notna(), ["metric", "score"]]
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X("score:Q", bin=alt.Bin(extent=[0, 100], step=5), title="judge score (0-100)"),
                    y=alt.Y("count():Q", title="judgments"), color="metric:N", column="metric:N")
            .properties(width=260, height=180))
