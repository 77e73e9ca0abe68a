"""Judge throughput: lib.judge against a local chat-completions server with 100 ms latency.

Headline: the calling phase of ``judge_run`` against the floor, N x latency / concurrency,
the time no client can beat at that concurrency (the ratio says how much of the wall time is
ours). Beside it, in the same run:
  * the whole stage (reading inputs, writing the table and run.json) against the floor;
  * the replicated study's serial loop, one blocking call then ``time.sleep(0.2)``, and the
    same loop without the sleep (the sleep alone makes most of the study's time, so a speedup
    against the sleeping loop mostly measures the sleep). Both are timed on a subset
    (--serial-calls) and extrapolated linearly to N (every iteration does the same work).

What was timed is checked: every one of the N judgments must carry exactly the score the
server's known reply implies (tests/fakes/chat_server.py gives each prompt the number
sha256(prompt) mod 101 with probability 0.6, the next number with 0.3, a word with 0.1, so
the score is (0.6 n + 0.3 (n + 1 mod 101)) / 0.9), and the scores must spread over 0..100
as that distribution does.

The server runs in its own process (tests/fakes/chat_server.py), as a real API would.

    python -m bench.judge_throughput                 # from the repository root: 2,000 judgments, concurrency 32
    python -m bench.judge_throughput --goal 1.1      # a stricter floor goal

Last line: ``judge calling phase / floor: <ratio> (goal <= <goal>)``. Exit 1 when a goal
is missed or a score is wrong.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import judge, judge_openai
from lib.io import sha256_text
from tests.fakes.chat_server import prompt_score
from tests.fakes.judge_inputs import judge_config, write_generations, write_prompts

REPO = Path(__file__).resolve().parent.parent

FLOOR_GOAL = 1.3      # calling phase / floor: at most 30% above what the latency allows
SPEEDUP_GOAL = 50.0   # whole stage vs the study's sleeping loop
NO_SLEEP_GOAL = 10.0  # whole stage vs the same loop without its sleep


def expected_score(prompt: str) -> float:
    """The score the server's reply to this prompt implies (see tests.fakes.chat_server.default_reply)."""
    n = prompt_score(prompt)
    return (n * 0.6 + ((n + 1) % 101) * 0.3) / 0.9


def check_scores(df, prompts_by_sha: dict[str, str]) -> list[str]:
    """Problems with the judged scores: any score that is not the server's, or a distribution
    that is not the server's (roughly uniform over 0..100: mean ~50, every decile used)."""
    problems = []
    wrong = [(r.answer_id, r.metric, r.score) for r in df.itertuples()
             if r.label != "number" or abs(r.score - expected_score(prompts_by_sha[r.prompt_sha256])) > 1e-6]
    if wrong:
        problems.append(f"{len(wrong)} of {len(df)} scores differ from the server's, e.g. {wrong[:3]}")
    if len(df) >= 200:  # enough prompts for the distribution check to be meaningful
        mean = float(df.score.mean())
        deciles = set((df.score // 10).clip(upper=9).astype(int))
        if not 40 <= mean <= 60 or len(deciles) < 10:
            problems.append(f"scores do not spread like the server's: mean {mean:.1f}, deciles used {sorted(deciles)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="judgments (answers x 2 metrics)")
    ap.add_argument("--latency", type=float, default=0.1, help="server latency per call, seconds")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--serial-calls", type=int, default=40, help="calls to time each serial loop on")
    ap.add_argument("--serial-sleep", type=float, default=0.2, help="the replicated study's sleep per call")
    ap.add_argument("--goal", type=float, default=FLOOR_GOAL, help="largest calling phase / floor that passes")
    ap.add_argument("--speedup-goal", type=float, default=SPEEDUP_GOAL,
                    help="least speedup vs the study's sleeping loop that passes")
    ap.add_argument("--no-sleep-goal", type=float, default=NO_SLEEP_GOAL,
                    help="least speedup vs the serial loop without its sleep that passes")
    args = ap.parse_args(argv)

    server = subprocess.Popen([sys.executable, "-m", "tests.fakes.chat_server", "--latency", str(args.latency)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().split()[1]
        os.environ["EM_LAB_BENCH_KEY"] = "dummy"  # the local server accepts any key
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "outputs"
            write_generations(out, run_id="bench", n=args.n // 2)
            cfg = judge_config(out, write_prompts(tmp), run_id="bench", judge_backend="openai",
                               judge_model="gpt-4o-mini-2024-07-18", judge_method="logprob", judge_base_url=url,
                               judge_api_key_env="EM_LAB_BENCH_KEY", judge_concurrency=args.concurrency)
            # ours, from an empty cache
            t0 = time.perf_counter()
            df = judge.judge_run(cfg, progress=False)
            ours = time.perf_counter() - t0
            from lib.runinfo import read_run_json

            calls = read_run_json(cfg.run_dir)["judge"]["judges"][judge.judge_name(cfg)]["this_session"]["seconds"]
            all_prompts = [j.prompt for j in judge._prepare(cfg).jobs.values()]
            problems = [] if len(df) == args.n else [f"{len(df)} judgments, {args.n} expected"]
            problems += check_scores(df, {sha256_text(p): p for p in all_prompts})

            # the replicated study's loop on a subset of the same prompts, with and without its sleep
            from openai import OpenAI

            client = OpenAI(api_key="dummy", base_url=url, max_retries=0)
            backend = judge_openai.OpenAIBackend(cfg, "dummy")
            prompts = all_prompts[:args.serial_calls]

            def serial(sleep_s: float) -> float:
                t0 = time.perf_counter()
                for p in prompts:
                    reply = client.chat.completions.create(**backend.request(p))
                    if reply.choices[0].message.content != str(prompt_score(p)):
                        problems.append(f"serial loop: wrong reply {reply.choices[0].message.content!r}")
                    if sleep_s:
                        time.sleep(sleep_s)
                return time.perf_counter() - t0
            serial_sleep_measured, serial_nosleep_measured = serial(args.serial_sleep), serial(0.0)
            scale = args.n / len(prompts)
            serial_sleep, serial_nosleep = serial_sleep_measured * scale, serial_nosleep_measured * scale
    finally:
        server.terminate()
        server.wait()

    floor = args.n * args.latency / args.concurrency
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"judgments: {args.n}, server latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}; "
          f"{os.cpu_count()} CPUs, load average {load} (client, server and other work share them)")
    print(f"scores checked against the server's: {'all ' + str(len(df)) + ' right' if not problems else 'WRONG'}")
    print(f"ours (judge_run, empty cache): {ours:.2f} s in all ({args.n / ours:.0f} judgments/s); "
          f"its calling phase: {calls:.2f} s (the rest reads inputs, writes the table and run.json)")
    print(f"serial loop, call + {args.serial_sleep} s sleep (the study's): {serial_sleep_measured:.2f} s measured on "
          f"{len(prompts)} calls, extrapolated to {args.n}: {serial_sleep:.1f} s")
    print(f"serial loop, no sleep: {serial_nosleep_measured:.2f} s on {len(prompts)} calls, "
          f"extrapolated to {args.n}: {serial_nosleep:.1f} s")
    print(f"speedup vs the study's loop (whole stage): {serial_sleep / ours:.1f}x (goal >= {args.speedup_goal:g}x)")
    print(f"speedup vs the loop without its sleep (whole stage): {serial_nosleep / ours:.1f}x "
          f"(goal >= {args.no_sleep_goal:g}x)")
    print(f"floor (calls x latency / concurrency): {floor:.2f} s; whole stage / floor = {ours / floor:.2f}")
    missed = list(problems)
    if serial_sleep / ours < args.speedup_goal:
        missed.append("speedup vs the study's loop")
    if serial_nosleep / ours < args.no_sleep_goal:
        missed.append("speedup vs the loop without its sleep")
    if calls / floor > args.goal:
        missed.append("calling phase / floor")
    for m in missed:
        print(f"MISSED: {m}", file=sys.stderr)
    print(f"judge calling phase / floor: {calls / floor:.2f} (goal <= {args.goal:g})")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
