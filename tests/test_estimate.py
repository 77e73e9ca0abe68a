"""lib.estimate and --dry-run: steps, answers, judge calls and dollars before anything runs."""
from __future__ import annotations

import json
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
    times = [l for l in out.splitlines() if l.split()[:1] == ["time"]]
    assert len(times) == 3 and all("train " in l and "evaluate " in l and "judge " in l and "[rates: " in l
                                   for l in times)
    assert "one run after another with the report" in lines[-1]


def _earlier_run(out, name, *, model="embedded:tiny", train=(10.0, 20, 4), evaluate=(6.0, 100, 50),
                 judge=(8.0, 200), stage_seconds=(30.0, 16.0, 18.0)):
    """A run folder as the stages leave it: run.json with the stages' work times, stages.json with the
    stage notebooks' times."""
    folder = out / name
    folder.mkdir(parents=True)
    info = {"train": {"model": {"model": model}, "quantization": "none", "device": "cpu",
                      "wall_time_s": train[0], "total_steps": train[1], "effective_batch_size": train[2]},
            "evaluate": {"model": {"model": model}, "quantization": "none", "device": "cpu",
                         "wall_time_s": evaluate[0], "answers_generated_this_session": evaluate[1],
                         "sampling": {"max_new_tokens": evaluate[2]}},
            "judge": {"last": "j", "judges": {"j": {"backend": "hf", "model": model, "method": "exact",
                                                    "this_session": {"seconds": judge[0], "calls": judge[1]}}}}}
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "stages.json").write_text(json.dumps({s: {"seconds": t} for s, t in zip(
        ("train", "evaluate", "judge"), stage_seconds)}))


def test_stage_times_come_from_earlier_runs_in_the_outputs_folder(tmp_path):
    out = tmp_path / "out"
    _earlier_run(out, "a")
    _earlier_run(out, "b", train=(30.0, 20, 4), stage_seconds=(50.0, 16.0, 18.0))  # 3x slower training
    _earlier_run(out, "c", train=(20.0, 20, 4), stage_seconds=(40.0, 16.0, 18.0))
    (out / "broken").mkdir()
    (out / "broken" / "run.json").write_text("{not json")  # skipped, not fatal
    cfg = load_run_config(REPO_ROOT / "parameters" / "demo_medical.yaml").replace(seeds=[], outputs_dir=str(out))
    e = estimate_run(cfg)
    # train: median of 10/80, 30/80, 20/80 s per example-epoch = 0.25; overhead median of 20, 20, 20 s
    assert e.seconds["train"] == pytest.approx(20.0 + 0.25 * e.n_examples * cfg.epochs)
    # evaluate: 6 s / (100 answers x 50-token cap), overhead 10 s; judge: 8 s / 200 calls, overhead 10 s
    assert e.seconds["evaluate"] == pytest.approx(10.0 + 6.0 / 5000 * e.answers * cfg.max_new_tokens)
    assert e.seconds["judge"] == pytest.approx(10.0 + 0.04 * e.judge_calls)
    assert "measured in 3 earlier runs of outputs/ (a, b, c)" in e.time_line()
    # another model's runs do not count; nor do runs on another device when the run names one
    other = estimate_run(cfg.replace(model="some/other-model"))
    assert other.seconds["train"] is None and other.seconds["evaluate"] is None
    assert estimate_run(cfg.replace(device="cuda")).seconds["train"] is None
    # nor do the project's sampler's runs for a run sampled by vLLM (another engine, another speed)
    vllm = estimate_run(cfg.replace(evaluate_engine="vllm"))
    assert vllm.seconds["evaluate"] is None and vllm.seconds["train"] == e.seconds["train"]


def test_without_earlier_runs_the_reference_rates_or_a_question_mark(tmp_path):
    from lib.estimate import REFERENCE_RATES, duration

    cfg = load_run_config(REPO_ROOT / "parameters" / "demo_medical.yaml").replace(
        seeds=[], outputs_dir=str(tmp_path / "empty"))
    e = estimate_run(cfg)
    ref = {r.stage: r for r in REFERENCE_RATES if r.key[:2] in (("embedded:tiny", "none"), ("hf", "embedded:tiny"))}
    assert e.seconds["train"] == pytest.approx(ref["train"].overhead + ref["train"].seconds * e.n_examples * cfg.epochs)
    assert "make demo, 2 CPU cores" in e.time_line()
    assert estimate_run(cfg.replace(evaluate_engine="vllm")).seconds["evaluate"] is None  # references: hf's
    api = estimate_run(cfg.replace(judge_backend="openai", judge_model="gpt-4o-mini-2024-07-18",
                                   judge_method="logprob", judge_min_mass=0.25))
    assert api.seconds["judge"] is None and "judge ?" in api.time_line()
    assert "time ? (some stage has no measured rate)" in total_line([e, api])
    assert "one run after another" in total_line([e]) and "with the report" in total_line([e], (20.0, "x"))
    assert [duration(x) for x in (None, 0.2, 40, 600, 9000)] == ["?", "1 s", "40 s", "10 min", "2.5 h"]
