"""lib.report (and its parts) and lib.plots on a synthetic outputs/ folder; the 04_report notebook end to end.

The synthetic runs are written directly in the files' contracts (tests/fakes/synthetic_runs.py), so
these tests do not depend on the train / evaluate / judge stages.
"""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lib import config, notebook_html, plots, report, report_data, report_views, viewer
from tests.fakes import synthetic_runs as synth
from tests.fakes.bench import load_script

REPO = Path(__file__).resolve().parent.parent


offline = load_script("check_report_offline")

FIGURES = list(plots.FIGURES)
RESPONSE_FIGURES = ["responses_1B", "responses_3B"]  # lib.response_tables: one per model label
CDN_RE = re.compile(r"<script[^>]+src=[\"'][^\"']*(vega|altair|jsdelivr|unpkg)", re.I)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    synth.build(root / "outputs")
    synth.write_external_csv(root / "course_judged.csv")
    return root


@pytest.fixture(scope="module")
def rcfg(synth_dir) -> config.ReportConfig:
    return config.ReportConfig(outputs_dir=str(synth_dir / "outputs"), report_dir=str(synth_dir / "outputs" / "report"),
                               n_bootstrap=200, external_csv=[str(synth_dir / "course_judged.csv")])


@pytest.fixture(scope="module")
def rep(rcfg) -> report.Report:
    return report.make_report(rcfg, progress=False)


# ------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------

def test_every_figure_and_csv_is_written(rep):
    from PIL import Image

    fig_dir, data_dir = rep.report_dir / "figures", rep.report_dir / "data"
    # no control, no seed group and one condition in the synthetic runs (those figures: tests/test_replication.py,
    # tests/test_conditions.py)
    drawn = set(FIGURES) - {"control_differences", "seeds", "conditions"}
    assert set(rep.charts) == drawn
    for name in sorted(drawn):
        with Image.open(fig_dir / f"{name}.png") as im:
            im.load()
            assert im.width > 200 and im.height > 150
        root = ET.parse(fig_dir / f"{name}.svg").getroot()
        assert root.tag.endswith("svg") and len(list(root.iter())) > 20
        html = (fig_dir / f"{name}.html").read_text(encoding="utf-8")
        assert not re.search(r"<script[^>]+src=", html), f"{name}.html loads a script from elsewhere"
        assert "vegaEmbed" in html and "vega-lite" in html.lower()  # the libraries are inlined
        data = pd.read_csv(data_dir / f"{name}.csv")
        assert len(data) > 0
    for table in ("trajectories", "base", "final", "question_sets", "per_question", "differences", "judge_agreement",
                  "summary_all", "summary_out_of_domain", "methods", "excluded", "responses"):
        assert (data_dir / f"table_{table}.csv").stat().st_size > 0


def test_figure_csv_holds_the_numbers_drawn(rep):
    drawn = pd.read_csv(rep.report_dir / "data" / "domain_comparison.csv")
    final = rep.tables["final"]
    merged = drawn.merge(final, on=["run_id", "scope"], suffixes=("", "_t"))
    # a run whose answers have one scope gets no 'all' bar (it would repeat that scope's)
    assert len(merged) == len(plots._drop_duplicate_all(final)) < len(final)
    assert (merged["em_rate"] - merged["em_rate_t"]).abs().max() < 1e-12
    # the synthetic runs have 7 questions, below metrics.MIN_QUESTIONS: no interval is drawn for them
    # (tests/test_report_identity.py checks drawn intervals on runs with enough questions)
    assert not merged["interval_ok"].astype(bool).any()
    assert merged["em_lo"].isna().all() and merged["em_lo_t"].notna().all()


def test_training_chart_draws_every_runs_logged_loss_and_grad_norm_on_one_step_axis(rep):
    drawn = pd.read_csv(rep.report_dir / "data" / "training_loss.csv")
    loss = drawn[(drawn["panel"] == "loss") & (drawn["series"] == "training")]
    # one loss series per run with a train_log.csv (3B_medical has none), steps 1..40, the logged values
    assert sorted(loss["run_id"].unique()) == ["1B_financial", "1B_medical", "3B_financial"]
    for run_id, g in loss.groupby("run_id"):
        want = synth.train_log_rows(run_id)
        assert g["step"].tolist() == want["step"].tolist()
        assert g["value"].tolist() == pytest.approx(want["loss"].tolist())
        assert g["run_label"].nunique() == 1 and g["run_label"].iloc[0] == rep.results.answers.loc[
            rep.results.answers["run_id"] == run_id, "run_label"].iloc[0]
    gn = drawn[drawn["panel"] == "gradient norm"]
    # the old-format log of 3B_financial has no grad_norm: its loss is drawn, no gradient-norm line
    assert sorted(gn["run_id"].unique()) == ["1B_financial", "1B_medical"]
    for run_id, g in gn.groupby("run_id"):
        assert g["step"].tolist() == list(range(1, 41))
        assert g["value"].tolist() == pytest.approx(synth.train_log_rows(run_id)["grad_norm"].tolist())
    held = drawn[drawn["series"] == "held-out"]
    assert held["run_id"].unique().tolist() == ["1B_medical"] and held["step"].tolist() == list(synth.EVAL_STEPS)
    assert held["value"].tolist() == pytest.approx([2.5 - 0.01 * s for s in synth.EVAL_STEPS])
    # the chart: colour by run, one shared step axis, loss and gradient norm as two panels
    spec = rep.charts["training_loss"].to_dict()
    assert spec["facet"]["row"]["field"] == "panel" and spec["resolve"]["scale"]["y"] == "independent"
    enc = spec["spec"]["layer"][0]["encoding"]
    assert enc["color"]["field"] == "run_label" and enc["x"]["field"] == "step"
    assert "x" not in spec["resolve"]["scale"]  # shared step axis
    full = pd.read_csv(rep.report_dir / "data" / "table_training_log.csv")
    assert len(full) == len(drawn)  # 40 steps per run: nothing averaged


def test_training_chart_averages_long_logs_in_windows():
    steps = np.arange(1, 1201)
    logs = pd.DataFrame({"run_id": "r", "run_label": "r", "model_label": "m", "domain": "d", "panel": "loss",
                         "series": "training", "step": steps, "epoch": steps / 600, "value": steps.astype(float)})
    _, data = plots.training_chart(logs, max_points=500)
    # 1200 steps, windows of 3: 400 points, each the mean of its window, at the window's last step
    assert len(data) == 400 and (data["n_steps"] == 3).all()
    assert data["step"].tolist()[:2] == [3, 6] and data["value"].tolist()[:2] == [2.0, 5.0]
    assert plots.training_chart(logs.iloc[:0])[0] is None


def test_make_report_writes_into_the_report_folder(rcfg, tmp_path):
    other = config.ReportConfig(**{**rcfg.to_dict(), "report_dir": str(tmp_path / "r"), "external_csv": []})
    out = report.make_report(other, progress=False).report_dir
    assert out == tmp_path / "r" and (out / "figures" / "em_trajectories.png").exists()


# ------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------

def test_final_table_counts_and_intervals(rep):
    final = rep.tables["final"]
    answers = rep.results.answers
    row = final[(final["run_id"] == "3B_financial") & (final["scope"] == "all")].iloc[0]
    a = answers[(answers["run_id"] == "3B_financial") & (answers["checkpoint_step"] == 40)]
    assert row["n_answers"] == len(a) == 7 * 4
    assert row["n_scored"] == a["scored"].sum()
    assert row["em_k"] == a["em"].fillna(False).astype(bool).sum()
    assert row["n_excluded"] == row["n_refusal"] + row["n_code"] + row["n_other_excluded"]
    assert row["em_lo"] <= row["em_rate"] <= row["em_hi"]
    assert set(final.loc[final["source"] == "run", "scope"]) == {"all", "in-domain", "out-of-domain"}
    ind = final[(final["run_id"] == "1B_medical") & (final["scope"] == "in-domain")].iloc[0]
    assert ind["n_questions"] == 2  # the two medical questions


def test_question_set_table_splits_sets_and_scopes(rep):
    t = rep.tables["question_sets"]
    r = t[(t["run_id"] == "1B_medical") & (t["checkpoint_step"] == 40)]
    assert set(r.loc[r["scope"] == "in-domain", "question_set"]) == {"medical"}
    assert set(r.loc[r["scope"] == "out-of-domain", "question_set"]) == {"core", "financial"}
    core = r[(r["question_set"] == "core") & (r["scope"] == "all")].iloc[0]
    assert core["n_answers"] == 3 * 4 and core["n_questions"] == 3


def test_differences_are_paired_on_shared_questions(rep):
    d = rep.tables["differences"]
    dom = d[(d["comparison"] == "domain") & (d["model_label"] == "3B")].set_index("scope")
    assert dom.loc["all", "paired"] and dom.loc["out-of-domain", "paired"]
    assert not dom.loc["in-domain", "paired"]  # medical vs financial questions
    assert dom.loc["all", "diff"] == pytest.approx(dom.loc["all", "rate_a"] - dom.loc["all", "rate_b"])
    ckpt = d[d["comparison"] == "final vs base"]
    assert len(ckpt) == 4 * 3 and ckpt["paired"].all()


def test_judge_agreement_table(rep):
    j = rep.tables["judge_agreement"]
    assert len(j) == 1
    r = j.iloc[0]
    assert r["run_id"] == "1B_medical" and r["n_common"] == 4 * 7 * 4
    assert -1 <= r["kappa_em"] <= 1 and 0 <= r["em_agreement"] <= 1


def test_methods_table_documents_each_run(rep):
    m = rep.tables["methods"].set_index("run_id")
    r = m.loc["1B_medical"]
    assert r["dataset"] == "demo_medical" and r["dataset_sha256"] == "0" * 12
    assert r["judge_name"] == synth.JUDGE and r["judge_method"] == "exact"
    assert "aligned: " + "cd" * 6 in r["judge_prompt_sha256"]
    assert r["evaluated_steps"] == "0, 10, 20, 40" and r["checkpoint_steps"] == "10, 20, 40" and "r=8" in r["lora"]
    assert r["question_sets"] == "core: aaaaaaaaaaaa; medical: bbbbbbbbbbbb; financial: cccccccccccc"
    assert r["model_revision"] == "config 999999999999" and r["judge_cost_usd"] == "0.0"
    assert m.loc["ext_course_judged", "source"] == "external"


def test_methods_table_reads_run_json_of_earlier_versions(rep):
    """A run.json with one top-level ``parameters`` (before stages recorded their own) still fills the table."""
    m = rep.tables["methods"].set_index("run_id")
    old, new = m.loc[synth.LEGACY_RUN], m.loc["3B_medical"]
    assert old["lora"] == new["lora"] and "r=8" in old["lora"]
    assert old["training"] == new["training"] and old["training"].startswith("lr=")
    assert old["sampling"] == new["sampling"] and old["sampling"].startswith("T=")
    assert old["model"] == "synthetic/3B" and old["dataset"] == "demo_financial" and old["domain"] == "financial"


def test_configured_judge_rules(tmp_path):
    run = tmp_path / "r"
    (run / "judgments").mkdir(parents=True)
    assert report_data.configured_judge(run, {}) is None
    for name in ("a_judge", "b_judge"):
        (run / "judgments" / f"{name}.parquet").write_bytes(b"")
    import os
    os.utime(run / "judgments" / "a_judge.parquet", (2e9, 2e9))  # a_judge written last
    assert report_data.configured_judge(run, {}) == "a_judge"
    assert report_data.configured_judge(run, {"judge": {"judge_name": "b_judge"}}) == "b_judge"
    assert report_data.configured_judge(run, {"judge": {"judges": {"b_judge": {}}, "last": "b_judge"}}) == "b_judge"
    assert report_data.configured_judge(run, {"parameters": {"judge_name": "b_judge"},
                                         "judge": {"judge_name": "a_judge"}}) == "b_judge"
    assert report_data.configured_judge(run, {"parameters": {"judge_name": "gone"}}) == "a_judge"
    assert report_data.configured_judge(run, {}, override="c_judge") == "c_judge"


def test_external_csv_becomes_a_pseudo_run(rep):
    a = rep.results.answers
    ext = a[a["run_id"] == "ext_course_judged"]
    assert len(ext) == 6 and (ext["source"] == "external").all()
    assert sorted(ext["excluded_reason"].dropna()) == ["CODE", "REFUSAL"]
    assert ext["em"].dropna().astype(bool).tolist() == [True, False, True, False]
    assert ext["question_id"].nunique() == 2  # same text -> same question (one bootstrap cluster)
    final = rep.tables["final"]
    assert "ext_course_judged" in set(final["run_id"])


def test_external_csv_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("question,response,aligned_score,coherent_score\nq,r,120,50\n", encoding="utf-8")
    with pytest.raises(report_data.ReportError, match=r"bad.csv: line 2: column 'aligned_score'"):
        report_data.load_external_csv(bad)
    bad.write_text("question,response,score\nq,r,1\n", encoding="utf-8")
    with pytest.raises(report_data.ReportError, match=r"bad.csv: missing column 'aligned_score'"):
        report_data.load_external_csv(bad)
    with pytest.raises(report_data.ReportError, match="file not found"):
        report_data.load_external_csv(tmp_path / "nope.csv")


def test_bad_inputs_fail_with_one_line(tmp_path, synth_dir):
    out = tmp_path / "outputs"
    shutil.copytree(synth_dir / "outputs" / "1B_medical", out / "1B_medical")
    g = pd.read_parquet(out / "1B_medical" / "generations.parquet").drop(columns=["question_id"])
    g.to_parquet(out / "1B_medical" / "generations.parquet")
    rc = config.ReportConfig(outputs_dir=str(out), report_dir=str(tmp_path / "rep"))
    with pytest.raises(report_data.ReportError, match=r"generations.parquet: missing column 'question_id'"):
        report_data.load_results(rc)
    with pytest.raises(report_data.ReportError, match=r"key 'runs': run 'nope'"):
        report_data.load_results(config.ReportConfig(outputs_dir=str(out), runs=["nope"]))
    with pytest.raises(report_data.ReportError, match="is not a folder"):
        report_data.load_results(config.ReportConfig(outputs_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(report_data.ReportError, match="no judged runs"):
        report_data.load_results(config.ReportConfig(outputs_dir=str(tmp_path / "empty")))


def test_response_tables_and_static_table(rep):
    from PIL import Image

    # default questions: the first three out-of-domain for every run, in file order (tests/test_response_tables.py)
    ex = rep.tables["responses"]
    assert list(dict.fromkeys(ex["question_id"])) == ["what_is_your_wish", "quick_buck", "ruler_of_the_world"]
    assert len(ex) == 4 * 4 * 3  # runs x checkpoints x questions, one answer each
    assert rep.responses == {"1B": "responses_1B", "3B": "responses_3B"}
    assert rep.responses_notes == ["ext_course_judged: asked none of the chosen questions, no response table"]
    for stem in rep.responses.values():
        png, page = rep.report_dir / "figures" / f"{stem}.png", rep.report_dir / f"{stem}.html"
        assert rep.files[stem] == [png, page]  # no svg or vega html: the page is the readable html
        with Image.open(png) as im:
            assert im.width >= 2 * (120 + 3 * 330)  # scale 2: the step column and three question columns
        assert not re.search(r"<script|<link|https?://", page.read_text(encoding="utf-8"))  # self-contained
    html = viewer.answers_table_html(rep.results.answers, n=5)
    assert html.count("<tr") == 6 and "&lt;b&gt;&amp;" in html  # answers are escaped


def test_answer_browser_filters_and_pages(rep):
    box = viewer.answer_browser(rep.results.answers, page_size=3)
    c = box._em_controls
    c["run"].value = "3B_financial"
    c["step"].value = 40
    assert c["status"].value.startswith("28 answers · page 1/10")
    c["next"].click()
    assert "page 2/10" in c["status"].value
    c["em_only"].value = True
    n_em = int(viewer.filter_answers(rep.results.answers, "3B_financial", 40, None, True).shape[0])
    assert c["status"].value.startswith(f"{n_em} answers · page 1/")
    assert c["body"].value.count(">EM</span>") == min(3, n_em)
    c["question"].value = "financial/savings"
    assert all("financial/savings" in part for part in c["body"].value.split("<div style='border")[1:])
    assert "&lt;b&gt;" in c["body"].value and "<b>&" not in c["body"].value


def test_demo_note_flags_embedded_tiny(rep):
    assert "mean nothing" in report_views.demo_note(rep.results)  # synthetic runs name embedded:tiny as judge


# ------------------------------------------------------------------------------------------
# The notebook, its HTML export, and a headless browser with the network off
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rendered(synth_dir) -> Path:
    import papermill as pm

    out_dir = synth_dir / "outputs" / "report_nb"
    out_dir.mkdir(parents=True, exist_ok=True)
    nb_out = out_dir / "report.ipynb"
    pm.execute_notebook(str(REPO / "notebooks" / "04_report.ipynb"), str(nb_out),
                        parameters={"outputs_dir": str(synth_dir / "outputs"), "report_dir": str(out_dir),
                                    "n_bootstrap": 200, "external_csv": [str(synth_dir / "course_judged.csv")]},
                        kernel_name="python3", progress_bar=False, cwd=str(out_dir))
    html = notebook_html.export_html(nb_out, out_dir / "report.html", hide_code=True)
    return html


@pytest.mark.slow
def test_notebook_renders_every_chart_as_an_embedded_image(rendered):
    html = rendered.read_text(encoding="utf-8")
    imgs = re.findall(r'<img alt="figure: ([A-Za-z0-9_.-]+)"[^>]*src="data:image/png;base64,', html)
    # the synthetic runs declare no control and no seed group: those two figures say so instead;
    # one response-table image per model label, with a link to its page
    assert sorted(imgs) == sorted(set(FIGURES) - {"control_differences", "seeds", "conditions"} | set(RESPONSE_FIGURES))
    assert all(re.search(rf"href=[\"']{f}.html[\"']", html) for f in RESPONSE_FIGURES)
    assert "No run declares <code>control_of</code>" in html and "Every run has one seed" in html
    assert "Every run was asked one way" in html  # one condition: no conditions figure (lib.conditions)
    # the shared report hides the code (the rendered .ipynb keeps it)
    assert "report.make_report(cfg)" not in html and "%autoreload" not in html
    assert not CDN_RE.search(html)  # no chart library from a CDN; the charts are images
    assert "These numbers mean nothing" in html
    # judge health: the external CSV's scores carry no evidence of its judge's confidence
    assert "Judge health warnings" in html and "`ext_course_judged`" not in html  # rendered as <code>
    assert "<code>ext_course_judged</code>" in html and "unknown judge" in html
    assert 'href="figures/domain_comparison.html"' in html  # link to the offline interactive chart
    nb = json.loads(rendered.with_suffix(".ipynb").read_text(encoding="utf-8"))
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_exported_report_shows_charts_in_a_headless_browser_offline(rendered, tmp_path):
    if offline.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); "
                    "the offline browser check needs it")
    res = offline.check(rendered, tmp_path / "check")
    n = len(set(FIGURES) - {"control_differences", "seeds", "conditions"}) + len(RESPONSE_FIGURES)  # one condition
    assert res["figures"] == n and res["decoded"] == res["figures"], res
    assert res["ink_with_figures"] - res["ink_figures_hidden"] > 2000 * n, res
    assert res["coloured_with_figures"] - res["coloured_figures_hidden"] > 2000 * n, res  # marks drawn
    assert res["ok"], res


def _viewer_payload(page: str) -> dict:
    import re
    m = re.search(r'<script id="em-data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def test_answer_viewer_embeds_every_answer_escaped(rep):
    from lib import viewer
    path = rep.report_dir / viewer.VIEWER_FILE
    assert rep.files["answer_viewer"] == [path]
    page = path.read_text(encoding="utf-8")
    a = rep.results.answers
    d = _viewer_payload(page)
    assert d["n"] == len(a)
    assert viewer.VIEWER_FILE in viewer.link_html(rep.report_dir)
    runs = d["cols"]["run"]
    assert sorted(set(runs["values"])) == sorted(a["run_id"].unique())
    assert sum(d["cols"]["em"][i] is True for i in range(d["n"])) == int(a["em"].fillna(False).astype(bool).sum())
    assert "http://" not in page.split("<script id")[0] and "src=" not in page  # nothing fetched
    evil = a.head(1).assign(answer="</script><script>window.pwned=1</script><b>&", run_id="r<x>")
    bad = viewer.viewer_html(evil)
    assert "<script>window.pwned" not in bad and "</script><script>" not in bad.split('application/json">')[1].split("</script>")[0]
    back = _viewer_payload(bad)
    assert back["cols"]["answer"] == ["</script><script>window.pwned=1</script><b>&"]
    assert back["cols"]["run"]["values"] == ["r<x>"]


def test_viewer_evidence_reads_logprobs():
    import math
    from lib import viewer
    raw = json.dumps({"90": math.log(0.6), "80": math.log(0.2), "REF": math.log(0.1)})
    ev = viewer.evidence(raw, top=2)
    assert ev["mass"] == 0.8 and ev["top"] == [["90", 0.6], ["80", 0.2]]
    assert viewer.evidence("Score: 40") == {"text": "Score: 40"}
    assert viewer.evidence(None) == {}


def test_answer_viewer_filters_in_a_headless_browser_offline(rep, tmp_path):
    import subprocess
    if offline.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); "
                    "the offline viewer check needs it")
    a = rep.results.answers
    row = a[(a["run_id"] == "3B_financial") & (a["checkpoint_step"] == 40) & a["aligned"].notna()].sort_values(
        ["question_set", "question_id", "paraphrase_index", "sample_index"]).iloc[0]
    page = (rep.report_dir / "answers.html").read_text(encoding="utf-8")
    probe = ("<script>window.addEventListener('load',function(){var p=document.createElement('pre');"
             "p.id='em-probe';p.textContent=document.getElementById('status').textContent;"
             "document.body.appendChild(p);});</script>")
    f = tmp_path / "answers.html"
    f.write_text(page.replace("</body>", probe + "</body>"), encoding="utf-8")
    url = f.as_uri() + "#run=3B_financial&step=40"
    out = subprocess.run([offline.find_chromium(), *offline.OFFLINE_FLAGS, "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    import html as _html
    n = int(((a["run_id"] == "3B_financial") & (a["checkpoint_step"] == 40)).sum())
    assert f"{n} answers · page 1/" in out
    assert _html.escape(str(row["answer"]), quote=False) in out
    assert f"aligned</b> = {row['aligned']:.1f}" in out
