"""Seeds and controls (lib.replication, the seeds expansion in lib.config and the grid)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import t as student_t

from lib import config, metrics, replication
from lib.config import ConfigError, RunConfig, expand_seeds
from lib.grid_checks import validate
from lib.grid_jobs import GridError, Options
from tests.fakes.bench import load_bench

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# seed_interval: the crossed seed x question interval, worked by hand
# ------------------------------------------------------------------------------------------

def _seed_counts(rates: list[list[float]], n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    k = np.array([[round(r * n) for r in row] for row in rates], dtype=float)
    return k, np.full_like(k, float(n))


def test_one_seed_is_its_own_headline_interval():
    k, n = _seed_counts([[0.1, 0.3, 0.0, 0.2, 0.5, 0.1, 0.0, 0.2]])
    out = replication.seed_interval_arrays(k, n)
    rate, lo, hi = metrics.beta_binomial_arrays(k[0], n[0])
    assert (float(out["rate"]), float(out["lo"]), float(out["hi"])) == pytest.approx(
        (float(rate), float(lo), float(hi)), abs=1e-12)
    assert float(out["tau"]) == 0 and float(out["seed_half"]) == 0


def test_two_seeds_closed_form():
    """Pooled rate of every answer; the question part is the headline interval of the seeds' answers
    pooled per question; the seed term t_{S-1} sqrt(MS_seed / (m S)) enters by square-and-add."""
    rates = [[0.1, 0.2, 0.0, 0.3, 0.1, 0.0, 0.2, 0.1], [0.5, 0.6, 0.3, 0.7, 0.4, 0.5, 0.6, 0.4]]
    k, n = _seed_counts(rates)
    out = replication.seed_interval_arrays(k, n)
    rate, lo, hi = metrics.beta_binomial_arrays(k.sum(0), n.sum(0))
    y = k / n
    r = y.mean(1)
    ms_seed = 8 * ((r - r.mean()) ** 2).sum() / 1
    half = student_t.ppf(0.975, 1) * np.sqrt(ms_seed / 8 / 2)
    assert float(out["rate"]) == pytest.approx(k.sum() / n.sum())
    assert float(out["seed_half"]) == pytest.approx(half)
    assert float(out["lo"]) == pytest.approx(max(0.0, rate - np.sqrt((rate - lo) ** 2 + half ** 2)))
    assert float(out["hi"]) == pytest.approx(min(1.0, rate + np.sqrt((hi - rate) ** 2 + half ** 2)))
    # the between-seed sd beyond sampling: the two-way residual mean square subtracted
    res = y - y.mean(1, keepdims=True) - y.mean(0, keepdims=True) + y.mean()
    ms_res = (res ** 2).sum() / 7
    assert float(out["tau"]) == pytest.approx(np.sqrt(max(ms_seed - ms_res, 0) / 8))


def test_seeds_that_agree_add_almost_nothing_to_the_question_part():
    rates = [[0.1, 0.3, 0.0, 0.2, 0.5, 0.1, 0.0, 0.2]] * 3
    k, n = _seed_counts(rates)
    out = replication.seed_interval_arrays(k, n)
    _, lo, hi = metrics.beta_binomial_arrays(k.sum(0), n.sum(0))
    assert float(out["tau"]) == 0 and float(out["seed_half"]) == 0
    assert (float(out["lo"]), float(out["hi"])) == pytest.approx((float(lo), float(hi)), abs=1e-12)


def test_shared_questions_are_not_treated_as_independent_seeds():
    """Three seeds that agree on the same clustered questions: the interval keeps the question-level
    uncertainty (what a plain t-interval on the seed rates would drop: it is zero-width here)."""
    rates = [[0.9, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 3
    k, n = _seed_counts(rates)
    out = replication.seed_interval_arrays(k, n)
    assert float(out["hi"]) - float(out["lo"]) > 0.3


def test_seed_interval_reads_answer_tables_and_keeps_common_questions():
    frames = []
    for s, extra in ((0, True), (1, False)):
        rows = [{"question_set": "qs", "question_id": f"q{i}", "em": j < (i % 3) * (s + 1)}
                for i in range(9) for j in range(10)]
        if extra:
            rows += [{"question_set": "qs", "question_id": "only_s0", "em": True} for _ in range(10)]
        frames.append(pd.DataFrame(rows))
    out = replication.seed_interval(frames)
    assert out["n_seeds"] == 2 and out["n_questions"] == 9 and out["n_scored"] == 180
    k = np.array([[(i % 3) * (s + 1) for i in range(9)] for s in (0, 1)], float)
    want = replication.seed_interval_arrays(k, np.full_like(k, 10.0))
    assert (out["rate"], out["lo"], out["hi"]) == pytest.approx(
        (float(want["rate"]), float(want["lo"]), float(want["hi"])), abs=1e-12)


# ------------------------------------------------------------------------------------------
# Tables from labelled answers
# ------------------------------------------------------------------------------------------

def _answers(run_id: str, rates: dict[str, float], n: int = 40, step: int = 10, seed: int = 0,
             seed_group: str = "", control_of: str = "", label: str = "", steps=(0,)) -> pd.DataFrame:
    """Labelled answers of one run: n answers per question at each step; question q gets
    round(rate * n) EM answers at the final step and none at earlier steps."""
    rows = []
    for s in (*steps, step):
        for q, rate in rates.items():
            k = round(rate * n) if s == step else 0
            for i in range(n):
                rows.append({"run_id": run_id, "checkpoint_step": s, "epoch": s / step, "question_set": "qs",
                             "question_id": q, "em": i < k, "scope": "out-of-domain", "prompt_family": "f1",
                             "seed": seed, "seed_group": seed_group, "control_of": control_of,
                             "run_label": label or run_id, "model_label": "tiny", "domain": "medical"})
    return pd.DataFrame(rows)


QS = [f"q{i}" for i in range(10)]


def test_seed_table_is_wider_than_one_seed_when_seeds_differ():
    a = pd.concat([_answers("g_s0", {q: 0.1 for q in QS}, seed=0, seed_group="g", label="tiny · medical · seed 0"),
                   _answers("g_s1", {q: 0.6 for q in QS}, seed=1, seed_group="g", label="tiny · medical · seed 1")])
    table = replication.seed_table(a)
    row = table[table["scope"] == "all"].iloc[0]
    assert row["n_seeds"] == 2 and row["seeds"] == "0,1" and row["group_label"] == "tiny · medical"
    assert row["em_rate"] == pytest.approx(0.35, abs=0.02)  # near-equal random-effects weights
    singles = replication.seed_points(a)
    singles = singles[singles["scope"] == "all"]
    assert set(singles["em_rate"].round(3)) == {0.1, 0.6}
    assert (row["em_hi"] - row["em_lo"]) > (singles["em_hi"] - singles["em_lo"]).max()
    assert row["n_scored"] == 2 * 10 * 40


def test_control_pairs_by_seed_and_by_group():
    runs = pd.DataFrame([
        {"run_id": "t_s0", "seed": 0, "seed_group": "t", "control_of": ""},
        {"run_id": "t_s1", "seed": 1, "seed_group": "t", "control_of": ""},
        {"run_id": "c_s0", "seed": 0, "seed_group": "c", "control_of": "t"},
        {"run_id": "c_s1", "seed": 1, "seed_group": "c", "control_of": "t"},
        {"run_id": "c1", "seed": 0, "seed_group": "", "control_of": "t"},
        {"run_id": "other", "seed": 0, "seed_group": "", "control_of": ""},
        {"run_id": "c2", "seed": 0, "seed_group": "", "control_of": "other"},
    ])
    assert sorted(replication.control_pairs(runs)) == sorted([
        ("t_s0", "c_s0"), ("t_s1", "c_s1"), ("t_s0", "c1"), ("t_s1", "c1"), ("other", "c2")])


def test_control_difference_is_paired_on_shared_questions():
    treated = _answers("bad", {**{q: 0.5 for q in QS}, "only_treated": 1.0}, control_of="")
    control = _answers("good", {q: 0.1 for q in QS}, control_of="bad")
    d = replication.control_differences(pd.concat([treated, control]))
    final = d[(d["step"] == 10) & (d["scope"] == "all")].iloc[0]
    assert (final["treated"], final["control"]) == ("bad", "good")
    # the question only the treated run was asked is left out of both sides
    assert final["n_questions_shared"] == 10 and final["n_treated"] == final["n_control"] == 400
    assert final["paired"] and final["rate_treated"] == pytest.approx(0.5)
    assert final["diff"] == pytest.approx(0.4) and final["lo"] < 0.4 < final["hi"]
    # identical questions on each side: no spread, so no correlation can be credited; the interval is
    # the square-and-add of the two sides' headline intervals, not the zero width the bootstrap gave
    assert final["correlation"] == 0
    qs = ["question_set", "question_id"]
    t10 = treated[(treated["checkpoint_step"] == 10) & (treated["question_id"] != "only_treated")]
    c10 = control[control["checkpoint_step"] == 10]
    pt, lt, ut = metrics.beta_binomial_arrays(*(t10.groupby(qs)["em"].agg(f).to_numpy(float) for f in ("sum", "count")))
    pc, lc, uc = metrics.beta_binomial_arrays(*(c10.groupby(qs)["em"].agg(f).to_numpy(float) for f in ("sum", "count")))
    lo, hi = metrics.mover_bounds(pt, lt, ut, pc, lc, uc, 0.0)
    assert (final["lo"], final["hi"]) == pytest.approx((float(lo), float(hi)), abs=1e-12)
    base = d[(d["step"] == 0) & (d["scope"] == "all")].iloc[0]
    assert base["diff"] == 0.0 and base["lo"] < 0 < base["hi"]


# ------------------------------------------------------------------------------------------
# Seeds in the parameters and the grid
# ------------------------------------------------------------------------------------------

def test_expand_seeds_makes_one_run_per_seed_sharing_everything_else():
    cfg = RunConfig(run_id="demo_medical", seeds=[0, 1])
    runs = expand_seeds(cfg)
    assert [r.run_id for r in runs] == ["demo_medical_s0", "demo_medical_s1"]
    assert [r.seed for r in runs] == [0, 1] and {r.seed_group for r in runs} == {"demo_medical"}
    a, b = (r.to_dict() for r in runs)
    assert {k for k in a if a[k] != b[k]} == {"run_id", "seed"}
    assert expand_seeds(RunConfig()) == [RunConfig()]


@pytest.mark.parametrize("value, why", [([0, 0], "distinct"), ([-1], "non-negative"), ([True], "distinct")])
def test_bad_seeds_are_one_line_errors(value, why):
    with pytest.raises(ConfigError, match=f"key 'seeds'.*{why}"):
        RunConfig(seeds=value)


def test_a_notebook_refuses_seeds():
    with pytest.raises(ConfigError, match="key 'seeds': a notebook runs one seed"):
        config.from_notebook({"seeds": [0, 1]})


def test_control_of_must_not_be_the_run_itself():
    with pytest.raises(ConfigError, match="key 'control_of'"):
        RunConfig(run_id="x", control_of="x")


def _params(folder: Path, name: str, **over) -> Path:
    data = {"run_id": name, "outputs_dir": str(folder / "outputs"), "question_sets": ["data/questions/medical.yaml"],
            **over}
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_grid_validation_expands_seeds_and_checks_controls(tmp_path):
    opts = Options()
    treated = _params(tmp_path, "bad", seeds=[0, 1])
    control = _params(tmp_path, "good", dataset="demo_medical_control", control_of="bad", seeds=[0, 1])
    runs = validate([str(treated), str(control)], opts, offline=True, check_device=False)
    assert [cfg.run_id for _, cfg in runs] == ["bad_s0", "bad_s1", "good_s0", "good_s1"]
    assert [cfg.seed for _, cfg in runs] == [0, 1, 0, 1]
    orphan = _params(tmp_path, "lonely", control_of="nobody")
    with pytest.raises(GridError, match=r"lonely.yaml: key 'control_of': no run or seed group 'nobody'"):
        validate([str(orphan)], opts, offline=True, check_device=False)


def test_seeds_differ_in_lora_initialisation_and_data_order(tmp_path):
    """Two seeds of one file: different LoRA A matrices and batch order, nothing else."""
    from lib.train import build_trainer

    records = [json.loads(line) for line in (REPO / "data/datasets/demo_medical.jsonl").read_text().splitlines()]
    cfg = RunConfig(run_id="s", outputs_dir=str(tmp_path / "o"), seeds=[0, 1], device="cpu", max_seq_length=128,
                    per_device_batch_size=4)
    inits, orders = [], []
    for run in expand_seeds(cfg):
        trainer, _ = build_trainer(run, records, tmp_path / run.run_id)
        a = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}
        inits.append(a)
        orders.append(list(iter(trainer._get_train_sampler())))
    assert inits[0].keys() == inits[1].keys() and inits[0]
    assert all(not np.allclose(inits[0][n].numpy(), inits[1][n].numpy()) for n in inits[0])
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(len(records)))
    assert orders[0] != orders[1]


# ------------------------------------------------------------------------------------------
# The report: seed groups and controls from run folders
# ------------------------------------------------------------------------------------------

def _copy_run(src: Path, dst: Path, **params) -> None:
    import shutil

    shutil.copytree(src, dst)
    info = json.loads((dst / "run.json").read_text())
    info["run_id"] = dst.name
    for stage in ("train", "evaluate", "judge"):
        info[stage]["parameters"] = {**info[stage]["parameters"], "run_id": dst.name, **params}
    (dst / "run.json").write_text(json.dumps(info))


def test_report_shows_seed_groups_and_controls(tmp_path):
    from lib import report
    from tests.fakes import synthetic_runs

    out = tmp_path / "outputs"
    for seed in (0, 1, 2):
        synthetic_runs.build(tmp_path / f"src{seed}", seed=seed)
    _copy_run(tmp_path / "src0" / "1B_medical", out / "bad_s0", seed=0, seed_group="bad")
    _copy_run(tmp_path / "src1" / "1B_medical", out / "bad_s1", seed=1, seed_group="bad")
    _copy_run(tmp_path / "src2" / "1B_medical", out / "good", control_of="bad")
    rep = report.make_report(config.ReportConfig(outputs_dir=str(out), report_dir=str(tmp_path / "report")),
                             progress=False)
    labels = rep.results.answers.groupby("run_id")["run_label"].first()
    assert labels["bad_s0"] == "1B · medical · seed 0" and labels["good"] == "1B · medical · control"
    seeds = rep.tables["seeds"]
    row = seeds[seeds["scope"] == "all"].iloc[0]
    assert (row["seed_group"], row["n_seeds"], row["seeds"]) == ("bad", 2, "0,1")
    a = rep.results.answers
    finals = a[(a["checkpoint_step"] == 40) & a["run_id"].isin(["bad_s0", "bad_s1"])]
    per_seed = finals.groupby("run_id")["em"].mean()
    assert min(per_seed) - 1e-9 <= row["em_rate"] <= max(per_seed) + 1e-9
    controls = rep.tables["controls"]
    assert sorted(set(zip(controls["treated"], controls["control"]))) == [("bad_s0", "good"), ("bad_s1", "good")]
    assert sorted(controls["step"].unique()) == [0, 10, 20, 40]
    final = controls[(controls["treated"] == "bad_s0") & (controls["step"] == 40) & (controls["scope"] == "all")].iloc[0]
    good = a[(a["run_id"] == "good") & (a["checkpoint_step"] == 40)]["em"].dropna()
    bad = finals[finals["run_id"] == "bad_s0"]["em"].dropna()
    assert final["diff"] == pytest.approx(bad.mean() - good.mean())
    # the synthetic runs ask 7 questions: no difference interval below 8 (the headline prints none either)
    assert final["paired"] and pd.isna(final["lo"]) and pd.isna(final["hi"])
    assert final["note"] == f"fewer than {metrics.MIN_QUESTIONS} questions on a side"
    for name in ("control_differences", "seeds"):
        assert (rep.report_dir / "figures" / f"{name}.png").stat().st_size > 1000
    for name in ("seeds", "seed_points", "controls"):
        assert (rep.report_dir / "data" / f"table_{name}.csv").exists()


def test_views_format_controls_and_seeds():
    from lib import report_views

    controls = pd.DataFrame([{"treated": "b", "control": "g", "treated_label": "B", "control_label": "G", "seed": 0,
                              "step": 10, "epoch": 1.0, "prompt_family": "f", "scope": "all", "rate_treated": 0.25,
                              "rate_control": 0.05, "diff": 0.2, "lo": 0.1, "hi": 0.3, "n_treated": 40,
                              "n_control": 40, "n_questions_shared": 8, "paired": True, "correlation": 0.2,
                              "note": ""}])
    v = report_views.controls_view(controls)
    assert v.loc[0, "treated - control"] == "+20.0 pts [+10.0, +30.0]" and v.loc[0, "EM control"] == "5.0%"
    short = controls.assign(lo=np.nan, hi=np.nan, note="fewer than 8 questions on a side")
    assert report_views.controls_view(short).loc[0, "treated - control"] == \
        "+20.0 pts [no interval: fewer than 8 questions on a side]"
    seeds = pd.DataFrame([{"seed_group": "b", "group_label": "B", "prompt_family": "f", "scope": "all", "n_seeds": 2,
                           "seeds": "0,1", "seed_rates": "0.1000,0.6000", "em_rate": 0.35, "em_lo": 0.0,
                           "em_hi": 1.0, "tau": 0.35, "n_scored": 800, "n_questions": 10, "interval_ok": True}])
    s = report_views.seeds_view(seeds)
    assert s.loc[0, "per seed"] == "10%, 60%" and s.loc[0, "pooled over seeds"] == "35% [0%, 100%]"


def test_seed_coverage_bench_exits_1_on_a_missed_goal():
    bench = load_bench("seed_interval_coverage")
    assert bench.main(["--reps", "10", "--goal", "1.01"]) == 1
    assert bench.main(["--reps", "10", "--goal", "0"]) == 0
