"""04_report's tables: the numbers behind every figure and CSV, from :class:`lib.report_data.Results`.

Every rate carries n and an interval (:mod:`lib.metrics`); every table is keyed by run
(:data:`RUN_KEYS`: runs are never merged by label, and rates scored under different judge-prompt
families, or answers asked under different conditions, are never pooled). What the notebook shows of them, formatted for a reader, is in
:mod:`lib.report_views`; :func:`lib.report.make_report` builds them all and writes them as CSV.

* over training: :func:`trajectory_table` (with :func:`simultaneous_bands`), the base model's
  reference lines (:func:`base_table`, pooled only over runs of equal :func:`base_identity`);
* at the final checkpoint: :func:`final_table`, :func:`question_set_table`, :func:`per_question_table`,
  :func:`differences_table` (between runs, final vs base, and condition vs condition within a run);
* about the runs: :func:`judge_agreement_table`, :func:`methods_table` (from run.json),
  :func:`excluded_table`, :func:`training_log_table` (``train_log.csv`` / ``eval_log.csv`` of every
  run on one step axis, read through :mod:`lib.layout`);
* across conditions (:mod:`lib.conditions`): :func:`conditions_table` (EM per condition per checkpoint, and k).
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from . import layout, metrics
from .agreement import judge_agreement
from .conditions import k_of_conditions, reference_condition
from .config import ReportConfig
from .schema import DEFAULT_CONDITION
from .report_data import Results
from .runinfo import stage_parameters


# prompt_family: rates scored under different judge-prompt wordings are never pooled; condition: nor are
# answers asked in different ways (lib.conditions; a single-condition report's CSVs drop the column)
RUN_KEYS = ["run_id", "source", "run_label", "model_label", "domain", "judge_verdict", "prompt_family", "condition"]


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
    cols = ["base_group", "runs", "n_runs", "model_label", "prompt_family", "condition", "scope"] + metrics.SUMMARY_COLUMNS
    if a.empty:
        return pd.DataFrame(columns=cols)
    # one line per judge-prompt family and condition too: step-0 answers scored under different wordings, or
    # asked in different ways, are not pooled
    s = metrics.summarize(metrics.stack_scopes(a), ["base_group", "prompt_family", "condition", "scope"],
                          confidence=rcfg.confidence)
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
                      "n_questions_shared", "paired", "correlation", "interval", "note", "condition"]


def differences_table(answers: pd.DataFrame, rcfg: ReportConfig,
                      references: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Differences between runs and between a run's final checkpoint and its base model.

    Between runs: every pair of runs with the same model label, the same headline judge and the
    same judge-prompt family, final checkpoints (``comparison`` says what they differ in: domain,
    treated vs control, seeds, or nothing recorded); runs scored by different judges are never
    differenced. Within a run: final checkpoint vs step 0, and, for a run asked several ways
    (:mod:`lib.conditions`), each condition vs the questions as written at the final checkpoint
    (``comparison`` "condition"; ``references``: run id -> the condition compared with, from
    :func:`reference_conditions`). Intervals: :func:`lib.metrics.rate_difference`
    (none below :data:`lib.metrics.MIN_QUESTIONS` questions; ``note`` says why)."""
    rows = []
    if "condition" not in answers.columns:  # answers of runs asked one way (lib.conditions: the default condition)
        answers = answers.assign(condition=DEFAULT_CONDITION)
    f = metrics.stack_scopes(final_answers(answers[answers["checkpoint_step"] >= 0]))
    labels = f.groupby("run_id")["run_label"].first()
    for (label, judge, family, cond, scope), g in f.groupby(["model_label", "judge_name", "prompt_family", "condition",
                                                             "scope"], sort=True):
        runs = sorted(g["run_id"].unique(), key=lambda r: (str(g.loc[g["run_id"] == r, "domain"].iloc[0]), r))
        for i, ra in enumerate(runs):
            for rb in runs[i + 1:]:
                a, b = g[g["run_id"] == ra], g[g["run_id"] == rb]
                d = metrics.rate_difference(a, b, "em", confidence=rcfg.confidence)
                rows.append({"comparison": _comparison_kind(a, b), "model_label": label, "judge_name": judge,
                             "prompt_family": family, "scope": scope, "condition": cond,
                             "a": f"{labels[ra]} (final)", "b": f"{labels[rb]} (final)", "run_a": ra, "run_b": rb, **d})
    runs = metrics.stack_scopes(answers[answers["checkpoint_step"] >= 0])
    last = final_steps(runs)
    for (run_id, family, cond, scope), g in runs.groupby(["run_id", "prompt_family", "condition", "scope"], sort=True):
        step = last[run_id]
        if step == 0 or not (g["checkpoint_step"] == 0).any():
            continue
        d = metrics.rate_difference(g[g["checkpoint_step"] == step], g[g["checkpoint_step"] == 0], "em",
                                    confidence=rcfg.confidence)
        rows.append({"comparison": "final vs base", "model_label": g["model_label"].iloc[0],
                     "judge_name": g["judge_name"].iloc[0], "prompt_family": family, "scope": scope, "condition": cond,
                     "a": f"{labels.get(run_id, run_id)} step {step}", "b": f"{labels.get(run_id, run_id)} step 0",
                     "run_a": run_id, "run_b": run_id, **d})
    rows += _condition_rows(f, labels, rcfg, references or {})
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)


def reference_conditions(results: Results) -> dict[str, str]:
    """run id -> the condition its other conditions are compared with (:func:`lib.conditions.reference_condition`)."""
    return {run_id: reference_condition(stage_parameters(info, "evaluate")) for run_id, info in results.runs.items()}


def _condition_rows(final: pd.DataFrame, labels: pd.Series, rcfg: ReportConfig,
                    references: Mapping[str, str]) -> list[dict[str, Any]]:
    """Within a run asked several ways (:mod:`lib.conditions`), at its final checkpoint: each condition
    minus the reference one (``references``; where a run is not there or its reference was not asked:
    the default condition, else the first by name), the same judge and judge-prompt family on both
    sides. The same questions on both sides: paired (the headline intervals square-and-added, crediting
    the question correlation the data show)."""
    rows = []
    for (run_id, judge, family, scope), g in final.groupby(["run_id", "judge_name", "prompt_family", "scope"],
                                                            sort=True):
        conds = sorted(g["condition"].unique())
        if len(conds) < 2:
            continue
        ref = references.get(run_id)
        if ref not in conds:
            ref = DEFAULT_CONDITION if DEFAULT_CONDITION in conds else conds[0]
        step = int(g["checkpoint_step"].iloc[0])
        base = g[g["condition"] == ref]
        for cond in (c for c in conds if c != ref):
            d = metrics.rate_difference(g[g["condition"] == cond], base, "em", confidence=rcfg.confidence)
            name = labels.get(run_id, run_id)
            rows.append({"comparison": "condition", "model_label": g["model_label"].iloc[0], "judge_name": judge,
                         "prompt_family": family, "scope": scope, "condition": cond,
                         "a": f"{name} step {step}, asked: {cond}", "b": f"{name} step {step}, asked: {ref}",
                         "run_a": run_id, "run_b": run_id, **d})
    return rows


def judge_agreement_table(results: Results, rcfg: ReportConfig) -> pd.DataFrame:
    """Every pair of judges that scored the same answers of a run: rank correlation, kappa, EM rates, with
    intervals clustered by question (:func:`lib.agreement.judge_agreement`: a jackknife over questions)."""
    rows = []
    a = results.answers
    for run_id, by_judge in sorted(results.judgments.items()):
        names = sorted(by_judge)
        ra = a[a["run_id"] == run_id]
        clusters = pd.Series((ra["question_set"].astype(str) + "/" + ra["question_id"].astype(str)).to_numpy(),
                             index=ra["answer_id"])  # answer -> its question
        for i, ja in enumerate(names):
            for jb in names[i + 1:]:
                wa, wb = metrics.wide_scores(by_judge[ja]), metrics.wide_scores(by_judge[jb])
                agree = judge_agreement(wa, wb, **metrics.em_kwargs(rcfg), clusters=clusters,
                                        confidence=rcfg.confidence)
                if agree["n_common"]:
                    rows.append({"run_id": run_id, "judge_a": ja, "judge_b": jb, **agree})
    cols = ["run_id", "judge_a", "judge_b", "n_common", "n_labelled", "n_questions", "em_rate_a", "em_rate_a_lo",
            "em_rate_a_hi", "em_rate_b", "em_rate_b_lo", "em_rate_b_hi", "em_agreement", "kappa_em", "kappa_em_lo",
            "kappa_em_hi", "n_aligned", "spearman_aligned", "spearman_aligned_lo", "spearman_aligned_hi", "n_coherent",
            "spearman_coherent"]
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
            # external CSVs: judge.judge_model of the pseudo run.json (report_data.load_external_csv)
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
            **({"conditions": _compact([str(c.get("name")) if isinstance(c, dict) else str(c) for c in pe["conditions"]])}
               if pe.get("conditions") else {}),
            "seed": info.get("seed", ""),
            "git_commit": _compact(_get(info, "environment.judge.git.commit", "environment.evaluate.git.commit",
                                        "environment.train.git.commit")),
        })
    out = pd.DataFrame(rows)
    if "conditions" in out.columns:  # only where a run declared conditions: single-condition reports unchanged
        out["conditions"] = out["conditions"].fillna("")
    return out.astype(str)


def excluded_table(answers: pd.DataFrame) -> pd.DataFrame:
    """Answers kept out of the EM denominator, by run, checkpoint and reason."""
    ex = answers[answers["excluded_reason"].notna()]
    if ex.empty:
        return pd.DataFrame(columns=["run_id", "checkpoint_step", "excluded_reason", "n"])
    return (ex.groupby(["run_id", "checkpoint_step", "excluded_reason"]).size().rename("n").reset_index())


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


CONDITION_COLUMNS = ["run_id", "run_label", "model_label", "prompt_family", "condition", "k", "checkpoint_step", "scope",
                     "n_scored", "n_questions", "em_k", "em_rate", "em_lo", "em_hi", "interval_ok"]


def conditions_table(trajectories: pd.DataFrame, results: Results) -> pd.DataFrame:
    """EM per (run, condition, checkpoint, scope) with its interval, for the runs asked under more than one
    condition (:mod:`lib.conditions`; empty when none was), and ``k`` for the conditions that differ from the
    questions as written only by their in-context examples (k = 0: the plain condition; else empty)."""
    t = trajectories
    if t.empty or "condition" not in t.columns:
        return pd.DataFrame(columns=CONDITION_COLUMNS)
    several = t.groupby("run_id")["condition"].nunique()
    t = t[t["run_id"].isin(several[several > 1].index)]
    if t.empty:
        return pd.DataFrame(columns=CONDITION_COLUMNS)
    ks = {(run_id, c): k for run_id, info in results.runs.items()
          for c, k in k_of_conditions(stage_parameters(info, "evaluate")).items()}
    out = t.assign(k=[ks.get((r, c)) for r, c in zip(t["run_id"], t["condition"])])
    out["k"] = pd.to_numeric(out["k"], errors="coerce").astype("Int64")
    return out[CONDITION_COLUMNS].sort_values(["run_id", "condition", "scope", "checkpoint_step"],
                                               kind="stable").reset_index(drop=True)
