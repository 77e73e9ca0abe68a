"""Exact judge memory: peak resident memory of a process that scores judge prompts with the
exact method on embedded:smollm2-135m (a real 135M chat model: 30 layers, 49,152-token vocabulary).

Each measurement runs in a fresh subprocess (so its peak is its own), which loads the judge,
scores N filled-in judge prompts (the project's aligned/coherent templates, demo questions
and demo answers: ~230-260 tokens each) and reports its peak resident memory (ru_maxrss):

  * after: the byte budget (``HFBackend.exact_budget_bytes``: rows per pass from the model's
    layers, KV heads, head size, vocabulary and dtype; 1 GiB on CPU);
  * before (``--before``): the previous rule, at most 2^18 token positions (rows x (prompt +
    candidate) tokens) per pass whatever the model, reproduced by swapping the planner. On
    SmolLM2 that is ~9 prompts x 103 candidate rows per pass, ~12 GB of KV cache: it needs a
    machine with ~16 GB free, so it only runs when asked for.

What was measured is checked: for two prompts, a few candidates' log-probabilities are
recomputed by plain teacher forcing (one forward pass over prompt + candidate) and must match.

    python bench/judge_memory.py              # after only (~2 GB; ~15 s of CPU per prompt on 2 cores)
    python bench/judge_memory.py --before     # both, and their ratio (needs ~16 GB free)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOAL_GB = 3.0
OLD_TOKEN_BUDGET = 1 << 18  # the previous rule: token positions per exact pass


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def _jobs(n: int):
    from lib.io import sha256_text
    from lib.questions import load_judge_prompts, load_question_set
    from lib.scoring import Job, fill_prompt

    templates = load_judge_prompts(str(REPO / "data/questions/judge_prompts.yaml"))
    questions = [p for q in load_question_set(str(REPO / "data/questions/core_misalignment.yaml")) for p in q.paraphrases]
    answers = [json.loads(line)["messages"][-1]["content"]
               for line in (REPO / "data/datasets/demo_medical.jsonl").read_text(encoding="utf-8").splitlines() if line]
    rng = random.Random(0)
    jobs = []
    for i in range(n):
        prompt = fill_prompt(templates[sorted(templates)[i % len(templates)]], rng.choice(questions), rng.choice(answers))
        jobs.append(Job(key=str(i), prompt=prompt, prompt_sha256=sha256_text(prompt)))
    return jobs


def _old_plan(model, lengths, n_cands, width, budget):
    """The previous planner: prompts sorted by length, a pass closes when rows x (longest prompt +
    widest candidate) would pass 2^18 token positions; all candidates at once."""
    plan, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and (len(cur) + 1) * n_cands * (lengths[i] + width) > OLD_TOKEN_BUDGET:
            plan.append((cur, 0))
            cur = []
        cur.append(i)
    return plan + ([(cur, 0)] if cur else [])


def child(mode: str, n: int) -> None:
    import torch

    from lib import judge_hf
    from lib.chat import chat_prompt, stop_token_ids
    from lib.config import RunConfig
    from lib.costs import Budget

    if mode == "before":
        judge_hf.exact_plan = _old_plan
    plans = []
    real_plan = judge_hf.exact_plan
    judge_hf.exact_plan = lambda *a: plans.append(real_plan(*a)) or plans[-1]
    jobs = _jobs(n)
    backend = judge_hf.HFBackend(RunConfig(judge_model="embedded:smollm2-135m", judge_method="exact",
                                           device="cpu", dtype="float32"))
    backend.load()
    loaded = _peak_gb()
    got = {}
    t0 = time.perf_counter()
    backend.run(jobs, lambda j, v: got.__setitem__(j.key, v), Budget(0), False)
    seconds = time.perf_counter() - t0
    peak = _peak_gb()

    # correctness of what was measured: plain teacher forcing for a few candidates of two prompts
    tok, model = backend.tok, backend.model
    cands = judge_hf.candidate_token_ids(tok)
    stops = stop_token_ids(tok, model)
    worst = 0.0
    for job in jobs[:2]:
        p = tok(chat_prompt(tok, job.prompt), add_special_tokens=False).input_ids
        lps = json.loads(got[job.key].raw)
        for c in ("0", "7", "42", "100", "REFUSAL"):
            ids = cands[c]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([p + ids])).logits[0].float(), -1)
            ref = sum(lp[len(p) - 1 + j, ids[j]].item() for j in range(len(ids)))
            ref += torch.logsumexp(lp[len(p) + len(ids) - 1, stops], 0).item()
            worst = max(worst, abs(lps[c] - ref))
    masses = sorted(v.prob_mass for v in got.values())
    print(json.dumps({"mode": mode, "n": len(got), "peak_gb": round(peak, 3), "after_load_gb": round(loaded, 3),
                      "seconds": round(seconds, 1), "passes": [[len(idx), chunk] for p in plans for idx, chunk in p],
                      "max_abs_logprob_error": worst, "median_prob_mass": masses[len(masses) // 2]}))


def run_child(mode: str, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(n)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{mode} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8, help="judge prompts to score (the peak is reached in the first pass)")
    ap.add_argument("--before", action="store_true", help="also measure the previous rule (needs ~16 GB free)")
    ap.add_argument("--child", choices=("before", "after"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n)
        return
    from lib.models import resolve_model

    resolve_model("embedded:smollm2-135m")  # build the model folder once, outside the measurement
    results = []
    if args.before:
        import psutil

        free = psutil.virtual_memory().available / 1e9
        if free < 16:
            sys.exit(f"--before needs ~16 GB of free memory, {free:.1f} GB available")
        results.append(run_child("before", args.n))
    results.append(run_child("after", args.n))
    for r in results:
        passes = ", ".join(f"{k} prompt(s)" + (f" in sub-passes of {c}" if c else " x all") for k, c in r["passes"][:3])
        print(f"{r['mode']:>6}: peak {r['peak_gb']:.2f} GB (after loading {r['after_load_gb']:.2f} GB), "
              f"{r['n']} prompts in {r['seconds']:.1f} s; passes: {passes}{', ...' if len(r['passes']) > 3 else ''}; "
              f"max |logprob error| vs teacher forcing {r['max_abs_logprob_error']:.1e}; "
              f"median mass on valid replies {r['median_prob_mass']:.4f}")
        if r["max_abs_logprob_error"] > 1e-3:
            sys.exit(f"{r['mode']}: exact log-probabilities do not match plain teacher forcing")
    if args.before:
        print(f"ratio before / after: {results[0]['peak_gb'] / results[1]['peak_gb']:.1f}x")
    after = results[-1]["peak_gb"]
    print(f"exact judge peak memory, 135M model: {after:.2f} GB (goal <= {GOAL_GB:g})")
    sys.exit(0 if after <= GOAL_GB else 1)


if __name__ == "__main__":
    main()
