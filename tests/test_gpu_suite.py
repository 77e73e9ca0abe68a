"""bench/gpu_suite.py: its FLOP arithmetic, its card table, and a --smoke run on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fakes.bench import load_bench

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.py"


def _run(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    code = (prelude + "import runpy, sys; sys.argv = [sys.argv[1]] + sys.argv[2:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(SUITE), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_matmul_weights_are_the_llama_1b_parameters_outside_norms():
    """The FLOP formula's N for the 1B shape equals what a real (meta-device) LlamaForCausalLM of
    that shape holds, minus its RMSNorm weights (no matmul): 1,235,814,400 - 67,584."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    g = load_bench("gpu_suite")
    cfg = LlamaConfig(**g.SHAPES["1b"])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied: the embedding is the LM head
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert total == 1_235_814_400 and norms == (2 * 16 + 1) * 2048
    assert g.matmul_weights(cfg) == total - norms
    # per token at T = 512 with the study's adapter (r16 on q/k/v/o: 16 x (2048+2048 + 2 x (2048+512) + 4096) x 16)
    n_lora = 16 * ((2048 + 2048) + 2 * (2048 + 512) + (2048 + 2048)) * 16
    assert g.train_flops_per_token(cfg, 512, n_lora) == 4 * (total - norms) + 6 * n_lora + 6 * 16 * 512 * 2048


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4),
                                          ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0)])
def test_peak_flops_from_the_card_name(monkeypatch, name, tflops):
    import torch

    g = load_bench("gpu_suite")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    assert g.peak_flops("cuda", 0.0)[0] == pytest.approx(tflops * 1e12)
    assert g.peak_flops("cuda", 500.0)[0] == pytest.approx(500e12)  # --peak-tflops wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Some Future Card")
    assert g.peak_flops("cuda", 0.0)[0] is None


@pytest.mark.slow
def test_smoke_runs_every_section_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    r = _run("--smoke", "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    res = rep["results"]
    expected = {"smoke/lora_train", "smoke/lora_train_no_ckpt", "smoke/generate", "smoke/judge_exact"}
    if rep["versions"]["bitsandbytes"]:
        expected.add("smoke/qlora_train")
    assert expected <= set(res) and not rep["failed"]
    for name in expected:
        assert res[name]["ok"], (name, res[name].get("checks"))
    lora = res["smoke/lora_train"]
    assert lora["gradient_checkpointing"] and not res["smoke/lora_train_no_ckpt"]["gradient_checkpointing"]
    assert lora["lora_params"] == 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))  # r16 on q/k/v/o, 2 layers
    assert lora["loss_last"] < lora["loss_first"] and lora["tokens_per_s"] > 0
    gen = res["smoke/generate"]
    assert gen["answers"] == 6 and gen["new_tokens"] == 12
    assert gen["static"]["decode_steps"] == gen["continuous"]["decode_steps"] == 11  # 12 tokens: 1 prefill + 11
    assert res["smoke/judge_exact"]["judgments"] == 4 and res["smoke/judge_exact"]["judgments_per_s"] > 0
    lines = r.stdout.strip().splitlines()
    goal_lines = [x for x in lines if "(goal" in x]
    assert len(goal_lines) == len(expected) + 1  # generation has a static and a continuous line
    assert all("not judged: smoke run" in x for x in goal_lines if "baseline" not in x)


@pytest.mark.slow
def test_qlora_is_skipped_with_a_message_without_bitsandbytes(tmp_path):
    out = tmp_path / "suite.json"
    r = _run("--smoke", "--sections", "qlora", "--out", str(out),
             prelude="import sys; sys.modules['bitsandbytes'] = None; ")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["versions"]["bitsandbytes"] is None and rep["results"] == {} and not rep["failed"]
    assert "bitsandbytes cannot be imported" in rep["skipped"]["smoke/qlora_train"]
    assert "QLoRA: skipped: bitsandbytes cannot be imported" in r.stdout
