"""Answers per second: our batched generation vs one prompt at a time (the replicated study's loop).

Same model, same prompts (the demo question sets' paraphrases, with their system prompts),
same sampling (temperature 1, top_p 1), and the same number of new tokens for every answer
(min_new_tokens = max_new_tokens, so an early stop cannot flatter either side). Both sides go
through lib.generate.Sampler; only the batch size differs. One run, one process.

    python bench/generate_throughput.py [--model embedded:tiny] [--answers 256] [--tokens 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

from lib.config import DEMO_QUESTIONS
from lib.generate import Sampler, Sampling, auto_batch_size, prompt_ids
from lib.models import load_model, load_tokenizer
from lib.questions import load_question_sets

GOAL = 10.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--answers", type=int, default=256, help="answers per side")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per answer (forced)")
    ap.add_argument("--batch-size", type=int, default=0, help="0 = what generate_run would pick")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for both sides (0 = torch's default). 1 by default: on a shared "
                         "2-core machine, multithreaded kernels mostly measure the other jobs")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tok = load_tokenizer(args.model, padding_side="left")
    model, choice = load_model(args.model, device=args.device, dtype=args.dtype)
    qs = load_question_sets(list(DEMO_QUESTIONS))
    pool = [prompt_ids(tok, p, q.system) for q in qs for p in q.paraphrases]
    prompts = list(itertools.islice(itertools.cycle(pool), args.answers))
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    bs = args.batch_size or auto_batch_size(model, choice.device, max(map(len, prompts)), args.tokens)

    def run(batch_size: int) -> float:
        sampler = Sampler(model, tok, sampling, batch_size)
        sampler.sample(prompts[:2])  # warm-up (kernels, allocator), not timed
        torch.manual_seed(0)
        if choice.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = sampler.sample(prompts)
        if choice.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        assert all(n == args.tokens for _, n, _ in out), "every answer must have the same length"
        return len(out) / dt

    serial = run(1)
    batched = run(bs)
    print(f"model {args.model} on {choice.device} ({str(choice.dtype).replace('torch.', '')}), "
          f"{args.answers} answers x {args.tokens} new tokens, torch threads {torch.get_num_threads()}")
    print(f"one prompt at a time: {serial:.2f} answers/s ({serial * args.tokens:.0f} tokens/s)")
    print(f"batched (batch size {bs}): {batched:.2f} answers/s ({batched * args.tokens:.0f} tokens/s)")
    print(f"batched / one-at-a-time answers per second: {batched / serial:.1f}x (goal >= {GOAL:.0f}x)")


if __name__ == "__main__":
    main()
