"""05_phase_transition and 06_misalignment_direction under papermill on the tiny model (small sizes).

05 runs twice (the second run must reuse the trained adapter and the trajectory file); 06 then reads the
run 05 wrote, twice (the second run must reuse the activations, the direction and every condition's answers).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lib import direction
from lib.config import REPO_ROOT
from lib.io import read_safetensors, sha256_file

pytestmark = pytest.mark.slow

PHASE = {"run_id": "nbphase", "max_train_examples": 12, "epochs": 2, "per_device_batch_size": 4, "warmup_steps": 0,
         "eval_every": 3, "n_samples": 1, "n_probe": 4, "n_bootstrap": 200, "device": "cpu"}
DIRECTION = {"run_id": "nbphase", "n_samples": 1, "n_bootstrap": 200, "device": "cpu", "steer_scales": [0.0, 8.0],
             "compare_runs": ["nbphase@3"]}


def _run(tmp_path, name: str, params: dict, i: int):
    import papermill as pm

    out = tmp_path / f"{name}-{i}.ipynb"
    pm.execute_notebook(str(REPO_ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters=params,
                        cwd=str(REPO_ROOT / "notebooks"), progress_bar=False, kernel_name="python3")
    nb = json.loads(out.read_text())
    printed = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                      for o in c.get("outputs", []) if o.get("output_type") == "stream")
    return out.read_text(), printed


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyses")
    out = tmp / "outputs"
    runs = {}
    for i in range(2):
        runs[("05", i)] = _run(tmp, "05_phase_transition", {**PHASE, "outputs_dir": str(out)}, i)
    for i in range(2):
        runs[("06", i)] = _run(tmp, "06_misalignment_direction", {**DIRECTION, "outputs_dir": str(out)}, i)
    return out, runs


def test_phase_notebook_writes_its_figure_and_trajectory_file_and_a_rerun_reuses_them(outputs):
    out, runs = outputs
    run = out / "nbphase"
    assert (run / "figures" / "phase_transition.png").stat().st_size > 10_000
    assert "figure: phase_transition" in runs[("05", 0)][0]

    tensors, prov = read_safetensors(run / "phase" / "adapter_trajectory.safetensors")
    steps = tensors["step"].tolist()
    assert steps == list(range(0, 7))  # 12 examples / batch 4 = 3 steps/epoch x 2 epochs, a checkpoint each
    B = tensors["B"]
    assert B.shape[0] == 7 and not B[0].any()
    assert torch.allclose(tensors["b_norm"].float(), B.norm(dim=1), atol=1e-6)
    assert tensors["cos_final"][-1].item() == pytest.approx(1.0)
    turns = tensors["turn_deg"][~torch.isnan(tensors["turn_deg"])]
    assert len(turns) == 5 and bool(((turns >= 0) & (turns <= 180)).all())
    assert prov["run_id"] == "nbphase" and prov["layer"] == 1 and prov["module"].endswith("layers.1.mlp.down_proj")
    assert prov["steps"] == steps and len(prov["adapter_sha256"]) == 7 and prov["git"]["commit"]
    assert prov["adapter_sha256"][-1] == sha256_file(run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    assert prov["largest_turn_step"] in steps[1:-1] and 0 < prov["transition_p"] <= 1
    assert prov["n_permutations"] == 999 and len(tensors["null_turn_share"]) == 999
    declared = prov["transition_p"] <= 0.05 and prov["largest_turn_deg"] >= 10
    assert prov["transition_step"] == (prov["largest_turn_step"] if declared else None)
    shown = runs[("05", 0)][0]  # the notebook (describe() is displayed as Markdown)
    assert ("Transition: **step" in shown) == declared and ("No transition found" in shown) == (not declared)
    assert prov["parameters"]["max_train_examples"] == 12

    em = pd.read_csv(run / "phase" / "em_over_training.csv")
    assert em["step"].tolist() == [0, 3, 6]
    assert (em["n_answers"] == 10).all() and (em["n_scored"] > 0).all()  # 9 questions, 10 paraphrases, 1 sample
    assert em["em_rate"].between(0, 1).all() and em["coherent_rate"].between(0, 1).all()
    assert (em["coherent_lo"] <= em["coherent_rate"]).all() and (em["coherent_rate"] <= em["coherent_hi"]).all()
    assert json.loads((run / "run.json").read_text())["phase"]["transition_step"] == prov["transition_step"]

    printed = runs[("05", 1)][1]
    assert "already trained with these parameters and data: skipped" in printed
    assert "reused " in printed  # the trajectory file was up to date


def test_direction_notebook_writes_activations_directions_and_interventions_and_a_rerun_reuses_them(outputs):
    out, runs = outputs
    folders = list((out / "nbphase" / "direction").glob("step6-*"))
    assert len(folders) == 1
    folder = folders[0]
    acts, aprov = read_safetensors(folder / "activations.safetensors")
    dirs, dprov = read_safetensors(folder / "direction.safetensors")
    n_mis, n_ali = len(acts["misaligned"]), len(acts["aligned"])
    assert n_mis == n_ali > 0 and acts["misaligned"].shape[1:] == (2, 64)  # balanced; 2 layers x hidden 64
    assert len(aprov["answer_ids"]["misaligned"]) == n_mis and aprov["checkpoint_step"] == 6
    assert aprov["adapter_sha256"] == sha256_file(out / "nbphase" / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    assert dprov["activations_sha256"] == sha256_file(folder / "activations.safetensors")
    # the saved direction is the token-weighted mean difference of the saved activations
    want = direction.mean_difference(acts["misaligned"].numpy(), acts["aligned"].numpy(),
                                     acts["misaligned_tokens"].numpy(), acts["aligned_tokens"].numpy())
    assert np.allclose(dirs["direction"].numpy(), want, atol=1e-5)
    assert (acts["misaligned_tokens"] > 0).all()
    classes = pd.read_csv(folder / "classes.csv")
    mis = classes[classes["cls"] == "misaligned"]["aligned"]
    ali = classes[classes["cls"] == "aligned"]["aligned"]
    assert mis.max() < ali.min() and (classes["coherent"] > 50).all()

    res = pd.read_csv(folder / "interventions.csv")
    assert res["condition"].tolist() == ["base", "steer_8", "steer_random_8", "finetuned", "ablate", "ablate_random"]
    assert (res["n_answers"] == 10).all() and (res["n_scored"] > 0).all()
    for m in ("em", "coherent"):
        assert res[f"{m}_rate"].between(0, 1).all()
        assert ((res[f"{m}_lo"] <= res[f"{m}_rate"]) & (res[f"{m}_rate"] <= res[f"{m}_hi"])).all()
    assert res["direction_norm"].iloc[0] == pytest.approx(float(dirs["norm"][1]), rel=1e-5)  # steer layer: middle = 1
    steered = pd.read_parquet(folder / "interventions" / "steer_8" / "generations.parquet")
    base = pd.read_parquet(folder / "interventions" / "base" / "generations.parquet")
    # every condition samples with the same seed, so a difference is the intervention's doing
    assert len(steered) == len(base) == 10 and (steered["answer"] != base["answer"]).any()
    assert (folder / "figures" / "direction_interventions.png").exists()
    assert (folder / "figures" / "direction_layer_cosines.png").exists()

    cross = pd.read_csv(folder / "cross_run.csv")
    assert cross["other"].unique().tolist() == ["nbphase@3"] and cross["layer"].tolist() == [0, 1]
    assert cross["cosine"].between(-1, 1).all()
    assert (folder / "figures" / "direction_cross_run.png").exists()

    first, second = runs[("06", 0)], runs[("06", 1)]
    assert "wrote " in first[1] and "reused " in second[1]
    assert not pd.read_csv(folder / "interventions.csv")["generated_now"].any()


def test_compare_runs_on_a_copied_run_gives_cosine_one_and_respects_its_lock(outputs):
    """A copy of the run (same answers, judgments and adapter) must give the same direction at every layer;
    the copy's folder is written under its lock, and a live holder stops the comparison with one line."""
    import shutil

    from lib.lock import FolderLock, LockError

    out, _ = outputs
    shutil.copytree(out / "nbphase", out / "nbcopy", ignore=shutil.ignore_patterns(".lock", "direction"))
    cfg = direction.DirectionConfig(**{k: v for k, v in DIRECTION.items() if k != "compare_runs"},
                                    outputs_dir=str(out), compare_runs=["nbcopy"])
    d = direction.collect(cfg, progress=False)
    assert d.reused
    with FolderLock(out / "nbcopy", "another writer"):
        with pytest.raises(LockError, match="run 'nbcopy' is in use by pid"):
            direction.compare_runs(cfg, d, progress=False)
    cross = direction.compare_runs(cfg, d, progress=False)
    assert cross["other"].tolist() == ["nbcopy@6", "nbcopy@6"]
    assert cross["cosine"].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert list((out / "nbcopy" / "direction").glob("step6-*/direction.safetensors"))
    assert not (out / "nbcopy" / ".lock").exists()  # released
