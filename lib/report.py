"""04_report: every run's files -> the study's tables, figures and report folder.

:func:`make_report` loads the runs (:mod:`lib.report_data`), builds every table
(:mod:`lib.report_tables`, the study's summary from :mod:`lib.report_views`) and figure
(:mod:`lib.plots`), the response tables (:mod:`lib.response_tables`) and the answer viewer
(:mod:`lib.viewer`), and writes them with an index page and a manifest.

Outputs (``ReportConfig.report_dir``): ``figures/<name>.png|.svg|.html`` (the html works
offline: the Vega libraries are inlined), ``data/<name>.csv`` (the numbers behind every
figure and table), ``answers.html``, ``responses_<model>.html``, ``index.html``,
``report_config.json`` and ``manifest.json``. The notebook's rendered copy and its HTML export
are written by the grid runner with papermill and :func:`lib.notebook_html.export_html`.
"""
from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from . import judge_health, layout, metrics, notices, plots, replication, report_judges, response_tables, viewer
from .config import ConfigError, ReportConfig, resolve_path
from .io import atomic_path, write_text_atomic
from .report_data import ReportError, Results, load_results
from .conditions import drop_default
from .report_tables import (base_of_runs, base_table, conditions_table, differences_table, excluded_table, final_table,
                            judge_agreement_table, methods_table, per_question_table, question_set_table,
                            reference_conditions, training_log_table, trajectory_table)
from .report_views import summary_pivot


@dataclass
class Report:
    report_dir: Path
    results: Results
    tables: dict[str, pd.DataFrame]
    charts: dict[str, Any]            # name -> altair chart
    files: dict[str, list[Path]]      # name -> written files (png, svg, html, csv)
    responses: dict[str, str] = field(default_factory=dict)  # model_label -> its response tables' files key
    responses_notes: list[str] = field(default_factory=list)  # runs without a response table, and why
    notes: list[str] = field(default_factory=list)            # about this report's folder (stale files removed)


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """``df`` as CSV, atomically; a ``condition`` column that is all the default condition is left out
    (lib.conditions: a single-condition report's CSVs are as before conditions existed)."""
    with atomic_path(path, suffix=".csv") as tmp:
        drop_default(df).to_csv(tmp, index=False)
    return path


def make_report(rcfg: ReportConfig, progress: bool = True) -> Report:
    """Load, compute every table and figure, write figures/ and data/; the notebook displays the result."""
    report_dir = resolve_path(rcfg.report_dir)
    fig_dir, data_dir = layout.figures_dir(report_dir), report_dir / layout.DATA_DIR
    results = load_results(rcfg)
    a = results.answers
    try:  # a bad question id stops here, before any table or figure
        response_questions = response_tables.choose_questions(a, list(rcfg.response_questions))
    except ConfigError as e:
        raise ReportError(str(e)) from None
    steps = ["trajectories", "base", "final", "question_sets", "per_question", "differences", "judge_agreement",
             "judge_health"]
    tables: dict[str, pd.DataFrame] = {}
    with tqdm(total=len(steps) + len(plots.FIGURES), desc="report", disable=not progress) as bar:
        tables["trajectories"] = trajectory_table(a, rcfg); bar.update()
        tables["base"] = base_table(results, rcfg); bar.update()
        tables["final"] = final_table(a, rcfg); bar.update()
        tables["question_sets"] = question_set_table(a, rcfg); bar.update()
        tables["per_question"] = per_question_table(a, rcfg); bar.update()
        tables["differences"] = differences_table(a, rcfg, reference_conditions(results)); bar.update()
        tables["judge_agreement"] = judge_agreement_table(results, rcfg); bar.update()
        tables["judge_panel"] = report_judges.panel_table(results, rcfg)      # the judge section (lib.report_judges)
        tables["judge_threshold"] = report_judges.threshold_table(results, rcfg)
        tables["judge_flips"] = report_judges.flip_table(results, rcfg)
        tables["judge_calibration"] = report_judges.calibration_table(results)
        tables["judge_health"] = results.health; bar.update()
        tables["seeds"] = replication.seed_table(a, rcfg.confidence)
        tables["seed_points"] = replication.seed_points(a, rcfg.confidence)
        tables["controls"] = replication.control_differences(a, rcfg.confidence)
        tables["summary_all"] = summary_pivot(tables["final"], "all").reset_index()
        tables["summary_out_of_domain"] = summary_pivot(tables["final"], "out-of-domain").reset_index()
        tables["methods"] = methods_table(results)
        tables["excluded"] = excluded_table(a)
        tables["scatter"] = plots.scatter_data(a, seed=rcfg.seed)
        tables["training_log"] = training_log_table(results, resolve_path(rcfg.outputs_dir))
        tables["conditions"] = conditions_table(tables["trajectories"], results)  # its CSV: the figure's data

        charts, files = {}, {}
        figure_inputs = {
            "domain_comparison": (tables["final"], base_of_runs(tables["base"], results)),
            "em_trajectories": (tables["trajectories"], base_of_runs(tables["base"], results)),
            "coherence_trajectories": (tables["trajectories"], base_of_runs(tables["base"], results)),
            "training_loss": (tables["training_log"],),
            "aligned_vs_coherent": (tables["scatter"], metrics.em_kwargs(rcfg)),
            "per_question_heatmap": (tables["per_question"],),
            "judge_agreement": (tables["judge_agreement"],),
            "threshold_sensitivity": (tables["judge_threshold"], tables["judge_flips"]),
            "control_differences": (tables["controls"],),
            "seeds": (tables["seeds"], tables["seed_points"]),
            "conditions": (tables["conditions"],),
        }
        for name, make in plots.FIGURES.items():
            chart, data = make(*figure_inputs[name])
            bar.update()
            if chart is None:  # e.g. no second judge: no figure, and the notebook says so
                continue
            charts[name] = chart
            files[name] = plots.save(chart, name, fig_dir) + [write_csv(data, data_dir / f"{name}.csv")]
        tables["responses"], written, no_table = response_tables.write_tables(
            a, report_dir, response_questions, rcfg.response_samples_per_checkpoint,
            response_tables.caption_text(metrics.em_rule(**metrics.em_kwargs(rcfg)),
                                         rcfg.response_samples_per_checkpoint, not rcfg.response_questions))
        responses = {}
        for label, (stem, page, chart) in written.items():  # one page and one PNG per model label
            files[stem] = plots.save(chart, stem, fig_dir, formats=("png",)) + [page]  # the page is the html
            responses[label] = stem
    for name in ("trajectories", "base", "final", "question_sets", "per_question", "differences", "judge_agreement",
                 "judge_health", "seeds", "seed_points", "controls", "summary_all", "summary_out_of_domain", "methods",
                 "excluded", "responses", "training_log"):
        files[f"table_{name}"] = [write_csv(tables[name], data_dir / f"table_{name}.csv")]
    for name in ("judge_panel", "judge_flips", "judge_calibration"):
        files[f"table_{name}"] = [write_csv(tables[name], data_dir / f"table_{name}.csv")]
    # answers.html is opened on its own: it carries the report's banners, and EM badges of runs whose
    # judge is weak or unknown say so
    flagged = {r: v for r, (v, _) in results.verdict_of_run.items() if v in judge_health.FLAGGED}
    files["answer_viewer"] = [viewer.write_viewer(a, report_dir,
                                                  notices=notices.notices(results.runs, results.verdict_of_run),
                                                  flagged_runs=flagged)]
    write_text_atomic(report_dir / "report_config.json", json.dumps(rcfg.to_dict(), indent=2) + "\n")
    files["index"] = [write_index(report_dir, results, rcfg)]
    return Report(report_dir, results, tables, charts, files, responses,
                  [f"{r}: asked none of the chosen questions, no response table" for r in no_table],
                  replace_manifest(report_dir, files, sorted(results.runs)))


MANIFEST = "manifest.json"   # what the last report wrote into its folder, and over which runs


def replace_manifest(report_dir: Path, files: dict[str, list[Path]], runs: list[str]) -> list[str]:
    """Record what this report wrote; delete what the previous report in this folder wrote and this one
    did not (a grid over other runs would otherwise leave the first report's figures, tables and
    response pages beside the new ones). Only files a report wrote are ever deleted. Returns a note."""
    path = report_dir / MANIFEST
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    now = sorted({str(p.relative_to(report_dir)) for ps in files.values() for p in ps
                  if Path(p).is_relative_to(report_dir)} | {"report_config.json"})
    stale = [f for f in old.get("files", []) if f not in now and (report_dir / f).is_file()]
    for f in stale:
        (report_dir / f).unlink()
    write_text_atomic(path, json.dumps({"runs": runs, "files": now}, indent=2) + "\n")
    if not stale:
        return []
    before = ", ".join(old.get("runs", [])) or "unknown runs"
    return [f"this folder held a report over other runs ({before}); its {len(stale)} files this report does not "
            "write again were removed (figures, tables and pages of runs no longer in it)"]


def write_index(report_dir: Path, results: Results, rcfg: ReportConfig) -> Path:
    """``index.html``: the report, the answer viewer, the response pages, and every run with links to its
    rendered stage notebooks (relative links: the outputs folder can be shared or moved as a whole)."""
    outputs = resolve_path(rcfg.outputs_dir)
    labels = results.answers.groupby("run_id")["run_label"].first()
    rows = []
    for run_id in sorted(results.runs):
        links = []
        for stage in layout.RUN_STAGES:
            nb = layout.notebooks_dir(outputs / run_id) / Path(layout.NOTEBOOKS[stage]).with_suffix(".html").name
            if nb.exists():
                rel = Path(os.path.relpath(nb, report_dir)).as_posix()
                links.append(f"<a href='{html.escape(rel, quote=True)}'>{html.escape(stage)}</a>")
        verdict = results.verdict_of_run.get(run_id, ("", ""))[0]
        rows.append(f"<tr><td>{html.escape(str(labels.get(run_id, run_id)))}</td><td><code>{html.escape(run_id)}</code>"
                    f"</td><td>{html.escape(results.judge_of_run.get(run_id, ''))} ({html.escape(verdict)})</td>"
                    f"<td>{' · '.join(links) or 'no rendered notebooks (run outside the grid)'}</td></tr>")
    pages = [("report.html", "the report"), (viewer.VIEWER_FILE, "every answer (the answer viewer)")]
    pages += [(p.name, f"response tables: {p.stem.removeprefix('responses_')}")
              for p in sorted(report_dir.glob("responses_*.html"))]
    banners = "".join(f"<p class='banner'>{html.escape(n.text)}</p>"
                      for n in notices.notices(results.runs, results.verdict_of_run))
    body = (f"<h1>Report index</h1>{banners}<ul>"
            + "".join(f"<li><a href='{html.escape(f, quote=True)}'>{html.escape(f)}</a>: {html.escape(what)}</li>"
                      for f, what in pages)
            + "</ul><h2>Runs</h2><table><tr><th>run</th><th>id</th><th>headline judge (verdict)</th>"
              "<th>rendered notebooks</th></tr>" + "".join(rows) + "</table>"
            + "<p>Figures as PNG, SVG and offline HTML are in <code>figures/</code>, the numbers behind every figure "
              "and table in <code>data/</code>.</p>")
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report index</title><style>"
            "body{font-family:system-ui,sans-serif;margin:1.5em}td,th{padding:3px 8px;border-bottom:1px solid #ddd;"
            "text-align:left}.banner{border:2px solid #b36b00;background:#fff8e6;padding:6px 10px}</style></head><body>"
            + body + "</body></html>\n")
    return write_text_atomic(report_dir / "index.html", page)


def show_figure(rep: Report, name: str) -> None:
    """Display one figure of the report in a notebook (PNG + link), or say why there is none."""
    from IPython.display import Markdown, display  # lazy: only a notebook displays anything

    if name in rep.files:
        plots.show(rep.files[name], link_base=rep.report_dir)
    else:
        why = {"judge_agreement": "only one judge scored each run",
               "threshold_sensitivity": "no run has a scored answer at its final checkpoint",
               "training_loss": "no run of this report has a train_log.csv (external or imported answers)",
               }.get(name, "nothing to draw")
        display(Markdown(f"*No `{name}` figure: {why}.*"))


def show_responses(rep: Report) -> None:
    """Display the response tables in a notebook: per model label its PNG, with links to its HTML
    page and the answer viewer; runs without a table are named."""
    from IPython.display import HTML, Markdown, display  # lazy: only a notebook displays anything

    if not rep.responses:
        display(Markdown("*No response table: no run asked any of the chosen questions.*"))
    for label, stem in rep.responses.items():
        display(Markdown(f"**Model {label}**"))
        png, page = rep.files[stem]
        plots.show([png])
        display(HTML(f"<p><a href='{html.escape(page.name, quote=True)}'>{html.escape(page.name)}</a>: the same "
                     f"tables as a page with longer answers; each cell links to its answers in "
                     f"<a href='{viewer.VIEWER_FILE}'>{viewer.VIEWER_FILE}</a>.</p>"))
    for note in rep.responses_notes:
        print("note:", note)
