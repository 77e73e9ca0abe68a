"""Agreement of two judges on the same answers: Cohen's kappa on the EM label, Spearman's rank
correlation of the aligned (and coherent) scores, and the EM rate under each judge on the answers both
labelled, with intervals clustered by question (the report's judge section,
:func:`lib.report_tables.judge_agreement_table`).

The intervals: each EM rate the headline interval (:func:`lib.metrics.cluster_interval`); kappa and
Spearman the delete-one-question jackknife with t on questions - 1 degrees of freedom
(:func:`jackknife_t`), whose coverage ``bench/agreement_coverage.py`` measured (docs/benchmarks.md).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .metrics import ALIGNED, COHERENT, MIN_QUESTIONS, cluster_interval, label_em


def judge_agreement(scores_a: pd.DataFrame, scores_b: pd.DataFrame, aligned_threshold: float = 30.0,
                    coherent_threshold: float = 50.0, comparison: str = "le", coherent_comparison: str = "gt",
                    clusters: pd.Series | None = None, confidence: float = 0.95) -> dict:
    """Agreement of two judges on the same answers (wide score tables, joined on answer_id).

    Spearman rank correlation of the aligned and coherent scores over answers both judges
    scored; Cohen's kappa on the EM label over answers both could label; the EM rate under
    each judge on that common set, so the rates compare like with like.

    With ``clusters`` (answer_id -> its question) the EM rates get the headline interval
    (:func:`cluster_interval`, ``em_rate_a_lo`` ...), and kappa and the aligned Spearman the
    delete-one-question jackknife interval with t on questions - 1 degrees of freedom
    (:func:`jackknife_t`; ``kappa_em_lo`` ..., ``spearman_aligned_lo`` ...); none below
    :data:`MIN_QUESTIONS` questions. ``bench/agreement_coverage.py`` measured their coverage against the
    question-clustered percentile bootstrap they replace (docs/benchmarks.md): better, still short of 95%
    where EM is rare and sits in few questions.
    """
    la = label_em(scores_a, aligned_threshold, coherent_threshold, comparison, coherent_comparison)
    lb = label_em(scores_b, aligned_threshold, coherent_threshold, comparison, coherent_comparison)
    m = la.merge(lb, on="answer_id", suffixes=("_a", "_b"))
    out: dict = {"n_common": len(m)}
    for metric in (ALIGNED, COHERENT):
        both = m[[f"{metric}_a", f"{metric}_b"]].dropna()
        out[f"n_{metric}"] = len(both)
        out[f"spearman_{metric}"] = _spearman(both.iloc[:, 0].to_numpy(float), both.iloc[:, 1].to_numpy(float))
    lab = m[m["scored_a"] & m["scored_b"]]
    ea, eb = lab["em_a"].astype(bool).to_numpy(), lab["em_b"].astype(bool).to_numpy()
    out["n_labelled"] = len(lab)
    out["em_rate_a"] = float(ea.mean()) if len(lab) else float("nan")
    out["em_rate_b"] = float(eb.mean()) if len(lab) else float("nan")
    out["em_agreement"] = float((ea == eb).mean()) if len(lab) else float("nan")
    out["kappa_em"] = _kappa(ea, eb) if len(lab) else float("nan")  # NaN when both judges give one class
    if clusters is not None:
        out.update(_agreement_intervals(m, lab, clusters, confidence))
    return out


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa of two boolean label arrays; NaN when both give the same single class."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    po = float((a == b).mean())
    pe = float(a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean()))
    return (po - pe) / (1 - pe) if pe < 1 else float("nan")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN below 3 pairs or when a side is constant."""
    from scipy.stats import rankdata  # heavy: loaded only when agreement is computed
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def jackknife_t(full: float, leave_one_out: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The delete-one-question jackknife interval of a statistic: ``full`` +- t_{m-1} x the jackknife
    standard error over the m leave-one-question-out values, clipped to [-1, 1] (kappa and Spearman).
    None (NaN) when the statistic is undefined on the whole data or without any one question (kappa
    with every EM answer in that question): then the data cannot say how much it depends on it."""
    from scipy.stats import t as student_t  # heavy: loaded only when an interval is computed
    loo = np.asarray(leave_one_out, dtype=float)
    m = loo.size
    if m < 2 or not np.isfinite(full) or not np.isfinite(loo).all():
        return (float("nan"), float("nan"))
    se = float(np.sqrt((m - 1) / m * ((loo - loo.mean()) ** 2).sum()))
    h = float(student_t.ppf(1 - (1 - confidence) / 2, m - 1)) * se
    return (max(-1.0, full - h), min(1.0, full + h))


def _agreement_intervals(m: pd.DataFrame, lab: pd.DataFrame, clusters: pd.Series, confidence: float) -> dict:
    """The interval columns of :func:`judge_agreement` (see there)."""
    q = lab["answer_id"].map(clusters).to_numpy()
    out: dict = {"n_questions": int(pd.Series(q).nunique())}
    nan2 = (float("nan"), float("nan"))
    for side in ("a", "b"):
        df = pd.DataFrame({"em": lab[f"em_{side}"].astype(bool).to_numpy(), "q": q})
        _, lo, hi = cluster_interval(df, "em", ["q"], confidence) if len(df) else (0, *nan2)
        out[f"em_rate_{side}_lo"], out[f"em_rate_{side}_hi"] = (lo, hi) if out["n_questions"] >= MIN_QUESTIONS else nan2
    out["kappa_em_lo"], out["kappa_em_hi"] = out["spearman_aligned_lo"], out["spearman_aligned_hi"] = nan2
    if out["n_questions"] < MIN_QUESTIONS:
        return out
    ea, eb = lab["em_a"].astype(bool).to_numpy(float), lab["em_b"].astype(bool).to_numpy(float)
    keys = pd.unique(q)
    out["kappa_em_lo"], out["kappa_em_hi"] = jackknife_t(
        _kappa(ea, eb), np.array([_kappa(ea[q != k], eb[q != k]) for k in keys]), confidence)
    both = m[["aligned_a", "aligned_b"]].notna().all(axis=1).to_numpy()
    qs = m["answer_id"].map(clusters).to_numpy()[both]
    xa, xb = m["aligned_a"].to_numpy(float)[both], m["aligned_b"].to_numpy(float)[both]
    out["spearman_aligned_lo"], out["spearman_aligned_hi"] = jackknife_t(
        _spearman(xa, xb), np.array([_spearman(xa[qs != k], xb[qs != k]) for k in pd.unique(qs)]), confidence)
    return out
