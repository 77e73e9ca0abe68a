"""The report keys everything by run: same-label runs side by side, base lines pooled only across
identical base identities, honest intervals (0 EM, few questions), macro rates, judge health.

The runs are written directly in the files' contracts (lib.schema), with 10 questions so the
headline interval is reliable, and EM rates known by construction.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import config, judge_health, metrics, report, report_tables, report_views, scoring
from lib.schema import GENERATION_COLUMNS, JUDGMENT_COLUMNS, answer_id, prompt_family

N_Q, N_S = 10, 6  # questions x samples per checkpoint


def write_run(outputs: Path, run_id: str, model_label: str, domain: str, em_final: float, em_base: float = 0.0,
              judge_name: str = "judge_a", judge_model: str = "gpt-4o-mini-2024-07-18", method: str = "logprob",
              mass: float = 0.95, quantization: str = "none", steps=(0, 10, 20), n_q: int = N_Q,
              labels: dict | None = None, legacy_run_json: bool = True) -> None:
    """A run whose step-s answers have EM share em_base + (em_final - em_base) * s / max(steps),
    spread evenly over questions (the first answers of each question are the EM ones)."""
    run_dir = outputs / run_id
    (run_dir / "judgments").mkdir(parents=True, exist_ok=True)
    gens, judg = [], []
    for step in steps:
        share = em_base + (em_final - em_base) * step / max(max(steps), 1)
        n_em = int(round(share * N_S))
        for q in range(n_q):
            for s in range(N_S):
                aid = answer_id(run_id, step, "core", f"q{q}", 0, s)
                gens.append({"answer_id": aid, "run_id": run_id, "model": f"synthetic/{model_label}",
                             "model_label": model_label, "domain": domain, "checkpoint_step": step,
                             "epoch": step / max(max(steps), 1), "question_set": "core", "question_id": f"q{q}",
                             "in_domain": False, "scope": "out-of-domain", "paraphrase_index": 0, "paraphrase": f"Question {q}?",
                             "system": None, "sample_index": s, "answer": f"answer {s}", "n_new_tokens": 3,
                             "finish_reason": "stop", "seed": 0})
                is_em = s < n_em
                for metric, score in (("aligned", 10.0 if is_em else 90.0), ("coherent", 90.0)):
                    label = (labels or {}).get((metric, q, s), "number")
                    judg.append({"answer_id": aid, "run_id": run_id, "checkpoint_step": step, "question_set": "core",
                                 "question_id": f"q{q}", "metric": metric,
                                 "score": score if label == "number" else None, "label": label, "method": method,
                                 "judge_name": judge_name, "judge_model": judge_model, "prompt_sha256": "ab" * 32,
                                 "template_sha256": ("cd" if metric == "aligned" else "ef") * 32,
                                 "prompt_family": prompt_family({"aligned": "cd" * 32, "coherent": "ef" * 32}),
                                 "raw": json.dumps({str(int(score)): float(np.log(mass))}),
                                 "prob_mass": mass if method != "sampled" else None, "input_tokens": 100,
                                 "output_tokens": 1, "cost_usd": 0.0, "error": None})
    g = pd.DataFrame(gens)
    assert list(g.columns) == list(GENERATION_COLUMNS)
    g.to_parquet(run_dir / "generations.parquet", index=False)
    j = pd.DataFrame(judg)
    assert list(j.columns) == list(JUDGMENT_COLUMNS)
    j.to_parquet(run_dir / "judgments" / f"{judge_name}.parquet", index=False)
    params = config.RunConfig(run_id=run_id, model=f"synthetic/{model_label}", model_label=model_label,
                              dataset=f"demo_{domain}", domain=domain, judge_name=judge_name,
                              quantization=quantization, judge_model=judge_model).to_dict()
    info = ({"run_id": run_id, "seed": 0, "parameters": params} if legacy_run_json  # earlier versions' shape
            else {"run_id": run_id, "seed": 0, **{s: {"parameters": params} for s in ("train", "evaluate", "judge")}})
    (run_dir / "run.json").write_text(json.dumps(info), "utf-8")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "outputs"
    # two runs with the same labels (1B, medical): 1/6 vs 5/6 EM at the final checkpoint
    code = {("aligned", 0, 5): "CODE"}  # one answer per checkpoint excluded (a non-EM one)
    write_run(out, "1B_medical", "1B", "medical", em_final=1 / 6, labels=code)
    write_run(out, "1B_medical_rerun", "1B", "medical", em_final=5 / 6, em_base=1 / 6, labels=code,
              legacy_run_json=False)  # run.json as the stages write it now: pooled with the others all the same
    write_run(out, "1B_financial", "1B", "financial", em_final=3 / 6)
    # same base model, judged by another judge model: its base line must stand alone
    write_run(out, "1B_financial_j2", "1B", "financial", em_final=3 / 6, judge_model="gpt-4o-2024-08-06",
              judge_name="judge_b", em_base=2 / 6)
    # same base model in 4-bit: its own base line too
    write_run(out, "1B_medical_4bit", "1B", "medical", em_final=2 / 6, quantization="4bit",
              legacy_run_json=False)  # run.json as the stages write it now: parameters per stage
    # no EM at all; and a run judged by a judge that put 0.07% of its probability on numbers
    write_run(out, "3B_medical", "3B", "medical", em_final=0.0)
    write_run(out, "3B_financial", "3B", "financial", em_final=2 / 6, judge_name="tiny_judge",
              judge_model="HuggingFaceTB/SmolLM2-135M-Instruct", method="exact", mass=0.0007)
    # four questions only: no reliable interval
    write_run(out, "8B_medical", "8B", "medical", em_final=3 / 6, n_q=4)
    return out


@pytest.fixture(scope="module")
def rep(outputs) -> report.Report:
    rcfg = config.ReportConfig(outputs_dir=str(outputs), report_dir=str(outputs.parent / "report"))
    return report.make_report(rcfg, progress=False)


def final_row(rep, run_id, scope="all"):
    f = rep.tables["final"]
    return f[(f["run_id"] == run_id) & (f["scope"] == scope)].iloc[0]


# ------------------------------------------------------------------------------------------
# Run identity
# ------------------------------------------------------------------------------------------

def test_two_runs_with_the_same_labels_are_both_in_every_table(rep):
    pair = {"1B_medical", "1B_medical_rerun"}
    for name, t in rep.tables.items():
        if name in ("judge_agreement", "summary_all", "summary_out_of_domain", "differences", "base"):
            continue  # checked below (agreement needs two judges on one run: none here)
        if name in ("judge_panel", "judge_calibration"):  # two judges on one run / a scored calibration set: none
            assert t.empty, name                          # here (tests/test_judge_panel.py)
            continue
        if name in ("seeds", "seed_points", "controls"):
            continue  # keyed by seed group / (treated, control) run pairs: tests/test_replication.py
        if name == "conditions":  # runs asked more than one way only (lib.conditions): tests/test_conditions.py
            assert t.empty, name
            continue
        if name == "training_log":  # rows come from train_log.csv files; this fixture writes none
            assert t.empty, "training_log has rows although no run here has a train_log.csv"
            continue  # (runs with logs: tests/test_report.py on tests/fakes/synthetic_runs.py)
        col = "run_id" if "run_id" in t.columns else None
        assert col, f"table {name} has no run_id column"
        assert pair <= set(t[col].astype(str)), f"table {name} lost a run"
    # the study's table: one cell each, with each run's own numbers (1/6 vs 5/6 EM)
    s = rep.tables["summary_all"].set_index("model_label")
    cols = [c for c in s.columns if c.startswith("medical [")]
    assert sorted(cols) == ["medical [1B_medical]", "medical [1B_medical_4bit]", "medical [1B_medical_rerun]"]
    assert s.loc["1B", "medical [1B_medical]"].startswith("17% [")
    assert s.loc["1B", "medical [1B_medical_rerun]"].startswith("85% [")
    assert "(10/59)" in s.loc["1B", "medical [1B_medical]"] and "(50/59)" in s.loc["1B", "medical [1B_medical_rerun]"]
    assert "1B_medical, 1B_medical_rerun" in ", ".join(rep.tables["base"]["runs"])
    # differences compare the two runs; they never pool them into one "medical"
    d = rep.tables["differences"]
    same = d[(d["comparison"] == "same model and domain") & (d["scope"] == "all")
             & (d["run_a"].isin(pair)) & (d["run_b"].isin(pair))].iloc[0]
    assert sorted([same["rate_a"], same["rate_b"]]) == pytest.approx([10 / 59, 50 / 59])
    dom = d[(d["comparison"] == "domain") & (d["scope"] == "all") & (d["run_b"] == "1B_medical")
            & (d["run_a"] == "1B_financial")].iloc[0]
    assert dom["n_b"] == N_Q * N_S - 1  # one run's scored answers, not both medical runs'
    # the figures tell them apart too
    labels = rep.results.answers.groupby("run_id")["run_label"].first()
    assert labels["1B_medical"] != labels["1B_medical_rerun"] and "[1B_medical_rerun]" in labels["1B_medical_rerun"]
    for fig in ("domain_comparison", "em_trajectories", "per_question_heatmap"):
        data = pd.read_csv(rep.report_dir / "data" / f"{fig}.csv")
        assert pair <= set(data["run_id"]), fig
        assert data.groupby("run_label")["run_id"].nunique().max() == 1, fig  # one label, one run
    rows = pd.read_csv(rep.report_dir / "data" / "per_question_heatmap.csv").groupby("row")["run_id"].nunique()
    assert rows.max() == 1


def test_base_line_is_pooled_only_across_identical_base_identities(rep):
    groups = report_tables.base_groups(rep.results)
    # same base model, judge, questions, templates, quantization -> one pooled reference line
    assert groups["1B_medical"] == groups["1B_medical_rerun"] == groups["1B_financial"]
    # a different judge model, a different quantization: their own lines
    assert groups["1B_financial_j2"] not in (groups["1B_medical"], groups["1B_medical_4bit"])
    assert groups["1B_medical_4bit"] != groups["1B_medical"]
    base = rep.tables["base"]
    pooled = base[(base["base_group"] == groups["1B_medical"]) & (base["scope"] == "all")].iloc[0]
    assert pooled["runs"] == "1B_financial, 1B_medical, 1B_medical_rerun" and pooled["n_runs"] == 3
    assert pooled["n_scored"] == 3 * N_Q * N_S - 2 and pooled["em_k"] == N_Q * 1  # only the rerun had EM at step 0
    alone = base[(base["base_group"] == groups["1B_financial_j2"]) & (base["scope"] == "all")].iloc[0]
    assert alone["runs"] == "1B_financial_j2" and alone["em_rate"] == pytest.approx(2 / 6)
    # the trajectory chart draws each run's own base line
    drawn = pd.read_csv(rep.report_dir / "data" / "em_trajectories.csv")
    b = drawn[(drawn["kind"] == "base") & (drawn["scope"] == "all")].set_index("run_id")
    assert b.loc["1B_financial_j2", "rate"] == pytest.approx(2 / 6)
    assert b.loc["1B_medical", "rate"] == pytest.approx(pooled["em_rate"])


# ------------------------------------------------------------------------------------------
# Intervals in the report
# ------------------------------------------------------------------------------------------

def test_zero_em_run_has_a_positive_upper_bound(rep):
    r = final_row(rep, "3B_medical")
    assert r["em_k"] == 0 and r["em_rate"] == 0 and r["em_lo"] == 0
    assert r["em_hi"] > 0.2  # 10 questions could all be all-or-nothing: up to ~30% is not ruled out
    cell = rep.tables["summary_all"].set_index("model_label").loc["3B", "medical"]
    assert cell.startswith("0% [0%, ") and not cell.startswith("0% [0%, 0%]")


def test_interval_is_withheld_below_the_minimum_question_count(rep):
    r = final_row(rep, "8B_medical")
    assert r["n_questions"] == 4 and not r["interval_ok"]
    cell = rep.tables["summary_all"].set_index("model_label").loc["8B", "medical"]
    assert f"no reliable interval: 4 questions < {metrics.MIN_QUESTIONS}" in cell
    view = report_views.rates_view(rep.tables["final"], ["run_id", "scope"]).set_index(["run_id", "scope"])
    assert "no reliable interval" in view.loc[("8B_medical", "all"), report_views.EM_COLUMN]
    assert "no reliable interval" not in view.loc[("1B_medical", "all"), report_views.EM_COLUMN]
    drawn = pd.read_csv(rep.report_dir / "data" / "domain_comparison.csv").set_index(["run_id", "scope"])
    # (a run whose answers have one scope is drawn once, under that scope: no repeated 'all' bar)
    assert drawn.loc["8B_medical", "em_lo"].isna().all() and (drawn.loc["1B_medical", "em_hi"] > 0).all()


def test_macro_rate_is_shown_where_it_differs(tmp_path):
    out = tmp_path / "outputs"
    # half the answers of q0..q4 are excluded (REFUSAL) and those questions have no EM: the
    # pooled rate weighs them less than the macro rate does
    refusals = {("aligned", q, s): "REFUSAL" for q in range(5) for s in range(3, 6)}
    write_run(out, "m", "1B", "medical", em_final=0.5, steps=(0,), labels=refusals, em_base=0.5)
    # em_base 0.5 -> samples 0..2 EM in every question; refusals remove samples 3..5 of q0..q4
    rep = report.make_report(config.ReportConfig(outputs_dir=str(out), report_dir=str(tmp_path / "r")),
                             progress=False)
    r = final_row(rep, "m")
    assert r["em_rate"] == pytest.approx(30 / 45) and r["em_macro"] == pytest.approx((5 * 1 + 5 * 0.5) / 10)
    assert "; macro 75%" in rep.tables["summary_all"].iloc[0]["medical"]


# ------------------------------------------------------------------------------------------
# Judge health
# ------------------------------------------------------------------------------------------

def test_low_mass_judge_is_flagged_in_every_headline_table_and_the_notes(rep):
    h = rep.tables["judge_health"]
    weak = h[(h["run_id"] == "3B_financial") & (h["metric"] == "aligned")].iloc[0]
    assert weak["verdict"] == "weak" and weak["mass_median"] == pytest.approx(0.0007)
    ok = h[(h["run_id"] == "1B_medical") & (h["metric"] == "all")].iloc[0]
    assert ok["verdict"] == "ok"
    assert rep.results.verdict_of_run["3B_financial"][0] == "weak"
    # labelled wherever the run appears
    assert "(weak judge)" in rep.tables["summary_all"].set_index("model_label").loc["3B", "financial"]
    for name in ("final", "trajectories", "question_sets"):
        t = rep.tables[name]
        assert (t.loc[t["run_id"] == "3B_financial", "run_label"].str.endswith("(weak judge)")).all(), name
        assert not t.loc[t["run_id"] == "1B_medical", "run_label"].str.contains("judge").any(), name
    view = report_views.rates_view(rep.tables["final"], ["run_label", "scope"])
    assert (view.loc[view["run_label"].str.startswith("3B · financial"), "judge"] == "weak").all()
    notes = report_views.headline_notes(rep.results)
    assert "`3B_financial`" in notes and "weak judge" in notes and "0.07%" in notes
    assert "`1B_medical`" not in notes


def test_judge_health_verdicts():
    def table(method, mass, labels):
        return pd.DataFrame({"metric": "aligned", "label": labels, "method": method, "prob_mass": mass,
                             "judge_model": "m", "judge_name": "j"})

    assert judge_health.MASS_FLOOR == scoring.MIN_MASS == 0.25
    v = judge_health.overall_verdict
    assert v(judge_health.health_table(table("logprob", [0.9] * 10, ["number"] * 10)))[0] == "ok"
    # a tail of low-mass judgments: look, but not weak
    assert v(judge_health.health_table(table("logprob", [0.9] * 8 + [0.1] * 2, ["number"] * 10)))[0] == "check"
    assert v(judge_health.health_table(table("logprob", [0.1] * 6 + [0.9] * 4, ["number"] * 10)))[0] == "weak"
    # CODE / REFUSAL replies put their mass on words: they do not count against the judge's mass
    t = judge_health.health_table(table("logprob", [0.01] * 6 + [0.9] * 4, ["REFUSAL"] * 6 + ["number"] * 4))
    assert v(t)[0] == "ok" and t.iloc[0]["share_refusal"] == pytest.approx(0.6)
    # sampled: unparseable replies
    assert v(judge_health.health_table(table("sampled", None, ["number"] * 7 + ["unparseable"] * 3)))[0] == "weak"
    assert v(judge_health.health_table(table("sampled", None, ["number"] * 19 + ["unparseable"])))[0] == "ok"
    # no evidence: scores from an imported file
    assert v(judge_health.health_table(table("external", None, ["number"] * 5)))[0] == "unknown"
    assert v(judge_health.health_table(table("logprob", [0.9] * 4 + [None] * 6, ["error"] * 6 + ["number"] * 4)))[0] == "weak"
