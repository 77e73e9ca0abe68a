"""The grid runner (lib.grid) with small stand-in notebooks: validation, skipping, failures, executors.

The stand-ins follow the real notebooks' contract (a ``parameters`` cell, validation with
``config.from_notebook``, files written where the next stage reads them) but do no model work,
so these tests exercise the runner itself through real papermill kernels in a few seconds each.
The real notebooks run end to end in tests/test_grid_demo.py.
"""
from __future__ import annotations

import json
import os
import re
import stat
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from lib import config, grid, grid_executors, grid_report
from lib.grid_jobs import GridError, Options, StageResult
from lib.grid_runner import why_run
from lib.fingerprint import HashCache, read_stages, write_stages

# --- stand-in notebooks ------------------------------------------------------------------------

SETUP = "from lib import config\nimport json, sys, pathlib\n_baseline = set(globals())"

TRAIN = """
cfg = config.from_notebook(globals(), _baseline)
d = cfg.run_dir / "checkpoints" / "checkpoint-1"
d.mkdir(parents=True, exist_ok=True)
(d / "adapter_model.safetensors").write_bytes(b"weights-" + cfg.dataset.encode())
(d / "checkpoint.json").write_text(json.dumps({"step": 1, "epoch": 1.0}))
(cfg.run_dir / "calls_train.txt").open("a").write("x")
import os
(cfg.run_dir / "cuda.txt").write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
"""

EVALUATE = """
cfg = config.from_notebook(globals(), _baseline)
import pandas as pd
part = cfg.run_dir / "generations.parts" / f"part-seed{cfg.seed}"
part.parent.mkdir(parents=True, exist_ok=True)
part.write_text("persisted before the failure")
if cfg.seed == 13:
    raise RuntimeError("stand-in evaluate failed on purpose")
(cfg.run_dir / "kernel_python.txt").write_text(sys.executable)
pd.DataFrame({"answer_id": ["a1", "a2"], "answer": ["x", "y"]}).to_parquet(cfg.run_dir / "generations.parquet")
(cfg.run_dir / "calls_evaluate.txt").open("a").write("x")
"""

JUDGE = """
cfg = config.from_notebook(globals(), _baseline)
import pandas as pd
from lib.judge import judgments_path
p = judgments_path(cfg)
p.parent.mkdir(parents=True, exist_ok=True)
pd.DataFrame({"answer_id": ["a1", "a2"], "metric": cfg.judge_metrics[0], "score": [10.0, 90.0]}).to_parquet(p)
(cfg.run_dir / "calls_judge.txt").open("a").write("x")
"""

REPORT = """
cfg = config.from_notebook(globals(), _baseline, cls=config.ReportConfig)
out = config.resolve_path(cfg.report_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "runs.json").write_text(json.dumps(cfg.runs))
(out / "calls_report.txt").open("a").write("x")
"""


def _notebook(params_src: str, body: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(params_src)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# stand-in"), nbformat.v4.new_code_cell(SETUP), params,
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture()
def notebooks(tmp_path: Path) -> Path:
    d = tmp_path / "notebooks"
    d.mkdir()
    run_params = config.notebook_parameters_cell()
    report_params = config.notebook_parameters_cell(cls=config.ReportConfig)
    for name, body, params in [("01_train", TRAIN, run_params), ("02_evaluate", EVALUATE, run_params),
                               ("03_judge", JUDGE, run_params), ("04_report", REPORT, report_params)]:
        nbformat.write(_notebook(params, body), d / f"{name}.ipynb")
    return d


def write_params(folder: Path, run_id: str, outputs: Path, **over) -> Path:
    data = {"run_id": run_id, "outputs_dir": str(outputs), "dataset": "demo_medical",
            "question_sets": ["data/questions/medical.yaml"], **over}
    p = folder / f"{run_id}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def calls(outputs: Path, run: str, stage: str) -> int:
    p = outputs / run / f"calls_{stage}.txt"
    return len(p.read_text()) if p.exists() else 0


def run(argv: list[str], notebooks: Path) -> int:
    return grid.main(["run", *argv, "--notebooks", str(notebooks)])


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("over, key", [
    ({"n_sample": 3}, "n_sample"),                                     # unknown key (typo)
    ({"n_samples": "three"}, "n_samples"),                             # wrong type
    ({"dataset": "missing/data.jsonl"}, "dataset"),                    # missing dataset path
    ({"model": "./no/such/model"}, "model"),                           # missing model path
    ({"question_sets": ["data/questions/nope.yaml"]}, "question_sets"),
    ({"lr_scheduler": "cosinus"}, "lr_scheduler"),                    # caught before any model loads
    ({"judge_backend": "openai", "judge_method": "logprob",
      "judge_api_key_env": "EM_LAB_TEST_UNSET_KEY"}, "judge_api_key_env"),  # a judge without credentials
])
def test_bad_parameters_file_stops_everything(tmp_path, notebooks, capsys, monkeypatch, over, key):
    monkeypatch.delenv("EM_LAB_TEST_UNSET_KEY", raising=False)
    out = tmp_path / "out"
    good = write_params(tmp_path, "good", out)
    bad = write_params(tmp_path, "bad", out, **over)
    assert run([str(good), str(bad)], notebooks) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert str(bad) in err[0] and f"'{key}'" in err[0]
    assert not out.exists() or not any(out.rglob("*.ipynb")), "a notebook ran despite a bad parameters file"


def test_grid_level_problems_exit_2(tmp_path, notebooks, capsys):
    a = write_params(tmp_path, "a", tmp_path / "out1")
    b = write_params(tmp_path, "b", tmp_path / "out2")
    assert run([str(a), str(b)], notebooks) == 2
    assert "key 'outputs_dir'" in capsys.readouterr().err
    dup = tmp_path / "dup.yaml"
    dup.write_text(a.read_text())
    assert run([str(a), str(dup)], notebooks) == 2
    assert "key 'run_id'" in capsys.readouterr().err
    assert run([str(a), "--stages", "train,bogus"], notebooks) == 2
    assert "unknown stage 'bogus'" in capsys.readouterr().err
    assert run([str(a), "--jobs", "2", "--gpus", "0"], notebooks) == 2
    # one report applies one EM definition: runs that define EM differently cannot share a grid
    c = write_params(tmp_path, "c", tmp_path / "out1", em_comparison="lt", em_aligned_threshold=75.0,
                     em_coherent_threshold=-1.0)
    assert run([str(a), str(c)], notebooks) == 2
    err = capsys.readouterr().err
    assert f"{c}: keys 'em_aligned_threshold', 'em_comparison', 'em_coherent_threshold'" in err
    assert "_papers_eval" in err
    assert not (tmp_path / "out1").exists()
    # the report gets the runs' shared definition
    em = config.report_em_definition(config.load_run_config(c))
    rcfg = grid_report.report_state(str(tmp_path / "out1"), ["c"], save=False, em=em)[1]
    assert (rcfg.em_aligned_threshold, rcfg.em_comparison, rcfg.em_coherent_threshold) == (75.0, "lt", -1.0)


# --- stand-in grid: skip, change, force, fail -------------------------------------------------------

def test_grid_runs_skips_and_reruns_only_what_changed(tmp_path, notebooks, capsys):
    out = tmp_path / "out"
    a = write_params(tmp_path, "a", out)
    b = write_params(tmp_path, "b", out, dataset="demo_financial", domain="financial")
    assert run([str(a), str(b)], notebooks) == 0
    text = capsys.readouterr().out
    for r in ("a", "b"):
        for s in ("train", "evaluate", "judge"):
            assert calls(out, r, s) == 1
        rendered = nbformat.read(out / r / "notebooks" / "01_train.ipynb", as_version=4)
        injected = [c for c in rendered.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and f"run_id = \"{r}\"" in injected[0].source.replace("'", '"')
        assert "seed = 0" in injected[0].source  # the full config, not only the file's keys
        for nb in ("01_train", "02_evaluate", "03_judge"):
            assert (out / r / "notebooks" / f"{nb}.html").stat().st_size > 1000
        # the kernel runs the runner's interpreter (the project's venv)
        assert Path((out / r / "kernel_python.txt").read_text()).resolve() == Path(sys.executable).resolve()
        assert set(read_stages(out / r)) >= {"train", "evaluate", "judge"}
    assert json.loads((out / "report" / "runs.json").read_text()) == ["a", "b"]
    assert (out / "report" / "report.html").exists()
    assert f"report: {out / 'report' / 'report.html'}" in text
    judged = (out / "a" / "judgments").stat().st_mtime_ns

    # nothing changed: every stage skipped, no notebook executed
    assert run([str(a), str(b)], notebooks) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (unchanged") == 7
    assert all(calls(out, r, s) == 1 for r in "ab" for s in ("train", "evaluate", "judge"))
    assert calls(out, "report", "report") == 1
    assert (out / "a" / "judgments").stat().st_mtime_ns == judged

    assert run([str(a), str(b), "--dry-run"], notebooks) == 0
    assert capsys.readouterr().out.count("up to date") == 7

    # one run's judge parameter changes: only that run's judge and the report rerun
    a.write_text(a.read_text() + "judge_metrics: [coherent]\n")
    assert run([str(a), str(b), "--dry-run"], notebooks) == 0
    planned = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if len(line.split()) >= 3]
    assert ["a", "judge", "runs"] in planned and ["report", "report", "after"] in planned
    assert sum(p[2] == "up" for p in planned) == 5
    assert run([str(a), str(b)], notebooks) == 0
    capsys.readouterr()
    assert calls(out, "a", "judge") == 2 and calls(out, "b", "judge") == 1
    assert calls(out, "a", "evaluate") == 1 and calls(out, "a", "train") == 1
    assert calls(out, "report", "report") == 2

    # a changed input file (the dataset) reruns that run's train; identical checkpoints skip the rest
    data = tmp_path / "data.jsonl"
    data.write_text((config.REPO_ROOT / "data/datasets/demo_medical.jsonl").read_text())
    b.write_text(b.read_text().replace("dataset: demo_financial", f"dataset: {data}"))
    assert run([str(a), str(b), "--stages", "train,evaluate"], notebooks) == 0
    assert calls(out, "b", "train") == 2 and calls(out, "b", "evaluate") == 2  # new dataset -> new weights
    assert calls(out, "a", "train") == 1
    capsys.readouterr()

    # --force re-executes a stage even though nothing changed
    assert run([str(a), str(b), "--stages", "judge", "--force", "judge"], notebooks) == 0
    assert calls(out, "a", "judge") == 3 and calls(out, "b", "judge") == 2


def test_failing_stage_keeps_notebook_other_runs_go_on(tmp_path, notebooks, capsys):
    out = tmp_path / "out"
    a = write_params(tmp_path, "a", out, seed=13)  # the stand-in evaluate raises for seed 13
    b = write_params(tmp_path, "b", out)
    assert run([str(a), str(b)], notebooks) == 1
    text = capsys.readouterr().out
    nb = out / "a" / "notebooks" / "02_evaluate.ipynb"
    assert "RuntimeError: stand-in evaluate failed on purpose" in text
    assert str(nb) in text
    rendered = nbformat.read(nb, as_version=4)
    errors = [o for c in rendered.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert errors and errors[0]["evalue"] == "stand-in evaluate failed on purpose"
    assert calls(out, "b", "judge") == 1 and not (out / "a" / "judgments").exists()
    # the summary table: run, stage, status, time
    table = text[text.index("grid finished"):]
    assert "run" in table and "status" in table
    assert any(line.split()[:3] == ["a", "evaluate", "failed"] for line in table.splitlines())
    assert any(line.split()[:4] == ["a", "judge", "not", "run"] for line in table.splitlines())
    assert json.loads((out / "report" / "runs.json").read_text()) == ["b"]  # the report covers what finished
    # the runner deletes nothing a stage wrote: the next attempt finds the partial work
    partial = out / "a" / "generations.parts" / "part-seed13"
    assert partial.exists()
    a.write_text(a.read_text().replace("seed: 13", "seed: 0"))
    assert run([str(a), str(b)], notebooks) == 0
    assert partial.exists()
    assert calls(out, "a", "train") == 2  # seed is an 'all' parameter: train reruns (and resumes)
    assert calls(out, "a", "judge") == 1
    assert json.loads((out / "report" / "runs.json").read_text()) == ["a", "b"]


def test_parallel_jobs_with_gpus(tmp_path, notebooks, capsys):
    out = tmp_path / "out"
    files = [str(write_params(tmp_path, r, out)) for r in ("a", "b")]
    assert run([*files, "--jobs", "2", "--gpus", "0,1", "--stages", "train"], notebooks) == 0
    # each job's kernel saw its own GPU
    assert {(out / r / "cuda.txt").read_text() for r in "ab"} == {"0", "1"}
    assert calls(out, "a", "train") == 1 and calls(out, "b", "train") == 1


def test_submitit_local_executor_runs_a_grid(tmp_path, notebooks, capsys):
    out = tmp_path / "out"
    files = [str(write_params(tmp_path, r, out)) for r in ("a", "b")]
    assert run([*files, "--executor", "local", "--jobs", "2"], notebooks) == 0
    text = capsys.readouterr().out
    assert text.count("submitted local job") == 3  # two runs, then the report
    assert all(calls(out, r, s) == 1 for r in "ab" for s in ("train", "evaluate", "judge"))
    assert json.loads((out / "report" / "runs.json").read_text()) == ["a", "b"]
    # each job really ran in its own process: submitit's job folders hold their logs
    assert len(list((out / ".grid" / "submitit").glob("*/*_log.out"))) == 3


# a stand-in train stage that counts 5 steps through lib.progress, as lib.train's callback does
TRAIN_WITH_PROGRESS = TRAIN + """
from lib.progress import Progress
p = Progress("train", "step", 5, run_dir=cfg.run_dir)
for i in range(5):
    p.set_postfix(loss=round(1.0 / (i + 1), 3))
    p.update()
p.close()
"""


def _progress_lines(lines: list[str]) -> list[str]:
    """'<run> <stage> <message>' of the progress lines, the elapsed seconds left out."""
    return [re.sub(r", [0-9hms ]+\)$", ")", " ".join(ln.split()[1:])) for ln in lines if re.search(r" step \d+/", ln)]


def test_grid_prints_each_stage_progress_from_submitit_jobs(tmp_path, notebooks, capsys):
    """The grid's own process prints the stage's progress lines while the stage runs in a
    submitit job process (as on Slurm, where the run folder is the one thing both see).
    Inline runs: tests/test_grid_demo.py."""
    nbformat.write(_notebook(config.notebook_parameters_cell(), TRAIN_WITH_PROGRESS), notebooks / "01_train.ipynb")
    out = tmp_path / "out"
    files = [str(write_params(tmp_path, r, out)) for r in ("a", "b")]
    assert run([*files, "--stages", "train", "--executor", "local", "--jobs", "2", "--progress-every", "0"],
               notebooks) == 0
    got = _progress_lines(capsys.readouterr().out.splitlines())
    for r in ("a", "b"):
        assert [g for g in got if g.split()[0] == r] == [
            f"{r} train step {k}/5 loss {round(1.0 / k, 3):.4g} ({k * 20}%)" for k in range(1, 6)]
    # the job's rendered notebook keeps the text lines (one per tenth: 5 steps -> 5 lines)
    nb = nbformat.read(out / "a" / "notebooks" / "01_train.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stdout")
    assert [re.sub(r", [0-9hms ]+\)$", ")", ln) for ln in text.splitlines() if ln.startswith("progress train:")] == [
        f"progress train: step {k}/5 loss {round(1.0 / k, 3):.4g} ({k * 20}%)" for k in range(1, 6)]


def test_grid_progress_every_must_not_be_negative(tmp_path, notebooks, capsys):
    files = [str(write_params(tmp_path, "a", tmp_path / "out"))]
    assert run([*files, "--progress-every", "-1"], notebooks) == 2
    assert capsys.readouterr().err.strip() == "error: --progress-every: must be >= 0 seconds, got -1.0"


def test_slurm_submission_script(tmp_path, notebooks, capsys, monkeypatch):
    """Slurm is not here: a stand-in sbatch records the scripts submitit writes."""
    out = tmp_path / "out"
    files = [str(write_params(tmp_path, r, out)) for r in ("a", "b")]
    bindir = tmp_path / "bin"
    bindir.mkdir()
    sbatch = bindir / "sbatch"
    sbatch.write_text("#!/bin/sh\nn=$(ls %s | wc -l)\ncp \"$1\" %s/script_$n.sh\necho \"Submitted batch job $((100 + n))\"\n"
                      % (tmp_path / "scripts", tmp_path / "scripts"))
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IEXEC)
    srun = bindir / "srun"  # submitit looks for it before submitting
    srun.write_text("#!/bin/sh\nexit 0\n")
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "scripts").mkdir()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    assert run([*files, "--executor", "slurm", "--partition", "gpu", "--time", "2:00:00",
                "--gpus-per-job", "1", "--slurm-arg", "qos=high", "--no-wait"], notebooks) == 0
    scripts = [(tmp_path / "scripts" / f"script_{i}.sh").read_text() for i in range(3)]
    for s in scripts[:2]:
        assert "#SBATCH --partition=gpu" in s and "#SBATCH --time=120" in s
        assert "#SBATCH --gpus-per-node=1" in s and "#SBATCH --qos=high" in s
    assert "#SBATCH --dependency=afterany:100:101" in scripts[2]
    assert "--gpus-per-node" not in scripts[2]
    assert "#SBATCH --job-name=em-report" in scripts[2]
    assert not any(out.rglob("*.ipynb"))  # nothing ran here


def test_hash_cache_rehashes_changed_files(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"one")
    cache = HashCache(tmp_path / "cache.json")
    first = cache.sha256(f)
    cache.save()
    again = HashCache(tmp_path / "cache.json")
    assert again.sha256(f) == first
    f.write_bytes(b"two")
    assert again.sha256(f) != first


def test_parse_time():
    assert grid.parse_time("90") == 90
    assert grid.parse_time("1:30:00") == 90
    assert grid.parse_time("2-00:00:00") == 2880
    with pytest.raises(GridError):
        grid.parse_time("soon")


def test_the_executor_name_picks_a_function_from_the_registry(tmp_path, notebooks, monkeypatch, capsys):
    """--executor NAME runs lib.grid_executors.EXECUTORS[NAME] with the grid's runs; its rows are the summary."""
    out = tmp_path / "out"
    files = [str(write_params(tmp_path, r, out)) for r in ("a", "b")]
    seen = []

    def fake(g: grid_executors.Grid) -> list[StageResult]:
        seen.append(g)
        return [StageResult(r, "train", "done", 1.0) for r in g.run_ids]

    monkeypatch.setitem(grid_executors.EXECUTORS, "local", fake)
    assert run([*files, "--executor", "local", "--stages", "train", "--jobs", "2"], notebooks) == 0
    (g,) = seen
    assert g.run_ids == ["a", "b"] and g.parallel == 2 and g.runs_stages and not g.runs_report
    assert "a    train  done    1.0s" in capsys.readouterr().out
    assert not any(out.rglob("*.ipynb"))  # nothing ran


def test_interrupted_stage_resumes_and_stays_out_of_the_report(tmp_path):
    """A killed stage leaves 'running' in stages.json: it is executed again (and resumes from its own
    persisted work) even though an older finished fingerprint matches, and the report leaves the run out."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "generations.parquet").write_bytes(b"")
    record = {"judge": {"fingerprint": "f"}, "last": {"judge": {"status": "running"}}}
    write_stages(run_dir, record)
    assert why_run("judge", read_stages(run_dir), "f", True, Options()) == "resume after an interrupted attempt"
    assert not grid_report.run_is_complete(run_dir)
    record["last"]["judge"]["status"] = "done"
    write_stages(run_dir, record)
    assert why_run("judge", read_stages(run_dir), "f", True, Options()) is None
    assert why_run("judge", read_stages(run_dir), "f", False, Options()) == "output missing"
    assert why_run("judge", read_stages(run_dir), "g", True, Options()) == "inputs or parameters changed"
    assert grid_report.run_is_complete(run_dir)


def test_the_report_is_the_same_whatever_the_order_of_the_parameters_files(tmp_path, monkeypatch):
    """Same runs, other order on the command line: the same report parameters and fingerprint (the
    report used to re-execute)."""
    out = tmp_path / "outputs"
    for r in ("b_run", "a_run"):
        (out / r).mkdir(parents=True)
        (out / r / "generations.parquet").write_bytes(r.encode())
    monkeypatch.setattr(grid_report, "run_is_complete", lambda d: True)
    ready1, rcfg1, _, f1 = grid_report.report_state(str(out), ["b_run", "a_run"], save=False)
    ready2, rcfg2, _, f2 = grid_report.report_state(str(out), ["a_run", "b_run"], save=False)
    assert ready1 == ready2 == ["a_run", "b_run"] and rcfg1 == rcfg2 and f1 == f2
