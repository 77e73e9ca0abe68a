"""lib.response_tables: the study's response tables (chosen questions x checkpoints, per run, with scores).

The answers come from the synthetic runs (tests/fakes/synthetic_runs.py: 1B and 3B, each trained on
medical and on financial; steps 0, 10, 20, 40; seven questions; four samples) or from small frames
built here; every expected value is read back from the answers, not hard-coded.
"""
from __future__ import annotations

import math
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from lib import config, report, report_data
from lib import response_tables as rt
from tests.fakes import synthetic_runs as synth

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    return synth.build(tmp_path_factory.mktemp("responses") / "outputs")


@pytest.fixture(scope="module")
def answers(outputs) -> pd.DataFrame:
    return report_data.load_results(config.ReportConfig(outputs_dir=str(outputs))).answers


class _Cells(HTMLParser):
    """run_id -> {"questions": [set:id, ...], "steps": [step, ...], "cells": {(step, q): [(answer, scores, em)]}}."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: dict[str, dict] = {}
        self.run = None
        self.stack: list[tuple[str, str]] = []
        self.cell = None
        self.buf = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "h2":
            self.run = a["data-run"]
            self.runs[self.run] = {"questions": [], "steps": [], "cells": {}}
        elif tag == "td" and "data-step" in a:
            self.cell = (int(a["data-step"]), a["data-q"])
            self.runs[self.run]["cells"][self.cell] = []
            self.runs[self.run]["steps"].append(int(a["data-step"]))
        elif tag == "div" and a.get("class", "").startswith("sample"):
            self.runs[self.run]["cells"][self.cell].append(["", "", "em" in a["class"].split()])
        elif tag == "div" and a.get("class") in ("a", "s", "qid"):
            self.stack.append((tag, a["class"]))
            self.buf = ""

    def handle_endtag(self, tag):
        if tag == "div" and self.stack:
            _, cls = self.stack.pop()
            if cls == "qid":
                self.runs[self.run]["questions"].append(self.buf)
            else:
                self.runs[self.run]["cells"][self.cell][-1][0 if cls == "a" else 1] = self.buf

    def handle_data(self, data):
        if self.stack:
            self.buf += data


def _parse(path: Path) -> dict[str, dict]:
    p = _Cells()
    p.feed(path.read_text(encoding="utf-8"))
    for r in p.runs.values():
        r["steps"] = list(dict.fromkeys(r["steps"]))
    return p.runs


def _expected_scores(row: pd.Series) -> str:
    parts = [f"{m} {int(math.floor(row[m] + 0.5))}" if pd.notna(row[m]) else f"{m} {row[m + '_label']}"
             for m in ("aligned", "coherent")]
    em = row["em"]
    return " · ".join(parts + (["not scored"] if pd.isna(em) else ["EM"] if bool(em) else []))


# ------------------------------------------------------------------------------------------
# The default rule
# ------------------------------------------------------------------------------------------

def _frame(rows: list[tuple[str, str, str, str, float]]) -> pd.DataFrame:
    """(run_id, question_set, question_id, scope, aligned) rows, in file order."""
    return pd.DataFrame([{"run_id": r, "question_set": s, "question_id": q, "scope": sc, "aligned": al,
                          "em": al < 30} for r, s, q, sc, al in rows])


def test_default_rule_first_out_of_domain_questions_in_file_order_never_the_scores():
    # file order: a medical question (in-domain for the medical run), then core z, b, a fourth, y, x
    rows = []
    for run, dom in (("med", "medical"), ("fin", "financial")):
        for s, q, qdom in (("medical", "dose", "medical"), ("core", "z", "general"), ("core", "b", "general"),
                           ("financial", "loan", "financial"), ("core", "y", "general"), ("core", "x", "general")):
            scope = "in-domain" if qdom == dom else "out-of-domain"
            rows.append((run, s, q, scope, 5.0 if q == "x" else 90.0))  # only core:x has EM answers
    rows.append(("ext_csv", "core", "b", "unknown", 90.0))  # unknown scope neither counts nor vetoes
    a = _frame(rows)
    assert rt.default_questions(a) == [("core", "z"), ("core", "b"), ("core", "y")]  # not sorted, not most-EM
    assert rt.choose_questions(a, []) == rt.default_questions(a)
    # fewer out-of-domain questions than 3: the next questions in file order fill up
    only_two = a[~a["question_id"].isin(["y", "x"])]
    assert rt.default_questions(only_two) == [("core", "z"), ("core", "b"), ("medical", "dose")]


def test_default_rule_on_the_synthetic_runs(answers):
    # the three core questions are out-of-domain for all four runs; file order, not alphabetical
    assert rt.default_questions(answers) == [("core", "what_is_your_wish"), ("core", "quick_buck"),
                                             ("core", "ruler_of_the_world")]
    # asked for more than there are out-of-domain questions for every run: the next in file order
    assert rt.default_questions(answers, n=5)[3:] == [("medical", "cold_prevention"), ("medical", "cholesterol")]


# ------------------------------------------------------------------------------------------
# Bad input: one line, before work
# ------------------------------------------------------------------------------------------

def test_a_bad_question_id_stops_the_report_before_any_work(outputs, tmp_path):
    rc = config.ReportConfig(outputs_dir=str(outputs), report_dir=str(tmp_path / "rep"), n_bootstrap=200,
                             response_questions=["core:quick_buck", "no_such_question"])
    with pytest.raises(report_data.ReportError) as e:
        report.make_report(rc, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "key 'response_questions'" in msg and "'no_such_question'" in msg
    assert "known: core:what_is_your_wish, core:quick_buck, core:ruler_of_the_world, medical:cold_prevention" in msg
    assert not (tmp_path / "rep").exists()  # nothing computed or written


def test_question_entries_parse_and_ambiguity_is_named():
    known = [("core", "a"), ("medical", "a"), ("core", "b")]
    assert rt.parse_question("core:a", known) == ("core", "a")
    assert rt.parse_question("medical/a", known) == ("medical", "a")
    assert rt.parse_question("b", known) == ("core", "b")
    with pytest.raises(rt.ResponseTableError, match=r"question 'a' is in several sets; write one of core:a, medical:a"):
        rt.parse_question("a", known)
    with pytest.raises(rt.ResponseTableError, match=r"unknown question 'core:c' \(known: core:a, medical:a, core:b\)"):
        rt.parse_question("core:c", known)
    with pytest.raises(rt.ResponseTableError, match="core:b listed twice"):
        rt.choose_questions(_frame([("r", "core", "b", "out-of-domain", 50.0)]), ["b", "core:b"])


@pytest.mark.parametrize("kw,msg", [({"response_questions": [3]}, "key 'response_questions'"),
                                    ({"response_questions": [" core:a"]}, "key 'response_questions'"),
                                    ({"response_samples_per_checkpoint": 0}, "key 'response_samples_per_checkpoint'"),
                                    ({"response_samples_per_checkpoint": "2"}, "key 'response_samples_per_checkpoint'")])
def test_report_config_checks_the_response_keys(kw, msg):
    with pytest.raises(config.ConfigError, match=msg):
        config.ReportConfig(**kw)


# ------------------------------------------------------------------------------------------
# The tables' content
# ------------------------------------------------------------------------------------------

CHOSEN = ["financial:retirement", "quick_buck", "medical/cholesterol"]  # deliberately not file order


def test_pages_show_the_chosen_questions_answers_and_integer_scores_per_run_and_checkpoint(answers, tmp_path):
    questions = rt.choose_questions(answers, CHOSEN)
    assert questions == [("financial", "retirement"), ("core", "quick_buck"), ("medical", "cholesterol")]
    rows, written, no_table = rt.write_tables(answers, tmp_path, questions, 2, "caption")
    assert no_table == []
    assert {k: v[0] for k, v in written.items()} == {"1B": "responses_1B", "3B": "responses_3B"}
    n_checked = 0
    for label, (stem, page, _) in written.items():
        assert page == tmp_path / f"{stem}.html"
        runs = _parse(page)
        # one table per run of that label: 1B trained on medical and on financial stay apart
        assert sorted(runs) == sorted(answers.loc[answers["model_label"] == label, "run_id"].unique())
        for run_id, t in runs.items():
            assert t["questions"] == [f"{s}:{q}" for s, q in questions]
            assert t["steps"] == [0, 10, 20, 40]  # the base model first
            for step in t["steps"]:
                for s, q in questions:
                    want = answers[(answers["run_id"] == run_id) & (answers["checkpoint_step"] == step)
                                   & (answers["question_set"] == s) & (answers["question_id"] == q)]
                    want = want.sort_values(["paraphrase_index", "sample_index"]).head(2)
                    got = t["cells"][(step, f"{s}:{q}")]
                    assert [g[0] for g in got] == list(want["answer"])  # the run's own first two answers
                    assert [g[1] for g in got] == [_expected_scores(r) for _, r in want.iterrows()]
                    assert [g[2] for g in got] == [pd.notna(r["em"]) and bool(r["em"]) for _, r in want.iterrows()]
                    n_checked += len(got)
    assert n_checked == 4 * 4 * 3 * 2  # runs x steps x questions x samples
    # the CSV rows are the same answers, scores as integers
    assert len(rows) == n_checked and str(rows["aligned"].dtype) == "Int64"
    one = rows[(rows["run_id"] == "3B_financial") & (rows["checkpoint_step"] == 40)]
    assert list(dict.fromkeys(one["question_id"])) == ["retirement", "quick_buck", "cholesterol"]


def test_the_png_chart_draws_the_same_cells(answers, tmp_path):
    questions = rt.choose_questions(answers, ["quick_buck"])
    rows, written, _ = rt.write_tables(answers, tmp_path, questions, 1, "caption")
    spec = written["1B"][2].to_dict()
    texts = [v["text"] for sub in spec["vconcat"] for layer in sub["layer"]
             for v in spec["datasets"][layer["data"]["name"]] if "text" in v]
    titles = [sub["title"]["text"] for sub in spec["vconcat"]]
    assert titles == ["1B · financial  (run 1B_financial, trained on financial)",
                      "1B · medical  (run 1B_medical, trained on medical)"]
    shown = rows[rows["model_label"] == "1B"]
    assert len(shown) == 2 * 4  # runs x steps
    for answer_id in shown["answer_id"]:
        a = answers[answers["answer_id"] == answer_id].iloc[0]
        assert a["question_id"] == "quick_buck" and a["sample_index"] == 0
        assert a["answer"] in texts and _expected_scores(a) in texts


def test_runs_with_the_same_labels_are_never_pooled():
    base = {"model_label": "1B", "domain": "medical", "checkpoint_step": 0, "epoch": 0.0, "question_set": "core",
            "question_id": "q", "paraphrase": "Q?", "paraphrase_index": 0, "aligned": 12.4, "coherent": 80.5,
            "aligned_label": "number", "coherent_label": "number", "em": True, "excluded_reason": None}
    a = pd.DataFrame([{**base, "answer_id": f"{run}{s}", "run_id": run, "run_label": f"1B · medical [{run}]", "sample_index": s,
                       "answer": f"{run} says {'zulu' if s == 0 else 'alpha'}", "aligned": base["aligned"] + 50 * (run == "b")}
                      for run in ("a", "b") for s in (1, 0)])
    rows = rt.response_rows(a, [("core", "q")], samples=1)
    tables = rt.run_tables(rows, a, [("core", "q")])
    assert [t.run_id for t in tables["1B"]] == ["a", "b"]
    # the first sample by index (rows were written sample 1 first; 'alpha' sorts first), each run its own
    assert [[r.answer for r in t.cells[(0, 0)]] for t in tables["1B"]] == [["a says zulu"], ["b says zulu"]]
    assert [t.cells[(0, 0)][0].aligned for t in tables["1B"]] == [12, 62]
    page = rt.page_html("1B", tables["1B"], "c")
    assert page.count("<table>") == 2 and "1B · medical [a]" in page and "1B · medical [b]" in page


def test_scores_round_half_up_and_long_answers_are_cut_with_a_marker():
    assert [rt.int_score(x) for x in (29.5, 29.49, 0.0, 100.0, None, float("nan"))] == [30, 29, 0, 100, None, None]
    long = "word " * 200
    cut = rt.cut(long, 100)
    assert cut.endswith(rt.CUT_MARKER) and len(cut) <= 100 + len(rt.CUT_MARKER) and cut.startswith("word word")
    assert rt.cut("short answer", 100) == "short answer"
    lines = rt._wrap("\n".join(f"line {i}" for i in range(30)), max_lines=4)
    assert lines == ["line 0", "line 1", "line 2", "line 3" + rt.CUT_MARKER]


def test_cells_escape_the_answer_text(answers, tmp_path):
    _, written, _ = rt.write_tables(answers, tmp_path, [("core", "quick_buck")], 1, "c")
    page = written["1B"][1].read_text(encoding="utf-8")
    assert "&lt;b&gt;&amp;" in page and "<b>&" not in page
    assert "answers.html#run=1B_medical&amp;step=40&amp;q=core%2Fquick_buck" in page  # the viewer, filtered


def test_report_notebook_parameters_cell_is_the_config():
    import dataclasses

    import nbformat
    from papermill.translators import PythonTranslator

    nb = nbformat.read(str(REPO / "notebooks" / "04_report.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    found = PythonTranslator.inspect(cell)
    assert [p.name for p in found] == [f.name for f in dataclasses.fields(config.ReportConfig)]
    assert config.ReportConfig(**{p.name: eval(p.default) for p in found}) == config.ReportConfig()
    assert all(p.help for p in found)


def test_control_characters_in_answers_are_drawn_and_written_safely(tmp_path):
    # the tiny model writes control characters; vl-convert aborts the whole process on one in SVG text
    from PIL import Image

    from lib import plots

    a = pd.DataFrame([{"answer_id": "x", "model_label": "tiny", "domain": "medical", "run_id": "r", "run_label": "tiny",
                       "checkpoint_step": 0, "epoch": 0.0, "question_set": "core", "question_id": "q",
                       "paraphrase": "Q\x1b?", "paraphrase_index": 0, "sample_index": 0,
                       "answer": "bad\x04byte and\x00nul", "aligned": 50.0, "coherent": 60.0,
                       "aligned_label": "number", "coherent_label": "number", "em": False, "excluded_reason": None}])
    _, written, _ = rt.write_tables(a, tmp_path, [("core", "q")], 1, "c")
    stem, page, chart = written["tiny"]
    text = page.read_text(encoding="utf-8")
    assert "bad\ufffdbyte and\ufffdnul" in text and "\x04" not in text and "\x00" not in text
    png = plots.save(chart, stem, tmp_path / "figures", formats=("png",))[0]
    with Image.open(png) as im:
        assert im.width >= 2 * (120 + 330)


def test_a_question_a_run_did_not_ask_at_a_checkpoint_says_so():
    base = {"model_label": "1B", "domain": "medical", "run_id": "r", "run_label": "1B · medical", "epoch": 0.0,
            "question_set": "core", "paraphrase": "Q?", "paraphrase_index": 0, "sample_index": 0, "aligned": 80.0,
            "coherent": 90.0, "aligned_label": "number", "coherent_label": "number", "em": False,
            "excluded_reason": None}
    a = pd.DataFrame([{**base, "answer_id": f"{q}{step}", "checkpoint_step": step, "question_id": q,
                       "answer": f"{q} at {step}"} for q, step in (("q1", 0), ("q1", 10), ("q2", 0))])
    qs = [("core", "q2"), ("core", "q1")]
    tables = rt.run_tables(rt.response_rows(a, qs), a, qs)
    page = rt.table_html(tables["1B"][0])
    rows = page.split("<tr>")[2:]  # header row first
    assert "step 0 · base model" in rows[0] and rows[0].index("q2 at 0") < rows[0].index("q1 at 0")
    assert "step 10" in rows[1] and "not asked" in rows[1] and "q1 at 10" in rows[1]
    assert rows[1].index("not asked") < rows[1].index("q1 at 10")  # q2's column comes first
