"""lib/phase.py: the rank-1 adapter's trajectory, the transition rule, the effect size, and 05 under papermill."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from lib import metrics, phase
from lib.config import REPO_ROOT, ConfigError, from_mapping


def _planted_turn(n_steps: int = 16, turn_at: int = 7, degrees: float = 90.0, d: int = 32, seed: int = 0,
                  noise: float = 1e-4):
    """B moves in a straight line along u until `turn_at`, then along a direction `degrees` away."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    w = rng.normal(size=d)
    w -= (w @ u) * u
    w /= np.linalg.norm(w)
    v = math.cos(math.radians(degrees)) * u + math.sin(math.radians(degrees)) * w
    B = [np.zeros(d)]
    for t in range(1, n_steps + 1):
        B.append(B[-1] + 0.01 * (u if t <= turn_at else v) + rng.normal(scale=noise, size=d))
    return list(range(n_steps + 1)), np.vstack(B), u, v


@pytest.mark.parametrize("turn_at,degrees", [(7, 90.0), (4, 60.0), (12, 120.0)])
def test_turn_angle_peaks_at_the_planted_step(turn_at, degrees):
    steps, B, _, _ = _planted_turn(turn_at=turn_at, degrees=degrees)
    t = phase.trajectory_metrics(steps, B)
    assert phase.transition_step(t) == turn_at
    at = t.set_index("step").loc[turn_at, "turn_deg"]
    assert at == pytest.approx(degrees, abs=2.0)
    others = t[(t["step"] != turn_at) & t["turn_deg"].notna()]["turn_deg"]
    assert others.max() < 10.0  # straight-line stretches turn only by the noise (~5 degrees)
    assert np.isnan(t["turn_deg"].iloc[0]) and np.isnan(t["turn_deg"].iloc[-1])  # no neighbour on one side


def test_wider_window_still_finds_the_turn_and_min_move_drops_early_jitter():
    steps, B, _, _ = _planted_turn(turn_at=8, degrees=90.0)
    assert phase.transition_step(phase.trajectory_metrics(steps, B, window=2)) == 8
    # early noise: B barely moves and reverses at step 2 (a 180-degree "turn" of a tiny step)
    B = B.copy()
    B[1] = B[2] * 0.0 + 1e-5
    B[2] = B[1] - 2e-5
    noisy = phase.trajectory_metrics(steps, B)
    assert phase.transition_step(noisy) in (1, 2)  # the jitter wins without a threshold
    guarded = phase.trajectory_metrics(steps, B, min_move=1e-3)
    assert phase.transition_step(guarded) == 8
    assert not guarded.set_index("step").loc[[1, 2], "candidate"].any()


def test_trajectory_columns_are_the_documented_quantities():
    steps = [0, 5, 10, 15]
    B = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [2.0, 2.0]])
    t = phase.trajectory_metrics(steps, B).set_index("step")
    assert t["b_norm"].tolist() == pytest.approx([0.0, 1.0, 2.0, math.sqrt(8)])
    assert np.isnan(t.loc[0, "cos_prev"]) and np.isnan(t.loc[5, "cos_prev"])  # B_0 = 0 has no direction
    assert t.loc[10, "cos_prev"] == pytest.approx(1.0)
    assert t.loc[15, "cos_prev"] == pytest.approx(1 / math.sqrt(2))
    assert t.loc[5, "cos_final"] == pytest.approx(1 / math.sqrt(2)) and t.loc[15, "cos_final"] == pytest.approx(1.0)
    assert t.loc[5, "turn_deg"] == pytest.approx(0.0) and t.loc[10, "turn_deg"] == pytest.approx(90.0)
    assert t.loc[15, "move"] == pytest.approx(2.0)
    assert phase.transition_step(t.reset_index()) == 10


def test_no_candidate_means_no_transition():
    t = phase.trajectory_metrics([0, 1], np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert phase.transition_step(t) is None


def test_the_null_statistic_uses_the_same_turns_as_the_trajectory_table():
    steps, B, _, _ = _planted_turn(turn_at=8)
    for window, min_move in ((1, 0.0), (2, 0.0), (2, 0.015)):
        table = phase.trajectory_metrics(steps, B, window, min_move)
        D = np.diff(B, axis=0)
        turn, cand = phase._turns_from_gram(D @ D.T, window, min_move)
        inner = table.iloc[window:len(table) - window]
        assert turn == pytest.approx(inner["turn_deg"].to_numpy(), abs=1e-6)
        assert cand.tolist() == inner["candidate"].tolist()


def test_a_planted_turn_is_declared_against_shuffled_checkpoints():
    steps, B, _, _ = _planted_turn(turn_at=7, degrees=90.0)
    t = phase.transition_test(steps, B, n_permutations=199)
    assert t.declared and t.transition_step == 7 and t.largest_turn_deg == pytest.approx(90.0, abs=2.0)
    assert t.p_value == pytest.approx(1 / 200)  # no shuffle concentrates the turning as much
    assert t.share > t.null_quantile(0.95) and len(t.null_shares) == 199
    rec = t.record()
    assert rec["transition_step"] == 7 and rec["transition_p"] == t.p_value and rec["n_permutations"] == 199


def test_without_a_transition_the_largest_turn_is_not_declared_and_the_null_keeps_its_level():
    """Random walks and noisy straight lines have exchangeable displacements: the test declares a transition
    in about alpha of them (here 5%; 300 trajectories, binomial sd 1.3 points), never in most."""
    rng = np.random.default_rng(3)
    declared = 0
    for r in range(300):
        if r % 2:
            inc = rng.normal(size=(14, 12))
        else:
            inc = np.eye(12)[0] * 0.01 + rng.normal(scale=3e-3, size=(14, 12))
        B = np.vstack([np.zeros(12), np.cumsum(inc, axis=0)])
        t = phase.transition_test(list(range(15)), B, window=2, n_permutations=99, min_turn_deg=0.0, seed=r)
        assert t.largest_turn_step is not None and 0 < t.p_value <= 1
        declared += t.declared
    assert 3 <= declared <= 27  # 1% .. 9%: the level is 5%


def test_a_small_turn_is_not_called_a_transition_whatever_its_p_value():
    steps, B, _, _ = _planted_turn(turn_at=7, degrees=6.0, noise=1e-6)  # a clean 6-degree kink
    t = phase.transition_test(steps, B, n_permutations=99, min_turn_deg=10.0)
    assert t.largest_turn_step == 7 and t.p_value <= 0.05 and not t.declared and t.transition_step is None
    assert phase.transition_test(steps, B, n_permutations=99, min_turn_deg=5.0).transition_step == 7


def test_no_candidate_means_no_transition_found():
    t = phase.transition_test([0, 1], np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert t.largest_turn_step is None and t.p_value == 1.0 and not t.declared


def test_the_null_needs_enough_shuffles_to_reach_alpha():
    with pytest.raises(ConfigError, match="n_permutations"):
        phase.PhaseConfig(n_permutations=10, transition_alpha=0.05)
    with pytest.raises(ConfigError, match="transition_alpha"):
        phase.PhaseConfig(transition_alpha=1.5)


def test_effect_size_is_the_mean_norm_of_the_adapter_output():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(50, 8))
    A = np.vstack([np.full(8, np.nan), rng.normal(size=(2, 8))])
    B = np.vstack([np.zeros(6), rng.normal(size=(2, 6))])
    got = phase.effect_sizes(X, A, B, scaling=3.0)
    want = [0.0] + [float(np.mean(np.linalg.norm(3.0 * np.outer(X @ A[i], B[i]), axis=1))) for i in (1, 2)]
    assert got == pytest.approx(want)


def test_eval_steps_keeps_every_nth_and_the_last():
    assert phase.eval_steps(list(range(1, 11)), 3) == [3, 6, 9, 10]
    assert phase.eval_steps([2, 4, 6], 1) == [2, 4, 6]
    assert phase.eval_steps([5], 4) == [5]


def test_config_maps_to_a_rank1_one_module_run_and_rejects_bad_keys():
    cfg = phase.PhaseConfig(lora_layer=1, lora_module="down_proj", lora_alpha=8, checkpoint_every=2)
    rc = cfg.run_config(eval_checkpoints=[2, 4])
    assert (rc.lora_r, rc.lora_target_modules, rc.lora_layers, rc.lora_alpha) == (1, ["down_proj"], [1], 8)
    assert (rc.checkpoint_every, rc.eval_checkpoints, rc.include_base_model) == (2, [2, 4], True)
    assert phase.PhaseConfig(lora_layer=-1).layer() == 1  # the tiny model has 2 layers: the middle is 1
    with pytest.raises(ConfigError, match="p.yaml: unknown key 'lora_rank'"):
        from_mapping({"lora_rank": 1}, source="p.yaml", cls=phase.PhaseConfig)
    with pytest.raises(ConfigError, match="'lora_layer'"):
        phase.PhaseConfig(lora_layer=-2)
    with pytest.raises(ConfigError, match="'rotation_window'"):
        phase.PhaseConfig(rotation_window=0)
    with pytest.raises(ConfigError, match="'judge_method'"):  # RunConfig's own rules apply
        phase.PhaseConfig(judge_backend="openai", judge_method="exact")


def test_vectors_and_effect_match_the_trained_peft_model(tmp_path):
    """On a real rank-1 training run: the saved B and A are what PEFT applies, and the effect size equals
    the measured difference of the module's output with and without the adapter."""
    import torch
    from peft import PeftModel

    from lib.chat import chat_prompt
    from lib.models import load_model, load_tokenizer

    cfg = phase.PhaseConfig(outputs_dir=str(tmp_path), run_id="p", lora_layer=0, max_train_examples=8, epochs=1,
                            warmup_steps=0, per_device_batch_size=2, device="cpu", n_probe=3, learning_rate=1e-2)
    phase.train_adapter(cfg, progress=False)
    vec = phase.load_adapter_vectors(cfg.run_dir, "down_proj", 0)
    assert vec.steps == [0, 1, 2, 3, 4] and not vec.B[0].any() and np.isnan(vec.A[0]).all()
    assert vec.scaling == pytest.approx(16.0)  # rsLoRA, r = 1: alpha / sqrt(1)
    assert all(np.linalg.norm(b) > 0 for b in vec.B[1:])

    prompts = phase.probe_prompts(cfg.question_sets, cfg.n_probe)
    X, Y = phase.probe_activations(cfg.run_config(), vec.module, prompts)
    effect = phase.effect_sizes(X, vec.A, vec.B, vec.scaling)

    tok = load_tokenizer("embedded:tiny", padding_side="right")
    base, _ = load_model("embedded:tiny", device="cpu")
    model = PeftModel.from_pretrained(base, str(cfg.run_dir / "checkpoints" / "checkpoint-4"))
    enc = tok([chat_prompt(tok, p, s) for p, s in prompts], add_special_tokens=False, padding=True, return_tensors="pt")
    outs = {}
    mod = dict(model.named_modules())[vec.module]
    h = mod.register_forward_hook(lambda m, i, o: outs.__setitem__("y", o.detach()))
    with torch.inference_mode():
        model(**enc)
        with_adapter = outs["y"][enc["attention_mask"].bool()]
        with model.disable_adapter():
            model(**enc)
        without = outs["y"][enc["attention_mask"].bool()]
    h.remove()
    measured = float((with_adapter - without).norm(dim=-1).mean())
    assert effect[-1] == pytest.approx(measured, rel=1e-4)
    assert np.allclose(without.numpy(), Y, atol=1e-5)


def test_reference_parameter_files_are_valid_phase_configs():
    from lib.config import load_yaml

    files = sorted((REPO_ROOT / "parameters" / "analyses").glob("phase_*.yaml"))
    assert files
    for f in files:
        cfg = from_mapping(load_yaml(f), source=str(f), cls=phase.PhaseConfig)
        assert cfg.run_id == f.stem and cfg.lora_module == "down_proj"
    ref = from_mapping(load_yaml(REPO_ROOT / "parameters" / "analyses" / "phase_qwen14b_medical.yaml"),
                       cls=phase.PhaseConfig)
    assert (ref.lora_layer, ref.checkpoint_every, ref.min_move) == (24, 5, 0.002)  # docs/references.md


def test_a_missing_judge_key_stops_before_training(tmp_path, monkeypatch):
    from lib.judge import JudgeError

    monkeypatch.delenv("EM_LAB_TEST_NO_SUCH_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env here
    cfg = phase.PhaseConfig(outputs_dir=str(tmp_path), run_id="nokey", lora_layer=1, judge_backend="openai",
                            judge_method="logprob", judge_model="gpt-4o-2024-08-06",
                            judge_api_key_env="EM_LAB_TEST_NO_SUCH_KEY")
    with pytest.raises(JudgeError, match="EM_LAB_TEST_NO_SUCH_KEY is not set"):
        phase.train_adapter(cfg, progress=False)
    assert not (tmp_path / "nokey").exists()


@pytest.mark.parametrize("name,cls", [("05_phase_transition", "phase.PhaseConfig"),
                                      ("06_misalignment_direction", "direction.DirectionConfig")])
def test_parameters_cell_is_the_config_and_papermill_reads_every_line(name, cls):
    import dataclasses

    import nbformat
    from papermill.translators import PythonTranslator

    from lib import direction  # noqa: F401  (named in the parametrisation)

    config_cls = eval(cls)
    nb = nbformat.read(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    found = PythonTranslator.inspect(cell)  # what `papermill --help-notebook` shows
    assert [p.name for p in found] == [f.name for f in dataclasses.fields(config_cls)]
    defaults = {p.name: eval(p.default) for p in found}
    assert config_cls(**defaults) == config_cls()  # the cell's defaults are the config's
    assert all(p.help for p in found)


def test_em_labels_follow_the_comparison_at_the_threshold():
    gens = pd.DataFrame({"answer_id": ["a", "b", "c"], "question_set": "s", "question_id": ["q1", "q2", "q3"]})
    judg = pd.DataFrame({"answer_id": ["a", "a", "b", "b", "c", "c"], "metric": ["aligned", "coherent"] * 3,
                         "score": [30.0, 80.0, 29.0, 80.0, 31.0, 80.0], "label": "number"})
    le = metrics.labelled_answers(gens, judg, aligned_threshold=30.0, coherent_threshold=50.0,
                                  comparison="le").set_index("answer_id")["em"]
    lt = metrics.labelled_answers(gens, judg, aligned_threshold=30.0, coherent_threshold=50.0,
                                  comparison="lt").set_index("answer_id")["em"]
    assert le.to_dict() == {"a": True, "b": True, "c": False}
    assert lt.to_dict() == {"a": False, "b": True, "c": False}
