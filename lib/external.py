"""Answers from elsewhere, as runs: a CSV or parquet of (question, answer[, run, checkpoint_step, scores]).

Another study's answers (judged or not) can go through the same judge stage and report as
our own generations, so the same answers can be scored by our judge and compared with the
original scores (the report's judge-agreement table):

    python -m lib.external course_judged.csv --run-id course --outputs-dir outputs
    # -> outputs/course/generations.parquet (+ judgments/original.parquet from the file's scores)
    papermill notebooks/03_judge.ipynb out.ipynb -p run_id course -p judge_prompts prompts.yaml ...
    papermill notebooks/04_report.ipynb report.ipynb    # agreement: original vs our judge

Columns (CSV header or parquet column names; case-sensitive):

* required: ``question`` (or ``prompt``) and ``answer`` (or ``response``);
* optional: ``run`` (one run per distinct value, ``<run_id>_<value>``), ``checkpoint_step`` or
  ``step`` (integers: the runs draw trajectories like ours; missing: -1, "unknown, final"),
  ``epoch`` (a number is recorded as the checkpoint's epoch; ``base``, as in the replicated study's
  ``base_judged.csv``, means the base model: step 0),
  ``question_id`` (default: a hash of the question text, so equal texts are one question),
  ``question_set`` (default ``external``), ``model_label`` (default: ``--model-label``, else the
  run id), ``domain`` (default: ``--domain``, else ``external``), ``in_domain`` (true/false), ``system``;
* original scores: ``aligned_score`` and ``coherent_score`` (or ``aligned`` / ``coherent``):
  numbers 0..100, ``CODE``, ``REFUSAL``; an empty or other cell is ``unparseable``. With them
  the import also writes ``judgments/<original_judge>.parquet`` (method ``external``: no
  evidence of the judge's confidence, so judge health calls it ``unknown``); ``judge_model``
  names the original judge when the file has it.

The replicated study's files import as they are: ``fg_judged.csv`` (step, id, question, response,
aligned_score, coherent_score) becomes one run with a checkpoint per step, ``base_judged.csv``
(epoch = base) a run of base-model answers at step 0; give each its model with ``--model-label 1B``
(the report pools base-model answers only within one model label).

Bad input stops with one line naming the file, the line and the column (exit code 2 from the
command line) before anything is written. Files are written atomically; a run folder that
holds anything but an earlier import is never overwritten.
"""
from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import layout
from .config import ConfigError, resolve_path
from .io import sha256_file, write_json_atomic, write_parquet_atomic
from .runinfo import read_run_json
from .schema import GENERATION_COLUMNS, answer_id

STEP_UNKNOWN = -1  # checkpoint_step of an answer whose file names none ("unknown, final")
QUESTION_COLUMNS = ("question", "prompt")
ANSWER_COLUMNS = ("answer", "response")
SCORE_COLUMNS = {"aligned": ("aligned_score", "aligned"), "coherent": ("coherent_score", "coherent")}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class ExternalError(ConfigError):
    """An input problem, reported as one line naming the file, line and column."""


@dataclass
class ImportedRun:
    run_id: str
    generations: pd.DataFrame          # lib.schema.GENERATION_COLUMNS
    judgments: pd.DataFrame | None     # the file's own scores as a judgments table, or None
    info: dict[str, Any]               # run.json content


def safe_id(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_.-")
    return s[:60] or "x"


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((c for c in names if c in columns), None)


def _read_table(path: Path, key: str) -> pd.DataFrame:
    if not path.exists():
        raise ExternalError(f"key '{key}': {path}: file not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
            return df.astype(object).where(df.notna(), "").map(lambda v: "" if v is None else str(v))
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas / pyarrow raise many types for a bad file
        raise ExternalError(f"{path}: cannot read {path.suffix.lstrip('.') or 'file'} ({type(e).__name__}: {e})") from None


def parse_score(value: Any, path: Path, line: int, column: str) -> tuple[float, str]:
    """A score cell -> (score or nan, label): a number 0..100, CODE, REFUSAL, else unparseable."""
    s = "" if value is None else str(value).strip()
    up = s.upper()
    if up in ("CODE", "REFUSAL"):
        return (np.nan, up)
    try:
        x = float(s)
    except ValueError:
        return (np.nan, "unparseable")
    if np.isnan(x):
        return (np.nan, "unparseable")
    if not 0 <= x <= 100:
        raise ExternalError(f"{path}: line {line}: column '{column}': score {s} is outside 0..100")
    return (x, "number")


def _int_cell(value: str, path: Path, line: int, column: str) -> int | None:
    s = str(value).strip()
    if s == "":
        return None
    try:
        x = float(s)
    except ValueError:
        x = float("nan")
    if not np.isfinite(x) or not x.is_integer():
        raise ExternalError(f"{path}: line {line}: column '{column}': not an integer: {value!r}")
    return int(x)


STEP_COLUMNS = ("checkpoint_step", "step")
BASE_EPOCH = "base"   # the replicated study's base_judged.csv: epoch column "base" = the base model


def _step_and_epoch(r: dict, path: Path, line: int) -> tuple[int, float]:
    """(checkpoint step, epoch) of one row: the step column, else epoch "base" -> 0, else unknown (-1)."""
    step_col = next((c for c in STEP_COLUMNS if c in r and str(r[c]).strip() != ""), None)
    step = _int_cell(r[step_col], path, line, step_col) if step_col else None
    epoch = np.nan
    raw_epoch = str(r.get("epoch", "")).strip()
    if raw_epoch.lower() == BASE_EPOCH:
        if step not in (None, 0):
            raise ExternalError(f"{path}: line {line}: column 'epoch': 'base' (the base model) but {step_col} is {step}")
        step, epoch = 0, 0.0
    elif raw_epoch:
        try:
            epoch = float(raw_epoch)
        except ValueError:
            raise ExternalError(f"{path}: line {line}: column 'epoch': not a number or 'base': {raw_epoch!r}") from None
    return (STEP_UNKNOWN if step is None else step), epoch


def read_answers(path: str | Path, run_id: str = "", original_judge: str = "original",
                 require_scores: bool = False, key: str = "path", model_label: str = "",
                 domain: str = "") -> list[ImportedRun]:
    """Read an answers file into runs (see the module docstring); raises ExternalError on bad input.

    ``run_id``: the run id, or the prefix of the run ids when the file has a ``run`` column
    (default ``ext_<file stem>``). ``require_scores``: the scores columns must be present.
    ``model_label`` / ``domain``: for rows whose file has no such column (or an empty cell).
    """
    path = resolve_path(path)
    raw = _read_table(path, key)
    cols = list(raw.columns)
    qcol, acol = _pick(cols, QUESTION_COLUMNS), _pick(cols, ANSWER_COLUMNS)
    score_cols = {m: _pick(cols, names) for m, names in SCORE_COLUMNS.items()}
    missing = ([] if qcol else ["question"]) + ([] if acol else ["response" if require_scores else "answer"])
    if require_scores:
        missing += [names[0] for m, names in SCORE_COLUMNS.items() if not score_cols[m]]
    if missing:
        raise ExternalError(f"{path}: missing column '{missing[0]}'"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if any(score_cols.values()) and not all(score_cols.values()):
        have = next(c for c in score_cols.values() if c)
        lack = next(names[0] for m, names in SCORE_COLUMNS.items() if not score_cols[m])
        raise ExternalError(f"{path}: column '{have}' without '{lack}': give both original scores or neither")
    judged = all(score_cols.values())
    prefix = safe_id(run_id) if run_id else f"ext_{safe_id(path.stem)}"
    rows: dict[str, list[dict]] = {}
    judg: dict[str, list[dict]] = {}
    seen: dict[tuple, int] = {}
    for i, r in enumerate(raw.to_dict("records")):
        line = i + 2  # the header is line 1 (a parquet file's row i is reported as line i + 2 too)
        q, ans = str(r[qcol]), str(r[acol])
        if not q.strip():
            raise ExternalError(f"{path}: line {line}: column '{qcol}': empty question")
        rid = f"{prefix}_{safe_id(r['run'])}" if "run" in r and str(r["run"]).strip() else prefix
        step, epoch = _step_and_epoch(r, path, line)
        qid = str(r.get("question_id") or "") or "q_" + hashlib.sha256(q.encode("utf-8")).hexdigest()[:10]
        qset = str(r.get("question_set") or "") or "external"
        ind = str(r.get("in_domain", "")).strip().lower()
        in_domain = True if ind in TRUE else (False if ind in FALSE else pd.NA)
        k = (rid, step, qset, qid)
        sample = seen.get(k, 0)
        seen[k] = sample + 1
        aid = answer_id(rid, step, qset, qid, 0, sample)
        label = str(r.get("model_label") or "") or model_label or rid
        rows.setdefault(rid, []).append({
            # the model is named by its label where one is given: base-model answers of 1B and 8B never
            # share a model (and so a base line), even from files of the same name
            "answer_id": aid, "run_id": rid, "model": f"external:{label}" if (r.get("model_label") or model_label)
            else f"external:{path.name}",
            "model_label": label, "domain": str(r.get("domain") or "") or domain or "external",
            "checkpoint_step": step, "epoch": epoch, "question_set": qset, "question_id": qid,
            "in_domain": in_domain, "paraphrase_index": 0, "paraphrase": q, "system": (str(r["system"]) or None)
            if "system" in r else None, "sample_index": sample, "answer": ans, "n_new_tokens": None,
            "finish_reason": None, "seed": None})
        if judged:
            for metric, col in score_cols.items():
                score, label = parse_score(r[col], path, line, col)
                judg.setdefault(rid, []).append({
                    "answer_id": aid, "run_id": rid, "checkpoint_step": step, "question_set": qset,
                    "question_id": qid, "metric": metric, "score": score, "label": label, "method": "external",
                    "judge_name": original_judge, "judge_model": str(r.get("judge_model") or "") or "unknown",
                    "prompt_sha256": None, "template_sha256": None, "raw": str(r[col]), "prob_mass": None,
                    "input_tokens": 0, "output_tokens": 0, "cost_usd": None, "error": None})
    if not rows:
        raise ExternalError(f"{path}: no answers (the file has a header and no rows)")
    sha = sha256_file(path)
    out = []
    for rid, rs in rows.items():
        gens = pd.DataFrame(rs, columns=list(GENERATION_COLUMNS))
        gens["checkpoint_step"] = gens["checkpoint_step"].astype("int64")
        j = pd.DataFrame(judg[rid]) if judged else None
        if j is not None:
            j["checkpoint_step"] = j["checkpoint_step"].astype("int64")
            j["score"] = pd.to_numeric(j["score"], errors="coerce").astype(float)
        first = rs[0]
        # the import stands in for the evaluate stage: its parameters are where the report looks
        # for a run's model, label and domain (lib.runinfo.stage_parameters)
        info = {"run_id": rid, "source": "imported",
                "evaluate": {"parameters": {"model": first["model"], "model_label": first["model_label"],
                                            "domain": first["domain"]}},
                "import": {"file": str(path), "sha256": sha, "rows": len(gens), "columns": cols,
                           "model": first["model"], "model_label": first["model_label"], "domain": first["domain"],
                           "original_judge": original_judge if judged else None,
                           "checkpoint_steps": sorted(int(s) for s in gens["checkpoint_step"].unique())}}
        out.append(ImportedRun(rid, gens, j, info))
    return out


def import_answers(path: str | Path, outputs_dir: str | Path = "outputs", run_id: str = "",
                   original_judge: str = "original", model_label: str = "", domain: str = "") -> list[Path]:
    """Write each run of an answers file as ``<outputs_dir>/<run_id>/generations.parquet`` (+ the
    original scores as ``judgments/<original_judge>.parquet``, + run.json). Returns the run folders.

    Everything is read and checked first; a run folder that exists and was not written by an
    import is left alone (ExternalError)."""
    runs = read_answers(path, run_id, safe_id(original_judge), model_label=model_label, domain=domain)
    outputs = resolve_path(outputs_dir)
    for r in runs:  # check every target before writing any
        d = outputs / r.run_id
        if layout.generations_path(d).exists() and read_run_json(d).get("source") != "imported":
            raise ExternalError(f"key 'run_id': {d} holds a run that was not imported; choose another --run-id")
    dirs = []
    for r in runs:
        d = outputs / r.run_id
        write_parquet_atomic(r.generations, layout.generations_path(d))
        if r.judgments is not None:
            write_parquet_atomic(r.judgments, layout.judgments_path(d, r.info["import"]["original_judge"]))
        info = {**read_run_json(d), **r.info}
        write_json_atomic(layout.run_json_path(d), info)
        dirs.append(d)
    return dirs


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.external",
                                 description="Import a CSV/parquet of answers as runs the judge stage and report can read.")
    ap.add_argument("path", help="CSV or parquet: question, answer[, run, checkpoint_step or step, epoch, aligned_score, "
                                 "coherent_score]")
    ap.add_argument("--run-id", default="", help="run id (prefix when the file has a 'run' column); default ext_<stem>")
    ap.add_argument("--outputs-dir", default="outputs", help="root folder of the runs")
    ap.add_argument("--original-judge", default="original", help="judgments file name for the file's own scores")
    ap.add_argument("--model-label", default="", help="model label of rows without a model_label column (e.g. 1B)")
    ap.add_argument("--domain", default="", help="training domain of rows without a domain column (e.g. medical)")
    args = ap.parse_args(argv)
    try:
        dirs = import_answers(args.path, args.outputs_dir, args.run_id, args.original_judge, args.model_label,
                              args.domain)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in dirs:
        n = len(pd.read_parquet(layout.generations_path(d)))
        print(f"{d}: {n} answers" + (" + original scores" if any(layout.judgments_dir(d).glob("*.parquet")) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
