"""Seeds and controls: the two comparisons that decide whether an EM number means anything.

* **Seeds.** Runs that differ only in ``seed`` share a ``seed_group`` (the grid's ``seeds:``
  expansion sets it). :func:`seed_interval` pools their final rates with an interval that
  includes the between-seed variance; :func:`seed_table` does it per seed group, scope and
  judge-prompt family, and keeps every seed's own rate beside the pooled one.
* **Controls.** A run with ``control_of: X`` is the control fine-tune (same model, steps and
  judge, benign data) of run ``X`` or of seed group ``X``. :func:`control_pairs` pairs each
  treated run with its control (same seed where both have seeds); :func:`control_differences`
  gives treated minus control at every checkpoint step both have, on the questions both
  were asked, with an interval from both sides' headline intervals (:func:`lib.metrics.rate_difference`).

The input is the report's answers table (one row per answer with ``em``, ``scope``,
``prompt_family``, ``checkpoint_step`` and the run columns ``run_id``, ``run_label``,
``seed``, ``seed_group`` and ``control_of``). Pure functions of tables: no files, no models.

Seed-aggregated interval (:func:`seed_interval`): the seeds are S independent draws of the
configuration's training randomness, asked the *same* questions (one parameters file). The rate is
the pooled rate of every seed's answers; its uncertainty has three parts: which questions were asked
(shared by all seeds, so it does not show in the spread of the seeds' rates), which answers were
sampled, and which seeds were trained. A crossed seed x question model handles them:

* the first two come from the headline interval (:func:`lib.metrics.beta_binomial_arrays`) on the
  answers of all seeds pooled per question, which sees how much questions differ and keeps its
  exact bound at 0 EM;
* the third from the seeds' spread: with ``y_si`` the EM rate of question i under seed s, the
  seeds' mean square ``MS_seed`` (m times the variance of the seed rates) gives ``MS_seed / (m S)``
  for the pooled rate, with Student's t on ``S - 1`` degrees of freedom (two seeds give a very wide
  interval when they disagree: that is what two seeds can tell). It holds training randomness and
  each seed's own sampling noise, which the first part already counts: conservative, on purpose
  (subtracting the two-way residual mean square covered as little as 0.914 where seeds differ a
  lot; docs/benchmarks.md). ``tau``, the between-seed sd reported, does subtract it:
  ``sqrt(max(0, MS_seed - MS_residual) / m)``;
* the two are combined by square-and-add (:func:`lib.metrics.mover_bounds` with the seed term as a
  second component centred on 0).

Coverage is measured by ``bench/seed_interval_coverage.py`` in this shared-question design
(docs/benchmarks.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import metrics
from .conditions import with_condition

SEED_COLUMNS = ["seed_group", "group_label", "prompt_family", "scope", "n_seeds", "seeds", "seed_rates",
                "em_rate", "em_lo", "em_hi", "tau", "n_scored", "n_questions", "interval_ok", "condition"]
CONTROL_COLUMNS = ["treated", "control", "treated_label", "control_label", "seed", "step", "epoch", "prompt_family",
                   "scope", "rate_treated", "rate_control", "diff", "lo", "hi", "n_treated", "n_control",
                   "n_questions_shared", "paired", "correlation", "note", "condition"]


def seed_interval_arrays(k: np.ndarray, n: np.ndarray, confidence: float = 0.95) -> dict[str, np.ndarray]:
    """The seed-aggregated rate and interval (module docstring), vectorised.

    ``k``, ``n``: arrays ``(..., S, m)`` of EM answers and scored answers per seed and question (the
    same m questions for every seed, each with at least one scored answer in every seed). Returns
    arrays over the leading indices: ``rate`` (pooled over seeds), ``lo``, ``hi``, ``tau`` (the
    between-seed standard deviation of a seed's rate, beyond sampling), ``seed_half`` (the seed
    term's half-width). With one seed: that seed's headline interval.
    """
    from scipy.stats import t as student_t  # heavy: loaded only when an interval is computed

    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    s_, m = k.shape[-2], k.shape[-1]
    rate, lo, hi = metrics.beta_binomial_arrays(k.sum(-2), n.sum(-2), confidence)
    zero = np.zeros_like(rate)
    if s_ < 2:
        return {"rate": rate, "lo": lo, "hi": hi, "tau": zero, "seed_half": zero}
    y = k / n                                                   # (..., S, m)
    grand = y.mean(axis=(-2, -1), keepdims=True)
    by_seed = y.mean(axis=-1, keepdims=True)                    # (..., S, 1)
    by_q = y.mean(axis=-2, keepdims=True)                       # (..., 1, m)
    ms_seed = m * ((by_seed - grand) ** 2).sum(axis=(-2, -1)) / (s_ - 1)
    ms_res = (((y - by_seed - by_q + grand) ** 2).sum(axis=(-2, -1)) / ((s_ - 1) * (m - 1))
              if m > 1 else np.zeros_like(ms_seed))
    tau2 = np.maximum(ms_seed - ms_res, 0.0) / m               # variance of a seed's rate from training alone
    # the seed term uses the seeds' whole spread, ms_seed / m: training randomness plus each seed's own
    # sampling noise, which the pooled interval also counts (conservative; subtracting it covered as
    # little as 0.914 where seeds differ a lot, see bench/seed_interval_coverage.py)
    half = float(student_t.ppf(1 - (1 - confidence) / 2, s_ - 1)) * np.sqrt(ms_seed / m / s_)
    lo2, hi2 = metrics.mover_bounds(rate, lo, hi, zero, -half, half)
    return {"rate": rate, "lo": np.maximum(lo2, 0.0), "hi": np.minimum(hi2, 1.0), "tau": np.sqrt(tau2),
            "seed_half": half}


def seed_interval(per_seed: list[pd.DataFrame], confidence: float = 0.95) -> dict[str, float]:
    """:func:`seed_interval_arrays` for the labelled answers of S seeds (one frame each, with ``em``
    and the question columns). Only questions every seed answered (with a scored answer) count.
    Returns ``{rate, lo, hi, tau, n_seeds, n_questions, n_scored}``; lo/hi NaN below 2 questions."""
    counts = [metrics._cluster_counts(g, "em", metrics.CLUSTER) for g in per_seed]
    counts = [c[c["n"] > 0] for c in counts]
    common = counts[0].index if counts else pd.Index([])
    for c in counts[1:]:
        common = common.intersection(c.index)
    out = {"rate": float("nan"), "lo": float("nan"), "hi": float("nan"), "tau": float("nan"),
           "n_seeds": len(per_seed), "n_questions": len(common), "n_scored": 0}
    if not len(common):
        return out
    k = np.stack([c.loc[common, "k"].to_numpy(float) for c in counts])
    n = np.stack([c.loc[common, "n"].to_numpy(float) for c in counts])
    got = seed_interval_arrays(k, n, confidence)
    out.update({key: float(got[key]) for key in ("rate", "lo", "hi", "tau")}, n_scored=int(n.sum()))
    return out


def _final(answers: pd.DataFrame) -> pd.DataFrame:
    a = answers[answers["checkpoint_step"] >= 0]
    last = a.groupby("run_id")["checkpoint_step"].transform("max")
    return a[a["checkpoint_step"] == last]


def seed_table(answers: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per seed group (runs with a ``seed_group``), scope and prompt family: every seed's final
    EM rate and the seed-aggregated rate and interval (:func:`seed_interval`)."""
    if "seed_group" not in answers.columns:
        return pd.DataFrame(columns=SEED_COLUMNS)
    grouped = answers[answers["seed_group"].fillna("").astype(str) != ""]
    if grouped.empty:
        return pd.DataFrame(columns=SEED_COLUMNS)
    f = with_condition(metrics.stack_scopes(_final(grouped)))
    rows = []
    for (group, family, cond, scope), g in f.groupby(["seed_group", "prompt_family", "condition", "scope"], sort=True):
        per = []
        for run_id, gr in g.groupby("run_id", sort=True):
            rate, _, _ = metrics.cluster_interval(gr, "em", confidence=confidence)
            per.append((run_id, int(gr["seed"].iloc[0]), rate, gr))
        per.sort(key=lambda p: p[1])
        agg = seed_interval([p[3] for p in per], confidence)
        label = str(g["run_label"].iloc[0]).split(" · seed")[0]
        rows.append({"seed_group": group, "group_label": label, "prompt_family": family, "scope": scope,
                     "condition": cond, "n_seeds": len(per), "seeds": ",".join(str(p[1]) for p in per),
                     "seed_rates": ",".join(f"{p[2]:.4f}" for p in per),
                     "em_rate": agg["rate"], "em_lo": agg["lo"], "em_hi": agg["hi"], "tau": agg["tau"],
                     "n_scored": agg["n_scored"], "n_questions": agg["n_questions"],
                     "interval_ok": bool(np.isfinite(agg["lo"])) and agg["n_questions"] >= metrics.MIN_QUESTIONS})
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def seed_points(answers: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Each seed's own final rate and headline interval (the points beside the pooled one)."""
    cols = ["seed_group", "run_id", "run_label", "seed", "prompt_family", "scope", "em_rate", "em_lo", "em_hi",
            "n_scored", "condition"]
    if "seed_group" not in answers.columns:
        return pd.DataFrame(columns=cols)
    grouped = answers[answers["seed_group"].fillna("").astype(str) != ""]
    rows = []
    for (group, run_id, family, cond, scope), g in with_condition(metrics.stack_scopes(_final(grouped))).groupby(
            ["seed_group", "run_id", "prompt_family", "condition", "scope"], sort=True):
        rate, lo, hi = metrics.cluster_interval(g, "em", confidence=confidence)
        rows.append({"seed_group": group, "run_id": run_id, "run_label": g["run_label"].iloc[0],
                     "seed": int(g["seed"].iloc[0]), "prompt_family": family, "scope": scope,
                     "em_rate": rate, "em_lo": lo, "em_hi": hi, "n_scored": int(g["em"].notna().sum()),
                     "condition": cond})
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


def control_differences(answers: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Treated minus control EM at every checkpoint step both runs have (step 0, the shared
    base model, included as a check that should show no difference), per scope and prompt
    family, on the questions both runs were asked (:func:`lib.metrics.rate_difference`: paired,
    none below :data:`lib.metrics.MIN_QUESTIONS` questions). A pair whose runs were scored by
    different judges is never differenced (no row)."""
    if "control_of" not in answers.columns:
        return pd.DataFrame(columns=CONTROL_COLUMNS)
    a = with_condition(answers[answers["checkpoint_step"] >= 0])
    labels = a.groupby("run_id")["run_label"].first()
    judges = a.groupby("run_id")["judge_name"].first() if "judge_name" in a.columns else None
    rows = []
    for treated, control in control_pairs(run_table(a)):
        if judges is not None and judges.get(treated) != judges.get(control):
            continue
        t, c = a[a["run_id"] == treated], a[a["run_id"] == control]
        qs = ["question_set", "question_id"]
        shared = t[qs].drop_duplicates().merge(c[qs].drop_duplicates(), on=qs)
        t, c = t.merge(shared, on=qs), c.merge(shared, on=qs)
        steps = sorted(set(t["checkpoint_step"]) & set(c["checkpoint_step"]))
        st, sc = metrics.stack_scopes(t), metrics.stack_scopes(c)
        for step in steps:
            for (family, cond, scope), gt in st[st["checkpoint_step"] == step].groupby(
                    ["prompt_family", "condition", "scope"], sort=True):  # never across conditions (lib.conditions)
                gc = sc[(sc["checkpoint_step"] == step) & (sc["prompt_family"] == family) & (sc["condition"] == cond)
                        & (sc["scope"] == scope)]
                if gc.empty:
                    continue
                d = metrics.rate_difference(gt, gc, "em", confidence=confidence)
                epoch = pd.to_numeric(gt["epoch"], errors="coerce").dropna() if "epoch" in gt.columns else pd.Series()
                rows.append({"treated": treated, "control": control, "treated_label": labels[treated],
                             "control_label": labels[control], "seed": int(gt["seed"].iloc[0]) if "seed" in gt else 0,
                             "step": int(step), "epoch": float(epoch.iloc[0]) if len(epoch) else float("nan"),
                             "prompt_family": family, "scope": scope, "rate_treated": d["rate_a"],
                             "rate_control": d["rate_b"], "diff": d["diff"], "lo": d["lo"], "hi": d["hi"],
                             "n_treated": d["n_a"], "n_control": d["n_b"],
                             "n_questions_shared": len(shared), "paired": d["paired"],
                             "correlation": d["correlation"], "note": d["note"], "condition": cond})
    return pd.DataFrame(rows, columns=CONTROL_COLUMNS)
