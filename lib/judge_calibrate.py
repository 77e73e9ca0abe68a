"""The judge stage's calibration: score the calibration set (:mod:`lib.calibration`) with each judge
of a run, so the report can show every judge's card.

Each item (an answer the project's team wrote to one of the evaluation questions, with the labels a
careful human gives under the set's rubric) is judged for ``aligned`` and ``coherent`` exactly as a
run's answers are: the judge's backend, method and judge prompts (the ``judge_prompts`` file, or the
prompts of the item's question in the run's question sets; an item whose question is not in them gets
the prompt most of the run's questions use), through the judge cache, so a rerun calls nothing twice.
The table, a judgments table plus ``item_id``, ``set_sha256`` and ``set_version``, goes to
``<run>/calibration/<judge>.parquet``.

The judge stage runs it for every judge when ``judge_calibration: true``; by hand::

    python -m lib.judge_calibrate parameters/demo_medical.yaml      # every judge of the file's panel
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

from . import calibration, judge, judge_backends, layout, questions
from .config import ConfigError, RunConfig, expand_seeds, load_run_config
from .costs import Budget
from .io import write_parquet_atomic
from .scoring import Job, JudgeError, Verdict

METRICS = ("aligned", "coherent")


def prompt_book(cfg: RunConfig) -> judge.PromptBook:
    """(question set, question id, metric) -> template for the calibration items (question set
    ``calibration``): see the module docstring."""
    if cfg.judge_prompts:
        return judge.prompt_book(cfg)[0]
    try:
        qs = questions.load_question_sets(list(cfg.question_sets), cfg.outputs_dir)
    except questions.QuestionError as e:
        raise JudgeError(str(e)) from None
    by_id = {q.id: q.judge_prompts for q in qs}
    common = {m: Counter(q.judge_prompts[m] for q in qs if m in q.judge_prompts).most_common(1) for m in METRICS}
    fallback = {m: c[0][0] for m, c in common.items() if c}
    return lambda qset, qid, metric: by_id.get(qid, {}).get(metric) or fallback.get(metric)


def calibration_path(cfg: RunConfig) -> Path:
    return layout.calibration_dir(cfg.run_dir) / f"{judge.judge_name(cfg)}.parquet"


def score(cfg: RunConfig, path: str | Path = calibration.DEFAULT_SET, progress: bool = False) -> pd.DataFrame:
    """Score every calibration item with ``cfg``'s judge (cached), write and return the table."""
    items, meta = calibration.load_set(path)           # a malformed set stops here, before any call
    api_key = judge.check_credentials(cfg)
    gens = calibration.as_generations(items)
    backend = judge_backends.make_backend(cfg, api_key, judge.cache_path(cfg))
    rows, jobs, _ = judge.build_rows(gens, list(METRICS), prompt_book(cfg), backend.identity())
    cache = judge.JudgeCache(judge.cache_path(cfg))
    done = cache.get_many(jobs)
    new: dict[str, Verdict] = {}
    name = judge.judge_name(cfg)

    def sink(job: Job, v: Verdict) -> None:
        new[job.key] = v
        if v.label != "error":  # as in the judge stage: errors are retried by the next run
            cache.put(job.key, name, job.prompt_sha256, v)

    try:
        todo = [j for k, j in jobs.items() if k not in done]
        if todo:
            backend.run(todo, sink, Budget(cfg.judge_budget_usd), progress)
    finally:
        cache.close()
    table = judge.assemble(rows, {**done, **new}, cfg)
    table["item_id"] = table["answer_id"].map(gens.set_index("answer_id")["item_id"])
    table["set_sha256"], table["set_version"] = meta["sha256"], str(meta["version"])
    write_parquet_atomic(table, calibration_path(cfg))
    return table


def score_panel(cfg: RunConfig, path: str | Path = calibration.DEFAULT_SET,
                progress: bool = False) -> dict[str, pd.DataFrame]:
    """:func:`score` for every judge of the run (:func:`lib.judge.panel`): judge name -> table."""
    calibration.load_set(path)  # one line for a malformed set before any judge loads
    return {judge.judge_name(m): score(m, path, progress) for m in judge.panel(cfg)}


def cards(cfg: RunConfig, tables: dict[str, pd.DataFrame], path: str | Path = calibration.DEFAULT_SET) -> pd.DataFrame:
    """One card row per judge (:data:`lib.calibration.CARD_COLUMNS`)."""
    items, _ = calibration.load_set(path)
    return pd.DataFrame([calibration.card(items, t, n) for n, t in tables.items()], columns=calibration.CARD_COLUMNS)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.judge_calibrate",
                                 description="Score the judge calibration set with every judge of each parameters "
                                             "file (writes <run>/calibration/<judge>.parquet; the report shows the "
                                             "judge cards).")
    ap.add_argument("params", nargs="+", help="parameters YAML files (their judge_* and judges: keys)")
    ap.add_argument("--set", default=str(calibration.DEFAULT_SET), help="calibration set YAML (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        runs = [r for p in args.params for r in expand_seeds(load_run_config(p), p)]
        for cfg in runs:
            tables = score_panel(cfg, args.set, progress=True)
            print(f"{cfg.run_id}: calibration scores in {layout.calibration_dir(cfg.run_dir)}")
            print(cards(cfg, tables, args.set).to_string(index=False, float_format=lambda x: f"{x:.2f}"))
        print(calibration.LABELS_NOTE)
    except (ConfigError, JudgeError, calibration.CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
