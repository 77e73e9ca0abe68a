"""Seeds and controls: the two comparisons that decide whether an EM number means anything.

* **Seeds.** Runs that differ only in ``seed`` share a ``seed_group`` (the grid's ``seeds:``
  expansion sets it). :func:`seed_aggregate` pools their final rates with an interval that
  includes the between-seed variance; :func:`seed_table` does it per seed group, scope and
  judge-prompt family, and keeps every seed's own rate beside the pooled one.
* **Controls.** A run with ``control_of: X`` is the control fine-tune (same model, steps and
  judge, benign data) of run ``X`` or of seed group ``X``. :func:`control_pairs` pairs each
  treated run with its control (same seed where both have seeds); :func:`control_differences`
  gives treated minus control at every checkpoint step both have, on the questions both
  were asked, with a paired question-clustered bootstrap interval.

The input is the report's answers table (one row per answer with ``em``, ``scope``,
``prompt_family``, ``checkpoint_step`` and the run columns ``run_id``, ``run_label``,
``seed``, ``seed_group`` and ``control_of``). Pure functions of tables: no files, no models.

Seed-aggregated interval (:func:`seed_aggregate`): the seeds are S independent draws of the
configuration's training randomness, so their final rates ``r_s`` are i.i.d. around the
configuration's rate. The pooled rate is their plain mean (every seed asked the same questions
the same number of times; inverse-variance weights would pull a proportion towards the seeds with
rates near 0 or 1, whose binomial variance is smaller). Its interval is Student's:
``mean +- t_{S-1} * sqrt(max(s^2, mean(v_s)) / S)``, where ``s^2`` is the sample variance of the
seed rates (within-seed sampling plus between-seed variance) and ``v_s`` each seed's own variance
from its headline interval (:func:`lib.metrics.cluster_interval`: ``((hi - lo) / 2z)^2``): the
``max`` keeps the interval from being narrower than the seeds' own sampling error when a few seeds
happen to agree. The between-seed sd reported is ``sqrt(max(0, s^2 - mean(v_s)))``. With ``t``
on ``S - 1`` degrees of freedom two seeds give a very wide interval: that is what two seeds can
tell. Coverage is measured by ``bench/seed_interval_coverage.py`` (docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm, t as student_t

from . import metrics

SEED_COLUMNS = ["seed_group", "group_label", "prompt_family", "scope", "n_seeds", "seeds", "seed_rates",
                "em_rate", "em_lo", "em_hi", "tau", "n_scored", "n_questions", "interval_ok"]
CONTROL_COLUMNS = ["treated", "control", "treated_label", "control_label", "seed", "step", "epoch", "prompt_family",
                   "scope", "rate_treated", "rate_control", "diff", "lo", "hi", "n_treated", "n_control",
                   "n_questions_shared", "paired"]


def seed_aggregate(rates: Any, lo: Any, hi: Any, confidence: float = 0.95) -> dict[str, float]:
    """Pool per-seed rates (each with its own interval ``lo``..``hi``) into one rate and an
    interval that includes between-seed variance (module docstring). Returns
    ``{rate, lo, hi, tau, n_seeds}``; one seed: its own rate and interval."""
    r, lo, hi = (np.asarray(x, dtype=float) for x in (rates, lo, hi))
    keep = np.isfinite(r)
    r, lo, hi = r[keep], lo[keep], hi[keep]
    s = len(r)
    out = {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "tau": float("nan"), "n_seeds": s}
    if s == 0:
        return out
    if s == 1:
        return {**out, "rate": float(r[0]), "lo": float(lo[0]), "hi": float(hi[0]), "tau": 0.0}
    z = norm.ppf(1 - (1 - confidence) / 2)
    v = ((hi - lo) / (2 * z)) ** 2
    if not np.all(np.isfinite(v)):  # a seed without an interval (too few questions): no pooled interval
        return {**out, "rate": float(r.mean()), "tau": float(r.std(ddof=1))}
    tau2 = max(0.0, float(r.var(ddof=1) - v.mean()))
    mu = float(r.mean())
    se = np.sqrt(max(float(r.var(ddof=1)), float(v.mean())) / s)
    half = student_t.ppf(1 - (1 - confidence) / 2, s - 1) * se
    return {"rate": mu, "lo": float(max(0.0, mu - half)), "hi": float(min(1.0, mu + half)),
            "tau": float(np.sqrt(tau2)), "n_seeds": s}


def _final(answers: pd.DataFrame) -> pd.DataFrame:
    a = answers[answers["checkpoint_step"] >= 0]
    last = a.groupby("run_id")["checkpoint_step"].transform("max")
    return a[a["checkpoint_step"] == last]


def seed_table(answers: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per seed group (runs with a ``seed_group``), scope and prompt family: every seed's final
    EM rate and the seed-aggregated rate and interval (:func:`seed_aggregate`)."""
    if "seed_group" not in answers.columns:
        return pd.DataFrame(columns=SEED_COLUMNS)
    grouped = answers[answers["seed_group"].fillna("").astype(str) != ""]
    if grouped.empty:
        return pd.DataFrame(columns=SEED_COLUMNS)
    f = metrics.stack_scopes(_final(grouped))
    rows = []
    for (group, family, scope), g in f.groupby(["seed_group", "prompt_family", "scope"], sort=True):
        per = []
        for run_id, gr in g.groupby("run_id", sort=True):
            rate, lo, hi = metrics.cluster_interval(gr, "em", confidence=confidence)
            n_q = int(gr.loc[gr["em"].notna(), ["question_set", "question_id"]].drop_duplicates().shape[0])
            per.append((run_id, int(gr["seed"].iloc[0]), rate, lo, hi, int(gr["em"].notna().sum()), n_q))
        per.sort(key=lambda p: p[1])
        agg = seed_aggregate([p[2] for p in per], [p[3] for p in per], [p[4] for p in per], confidence)
        label = str(g["run_label"].iloc[0]).split(" · seed")[0]
        rows.append({"seed_group": group, "group_label": label, "prompt_family": family, "scope": scope,
                     "n_seeds": len(per), "seeds": ",".join(str(p[1]) for p in per),
                     "seed_rates": ",".join(f"{p[2]:.4f}" for p in per),
                     "em_rate": agg["rate"], "em_lo": agg["lo"], "em_hi": agg["hi"], "tau": agg["tau"],
                     "n_scored": sum(p[5] for p in per), "n_questions": min(p[6] for p in per),
                     "interval_ok": bool(np.isfinite(agg["lo"])) and min(p[6] for p in per) >= metrics.MIN_QUESTIONS})
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def seed_points(answers: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Each seed's own final rate and headline interval (the points beside the pooled one)."""
    cols = ["seed_group", "run_id", "run_label", "seed", "prompt_family", "scope", "em_rate", "em_lo", "em_hi",
            "n_scored"]
    if "seed_group" not in answers.columns:
        return pd.DataFrame(columns=cols)
    grouped = answers[answers["seed_group"].fillna("").astype(str) != ""]
    rows = []
    for (group, run_id, family, scope), g in metrics.stack_scopes(_final(grouped)).groupby(
            ["seed_group", "run_id", "prompt_family", "scope"], sort=True):
        rate, lo, hi = metrics.cluster_interval(g, "em", confidence=confidence)
        rows.append({"seed_group": group, "run_id": run_id, "run_label": g["run_label"].iloc[0],
                     "seed": int(g["seed"].iloc[0]), "prompt_family": family, "scope": scope,
                     "em_rate": rate, "em_lo": lo, "em_hi": hi, "n_scored": int(g["em"].notna().sum())})
    return pd.DataFrame(rows, columns=cols)


def control_pairs(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(treated run, control run) pairs from one row per run (``run_id``, ``seed``,
    ``seed_group``, ``control_of``). A control names a run id or a seed group; with seeds on
    both sides, runs pair by seed; a control without seeds pairs with every treated seed."""
    runs = runs.fillna({"seed_group": "", "control_of": ""})
    treated = runs[runs["control_of"] == ""]
    pairs = []
    for _, c in runs[runs["control_of"] != ""].iterrows():
        target = c["control_of"]
        t = treated[(treated["run_id"] == target) | (treated["seed_group"] == target)]
        if c["seed_group"] and (t["seed_group"] != "").any():
            t = t[t["seed"] == c["seed"]]
        pairs += [(tid, c["run_id"]) for tid in sorted(t["run_id"])]
    return pairs


def run_table(answers: pd.DataFrame) -> pd.DataFrame:
    """One row per run: run_id, seed, seed_group, control_of (from the answers' run columns)."""
    cols = ["run_id", "seed", "seed_group", "control_of"]
    present = [c for c in cols if c in answers.columns]
    t = answers.groupby("run_id", sort=True)[present[1:]].first().reset_index()
    for c, default in (("seed", 0), ("seed_group", ""), ("control_of", "")):
        if c not in t.columns:
            t[c] = default
    return t[cols]


def control_differences(answers: pd.DataFrame, n_boot: int = 2000, confidence: float = 0.95,
                        seed: int = 0) -> pd.DataFrame:
    """Treated minus control EM at every checkpoint step both runs have (step 0, the shared
    base model, included as a check that should show no difference), per scope and prompt
    family, on the questions both runs were asked: paired question-clustered bootstrap
    (:func:`lib.metrics.bootstrap_difference`)."""
    if "control_of" not in answers.columns:
        return pd.DataFrame(columns=CONTROL_COLUMNS)
    a = answers[answers["checkpoint_step"] >= 0]
    labels = a.groupby("run_id")["run_label"].first()
    rows = []
    for treated, control in control_pairs(run_table(a)):
        t, c = a[a["run_id"] == treated], a[a["run_id"] == control]
        qs = ["question_set", "question_id"]
        shared = t[qs].drop_duplicates().merge(c[qs].drop_duplicates(), on=qs)
        t, c = t.merge(shared, on=qs), c.merge(shared, on=qs)
        steps = sorted(set(t["checkpoint_step"]) & set(c["checkpoint_step"]))
        st, sc = metrics.stack_scopes(t), metrics.stack_scopes(c)
        for step in steps:
            for (family, scope), gt in st[st["checkpoint_step"] == step].groupby(["prompt_family", "scope"], sort=True):
                gc = sc[(sc["checkpoint_step"] == step) & (sc["prompt_family"] == family) & (sc["scope"] == scope)]
                if gc.empty:
                    continue
                d = metrics.bootstrap_difference(gt, gc, "em", n_boot=n_boot, confidence=confidence,
                                                 seed=metrics._seed_for(seed, ("control", treated, control, step, scope)))
                epoch = pd.to_numeric(gt["epoch"], errors="coerce").dropna() if "epoch" in gt.columns else pd.Series()
                rows.append({"treated": treated, "control": control, "treated_label": labels[treated],
                             "control_label": labels[control], "seed": int(gt["seed"].iloc[0]) if "seed" in gt else 0,
                             "step": int(step), "epoch": float(epoch.iloc[0]) if len(epoch) else float("nan"),
                             "prompt_family": family, "scope": scope, "rate_treated": d["rate_a"],
                             "rate_control": d["rate_b"], "diff": d["diff"], "lo": d["lo"], "hi": d["hi"],
                             "n_treated": d["n_a"], "n_control": d["n_b"],
                             "n_questions_shared": len(shared), "paired": d["paired"]})
    return pd.DataFrame(rows, columns=CONTROL_COLUMNS)
