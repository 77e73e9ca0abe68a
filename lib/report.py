"""04_report: load every run's files, compute the study's tables and figures, write them out.

Inputs (per run folder ``<outputs_dir>/<run_id>/``, all written by earlier stages):

* ``generations.parquet`` (:data:`lib.schema.GENERATION_COLUMNS`), one row per answer;
* ``judgments/<judge_name>.parquet`` (:data:`lib.schema.JUDGMENT_COLUMNS`), one row per
  answer x metric; a run can hold several judges' files;
* ``run.json`` (:mod:`lib.runinfo`); every section is optional here.
* ``train_log.csv`` / ``eval_log.csv`` (:data:`lib.layout.TRAIN_LOG_COLUMNS`), optional: the
  training chart of every run on one step axis (:func:`training_log_table`).

Which judge's scores the report uses for a run (:func:`configured_judge`):
``ReportConfig.judge_name`` if set; else the judge stage's ``judge_name`` parameter in run.json; else
``run.json["judge"]["last"]`` (the name the judge stage derived when it last ran); else the
only file in ``judgments/``, or the most recently written one. The other judges' files feed only the
judge-agreement table.

External judged CSVs (``question,response,aligned_score,coherent_score``, the replicated
course's format, scores possibly ``CODE`` / ``REFUSAL`` text) become pseudo runs
(:func:`load_external_csv`), so the same metrics and plots apply to them. Answers imported as
runs (``python -m lib.external``, source ``imported``) are runs like ours: the judge stage can
re-judge them, and the judge-agreement table compares the file's original scores with ours.

Outputs (``ReportConfig.report_dir``): ``figures/<name>.png|.svg|.html`` (the html works
offline: the Vega libraries are inlined), ``data/<name>.csv`` (the numbers behind every
figure and table). The notebook's rendered copy and its HTML export are written by the grid
runner with papermill and :func:`lib.notebook_html.export_html`.
"""
from __future__ import annotations

import hashlib
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import external, judge_health, layout, metrics, notices, plots, replication, response_tables, viewer
from .config import ConfigError, ReportConfig, resolve_path
from .io import atomic_path, write_text_atomic
from .runinfo import RunJsonError, stage_parameters
from .runinfo import read_run_json as _read_run_json
from .schema import prompt_family

REQUIRED_GENERATION = ["answer_id", "run_id", "checkpoint_step", "question_set", "question_id", "answer"]
REQUIRED_JUDGMENT = ["answer_id", "metric", "score", "label"]


class ReportError(ConfigError):
    """An input problem, reported as one line naming the file and the column or key."""


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def read_run_json(run_dir: Path) -> dict[str, Any]:
    """lib.runinfo.read_run_json, its error as a ReportError."""
    try:
        return dict(_read_run_json(run_dir))
    except RunJsonError as e:
        raise ReportError(str(e)) from None


def configured_judge(run_dir: str | Path, info: dict[str, Any] | None = None, override: str = "") -> str | None:
    """The judge whose scores the report uses for one run (None if the run has no judgments).

    Order: ``override`` (ReportConfig.judge_name); ``run.json`` parameters.judge_name; the
    judge section's ``last`` (the judge the judge stage ran last; or ``judge_name``); the
    only / most recently modified ``judgments/*.parquet``. A named judge without a file falls through to the next
    rule, except ``override``, which is returned as-is so the caller can report it missing.
    """
    run_dir = Path(run_dir)
    info = read_run_json(run_dir) if info is None else info
    if override:
        return override
    files = sorted(layout.judgment_files(run_dir), key=lambda p: (p.stat().st_mtime, p.name))
    names = {p.stem for p in files}
    judge_sec = info.get("judge") or {}
    # the judge stage records {"judges": {name: {...}}, "last": name}; older shapes: judge_name(s)
    candidates = [stage_parameters(info, "judge").get("judge_name") or "", str(judge_sec.get("last") or ""),
                  str(judge_sec.get("judge_name") or "")]
    listed = judge_sec.get("judge_names") or []
    if isinstance(listed, list) and listed:
        candidates.append(str(listed[-1]))
    for c in candidates:
        if c and c in names:
            return c
    return files[-1].stem if files else None


def _check_columns(df: pd.DataFrame, required: list[str], path: Path) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ReportError(f"{path}: missing column '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _read_parquet(path: Path, required: list[str]) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise ReportError(f"{path}: cannot read parquet ({type(e).__name__}: {e})") from None
    _check_columns(df, required, path)
    return df


def discover_runs(outputs_dir: Path, runs: list[str] | None = None) -> list[Path]:
    """Run folders under ``outputs_dir`` holding generations.parquet (all, or the listed ids)."""
    if runs:
        out = []
        for r in runs:
            d = outputs_dir / r
            if not layout.generations_path(d).exists():
                raise ReportError(f"key 'runs': run '{r}' has no {layout.generations_path(d)}")
            out.append(d)
        return out
    if not outputs_dir.is_dir():
        raise ReportError(f"key 'outputs_dir': {outputs_dir} is not a folder")
    return sorted(p.parent for p in outputs_dir.glob(f"*/{layout.GENERATIONS}"))


@dataclass
class Results:
    """Everything the report reads, joined: one row per answer with the headline judge's scores."""

    answers: pd.DataFrame                                 # generations + scores + EM labels + scope
    judgments: dict[str, dict[str, pd.DataFrame]]         # run_id -> judge_name -> long judgments
    runs: dict[str, dict[str, Any]]                       # run_id -> run.json (pseudo info for external)
    judge_of_run: dict[str, str]                          # run_id -> judge used for the headline
    notes: list[str] = field(default_factory=list)        # runs skipped and why
    health: pd.DataFrame = field(default_factory=pd.DataFrame)  # run_id + judge_health.HEALTH_COLUMNS, every judge
    verdict_of_run: dict[str, tuple[str, str]] = field(default_factory=dict)  # run_id -> headline judge's verdict


def _fill_run_columns(gens: pd.DataFrame, info: dict[str, Any]) -> pd.DataFrame:
    params = stage_parameters(info)
    g = gens.copy()
    for col, default in (("model", params.get("model", "")), ("model_label", params.get("model_label", "")),
                         ("domain", params.get("domain", "")), ("epoch", np.nan), ("in_domain", pd.NA),
                         ("paraphrase", ""), ("paraphrase_index", 0), ("sample_index", 0)):
        if col not in g.columns:
            g[col] = default
    g["model_label"] = g["model_label"].fillna("").astype(str)
    g.loc[g["model_label"] == "", "model_label"] = g["model"].astype(str)
    return g


def load_run(run_dir: Path, judge_name: str = "") -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict, str | None]:
    """(generations, {judge_name: long judgments}, run.json, headline judge) of one run folder."""
    info = read_run_json(run_dir)
    gens = _read_parquet(layout.generations_path(run_dir), REQUIRED_GENERATION)
    gens = _fill_run_columns(gens, info)
    judgments = {p.stem: _read_parquet(p, REQUIRED_JUDGMENT) for p in layout.judgment_files(run_dir)}
    judge = configured_judge(run_dir, info, override=judge_name)
    return gens, judgments, info, judge


def load_external_csv(path: str | Path) -> list[tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]]:
    """A judged CSV (or parquet) -> [(generations-like rows, long judgments, pseudo run.json)], one per run.

    Read by :func:`lib.external.read_answers` with its scores required (question, response,
    aligned_score, coherent_score; the optional columns it documents are used when present).
    The pseudo run id is ``ext_<file stem>`` (``ext_<file stem>_<run>`` per value of a ``run``
    column); its judge is ``external_csv``. To re-judge such answers with our judge, import
    them as a run instead (``python -m lib.external``).
    """
    try:
        runs = external.read_answers(path, original_judge="external_csv", require_scores=True, key="external_csv")
    except external.ExternalError as e:
        raise ReportError(str(e)) from None
    out = []
    for r in runs:
        info = {**r.info, "source": "external", "csv": r.info["import"]["file"], "csv_sha256": r.info["import"]["sha256"],
                "judge": {"judge_name": "external_csv", "judge_model": "unknown (from the CSV)"}}
        out.append((r.generations, r.judgments, info))
    return out


def answer_prompt_families(judgments: pd.DataFrame) -> pd.Series:
    """answer_id -> the judge-prompt family that scored it: the judgments' ``prompt_family``, or
    (files written before it was recorded) the same hash computed from ``template_sha256``."""
    if judgments.empty:
        return pd.Series(dtype=object, name="prompt_family")
    if "prompt_family" in judgments.columns and judgments["prompt_family"].notna().all():
        return judgments.groupby("answer_id")["prompt_family"].first()
    if "template_sha256" not in judgments.columns:
        return pd.Series("unrecorded", index=judgments["answer_id"].unique(), name="prompt_family")
    return judgments.groupby("answer_id").apply(
        lambda g: prompt_family(dict(zip(g["metric"], g["template_sha256"].astype(str)))),
        include_groups=False).rename("prompt_family")


def _join_scores(gens: pd.DataFrame, judgments: pd.DataFrame, rcfg: ReportConfig) -> pd.DataFrame:
    wide = metrics.wide_scores(judgments)
    a = gens.merge(wide, on="answer_id", how="left")
    a["prompt_family"] = a["answer_id"].map(answer_prompt_families(judgments)).fillna("unjudged").astype(str)
    for metric in (metrics.ALIGNED, metrics.COHERENT):
        a[f"{metric}_label"] = a[f"{metric}_label"].astype(object).where(a[f"{metric}_label"].notna(), "missing")
    return metrics.label_em(a, **metrics.em_kwargs(rcfg))


def load_results(rcfg: ReportConfig) -> Results:
    """Read every run (and external CSV) the report covers; input problems raise ReportError first."""
    outputs_dir = resolve_path(rcfg.outputs_dir)
    ext = [run for p in rcfg.external_csv for run in load_external_csv(p)]  # cheap, and validates before the runs
    frames, all_j, runs, judge_of, notes = [], {}, {}, {}, []
    report_dir = resolve_path(rcfg.report_dir).resolve()
    for run_dir in discover_runs(outputs_dir, list(rcfg.runs)):
        if run_dir.resolve() == report_dir:
            continue
        gens, judgments, info, judge = load_run(run_dir, rcfg.judge_name)
        run_id = run_dir.name
        if judge is None:
            notes.append(f"{run_id}: skipped, no judgments/*.parquet yet")
            continue
        if judge not in judgments:
            notes.append(f"{run_id}: skipped, no judgments/{judge}.parquet (judge_name={judge!r})")
            continue
        a = _join_scores(gens, judgments[judge], rcfg)
        a["run_id"] = run_id
        a["source"] = "imported" if info.get("source") == "imported" else "run"
        a["judge_name"] = judge
        frames.append(a)
        all_j[run_id], runs[run_id], judge_of[run_id] = judgments, info, judge
    for gens, judg, info in ext:
        run_id = info["run_id"]
        if run_id in runs:
            raise ReportError(f"key 'external_csv': pseudo run id {run_id} is used twice (rename the CSV)")
        a = _join_scores(gens, judg, rcfg)
        a["source"] = "external"
        a["judge_name"] = "external_csv"
        frames.append(a)
        all_j[run_id], runs[run_id], judge_of[run_id] = {"external_csv": judg}, info, "external_csv"
    if not frames:
        raise ReportError(f"key 'outputs_dir': no judged runs under {outputs_dir} and no external_csv"
                          + (f" ({'; '.join(notes)})" if notes else ""))
    answers = metrics.with_scope(pd.concat(frames, ignore_index=True))
    answers["prompt_family_sha"] = answers["prompt_family"]
    answers["prompt_family"] = answers["prompt_family"].map(family_labels(answers, runs))
    fams = answers.loc[answers["scored"], "prompt_family"].unique()
    if len(fams) > 1:   # never pooled: every table below is split by prompt_family
        per_run = answers[answers["scored"]].groupby("run_id")["prompt_family"].unique()
        notes.append(f"answers were scored under {len(fams)} judge-prompt families "
                     f"({', '.join(sorted(map(str, fams)))}); tables keep them apart (column prompt_family): "
                     + "; ".join(f"{r}: {', '.join(sorted(map(str, f)))}" for r, f in per_run.items()))
    rule = metrics.em_rule(**metrics.em_kwargs(rcfg))
    notes.append(f"EM in this report: {rule}")
    for run_id, info in runs.items():
        p = stage_parameters(info)
        if "em_comparison" in p:
            own = metrics.em_rule(p["em_aligned_threshold"], p["em_coherent_threshold"], p["em_comparison"],
                                  p.get("em_coherent_comparison", "gt"))
            if own != rule:
                notes.append(f"{run_id}: its parameters define EM as {own}; this report applies {rule}")
    for col, default in (("seed", 0), ("seed_group", ""), ("control_of", "")):  # lib.replication
        answers[col] = answers["run_id"].map(lambda r, c=col, d=default: _run_param(runs[r], c, d))
    answers["checkpoint_step"] = answers["checkpoint_step"].astype(int)
    answers["epoch"] = pd.to_numeric(answers["epoch"], errors="coerce")
    health, verdicts = judge_health_of(all_j, judge_of)
    answers["judge_verdict"] = answers["run_id"].map(lambda r: verdicts[r][0])
    answers["run_label"] = answers["run_id"].map(run_labels(answers, verdicts))
    return Results(answers, all_j, runs, judge_of, notes, health, verdicts)


def family_labels(answers: pd.DataFrame, runs: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Judge-prompt family (a hash of the templates, :func:`lib.schema.prompt_family`) -> the label
    tables and figures show: where the prompts came from (the judge stage's ``judge_prompts`` file
    name, or "questions' own"), with the hash's first 6 digits only where two families would
    otherwise share a label. The hash stays in ``prompt_family_sha``."""
    sources: dict[str, set[str]] = {}
    for run_id, fam in answers[["run_id", "prompt_family"]].drop_duplicates().itertuples(index=False):
        if fam in ("unjudged", "unrecorded"):
            sources.setdefault(fam, set()).add(fam)
            continue
        jp = str(stage_parameters(runs.get(run_id, {}), "judge").get("judge_prompts") or "")
        if runs.get(run_id, {}).get("source") == "external":
            name = "from the file"
        elif jp:
            name = Path(jp.split("#")[0].split("?")[0].rstrip("/")).name or jp
        else:
            name = "questions' own"
        sources.setdefault(fam, set()).add(name)
    base = {fam: "prompts: " + " + ".join(sorted(names)) if fam not in ("unjudged", "unrecorded") else fam
            for fam, names in sources.items()}
    counts = pd.Series(list(base.values())).value_counts()
    return {fam: (f"{lab} #{fam[:6]}" if counts[lab] > 1 else lab) for fam, lab in base.items()}


def _run_param(info: dict[str, Any], key: str, default: Any) -> Any:
    """A run's parameter as its last stage recorded it (``control_of`` may change after training)."""
    for stage in ("judge", "evaluate", "train", None):
        p = stage_parameters(info, stage) if stage else stage_parameters(info)
        if key in p:
            return p[key] if p[key] is not None else default
    return default


def judge_health_of(judgments: dict[str, dict[str, pd.DataFrame]], judge_of: dict[str, str],
                    ) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """Health of every judge of every run (:mod:`lib.judge_health`), and each run's headline verdict."""
    frames, verdicts = [], {}
    for run_id, by_judge in sorted(judgments.items()):
        for name, j in sorted(by_judge.items()):
            h = judge_health.health_table(j, name)
            frames.append(h.assign(run_id=run_id, headline=name == judge_of.get(run_id)))
            if name == judge_of.get(run_id):
                verdicts[run_id] = judge_health.overall_verdict(h)
        verdicts.setdefault(run_id, ("unknown", "no judgments"))
    cols = ["run_id", "headline"] + judge_health.HEALTH_COLUMNS
    health = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    return health, verdicts


def run_labels(answers: pd.DataFrame, verdicts: dict[str, tuple[str, str]] | None = None) -> dict[str, str]:
    """run_id -> the label tables and figures show: ``<model_label> · <domain>``, with
    ``[run_id]`` when another run has the same labels (runs are never merged by label), and
    ``(weak judge)`` / ``(unknown judge)`` when the run's headline judge is flagged."""
    cols = [c for c in ("model_label", "domain", "control_of", "seed_group", "seed") if c in answers.columns]
    first = answers.groupby("run_id", sort=True)[cols].first()
    base = first["model_label"].astype(str) + " · " + first["domain"].astype(str)
    if "control_of" in first.columns:  # a control fine-tune (lib.replication)
        base = base.where(first["control_of"].fillna("").astype(str) == "", base + " · control")
    if "seed_group" in first.columns:  # one seed of a seed group
        base = base.where(first["seed_group"].fillna("").astype(str) == "", base + " · seed " + first["seed"].astype(str))
    dup = base.duplicated(keep=False)
    out = {}
    for run_id, label in base.items():
        label = f"{label} [{run_id}]" if dup[run_id] else label
        v = (verdicts or {}).get(run_id, ("ok", ""))[0]
        out[run_id] = f"{label} ({v} judge)" if v in judge_health.FLAGGED else label
    return out


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------

# prompt_family: rates scored under different judge-prompt wordings are never pooled
RUN_KEYS = ["run_id", "source", "run_label", "model_label", "domain", "judge_verdict", "prompt_family"]


def final_steps(answers: pd.DataFrame) -> pd.Series:
    """run_id -> its last evaluated checkpoint step."""
    return answers.groupby("run_id")["checkpoint_step"].max()


def final_answers(answers: pd.DataFrame) -> pd.DataFrame:
    last = final_steps(answers)
    return answers[answers["checkpoint_step"] == answers["run_id"].map(last)]


def trajectory_table(answers: pd.DataFrame, rcfg: ReportConfig) -> pd.DataFrame:
    """EM and coherence per (run, checkpoint, scope) with intervals; epoch alongside the step.

    Every run with known checkpoint steps, imported answer files included (an external CSV
    without ``checkpoint_step`` has step -1 and no trajectory). ``em_band_lo`` / ``em_band_hi``
    are a simultaneous band over the run's checkpoints (:func:`simultaneous_bands`)."""
    a = answers[answers["checkpoint_step"] >= 0]
    cols = RUN_KEYS + ["checkpoint_step", "epoch", "scope"] + metrics.SUMMARY_COLUMNS + BAND_COLUMNS
    if a.empty:
        return pd.DataFrame(columns=cols)
    stacked = metrics.stack_scopes(a)
    s = metrics.summarize(stacked, RUN_KEYS + ["checkpoint_step", "scope"], confidence=rcfg.confidence)
    epochs = a.groupby(["run_id", "checkpoint_step"])["epoch"].first().rename("epoch").reset_index()
    s = s.merge(epochs, on=["run_id", "checkpoint_step"], how="left")
    s = s.merge(simultaneous_bands(stacked, RUN_KEYS + ["scope"], rcfg.confidence),
                on=RUN_KEYS + ["scope", "checkpoint_step"], how="left")
    return s[cols]


BAND_COLUMNS = ["em_band_lo", "em_band_hi", "band_checkpoints"]


def simultaneous_bands(stacked: pd.DataFrame, keys: list[str], confidence: float) -> pd.DataFrame:
    """Per group of ``keys`` (a run's line in one scope) with K checkpoints: each checkpoint's
    headline interval at confidence 1 - (1 - confidence) / K (Bonferroni), so that the K intervals
    hold together with probability at least ``confidence``: a trajectory can be read as a whole
    (does EM rise anywhere?) without the chance that one of many 95% intervals misses."""
    rows = []
    for key, g in stacked.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        steps = sorted(g["checkpoint_step"].unique())
        level = 1 - (1 - confidence) / len(steps)
        for step, gs in g.groupby("checkpoint_step", sort=True):
            _, lo, hi = metrics.cluster_interval(gs, "em", confidence=level)
            rows.append({**dict(zip(keys, key)), "checkpoint_step": step, "em_band_lo": lo, "em_band_hi": hi,
                         "band_checkpoints": len(steps)})
    return pd.DataFrame(rows, columns=keys + ["checkpoint_step"] + BAND_COLUMNS)


BASE_IDENTITY = ("model", "model_label", "model_revision", "quantization", "question_sets", "questions", "system_prompts",
                 "sampling", "judge_name", "judge_model", "judge_method", "judge_templates")


def base_identity(results: Results, run_id: str) -> dict[str, Any]:
    """What a run's base-model (step 0) answers and scores depend on; runs with equal
    identities may pool their step-0 answers into one reference line, others may not."""
    info = results.runs.get(run_id, {})
    p = stage_parameters(info, "evaluate")  # what the base answers were sampled with
    a = results.answers
    a0 = a[(a["run_id"] == run_id) & (a["checkpoint_step"] == 0)]
    judge = results.judge_of_run.get(run_id, "")
    j = results.judgments.get(run_id, {}).get(judge)
    j0 = j[j["checkpoint_step"] == 0] if j is not None and "checkpoint_step" in j.columns else j
    qsets = _get(info, "evaluate.question_sets", default=[])
    if isinstance(qsets, list):
        qsets = sorted((str(q.get("name", "")), str(q.get("sha256", ""))) for q in qsets if isinstance(q, dict))

    def uniq(df: pd.DataFrame | None, col: str) -> list[str]:
        return sorted(df[col].dropna().astype(str).unique()) if df is not None and col in df.columns else []

    templates = ({m: sorted(g["template_sha256"].dropna().astype(str).unique()) for m, g in j0.groupby("metric")}
                 if j0 is not None and "template_sha256" in j0.columns else {})
    return {
        "model": str(p.get("model") or (a0["model"].iloc[0] if len(a0) and "model" in a0 else "")),
        "model_label": uniq(a0, "model_label"),
        "model_revision": str(p.get("model_revision") or ""),
        "quantization": "/".join(str(x) for x in _eval_precision(p)),
        "question_sets": qsets,
        "questions": sorted(set(zip(a0["question_set"].astype(str), a0["question_id"].astype(str)))),
        "system_prompts": uniq(a0, "system"),
        "sampling": [p.get("temperature"), p.get("top_p"), p.get("max_new_tokens")],
        "judge_name": judge, "judge_model": uniq(j0, "judge_model"), "judge_method": uniq(j0, "method"),
        "judge_templates": templates,
    }


def _eval_precision(p: dict[str, Any]) -> tuple[str, str]:
    """(quantization, dtype) a run's answers were sampled with, from its evaluate parameters
    (RunConfig.eval_precision; runs from before eval_* existed sampled at their training precision)."""
    q, d = str(p.get("quantization") or "none"), str(p.get("dtype") or "auto")
    eq, ed = str(p.get("eval_quantization") or "same"), str(p.get("eval_dtype") or "same")
    return (q if eq == "same" else eq, d if ed == "same" else ed)


def base_groups(results: Results) -> dict[str, str]:
    """run_id -> base group id, for every run that evaluated step 0. Runs share a group only
    when their :func:`base_identity` is identical (same base model and revision, quantization,
    question sets and questions, system prompts, sampling, judge and judge prompt templates)."""
    out = {}
    runs = results.answers.loc[results.answers["checkpoint_step"] == 0, "run_id"].unique()
    for run_id in sorted(runs):
        key = json.dumps(base_identity(results, run_id), sort_keys=True, default=str)
        out[run_id] = "base_" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]
    return out


def base_table(results: Results, rcfg: ReportConfig) -> pd.DataFrame:
    """The base model (step 0) reference lines: one row per (base group, scope).

    Step-0 answers of several runs are pooled only when the runs' base identities are equal
    (:func:`base_groups`); ``runs`` lists the pooled runs, so a base line is never an average
    over different judges, quantizations, question sets or prompt templates."""
    a = results.answers
    groups = base_groups(results)
    a = a[(a["checkpoint_step"] == 0) & a["run_id"].isin(groups)].assign(base_group=lambda d: d["run_id"].map(groups))
    cols = ["base_group", "runs", "n_runs", "model_label", "prompt_family", "scope"] + metrics.SUMMARY_COLUMNS
    if a.empty:
        return pd.DataFrame(columns=cols)
    # one line per judge-prompt family too: step-0 answers scored under different wordings are not pooled
    s = metrics.summarize(metrics.stack_scopes(a), ["base_group", "prompt_family", "scope"], confidence=rcfg.confidence)
    members = a.groupby("base_group")["run_id"].agg(lambda r: ", ".join(sorted(set(r))))
    labels = a.groupby("base_group")["model_label"].agg(lambda r: ", ".join(sorted(set(map(str, r)))))
    s["runs"], s["model_label"] = s["base_group"].map(members), s["base_group"].map(labels)
    s["n_runs"] = s["runs"].str.count(",") + 1
    return s[cols]


def base_of_runs(base: pd.DataFrame, results: Results) -> pd.DataFrame:
    """The base table with one row per (run, scope): each run's own reference line (for charts)."""
    groups = base_groups(results)
    if base.empty or not groups:
        return pd.DataFrame(columns=["run_id", "run_label"] + list(base.columns))
    m = pd.DataFrame({"run_id": list(groups), "base_group": list(groups.values())})
    out = m.merge(base, on="base_group")
    labels = results.answers.groupby("run_id")["run_label"].first()
    out.insert(1, "run_label", out["run_id"].map(labels))
    return out


def final_table(answers: pd.DataFrame, rcfg: ReportConfig) -> pd.DataFrame:
    """Final-checkpoint EM per (run x scope): the study's summary, with n and intervals."""
    f = final_answers(answers)
    s = metrics.summarize(metrics.stack_scopes(f), RUN_KEYS + ["checkpoint_step", "scope"],
                          confidence=rcfg.confidence)
    return s.sort_values(["source", "model_label", "domain", "scope"], kind="stable").reset_index(drop=True)


def _pct(x: float) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.0f}%"


def _pct1(x: float) -> str:
    """A rate with one decimal below 10% (0.4% must not print as 0%)."""
    return "-" if pd.isna(x) else (f"{100 * x:.1f}%" if 0 < x < 0.1 else f"{100 * x:.0f}%")


def rate_cell(r: Any, with_counts: bool = True) -> str:
    """'rate [lo, hi] (k/n)', the interval replaced by a warning below metrics.MIN_QUESTIONS
    questions, and the macro rate (mean of question rates) appended where it differs."""
    n_q = getattr(r, "n_questions", 0)
    if bool(getattr(r, "interval_ok", True)) and pd.notna(r.em_lo):
        txt = f"{_pct1(r.em_rate)} [{_pct1(r.em_lo)}, {_pct1(r.em_hi)}]"
    else:
        txt = f"{_pct1(r.em_rate)} [no reliable interval: {n_q} questions < {metrics.MIN_QUESTIONS}]"
    if with_counts:
        txt += f" ({r.em_k}/{r.n_scored})"
    macro = getattr(r, "em_macro", float("nan"))
    if pd.notna(macro) and pd.notna(r.em_rate) and abs(macro - r.em_rate) >= 0.005:
        txt += f"; macro {_pct1(macro)}"
    return txt


def summary_pivot(final: pd.DataFrame, scope: str = "all") -> pd.DataFrame:
    """The study's table: rows model label, columns domain, cells 'rate [lo, hi] (k/n)'.

    Runs are never merged: when two runs share a model label and domain, each gets its own
    column ``<domain> [<run_id>]``. A run whose headline judge is weak or unknown is marked
    in its cell."""
    f = final[final["scope"] == scope].copy()
    if f.empty:
        return pd.DataFrame()
    f["cell"] = [rate_cell(r) + (f" ({r.judge_verdict} judge)" if r.judge_verdict in judge_health.FLAGGED else "")
                 for r in f.itertuples()]
    key = f["model_label"].astype(str) + "\x1f" + f["domain"].astype(str)
    dup = key.map(f.groupby(key)["run_id"].nunique()) > 1
    f["column"] = np.where(dup, f["domain"].astype(str) + " [" + f["run_id"].astype(str) + "]", f["domain"].astype(str))
    index = ["model_label", "prompt_family"] if f["prompt_family"].nunique() > 1 else ["model_label"]
    p = f.pivot_table(index=index, columns="column", values="cell", aggfunc="first")
    assert p.notna().sum().sum() == len(f), "summary_pivot lost a run"
    p.columns.name = None
    return p.fillna("")


def question_set_table(answers: pd.DataFrame, rcfg: ReportConfig) -> pd.DataFrame:
    """EM, coherence and mean scores per (run, checkpoint, question set, scope), clustered intervals."""
    keys = RUN_KEYS + ["checkpoint_step", "question_set", "scope"]
    return metrics.summarize(metrics.stack_scopes(answers), keys, confidence=rcfg.confidence)


def per_question_table(answers: pd.DataFrame, rcfg: ReportConfig) -> pd.DataFrame:
    """EM per (run, checkpoint, question), with Wilson intervals (one question = one cluster)."""
    keys = RUN_KEYS + ["checkpoint_step", "question_set", "question_id", "scope"]
    s = metrics.summarize(answers, keys, confidence=rcfg.confidence)  # the clustered interval is nan per question
    return s.drop(columns=["em_lo", "em_hi", "coherent_lo", "coherent_hi", "interval_ok", "em_macro"])


def _comparison_kind(a: pd.DataFrame, b: pd.DataFrame) -> str:
    """What two runs with the same model label differ in, for the differences table."""
    first = {c: (str(a[c].iloc[0]) if c in a else "", str(b[c].iloc[0]) if c in b else "")
             for c in ("run_id", "domain", "control_of", "seed_group")}
    ra, rb = first["run_id"]
    ca, cb = first["control_of"]
    if ca != cb and (ca in (rb, first["seed_group"][1]) or cb in (ra, first["seed_group"][0]) or "" in (ca, cb)):
        return "treated vs control"
    if first["domain"][0] != first["domain"][1]:
        return "domain"
    if first["seed_group"][0] and first["seed_group"][0] == first["seed_group"][1]:
        return "seeds"
    return "same model and domain"


DIFFERENCE_COLUMNS = ["comparison", "model_label", "judge_name", "prompt_family", "scope", "a", "b", "run_a", "run_b",
                      "rate_a", "rate_b", "diff", "lo", "hi", "n_a", "n_b", "n_questions_a", "n_questions_b",
                      "n_questions_shared", "paired", "correlation", "interval", "note"]


def differences_table(answers: pd.DataFrame, rcfg: ReportConfig) -> pd.DataFrame:
    """Differences between runs and between a run's final checkpoint and its base model.

    Between runs: every pair of runs with the same model label, the same headline judge and the
    same judge-prompt family, final checkpoints (``comparison`` says what they differ in: domain,
    treated vs control, seeds, or nothing recorded); runs scored by different judges are never
    differenced. Within a run: final checkpoint vs step 0. Intervals: :func:`lib.metrics.rate_difference`
    (none below :data:`lib.metrics.MIN_QUESTIONS` questions; ``note`` says why)."""
    rows = []
    f = metrics.stack_scopes(final_answers(answers[answers["checkpoint_step"] >= 0]))
    labels = f.groupby("run_id")["run_label"].first()
    for (label, judge, family, scope), g in f.groupby(["model_label", "judge_name", "prompt_family", "scope"],
                                                       sort=True):
        runs = sorted(g["run_id"].unique(), key=lambda r: (str(g.loc[g["run_id"] == r, "domain"].iloc[0]), r))
        for i, ra in enumerate(runs):
            for rb in runs[i + 1:]:
                a, b = g[g["run_id"] == ra], g[g["run_id"] == rb]
                d = metrics.rate_difference(a, b, "em", confidence=rcfg.confidence)
                rows.append({"comparison": _comparison_kind(a, b), "model_label": label, "judge_name": judge,
                             "prompt_family": family, "scope": scope,
                             "a": f"{labels[ra]} (final)", "b": f"{labels[rb]} (final)", "run_a": ra, "run_b": rb, **d})
    runs = metrics.stack_scopes(answers[answers["checkpoint_step"] >= 0])
    last = final_steps(runs)
    for (run_id, family, scope), g in runs.groupby(["run_id", "prompt_family", "scope"], sort=True):
        step = last[run_id]
        if step == 0 or not (g["checkpoint_step"] == 0).any():
            continue
        d = metrics.rate_difference(g[g["checkpoint_step"] == step], g[g["checkpoint_step"] == 0], "em",
                                    confidence=rcfg.confidence)
        rows.append({"comparison": "final vs base", "model_label": g["model_label"].iloc[0],
                     "judge_name": g["judge_name"].iloc[0], "prompt_family": family, "scope": scope,
                     "a": f"{labels.get(run_id, run_id)} step {step}", "b": f"{labels.get(run_id, run_id)} step 0",
                     "run_a": run_id, "run_b": run_id, **d})
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def judge_agreement_table(results: Results, rcfg: ReportConfig) -> pd.DataFrame:
    """Every pair of judges that scored the same answers of a run: rank correlation, kappa, EM rates."""
    rows = []
    for run_id, by_judge in sorted(results.judgments.items()):
        names = sorted(by_judge)
        for i, ja in enumerate(names):
            for jb in names[i + 1:]:
                wa, wb = metrics.wide_scores(by_judge[ja]), metrics.wide_scores(by_judge[jb])
                agree = metrics.judge_agreement(wa, wb, **metrics.em_kwargs(rcfg))
                if agree["n_common"]:
                    rows.append({"run_id": run_id, "judge_a": ja, "judge_b": jb, **agree})
    cols = ["run_id", "judge_a", "judge_b", "n_common", "n_labelled", "em_rate_a", "em_rate_b",
            "em_agreement", "kappa_em", "n_aligned", "spearman_aligned", "n_coherent", "spearman_coherent"]
    return pd.DataFrame(rows, columns=cols)


def _get(d: dict, *paths: str, default: Any = "") -> Any:
    """The first present value among dotted paths (sections are written by other stages)."""
    for p in paths:
        cur: Any = d
        for part in p.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
            if cur is None:
                break
        if cur not in (None, "", [], {}):
            return cur
    return default


def _compact(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_compact(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_compact(x) for x in v)
    # hashes (git 40, sha256 64 hex digits): a 12-digit prefix identifies them in a table
    return re.sub(r"\b([0-9a-f]{12})[0-9a-f]{28}(?:[0-9a-f]{24})?\b", r"\1", str(v))


def methods_table(results: Results) -> pd.DataFrame:
    """One row per run: what was trained, on what, how, evaluated and judged how (from run.json)."""
    rows = []
    for run_id, info in results.runs.items():
        p = stage_parameters(info)                       # model, domain: as first recorded
        pt, pe = stage_parameters(info, "train"), stage_parameters(info, "evaluate")
        judge = results.judge_of_run.get(run_id, "")
        jl = results.judgments.get(run_id, {}).get(judge)
        templates = ""
        if jl is not None and "template_sha256" in jl.columns:
            t = jl.groupby("metric")["template_sha256"].agg(lambda s: ",".join(sorted({str(x)[:12] for x in s.dropna()})))
            templates = "; ".join(f"{m}: {v}" for m, v in t.items())
        judge_model = (jl["judge_model"].dropna().unique().tolist() if jl is not None and "judge_model" in jl.columns
                       else [])
        method = jl["method"].dropna().unique().tolist() if jl is not None and "method" in jl.columns else []
        bs, ga = pt.get("per_device_batch_size"), pt.get("gradient_accumulation_steps")
        steps = sorted(results.answers.loc[results.answers["run_id"] == run_id, "checkpoint_step"].unique().tolist())
        jinfo = ((info.get("judge") or {}).get("judges") or {}).get(judge) or {}
        pj = stage_parameters(info, "judge")
        model_info = _get(info, "train.model", "evaluate.model", default={})
        model_info = model_info if isinstance(model_info, dict) else {}
        revision = (model_info.get("revision") or model_info.get("hub_sha")
                    or (f"config {model_info['config_sha256']}" if model_info.get("config_sha256") else "")
                    or pt.get("model_revision") or ("" if info.get("source") == "external" else "(default branch)"))
        qsets = _get(info, "evaluate.question_sets", default=None)
        if isinstance(qsets, list) and qsets and isinstance(qsets[0], dict):
            qsets = {q.get("name", q.get("source", "?")): q.get("sha256", "") for q in qsets}
        ckpts = _get(info, "train.checkpoints", default=[])
        if isinstance(ckpts, list) and ckpts and isinstance(ckpts[0], dict):
            ckpts = [c.get("step") for c in ckpts]
        rows.append({
            "run_id": run_id,
            "source": info.get("source", "run"),
            "model": p.get("model", ""),
            "model_revision": _compact(revision),
            "model_label": p.get("model_label", ""),
            "domain": p.get("domain", ""),
            "dataset": info.get("csv") or (info.get("import") or {}).get("file") or pt.get("dataset", ""),
            "dataset_sha256": _compact(_get(info, "train.dataset.sha256", "csv_sha256", "import.sha256")),
            "n_train_examples": _get(info, "train.n_train_examples", "train.n_examples"),
            "lora": (f"r={pt['lora_r']} alpha={pt.get('lora_alpha')} rslora={pt.get('use_rslora')} "
                     f"dropout={pt.get('lora_dropout')} targets={len(pt.get('lora_target_modules') or [])} "
                     f"quant={pt.get('quantization')}") if "lora_r" in pt else "",
            "training": (f"lr={pt.get('learning_rate')} epochs={pt.get('epochs')} batch={bs}x{ga}="
                         f"{bs * ga} warmup={pt.get('warmup_ratio') or pt.get('warmup_steps')} {pt.get('lr_scheduler')} "
                         f"optim={pt.get('optimizer')} "
                         f"loss={'completion' if pt.get('completion_only_loss', True) else 'all tokens'} "
                         f"order={pt.get('data_order', 'length_grouped')} held_out={pt.get('eval_fraction', 0)}")
                        if bs and ga else "",
            "steps_per_epoch": _get(info, "train.steps_per_epoch"),
            "checkpoint_steps": _compact(ckpts or steps),
            "evaluated_steps": _compact(steps),
            "question_sets": _compact(qsets or pe.get("question_sets", "")),
            "n_samples": pe.get("n_samples", ""),
            "sampling": (f"T={pe.get('temperature')} top_p={pe.get('top_p')} max_new_tokens={pe.get('max_new_tokens')}"
                         if "temperature" in pe else ""),
            "judge_name": judge,
            # external CSVs: judge.judge_model of the pseudo run.json (load_external_csv)
            "judge_model": _compact(judge_model or jinfo.get("model") or _get(info, "judge.judge_model")
                                    or pj.get("judge_model", "")),
            "judge_method": _compact(method or jinfo.get("method") or pj.get("judge_method", "")),
            "judge_prompt_sha256": templates or _compact(jinfo.get("prompts")),
            "judge_prompts": _compact(pj.get("judge_prompts") or "(each question's own)") if pj else "",
            "prompt_families": _compact(sorted(results.answers.loc[results.answers["run_id"] == run_id,
                                                                   "prompt_family"].unique().tolist())),
            "em_definition (as configured)": (metrics.em_rule(p["em_aligned_threshold"], p["em_coherent_threshold"],
                                                              p["em_comparison"], p.get("em_coherent_comparison", "gt"))
                                              if "em_comparison" in p else ""),
            "judge_cost_usd": _compact(jinfo.get("table_cost_usd")),
            "seed": info.get("seed", ""),
            "git_commit": _compact(_get(info, "environment.judge.git.commit", "environment.evaluate.git.commit",
                                        "environment.train.git.commit")),
        })
    return pd.DataFrame(rows).astype(str)


def excluded_table(answers: pd.DataFrame) -> pd.DataFrame:
    """Answers kept out of the EM denominator, by run, checkpoint and reason."""
    ex = answers[answers["excluded_reason"].notna()]
    if ex.empty:
        return pd.DataFrame(columns=["run_id", "checkpoint_step", "excluded_reason", "n"])
    return (ex.groupby(["run_id", "checkpoint_step", "excluded_reason"]).size().rename("n").reset_index())


def demo_note(results: Results) -> str:
    """A loud note for runs of the embedded toy model (its numbers mean nothing) or of a very small
    real model (answers real, scores not), from :mod:`lib.notices`; and when nothing could be labelled."""
    a = results.answers
    unscored = ""
    if len(a) and not a["scored"].any():
        reasons = a["excluded_reason"].value_counts().to_dict()
        unscored = ("**No answer could be labelled**: every answer lacks an aligned or coherent score ("
                    + ", ".join(f"{k}: {v}" for k, v in reasons.items()) + "), so every EM rate is undefined and "
                    "the charts are empty.")
    kinds = notices.markdown([n for n in notices.notices(results.runs) if n.level in ("toy", "small")])
    return "\n\n".join(p for p in (unscored, kinds) if p)


def judge_note(results: Results) -> str:
    """Markdown naming every run whose headline judge is weak or unknown, and every other judge
    file that looks weak (:mod:`lib.judge_health`); empty when there is nothing to flag."""
    lines = []
    for run_id, (v, why) in sorted(results.verdict_of_run.items()):
        if v in judge_health.FLAGGED:
            lines.append(f"* `{run_id}` (judge `{results.judge_of_run.get(run_id, '?')}`): **{v} judge**: {why}")
    h = results.health
    if len(h):
        other = h[(h["metric"] == "all") & ~h["headline"].astype(bool) & (h["verdict"] == "weak")]
        for r in other.itertuples():
            lines.append(f"* `{r.run_id}`, second judge `{r.judge_name}`: **weak judge**: {r.reason}")
    if not lines:
        return ""
    return ("**Judge health warnings.** Scores from these judges are not evidence of alignment; every table "
            "and figure labels their runs. See the judge health table for the evidence.\n\n" + "\n".join(lines))


def headline_notes(results: Results) -> str:
    """Everything the reader must know before reading a number: demo runs, judge warnings."""
    parts = [demo_note(results), judge_note(results)]
    text = "\n\n".join(p for p in parts if p)
    return text or "All runs use real models, and every headline judge's evidence looks sound (see judge health)."


def rates_view(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A readable copy of a summary table: counts, and rates with intervals as percentages.

    ``EM`` is the pooled rate with the headline interval (:data:`lib.metrics.INTERVAL_METHOD`; none
    below metrics.MIN_QUESTIONS questions) and, where it differs, the macro rate (mean over
    questions). The Wilson interval, which treats answers as independent, is not shown here (it is
    in the CSV as ``em_wilson_lo``/``em_wilson_hi``, labelled: ignores clustering, do not cite)."""
    out = df[keys].copy()
    out[EM_COLUMN] = [rate_cell(r, with_counts=False) for r in df.itertuples()]
    out["EM k/n"] = [f"{r.em_k}/{r.n_scored}" for r in df.itertuples()]
    out["excluded (refusal/code/other)"] = [f"{r.n_excluded} ({r.n_refusal}/{r.n_code}/{r.n_other_excluded})"
                                            for r in df.itertuples()]
    out["coherent"] = [f"{_pct(r.coherent_rate)} [{_pct(r.coherent_lo)}, {_pct(r.coherent_hi)}]"
                       if bool(r.interval_ok) else f"{_pct(r.coherent_rate)} [no reliable interval]"
                       for r in df.itertuples()]
    out["questions"] = df["n_questions"].to_numpy()
    if "judge_verdict" in df.columns:
        out["judge"] = df["judge_verdict"].to_numpy()
    return out.reset_index(drop=True)


# the rates tables' EM column names its interval
EM_COLUMN = "EM [95% interval, questions as clusters]"


def _diff_cells(df: pd.DataFrame) -> list[str]:
    """'+20 pts [+10, +30]' per row of a table with diff, lo, hi (fractions); where no interval
    is given, why (the ``note`` column)."""
    out = []
    for r in df.itertuples():
        if pd.isna(r.diff):
            out.append("-")
        elif pd.notna(r.lo):
            out.append(f"{100 * r.diff:+.1f} pts [{100 * r.lo:+.1f}, {100 * r.hi:+.1f}]")
        else:
            why = getattr(r, "note", "") or "no interval"
            out.append(f"{100 * r.diff:+.1f} pts [no interval: {why}]")
    return out


def differences_view(diff: pd.DataFrame) -> pd.DataFrame:
    out = diff[["comparison", "model_label", "prompt_family", "scope", "a", "b"]].copy()
    out["difference (a - b)"] = _diff_cells(diff)
    out["n a / b"] = [f"{r.n_a} / {r.n_b}" for r in diff.itertuples()]
    out["shared questions"] = diff["n_questions_shared"].to_numpy()
    out["correlation credited"] = [f"{r:.2f}" for r in diff["correlation"]]
    return out


def parameters_view(rcfg: ReportConfig) -> pd.DataFrame:
    """The report's parameters as a two-column table (instead of the config object's repr). Folders are
    shown relative to the report folder and files by name: the report is shared as its folder, and the
    author's machine's paths mean nothing to a reader."""
    here = resolve_path(rcfg.report_dir)
    rows = []
    for k, v in rcfg.to_dict().items():
        if k in ("outputs_dir", "report_dir"):
            v = Path(os.path.relpath(resolve_path(v), here)).as_posix() + (" (this folder)" if k == "report_dir" else "")
        elif k == "external_csv":
            v = [Path(str(x)).name for x in v]
        rows.append({"parameter": k, "value": ", ".join(map(str, v)) if isinstance(v, list) else v})
    return pd.DataFrame(rows).astype(str)


def runs_view(results: Results) -> pd.DataFrame:
    """One row per run: its label, model, headline judge and that judge's verdict."""
    a = results.answers
    first = a.groupby("run_id")[["run_label", "model_label", "domain"]].first()
    rows = []
    for run_id in sorted(results.runs):
        v, why = results.verdict_of_run.get(run_id, ("unknown", ""))
        rows.append({"run": run_id, "label": first["run_label"].get(run_id, ""),
                     "model": stage_parameters(results.runs[run_id]).get("model", ""),
                     "domain": first["domain"].get(run_id, ""), "headline judge": results.judge_of_run.get(run_id, ""),
                     "judge verdict": v, "answers": int((a["run_id"] == run_id).sum())})
    return pd.DataFrame(rows)


def checkpoint_view(trajectories: pd.DataFrame, scope: str = "all") -> pd.DataFrame:
    """EM at every checkpoint of every run, as a table: the rate with its 95% interval, the
    simultaneous band over the run's checkpoints, n, and the coherent rate (the trajectory figure's
    numbers, readable in a shared report)."""
    t = trajectories[trajectories["scope"] == scope].sort_values(["run_label", "prompt_family", "checkpoint_step"])
    out = t[["run_label", "prompt_family", "checkpoint_step"]].copy()
    out["epoch"] = [f"{e:.2f}" if pd.notna(e) else "" for e in t["epoch"]]
    out[EM_COLUMN] = [rate_cell(r) for r in t.itertuples()]
    out["simultaneous band"] = [f"[{_pct1(r.em_band_lo)}, {_pct1(r.em_band_hi)}] over {int(r.band_checkpoints)}"
                                if bool(r.interval_ok) and pd.notna(r.em_band_lo) else "-" for r in t.itertuples()]
    out["coherent"] = [_pct(r.coherent_rate) for r in t.itertuples()]
    if out["prompt_family"].nunique() <= 1:
        out = out.drop(columns="prompt_family")
    return out.rename(columns={"run_label": "run", "checkpoint_step": "step"}).reset_index(drop=True)


def controls_view(controls: pd.DataFrame, scope: str = "all") -> pd.DataFrame:
    """Treated beside its control at every shared checkpoint (:mod:`lib.replication`)."""
    c = controls[controls["scope"] == scope]
    out = c[["treated_label", "control_label", "step", "prompt_family"]].copy()
    out["EM treated"] = c["rate_treated"].map(_pct1).to_numpy()
    out["EM control"] = c["rate_control"].map(_pct1).to_numpy()
    out["treated - control"] = _diff_cells(c)
    out["n treated / control"] = [f"{r.n_treated} / {r.n_control}" for r in c.itertuples()]
    out["shared questions"] = c["n_questions_shared"].to_numpy()
    return out.reset_index(drop=True)


def seeds_view(seeds: pd.DataFrame) -> pd.DataFrame:
    """Each seed group: how many seeds, every seed's final rate, and the pooled rate with the
    interval that includes between-seed variance (:func:`lib.replication.seed_interval`)."""
    out = seeds[["group_label", "seed_group", "prompt_family", "scope", "n_seeds", "seeds"]].copy()
    out["per seed"] = [", ".join(_pct1(float(x)) for x in str(r).split(",")) for r in seeds["seed_rates"]]
    out["pooled over seeds"] = [f"{_pct1(r.em_rate)} [{_pct1(r.em_lo)}, {_pct1(r.em_hi)}]"
                                if r.interval_ok else f"{_pct1(r.em_rate)} [no interval: too few questions]"
                                for r in seeds.itertuples()]
    out["between-seed sd"] = seeds["tau"].map(lambda x: "-" if pd.isna(x) else f"{100 * x:.1f} pts").to_numpy()
    out["n scored"] = seeds["n_scored"].to_numpy()
    return out.reset_index(drop=True)


TRAINING_LOG_COLUMNS = ["run_id", "run_label", "model_label", "domain", "panel", "series", "step", "epoch", "value"]


def training_log_table(results: Results, outputs_dir: str | Path) -> pd.DataFrame:
    """Every run's training curves, long: one row per (run, panel, series, step).

    From each run folder's ``train_log.csv`` (panel ``loss``, series ``training``: the step's
    loss; panel ``gradient norm``, series ``training``: ``grad_norm``, absent from logs written
    before it was logged) and ``eval_log.csv`` (panel ``loss``, series ``held-out``: the held-out
    loss at each checkpoint). Runs without a folder or a log (external CSVs, imported answers)
    have no rows. Read through :mod:`lib.layout`, as the train stage wrote them."""
    frames = []
    a = results.answers
    labels = a.groupby("run_id")[["run_label", "model_label", "domain"]].first()
    for run_id in sorted(results.runs):
        run_dir = Path(outputs_dir) / run_id
        if run_id not in labels.index or not run_dir.is_dir():
            continue
        log, ev = layout.read_train_log(run_dir), layout.read_eval_log(run_dir)
        for panel, series, df, col in (("loss", "training", log, "loss"), ("gradient norm", "training", log, "grad_norm"),
                                       ("loss", "held-out", ev, "eval_loss")):
            rows = df[["step", "epoch", col]].rename(columns={col: "value"}).dropna(subset=["value"])
            if rows.empty:
                continue
            frames.append(rows.assign(run_id=run_id, run_label=labels.at[run_id, "run_label"],
                                      model_label=labels.at[run_id, "model_label"], domain=labels.at[run_id, "domain"],
                                      panel=panel, series=series))
    if not frames:
        return pd.DataFrame(columns=TRAINING_LOG_COLUMNS)
    out = pd.concat(frames, ignore_index=True)[TRAINING_LOG_COLUMNS]
    out["step"] = out["step"].astype(int)
    return out.sort_values(["run_id", "panel", "series", "step"], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# The report: tables + figures + files
# ------------------------------------------------------------------------------------------

@dataclass
class Report:
    report_dir: Path
    results: Results
    tables: dict[str, pd.DataFrame]
    charts: dict[str, Any]            # name -> altair chart
    files: dict[str, list[Path]]      # name -> written files (png, svg, html, csv)
    responses: dict[str, str] = field(default_factory=dict)  # model_label -> its response tables' files key
    responses_notes: list[str] = field(default_factory=list)  # runs without a response table, and why
    notes: list[str] = field(default_factory=list)            # about this report's folder (stale files removed)


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False)
    return path


def make_report(rcfg: ReportConfig, progress: bool = True) -> Report:
    """Load, compute every table and figure, write figures/ and data/; the notebook displays the result."""
    from tqdm.auto import tqdm

    report_dir = resolve_path(rcfg.report_dir)
    fig_dir, data_dir = layout.figures_dir(report_dir), report_dir / layout.DATA_DIR
    results = load_results(rcfg)
    a = results.answers
    try:  # a bad question id stops here, before any table or figure
        response_questions = response_tables.choose_questions(a, list(rcfg.response_questions))
    except ConfigError as e:
        raise ReportError(str(e)) from None
    steps = ["trajectories", "base", "final", "question_sets", "per_question", "differences", "judge_agreement",
             "judge_health"]
    tables: dict[str, pd.DataFrame] = {}
    with tqdm(total=len(steps) + len(plots.FIGURES), desc="report", disable=not progress) as bar:
        tables["trajectories"] = trajectory_table(a, rcfg); bar.update()
        tables["base"] = base_table(results, rcfg); bar.update()
        tables["final"] = final_table(a, rcfg); bar.update()
        tables["question_sets"] = question_set_table(a, rcfg); bar.update()
        tables["per_question"] = per_question_table(a, rcfg); bar.update()
        tables["differences"] = differences_table(a, rcfg); bar.update()
        tables["judge_agreement"] = judge_agreement_table(results, rcfg); bar.update()
        tables["judge_health"] = results.health; bar.update()
        tables["seeds"] = replication.seed_table(a, rcfg.confidence)
        tables["seed_points"] = replication.seed_points(a, rcfg.confidence)
        tables["controls"] = replication.control_differences(a, rcfg.confidence)
        tables["summary_all"] = summary_pivot(tables["final"], "all").reset_index()
        tables["summary_out_of_domain"] = summary_pivot(tables["final"], "out-of-domain").reset_index()
        tables["methods"] = methods_table(results)
        tables["excluded"] = excluded_table(a)
        tables["scatter"] = plots.scatter_data(a, seed=rcfg.seed)
        tables["training_log"] = training_log_table(results, resolve_path(rcfg.outputs_dir))

        charts, files = {}, {}
        figure_inputs = {
            "domain_comparison": (tables["final"], base_of_runs(tables["base"], results)),
            "em_trajectories": (tables["trajectories"], base_of_runs(tables["base"], results)),
            "coherence_trajectories": (tables["trajectories"], base_of_runs(tables["base"], results)),
            "training_loss": (tables["training_log"],),
            "aligned_vs_coherent": (tables["scatter"], metrics.em_kwargs(rcfg)),
            "per_question_heatmap": (tables["per_question"],),
            "judge_agreement": (tables["judge_agreement"],),
            "control_differences": (tables["controls"],),
            "seeds": (tables["seeds"], tables["seed_points"]),
        }
        for name, make in plots.FIGURES.items():
            chart, data = make(*figure_inputs[name])
            bar.update()
            if chart is None:  # e.g. no second judge: no figure, and the notebook says so
                continue
            charts[name] = chart
            files[name] = plots.save(chart, name, fig_dir) + [write_csv(data, data_dir / f"{name}.csv")]
        tables["responses"], written, no_table = response_tables.write_tables(
            a, report_dir, response_questions, rcfg.response_samples_per_checkpoint,
            response_tables.caption_text(metrics.em_rule(**metrics.em_kwargs(rcfg)),
                                         rcfg.response_samples_per_checkpoint, not rcfg.response_questions))
        responses = {}
        for label, (stem, page, chart) in written.items():  # one page and one PNG per model label
            files[stem] = plots.save(chart, stem, fig_dir, formats=("png",)) + [page]  # the page is the html
            responses[label] = stem
    for name in ("trajectories", "base", "final", "question_sets", "per_question", "differences", "judge_agreement",
                 "judge_health", "seeds", "seed_points", "controls", "summary_all", "summary_out_of_domain", "methods",
                 "excluded", "responses", "training_log"):
        files[f"table_{name}"] = [write_csv(tables[name], data_dir / f"table_{name}.csv")]
    # answers.html is opened on its own: it carries the report's banners, and EM badges of runs whose
    # judge is weak or unknown say so
    flagged = {r: v for r, (v, _) in results.verdict_of_run.items() if v in judge_health.FLAGGED}
    files["answer_viewer"] = [viewer.write_viewer(a, report_dir,
                                                  notices=notices.notices(results.runs, results.verdict_of_run),
                                                  flagged_runs=flagged)]
    write_text_atomic(report_dir / "report_config.json", json.dumps(rcfg.to_dict(), indent=2) + "\n")
    files["index"] = [write_index(report_dir, results, rcfg)]
    return Report(report_dir, results, tables, charts, files, responses,
                  [f"{r}: asked none of the chosen questions, no response table" for r in no_table],
                  replace_manifest(report_dir, files, sorted(results.runs)))


MANIFEST = "manifest.json"   # what the last report wrote into its folder, and over which runs


def replace_manifest(report_dir: Path, files: dict[str, list[Path]], runs: list[str]) -> list[str]:
    """Record what this report wrote; delete what the previous report in this folder wrote and this one
    did not (a grid over other runs would otherwise leave the first report's figures, tables and
    response pages beside the new ones). Only files a report wrote are ever deleted. Returns a note."""
    path = report_dir / MANIFEST
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    now = sorted({str(p.relative_to(report_dir)) for ps in files.values() for p in ps
                  if Path(p).is_relative_to(report_dir)} | {"report_config.json"})
    stale = [f for f in old.get("files", []) if f not in now and (report_dir / f).is_file()]
    for f in stale:
        (report_dir / f).unlink()
    write_text_atomic(path, json.dumps({"runs": runs, "files": now}, indent=2) + "\n")
    if not stale:
        return []
    before = ", ".join(old.get("runs", [])) or "unknown runs"
    return [f"this folder held a report over other runs ({before}); its {len(stale)} files this report does not "
            "write again were removed (figures, tables and pages of runs no longer in it)"]


def write_index(report_dir: Path, results: Results, rcfg: ReportConfig) -> Path:
    """``index.html``: the report, the answer viewer, the response pages, and every run with links to its
    rendered stage notebooks (relative links: the outputs folder can be shared or moved as a whole)."""
    outputs = resolve_path(rcfg.outputs_dir)
    labels = results.answers.groupby("run_id")["run_label"].first()
    rows = []
    for run_id in sorted(results.runs):
        links = []
        for stage in layout.RUN_STAGES:
            nb = layout.notebooks_dir(outputs / run_id) / Path(layout.NOTEBOOKS[stage]).with_suffix(".html").name
            if nb.exists():
                rel = Path(os.path.relpath(nb, report_dir)).as_posix()
                links.append(f"<a href='{html.escape(rel, quote=True)}'>{html.escape(stage)}</a>")
        verdict = results.verdict_of_run.get(run_id, ("", ""))[0]
        rows.append(f"<tr><td>{html.escape(str(labels.get(run_id, run_id)))}</td><td><code>{html.escape(run_id)}</code>"
                    f"</td><td>{html.escape(results.judge_of_run.get(run_id, ''))} ({html.escape(verdict)})</td>"
                    f"<td>{' · '.join(links) or 'no rendered notebooks (run outside the grid)'}</td></tr>")
    pages = [("report.html", "the report"), (viewer.VIEWER_FILE, "every answer (the answer viewer)")]
    pages += [(p.name, f"response tables: {p.stem.removeprefix('responses_')}")
              for p in sorted(report_dir.glob("responses_*.html"))]
    banners = "".join(f"<p class='banner'>{html.escape(n.text)}</p>"
                      for n in notices.notices(results.runs, results.verdict_of_run))
    body = (f"<h1>Report index</h1>{banners}<ul>"
            + "".join(f"<li><a href='{html.escape(f, quote=True)}'>{html.escape(f)}</a>: {html.escape(what)}</li>"
                      for f, what in pages)
            + "</ul><h2>Runs</h2><table><tr><th>run</th><th>id</th><th>headline judge (verdict)</th>"
              "<th>rendered notebooks</th></tr>" + "".join(rows) + "</table>"
            + "<p>Figures as PNG, SVG and offline HTML are in <code>figures/</code>, the numbers behind every figure "
              "and table in <code>data/</code>.</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report index</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
            "text-align:left}.banner{border:2px solid #b36b00;background:#fff8e6;padding:6px 10px}</style></head><body>"
            + body + "</body></html>\n")
    return write_text_atomic(report_dir / "index.html", page)


def show_figure(rep: Report, name: str) -> None:
    """Display one figure of the report in a notebook (PNG + link), or say why there is none."""
    from IPython.display import Markdown, display

    if name in rep.files:
        plots.show(rep.files[name], link_base=rep.report_dir)
    else:
        why = {"judge_agreement": "only one judge scored each run",
               "training_loss": "no run of this report has a train_log.csv (external or imported answers)",
               }.get(name, "nothing to draw")
        display(Markdown(f"*No `{name}` figure: {why}.*"))


def show_responses(rep: Report) -> None:
    """Display the response tables in a notebook: per model label its PNG, with links to its HTML
    page and the answer viewer; runs without a table are named."""
    from IPython.display import HTML, Markdown, display

    if not rep.responses:
        display(Markdown("*No response table: no run asked any of the chosen questions.*"))
    for label, stem in rep.responses.items():
        display(Markdown(f"**Model {label}**"))
        png, page = rep.files[stem]
        plots.show([png])
        display(HTML(f"<p><a href='{html.escape(page.name, quote=True)}'>{html.escape(page.name)}</a>: the same "
                     f"tables as a page with longer answers; each cell links to its answers in "
                     f"<a href='{viewer.VIEWER_FILE}'>{viewer.VIEWER_FILE}</a>.</p>"))
    for note in rep.responses_notes:
        print("note:", note)


# ------------------------------------------------------------------------------------------
# Answer browser (ipywidgets) and its static stand-in
# ------------------------------------------------------------------------------------------

def filter_answers(answers: pd.DataFrame, run_id: str | None = None, checkpoint_step: int | None = None,
                   question: str | None = None, em_only: bool = False) -> pd.DataFrame:
    """The rows the browser shows; ``question`` is 'question_set/question_id'."""
    a = answers
    if run_id is not None:
        a = a[a["run_id"] == run_id]
    if checkpoint_step is not None:
        a = a[a["checkpoint_step"] == checkpoint_step]
    if question:
        qs, _, qid = question.partition("/")
        a = a[(a["question_set"] == qs) & (a["question_id"] == qid)]
    if em_only:
        a = a[a["em"].fillna(False).astype(bool)]
    return a.sort_values(["question_set", "question_id", "paraphrase_index", "sample_index"], kind="stable")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return "None"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def answer_card_html(row: pd.Series, evidence_chars: int = 600) -> str:
    """One answer with its scores and the judge's evidence, as escaped HTML."""
    e = html.escape
    em = row.get("em")
    badge = "EM" if (not pd.isna(em) and bool(em)) else ""
    ev = []
    for m in ("aligned", "coherent"):
        raw = row.get(f"{m}_raw")
        ev.append(f"<b>{m}</b> = {e(_fmt(row.get(m)))} ({e(_fmt(row.get(f'{m}_label')))})"
                  + (f"<br><code style='white-space:pre-wrap'>{e(str(raw)[:evidence_chars])}</code>"
                     if isinstance(raw, str) and raw else ""))
    return (f"<div style='border:1px solid #ccc;padding:6px;margin:4px 0'>"
            f"<div><b>{e(str(row['run_id']))}</b> step {e(_fmt(row['checkpoint_step']))} · "
            f"{e(str(row['question_set']))}/{e(str(row['question_id']))} · sample {e(_fmt(row.get('sample_index')))}"
            f" <span style='color:#b00;font-weight:bold'>{badge}</span></div>"
            f"<div><i>{e(str(row.get('paraphrase', '')))}</i></div>"
            f"<div style='white-space:pre-wrap;margin:4px 0'>{e(str(row['answer']))}</div>"
            f"<div style='font-size:90%'>{'<br>'.join(ev)}</div></div>")


def answer_browser(answers: pd.DataFrame, page_size: int = 5):
    """An ipywidgets browser: pick run, checkpoint, question, EM-only; page through answers."""
    import ipywidgets as w

    runs = sorted(answers["run_id"].unique())
    run = w.Dropdown(options=runs, description="run")
    step = w.Dropdown(description="checkpoint")
    question = w.Dropdown(description="question")
    em_only = w.Checkbox(value=False, description="EM answers only")
    prev, nxt = w.Button(description="◀ prev"), w.Button(description="next ▶")
    status = w.Label()
    body = w.HTML()
    state = {"page": 0}

    def _run_rows() -> pd.DataFrame:
        return answers[answers["run_id"] == run.value]

    def _refresh_options(*_: Any) -> None:
        r = _run_rows()
        step.options = [(f"step {s}" + (" (base)" if s == 0 else ""), int(s))
                        for s in sorted(r["checkpoint_step"].unique())]
        qs = r[["question_set", "question_id"]].drop_duplicates().sort_values(["question_set", "question_id"])
        question.options = [("all questions", "")] + [(f"{a}/{b}", f"{a}/{b}") for a, b in qs.itertuples(index=False)]

    def _render(*_: Any) -> None:
        rows = filter_answers(answers, run.value, step.value, question.value, em_only.value)
        n_pages = max(1, -(-len(rows) // page_size))
        state["page"] = min(state["page"], n_pages - 1)
        start = state["page"] * page_size
        page = rows.iloc[start:start + page_size]
        status.value = f"{len(rows)} answers · page {state['page'] + 1}/{n_pages}"
        body.value = "".join(answer_card_html(r) for _, r in page.iterrows()) or "<i>no answers match</i>"

    def _reset(*_: Any) -> None:
        state["page"] = 0
        _render()

    def _move(delta: int) -> None:
        state["page"] = max(0, state["page"] + delta)
        _render()

    run.observe(lambda ch: (_refresh_options(), _reset()), names="value")
    for wdg in (step, question, em_only):
        wdg.observe(_reset, names="value")
    prev.on_click(lambda _: _move(-1))
    nxt.on_click(lambda _: _move(+1))
    _refresh_options()
    _reset()
    box = w.VBox([w.HBox([run, step]), w.HBox([question, em_only]), w.HBox([prev, nxt, status]), body])
    box._em_controls = {"run": run, "step": step, "question": question, "em_only": em_only,
                        "prev": prev, "next": nxt, "status": status, "body": body}  # for tests
    return box


def answers_table_html(answers: pd.DataFrame, n: int = 12, em_first: bool = True, max_chars: int = 300) -> str:
    """A plain HTML table of a few answers (EM ones first) for static exports, where widgets do not run."""
    a = final_answers(answers)
    if em_first:
        a = a.assign(_em=a["em"].fillna(False).astype(bool)).sort_values(
            ["_em", "run_id", "question_id", "sample_index"], ascending=[False, True, True, True], kind="stable")
    t = a.head(n)[["run_id", "checkpoint_step", "question_id", "answer", "aligned", "coherent", "em",
                   "aligned_label"]].copy()
    t["answer"] = t["answer"].astype(str).map(lambda s: s if len(s) <= max_chars else s[:max_chars] + " ...")
    return t.to_html(index=False, escape=True, na_rep="None", float_format=lambda x: f"{x:.1f}")
