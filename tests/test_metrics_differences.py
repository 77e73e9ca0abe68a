"""metrics.rate_difference at the edges: one or both sides at 0 EM, identical counts, too few
questions, and the report and control tables never differencing runs of different judges.

The previous method (a paired percentile bootstrap over questions) gave [0, 0.0075] for 1/400 vs
0/400 over 8 questions and [0, 0] for identical per-question counts; bench/interval_coverage.py
measured its coverage at 0.23-0.74 in such cells. These tests pin the replacement's behaviour."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lib import metrics


def _group(k_per_question: list[int], n: int = 50, question_set: str = "s") -> pd.DataFrame:
    return pd.DataFrame([{"question_set": question_set, "question_id": f"q{i}", "em": j < k}
                         for i, k in enumerate(k_per_question) for j in range(n)])


def test_one_em_answer_against_none_covers_a_five_point_difference():
    """1/400 vs 0/400 over 8 questions: with strongly clustered questions a 5-point rate can show no
    EM at all, so the interval must reach past +5 points (and below 0: the control could hold EM too)."""
    out = metrics.rate_difference(_group([1] + [0] * 7), _group([0] * 8))
    assert out["interval"] == "mover" and out["paired"]
    assert out["diff"] == pytest.approx(1 / 400)
    assert out["lo"] < 0 < 0.05 < out["hi"]


def test_zero_against_zero_is_the_square_and_add_of_the_edge_bounds():
    """No EM on either side, same 8 questions: no correlation can be shown (no spread), and each side's
    interval [0, u] contributes to one end only: [-u, +u], u = 1 - 0.05^(1/8)."""
    out = metrics.rate_difference(_group([0] * 8), _group([0] * 8))
    u = 1 - 0.05 ** (1 / 8)
    assert out["diff"] == 0 and out["correlation"] == 0
    assert (out["lo"], out["hi"]) == pytest.approx((-u, u), abs=1e-12)


def test_identical_counts_never_give_a_zero_width_interval():
    """3/400 vs 3/400 on the same question: the counts agree by chance, each side's answers were
    sampled on their own; the interval keeps both sides' uncertainty."""
    a = _group([3] + [0] * 7)
    out = metrics.rate_difference(a, a.copy())
    assert out["diff"] == 0 and out["hi"] - out["lo"] > 0.05 and out["lo"] < 0 < out["hi"]
    rng = np.random.default_rng(0)
    for _ in range(20):                          # any identical counts, any spread
        k = list(rng.integers(0, 51, size=8) * rng.integers(0, 2, size=8))
        g = _group(k)
        d = metrics.rate_difference(g, g.copy())
        assert d["hi"] - d["lo"] > 0.01, (k, d)


def test_a_difference_over_fewer_than_eight_questions_is_withheld():
    out = metrics.rate_difference(_group([10, 0, 3, 0]), _group([0, 0, 0, 0]))
    assert out["interval"] == "none" and math.isnan(out["lo"]) and math.isnan(out["hi"])
    assert out["diff"] == pytest.approx(13 / 200) and "fewer than 8 questions" in out["note"]
    # one side short is enough
    short = metrics.rate_difference(_group([1] * 8), _group([0] * 7))
    assert short["interval"] == "none" and "fewer than 8" in short["note"]


def test_paired_correlation_narrows_only_as_far_as_the_questions_show_it():
    """Two checkpoints whose EM sits on the same questions (a strongly paired design) get a narrower
    interval than the same counts on unrelated questions, but never as narrow as the raw correlation
    estimate would make it."""
    ka = [20, 15, 0, 0, 10, 0, 25, 0, 5, 0, 0, 12]
    kb = [10, 9, 0, 1, 4, 0, 14, 0, 2, 0, 0, 6]
    paired = metrics.rate_difference(_group(ka), _group(kb))
    unpaired = metrics.rate_difference(_group(ka, question_set="x"), _group(kb, question_set="y"))
    assert paired["paired"] and not unpaired["paired"]
    assert paired["diff"] == pytest.approx(unpaired["diff"])
    assert 0 < paired["correlation"] < metrics.paired_correlation(ka, [50] * 12, kb, [50] * 12)
    assert paired["hi"] - paired["lo"] < unpaired["hi"] - unpaired["lo"]
    assert unpaired["correlation"] == 0


def test_mover_bounds_closed_form():
    lo, hi = metrics.mover_bounds(0.3, 0.2, 0.45, 0.1, 0.05, 0.2, 0.0)
    assert float(lo) == pytest.approx(0.2 - math.sqrt(0.1 ** 2 + 0.1 ** 2))
    assert float(hi) == pytest.approx(0.2 + math.sqrt(0.15 ** 2 + 0.05 ** 2))
    lo_r, hi_r = metrics.mover_bounds(0.3, 0.2, 0.45, 0.1, 0.05, 0.2, 0.5)
    assert float(lo_r) == pytest.approx(0.2 - math.sqrt(0.01 + 0.01 - 2 * 0.5 * 0.01))
    assert float(hi_r) == pytest.approx(0.2 + math.sqrt(0.15 ** 2 + 0.05 ** 2 - 2 * 0.5 * 0.15 * 0.05))


def test_the_sides_swap_into_a_mirrored_interval():
    a, b = _group([5, 0, 2, 0, 0, 9, 1, 0]), _group([0, 0, 1, 0, 0, 2, 0, 0])
    ab, ba = metrics.rate_difference(a, b), metrics.rate_difference(b, a)
    assert (ba["lo"], ba["hi"]) == pytest.approx((-ab["hi"], -ab["lo"]), abs=1e-12)


def _run_rows(run: str, judge: str, k_final: int, control_of: str = "", domain: str = "medical") -> list[dict]:
    rows = []
    for step in (0, 10):
        for q in range(10):
            for i in range(40):
                rows.append({"run_id": run, "checkpoint_step": step, "epoch": step / 10, "question_set": "qs",
                             "question_id": f"q{q}", "em": step == 10 and i < k_final, "scope": "out-of-domain",
                             "prompt_family": "f1", "seed": 0, "seed_group": "", "control_of": control_of,
                             "run_label": run, "model_label": "tiny", "domain": domain, "judge_name": judge,
                             "source": "run", "judge_verdict": "ok"})
    return rows


def test_the_control_table_never_differences_runs_of_different_judges():
    from lib import replication

    same = pd.DataFrame(_run_rows("bad", "j1", 20) + _run_rows("good", "j1", 2, control_of="bad"))
    d = replication.control_differences(same)
    base = d[(d["step"] == 0) & (d["scope"] == "all")].iloc[0]
    u = 1 - 0.05 ** (1 / 10)   # each side at 0 EM: the edge bound
    assert base["diff"] == 0 and (base["lo"], base["hi"]) == pytest.approx((-u, u), abs=1e-12)
    final = d[(d["step"] == 10) & (d["scope"] == "all")].iloc[0]
    assert final["diff"] == pytest.approx(0.45) and final["lo"] < 0.45 < final["hi"] and final["lo"] > 0
    other = pd.DataFrame(_run_rows("bad", "j1", 20) + _run_rows("good", "j2", 2, control_of="bad"))
    assert replication.control_differences(other).empty


def test_the_report_differences_table_never_differences_runs_of_different_judges():
    from lib import config, report_tables

    rcfg = config.ReportConfig()
    rows = (_run_rows("med", "j1", 20) + _run_rows("fin", "j1", 5, domain="financial")
            + _run_rows("fin_j2", "j2", 5, domain="financial"))
    d = report_tables.differences_table(pd.DataFrame(rows), rcfg)
    between = d[d["comparison"] != "final vs base"]
    pairs = {frozenset((r.run_a, r.run_b)) for r in between.itertuples()}
    assert pairs == {frozenset(("med", "fin"))}
    assert set(between["judge_name"]) == {"j1"}
    assert (d[d["comparison"] == "final vs base"]["run_a"].nunique()) == 3
