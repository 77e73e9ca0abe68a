"""Answers per second: our batched generation vs one prompt at a time (the replicated study's loop).

Same model, same prompts (the demo question sets' paraphrases, with their system prompts),
same sampling (temperature 1, top_p 1), and the same number of new tokens for every answer
(min_new_tokens = max_new_tokens, so an early stop cannot flatter either side). The batched side
is what the evaluate stage uses (lib.evaluate.ContinuousSampler: continuous batching, the batch size
evaluate_run would pick); the one-at-a-time side is model.generate on one prompt
(lib.evaluate.Sampler, batch size 1). Both draw with the same per-answer seeds. One run, one process.
(Idle slots with natural stopping: bench/generate_waste.py.)

    python bench/generate_throughput.py [--model embedded:tiny] [--answers 256] [--rounds 3] [--tokens 32] [--threads 1]

On a GPU, the figure that matters is tokens/s of a Llama-3.2-1B-shaped model (random weights, a
rank-32 LoRA adapter on all seven projections, bf16) for 400 answers x 600 tokens:

    python bench/generate_throughput.py --shape llama-1b --answers 400 --tokens 600 --rounds 1 --serial-answers 4

(the one-at-a-time side then runs on a subset: its answers/s does not depend on how many it does).

What was timed is checked: every answer has exactly --tokens new tokens, and, untimed, the
same two samplers at temperature 0 give token-for-token the same answers to the first
--check-prompts prompts (a batch that attended to its left padding would not).

vLLM (``evaluate_engine: vllm``, lib.evaluate_vllm) runs on the same prompts, seeds and sampling
(forced length, temperature 1) when its environment is built and can run the model (``make vllm-env``; ``--vllm off``
skips it): one engine in vLLM's own environment, the base model (``--shape llama-1b``: saved to a
temporary folder, its adapter as a LoRA request), vLLM's batch size and scheduling, its start-up
and a two-answer warm-up not timed. Its line, before the last, gives its tokens/s; no goal (on a
CPU vLLM wins only in bf16 without LoRA; its case is the GPU: bench/gpu_suite.py).

Last line: ``batched / one-at-a-time answers per second: <x>x (goal >= <goal>x)``; exit 1 when
the goal (``--goal``) is missed or a check fails (vLLM's: it ran and gave every answer --tokens tokens;
a model vLLM's build cannot run, such as the tiny model's head size 16 on a CPU, is skipped with why).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lib import evaluate_vllm
from lib.config import DEMO_QUESTIONS, ConfigError, RunConfig
from lib.evaluate import ContinuousSampler, Sampler, Sampling, auto_batch_size, default_seeds, prompt_ids
from lib.models import load_model, load_tokenizer
from lib.questions import load_question_sets
from lib.vllm_env import vllm_python

GOAL = 10.0


def llama_1b_with_lora(tok, device: str, dtype: str, layers: int = 0):
    """Llama-3.2-1B's shapes (random weights, its 128,256-token vocabulary) with a rank-32 LoRA on
    all seven projections (non-zero B, so the adapter path computes something)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.config import ALL_PROJ
    from lib.models import pick_device

    choice = pick_device(device, dtype)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                      num_hidden_layers=layers or 16, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
                      rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                      eos_token_id=[tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")])
    torch.manual_seed(0)
    with torch.device(choice.device):
        model = LlamaForCausalLM(cfg).to(choice.dtype)
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=list(ALL_PROJ)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    model.eval()
    return model, choice


def greedy_agreement(model, tok, prompts: list[list[int]], batch_size: int, tokens: int) -> int:
    """Prompts whose greedy answer from a batch differs from the one-prompt-at-a-time answer."""
    greedy = Sampling(temperature=0.0, top_p=1.0, max_new_tokens=tokens)
    alone = Sampler(model, tok, greedy, 1).sample(prompts)
    batched = ContinuousSampler(model, tok, greedy, batch_size).sample(prompts)
    return sum(a != b for a, b in zip(alone, batched))


def vllm_tokens_per_s(args, model, tok, prompts: list[list[int]]) -> tuple[float, dict, bool] | str:
    """(new tokens/s, lib.evaluate_vllm's record, every answer of --tokens tokens) of vLLM on the same
    prompts, seeds and sampling as the project's sampler; a string says why it did not run."""
    if args.vllm == "off":
        return "skipped (--vllm off)"
    if vllm_python() is None:
        return "skipped: its environment is not built (make vllm-env)"
    with tempfile.TemporaryDirectory(prefix="generate_throughput_") as tmp:
        folder, adapter = args.model, None
        if args.shape == "llama-1b":  # the random model (and its adapter) as folders vLLM can load
            folder, adapter = str(Path(tmp) / "base"), Path(tmp) / "adapter"
            base = model.get_base_model()  # still holds the LoRA layers: saved without them
            base.save_pretrained(folder, state_dict={k.replace(".base_layer", ""): v for k, v in base.state_dict().items()
                                                     if "lora_" not in k})
            tok.save_pretrained(folder)
            model.save_pretrained(adapter)
        cfg = RunConfig(model=folder, device=args.device, dtype=args.dtype, temperature=1.0, top_p=1.0,
                        max_new_tokens=args.tokens, eval_batch_size=args.vllm_batch_size, evaluate_engine="vllm")
        try:
            evaluate_vllm.check_engine(cfg)
        except ConfigError as e:  # e.g. the tiny model's head size on vLLM's CPU build
            return "skipped: " + str(e).removeprefix("key 'evaluate_engine': ")
        stop = evaluate_vllm.stop_ids(cfg, tok)
        requests = [evaluate_vllm.Request(p, s, adapter) for p, s in zip(prompts, default_seeds(len(prompts)))]
        longest = max(requests, key=lambda r: len(r.prompt))
        lengths: list[int] = []
        try:
            with evaluate_vllm.shared_engine():  # one engine: started by the warm-up (same engine arguments)
                evaluate_vllm.sample(cfg, [longest, longest], stop, Path(tmp), lambda i, t: None,
                                     min_new_tokens=args.tokens)
                t0 = time.perf_counter()
                info = evaluate_vllm.sample(cfg, requests, stop, Path(tmp), lambda i, t: lengths.append(len(t)),
                                            min_new_tokens=args.tokens)
                dt = time.perf_counter() - t0
        except evaluate_vllm.VllmEngineError as e:
            return f"FAILED: {e}"
    ok = len(lengths) == len(requests) and all(n == args.tokens for n in lengths)
    return sum(lengths) / dt, info, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:tiny", help="model to load (with --shape model)")
    ap.add_argument("--shape", choices=("model", "llama-1b"), default="model",
                    help="llama-1b: a random Llama-3.2-1B-shaped model + LoRA adapter instead of --model")
    ap.add_argument("--layers", type=int, default=0, help="llama-1b with fewer layers (0 = 16; smoke tests)")
    ap.add_argument("--serial-answers", type=int, default=0, help="one-at-a-time side on this many (0 = all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--answers", type=int, default=256, help="answers per side and round")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer (forced)")
    ap.add_argument("--batch-size", type=int, default=0, help="0 = what evaluate_run would pick")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per side")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both sides (0 = torch's default). 1 by default: on a shared "
                         "2-core machine, multithreaded kernels mostly measure the other jobs")
    ap.add_argument("--goal", type=float, default=GOAL, help="least batched / one-at-a-time ratio that passes")
    ap.add_argument("--check-prompts", type=int, default=16, help="prompts in the untimed greedy check")
    ap.add_argument("--vllm", choices=("auto", "off"), default="auto",
                    help="auto: also time vLLM on the same prompts when its environment is built")
    ap.add_argument("--vllm-batch-size", type=int, default=0,
                    help="vLLM's max_num_seqs (0: lib.evaluate_vllm's default, %d)" % evaluate_vllm.MAX_NUM_SEQS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.model, padding_side="left")
    if args.shape == "llama-1b":
        model, choice = llama_1b_with_lora(tok, args.device, args.dtype, args.layers)
        name = f"random Llama-3.2-1B shape ({model.config.num_hidden_layers} layers) + LoRA r32"
    else:
        model, choice = load_model(args.model, device=args.device, dtype=args.dtype)
        name = args.model
    qs = load_question_sets(list(DEMO_QUESTIONS))
    pool = [prompt_ids(tok, p, q.system) for q in qs for p in q.paraphrases]
    prompts = list(itertools.islice(itertools.cycle(pool), args.answers))
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    bs = args.batch_size or auto_batch_size(model, choice.device, max(map(len, prompts)), args.tokens)

    lengths_ok = True

    def run(sampler: Sampler) -> float:
        nonlocal lengths_ok
        todo = prompts[:args.serial_answers] if sampler is one and args.serial_answers else prompts
        torch.manual_seed(0)
        if choice.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sampler.sample(todo)
        if choice.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        lengths_ok &= len(out) == len(todo) and all(n == args.tokens for _, n, _ in out)
        return len(out) / dt

    one, many = Sampler(model, tok, sampling, 1), ContinuousSampler(model, tok, sampling, bs)
    one.sample(prompts[:2]), many.sample(prompts[:2])  # warm-up (kernels, allocator), not timed
    # alternate the two sides so that a busy spell on a shared machine hits both alike; medians
    rounds = [(run(one), run(many)) for _ in range(args.rounds)]
    serial = statistics.median(r[0] for r in rounds)
    batched = statistics.median(r[1] for r in rounds)
    gpu = f" [{torch.cuda.get_device_name(0)}]" if choice.device == "cuda" else ""
    print(f"model {name} on {choice.device}{gpu} ({str(choice.dtype).replace('torch.', '')}), {args.answers} answers "
          f"x {args.tokens} new tokens per side and round, {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print("rounds (one-at-a-time, batched answers/s): " + ", ".join(f"({a:.1f}, {b:.1f})" for a, b in rounds))
    print(f"one prompt at a time (median): {serial:.2f} answers/s ({serial * args.tokens:.0f} tokens/s)")
    print(f"batched, batch size {bs} (median): {batched:.2f} answers/s ({batched * args.tokens:.0f} tokens/s)")
    v = vllm_tokens_per_s(args, model, tok, prompts)  # before the check below turns the model to float32
    check = prompts[:args.check_prompts]
    if model.dtype != torch.float32:  # half-precision rounding differs with batch shape; the check is of the batching
        model = model.float()
    differ = greedy_agreement(model, tok, check, min(bs, len(check)), min(args.tokens, 16))
    print(f"check: every timed answer has {args.tokens} new tokens: {'yes' if lengths_ok else 'NO'}; greedy answers "
          f"batched vs one at a time, {len(check)} prompts: {len(check) - differ} identical, {differ} differ")
    if isinstance(v, str):
        print(f"vLLM: {v}")
        lengths_ok &= not v.startswith("FAILED")
    else:
        e = v[1]["engine"]
        lengths_ok &= v[2]
        print(f"vLLM ({e['vllm_distribution']}, {v[1]['device']}, {v[1]['dtype']}, max_num_seqs {e['max_num_seqs']}"
              f"{', LoRA' if e['max_lora_rank'] else ''}; start-up {e['load_s']} s not timed), same prompts: "
              f"{v[0]:.0f} tokens/s vs the project's sampler {batched * args.tokens:.0f} tokens/s "
              f"({v[0] / (batched * args.tokens):.2f}x; no goal); every answer {args.tokens} tokens: "
              f"{'yes' if v[2] else 'NO'}")
    ratio = batched / serial
    print(f"batched / one-at-a-time answers per second: {ratio:.1f}x (goal >= {args.goal:g}x)")
    return 0 if ratio >= args.goal and lengths_ok and differ == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
