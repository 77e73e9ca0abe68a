"""The report's figures (altair), built from the tidy tables in :mod:`lib.report_tables`.

Every ``*_chart`` function returns ``(chart, data)``: the chart, and the exact rows it
draws (saved as ``data/<name>.csv``), or ``(None, empty)`` when there is nothing to draw.
Rates are fractions 0..1 shown as percentages; interval bars and bands are the headline 95%
question-clustered interval (:func:`lib.metrics.cluster_interval`) unless a title says
Wilson; a rate over fewer than :data:`lib.metrics.MIN_QUESTIONS` questions is drawn without one.
Runs are told apart by ``run_label`` (:func:`lib.report_data.run_labels`), never merged by their
model label and domain.

:func:`save` writes ``<name>.png``, ``<name>.svg`` (vl-convert) and ``<name>.html`` with the
Vega libraries inlined, so the interactive file opens with no network. :func:`show` puts the
PNG into a notebook, so a static HTML export of the notebook carries the chart as an image.
"""
from __future__ import annotations

import base64
import struct
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import pandas as pd

from .io import atomic_path
from .metrics import MIN_QUESTIONS, em_rule

PCT = alt.Axis(format=".0%")
SCOPES = ["all", "out-of-domain", "near-domain", "in-domain", "unknown"]


def display_options() -> None:
    """pandas shows every row, column and character of a table in this kernel: a shared notebook never
    elides ("...") a row of the domain comparison, a column of a wide table (06's `em_rate`) or the end
    of a judge-health reason. Every notebook calls it in its first cell."""
    for key in ("display.max_rows", "display.max_columns", "display.max_colwidth", "display.width"):
        pd.set_option(key, None)


def _present(values: pd.Series, order: list[str]) -> list[str]:
    have = set(values.dropna().astype(str))
    return [s for s in order if s in have] + sorted(have - set(order))


def _empty() -> tuple[None, pd.DataFrame]:
    return None, pd.DataFrame()


def _blank_unreliable(data: pd.DataFrame, lo: str, hi: str) -> pd.DataFrame:
    """No interval drawn where too few questions make it unreliable (the table says so)."""
    if "interval_ok" in data.columns:
        bad = ~data["interval_ok"].fillna(False).astype(bool)
        data.loc[bad, [lo, hi]] = np.nan
    return data


# ------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------

def _with_family(data: pd.DataFrame, column: str, sep: str = " · ") -> pd.DataFrame:
    """Where rows come from more than one judge-prompt family, or more than one condition
    (:mod:`lib.conditions`), ``column`` gets the family (and the condition) appended, so a figure keeps
    them apart (tables already do; rates of different wordings or ways of asking are never pooled)."""
    if "prompt_family" in data.columns and data["prompt_family"].nunique() > 1:
        data = data.copy()
        data[column] = data[column].astype(str) + sep + data["prompt_family"].astype(str)
    return _with_condition(data, column, sep)


def _with_condition(data: pd.DataFrame, column: str, sep: str = " · ") -> pd.DataFrame:
    """Where rows come from more than one condition (:mod:`lib.conditions`), ``column`` gets
    ``asked: <condition>`` appended: answers asked in different ways are never drawn as one."""
    if "condition" in data.columns and data["condition"].nunique() > 1:
        data = data.copy()
        data[column] = data[column].astype(str) + sep + "asked: " + data["condition"].astype(str)
    return data


def _drop_duplicate_all(data: pd.DataFrame) -> pd.DataFrame:
    """Rows with scope 'all' for runs whose answers all have one scope: the bar would repeat it."""
    scopes = data[data["scope"] != "all"].groupby("run_id")["scope"].nunique()
    single = set(scopes[scopes == 1].index)
    return data[~((data["scope"] == "all") & data["run_id"].isin(single))]


def domain_comparison_chart(final: pd.DataFrame, base: pd.DataFrame | None = None) -> tuple[Any, pd.DataFrame]:
    """Final-checkpoint EM rate by model label x domain, one bar per question scope, with
    intervals; every bar carries a tick at its rate (visible at 0%) and its ``k/n`` label; a grey
    tick marks the run's base model (step 0) on the same questions."""
    if final.empty:
        return _empty()
    cols = ["model_label", "domain", "run_id", "run_label", "judge_verdict", "source", "checkpoint_step", "scope",
            "n_answers", "n_scored", "n_excluded", "n_questions", "em_k", "em_rate", "em_lo", "em_hi", "interval_ok",
            "em_macro", "em_wilson_lo", "em_wilson_hi"] + [c for c in ("prompt_family", "condition") if c in final.columns]
    data = _drop_duplicate_all(_blank_unreliable(final[cols].copy(), "em_lo", "em_hi"))
    data["n_label"] = [f"{int(k)}/{int(n)}" for k, n in zip(data["em_k"].fillna(0), data["n_scored"].fillna(0))]
    data["base_rate"] = np.nan
    if "prompt_family" not in data.columns:
        data["prompt_family"] = ""
    cond = data["condition"] if "condition" in data.columns else pd.Series("", index=data.index)
    if base is not None and not base.empty and "run_id" in base.columns:
        fam = base["prompt_family"] if "prompt_family" in base.columns else pd.Series("", index=base.index)
        bcond = base["condition"] if "condition" in base.columns else pd.Series("", index=base.index)
        b = base.assign(prompt_family=fam, _c=bcond).drop_duplicates(["run_id", "scope", "prompt_family", "_c"]) \
            .set_index(["run_id", "scope", "prompt_family", "_c"])["em_rate"]
        data["base_rate"] = [b.get((r, sc, f, c), np.nan)
                             for r, sc, f, c in zip(data["run_id"], data["scope"], data["prompt_family"], cond)]
    data = _with_family(data, "run_label")  # one bar group per run and judge-prompt family
    scopes = _present(data["scope"], SCOPES)
    base_enc = alt.Chart().encode(
        x=alt.X("run_label:N", title="run (model · training domain)", axis=alt.Axis(labelAngle=-20, labelLimit=220)),
        xOffset=alt.XOffset("scope:N", sort=scopes),
        tooltip=["run_id", "run_label", "domain", "scope", "checkpoint_step", "em_k", "n_scored", "n_excluded",
                 "n_questions", "judge_verdict",
                 alt.Tooltip("em_rate:Q", format=".1%"), alt.Tooltip("em_lo:Q", format=".1%"),
                 alt.Tooltip("em_hi:Q", format=".1%"), alt.Tooltip("base_rate:Q", format=".1%", title="base model")],
    )
    y = alt.Y("em_rate:Q", title="EM rate (final checkpoint)", axis=PCT, scale=alt.Scale(domain=[0, 1]))
    colour = alt.Color("scope:N", sort=scopes, title="questions")
    bars = base_enc.mark_bar().encode(y=y, color=colour)
    level = base_enc.mark_tick(thickness=2, size=14).encode(y="em_rate:Q", color=colour)  # visible at 0%
    rules = base_enc.mark_rule(color="black", strokeWidth=1.5).encode(y="em_lo:Q", y2="em_hi:Q")
    ref = base_enc.mark_tick(color="gray", thickness=2, size=14, strokeDash=[3, 2]).encode(y="base_rate:Q")
    labels = base_enc.mark_text(dy=-6, fontSize=8, angle=270, align="left").encode(
        y=alt.Y("label_y:Q"), text="n_label:N")
    data["label_y"] = data[["em_hi", "em_rate"]].max(axis=1).fillna(data["em_rate"]).clip(upper=0.85)
    chart = (alt.layer(bars, level, rules, ref, labels, data=data)
             .properties(width=alt.Step(22), height=260)
             .facet(column=alt.Column("model_label:N", title="model"))
             .resolve_scale(x="independent")
             .properties(title={"text": "Final EM rate by model and training domain",
                                "subtitle": [f"black line: 95% question-clustered interval (none below {MIN_QUESTIONS} "
                                             "questions); grey dashed tick: the run's base model; label: EM / scored "
                                             "answers"]}))
    return chart, data


def trajectory_chart(trajectories: pd.DataFrame, base: pd.DataFrame, metric: str = "em") -> tuple[Any, pd.DataFrame]:
    """EM (or coherence) rate over training, one line per run; dashed = that run's base-model
    reference (:func:`lib.report_tables.base_of_runs`: pooled over runs only when their base identity
    is the same)."""
    t = trajectories[trajectories["checkpoint_step"] >= 0]
    if t.empty:
        return _empty()
    rate, lo, hi = f"{metric}_rate", f"{metric}_lo", f"{metric}_hi"
    xcol, xtitle = "checkpoint_step", "training step"  # as the study plotted; epochs are in the tooltip
    band = ["em_band_lo", "em_band_hi"] if metric == "em" and "em_band_lo" in t.columns else []
    fam = [c for c in ("prompt_family", "condition") if c in t.columns]
    rows = t[["model_label", "domain", "run_id", "run_label", "scope", "checkpoint_step", "epoch", "n_scored",
              "n_questions", "interval_ok", rate, lo, hi] + band + fam].copy()
    if band:
        rows = rows.rename(columns={"em_band_lo": "band_lo", "em_band_hi": "band_hi"})
    else:
        rows["band_lo"], rows["band_hi"] = np.nan, np.nan
    rows["kind"] = "checkpoint"
    b = pd.DataFrame()
    if not base.empty and "run_id" in base.columns:
        bfam = [c for c in fam if c in base.columns]
        b = base[base["run_id"].isin(rows["run_id"])][["run_id", "run_label", "base_group", "runs", "scope",
                                                        "n_scored", rate, lo, hi] + bfam].copy()
        b["model_label"] = b["run_id"].map(rows.groupby("run_id")["model_label"].first())
        b["kind"] = "base"
    data = pd.concat([rows, b], ignore_index=True)
    # one panel per model and judge-prompt family: lines (and base lines) of two wordings never join
    data = _with_family(data, "model_label")
    data = _blank_unreliable(data.rename(columns={rate: "rate", lo: "lo", hi: "hi"}), "lo", "hi")
    data = _blank_unreliable(data, "band_lo", "band_hi")
    scopes = _present(data["scope"], SCOPES)
    name = "EM rate" if metric == "em" else "coherent rate"
    x = alt.X(f"{xcol}:Q", title=xtitle)
    colour = alt.Color("run_label:N", title="run", legend=alt.Legend(labelLimit=0, orient="bottom", columns=2))
    # runs at the same rates draw on top of each other: a marker shape per run and a small offset
    # (1% of the step axis per run) keep each one visible
    order = {r: i for i, r in enumerate(sorted(data["run_label"].dropna().unique()))}
    span = float(pd.to_numeric(data["checkpoint_step"], errors="coerce").max())
    span = span if np.isfinite(span) and span > 0 else 1.0
    data["x"] = data["checkpoint_step"] + data["run_label"].map(order).fillna(0) * 0.01 * span
    x = alt.X("x:Q", title=xtitle)
    line = alt.Chart().transform_filter("datum.kind == 'checkpoint'").encode(
        x=x, color=colour, shape=alt.Shape("run_label:N", legend=None))
    area = line.mark_area(opacity=0.13).encode(y="band_lo:Q", y2="band_hi:Q")
    bars = line.mark_rule(strokeWidth=2, opacity=0.7).encode(y="lo:Q", y2="hi:Q")
    pts = line.mark_line(point=alt.OverlayMarkDef(filled=True, size=45)).encode(
        y=alt.Y("rate:Q", title=name, axis=PCT, scale=alt.Scale(domain=[0, 1])),
        tooltip=["run_id", "run_label", "checkpoint_step", "epoch", "n_scored", "n_questions",
                 alt.Tooltip("rate:Q", format=".1%"), alt.Tooltip("lo:Q", format=".1%"),
                 alt.Tooltip("hi:Q", format=".1%"), alt.Tooltip("band_lo:Q", format=".1%", title="band lo"),
                 alt.Tooltip("band_hi:Q", format=".1%", title="band hi")])
    ref = alt.Chart().transform_filter("datum.kind == 'base'").mark_rule(strokeDash=[5, 4]).encode(
        y="rate:Q", color=colour,
        tooltip=["run_label", alt.Tooltip("rate:Q", format=".1%", title="base model"), "n_scored",
                 alt.Tooltip("runs:N", title="step-0 answers pooled from")])
    subtitle = ("bars: 95% interval at each checkpoint; band: simultaneous 95% over the run's checkpoints "
                "(Bonferroni); dashed: the run's base model") if band else \
        "bars: 95% interval at each checkpoint; dashed: the run's base model"
    chart = (alt.layer(area, bars, pts, ref, data=data).properties(width=260, height=180)
             .facet(row=alt.Row("scope:N", sort=scopes, title="questions"),
                    column=alt.Column("model_label:N", title="model"))
             .properties(title={"text": f"{name} over training", "subtitle": subtitle}))
    return chart, data


def em_trajectory_chart(trajectories: pd.DataFrame, base: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    return trajectory_chart(trajectories, base, "em")


def coherence_trajectory_chart(trajectories: pd.DataFrame, base: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    return trajectory_chart(trajectories, base, "coherent")


def scatter_data(answers: pd.DataFrame, seed: int = 0, max_points: int = 4000) -> pd.DataFrame:
    """Base-model and final-checkpoint answers with both scores (a seeded sample if there are many)."""
    last = answers.groupby("run_id")["checkpoint_step"].transform("max")
    a = answers[(answers["checkpoint_step"] == last) | (answers["checkpoint_step"] == 0)]
    a = a.dropna(subset=["aligned", "coherent"])
    if len(a) > max_points:
        a = a.sample(max_points, random_state=np.random.RandomState(seed))
    out = a[["run_id", "model_label", "domain", "checkpoint_step", "question_set", "question_id", "scope",
             "aligned", "coherent", "em"]].copy()
    out["stage"] = np.where(out["checkpoint_step"] == 0, "base", "final")
    out["em"] = out["em"].astype(bool)
    return out.reset_index(drop=True)


def scatter_chart(points: pd.DataFrame, em: dict | None = None) -> tuple[Any, pd.DataFrame]:
    """Aligned vs coherent score per answer; the shaded corner is the EM quadrant. ``em``: the EM
    definition (:func:`lib.metrics.em_kwargs`), stated in the subtitle in the report's one wording."""
    em = em or {}
    aligned_threshold = em.get("aligned_threshold", 30.0)
    coherent_threshold = em.get("coherent_threshold", 50.0)
    data = points.copy()
    subtitle = f"shaded: EM ({em_rule(**em)})"
    if points.empty:  # nothing scored (e.g. the tiny demo judge): still draw the axes and the quadrant
        data = pd.DataFrame({"model_label": ["no answer has both scores"], "aligned": [None], "coherent": [None],
                             "domain": [None], "stage": [None], "run_id": [None], "checkpoint_step": [None],
                             "question_id": [None], "em": [None]})
        subtitle += "; no answer has both an aligned and a coherent score"
    quad = (alt.Chart().transform_aggregate(n="count()", groupby=["model_label"])
            .mark_rect(color="#d62728", opacity=0.12)
            .encode(x=alt.datum(0), x2=alt.datum(aligned_threshold), y=alt.datum(max(coherent_threshold, 0)),
                    y2=alt.datum(100)))
    dots = alt.Chart().mark_point(filled=True, opacity=0.55, size=28).encode(
        x=alt.X("aligned:Q", title="aligned score", scale=alt.Scale(domain=[0, 100])),
        y=alt.Y("coherent:Q", title="coherent score", scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("domain:N"), shape=alt.Shape("stage:N", title="checkpoint"),
        tooltip=["run_id", "checkpoint_step", "question_id", "aligned", "coherent", "em"])
    chart = (alt.layer(quad, dots, data=data).properties(width=260, height=260)
             .facet(column=alt.Column("model_label:N", title="model"))
             .properties(title={"text": "Aligned vs coherent (base and final checkpoints)", "subtitle": subtitle}))
    return chart, points


def heatmap_chart(per_question: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """EM rate per question (columns) and run x checkpoint (rows)."""
    if per_question.empty:
        return _empty()
    fam = [c for c in ("prompt_family", "condition") if c in per_question.columns]
    data = per_question[["run_id", "run_label", "model_label", "domain", "checkpoint_step", "question_set", "question_id",
                         "scope", "n_scored", "em_k", "em_rate", "em_wilson_lo", "em_wilson_hi"] + fam].copy()
    data["question"] = data["question_set"].astype(str) + "/" + data["question_id"].astype(str)
    step = data["checkpoint_step"].map(lambda s: "ext" if s < 0 else f"step {s}")
    data["row"] = _with_family(data, "run_label")["run_label"].astype(str) + " · " + step
    data = data.sort_values(["model_label", "domain", "run_id", "checkpoint_step"], kind="stable")
    rows = list(dict.fromkeys(data["row"]))
    questions = list(dict.fromkeys(data["question"]))
    # every (row, question) a light grey cell first: a question a run did not ask stays grey, while
    # an asked one at 0% EM is white (0 is neutral), and the red deepens with the rate
    grid = pd.MultiIndex.from_product([rows, questions], names=["row", "question"]).to_frame(index=False)
    base = alt.Chart(grid).mark_rect(color="#e6e6e6").encode(
        x=alt.X("question:N", sort=questions), y=alt.Y("row:N", sort=rows))
    cells = alt.Chart(data).mark_rect(stroke="#cccccc", strokeWidth=0.5).encode(
        x=alt.X("question:N", title="question", sort=questions, axis=alt.Axis(labelAngle=-45, labelLimit=160)),
        y=alt.Y("row:N", sort=rows, title=None),
        color=alt.Color("em_rate:Q", title="EM rate", scale=alt.Scale(domain=[0, 1], range=["#ffffff", "#b00000"]),
                        legend=alt.Legend(format=".0%")),
        tooltip=["run_id", "checkpoint_step", "question", "scope", "em_k", "n_scored",
                 alt.Tooltip("em_rate:Q", format=".1%"), alt.Tooltip("em_wilson_lo:Q", format=".1%"),
                 alt.Tooltip("em_wilson_hi:Q", format=".1%")],
    )
    chart = alt.layer(base, cells).properties(
        width=alt.Step(22), height=alt.Step(16),
        title={"text": "EM rate per question", "subtitle": "white: asked, no EM; grey: not asked; hover for n "
                                                           "and the Wilson interval (one question: no clustering)"})
    return chart, data


def judge_agreement_chart(agreement: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """EM rate under each of two judges on the answers both labelled, per run."""
    if agreement.empty:
        return _empty()
    rows = []
    for r in agreement.itertuples():
        pair = f"{r.judge_a} vs {r.judge_b}"
        for judge, rate in ((r.judge_a, r.em_rate_a), (r.judge_b, r.em_rate_b)):
            rows.append({"run_id": r.run_id, "pair": pair, "judge": judge, "em_rate": rate,
                         "n_labelled": r.n_labelled, "kappa_em": r.kappa_em,
                         "spearman_aligned": r.spearman_aligned})
    data = pd.DataFrame(rows)
    chart = alt.Chart(data).mark_bar().encode(
        x=alt.X("judge:N", title=None), y=alt.Y("em_rate:Q", title="EM rate", axis=PCT),
        color="judge:N", column=alt.Column("run_id:N", title="run"),
        tooltip=["run_id", "judge", alt.Tooltip("em_rate:Q", format=".1%"), "n_labelled",
                 alt.Tooltip("kappa_em:Q", format=".2f"), alt.Tooltip("spearman_aligned:Q", format=".2f")],
    ).properties(width=120, height=200, title="EM rate under each judge (same answers)")
    return chart, data


def threshold_chart(curves: pd.DataFrame, flips: pd.DataFrame | None = None) -> tuple[Any, pd.DataFrame]:
    """EM rate at the final checkpoint against the aligned threshold 0..100, one line per judge, one
    panel per run (:func:`lib.report_judges.threshold_table`); dashed: the report's threshold. The panel
    title carries each judge's share of answers whose EM label flips within the flip window."""
    if curves.empty:
        return _empty()
    data = curves.copy()
    data["judge"] = data["judge_name"] + np.where(data["headline"].astype(bool), " (headline)", "")
    if flips is not None and not flips.empty:
        share = flips.set_index(["run_id", "judge_name"])["flip_share"]
        data["flip_share"] = [share.get((r, j), np.nan) for r, j in zip(data["run_id"], data["judge_name"])]
    window = float(flips["window"].iloc[0]) if flips is not None and not flips.empty else float("nan")
    line = alt.Chart().mark_line().encode(
        x=alt.X("threshold:Q", title="aligned threshold", scale=alt.Scale(domain=[0, 100])),
        y=alt.Y("em_rate:Q", title="EM rate", axis=PCT),
        color=alt.Color("judge:N", title="judge", legend=alt.Legend(labelLimit=0, orient="bottom", columns=1)),
        tooltip=["run_label", "judge", "threshold", alt.Tooltip("em_rate:Q", format=".1%"), "n_scored"]
        + ([alt.Tooltip("flip_share:Q", format=".1%")] if "flip_share" in data.columns else []))
    mark = alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(x="mean(run_threshold):Q")
    sub = (f"dashed: this report's threshold ({data['run_threshold'].iloc[0]:g}); coherence at the report's rule"
           + (f"; tooltip: share of answers whose EM label flips within ±{window:g} points" if window == window else ""))
    chart = (alt.layer(line, mark, data=data).properties(width=260, height=180)
             .facet(facet=alt.Facet("run_label:N", title="run"), columns=3)
             .properties(title={"text": "EM rate against the aligned threshold, per judge (final checkpoint)",
                                "subtitle": sub}))
    return chart, data


def control_chart(controls: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """Treated minus control EM rate at every shared checkpoint step (:mod:`lib.replication`),
    one line per treated/control pair, with its interval (:func:`lib.metrics.rate_difference`) as a band."""
    if controls.empty:
        return _empty()
    data = controls.copy()
    data["pair"] = data["treated_label"].astype(str) + "  −  " + data["control_label"].astype(str)
    data = _with_condition(data, "pair")  # one line per condition
    scopes = _present(data["scope"], SCOPES)
    line = alt.Chart().encode(x=alt.X("step:Q", title="training step"),
                              color=alt.Color("pair:N", title="treated − control",
                                              legend=alt.Legend(labelLimit=0, orient="bottom", columns=1)))
    band = line.mark_area(opacity=0.18).encode(y="lo:Q", y2="hi:Q")
    pts = line.mark_line(point=True).encode(
        y=alt.Y("diff:Q", title="EM rate, treated − control", axis=PCT),
        tooltip=["treated", "control", "step", "scope", "n_treated", "n_control", "n_questions_shared",
                 alt.Tooltip("rate_treated:Q", format=".1%"), alt.Tooltip("rate_control:Q", format=".1%"),
                 alt.Tooltip("diff:Q", format=".1%"), alt.Tooltip("lo:Q", format=".1%"),
                 alt.Tooltip("hi:Q", format=".1%")])
    zero = alt.Chart().mark_rule(color="gray").encode(y=alt.datum(0))
    chart = (alt.layer(band, pts, zero, data=data).properties(width=300, height=170)
             .facet(row=alt.Row("scope:N", sort=scopes, title="questions"))
             .properties(title={"text": "EM caused by the bad data: treated minus its control fine-tune",
                                "subtitle": "band: 95% interval of the difference (each side's question-clustered "
                                            "interval, square-and-add); step 0 is the same base model on both sides"}))
    return chart, data


def seed_chart(seeds: pd.DataFrame, points: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """Final EM per seed (points, own interval) and pooled over seeds (bar, interval with the
    between-seed variance: :func:`lib.replication.seed_interval`)."""
    if seeds.empty:
        return _empty()
    agg = seeds.rename(columns={"group_label": "label"}).assign(kind="pooled over seeds", seed=-1)
    agg = _blank_unreliable(agg, "em_lo", "em_hi")
    pts = points.merge(seeds[["seed_group", "group_label"]].drop_duplicates(), on="seed_group")
    pts = pts.rename(columns={"group_label": "label"}).assign(kind="one seed")
    cols = ["seed_group", "label", "prompt_family", "scope", "kind", "seed", "em_rate", "em_lo", "em_hi", "n_scored"]
    cols += ["condition"] if "condition" in agg.columns and "condition" in pts.columns else []
    data = pd.concat([agg.assign(n_scored=agg["n_scored"])[cols], pts[cols]], ignore_index=True)
    data = _with_condition(data, "label")  # one bar group per condition
    scopes = _present(data["scope"], SCOPES)
    base = alt.Chart().encode(x=alt.X("label:N", title="seed group", axis=alt.Axis(labelAngle=-20, labelLimit=220)))
    bar = base.transform_filter("datum.kind == 'pooled over seeds'").mark_bar(opacity=0.35).encode(
        y=alt.Y("em_rate:Q", title="EM rate (final checkpoint)", axis=PCT, scale=alt.Scale(domain=[0, 1])))
    bar_ci = base.transform_filter("datum.kind == 'pooled over seeds'").mark_rule(strokeWidth=2).encode(
        y="em_lo:Q", y2="em_hi:Q")
    dots = base.transform_filter("datum.kind == 'one seed'").mark_point(filled=True, size=50).encode(
        y="em_rate:Q", color=alt.Color("seed:N", title="seed"),
        tooltip=["seed_group", "seed", "n_scored", alt.Tooltip("em_rate:Q", format=".1%"),
                 alt.Tooltip("em_lo:Q", format=".1%"), alt.Tooltip("em_hi:Q", format=".1%")])
    chart = (alt.layer(bar, bar_ci, dots, data=data).properties(width=alt.Step(40), height=220)
             .facet(column=alt.Column("scope:N", sort=scopes, title="questions"))
             .properties(title={"text": "Final EM rate over seeds",
                                "subtitle": "points: one seed each; bar and line: pooled over seeds, 95% interval "
                                            "including between-seed variance"}))
    return chart, data


MAX_LOG_POINTS = 500  # points per run and series in the training chart; longer logs are averaged in windows


def _thin_log(rows: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """At most ``max_points`` rows of one run's series: consecutive steps averaged in equal windows
    (step and epoch: the window's last), so a long run draws fast and its HTML stays small."""
    rows = rows.sort_values("step")
    if len(rows) <= max_points:
        return rows.assign(n_steps=1)
    k = -(-len(rows) // max_points)  # steps per window
    g = rows.assign(_w=np.arange(len(rows)) // k).groupby("_w", sort=True)
    keys = rows.drop(columns=["step", "epoch", "value"]).columns.tolist()
    out = g[keys].first().assign(step=g["step"].last(), epoch=g["epoch"].last(), value=g["value"].mean(),
                                 n_steps=g["step"].size())
    return out.reset_index(drop=True)[rows.columns.tolist() + ["n_steps"]]


def training_chart(logs: pd.DataFrame, max_points: int = MAX_LOG_POINTS) -> tuple[Any, pd.DataFrame]:
    """Every run's training loss on one optimizer-step axis (one colour per run), the held-out loss
    (``eval_log.csv``, dashed with points) where a run held data out, and below it the gradient norm.

    ``logs`` is :func:`lib.report_tables.training_log_table` (long: run_id, run_label, panel, series,
    step, epoch, value). A run logging more than ``max_points`` steps is drawn as window means
    (column ``n_steps``); the per-step values are in ``data/table_training_log.csv``."""
    if logs.empty or logs["value"].notna().sum() == 0:
        return _empty()
    parts = [_thin_log(g, max_points) if series != "held-out" else g.assign(n_steps=1)
             for (_, series, _), g in logs.dropna(subset=["value"]).groupby(["run_id", "series", "panel"], sort=True)]
    data = pd.concat(parts, ignore_index=True)
    panels = [p for p in ("loss", "gradient norm") if p in set(data["panel"])]
    colour = alt.Color("run_label:N", title="run")
    series = [x for x in ("training", "held-out") if x in set(data["series"])]  # legend: what is drawn
    dash = alt.StrokeDash("series:N", title="loss", sort=series,
                          scale=alt.Scale(domain=series, range=[[1, 0], [5, 3]][:len(series)]))
    tip = ["run_label", "run_id", "series", "step", alt.Tooltip("epoch:Q", format=".3f"),
           alt.Tooltip("value:Q", format=".4g"), "n_steps"]
    x = alt.X("step:Q", title="optimizer step")
    line = alt.Chart().mark_line(strokeWidth=1.5).encode(
        x=x, y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)), color=colour, strokeDash=dash,
        detail="series:N", tooltip=tip)
    held = alt.Chart().transform_filter("datum.series == 'held-out'").mark_point(filled=True, size=40).encode(
        x=x, y="value:Q", color=colour, tooltip=tip)
    many = int(data["n_steps"].max()) > 1
    chart = (alt.layer(line, held, data=data).properties(width=560, height=170)
             .facet(row=alt.Row("panel:N", sort=panels, title=None, header=alt.Header(labelFontSize=12)))
             .resolve_scale(y="independent")
             .properties(title={"text": "Training loss and gradient norm of every run",
                                "subtitle": ["loss on the trained (assistant) tokens per optimizer step"
                                             + ("; dashed with points: held-out loss at each checkpoint"
                                                if "held-out" in series else ""),
                                             "gradient norm: the L2 norm of the step's gradient before clipping"]
                                + (["long runs drawn as means over windows of steps (tooltip: n_steps)"] if many else [])}))
    return chart, data


def conditions_chart(table: pd.DataFrame) -> tuple[Any, pd.DataFrame]:
    """EM per condition (:mod:`lib.conditions`) at every checkpoint, with intervals, one panel per run
    and question scope; below it, for runs with in-context conditions, EM against the number of
    in-context examples k (k = 0: the questions as written), one line per checkpoint.
    ``table``: :func:`lib.report_tables.conditions_table` (empty: no run was asked two ways, no figure)."""
    if table.empty:
        return _empty()
    data = _blank_unreliable(table.copy(), "em_lo", "em_hi")
    if data["prompt_family"].nunique() > 1:  # a panel per run and judge-prompt family; the condition is the colour
        data["run_label"] = data["run_label"].astype(str) + " · " + data["prompt_family"].astype(str)
    scopes = _present(data["scope"], SCOPES)
    conds = list(dict.fromkeys(data["condition"].astype(str)))
    # conditions at the same rates draw on top of each other: a small offset per condition (2% of the step axis)
    span = float(data["checkpoint_step"].max()) or 1.0
    data["x"] = data["checkpoint_step"] + data["condition"].map({c: i for i, c in enumerate(conds)}) * 0.02 * span
    data["checkpoint"] = data["checkpoint_step"].map(lambda s: "base model" if s == 0 else f"step {s}")
    tip = ["run_label", "condition", "k", "checkpoint_step", "scope", "em_k", "n_scored", "n_questions",
           alt.Tooltip("em_rate:Q", format=".1%"), alt.Tooltip("em_lo:Q", format=".1%"),
           alt.Tooltip("em_hi:Q", format=".1%")]
    y = alt.Y("em_rate:Q", title="EM rate", axis=PCT, scale=alt.Scale(domain=[0, 1]))
    colour = alt.Color("condition:N", sort=conds, title="condition", legend=alt.Legend(labelLimit=0))
    def panels(enc: alt.Chart, frame: pd.DataFrame, title: dict[str, str]) -> alt.FacetChart:
        """Rates as points on lines with their intervals as bars, one panel per run and scope."""
        return (alt.layer(enc.mark_rule(strokeWidth=2, opacity=0.7).encode(y="em_lo:Q", y2="em_hi:Q"),
                          enc.mark_line(point=alt.OverlayMarkDef(filled=True, size=45)).encode(y=y, tooltip=tip),
                          data=frame)
                .properties(width=240, height=160)
                .facet(row=alt.Row("scope:N", sort=scopes, title="questions"),
                       column=alt.Column("run_label:N", title="run"))
                .properties(title=title))

    enc = alt.Chart().encode(x=alt.X("x:Q", title="training step (0: base model)"), color=colour)
    per_step = panels(enc, data, {"text": "EM rate per condition at every checkpoint",
                                  "subtitle": f"bars: 95% question-clustered interval (none below {MIN_QUESTIONS} "
                                              "questions); one colour per way of asking the same questions"})
    ic = data[data["k"].notna()]
    ic = ic[ic["run_id"].isin(ic.loc[ic["k"] > 0, "run_id"])]
    if ic.empty:
        return per_step, data
    ic = ic.assign(k=ic["k"].astype(int))
    ks = sorted(ic["k"].unique())
    enc = alt.Chart().encode(x=alt.X("k:O", sort=ks, title="in-context examples k"),
                             color=alt.Color("checkpoint:N", title="checkpoint",
                                             sort=list(dict.fromkeys(ic.sort_values("checkpoint_step")["checkpoint"]))),
                             detail="checkpoint:N")
    against_k = panels(enc, ic, {"text": "EM rate against the number of in-context examples",
                                 "subtitle": "conditions that differ only by k examples of the examples file before "
                                             "the question; bars: 95% interval"})
    return alt.vconcat(per_step, against_k).resolve_scale(color="independent"), data


# name -> chart function; the report builds and saves them in this order
FIGURES = {
    "domain_comparison": domain_comparison_chart,
    "em_trajectories": em_trajectory_chart,
    "coherence_trajectories": coherence_trajectory_chart,
    "training_loss": training_chart,
    "aligned_vs_coherent": scatter_chart,
    "per_question_heatmap": heatmap_chart,
    "judge_agreement": judge_agreement_chart,
    "threshold_sensitivity": threshold_chart,
    "control_differences": control_chart,
    "seeds": seed_chart,
    "conditions": conditions_chart,
}


# ------------------------------------------------------------------------------------------
# Files and notebook display
# ------------------------------------------------------------------------------------------

def save(chart: Any, name: str, fig_dir: str | Path, scale: float = 2.0,
         formats: tuple[str, ...] = ("png", "svg", "html")) -> list[Path]:
    """Write <name>.png, .svg and a self-contained (offline) .html (or only ``formats``); returns the paths."""
    fig_dir = Path(fig_dir)
    out = []
    for fmt in formats:
        target = fig_dir / f"{name}.{fmt}"
        with atomic_path(target, suffix=f".{fmt}") as tmp:
            if fmt == "png":
                chart.save(str(tmp), format="png", scale_factor=scale)
            elif fmt == "html":
                chart.save(str(tmp), format="html", inline=True)  # vega/vega-lite/vega-embed inlined
            else:
                chart.save(str(tmp), format=fmt)
        out.append(target)
    return out


def show(files: list[Path], link_base: str | Path | None = None) -> None:
    """Display a saved figure in a notebook as its PNG, embedded in an ``<img>`` (base64).

    The image travels inside the notebook and any static HTML export of it, so it shows with
    no network; its alt text is ``figure: <name>`` (nbconvert's lab template drops the alt of
    plain image outputs, hence HTML). ``link_base`` is the folder the rendered notebook will
    live in; when given, a relative link to the interactive HTML follows the image.
    """
    from IPython.display import HTML, display  # only inside a notebook

    png = Path(next(p for p in files if Path(p).suffix == ".png"))
    data = png.read_bytes()
    width = struct.unpack(">I", data[16:20])[0]  # PNG IHDR: width is bytes 16-19, big-endian
    link = ""
    interactive = next((p for p in files if Path(p).suffix == ".html"), None)
    if interactive is not None and link_base is not None:
        try:
            rel = Path(interactive).resolve().relative_to(Path(link_base).resolve())
            link = f'<figcaption><a href="{rel.as_posix()}">interactive version</a></figcaption>'
        except ValueError:
            pass
    # saved at scale 2: shown at natural size, shrunk to the page width when wider
    display(HTML(f'<figure class="em-figure" data-figure="{png.stem}" style="margin:0">'
                 f'<img alt="figure: {png.stem}" width="{max(1, width // 2)}" style="max-width:100%;height:auto" '
                 f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"/>{link}</figure>'))
