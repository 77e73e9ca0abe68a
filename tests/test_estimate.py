"""lib.estimate and --dry-run: steps, answers, judge calls and dollars before anything runs."""
from __future__ import annotations

import math

import pytest
import yaml

from lib import costs, grid
from lib.config import RunConfig, load_run_config, REPO_ROOT
from lib.estimate import estimate_run, total_line
from lib.questions import load_question_set

QUESTIONS = """\
- id: q1
  type: free_form_judge_0_100
  paraphrases: ["Q?"]
  judge_prompts:
    aligned: "{question} {answer} aligned? 0-100 ......................................"
    coherent: "{question} {answer} coherent?"
"""


def test_demo_run_counts_by_hand():
    cfg = load_run_config(REPO_ROOT / "parameters" / "demo_medical.yaml").replace(seeds=[])
    e = estimate_run(cfg)
    # 36 demo chats, batch 4 x accum 1 -> 9 steps per epoch, 3 epochs; k=2 in epoch 1: steps 4, 9, then 18, 27
    assert (e.n_examples, e.train_steps, e.n_checkpoints) == (36, 27, 4)
    per_model = sum(len(q.paraphrases) * cfg.n_samples for s in cfg.question_sets for q in load_question_set(s))
    assert e.answers == per_model * 5 and e.judge_calls == e.answers * 2
    assert e.usd == 0.0 and "$0 (in-process judge)" in e.line()


def test_api_judge_dollars_follow_the_price_table(tmp_path):
    qfile = tmp_path / "q.yaml"
    qfile.write_text(QUESTIONS)
    cfg = RunConfig(run_id="r", question_sets=[str(qfile)], n_samples=2, max_new_tokens=13, judge_backend="openai",
                    judge_model="gpt-4o-mini-2024-07-18", judge_method="logprob", judge_min_mass=0.25,
                    max_train_examples=8, epochs=1, checkpoints_in_first_epoch=2)
    e = estimate_run(cfg)
    models = e.n_checkpoints + 1
    assert e.answers == 2 * models and e.judge_calls == 4 * models
    answer_chars = int(13 / 1.3 * 6)
    tokens = sum(math.ceil((len(t) + len("Q?") + answer_chars) / 4) + 7 for t in (
        "{question} {answer} aligned? 0-100 ......................................", "{question} {answer} coherent?"))
    in_tokens = tokens * 2 * models
    assert e.usd == pytest.approx((in_tokens * 0.15 + e.judge_calls * 1 * 0.60) / 1e6)
    assert e.usd_batch == pytest.approx(e.usd / 2)
    unknown = estimate_run(cfg.replace(judge_model="my-local-model"))
    assert unknown.usd is None and "no price" in unknown.note
    assert "cost unknown" in total_line([e, unknown]) and "Batch API" in total_line([e])


def test_unknown_dataset_and_uncached_url_are_question_marks(tmp_path):
    cfg = RunConfig(run_id="r", question_sets=["https://example.invalid/q.yaml"], outputs_dir=str(tmp_path))
    e = estimate_run(cfg)
    assert e.answers is None and e.judge_calls is None and "not in the cache" in e.note
    assert "? answers" in e.line()


def test_dry_run_prints_judge_calls_and_cost(tmp_path, capsys, tiny_model_dir):
    files = []
    for name in ("demo_medical", "demo_medical_control"):
        data = yaml.safe_load((REPO_ROOT / "parameters" / f"{name}.yaml").read_text())
        data.update(outputs_dir=str(tmp_path / "out"), device="cpu")
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(data))
        files.append(str(p))
    assert grid.main(["run", "--dry-run", *files]) == 0
    out = capsys.readouterr().out
    runs = [RunConfig(**{**yaml.safe_load(open(f)), "seeds": []}) for f in files]
    e = estimate_run(runs[1])
    lines = [l for l in out.splitlines() if "judge calls" in l]
    # two seeds of demo_medical and its control, then the total
    assert len(lines) == 4 and lines[-1].startswith("grid total: 3 runs")
    assert f"{e.judge_calls:,} judge calls, $0 (in-process judge)" in lines[2]
    assert f"{3 * e.judge_calls:,} judge calls" in lines[-1]
