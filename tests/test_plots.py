"""Figures that say what they show: n on bars, 0% visible, the base model as a reference."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from lib import plots


def _final(rate: float, scopes=("all", "out-of-domain")) -> pd.DataFrame:
    rows = []
    for run in ("a", "b"):
        for sc in scopes:
            rows.append({"model_label": "tiny", "domain": "medical", "run_id": run, "run_label": f"tiny · {run}",
                         "judge_verdict": "ok", "source": "run", "checkpoint_step": 10, "scope": sc,
                         "n_answers": 40, "n_scored": 40, "n_excluded": 0, "n_questions": 8, "em_k": round(rate * 40),
                         "em_rate": rate, "em_lo": 0.0, "em_hi": 0.09, "interval_ok": True, "em_macro": rate,
                         "em_wilson_lo": 0.0, "em_wilson_hi": 0.09})
    return pd.DataFrame(rows)


def test_zero_em_bars_are_drawn_with_n_and_base_reference():
    base = pd.DataFrame([{"run_id": r, "scope": sc, "em_rate": 0.025} for r in ("a", "b")
                         for sc in ("all", "out-of-domain")])
    chart, data = plots.domain_comparison_chart(_final(0.0), base)
    # only out-of-domain questions: the 'all' bar would duplicate it, so it is not drawn
    assert set(data["scope"]) == {"out-of-domain"} and len(data) == 2
    assert list(data["n_label"]) == ["0/40", "0/40"]
    assert np.allclose(data["base_rate"], 0.025)
    spec = json.dumps(chart.to_dict())
    assert '"tick"' in spec and "base model" in spec  # a tick at the rate (visible at 0%) and the base reference


def test_all_is_kept_when_runs_have_several_scopes():
    _, data = plots.domain_comparison_chart(_final(0.1, scopes=("all", "in-domain", "out-of-domain")))
    assert sorted(set(data["scope"])) == ["all", "in-domain", "out-of-domain"]
    assert set(data["n_label"]) == {"4/40"}
