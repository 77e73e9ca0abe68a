"""lib.viewer: the static answer viewer's condition filter (runs that ask questions more than one way)."""
from __future__ import annotations

import json
import re
import subprocess

import pandas as pd
import pytest

from lib import viewer
from tests.fakes.bench import load_script

offline = load_script("check_report_offline")


def _answers(conditions: list[str] | None) -> pd.DataFrame:
    rows = []
    for ci, cond in enumerate(conditions or [None]):
        for q in range(3):
            for s in range(2 + ci):  # a different count per condition, so a filter shows in the count
                rows.append({"run_id": "r", "checkpoint_step": 0, "question_set": "qs", "question_id": f"q{q}",
                             "paraphrase": f"question {q}", "paraphrase_index": 0, "sample_index": s,
                             "scope": "general", "excluded_reason": None, "answer": f"{cond} answer {q}.{s}",
                             "em": False, "aligned": 80.0, "coherent": 90.0,
                             **({"condition": cond} if cond is not None else {})})
    return pd.DataFrame(rows)


def _payload(page: str) -> dict:
    return json.loads(re.search(r'<script id="em-data" type="application/json">(.*?)</script>', page, re.S).group(1))


def test_viewer_records_each_answers_condition():
    d = _payload(viewer.viewer_html(_answers(["default", "json"])))
    cond = d["cols"]["cond"]
    assert sorted(cond["values"]) == ["default", "json"]
    assert [cond["values"][c] for c in cond["codes"]].count("json") == 9
    single = _payload(viewer.viewer_html(_answers(None)))
    assert single["cols"]["cond"]["values"] == [None]  # no condition column: nothing to filter


def test_condition_filter_in_a_headless_browser(tmp_path):
    if offline.find_chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the viewer check needs it")
    probe = ("<script>window.addEventListener('load',function(){var p=document.createElement('pre');"
             "p.id='em-probe';p.textContent=document.getElementById('status').textContent+' | '+"
             "getComputedStyle(document.getElementById('l-cond')).display;document.body.appendChild(p);});</script>")
    out = {}
    for name, conds, frag in (("two", ["default", "json"], "#condition=json"), ("one", None, "")):
        f = tmp_path / f"{name}.html"
        f.write_text(viewer.viewer_html(_answers(conds)).replace("</body>", probe + "</body>"), encoding="utf-8")
        out[name] = subprocess.run([offline.find_chromium(), *offline.OFFLINE_FLAGS, "--dump-dom", f.as_uri() + frag],
                                   capture_output=True, text=True, timeout=120).stdout
    assert re.search(r'id="em-probe">9 answers · page 1/1 \| (?!none)', out["two"]), out["two"][-400:]
    shown = out["two"].split('id="body"')[1].split("<script")[0]  # the rendered cards, not the embedded data
    assert "condition json" in shown and "json answer" in shown and "default answer" not in shown
    assert re.search(r'id="em-probe">6 answers · page 1/1 \| none', out["one"]), out["one"][-400:]
