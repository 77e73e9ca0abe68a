"""metrics.bootstrap_difference at the edge: two sides with 0 EM (or 100%) resample to one value,
so the interval comes from the edge rule (square-and-add of the sides' exact worst-case bounds),
checked against a closed-form computation written out here."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy.stats import norm, t as student_t

from lib import metrics


def _group(k_per_question: list[int], n: int = 50, question_set: str = "s") -> pd.DataFrame:
    return pd.DataFrame([{"question_set": question_set, "question_id": f"q{i}", "em": j < k}
                         for i, k in enumerate(k_per_question) for j in range(n)])


def _edge_bounds(m: int, confidence: float) -> tuple[float, float]:
    """(upper bound at 0 EM, lower bound at 100% EM) of m questions, in closed form: the exact
    (Clopper-Pearson) bound for 0 of n_eff is 1 - (alpha/2)^(1/n_eff), with Korn & Graubard's
    n_eff = m x (z / t_{m-1})^2 at the edge."""
    a = (1 - confidence) / 2
    n_eff = m * (norm.ppf(1 - a) / student_t.ppf(1 - a, m - 1)) ** 2
    return 1 - a ** (1 / n_eff), a ** (1 / n_eff)


def test_zero_em_on_both_sides_is_not_a_certain_zero_difference():
    # two checkpoints asked the same 8 questions x 50 answers, no EM on either: paired
    out = metrics.bootstrap_difference(_group([0] * 8), _group([0] * 8), n_boot=500, seed=0)
    u, _ = _edge_bounds(8, 0.95)
    assert out["paired"] and out["interval"] == "edge" and out["diff"] == 0
    assert (out["lo"], out["hi"]) == pytest.approx((-u, u), abs=1e-9)
    assert out["hi"] == pytest.approx(0.489, abs=5e-4)  # 8 questions cannot rule out ~49% EM on either side


def test_edge_rule_with_different_question_counts_sides_and_confidence():
    # a: 10 questions all EM; b: 6 other questions, none (unpaired); 90% intervals
    a, b = _group([50] * 10, question_set="x"), _group([0] * 6, question_set="y")
    out = metrics.bootstrap_difference(a, b, n_boot=500, confidence=0.90)
    _, l_a = _edge_bounds(10, 0.90)
    u_b, _ = _edge_bounds(6, 0.90)
    assert not out["paired"] and out["interval"] == "edge" and out["diff"] == 1.0
    assert out["lo"] == pytest.approx(1 - math.sqrt((1 - l_a) ** 2 + u_b ** 2), abs=1e-9)
    assert out["hi"] == pytest.approx(1.0, abs=1e-12)  # a at 100% and b at 0: the difference cannot exceed 1
    # the same sides swapped: the interval mirrors
    back = metrics.bootstrap_difference(b, a, n_boot=500, confidence=0.90)
    assert (back["lo"], back["hi"]) == pytest.approx((-out["hi"], -out["lo"]), abs=1e-9)


def test_edge_interval_function_matches_the_closed_form_and_needs_two_questions():
    u8, _ = _edge_bounds(8, 0.95)
    u12, _ = _edge_bounds(12, 0.95)
    lo, hi = metrics.edge_difference_interval([0] * 8, [50] * 8, [0] * 12, [20] * 12)
    assert (lo, hi) == pytest.approx((-u12, u8), abs=1e-9)
    assert all(math.isnan(x) for x in metrics.edge_difference_interval([0], [5], [0, 0], [5, 5]))


def test_off_the_edge_the_bootstrap_is_kept_and_too_few_questions_give_no_interval():
    out = metrics.bootstrap_difference(_group([1] + [0] * 7), _group([0] * 8), n_boot=500, seed=0)
    assert out["interval"] == "bootstrap" and out["lo"] == 0 and 0 < out["hi"] < 0.01
    one = metrics.bootstrap_difference(_group([0]), _group([0]), n_boot=500, seed=0)
    assert one["interval"] == "none" and math.isnan(one["lo"]) and math.isnan(one["hi"])


def test_the_control_table_gets_the_edge_rule_from_metrics():
    """lib.replication calls metrics.bootstrap_difference: at step 0 (the same base model on both
    sides, no EM on either) its row carries the edge interval, not [0, 0]."""
    from lib import replication

    rows = []
    for run, control_of, k_final in (("bad", "", 20), ("good", "bad", 2)):
        for step in (0, 10):
            for q in range(10):
                for i in range(40):
                    rows.append({"run_id": run, "checkpoint_step": step, "epoch": step / 10, "question_set": "qs",
                                 "question_id": f"q{q}", "em": step == 10 and i < k_final, "scope": "out-of-domain",
                                 "prompt_family": "f1", "seed": 0, "seed_group": "", "control_of": control_of,
                                 "run_label": run, "model_label": "tiny", "domain": "medical"})
    d = replication.control_differences(pd.DataFrame(rows), n_boot=300)
    base = d[(d["step"] == 0) & (d["scope"] == "all")].iloc[0]
    u, _ = _edge_bounds(10, 0.95)
    assert base["diff"] == 0 and (base["lo"], base["hi"]) == pytest.approx((-u, u), abs=1e-9)
    final = d[(d["step"] == 10) & (d["scope"] == "all")].iloc[0]
    assert final["diff"] == pytest.approx(0.45) and final["hi"] - final["lo"] == pytest.approx(0, abs=1e-12)
