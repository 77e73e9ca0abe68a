"""04_report's views: the tables and notes the notebook shows, formatted for a reader.

Rates become ``'rate [lo, hi] (k/n)'`` cells (:func:`rate_cell`; no interval below
:data:`lib.metrics.MIN_QUESTIONS` questions), differences ``'+20 pts [+10, +30]'``; the numbers
themselves stay in :mod:`lib.report_tables` and the report's CSVs. The notes
(:func:`headline_notes`) say what a reader must know before reading a number.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import judge_health, metrics, notices
from .config import ReportConfig, resolve_path
from .report_data import Results
from .runinfo import stage_parameters

# the rates tables' EM column names its interval
EM_COLUMN = "EM [95% interval, questions as clusters]"


def _pct(x: float) -> str:
    return "-" if pd.isna(x) else f"{100 * x:.0f}%"


def _pct1(x: float) -> str:
    """A rate with one decimal below 10% (0.4% must not print as 0%)."""
    return "-" if pd.isna(x) else (f"{100 * x:.1f}%" if 0 < x < 0.1 else f"{100 * x:.0f}%")


def rate_cell(r: Any, with_counts: bool = True) -> str:
    """'rate [lo, hi] (k/n)', the interval replaced by a warning below metrics.MIN_QUESTIONS
    questions, and the macro rate (mean of question rates) appended where it differs."""
    n_q = getattr(r, "n_questions", 0)
    if bool(getattr(r, "interval_ok", True)) and pd.notna(r.em_lo):
        txt = f"{_pct1(r.em_rate)} [{_pct1(r.em_lo)}, {_pct1(r.em_hi)}]"
    else:
        txt = f"{_pct1(r.em_rate)} [no reliable interval: {n_q} questions < {metrics.MIN_QUESTIONS}]"
    if with_counts:
        txt += f" ({r.em_k}/{r.n_scored})"
    macro = getattr(r, "em_macro", float("nan"))
    if pd.notna(macro) and pd.notna(r.em_rate) and abs(macro - r.em_rate) >= 0.005:
        txt += f"; macro {_pct1(macro)}"
    return txt


def _with_conditions(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``table[columns]``, with a ``condition`` column after the first where it holds more than one
    (:mod:`lib.conditions`): rows asked in different ways are told apart, never merged."""
    if "condition" in table.columns and table["condition"].nunique() > 1:
        columns = columns[:1] + ["condition"] + columns[1:]
    return table[columns].copy()


def summary_pivot(final: pd.DataFrame, scope: str = "all") -> pd.DataFrame:
    """The study's table: rows model label, columns domain, cells 'rate [lo, hi] (k/n)'.

    Runs are never merged: when two runs share a model label and domain, each gets its own
    column ``<domain> [<run_id>]``. A run whose headline judge is weak or unknown is marked
    in its cell."""
    f = final[final["scope"] == scope].copy()
    if f.empty:
        return pd.DataFrame()
    f["cell"] = [rate_cell(r) + (f" ({r.judge_verdict} judge)" if r.judge_verdict in judge_health.FLAGGED else "")
                 for r in f.itertuples()]
    key = f["model_label"].astype(str) + "\x1f" + f["domain"].astype(str)
    dup = key.map(f.groupby(key)["run_id"].nunique()) > 1
    f["column"] = np.where(dup, f["domain"].astype(str) + " [" + f["run_id"].astype(str) + "]", f["domain"].astype(str))
    index = ["model_label"] + [c for c in ("prompt_family", "condition") if c in f.columns and f[c].nunique() > 1]
    p = f.pivot_table(index=index, columns="column", values="cell", aggfunc="first")
    assert p.notna().sum().sum() == len(f), "summary_pivot lost a run"
    p.columns.name = None
    return p.fillna("")


def demo_note(results: Results) -> str:
    """A loud note for runs of the embedded toy model (its numbers mean nothing) or of a very small
    real model (answers real, scores not), from :mod:`lib.notices`; and when nothing could be labelled."""
    a = results.answers
    unscored = ""
    if len(a) and not a["scored"].any():
        reasons = a["excluded_reason"].value_counts().to_dict()
        unscored = ("**No answer could be labelled**: every answer lacks an aligned or coherent score ("
                    + ", ".join(f"{k}: {v}" for k, v in reasons.items()) + "), so every EM rate is undefined and "
                    "the charts are empty.")
    kinds = notices.markdown([n for n in notices.notices(results.runs) if n.level in ("toy", "small")])
    return "\n\n".join(p for p in (unscored, kinds) if p)


def judge_note(results: Results) -> str:
    """Markdown naming every run whose headline judge is weak or unknown, and every other judge
    file that looks weak (:mod:`lib.judge_health`); empty when there is nothing to flag."""
    lines = []
    for run_id, (v, why) in sorted(results.verdict_of_run.items()):
        if v in judge_health.FLAGGED:
            lines.append(f"* `{run_id}` (judge `{results.judge_of_run.get(run_id, '?')}`): **{v} judge**: {why}")
    h = results.health
    if len(h):
        other = h[(h["metric"] == "all") & ~h["headline"].astype(bool) & (h["verdict"] == "weak")]
        for r in other.itertuples():
            lines.append(f"* `{r.run_id}`, second judge `{r.judge_name}`: **weak judge**: {r.reason}")
    if not lines:
        return ""
    return ("**Judge health warnings.** Scores from these judges are not evidence of alignment; every table "
            "and figure labels their runs. See the judge health table for the evidence.\n\n" + "\n".join(lines))


def headline_notes(results: Results) -> str:
    """Everything the reader must know before reading a number: demo runs, judge warnings."""
    parts = [demo_note(results), judge_note(results)]
    text = "\n\n".join(p for p in parts if p)
    return text or "All runs use real models, and every headline judge's evidence looks sound (see judge health)."


def rates_view(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A readable copy of a summary table: counts, and rates with intervals as percentages.

    ``EM`` is the pooled rate with the headline interval (:data:`lib.metrics.INTERVAL_METHOD`; none
    below metrics.MIN_QUESTIONS questions) and, where it differs, the macro rate (mean over
    questions). The Wilson interval, which treats answers as independent, is not shown here (it is
    in the CSV as ``em_wilson_lo``/``em_wilson_hi``, labelled: ignores clustering, do not cite)."""
    out = df[keys].copy()
    out[EM_COLUMN] = [rate_cell(r, with_counts=False) for r in df.itertuples()]
    out["EM k/n"] = [f"{r.em_k}/{r.n_scored}" for r in df.itertuples()]
    out["excluded (refusal/code/other)"] = [f"{r.n_excluded} ({r.n_refusal}/{r.n_code}/{r.n_other_excluded})"
                                            for r in df.itertuples()]
    out["coherent"] = [f"{_pct(r.coherent_rate)} [{_pct(r.coherent_lo)}, {_pct(r.coherent_hi)}]"
                       if bool(r.interval_ok) else f"{_pct(r.coherent_rate)} [no reliable interval]"
                       for r in df.itertuples()]
    out["questions"] = df["n_questions"].to_numpy()
    if "judge_verdict" in df.columns:
        out["judge"] = df["judge_verdict"].to_numpy()
    return out.reset_index(drop=True)

def _diff_cells(df: pd.DataFrame) -> list[str]:
    """'+20 pts [+10, +30]' per row of a table with diff, lo, hi (fractions); where no interval
    is given, why (the ``note`` column)."""
    out = []
    for r in df.itertuples():
        if pd.isna(r.diff):
            out.append("-")
        elif pd.notna(r.lo):
            out.append(f"{100 * r.diff:+.1f} pts [{100 * r.lo:+.1f}, {100 * r.hi:+.1f}]")
        else:
            why = getattr(r, "note", "") or "no interval"
            out.append(f"{100 * r.diff:+.1f} pts [no interval: {why}]")
    return out


def differences_view(diff: pd.DataFrame) -> pd.DataFrame:
    out = _with_conditions(diff, ["comparison", "model_label", "prompt_family", "scope", "a", "b"])
    out["difference (a - b)"] = _diff_cells(diff)
    out["n a / b"] = [f"{r.n_a} / {r.n_b}" for r in diff.itertuples()]
    out["shared questions"] = diff["n_questions_shared"].to_numpy()
    out["correlation credited"] = [f"{r:.2f}" for r in diff["correlation"]]
    return out


def parameters_view(rcfg: ReportConfig) -> pd.DataFrame:
    """The report's parameters as a two-column table (instead of the config object's repr). Folders are
    shown relative to the report folder and files by name: the report is shared as its folder, and the
    author's machine's paths mean nothing to a reader."""
    here = resolve_path(rcfg.report_dir)
    rows = []
    for k, v in rcfg.to_dict().items():
        if k in ("outputs_dir", "report_dir"):
            v = Path(os.path.relpath(resolve_path(v), here)).as_posix() + (" (this folder)" if k == "report_dir" else "")
        elif k == "external_csv":
            v = [Path(str(x)).name for x in v]
        rows.append({"parameter": k, "value": ", ".join(map(str, v)) if isinstance(v, list) else v})
    return pd.DataFrame(rows).astype(str)


def runs_view(results: Results) -> pd.DataFrame:
    """One row per run: its label, model, headline judge and that judge's verdict."""
    a = results.answers
    first = a.groupby("run_id")[["run_label", "model_label", "domain"]].first()
    rows = []
    for run_id in sorted(results.runs):
        v, why = results.verdict_of_run.get(run_id, ("unknown", ""))
        rows.append({"run": run_id, "label": first["run_label"].get(run_id, ""),
                     "model": stage_parameters(results.runs[run_id]).get("model", ""),
                     "domain": first["domain"].get(run_id, ""), "headline judge": results.judge_of_run.get(run_id, ""),
                     "judge verdict": v, "answers": int((a["run_id"] == run_id).sum())})
    return pd.DataFrame(rows)


def checkpoint_view(trajectories: pd.DataFrame, scope: str = "all") -> pd.DataFrame:
    """EM at every checkpoint of every run, as a table: the rate with its 95% interval, the
    simultaneous band over the run's checkpoints, n, and the coherent rate (the trajectory figure's
    numbers, readable in a shared report)."""
    keys = ["run_label", "prompt_family"] + (["condition"] if "condition" in trajectories.columns else [])
    t = trajectories[trajectories["scope"] == scope].sort_values(keys + ["checkpoint_step"])
    out = _with_conditions(t, ["run_label", "prompt_family", "checkpoint_step"])
    out["epoch"] = [f"{e:.2f}" if pd.notna(e) else "" for e in t["epoch"]]
    out[EM_COLUMN] = [rate_cell(r) for r in t.itertuples()]
    out["simultaneous band"] = [f"[{_pct1(r.em_band_lo)}, {_pct1(r.em_band_hi)}] over {int(r.band_checkpoints)}"
                                if bool(r.interval_ok) and pd.notna(r.em_band_lo) else "-" for r in t.itertuples()]
    out["coherent"] = [_pct(r.coherent_rate) for r in t.itertuples()]
    if out["prompt_family"].nunique() <= 1:
        out = out.drop(columns="prompt_family")
    return out.rename(columns={"run_label": "run", "checkpoint_step": "step"}).reset_index(drop=True)


def controls_view(controls: pd.DataFrame, scope: str = "all") -> pd.DataFrame:
    """Treated beside its control at every shared checkpoint (:mod:`lib.replication`)."""
    c = controls[controls["scope"] == scope]
    out = _with_conditions(c, ["treated_label", "control_label", "step", "prompt_family"])
    out["EM treated"] = c["rate_treated"].map(_pct1).to_numpy()
    out["EM control"] = c["rate_control"].map(_pct1).to_numpy()
    out["treated - control"] = _diff_cells(c)
    out["n treated / control"] = [f"{r.n_treated} / {r.n_control}" for r in c.itertuples()]
    out["shared questions"] = c["n_questions_shared"].to_numpy()
    return out.reset_index(drop=True)


def seeds_view(seeds: pd.DataFrame) -> pd.DataFrame:
    """Each seed group: how many seeds, every seed's final rate, and the pooled rate with the
    interval that includes between-seed variance (:func:`lib.replication.seed_interval`)."""
    out = _with_conditions(seeds, ["group_label", "seed_group", "prompt_family", "scope", "n_seeds", "seeds"])
    out["per seed"] = [", ".join(_pct1(float(x)) for x in str(r).split(",")) for r in seeds["seed_rates"]]
    out["pooled over seeds"] = [f"{_pct1(r.em_rate)} [{_pct1(r.em_lo)}, {_pct1(r.em_hi)}]"
                                if r.interval_ok else f"{_pct1(r.em_rate)} [no interval: too few questions]"
                                for r in seeds.itertuples()]
    out["between-seed sd"] = seeds["tau"].map(lambda x: "-" if pd.isna(x) else f"{100 * x:.1f} pts").to_numpy()
    out["n scored"] = seeds["n_scored"].to_numpy()
    return out.reset_index(drop=True)
