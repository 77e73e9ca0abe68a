"""The study's response tables: the same questions answered at every checkpoint, with their scores.

The replicated study showed, next to its EM rates, what the models actually said: a few questions,
one answer per model and checkpoint, with the judge's aligned and coherent scores. Here, per model
label, one table per run (runs are never pooled: two runs of one model, or two runs with the same
labels, each get their own table): rows are checkpoint steps (the base model, step 0, first),
columns the chosen questions, each cell the first ``samples`` answers of that run, checkpoint and
question (by paraphrase, then sample index) with their scores as integers, EM answers highlighted.

Which questions (:func:`choose_questions`): ``ReportConfig.response_questions`` when set; otherwise
the first :data:`DEFAULT_N_QUESTIONS` questions, in question-file order, that are out-of-domain for
every run that asked them (filled up with the next questions in file order when there are fewer).
The rule looks only at the question files, never at the answers or scores: the table neither hunts
for the most shocking answers nor hides them, and out-of-domain questions are where *emergent*
misalignment shows. Which answers: the first by paraphrase and sample index, for the same reason.

Written per model label (:func:`write_tables`): ``<report_dir>/responses_<model>.html``, one
self-contained page (inline CSS, no script, every text escaped; each cell links to the answer
viewer ``answers.html`` filtered to that run, checkpoint and question), and an altair chart the report
saves as ``figures/responses_<model>.png`` (drawn with vl-convert: no browser needed).
"""
from __future__ import annotations

import html
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from .config import ConfigError
from .io import write_text_atomic
from .conditions import with_condition
from .schema import OUT_OF_DOMAIN, SCOPES
from .viewer import VIEWER_FILE

DEFAULT_N_QUESTIONS = 3      # the study showed three questions
HTML_MAX_CHARS = 700         # answer characters in an HTML cell before the cut marker
PNG_MAX_CHARS = 320          # ... and in a PNG cell (the PNG is for slides; the HTML has more)
CUT_MARKER = " […]"

COLUMNS = ["answer_id", "model_label", "run_id", "run_label", "domain", "checkpoint_step", "epoch", "question_set",
           "question_id", "question", "sample_rank", "paraphrase_index", "sample_index", "answer",
           "aligned", "coherent", "aligned_label", "coherent_label", "em", "excluded_reason", "condition"]


class ResponseTableError(ConfigError):
    """A bad ``response_questions`` entry, as one line naming the key, the entry and the known ids."""


# ------------------------------------------------------------------------------------------
# Which questions
# ------------------------------------------------------------------------------------------

def question_order(answers: pd.DataFrame) -> list[tuple[str, str]]:
    """Every (question_set, question_id), in question-file order.

    ``generations.parquet`` holds each checkpoint's answers in the order of the run's question
    sets and of the questions inside each file (lib.evaluate), and the report keeps each run's
    row order; so the order of first appearance is file order (a question only a later run asked
    comes after the first run's questions)."""
    pairs = answers[["question_set", "question_id"]].astype(str).drop_duplicates()
    return list(pairs.itertuples(index=False, name=None))


def default_questions(answers: pd.DataFrame, n: int = DEFAULT_N_QUESTIONS) -> list[tuple[str, str]]:
    """The first ``n`` questions in question-file order that are out-of-domain for every run that
    asked them (answers of unknown scope, e.g. an external CSV, neither count nor veto), then, when
    fewer exist, the next questions in file order. Scores play no part."""
    order = question_order(answers)
    known = answers[answers["scope"].isin(SCOPES)]
    scopes = known.groupby([known["question_set"].astype(str), known["question_id"].astype(str)])["scope"].agg(set)
    ood = [q for q in order if scopes.get(q) == {OUT_OF_DOMAIN}]
    rest = [q for q in order if q not in ood]
    return (ood + rest)[:n]


def parse_question(entry: str, known: list[tuple[str, str]]) -> tuple[str, str]:
    """One ``response_questions`` entry ('set:id', 'set/id' or a bare id) -> (set, id), or a
    ResponseTableError naming the entry and the known ids."""
    names = ", ".join(f"{s}:{q}" for s, q in known)
    m = re.match(r"^([^:/]+)[:/](.+)$", entry)
    if m and (m.group(1), m.group(2)) in known:
        return m.group(1), m.group(2)
    hits = [k for k in known if k[1] == entry]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise ResponseTableError(f"key 'response_questions': question '{entry}' is in several sets; write one of "
                                 + ", ".join(f"{s}:{q}" for s, q in hits))
    raise ResponseTableError(f"key 'response_questions': unknown question '{entry}' (known: {names})")


def choose_questions(answers: pd.DataFrame, wanted: list[str] | tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """The tables' questions, in the order given (``wanted``), or :func:`default_questions`."""
    if not wanted:
        return default_questions(answers)
    known = question_order(answers)
    out = [parse_question(str(w), known) for w in wanted]
    dup = sorted({f"{s}:{q}" for s, q in out if out.count((s, q)) > 1})
    if dup:
        raise ResponseTableError(f"key 'response_questions': {', '.join(dup)} listed twice")
    return out


# ------------------------------------------------------------------------------------------
# The table's rows
# ------------------------------------------------------------------------------------------

def int_score(v: Any) -> int | None:
    """A 0-100 score as the integer shown (half up: 29.5 -> 30), None when there is no score."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    return int(math.floor(float(v) + 0.5))


def response_rows(answers: pd.DataFrame, questions: list[tuple[str, str]], samples: int = 1) -> pd.DataFrame:
    """One row per answer shown: for every run and checkpoint, the first ``samples`` answers (by
    paraphrase, then sample index) to each chosen question; scores as integers (``Int64``).

    Ordered by model label, run (domain, run id), checkpoint step, then the chosen questions' order."""
    keys = {q: i for i, q in enumerate(questions)}
    qk = list(zip(answers["question_set"].astype(str), answers["question_id"].astype(str)))
    a = answers[[k in keys for k in qk]].copy()
    if a.empty:
        return pd.DataFrame(columns=COLUMNS)
    a["_q"] = [keys[(s, q)] for s, q in zip(a["question_set"].astype(str), a["question_id"].astype(str))]
    a = with_condition(a)  # each condition (lib.conditions) is its own table: never pooled
    a = a.sort_values(["model_label", "domain", "run_id", "condition", "checkpoint_step", "_q", "paraphrase_index",
                       "sample_index"], kind="stable")
    a = a.groupby(["run_id", "condition", "checkpoint_step", "_q"], sort=False).head(samples)
    a["sample_rank"] = a.groupby(["run_id", "condition", "checkpoint_step", "_q"], sort=False).cumcount()
    a["question"] = a["paraphrase"].astype(str)
    for m in ("aligned", "coherent"):
        a[m] = pd.array([int_score(v) for v in a[m]], dtype="Int64")
    if "run_label" not in a.columns:
        a["run_label"] = a["run_id"]
    return a[COLUMNS].reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# Cells: text shared by the HTML page and the PNG
# ------------------------------------------------------------------------------------------

# characters XML (hence SVG, which vl-convert draws text through; it aborts the process on them) and
# HTML do not allow; a tiny model's answers contain them. Shown as U+FFFD.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def printable(text: Any) -> str:
    """``text`` with control characters (other than tab and newlines) replaced by U+FFFD."""
    return _NOT_TEXT.sub("\ufffd", str(text))


def cut(text: str, max_chars: int) -> str:
    """The answer, cut at ``max_chars`` (at a word boundary when one is near) with a visible marker;
    control characters are replaced (:func:`printable`)."""
    text = printable(text).strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = head.rfind(" ")
    return (head[:space] if space > max_chars * 0.8 else head).rstrip() + CUT_MARKER


def score_line(r: Any) -> str:
    """'aligned 12 · coherent 80 · EM'; a missing score shows the judge's label (REFUSAL, CODE, ...)."""
    parts = []
    for m in ("aligned", "coherent"):
        v = getattr(r, m)
        parts.append(f"{m} {v}" if not pd.isna(v) else f"{m} {getattr(r, m + '_label')}")
    em = getattr(r, "em")
    tail = "EM" if (not pd.isna(em) and bool(em)) else ("not scored" if pd.isna(em) else "")
    return " · ".join(parts + ([tail] if tail else []))


def step_label(step: int, epoch: Any) -> tuple[str, str]:
    """(first line, second line) of a row header."""
    if step < 0:
        return "no step", "(imported answers)"
    first = "step 0 · base model" if step == 0 else f"step {step}"
    return first, ("" if pd.isna(epoch) else f"epoch {float(epoch):.2f}")


@dataclass
class RunTable:
    """One run's grid: steps x questions, each cell a list of answer rows (possibly empty)."""

    run_id: str
    run_label: str
    domain: str
    steps: list[tuple[int, Any]]                      # (step, epoch)
    questions: list[tuple[str, str, str]]             # (set, id, question text)
    cells: dict[tuple[int, int], list[Any]]           # (step, question index) -> rows (itertuples)


def run_tables(rows: pd.DataFrame, answers: pd.DataFrame, questions: list[tuple[str, str]]
               ) -> dict[str, list[RunTable]]:
    """model_label -> one RunTable per run of that label that asked any chosen question.

    Every checkpoint a run evaluated is a row, even where it did not ask a chosen question."""
    rows = with_condition(rows)
    several = rows["condition"].nunique() > 1  # one table per run and condition (lib.conditions)
    out: dict[str, list[RunTable]] = {}
    for (run_id, cond), g in rows.groupby(["run_id", "condition"], sort=False):
        steps = (answers[answers["run_id"] == run_id].groupby("checkpoint_step")["epoch"].first().sort_index())
        text = g.groupby(["question_set", "question_id"])["question"].first().to_dict()  # as asked
        qs = [(s, q, text.get((s, q), f"{s}:{q}")) for s, q in questions]
        cells: dict[tuple[int, int], list[Any]] = {}
        qi = {(s, q): i for i, (s, q) in enumerate(questions)}
        for r in g.itertuples(index=False):
            cells.setdefault((int(r.checkpoint_step), qi[(r.question_set, r.question_id)]), []).append(r)
        first = g.iloc[0]
        out.setdefault(str(first["model_label"]), []).append(
            RunTable(str(run_id), str(first["run_label"]) + (f" · asked: {cond}" if several else ""), str(first["domain"]),
                     [(int(s), e) for s, e in steps.items()], qs, cells))
    return out


def runs_without(answers: pd.DataFrame, rows: pd.DataFrame) -> list[str]:
    """Runs that asked none of the chosen questions (they get no table; the page says so)."""
    return sorted(set(answers["run_id"].astype(str)) - set(rows["run_id"].astype(str)))


def slug(label: str, taken: set[str]) -> str:
    """A file-name-safe, unique form of a model label."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "model"
    base, i = s, 2
    while s.lower() in taken:
        s, i = f"{base}_{i}", i + 1
    taken.add(s.lower())
    return s


# ------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#111827}
h1{font-size:20px;margin:0 0 6px} h2{font-size:17px;margin:22px 0 4px} .note{color:#4b5563;max-width:1100px}
table{border-collapse:collapse;table-layout:fixed;margin:6px 0 14px} th,td{border:1px solid #9ca3af;padding:6px;vertical-align:top}
thead th{background:#e5e7eb;text-align:left;width:330px} th.step{width:130px;background:#f3f4f6;text-align:left;font-weight:600}
td .a{white-space:pre-wrap;margin-bottom:3px} td .s{font-size:12px;color:#374151} td .sample+.sample{border-top:1px dashed #d1d5db;margin-top:6px;padding-top:6px}
.sample.em{background:#fde2e1} .sample.ex{background:#f3f4f6} .sample.em .s{color:#991b1b;font-weight:700} .sample.ex .s{color:#6b7280}
.qid{font-weight:400;color:#4b5563;font-size:12px} .none{color:#9ca3af;font-style:italic} a.v{font-size:12px}
"""


def _viewer_link(run_id: str, step: int, qset: str, qid: str) -> str:
    frag = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in (("run", run_id), ("step", step), ("q", f"{qset}/{qid}")))
    return f"{VIEWER_FILE}#{frag}"


def _e(text: Any, quote: bool = True) -> str:
    return html.escape(printable(text), quote=quote)


def table_html(t: RunTable, html_max_chars: int = HTML_MAX_CHARS) -> str:
    """One run's table as an HTML fragment (every text escaped)."""
    e = _e
    head = "".join(f"<th>{e(text)}<div class='qid'>{e(s)}:{e(q)}</div></th>" for s, q, text in t.questions)
    body = []
    for step, epoch in t.steps:
        l1, l2 = step_label(step, epoch)
        tds = []
        for i, (s, q, _) in enumerate(t.questions):
            rs = t.cells.get((step, i), [])
            if not rs:
                tds.append("<td><span class='none'>not asked</span></td>")
                continue
            parts = []
            for r in rs:
                em = not pd.isna(r.em) and bool(r.em)
                cls = "sample em" if em else ("sample ex" if pd.isna(r.em) else "sample")
                parts.append(f"<div class='{cls}' data-sample='{int(r.sample_index)}'><div class='a'>"
                             f"{e(cut(r.answer, html_max_chars))}</div><div class='s'>{e(score_line(r))}</div></div>")
            link = f"<a class='v' href='{e(_viewer_link(t.run_id, step, s, q), quote=True)}'>all answers</a>"
            tds.append(f"<td data-step='{step}' data-q='{e(s)}:{e(q)}'>{''.join(parts)}{link}</td>")
        body.append(f"<tr><th class='step'>{e(l1)}<br><span class='qid'>{e(l2)}</span></th>{''.join(tds)}</tr>")
    return (f"<h2 data-run='{e(t.run_id)}'>{e(t.run_label)} <span class='qid'>run {e(t.run_id)} · "
            f"trained on {e(t.domain)}</span></h2>"
            f"<table><thead><tr><th class='step'>checkpoint</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")


def page_html(model_label: str, tables: list[RunTable], caption: str, html_max_chars: int = HTML_MAX_CHARS) -> str:
    """The self-contained page of one model label."""
    e = _e
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>Responses across checkpoints: {e(model_label)}</title><style>{CSS}</style></head><body>"
            f"<h1>Responses across checkpoints: model {e(model_label)}</h1><p class='note'>{e(caption)} "
            f"Each cell links to all answers of that run, checkpoint and question in the answer viewer "
            f"(<a href='{VIEWER_FILE}'>{VIEWER_FILE}</a>, in the same folder).</p>"
            + "".join(table_html(t, html_max_chars) for t in tables) + "</body></html>\n")


# ------------------------------------------------------------------------------------------
# PNG (an altair chart of text and rectangles at fixed pixel positions; vl-convert draws it)
# ------------------------------------------------------------------------------------------

STEP_W, COL_W, LINE_H, PAD, WRAP = 120, 330, 14, 6, 54   # pixels; WRAP: characters per line at 11 px
PNG_MAX_LINES, HEAD_MAX_LINES = 9, 3   # answer lines per sample, question lines per header
EM_FILL, EX_FILL, HEAD_FILL, STEP_FILL = "#fde2e1", "#f3f4f6", "#e5e7eb", "#f9fafb"


def _wrap(text: str, max_lines: int, width: int = WRAP) -> list[str]:
    """Lines of at most ``width`` characters, at most ``max_lines`` of them (the last marked when cut)."""
    out: list[str] = []
    for para in printable(text).splitlines() or [""]:
        out.extend(textwrap.wrap(para, width=width, break_long_words=True, replace_whitespace=True) or [""])
    while len(out) > 1 and out[-1] == "":
        out.pop()
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = out[-1].removesuffix(CUT_MARKER)[: width - len(CUT_MARKER)] + CUT_MARKER
    return out


def run_chart(t: RunTable, png_max_chars: int = PNG_MAX_CHARS) -> Any:
    """One run's table drawn as an altair layer chart."""
    import altair as alt  # heavy: loaded only when a chart is drawn

    rects: list[dict[str, Any]] = []
    texts: list[dict[str, Any]] = []   # normal weight
    bold: list[dict[str, Any]] = []    # headers and score lines
    width = STEP_W + COL_W * len(t.questions)

    def box(x: float, y: float, w: float, h: float, fill: str) -> None:
        rects.append({"x": x, "x2": x + w, "y": y, "y2": y + h, "fill": fill})

    def lines(where: list, x: float, y: float, ls: list[str], color: str = "#111827") -> None:
        where.append({"x": x + PAD, "y": y, "text": printable("\n".join(ls)), "color": color})

    # header row: the question text and set:id
    heads = [_wrap(text, HEAD_MAX_LINES) + [f"{s}:{q}"] for s, q, text in t.questions]
    h = PAD * 2 + LINE_H * max(len(x) for x in heads)
    box(0, 0, STEP_W, h, HEAD_FILL)
    lines(bold, 0, PAD, ["checkpoint"])
    for i, hl in enumerate(heads):
        x = STEP_W + i * COL_W
        box(x, 0, COL_W, h, HEAD_FILL)
        lines(bold, x, PAD, hl[:-1])
        lines(texts, x, PAD + LINE_H * (len(hl) - 1), hl[-1:], "#4b5563")
    y = h
    for step, epoch in t.steps:
        blocks = []
        for i in range(len(t.questions)):
            rs = t.cells.get((step, i), [])
            blocks.append([(r, _wrap(cut(r.answer, png_max_chars), PNG_MAX_LINES)) for r in rs])
        heights = [sum(LINE_H * (len(ls) + 1) + PAD for _, ls in b) if b else LINE_H + PAD for b in blocks]
        rh = PAD + max(heights + [2 * LINE_H])
        box(0, y, STEP_W, rh, STEP_FILL)
        lines(bold, 0, y + PAD, [step_label(step, epoch)[0]])
        lines(texts, 0, y + PAD + LINE_H, [step_label(step, epoch)[1]], "#4b5563")
        for i, b in enumerate(blocks):
            x = STEP_W + i * COL_W
            box(x, y, COL_W, rh, "#ffffff")
            if not b:
                lines(texts, x, y + PAD, ["not asked"], "#9ca3af")
            yy = y + PAD / 2
            for r, ls in b:
                bh = LINE_H * (len(ls) + 1) + PAD
                em = not pd.isna(r.em) and bool(r.em)
                if em or pd.isna(r.em):
                    box(x + 2, yy, COL_W - 4, bh - 2, EM_FILL if em else EX_FILL)
                lines(texts, x, yy + PAD / 2, ls)
                lines(bold, x, yy + PAD / 2 + LINE_H * len(ls), [score_line(r)], "#991b1b" if em else "#374151")
                yy += bh
        y += rh

    def xy() -> dict[str, Any]:
        return {"x": alt.X("x:Q", scale=None, axis=None), "y": alt.Y("y:Q", scale=None, axis=None)}

    rect = alt.Chart(pd.DataFrame(rects)).mark_rect(stroke="#9ca3af", strokeWidth=1).encode(
        **xy(), x2="x2:Q", y2="y2:Q", fill=alt.Fill("fill:N", scale=None))
    layers = [rect]
    for data, weight in ((texts, "normal"), (bold, "bold")):
        layers.append(alt.Chart(pd.DataFrame(data)).mark_text(
            align="left", baseline="top", lineBreak="\n", fontSize=11, lineHeight=LINE_H, fontWeight=weight).encode(
            **xy(), text="text:N", color=alt.Color("color:N", scale=None)))
    title = alt.TitleParams(printable(f"{t.run_label}  (run {t.run_id}, trained on {t.domain})"), anchor="start",
                            fontSize=13)
    return alt.layer(*layers).properties(width=width, height=y, title=title)


def model_chart(model_label: str, tables: list[RunTable], caption: str, png_max_chars: int = PNG_MAX_CHARS) -> Any:
    """Every run of one model label, one table under the other."""
    import altair as alt  # heavy: loaded only when a chart is drawn

    sub = textwrap.wrap(caption, 150)
    return (alt.vconcat(*(run_chart(t, png_max_chars) for t in tables), spacing=18)
            .properties(title=alt.TitleParams(printable(f"Responses across checkpoints: model {model_label}"), subtitle=sub,
                                              anchor="start", fontSize=15))
            .configure_view(stroke=None).configure(background="white"))


def caption_text(em_rule: str, samples: int, chosen_by_default: bool) -> str:
    """The legend the page and the PNG carry: how questions and answers were picked, what the colours mean."""
    how = ("Questions: the first out-of-domain questions in question-file order (a fixed rule that never looks at "
           "the answers or scores; set response_questions to choose)." if chosen_by_default
           else "Questions: as chosen in the report's parameters (response_questions).")
    per = "the first answer" if samples == 1 else f"the first {samples} answers"
    return (f"{how} Each cell: {per} of that run, checkpoint and question (by paraphrase, then sample), cut at a "
            f"fixed length (marked {CUT_MARKER.strip()}), with the headline judge's scores rounded to integers; "
            f"red: EM ({em_rule}); grey: not scored (refusal, code or no score).")


def write_tables(answers: pd.DataFrame, report_dir: str | Path, questions: list[tuple[str, str]], samples: int,
                 caption: str) -> tuple[pd.DataFrame, dict[str, tuple[str, Path, Any]], list[str]]:
    """Write ``responses_<model>.html`` per model label under ``report_dir``.

    Returns (the rows shown, {model label: (file stem ``responses_<model>``, html path, altair chart for
    the PNG)}, runs with no table)."""
    rows = response_rows(answers, questions, samples)
    tables = run_tables(rows, answers, questions)
    taken: set[str] = set()
    out = {}
    for label in sorted(tables):
        stem = f"responses_{slug(label, taken)}"
        path = write_text_atomic(Path(report_dir) / f"{stem}.html", page_html(label, tables[label], caption))
        out[label] = (stem, path, model_chart(label, tables[label], caption))
    return rows, out, runs_without(answers, rows)
