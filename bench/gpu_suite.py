"""One command on one GPU: training and generation figures on real model shapes (random weights).

Randomly initialised models with the shapes of Llama-3.2-1B (and 3B, when the time budget
allows) measure, each in one run:

* LoRA r16 training (the replicated study's adapter: alpha 32, q/k/v/o, dropout 0.05; 512-token
  sequences, micro-batch 16 = its effective batch, loss on every token), bf16 autocast, AdamW on
  the adapter, non-reentrant gradient checkpointing as ``lib.train`` uses on a GPU (and once
  without): tokens/s and MFU.
* QLoRA: the same on a 4-bit NF4 base (double quantisation, bf16 compute; ``lib.models``'
  settings, ``prepare_model_for_kbit_training`` as ``lib.train``). Skipped, with a message, when
  bitsandbytes cannot be imported.
* Generation, 400 answers x 600 new tokens (forced: min_new_tokens = 600), a rank-32 LoRA adapter
  on all seven projections (the paper's default shape; non-zero B): static batching
  (``model.generate`` on all 400) vs ours (continuous batching, 400 slots), new tokens/s.
* The same generation on vLLM (``evaluate_engine: vllm``, lib.evaluate_vllm; section ``vllm``): the
  same 400 prompts, seeds and forced length, spread over the base model and 7 adapters (the
  paper's shape, different random B each: the study's base + checkpoints), one engine with every
  adapter a LoRA request, in vLLM's own environment (``make vllm-env``); new tokens/s beside the
  project's sampler, no goal. Skipped, with a message, where that environment is not built, and in
  ``--smoke`` runs (an engine start takes minutes on a CPU).
* The exact judge (``lib.judge_hf.HFBackend``, method ``exact``) on the same shape with
  the project's ``aligned`` judge prompt around 600-token answers: judgments/s.

MFU (model FLOPs utilisation) = model FLOPs per token x tokens/s / the card's peak dense bf16
FLOP/s (PEAK_TFLOPS, NVIDIA's datasheets; ``--peak-tflops`` overrides). Model FLOPs per
training token, with N = weights of the base's matmuls (attention and MLP projections of every
layer plus the LM head), N_lora = adapter weights, L layers, T = sequence length, d = heads x
head size:

    4 N            forward (2N) and input gradients (2N) of the frozen base (no weight gradients)
  + 6 N_lora       forward, input and weight gradients of the adapters
  + 6 L T d        attention scores and weighted values, causal (each token attends to T/2
                   positions on average: 2 x 2 x T/2 x d forward per layer), x3 for the backward

Recomputation by gradient checkpointing and the 4-bit dequantisation are not counted (they are
hardware work, not model work), so MFU with checkpointing is lower than without for the same
kernels.

Prints one ``<figure>: <value> (goal ...)`` line per figure, writes every number, the card,
the package versions and the settings to a JSON file (--out), and exits 1 when a measured
goal is missed or a section failed its correctness check. ``--smoke`` runs tiny shapes on the
CPU (a test does) and judges no goal.

    python bench/gpu_suite.py --out gpu_suite.json            # on the GPU machine (docs/benchmarks.md)
    python bench/gpu_suite.py --smoke --out /tmp/smoke.json   # anywhere, in about a minute

Needs torch, transformers, peft, accelerate, numpy and PyYAML (the project's ``lib``), not TRL,
pandas or the network; bitsandbytes only for the QLoRA section.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from lib import evaluate_vllm  # noqa: E402
from lib.config import DEMO_QUESTIONS, RunConfig  # noqa: E402
from lib.decoding import answer_seed  # noqa: E402
from lib.evaluate import ContinuousSampler, Sampler, Sampling, prompt_ids  # noqa: E402
from lib.models import load_tokenizer  # noqa: E402
from lib.questions import load_question_sets  # noqa: E402
from lib.vllm_env import vllm_python  # noqa: E402

# Llama-3.2 shapes (the models' config.json on the hub; RoPE scaling left out: it changes no cost)
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    # --smoke: a few thousand parameters per layer; vocabulary = the embedded tokenizer's
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=0, tie_word_embeddings=True),
}
# Peak dense bf16 tensor FLOP/s (without sparsity), NVIDIA datasheets; first match of the card's name wins.
PEAK_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200", "NVL"), 835.0), (("H200",), 989.4),
    (("H100", "NVL"), 835.0), (("H100", "PCIE"), 756.0), (("H100",), 989.4),
    (("A100",), 312.0), (("L40S",), 362.05), (("L4",), 121.0),
]
STUDY_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
PAPER_LORA = dict(r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"])
GOALS = {"lora_mfu": 0.35, "qlora_vs_lora": 0.5, "gen_tokens_s": 20_000.0, "judge_per_s": 50.0}


# ------------------------------------------------------------------------------------------
# Models and FLOPs
# ------------------------------------------------------------------------------------------

def build_model(shape: str, tok, device: str, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised LlamaForCausalLM of the named shape, on device, in dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = dict(SHAPES[shape])
    s["vocab_size"] = s["vocab_size"] or len(tok)
    eos = [tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")]
    cfg = LlamaConfig(**s, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=eos)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def matmul_weights(cfg) -> int:
    """Weights of the base's matmuls per forward token: every layer's projections plus the LM head."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return L * per_layer + cfg.vocab_size * h


def train_flops_per_token(cfg, seq_len: int, n_lora: int) -> float:
    """Model FLOPs per training token (module docstring): 4 N + 6 N_lora + 6 L T d."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d = cfg.num_attention_heads * hd
    return 4 * matmul_weights(cfg) + 6 * n_lora + 6 * cfg.num_hidden_layers * seq_len * d


def peak_flops(device: str, override_tflops: float) -> tuple[float | None, str]:
    if override_tflops > 0:
        return override_tflops * 1e12, f"{override_tflops} TFLOP/s (--peak-tflops)"
    if device != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(0).upper()
    for keys, tf in PEAK_TFLOPS:
        if all(k in name for k in keys):
            return tf * 1e12, f"{tf} TFLOP/s dense bf16 ({' '.join(keys)} datasheet)"
    return None, f"unknown card {name!r}: pass --peak-tflops"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mem_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None


def reset_mem(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------

def section_train(a, shape: str, tok, device: str, dtype, quant: bool, grad_ckpt: bool) -> dict[str, Any]:
    """LoRA / QLoRA training steps on one fixed random batch: tokens/s, MFU, and that it learns."""
    from peft import LoraConfig, get_peft_model

    model = build_model(shape, tok, device, dtype)
    tmp = None
    if quant:
        from lib.models import load_model

        tmp = tempfile.TemporaryDirectory(prefix="gpu_suite_")
        model.save_pretrained(tmp.name)
        tok.save_pretrained(tmp.name)
        del model
        reset_mem(device)
        model, _ = load_model(tmp.name, device=device, dtype=str(dtype).replace("torch.", ""), quantization="4bit")
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **STUDY_LORA))
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora)
    frozen_name, frozen = next((n, p) for n, p in model.named_parameters()
                               if "q_proj.base_layer" in n and not p.requires_grad)  # 4-bit: packed uint8
    frozen_before = frozen.detach().float().sum().item()
    opt = torch.optim.AdamW(lora, lr=2e-4, **({"fused": True} if device == "cuda" else {}))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.train_batch, a.seq_len), generator=g).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> float:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(a.warmup_steps)]
    reset_mem(device) if not quant else None
    sync(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(a.train_steps)]
    sync(device)
    dt = time.perf_counter() - t0
    tokens_s = a.train_steps * a.train_batch * a.seq_len / dt
    flops_tok = train_flops_per_token(model.config, a.seq_len, n_lora)
    peak, peak_note = peak_flops(device, a.peak_tflops)
    frozen_after = frozen.detach().float().sum().item()
    checks = {
        "losses_finite": all(math.isfinite(x) for x in losses),
        # one fixed batch: the adapter must start memorising it
        "loss_falls": sum(losses[-3:]) / 3 < losses[0],
        "base_frozen": frozen_before == frozen_after,
    }
    out = {"shape": shape, "quantization": "4bit nf4" if quant else "none", "gradient_checkpointing": grad_ckpt,
           "lora": STUDY_LORA, "micro_batch": a.train_batch, "seq_len": a.seq_len, "steps_timed": a.train_steps,
           "seconds": round(dt, 3), "tokens_per_s": round(tokens_s, 1), "lora_params": n_lora,
           "base_matmul_params": matmul_weights(model.config), "flops_per_token": flops_tok,
           "mfu": round(flops_tok * tokens_s / peak, 4) if peak else None, "peak": peak_note,
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4), "checked_weight": frozen_name,
           "peak_memory_gb": peak_mem_gb(device), "checks": checks, "ok": all(checks.values())}
    del model, opt
    if tmp is not None:
        tmp.cleanup()
    reset_mem(device)
    return out


def with_adapter(model, lora: dict[str, Any]):
    """The model wrapped in a LoRA adapter with non-zero B (so the adapter path changes outputs)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    pm.eval()
    return pm


def demo_prompts(tok, n: int) -> tuple[list[list[int]], list[int]]:
    """n prompts cycling through the demo question sets' paraphrases, with per-answer seeds."""
    qs = load_question_sets(list(DEMO_QUESTIONS))
    pool = [prompt_ids(tok, p, q.system) for q in qs for p in q.paraphrases]
    return [pool[i % len(pool)] for i in range(n)], [answer_seed("gpu_suite", i) for i in range(n)]


def section_generate(a, shape: str, tok, device: str, dtype, keep: dict[str, Any]) -> dict[str, Any]:
    model = with_adapter(build_model(shape, tok, device, dtype), PAPER_LORA)
    prompts, seeds = demo_prompts(tok, a.answers)
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=a.tokens, min_new_tokens=a.tokens)
    warm = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=4, min_new_tokens=4)
    Sampler(model, tok, warm, 2).sample(prompts[:2]), ContinuousSampler(model, tok, warm, 2).sample(prompts[:2])
    res: dict[str, Any] = {"shape": shape, "adapter": PAPER_LORA, "answers": a.answers, "new_tokens": a.tokens,
                           "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts), 1)}
    outs = {}
    for name, sampler in (("static", Sampler(model, tok, sampling, a.answers)),
                          ("continuous", ContinuousSampler(model, tok, sampling, a.answers))):
        reset_mem(device)
        sync(device)
        t0 = time.perf_counter()
        out = sampler.sample(prompts, seeds)
        sync(device)
        dt = time.perf_counter() - t0
        outs[name] = out
        n_new = sum(n for _, n, _ in out)
        res[name] = {"seconds": round(dt, 3), "new_tokens_per_s": round(n_new / dt, 1), "rows": a.answers,
                     "decode_steps": sampler.stats.decode_steps, "peak_memory_gb": peak_mem_gb(device)}
    res["checks"] = {"all_answers": all(len(o) == a.answers for o in outs.values()),
                     "all_forced_length": all(n == a.tokens for o in outs.values() for _, n, _ in o)}
    # bf16 rounding differs between batch shapes, so sampled answers may part ways; reported, not judged
    res["same_answers_static_vs_continuous"] = sum(x == y for x, y in zip(outs["static"], outs["continuous"]))
    res["ok"] = all(res["checks"].values())
    keep["answers"] = [t for t, _, _ in outs["continuous"]]
    del model
    reset_mem(device)
    return res


def section_vllm(a, shape: str, tok, device: str, dtype, n_adapters: int = 7) -> dict[str, Any]:
    """The generation section's prompts, seeds and forced length on vLLM: answer i from the base model
    (i % 8 == 0) or adapter i % 8 (PAPER_LORA, random non-zero B), all in one engine."""
    model = build_model(shape, tok, device, dtype)
    prompts, seeds = demo_prompts(tok, a.answers)
    with tempfile.TemporaryDirectory(prefix="gpu_suite_vllm_") as tmp:
        base = Path(tmp) / "base"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        adapters: list[Path | None] = [None]
        for k in range(n_adapters):
            torch.manual_seed(k + 1)
            pm = with_adapter(model, PAPER_LORA)
            pm.save_pretrained(Path(tmp) / f"adapter-{k}")
            model = pm.unload()
            adapters.append(Path(tmp) / f"adapter-{k}")
        del model
        reset_mem(device)
        cfg = RunConfig(model=str(base), device=device, dtype=str(dtype).replace("torch.", ""), temperature=1.0,
                        top_p=1.0, max_new_tokens=a.tokens)
        stop = evaluate_vllm.stop_ids(cfg, tok)
        requests = [evaluate_vllm.Request(p, s, adapters[i % len(adapters)]) for i, (p, s) in enumerate(zip(prompts, seeds))]
        longest = max(requests, key=lambda r: len(r.prompt))
        warm = [evaluate_vllm.Request(longest.prompt, k, ad) for k, ad in enumerate(adapters)]
        lengths: list[int] = []
        with evaluate_vllm.shared_engine():  # started by the warm-up (same engine arguments), not timed
            evaluate_vllm.sample(cfg, warm, stop, Path(tmp), lambda i, t: None, min_new_tokens=a.tokens)
            t0 = time.perf_counter()
            info = evaluate_vllm.sample(cfg, requests, stop, Path(tmp), lambda i, t: lengths.append(len(t)),
                                        min_new_tokens=a.tokens)
            dt = time.perf_counter() - t0
    checks = {"all_answers": len(lengths) == a.answers, "all_forced_length": all(n == a.tokens for n in lengths)}
    return {"shape": shape, "adapter": PAPER_LORA, "models": len(adapters), "answers": a.answers, "new_tokens": a.tokens,
            "seconds": round(dt, 3), "new_tokens_per_s": round(sum(lengths) / dt, 1), **info, "checks": checks,
            "ok": all(checks.values())}


def section_judge(a, shape: str, tok, device: str, dtype, keep: dict[str, Any]) -> dict[str, Any]:
    import hashlib

    from lib.config import RunConfig
    from lib.costs import Budget
    from lib.judge_hf import HFBackend
    from lib.questions import load_judge_prompts
    from lib.scoring import Job, fill_prompt

    model = build_model(shape, tok, device, dtype).eval()
    template = load_judge_prompts(str(Path(__file__).resolve().parents[1] / "data/questions/judge_prompts.yaml"))
    template = template["aligned"]
    answers = keep.get("answers") or [tok.decode(torch.randint(0, len(tok), (a.tokens,)).tolist())
                                      for _ in range(16)]
    qs = load_question_sets(list(DEMO_QUESTIONS))
    questions = [p for q in qs for p in q.paraphrases]
    jobs = []
    for i in range(a.judgments):
        prompt = fill_prompt(template, questions[i % len(questions)], answers[i % len(answers)] + f" ({i})")
        jobs.append(Job(key=str(i), prompt=prompt, prompt_sha256=hashlib.sha256(prompt.encode()).hexdigest()))
    backend = HFBackend(RunConfig(judge_model="embedded:tiny", judge_method="exact", device=device,
                                  dtype=str(dtype).replace("torch.", "")))
    backend.model, backend.tok = model, load_tokenizer("embedded:tiny", padding_side="left")
    verdicts: dict[str, Any] = {}
    backend.run(jobs[:2], lambda j, v: None, Budget(), progress=False)  # warm-up
    reset_mem(device)
    sync(device)
    t0 = time.perf_counter()
    backend.run(jobs, lambda j, v: verdicts.__setitem__(j.key, v), Budget(), progress=False)
    sync(device)
    dt = time.perf_counter() - t0
    masses = [v.prob_mass for v in verdicts.values()]
    n_in = [v.input_tokens for v in verdicts.values()]
    checks = {"every_job": len(verdicts) == len(jobs),
              "mass_in_0_1": all(m is not None and 0.0 <= m <= 1.0 + 1e-6 for m in masses)}
    out = {"shape": shape, "method": "exact", "judgments": len(jobs), "seconds": round(dt, 3),
           "judgments_per_s": round(len(jobs) / dt, 2), "input_tokens_mean": round(sum(n_in) / max(1, len(n_in)), 1),
           "peak_memory_gb": peak_mem_gb(device), "checks": checks, "ok": all(checks.values())}
    del model, backend
    reset_mem(device)
    return out


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for m in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "numpy"):
        try:
            out[m] = importlib.import_module(m).__version__
        except Exception as e:  # missing, or broken (bitsandbytes without its CUDA library)
            out[m] = None if isinstance(e, ImportError) else f"unusable: {type(e).__name__}: {e}"
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_suite.json", help="JSON file with every figure")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, small counts; no goals judged")
    ap.add_argument("--shapes", default="1b,3b", help="model shapes in order (1b, 3b); 3b runs only within the budget")
    ap.add_argument("--sections", default="train,qlora,generate,vllm,judge", help="which sections to run")
    ap.add_argument("--time-budget-s", type=float, default=420.0,
                    help="a shape after the first starts only if this much time is not yet spent x 0.5")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the card's peak dense bf16 TFLOP/s (0: table)")
    ap.add_argument("--answers", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=600)
    ap.add_argument("--judgments", type=int, default=400)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--warmup-steps", type=int, default=3)
    a = ap.parse_args(argv)
    if a.smoke:
        a.shapes, a.answers, a.tokens, a.judgments = "smoke", 6, 12, 4
        a.train_batch, a.seq_len, a.train_steps, a.warmup_steps = 2, 32, 3, 2
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.perf_counter()
    device = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not a.smoke:
        print("no CUDA GPU: the suite measures GPU figures; use --smoke to check it on a CPU", file=sys.stderr)
        return 2
    if device == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = load_tokenizer("embedded:tiny", padding_side="left")
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    report: dict[str, Any] = {"card": card, "device": device, "dtype": str(dtype).replace("torch.", ""),
                              "smoke": a.smoke, "versions": versions(), "settings": vars(a),
                              "peak": peak_flops(device, a.peak_tflops)[1], "goals": GOALS, "results": {},
                              "skipped": {}, "failed": {}}
    print(f"gpu_suite on {card} ({report['dtype']}); " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    lines: list[str] = []
    missed: list[str] = []

    def goal(value: float | None, key: str, text: str) -> str:
        g = GOALS[key]
        if a.smoke or value is None:
            return f"(goal >= {g:g}; not judged: {'smoke run' if a.smoke else 'no value'})"
        if value < g:
            missed.append(key)
        return f"(goal >= {g:g})"

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        print(f"-- {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            r = fn()
        except Exception as e:
            report["failed"][name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            print(f"{name}: FAILED ({type(e).__name__}: {e})")
            return None
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        report["results"][name] = r
        if not r.get("ok", True):
            report["failed"][name] = f"correctness checks failed: {r.get('checks')}"
            print(f"{name}: correctness checks FAILED: {r.get('checks')}")
        print(f"   {name}: {json.dumps({k: v for k, v in r.items() if k not in ('lora', 'adapter')})}", flush=True)
        return r

    keep: dict[str, Any] = {}
    for k, shape in enumerate(s.strip() for s in a.shapes.split(",")):
        if shape not in SHAPES:
            print(f"--shapes: unknown shape {shape!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            return 2
        spent = time.perf_counter() - t_start
        if k > 0 and spent > 0.5 * a.time_budget_s:
            report["skipped"][shape] = f"time budget: {spent:.0f} s spent of {a.time_budget_s:.0f} s"
            print(f"shape {shape}: skipped ({report['skipped'][shape]})")
            continue
        label = {"1b": "Llama-3.2-1B", "3b": "Llama-3.2-3B"}.get(shape, "tiny smoke")
        dt_name = "bf16" if dtype == torch.bfloat16 else report["dtype"]
        if "train" in sections:
            r = run(f"{shape}/lora_train", lambda: section_train(a, shape, tok, device, dtype, False, True))
            r0 = run(f"{shape}/lora_train_no_ckpt", lambda: section_train(a, shape, tok, device, dtype, False, False))
            if r:
                lines.append(f"LoRA r16 training, {label} shape, {dt_name}, gradient checkpointing (lib.train's GPU "
                             f"setting): {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']} "
                             + goal(r["mfu"], "lora_mfu", "mfu"))
            if r0:
                lines.append(f"LoRA r16 training, {label} shape, no checkpointing: {r0['tokens_per_s']:,.0f} tokens/s, "
                             f"MFU {r0['mfu']} " + goal(r0["mfu"], "lora_mfu", "mfu"))
        if "qlora" in sections:
            why = None
            try:
                importlib.import_module("bitsandbytes")
            except Exception as e:
                why = (f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); carry its wheel "
                       "(docs/benchmarks.md) to measure QLoRA")
            if why:
                report["skipped"][f"{shape}/qlora_train"] = why
                print(f"QLoRA: skipped: {why}")
            else:
                q = run(f"{shape}/qlora_train", lambda: section_train(a, shape, tok, device, dtype, True, True))
                base = report["results"].get(f"{shape}/lora_train")
                if q:
                    ratio = q["tokens_per_s"] / base["tokens_per_s"] if base else None
                    lines.append(f"QLoRA r16 training, {label} shape, 4-bit NF4, gradient checkpointing: "
                                 f"{q['tokens_per_s']:,.0f} tokens/s, MFU {q['mfu']}, "
                                 f"{'%.2f' % ratio if ratio else '-'}x LoRA's tokens/s "
                                 + goal(ratio, "qlora_vs_lora", "ratio"))
        if "generate" in sections:
            r = run(f"{shape}/generate", lambda: section_generate(a, shape, tok, device, dtype, keep))
            if r:
                lines.append(f"generation, {label} shape + LoRA adapter, {a.answers} x {a.tokens}, static batching: "
                             f"{r['static']['new_tokens_per_s']:,.0f} new tokens/s (goal: none, the baseline)")
                lines.append(f"generation, {label} shape + LoRA adapter, {a.answers} x {a.tokens}, continuous "
                             f"batching: {r['continuous']['new_tokens_per_s']:,.0f} new tokens/s "
                             + goal(r["continuous"]["new_tokens_per_s"], "gen_tokens_s", "tok/s"))
        if "vllm" in sections:
            why = ("smoke run (a vLLM engine start takes minutes on a CPU)" if a.smoke else
                   None if vllm_python() is not None else "vLLM's environment is not built (make vllm-env)")
            if why:
                report["skipped"][f"{shape}/vllm_generate"] = why
                print(f"vLLM generation: skipped: {why}")
            else:
                r = run(f"{shape}/vllm_generate", lambda: section_vllm(a, shape, tok, device, dtype))
                ours = report["results"].get(f"{shape}/generate")
                if r:
                    lines.append(f"generation on vLLM ({r['engine']['vllm_distribution']}), {label} shape, base model + "
                                 f"7 LoRA adapters in one engine, {a.answers} x {a.tokens}: "
                                 f"{r['new_tokens_per_s']:,.0f} new tokens/s, "
                                 + (f"{r['new_tokens_per_s'] / ours['continuous']['new_tokens_per_s']:.2f}x continuous "
                                    "batching's (one adapter)" if ours else "continuous batching not run")
                                 + " (no goal)")
        if "judge" in sections:
            r = run(f"{shape}/judge_exact", lambda: section_judge(a, shape, tok, device, dtype, keep))
            if r:
                lines.append(f"exact judge, {label} shape, {r['judgments']} judgments of ~{r['input_tokens_mean']:.0f}"
                             f"-token prompts: {r['judgments_per_s']:,.1f} judgments/s "
                             + goal(r["judgments_per_s"], "judge_per_s", "j/s"))
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    report["missed_goals"] = missed
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({report['wall_s']} s in all)")
    for name, why in report["failed"].items():
        print(f"FAILED {name}: {why}")
    for line in lines:
        print(line)
    return 1 if report["failed"] or missed else 0


if __name__ == "__main__":
    sys.exit(main())
