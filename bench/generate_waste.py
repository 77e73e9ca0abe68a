"""Idle decode slots with natural stopping: static batches vs our continuous batching.

A decode slot is one row of one forward pass that produces a next token. A slot is idle when
its row's answer has already ended (a static batch keeps decoding until its longest answer
ends; continuous batching refills freed rows and, once no prompt is left, drops them). The
figure is idle slots / all slots, counted by the samplers themselves (``DecodeStats``):
static = sum over batches of (rows x longest answer - answer tokens) / (rows x longest answer).

Same model, prompts (the demo question sets' paraphrases with their system prompts, each
repeated --samples times, as the evaluate stage orders them), sampling (temperature 1, top_p
1, the papers' 600-token cap), per-answer seeds and batch size on both sides; answers end
where the model stops them. Correctness: both sides must give the same answers; the timed
runs use the model's own dtype, where batch shapes change float32 sums in the last bits, so the
check reruns both sides in float64 (where rounding cannot move a draw) and demands equality,
and counts float32 agreement.

    python bench/generate_waste.py [--model embedded:tiny] [--samples 16] [--batch-size 64] [--max-new-tokens 600] [--goal 0.10]

Last line: ``idle decode slots, natural stopping: <value> (goal < <goal>)``; exit 1 when missed
(or when the answers or the slot accounting are wrong).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from lib.config import DEMO_QUESTIONS
from lib.decoding import answer_seed
from lib.evaluate import ContinuousSampler, Sampler, Sampling, prompt_ids
from lib.models import load_model, load_tokenizer
from lib.questions import load_question_sets

GOAL = 0.10


def run(sampler, prompts, seeds, device: str) -> tuple[list, float]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = sampler.sample(prompts, seeds)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--samples", type=int, default=16, help="answers per paraphrase")
    ap.add_argument("--batch-size", type=int, default=64, help="rows per static batch = continuous slots")
    ap.add_argument("--max-new-tokens", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--check-answers", type=int, default=0,
                    help="float64 equality check on this many answers (0 = all)")
    ap.add_argument("--goal", type=float, default=GOAL, help="idle fraction to stay below (exit 1 when missed)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.model, padding_side="left")
    model, choice = load_model(args.model, device=args.device, dtype=args.dtype)
    qs = load_question_sets(list(DEMO_QUESTIONS))
    # the evaluate stage's order: question by question, paraphrase by paraphrase, samples together
    keys = [(q.question_set, q.id, p_idx) for q in qs for p_idx in range(len(q.paraphrases))]
    pool = [prompt_ids(tok, p, q.system) for q in qs for p in q.paraphrases]
    prompts = [ids for ids in pool for _ in range(args.samples)]
    seeds = [answer_seed(0, 0, *k, s) for k in keys for s in range(args.samples)]
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)

    static, cont = Sampler(model, tok, sampling, args.batch_size), ContinuousSampler(model, tok, sampling, args.batch_size)
    Sampler(model, tok, sampling, 2).sample(prompts[:2]), ContinuousSampler(model, tok, sampling, 2).sample(prompts[:2])
    a, t_static = run(static, prompts, seeds, choice.device)
    b, t_cont = run(cont, prompts, seeds, choice.device)
    lengths = [n for _, n, _ in b]
    same32 = sum(x == y for x, y in zip(a, b))

    # correctness in float64: the same answers from both sides (and the same lengths as timed)
    n_check = args.check_answers or len(prompts)
    m64, _ = load_model(args.model, device=choice.device, dtype="float64")
    a64 = Sampler(m64, tok, sampling, args.batch_size).sample(prompts[:n_check], seeds[:n_check])
    b64 = ContinuousSampler(m64, tok, sampling, args.batch_size).sample(prompts[:n_check], seeds[:n_check])
    same64 = sum(x == y for x, y in zip(a64, b64))

    gpu = f" [{torch.cuda.get_device_name(0)}]" if choice.device == "cuda" else ""
    stopped = sum(f == "stop" for _, _, f in b) / len(b)
    print(f"model {args.model} on {choice.device}{gpu} ({str(choice.dtype).replace('torch.', '')}), "
          f"{len(prompts)} answers ({len(pool)} demo paraphrases x {args.samples}), batch/slots {args.batch_size}, "
          f"cap {args.max_new_tokens} tokens, torch threads {torch.get_num_threads()}")
    print(f"answer lengths (new tokens): mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}, "
          f"stopped on their own {stopped:.1%}")
    for name, s, t in (("static batches", static, t_static), ("continuous", cont, t_cont)):
        st = s.stats
        print(f"{name:>15}: {st.slot_tokens} slots for {st.useful_tokens} answer tokens, idle {st.idle_fraction:.3f}; "
              f"{st.decode_steps} decode steps, {st.prefills} prefills; {t:.2f} s, {len(prompts) / t:.1f} answers/s")
    print(f"continuous / static answers per second: {t_static / t_cont:.2f}x")
    print(f"same answers, static vs continuous: float32 (timed) {same32}/{len(prompts)}, "
          f"float64 {same64}/{n_check}")
    idle = cont.stats.idle_fraction
    print(f"idle decode slots, static batching: {static.stats.idle_fraction:.3f}")
    # the float64 answers must agree exactly; each sampler's slot accounting must cover its own answers' tokens
    accounted = (cont.stats.useful_tokens == sum(lengths)
                 and static.stats.useful_tokens == sum(n for _, n, _ in a))
    ok = same64 == n_check and accounted
    if not ok:
        print(f"FAILED: float64 answers agree {same64}/{n_check}; slot accounting covers the answers: {accounted}")
    print(f"idle decode slots, natural stopping: {idle:.3f} (goal < {args.goal:.2f})")
    return 0 if ok and idle < args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
