"""Reading the answers: a static viewer, one self-contained HTML file with every answer of every run
and checkpoint (and the notebook's answer browser, below).

No CDN, no kernel, no network: inline CSS and JS, the answers embedded as compact JSON (column
lists, strings deduplicated per column) and rendered a page at a time in the browser. Filters: run,
checkpoint, question, condition (where a run asks questions more than one way), scope, EM only,
excluded reason, free text. The judge's evidence is shown as
score, numeric probability mass and the top alternative tokens (from the logprobs in ``<metric>_raw``),
not as the raw reply. Everything is untrusted text: the JSON is escaped for a ``<script>`` block
(``<``, ``>``, ``&`` as ``\\u00XX``) and the page inserts it only through ``textContent``.

The notebook's answer browser lives here too: an ipywidgets browser (:func:`answer_browser`) and,
for static exports where widgets do not run, a plain table of a few answers (:func:`answers_table_html`).
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import write_text_atomic
from .notices import Notice
from .report_tables import final_answers

VIEWER_FILE = "answers.html"
METRICS = ("aligned", "coherent")
TOP_ALTERNATIVES = 5


def _clean(v: Any) -> Any:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 2)
    return v


def evidence(raw: Any, top: int = TOP_ALTERNATIVES) -> dict[str, Any]:
    """The judge's evidence, readable: for a logprob reply (JSON token -> logprob) the numeric
    probability mass and the ``top`` most likely tokens with their probabilities; otherwise the
    reply text (first 400 characters)."""
    if not isinstance(raw, str) or not raw:
        return {}
    try:
        d = json.loads(raw)
    except ValueError:
        d = None
    if isinstance(d, dict) and d and all(isinstance(x, (int, float)) for x in d.values()):
        probs = {str(k): math.exp(float(x)) for k, x in d.items()}
        mass = sum(p for k, p in probs.items() if k.strip().isdigit() and 0 <= int(k.strip()) <= 100)
        alts = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
        return {"mass": round(mass, 3), "top": [[k, round(p, 3)] for k, p in alts]}
    return {"text": raw[:400]}


def viewer_data(answers: pd.DataFrame) -> dict[str, Any]:
    """The embedded data: columns as lists; string columns as (values, codes) to keep it compact."""
    a = answers.sort_values(["run_id", "checkpoint_step", "question_set", "question_id", "paraphrase_index",
                             "sample_index"], kind="stable").reset_index(drop=True)
    n = len(a)

    def col(name: str) -> pd.Series:
        return a[name] if name in a.columns else pd.Series([None] * n)

    def coded(values: list[Any]) -> dict[str, Any]:
        uniq: dict[Any, int] = {}
        codes = [uniq.setdefault(v, len(uniq)) for v in values]
        return {"values": list(uniq), "codes": codes}

    text = lambda s: [None if _clean(v) is None else str(v) for v in s]  # noqa: E731
    cols: dict[str, Any] = {
        "run": coded(text(col("run_id"))),
        "step": [_clean(v) for v in col("checkpoint_step")],
        "qset": coded(text(col("question_set"))),
        "qid": coded(text(col("question_id"))),
        "question": coded(text(col("paraphrase"))),
        "scope": coded(text(col("scope"))),
        "cond": coded(text(col("condition"))),
        "excluded": coded(text(col("excluded_reason"))),
        "sample": [_clean(v) for v in col("sample_index")],
        "answer": text(col("answer")),
        "em": [None if _clean(v) is None else bool(v) for v in col("em")],
    }
    for m in METRICS:
        cols[m] = [_clean(v) for v in col(m)]
        cols[f"{m}_label"] = coded(text(col(f"{m}_label")))
        cols[f"{m}_ev"] = [evidence(v) for v in col(f"{m}_raw")]
    return {"n": n, "cols": cols}


def _script_json(obj: Any) -> str:
    s = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return s.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>Answers</title>
<style>
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
#filters{display:flex;flex-wrap:wrap;gap:.5em 1em;align-items:center;margin-bottom:.5em}
.card{border:1px solid #ccc;border-radius:4px;padding:6px 8px;margin:6px 0}
.card.em{border:2px solid #b00;background:#fff5f5}
.badge{color:#fff;background:#b00;border-radius:3px;padding:0 4px;font-weight:bold;margin-left:.5em}
.q{font-style:italic;color:#444}.ans{white-space:pre-wrap;margin:4px 0}
.ev{font-size:90%;color:#333}.ev table{border-collapse:collapse;margin:2px 0 4px 1em}
.ev td{padding:0 6px;border-bottom:1px solid #eee}.muted{color:#888}
.banner{border:2px solid #b36b00;background:#fff8e6;padding:6px 10px;margin:6px 0;border-radius:4px}
.banner.toy{border-color:#b00;background:#fff0f0}.weak{background:#777}
</style></head><body>
<h1>Answers</h1>
<div id="banners"></div>
<p class="muted">Every answer of every run and checkpoint, with the judge's scores. Answers are model output, shown as plain text.</p>
<div id="filters">
<label>run <select id="f-run"></select></label>
<label>checkpoint <select id="f-step"></select></label>
<label>question <select id="f-q"></select></label>
<label id="l-cond">condition <select id="f-cond"></select></label>
<label>scope <select id="f-scope"></select></label>
<label>excluded <select id="f-excl"></select></label>
<label><input type="checkbox" id="f-em"> EM only</label>
<label>text <input type="search" id="f-text" size="16"></label>
</div>
<div><button id="prev">&#9664; prev</button> <button id="next">next &#9654;</button> <span id="status"></span></div>
<div id="body"></div>
<script id="em-data" type="application/json">__DATA__</script>
<script>
(function(){
var D=JSON.parse(document.getElementById('em-data').textContent),C=D.cols,N=D.n,PAGE=__PAGE__;
var FLAGGED=D.flagged||{};
(D.notices||[]).forEach(function(n){var b=document.createElement('div');b.className='banner '+n.level;
  b.textContent=n.text;document.getElementById('banners').appendChild(b);});
function v(c,i){return c.values[c.codes[i]];}
function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=String(text);return e;}
function opts(sel,items){sel.textContent='';items.forEach(function(it){var o=el('option',null,it[1]);o.value=it[0];sel.appendChild(o);});}
var $=function(id){return document.getElementById(id);};
var fr=$('f-run'),fs=$('f-step'),fq=$('f-q'),fc=$('f-cond'),fsc=$('f-scope'),fx=$('f-excl'),fem=$('f-em'),ft=$('f-text');
var page=0,rows=[];
function uniq(f){var s={},out=[];for(var i=0;i<N;i++){var k=f(i);if(k!=null&&!(k in s)){s[k]=1;out.push(k);}}return out.sort();}
opts(fr,[['','all runs']].concat(uniq(function(i){return v(C.run,i);}).map(function(r){return [r,r];})));
var conds=uniq(function(i){return v(C.cond,i);});
opts(fc,[['','all conditions']].concat(conds.map(function(r){return [r,r];})));
if(conds.length<2)$('l-cond').style.display='none';
opts(fsc,[['','all scopes']].concat(uniq(function(i){return v(C.scope,i);}).map(function(r){return [r,r];})));
opts(fx,[['','any'],['-','not excluded']].concat(uniq(function(i){return v(C.excluded,i);}).map(function(r){return [r,r];})));
function qkey(i){return v(C.qset,i)+'/'+v(C.qid,i);}
function dependent(){
  var run=fr.value,st={},qs={},sv=fs.value,qv=fq.value;
  for(var i=0;i<N;i++){if(run&&v(C.run,i)!==run)continue;st[C.step[i]]=1;qs[qkey(i)]=1;}
  var steps=Object.keys(st).map(Number).sort(function(a,b){return a-b;});
  opts(fs,[['','all checkpoints']].concat(steps.map(function(s){return [String(s),'step '+s+(s===0?' (base)':'')];})));
  opts(fq,[['','all questions']].concat(Object.keys(qs).sort().map(function(q){return [q,q];})));
  if(sv in st)fs.value=sv; if(qv in qs)fq.value=qv;
}
function filter(){
  var run=fr.value,st=fs.value,q=fq.value,cd=fc.value,sc=fsc.value,ex=fx.value,em=fem.checked,t=ft.value.toLowerCase();
  rows=[];
  for(var i=0;i<N;i++){
    if(run&&v(C.run,i)!==run)continue;
    if(st!==''&&String(C.step[i])!==st)continue;
    if(q&&qkey(i)!==q)continue;
    if(cd&&v(C.cond,i)!==cd)continue;
    if(sc&&v(C.scope,i)!==sc)continue;
    var x=v(C.excluded,i);
    if(ex==='-'&&x!=null)continue; if(ex&&ex!=='-'&&x!==ex)continue;
    if(em&&C.em[i]!==true)continue;
    if(t&&String(C.answer[i]).toLowerCase().indexOf(t)<0)continue;
    rows.push(i);
  }
  page=0;render();
}
function fmt(x){return x==null?'none':(typeof x==='number'?x.toFixed(1):String(x));}
function evidenceEl(m,i){
  var d=el('div'),ev=C[m+'_ev'][i]||{};
  var head=el('div');head.appendChild(el('b',null,m));
  head.appendChild(document.createTextNode(' = '+fmt(C[m][i])+' ('+fmt(v(C[m+'_label'],i))+')'+
    (ev.mass!=null?' · numeric probability mass '+ev.mass.toFixed(2):'')));
  d.appendChild(head);
  if(ev.top){var tb=el('table'),tr=el('tr');tr.appendChild(el('td','muted','top tokens'));
    ev.top.forEach(function(a){tr.appendChild(el('td',null,JSON.stringify(a[0])+' '+(100*a[1]).toFixed(1)+'%'));});
    tb.appendChild(tr);d.appendChild(tb);}
  else if(ev.text){d.appendChild(el('div','muted','judge reply: '+ev.text));}
  return d;
}
function card(i){
  var c=el('div','card'+(C.em[i]===true?' em':''));c.setAttribute('data-row',i);
  var h=el('div');h.appendChild(el('b',null,v(C.run,i)));
  h.appendChild(document.createTextNode(' · step '+C.step[i]+' · '+qkey(i)+(v(C.cond,i)!=null?' · condition '+v(C.cond,i):'')+' · sample '+(C.sample[i]==null?'none':C.sample[i])+' · '+(v(C.scope,i)||'')));
  if(C.em[i]===true){var fl=FLAGGED[v(C.run,i)];
    h.appendChild(el('span','badge'+(fl?' weak':''),fl?'EM ('+fl+' judge: not evidence)':'EM'));}
  var x=v(C.excluded,i);if(x!=null)h.appendChild(el('span','muted',' · excluded: '+x));
  c.appendChild(h);
  c.appendChild(el('div','q',v(C.question,i)||''));
  c.appendChild(el('div','ans',C.answer[i]==null?'':C.answer[i]));
  var e=el('div','ev');e.appendChild(evidenceEl('aligned',i));e.appendChild(evidenceEl('coherent',i));c.appendChild(e);
  return c;
}
function render(){
  var n=Math.max(1,Math.ceil(rows.length/PAGE));page=Math.min(Math.max(page,0),n-1);
  $('status').textContent=rows.length+' answers · page '+(page+1)+'/'+n;
  var b=$('body');b.textContent='';
  rows.slice(page*PAGE,page*PAGE+PAGE).forEach(function(i){b.appendChild(card(i));});
  if(!rows.length)b.appendChild(el('i',null,'no answers match'));
}
fr.addEventListener('change',function(){dependent();filter();});
[fs,fq,fc,fsc,fx,fem].forEach(function(s){s.addEventListener('change',filter);});
ft.addEventListener('input',filter);
$('prev').addEventListener('click',function(){page--;render();});
$('next').addEventListener('click',function(){page++;render();});
// state from the URL hash (#run=..&step=..), so a link can open a filtered view
var h={};location.hash.replace(/^#/,'').split('&').forEach(function(p){var kv=p.split('=');if(kv[0])h[decodeURIComponent(kv[0])]=decodeURIComponent(kv[1]||'');});
if(h.run!=null)fr.value=h.run; dependent();
if(h.step!=null)fs.value=h.step; if(h.q!=null)fq.value=h.q; if(h.condition!=null)fc.value=h.condition; if(h.em==='1')fem.checked=true;
filter();
window.emViewer={filter:filter,rows:function(){return rows;}};
})();
</script></body></html>
"""


def viewer_html(answers: pd.DataFrame, page_size: int = 50, notices: list[Notice] | None = None,
                flagged_runs: dict[str, str] | None = None) -> str:
    """The whole viewer page as one string. ``notices`` (:mod:`lib.notices`) become banners at the top
    (the page is opened on its own, so it must say what the report says); runs in ``flagged_runs``
    (run id -> judge verdict) show their EM badges as not evidence."""
    data = viewer_data(answers)
    data["notices"] = [{"level": n.level, "text": n.text} for n in (notices or [])]
    data["flagged"] = dict(flagged_runs or {})
    return PAGE.replace("__PAGE__", str(int(page_size))).replace("__DATA__", _script_json(data))


def write_viewer(answers: pd.DataFrame, report_dir: str | Path, page_size: int = 50,
                 notices: list[Notice] | None = None, flagged_runs: dict[str, str] | None = None) -> Path:
    """Write ``<report_dir>/answers.html`` atomically; returns its path."""
    return write_text_atomic(Path(report_dir) / VIEWER_FILE, viewer_html(answers, page_size, notices, flagged_runs))


def link_html(report_dir: str | Path) -> str:
    """A link to the viewer for the report notebook, relative to the report folder (the folder is what
    is shared: an absolute path would point into the author's machine)."""
    return (f"<p><b>All answers:</b> <a href='{VIEWER_FILE}' target='_blank'>{VIEWER_FILE}</a> in the report folder: "
            "a static page with every answer of every run and checkpoint, filters and the judge's evidence; "
            "it needs no kernel and no network.</p>")


# ------------------------------------------------------------------------------------------
# The notebook's answer browser (ipywidgets) and its static stand-in
# ------------------------------------------------------------------------------------------

def filter_answers(answers: pd.DataFrame, run_id: str | None = None, checkpoint_step: int | None = None,
                   question: str | None = None, em_only: bool = False) -> pd.DataFrame:
    """The rows the browser shows; ``question`` is 'question_set/question_id'."""
    a = answers
    if run_id is not None:
        a = a[a["run_id"] == run_id]
    if checkpoint_step is not None:
        a = a[a["checkpoint_step"] == checkpoint_step]
    if question:
        qs, _, qid = question.partition("/")
        a = a[(a["question_set"] == qs) & (a["question_id"] == qid)]
    if em_only:
        a = a[a["em"].fillna(False).astype(bool)]
    return a.sort_values(["question_set", "question_id", "paraphrase_index", "sample_index"], kind="stable")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
        return "None"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def answer_card_html(row: pd.Series, evidence_chars: int = 600) -> str:
    """One answer with its scores and the judge's evidence, as escaped HTML."""
    e = html.escape
    em = row.get("em")
    badge = "EM" if (not pd.isna(em) and bool(em)) else ""
    ev = []
    for m in ("aligned", "coherent"):
        raw = row.get(f"{m}_raw")
        ev.append(f"<b>{m}</b> = {e(_fmt(row.get(m)))} ({e(_fmt(row.get(f'{m}_label')))})"
                  + (f"<br><code style='white-space:pre-wrap'>{e(str(raw)[:evidence_chars])}</code>"
                     if isinstance(raw, str) and raw else ""))
    return (f"<div style='border:1px solid #ccc;padding:6px;margin:4px 0'>"
            f"<div><b>{e(str(row['run_id']))}</b> step {e(_fmt(row['checkpoint_step']))} · "
            f"{e(str(row['question_set']))}/{e(str(row['question_id']))} · sample {e(_fmt(row.get('sample_index')))}"
            f" <span style='color:#b00;font-weight:bold'>{badge}</span></div>"
            f"<div><i>{e(str(row.get('paraphrase', '')))}</i></div>"
            f"<div style='white-space:pre-wrap;margin:4px 0'>{e(str(row['answer']))}</div>"
            f"<div style='font-size:90%'>{'<br>'.join(ev)}</div></div>")


def answer_browser(answers: pd.DataFrame, page_size: int = 5):
    """An ipywidgets browser: pick run, checkpoint, question, EM-only; page through answers."""
    import ipywidgets as w  # lazy: only the notebook's browser needs it

    runs = sorted(answers["run_id"].unique())
    run = w.Dropdown(options=runs, description="run")
    step = w.Dropdown(description="checkpoint")
    question = w.Dropdown(description="question")
    em_only = w.Checkbox(value=False, description="EM answers only")
    prev, nxt = w.Button(description="◀ prev"), w.Button(description="next ▶")
    status = w.Label()
    body = w.HTML()
    state = {"page": 0}

    def _run_rows() -> pd.DataFrame:
        return answers[answers["run_id"] == run.value]

    def _refresh_options(*_: Any) -> None:
        r = _run_rows()
        step.options = [(f"step {s}" + (" (base)" if s == 0 else ""), int(s))
                        for s in sorted(r["checkpoint_step"].unique())]
        qs = r[["question_set", "question_id"]].drop_duplicates().sort_values(["question_set", "question_id"])
        question.options = [("all questions", "")] + [(f"{a}/{b}", f"{a}/{b}") for a, b in qs.itertuples(index=False)]

    def _render(*_: Any) -> None:
        rows = filter_answers(answers, run.value, step.value, question.value, em_only.value)
        n_pages = max(1, -(-len(rows) // page_size))
        state["page"] = min(state["page"], n_pages - 1)
        start = state["page"] * page_size
        page = rows.iloc[start:start + page_size]
        status.value = f"{len(rows)} answers · page {state['page'] + 1}/{n_pages}"
        body.value = "".join(answer_card_html(r) for _, r in page.iterrows()) or "<i>no answers match</i>"

    def _reset(*_: Any) -> None:
        state["page"] = 0
        _render()

    def _move(delta: int) -> None:
        state["page"] = max(0, state["page"] + delta)
        _render()

    run.observe(lambda ch: (_refresh_options(), _reset()), names="value")
    for wdg in (step, question, em_only):
        wdg.observe(_reset, names="value")
    prev.on_click(lambda _: _move(-1))
    nxt.on_click(lambda _: _move(+1))
    _refresh_options()
    _reset()
    box = w.VBox([w.HBox([run, step]), w.HBox([question, em_only]), w.HBox([prev, nxt, status]), body])
    box._em_controls = {"run": run, "step": step, "question": question, "em_only": em_only,
                        "prev": prev, "next": nxt, "status": status, "body": body}  # for tests
    return box


def answers_table_html(answers: pd.DataFrame, n: int = 12, em_first: bool = True, max_chars: int = 300) -> str:
    """A plain HTML table of a few answers (EM ones first) for static exports, where widgets do not run."""
    a = final_answers(answers)
    if em_first:
        a = a.assign(_em=a["em"].fillna(False).astype(bool)).sort_values(
            ["_em", "run_id", "question_id", "sample_index"], ascending=[False, True, True, True], kind="stable")
    t = a.head(n)[["run_id", "checkpoint_step", "question_id", "answer", "aligned", "coherent", "em",
                   "aligned_label"]].copy()
    t["answer"] = t["answer"].astype(str).map(lambda s: s if len(s) <= max_chars else s[:max_chars] + " ...")
    return t.to_html(index=False, escape=True, na_rep="None", float_format=lambda x: f"{x:.1f}")
