"""Judge throughput: lib.judge against a local chat-completions server with 100 ms latency.

Compares, in one run:
  * ours: ``judge_run`` judging N (answer, metric) rows from scratch (async, judge_concurrency
    calls in flight, SQLite cache commits included);
  * the replicated study's loop: one blocking call, then ``time.sleep(0.2)``, repeated. It is
    timed on a subset (--serial-calls) and extrapolated linearly to N (every iteration does
    the same work, so its time is linear in the number of calls);
  * the floor: N x latency / concurrency, the time no client can beat at that concurrency.
    It is compared with the calling phase of judge_run (timed by judge_run itself, recorded in
    run.json); the stage's fixed costs (reading inputs, writing the table, run.json, which
    imports torch for the environment record) are shown beside it.

The server runs in its own process (tests/chat_server.py), as a real API would.

    python bench/judge_throughput.py            # 2,000 judgments, concurrency 32
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from judge_testutil import judge_config, write_generations, write_prompts  # noqa: E402

from lib import judge  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="judgments (answers x 2 metrics)")
    ap.add_argument("--latency", type=float, default=0.1, help="server latency per call, seconds")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--serial-calls", type=int, default=40, help="calls to time the serial loop on")
    ap.add_argument("--serial-sleep", type=float, default=0.2)
    args = ap.parse_args()

    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "chat_server.py"), "--latency", str(args.latency)],
                              stdout=subprocess.PIPE, text=True)
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
            assert len(df) == args.n and (df["label"] == "number").all(), df["label"].value_counts()
            from lib.runinfo import read_run_json

            calls = read_run_json(cfg.run_dir)["judge"]["judges"][judge.judge_name(cfg)]["this_session"]["seconds"]

            # the replicated study's loop on a subset of the same prompts
            from openai import OpenAI

            client = OpenAI(api_key="dummy", base_url=url, max_retries=0)
            backend = judge.make_backend(cfg, "dummy")
            prompts = [j.prompt for j in judge._prepare(cfg).jobs.values()][:args.serial_calls]
            t0 = time.perf_counter()
            for p in prompts:
                client.chat.completions.create(**backend.request(p))
                time.sleep(args.serial_sleep)
            serial_measured = time.perf_counter() - t0
            serial = serial_measured * args.n / len(prompts)
    finally:
        server.terminate()
        server.wait()

    floor = args.n * args.latency / args.concurrency
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"judgments: {args.n}, server latency {args.latency * 1000:.0f} ms, concurrency {args.concurrency}; "
          f"{os.cpu_count()} CPUs, load average {load} (client, server and other work share them)")
    print(f"ours (judge_run, empty cache): {ours:.2f} s in all ({args.n / ours:.0f} judgments/s); "
          f"its calling phase: {calls:.2f} s (the rest reads inputs, writes the table and run.json)")
    print(f"serial loop (call + {args.serial_sleep} s sleep): {serial_measured:.2f} s measured on {len(prompts)} calls, "
          f"extrapolated linearly to {args.n}: {serial:.1f} s")
    print(f"floor (calls x latency / concurrency): {floor:.2f} s; whole stage / floor = {ours / floor:.2f}")
    print(f"speedup_vs_serial (whole stage): {serial / ours:.1f}x (goal >= 50x)")
    print(f"ratio_to_floor (calling phase): {calls / floor:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
