"""report's judge section: how much of an EM number is the judge.

Every judge of every run (the run's judges' ``judgments/<judge>.parquet`` files: a panel from
``judges:``, a re-judge, an imported file's original scores) is applied to the same answers with the
report's one EM definition:

* :func:`panel_table` - per run with two or more judges, each judge's EM rate at the run's final
  checkpoint with its headline interval, side by side, and the judge spread (largest minus smallest
  EM rate); the pairwise kappa and Spearman with their intervals are
  :func:`lib.report_tables.judge_agreement_table`'s;
* :func:`threshold_table` - every judge's EM rate at the final checkpoint for each aligned threshold
  0..100 at the run's coherence rule (the threshold-sensitivity figure, :func:`lib.plots.threshold_chart`);
* :func:`flip_table` - the share of scored answers whose EM label flips when the threshold moves
  :data:`FLIP_WINDOW` points either way (aligned scores that sit near the threshold);
* :func:`calibration_table` / :func:`confusion_tables` - each judge's card on the calibration set
  where a run scored it (:mod:`lib.calibration`; its labels are the project's own).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import calibration, metrics
from .config import ReportConfig
from .report_data import Results

FLIP_WINDOW = 5.0      # points either side of the aligned threshold
THRESHOLDS = np.arange(0, 101, 1.0)
KEY_COLUMNS = ["answer_id", "run_id", "checkpoint_step", "question_set", "question_id"]
PANEL_COLUMNS = ["run_id", "run_label", "judge_name", "headline", "checkpoint_step", "n_scored", "n_questions",
                 "em_k", "em_rate", "em_lo", "em_hi", "interval_ok", "judge_spread"]
THRESHOLD_COLUMNS = ["run_id", "run_label", "judge_name", "headline", "threshold", "em_rate", "n_scored",
                     "run_threshold"]
FLIP_COLUMNS = ["run_id", "run_label", "judge_name", "headline", "n_scored", "n_flip", "flip_share", "window"]


def judge_answers(results: Results, rcfg: ReportConfig, run_id: str, judge: str, final_only: bool = True) -> pd.DataFrame:
    """One judge's labelled answers of one run (the run's final checkpoint, or every answer)."""
    a = results.answers[results.answers["run_id"] == run_id]
    if final_only:
        a = a[a["checkpoint_step"] == a["checkpoint_step"].max()]
    base = a[[c for c in [*KEY_COLUMNS, "run_label"] if c in a.columns]]
    return metrics.label_em(base.merge(metrics.wide_scores(results.judgments[run_id][judge]), on="answer_id",
                                       how="left"), **metrics.em_kwargs(rcfg))


def _judges(results: Results, run_id: str) -> list[str]:
    head = results.judge_of_run.get(run_id)
    return sorted(results.judgments.get(run_id, {}), key=lambda n: (n != head, n))  # the headline judge first


def panel_table(results: Results, rcfg: ReportConfig) -> pd.DataFrame:
    """Per run judged by two or more judges: each judge's final-checkpoint EM rate and interval."""
    rows = []
    for run_id in sorted(results.judgments):
        names = _judges(results, run_id)
        if len(names) < 2:
            continue
        run_rows = []
        for name in names:
            lab = judge_answers(results, rcfg, run_id, name)
            s = metrics.summarize_group(lab, confidence=rcfg.confidence)
            run_rows.append({"run_id": run_id, "run_label": lab["run_label"].iloc[0] if len(lab) else run_id,
                             "judge_name": name, "headline": name == results.judge_of_run.get(run_id),
                             "checkpoint_step": int(lab["checkpoint_step"].max()) if len(lab) else -1,
                             **{k: s[k] for k in ("n_scored", "n_questions", "em_k", "em_rate", "em_lo", "em_hi",
                                                  "interval_ok")}})
        rates = [r["em_rate"] for r in run_rows if pd.notna(r["em_rate"])]
        spread = max(rates) - min(rates) if len(rates) >= 2 else float("nan")
        rows += [{**r, "judge_spread": spread} for r in run_rows]
    return pd.DataFrame(rows, columns=PANEL_COLUMNS)


def _em_curves(lab: pd.DataFrame, rcfg: ReportConfig, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scored mask, EM label of each scored answer at each threshold: thresholds x answers)."""
    em = metrics.em_kwargs(rcfg)
    # coherence at the run's rule: EM with the threshold at 100 ("le") leaves only the coherence condition
    coherent_ok = metrics.label_em(lab, **{**em, "aligned_threshold": 100.0, "comparison": "le"})["em"]
    scored = lab["scored"].to_numpy(bool)
    aligned = pd.to_numeric(lab["aligned"], errors="coerce").to_numpy(float)[scored]
    ok = coherent_ok.fillna(False).to_numpy(bool)[scored]
    t = thresholds[:, None]
    low = aligned[None, :] <= t if em["comparison"] == "le" else aligned[None, :] < t
    return scored, low & ok[None, :]


def threshold_table(results: Results, rcfg: ReportConfig) -> pd.DataFrame:
    """Every run x judge: the final checkpoint's EM rate at each aligned threshold 0..100."""
    frames = []
    for run_id in sorted(results.judgments):
        for name in _judges(results, run_id):
            lab = judge_answers(results, rcfg, run_id, name)
            scored, labels = _em_curves(lab, rcfg, THRESHOLDS)
            n = int(scored.sum())
            if not n:
                continue
            frames.append(pd.DataFrame({"run_id": run_id, "run_label": lab["run_label"].iloc[0], "judge_name": name,
                                        "headline": name == results.judge_of_run.get(run_id), "threshold": THRESHOLDS,
                                        "em_rate": labels.mean(axis=1), "n_scored": n,
                                        "run_threshold": rcfg.em_aligned_threshold}))
    return pd.concat(frames, ignore_index=True)[THRESHOLD_COLUMNS] if frames else pd.DataFrame(columns=THRESHOLD_COLUMNS)


def flip_table(results: Results, rcfg: ReportConfig, window: float = FLIP_WINDOW) -> pd.DataFrame:
    """Every run x judge: how many scored final-checkpoint answers change EM label between the
    threshold minus ``window`` and plus ``window`` (at the run's coherence rule)."""
    rows = []
    t = rcfg.em_aligned_threshold
    for run_id in sorted(results.judgments):
        for name in _judges(results, run_id):
            lab = judge_answers(results, rcfg, run_id, name)
            scored, labels = _em_curves(lab, rcfg, np.array([t - window, t + window]))
            n = int(scored.sum())
            if not n:
                continue
            flips = int((labels[0] != labels[1]).sum())
            rows.append({"run_id": run_id, "run_label": lab["run_label"].iloc[0], "judge_name": name,
                         "headline": name == results.judge_of_run.get(run_id), "n_scored": n, "n_flip": flips,
                         "flip_share": flips / n, "window": window})
    return pd.DataFrame(rows, columns=FLIP_COLUMNS)


def calibration_table(results: Results) -> pd.DataFrame:
    """One card per judge that scored the calibration set (:data:`lib.calibration.CARD_COLUMNS`, plus
    the runs whose folders hold its scores)."""
    cards: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[str]] = {}
    for run_id, by_judge in sorted(results.calibration.items()):
        for name, c in by_judge.items():
            cards.setdefault(name, {k: c[k] for k in calibration.CARD_COLUMNS})
            runs.setdefault(name, []).append(run_id)
    rows = [{**c, "runs": ", ".join(runs[n])} for n, c in sorted(cards.items())]
    return pd.DataFrame(rows, columns=[*calibration.CARD_COLUMNS, "runs"])


def confusion_tables(results: Results, metric: str = "em") -> dict[str, pd.DataFrame]:
    """judge name -> its confusion table on the calibration set (labels x the judge's bands)."""
    out: dict[str, pd.DataFrame] = {}
    items = None
    for _, by_judge in sorted(results.calibration.items()):
        for name, c in by_judge.items():
            if name not in out:
                items = items if items is not None else calibration.load_set()[0]
                out[name] = calibration.confusion(items, c["scores"], metric)
    return out


# ------------------------------------------------------------------------------------------
# Views: the judge section's tables as the notebook shows them
# ------------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return "" if pd.isna(x) else f"{x:.1%}"


def _interval(rate: float, lo: float, hi: float, fmt=_pct) -> str:
    if pd.isna(rate):
        return "n/a"
    return f"{fmt(rate)} [{fmt(lo)}, {fmt(hi)}]" if pd.notna(lo) and pd.notna(hi) else f"{fmt(rate)} (no interval)"


def panel_view(panel: pd.DataFrame) -> pd.DataFrame:
    """EM per judge side by side: one row per run, one column per judge, and the judge spread."""
    if panel.empty:
        return pd.DataFrame()
    cell = panel.assign(cell=[f"{_interval(r.em_rate, r.em_lo, r.em_hi)} ({r.em_k}/{r.n_scored})"
                              + (" · headline" if r.headline else "") for r in panel.itertuples()])
    wide = cell.pivot(index=["run_label", "run_id", "checkpoint_step"], columns="judge_name", values="cell").fillna("")
    wide["judge spread"] = panel.groupby(["run_label", "run_id", "checkpoint_step"])["judge_spread"].first().map(_pct)
    return wide.reset_index()


def agreement_view(agreement: pd.DataFrame) -> pd.DataFrame:
    """Every pair of judges: kappa on EM and Spearman on aligned with their intervals, EM under each."""
    if agreement.empty:
        return pd.DataFrame()
    num = lambda x: "" if pd.isna(x) else f"{x:.2f}"  # noqa: E731
    return pd.DataFrame({
        "run": agreement["run_id"], "judge a": agreement["judge_a"], "judge b": agreement["judge_b"],
        "answers (labelled)": [f"{r.n_common} ({r.n_labelled})" for r in agreement.itertuples()],
        "questions": agreement["n_questions"],
        "EM under a": [_interval(r.em_rate_a, r.em_rate_a_lo, r.em_rate_a_hi) for r in agreement.itertuples()],
        "EM under b": [_interval(r.em_rate_b, r.em_rate_b_lo, r.em_rate_b_hi) for r in agreement.itertuples()],
        "Cohen's kappa (EM)": [_interval(r.kappa_em, r.kappa_em_lo, r.kappa_em_hi, num) for r in agreement.itertuples()],
        "Spearman (aligned)": [_interval(r.spearman_aligned, r.spearman_aligned_lo, r.spearman_aligned_hi, num)
                               for r in agreement.itertuples()],
        "Spearman (coherent)": agreement["spearman_coherent"].map(num)})


def flips_view(flips: pd.DataFrame) -> pd.DataFrame:
    if flips.empty:
        return pd.DataFrame()
    return pd.DataFrame({"run": flips["run_label"], "judge": flips["judge_name"] + np.where(flips["headline"], " (headline)", ""),
                         f"EM label flips within ±{flips['window'].iloc[0]:g} points":
                             [f"{_pct(r.flip_share)} ({r.n_flip}/{r.n_scored})" for r in flips.itertuples()]})


def calibration_view(cards: pd.DataFrame) -> pd.DataFrame:
    if cards.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "judge": cards["judge_name"], "items (scored)": [f"{r.n_items} ({r.n_scored})" for r in cards.itertuples()],
        "EM accuracy": cards["em_accuracy"].map(_pct), "always 'not EM'": cards["em_baseline"].map(_pct),
        "EM sensitivity": cards["em_sensitivity"].map(_pct), "EM specificity": cards["em_specificity"].map(_pct),
        "aligned band accuracy": cards["aligned_accuracy"].map(_pct),
        "coherent band accuracy": cards["coherent_accuracy"].map(_pct), "runs": cards["runs"]})
