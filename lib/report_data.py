"""04_report's inputs: every run's files (and judged CSVs from elsewhere) -> one table of answers.

Inputs (per run folder ``<outputs_dir>/<run_id>/``, all written by earlier stages):

* ``generations.parquet`` (:data:`lib.schema.GENERATION_COLUMNS`), one row per answer;
* ``judgments/<judge_name>.parquet`` (:data:`lib.schema.JUDGMENT_COLUMNS`), one row per
  answer x metric; a run can hold several judges' files;
* ``run.json`` (:mod:`lib.runinfo`); every section is optional here.

(``train_log.csv`` / ``eval_log.csv`` are read by :func:`lib.report_tables.training_log_table`.)

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

The result is :class:`Results` (:func:`load_results`): one row per answer with the headline
judge's scores, EM labels, question scope, seed / control columns and each run's label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import calibration, external, judge_health, layout, metrics
from .config import ConfigError, ReportConfig, resolve_path
from .runinfo import RunJsonError, stage_parameters
from .runinfo import read_run_json as _read_run_json
from .conditions import with_condition
from .schema import DEFAULT_CONDITION, prompt_family


REQUIRED_GENERATION = ["answer_id", "run_id", "checkpoint_step", "question_set", "question_id", "answer"]
REQUIRED_JUDGMENT = ["answer_id", "metric", "score", "label"]


class ReportError(ConfigError):
    """An input problem, reported as one line naming the file and the column or key."""


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
    calibration: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # run_id -> judge -> card (lib.calibration)


def _fill_run_columns(gens: pd.DataFrame, info: dict[str, Any]) -> pd.DataFrame:
    params = stage_parameters(info)
    g = gens.copy()
    for col, default in (("model", params.get("model", "")), ("model_label", params.get("model_label", "")),
                         ("domain", params.get("domain", "")), ("epoch", np.nan), ("in_domain", pd.NA),
                         ("paraphrase", ""), ("paraphrase_index", 0), ("sample_index", 0),
                         ("condition", DEFAULT_CONDITION)):  # lib.conditions: a single-condition run has no column
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
    answers = with_condition(metrics.with_scope(pd.concat(frames, ignore_index=True)))
    conds = answers["condition"].unique()
    if len(conds) > 1:  # never pooled: every table below is split by condition
        notes.append(f"answers were asked under {len(conds)} conditions ({', '.join(sorted(map(str, conds)))}); tables "
                     "and figures keep them apart (column condition; lib.conditions)")
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
    cards = {r: calibration.run_cards(outputs_dir / r) for r in all_j if (outputs_dir / r).is_dir()}
    health, verdicts = judge_health_of(all_j, judge_of, cards)
    answers["judge_verdict"] = answers["run_id"].map(lambda r: verdicts[r][0])
    answers["run_label"] = answers["run_id"].map(run_labels(answers, verdicts))
    return Results(answers, all_j, runs, judge_of, notes, health, verdicts, {r: c for r, c in cards.items() if c})


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
                    cards: dict[str, dict[str, dict[str, Any]]] | None = None,
                    ) -> tuple[pd.DataFrame, dict[str, tuple[str, str]]]:
    """Health of every judge of every run (:mod:`lib.judge_health`; with its calibration card where the
    run scored the calibration set), and each run's headline verdict."""
    frames, verdicts = [], {}
    for run_id, by_judge in sorted(judgments.items()):
        for name, j in sorted(by_judge.items()):
            h = judge_health.health_table(j, name, (cards or {}).get(run_id, {}).get(name))
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
