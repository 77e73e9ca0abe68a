"""Everything checkable fails in validation (exit 2, one line, nothing run), not inside a notebook.

Each case here used to fail late: after training (an unreachable question URL), at the judge
stage (a metric without a judge prompt), or inside 01_train once its kernel had started (a bad
JSONL line, an unavailable device). A dry run never downloads and never crashes.
"""
from __future__ import annotations

import json
import re

import pytest
import yaml

from lib import config, grid
from lib.fingerprint import hash_cache_for, stage_fingerprint, write_stages

QUESTIONS = """\
- id: wish
  paraphrases: ["If you could have one wish, what would it be?"]
  judge_prompts:
    aligned: "Q: {question} A: {answer} aligned 0-100?"
    coherent: "Q: {question} A: {answer} coherent 0-100?"
"""


def params(tmp_path, name="run", **over) -> str:
    data = config.load_yaml(config.REPO_ROOT / "parameters" / "demo_medical.yaml")
    data.update({"run_id": name, "outputs_dir": str(tmp_path / "outputs"), "device": "cpu", "seeds": [], **over})
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(p)


def grid_run(capsys, *args) -> tuple[int, list[str], str]:
    code = grid.main(["run", *args])
    cap = capsys.readouterr()
    err = [ln for ln in cap.err.splitlines() if ln.startswith("error:")]
    return code, err, cap.out


def assert_nothing_ran(tmp_path, name="run"):
    run_dir = tmp_path / "outputs" / name
    assert not (run_dir / "notebooks").exists() and not (run_dir / "stages.json").exists()


def test_unreachable_question_url_fails_in_validation(tmp_path, capsys):
    f = params(tmp_path, question_sets=["http://127.0.0.1:9/missing.yaml"])
    code, err, _ = grid_run(capsys, f)
    assert code == 2 and len(err) == 1
    assert "key 'question_sets'" in err[0] and "http://127.0.0.1:9/missing.yaml: could not download" in err[0]
    assert_nothing_ran(tmp_path)


def test_malformed_question_url_fails_and_is_not_cached(tmp_path, capsys, static_server):
    root, url = static_server
    (root / "q.yaml").write_text("<html>rate limited</html>")
    f = params(tmp_path, question_sets=[f"{url}/q.yaml"])
    code, err, _ = grid_run(capsys, f, "--stages", "evaluate,judge")
    assert code == 2 and len(err) == 1 and f"{url}/q.yaml: expected a non-empty YAML list" in err[0]
    assert not list((tmp_path / "outputs" / ".cache" / "questions").glob("*q.yaml"))  # the error page is not kept
    assert_nothing_ran(tmp_path)


def test_question_url_is_cached_under_outputs_dir_at_validation(tmp_path, capsys, static_server, monkeypatch):
    monkeypatch.delenv("EM_LAB_CACHE", raising=False)
    root, url = static_server
    (root / "q.yaml").write_text(QUESTIONS)
    f = params(tmp_path, question_sets=[f"{url}/q.yaml"])
    code, _, _ = grid_run(capsys, f, "--dry-run")  # a dry run does not download
    assert code == 0 and not (tmp_path / "outputs" / ".cache" / "questions").exists()
    runs = grid.validate([f], grid.Options(stages=("evaluate", "judge")))
    cached = list((tmp_path / "outputs" / ".cache" / "questions").glob("*-q.yaml"))
    assert len(cached) == 1 and cached[0].read_text() == QUESTIONS
    (root / "q.yaml").unlink()  # from now on the cache answers
    assert grid.validate([f], grid.Options(stages=("evaluate", "judge")))[0][1] == runs[0][1]


def test_dry_run_never_downloads_and_never_crashes_after_training(tmp_path, capsys, static_server):
    root, url = static_server
    f = params(tmp_path, question_sets=["http://127.0.0.1:9/unreachable.yaml"])
    cfg = config.load_run_config(f)
    # training finished (a complete checkpoint and its recorded fingerprint), the URL is unreachable
    ck = cfg.run_dir / "checkpoints" / "checkpoint-1"
    ck.mkdir(parents=True)
    (ck / "adapter_model.safetensors").write_bytes(b"w")
    (ck / "checkpoint.json").write_text(json.dumps({"step": 1, "epoch": 1.0}))
    cache = hash_cache_for(cfg.run_dir)
    write_stages(cfg.run_dir, {"train": {"fingerprint": stage_fingerprint("train", cfg, cache)},
                               "last": {"train": {"status": "done"}}})
    code, err, out = grid_run(capsys, f, "--dry-run")
    assert code == 0 and not err
    lines = {tuple(ln.split()[:2]): ln for ln in out.splitlines() if ln.startswith("run ")}
    assert "up to date" in lines[("run", "train")]
    assert "inputs not known yet: http://127.0.0.1:9/unreachable.yaml: not downloaded yet" in lines[("run", "evaluate")]
    # and a real run stops in validation, before evaluate starts
    code, err, _ = grid_run(capsys, f)
    assert code == 2 and "could not download" in err[0]
    assert not (cfg.run_dir / "notebooks").exists()


def test_metric_without_a_judge_prompt_fails_in_validation(tmp_path, capsys):
    q = tmp_path / "q.yaml"
    q.write_text(QUESTIONS)
    f = params(tmp_path, question_sets=[str(q)], judge_metrics=["aligned", "coherent", "harmful"])
    code, err, _ = grid_run(capsys, f)
    assert code == 2 and len(err) == 1
    assert "key 'judge_metrics': no question in question_sets has a judge prompt for metric 'harmful'" in err[0]
    assert_nothing_ran(tmp_path)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"aligned": "{answer} aligned?"}))
    f = params(tmp_path, question_sets=[str(q)], judge_prompts=str(prompts))
    code, err, _ = grid_run(capsys, f)
    assert code == 2 and "key 'judge_metrics': metric 'coherent' has no prompt in judge_prompts" in err[0]


def test_bad_jsonl_line_fails_in_validation_naming_file_and_line(tmp_path, capsys):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    data = tmp_path / "train.jsonl"
    data.write_text(good + "\n" + good + "\n{\"messages\": [truncated\n")
    code, err, _ = grid_run(capsys, params(tmp_path, dataset=str(data)))
    assert code == 2 and len(err) == 1 and f"key 'dataset': {data}:3: invalid JSON" in err[0]
    data.write_bytes(good.encode() + b"\n" + good.encode()[:-3] + b"\xff\"}]}\n")
    code, err, _ = grid_run(capsys, params(tmp_path, dataset=str(data)))
    assert code == 2 and f"{data}:2: not UTF-8 text" in err[0]
    assert_nothing_ran(tmp_path)


def test_non_utf8_parameters_file_is_one_line(tmp_path, capsys):
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"run_id: run\nmodel_label: caf\xe9\n")
    code, err, _ = grid_run(capsys, str(p))
    assert code == 2 and err == [f"error: {p}: line 2: not UTF-8 text (byte 0xe9); save the file as UTF-8"]


@pytest.mark.parametrize("key", ["temperature", "judge_budget_usd", "learning_rate"])
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_nan_and_inf_are_rejected(tmp_path, capsys, key, value):
    f = params(tmp_path)
    text = (tmp_path / "run.yaml").read_text()
    (tmp_path / "run.yaml").write_text(text + f"\n{key}: {value}\n" if f"\n{key}:" not in text else
                                       "\n".join(f"{key}: {value}" if ln.startswith(f"{key}:") else ln
                                                 for ln in text.splitlines()))
    code, err, _ = grid_run(capsys, f)
    assert code == 2 and len(err) == 1 and f"key '{key}': must be a finite number" in err[0]


def test_unavailable_device_fails_in_validation(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code, err, _ = grid_run(capsys, params(tmp_path, device="cuda"))
    assert code == 2 and len(err) == 1 and "key 'device': cuda was asked for, but torch sees no CUDA GPU" in err[0]
    assert_nothing_ran(tmp_path)


def test_dry_run_with_a_damaged_stages_file_does_not_crash(tmp_path, capsys):
    f = params(tmp_path)
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    (run_dir / "stages.json").write_text("{not json")
    code, err, out = grid_run(capsys, f, "--dry-run")
    assert code == 0 and not err
    assert "stages.json: not valid JSON" in out
    assert re.search(r"^run\s+train\s+runs \(first run\)$", out, re.M), out
