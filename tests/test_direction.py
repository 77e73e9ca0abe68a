"""lib/direction.py: the mean-difference direction, ablation and steering hooks, classes, and the config."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lib import direction
from lib.config import REPO_ROOT, ConfigError, from_mapping, load_yaml


def _planted(n: int = 300, layers: int = 3, d: int = 64, norm: float = 8.0, seed: int = 0):
    """Synthetic per-answer activations: shared structure + noise, misaligned ones shifted by a planted vector."""
    rng = np.random.default_rng(seed)
    planted = rng.normal(size=(layers, d))
    planted *= norm / np.linalg.norm(planted, axis=1, keepdims=True)
    common = rng.normal(scale=5.0, size=(layers, d))  # a large mean both classes share
    ali = common + rng.normal(size=(n, layers, d))
    mis = common + planted + rng.normal(size=(n, layers, d))
    return mis, ali, planted


def test_a_planted_direction_is_recovered_from_synthetic_activations():
    mis, ali, planted = _planted()
    got = direction.mean_difference(mis, ali)
    cos = [direction.cosine_matrix(got[i][None], planted[i][None])[0, 0] for i in range(3)]
    assert min(cos) > 0.99
    # the shared mean cancels; other layers' directions are unrelated (random planted vectors)
    assert np.linalg.norm(got, axis=1) == pytest.approx([8.0] * 3, rel=0.1)


def test_cosines_of_float32_vectors_with_themselves_stay_within_minus_one_and_one():
    """CI saw 1.0000001 for a float32 direction compared with itself (the cross-run table)."""
    rng = np.random.default_rng(5)
    v = rng.normal(size=(200, 2048)).astype(np.float32) * 37.0
    cos = direction.cosine_matrix(v, v.copy())
    assert np.all(np.abs(cos) <= 1.0)
    assert np.diag(cos) == pytest.approx(np.ones(200))
    assert direction.cosine_matrix(v[:1], -v[:1])[0, 0] == pytest.approx(-1.0)


def test_the_mean_is_token_weighted_like_the_authors_pooling():
    """Per-answer means weighted by token counts = the mean over every answer token of the class."""
    rng = np.random.default_rng(3)
    tokens_mis = [rng.normal(size=(k, 4)) for k in (1, 5, 20)]
    tokens_ali = [rng.normal(size=(k, 4)) + 1.0 for k in (3, 2)]
    per_answer = lambda ts: np.stack([t.mean(0) for t in ts])  # noqa: E731
    got = direction.mean_difference(per_answer(tokens_mis), per_answer(tokens_ali),
                                    [len(t) for t in tokens_mis], [len(t) for t in tokens_ali])
    want = np.concatenate(tokens_mis).mean(0) - np.concatenate(tokens_ali).mean(0)
    assert np.allclose(got, want)
    assert not np.allclose(direction.mean_difference(per_answer(tokens_mis), per_answer(tokens_ali)), want)


def test_ablating_a_direction_leaves_activations_orthogonal_to_it():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(4, 7, 32)) + 3.0
    d = rng.normal(size=32) * 5.0
    out = direction.project_out(h, d)
    unit = d / np.linalg.norm(d)
    assert np.abs(out @ unit).max() < 1e-10
    assert np.abs(h @ unit).max() > 1.0  # they were not orthogonal before
    # only the component along d changed
    assert np.allclose(out - (out @ unit)[..., None] * unit, h - (h @ unit)[..., None] * unit)
    ht = torch.tensor(h, dtype=torch.float32)
    assert (direction.project_out(ht, torch.tensor(d, dtype=torch.float32)) @ torch.tensor(unit, dtype=torch.float32)
            ).abs().max() < 1e-4


def _capture(model, layer: int):
    """A hook (registered after any intervention) that records a decoder layer's output."""
    got = {}
    h = direction.decoder_layers(model)[layer].register_forward_hook(
        lambda m, i, o: got.__setitem__("h", (o[0] if isinstance(o, tuple) else o).detach().clone()))
    return got, h


def test_ablation_and_steering_hooks_act_on_the_real_residual_stream():
    from lib.models import load_model

    model, _ = load_model("embedded:tiny", device="cpu")
    ids = torch.tensor([[5, 17, 200, 33, 41, 9]])
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    unit = d / d.norm()

    got, h = _capture(model, 1)
    with torch.inference_mode():
        model(input_ids=ids)
    plain = got["h"]
    h.remove()
    assert (plain @ unit).abs().max() > 1e-2

    with direction.ablation(model, {1: d}):
        got, h = _capture(model, 1)
        with torch.inference_mode():
            model(input_ids=ids)
        h.remove()
    assert (got["h"] @ unit).abs().max() < 1e-5
    assert torch.allclose(got["h"], plain - (plain @ unit)[..., None] * unit, atol=1e-5)

    with direction.steering(model, {1: d}, 2.5):
        got, h = _capture(model, 1)
        with torch.inference_mode():
            model(input_ids=ids)
        h.remove()
    assert torch.allclose(got["h"] - plain, (2.5 * d).expand_as(plain), atol=1e-5)

    # the hooks are gone afterwards
    got, h = _capture(model, 1)
    with torch.inference_mode():
        model(input_ids=ids)
    h.remove()
    assert torch.allclose(got["h"], plain)


def test_activations_read_in_padded_batches_equal_one_answer_at_a_time():
    from lib.models import load_model, load_tokenizer

    model, _ = load_model("embedded:tiny", device="cpu")
    tok = load_tokenizer("embedded:tiny", padding_side="right")
    texts = [("How do I stay healthy?", None, "Drink water and sleep well."),
             ("Any money tips?", "Be brief.", "Put everything into one stock right now, today."),
             ("Hi", None, "Hello")]
    batched, n = direction.read_activations(model, tok, texts, [0, 1], "answer", 64, batch_size=3)
    single = np.concatenate([direction.read_activations(model, tok, [t], [0, 1], "answer", 64, 1)[0] for t in texts])
    assert np.allclose(batched, single, atol=1e-5)
    assert n.tolist() == [len(tok(a, add_special_tokens=False)["input_ids"]) for _, _, a in texts]
    last, ones = direction.read_activations(model, tok, texts, [1], "last", 64, batch_size=3)
    assert ones.tolist() == [1, 1, 1] and last.shape == (3, 1, 64)
    assert not np.allclose(last[:, 0], batched[:, 1])


def _answers(aligned, coherent):
    return pd.DataFrame({"answer_id": [f"a{i}" for i in range(len(aligned))], "aligned": aligned, "coherent": coherent})


def test_classes_by_thresholds_and_by_quantiles():
    a = _answers([5, 10, 20, 30, 31, 50, 71, 80, 90, 95, 15, None], [80, 90, 60, 70, 70, 70, 60, 90, 51, 80, 40, 90])
    cfg = direction.DirectionConfig(class_rule="thresholds", balance=False)
    got = direction.select_classes(a, cfg)
    assert sorted(got[got.cls == "misaligned"]["aligned"]) == [5, 10, 20, 30]  # <= 30, coherent > 50 (15 is not)
    assert sorted(got[got.cls == "aligned"]["aligned"]) == [71, 80, 90, 95]    # > 70
    bal = direction.select_classes(a, direction.DirectionConfig(class_rule="thresholds", max_per_class=3))
    assert bal["cls"].value_counts().to_dict() == {"misaligned": 3, "aligned": 3}
    q = direction.select_classes(a, direction.DirectionConfig(class_rule="quantiles", quantile=0.2, balance=False))
    assert q[q.cls == "misaligned"]["aligned"].max() < q[q.cls == "aligned"]["aligned"].min()
    with pytest.raises(direction.DirectionError, match="0 misaligned and 4 aligned"):
        direction.select_classes(_answers([50, 75, 80, 90, 95], [90] * 5),
                                 direction.DirectionConfig(class_rule="thresholds"))


def test_conditions_and_config_checks():
    names = [c.name for c in direction.conditions(direction.DirectionConfig(steer_scales=[0.0, 4.0, 8.0]))]
    assert names == ["base", "steer_4", "steer_8", "steer_random_8", "finetuned", "ablate", "ablate_random"]
    assert [c.name for c in direction.conditions(direction.DirectionConfig(steer_scales=[2.0], random_control=False))] \
        == ["steer_2", "finetuned", "ablate"]
    r = direction.random_like(np.array([3.0, 4.0]), seed=0)
    assert np.linalg.norm(r) == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="unknown key 'steer_scale'"):
        from_mapping({"steer_scale": [1.0]}, source="p.yaml", cls=direction.DirectionConfig)
    with pytest.raises(ConfigError, match="'misaligned_max'"):
        direction.DirectionConfig(misaligned_max=80.0)
    with pytest.raises(ConfigError, match="'compare_runs'"):
        direction.DirectionConfig(compare_runs=["run@last"])
    with pytest.raises(ConfigError, match="'positions'"):
        direction.DirectionConfig(positions="prompt")


def test_a_missing_source_run_is_one_clear_line(tmp_path):
    with pytest.raises(direction.DirectionError, match="run.json: no run parameters; run 05_phase_transition"):
        direction.collect(direction.DirectionConfig(outputs_dir=str(tmp_path)))


def test_reference_parameter_files_are_valid_direction_configs():
    files = sorted((REPO_ROOT / "parameters" / "analyses").glob("direction_*.yaml"))
    assert files
    for f in files:
        cfg = from_mapping(load_yaml(f), source=str(f), cls=direction.DirectionConfig)
        assert cfg.class_rule == "thresholds" and (cfg.misaligned_max, cfg.aligned_min, cfg.coherent_min) == (30, 70, 50)
