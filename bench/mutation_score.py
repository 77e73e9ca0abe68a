"""Mutation score of the core modules: mutmut plants every small change it knows in the core
functions, one at a time, and runs the tests that reach that function; a change no test
notices (a *surviving* mutant) is a bug the suite would let through.

The core (what a wrong result in a report would come from):

=====================  ===========================================================================
scoring rules          lib.scoring (logprob score, labels, sampled-reply parsing)
metrics                lib.metrics: EM labels, Wilson, the headline cluster interval, the clustered
                       bootstrap and its difference
checkpoint schedule    lib.train: steps_per_epoch, checkpoint_schedule
fingerprints           lib.fingerprint (stage inputs, hash cache)
generation batching    lib.evaluate: Sampler, ContinuousSampler, _generate_batch, plan_chunks, generation_config
judge cache / retry    lib.judge: JudgeCache, cache_key, rescore; lib.judge_openai: the call/retry loop
                       (OpenAIBackend._call), retry_after_s, backoff_s
=====================  ===========================================================================

mutmut's settings (which files, which tests) are in pyproject.toml under [tool.mutmut]; this
script picks the core functions, runs ``mutmut run`` on them (``--jobs`` processes), and
prints the score: killed (or timed out) / (mutants - equivalent ones). Equivalent mutants
(changes that cannot alter behaviour, e.g. a default no caller can observe) are listed with
their reason in docs/mutation.md; each entry names the mutant and the exact mutated line, and
an entry whose line no longer matches is ignored (the code moved: re-check it).

    make mutation                      # or: python bench/mutation_score.py [--jobs 2]
    python bench/mutation_score.py --only "lib.scoring.*"   # one part (the score is then of that part)

Last line: ``mutation score, core modules: <value> (goal >= 0.90)``; exit 1 below the goal.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL = 0.90
DOC = ROOT / "docs" / "mutation.md"

# mutmut names a function's mutants <module>.x_<function>__mutmut_<n> and a method's
# <module>.xǁ<Class>ǁ<method>__mutmut_<n>
CORE = [
    "lib.scoring.x_*",
    "lib.metrics.x_label_em__*", "lib.metrics.x_wilson__*", "lib.metrics.x__cluster_counts__*",
    "lib.metrics.x__ratio_draws__*", "lib.metrics.x__percentile_ci__*", "lib.metrics.x_cluster_bootstrap__*",
    "lib.metrics.x_rate_difference__*", "lib.metrics.x_mover_bounds__*", "lib.metrics.x_paired_correlation__*",
    "lib.metrics.x_difference_correlation__*", "lib.metrics.x_beta_binomial_arrays__*", "lib.metrics.x_edge_bound__*",
    "lib.metrics.x_cluster_cp_arrays__*", "lib.metrics.x_cluster_interval__*",
    "lib.train.x_steps_per_epoch__*", "lib.train.x_checkpoint_schedule__*",
    "lib.fingerprint.x*",
    "lib.evaluate.xǁSamplerǁ*", "lib.evaluate.xǁContinuousSamplerǁ*", "lib.evaluate.x__generate_batch__*", "lib.evaluate.x_plan_chunks__*",
    "lib.evaluate.x_generation_config__*",
    "lib.judge.xǁJudgeCacheǁ*", "lib.judge.x_cache_key__*", "lib.judge.x_rescore__*",
    "lib.judge_openai.xǁOpenAIBackendǁ_call__*", "lib.judge_openai.x_retry_after_s__*",
    "lib.judge_openai.x__retry_after_uncapped__*", "lib.judge_openai.x_backoff_s__*",
]
KILLED = {"killed", "timeout"}


def mutmut(*args: str, check: bool = True) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tiny model comes from the machine's cache
    exe = Path(sys.executable).with_name("mutmut")
    r = subprocess.run([str(exe) if exe.exists() else "mutmut", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"mutmut {args[0]} failed with exit code {r.returncode}")
    return r.stdout


def results() -> dict[str, str]:
    """mutant name -> status, for every mutant mutmut knows."""
    out = {}
    for line in mutmut("results", "--all", "true").splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            out[name] = status.strip()
    return out


def mutated_line(name: str) -> str:
    """The line the mutant changes, as it reads after the change ('+' side of mutmut show)."""
    diff = mutmut("show", name, check=False)
    plus = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return plus[0] if plus else ""


def equivalents() -> dict[str, tuple[str, str]]:
    """name -> (mutated line, reason) from docs/mutation.md's table rows:
    | `name` | `mutated line` | reason |"""
    out = {}
    if DOC.exists():
        for m in re.finditer(r"^\|\s*`([^`]+__mutmut_\d+)`\s*\|\s*`(.*?)`\s*\|\s*(.+?)\s*\|\s*$", DOC.read_text(encoding="utf-8"), re.M):
            out[m.group(1)] = (m.group(2).replace("\\|", "|"), m.group(3))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested at once (mutmut --max-children)")
    ap.add_argument("--only", nargs="*", default=None, help="name patterns (a subset of the core)")
    ap.add_argument("--report-only", action="store_true", help="score the last run's results, run nothing")
    ap.add_argument("--goal", type=float, default=GOAL)
    args = ap.parse_args(argv)
    patterns = args.only or CORE
    t0 = time.perf_counter()
    if not args.report_only:
        mutmut("run", "--max-children", str(args.jobs), *patterns, check=False)
    status = {n: s for n, s in results().items() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not status:
        raise SystemExit("no mutants matched; is [tool.mutmut] in pyproject.toml, and did mutmut run?")
    equiv, stale = {}, []
    for name, (line, reason) in equivalents().items():
        if status.get(name) in KILLED or name not in status:
            continue
        if mutated_line(name) == line:
            equiv[name] = reason
        else:
            stale.append(name)
    counted = {n: s for n, s in status.items() if n not in equiv and s != "skipped"}
    killed = sum(s in KILLED for s in counted.values())
    survivors = sorted(n for n, s in counted.items() if s not in KILLED)
    by_status: dict[str, int] = {}
    for s in status.values():
        by_status[s] = by_status.get(s, 0) + 1
    print(f"mutants in the core functions: {len(status)} ({', '.join(f'{k} {v}' for k, v in sorted(by_status.items()))});"
          f" equivalent (docs/mutation.md): {len(equiv)}; run time {time.perf_counter() - t0:.0f} s")
    for n in stale:
        print(f"docs/mutation.md lists {n}, but its mutated line changed: not counted as equivalent (re-check it)")
    if survivors:
        print("surviving (see `mutmut show NAME`):")
        for n in survivors:
            print(f"  {n}: {counted[n]}")
    score = killed / len(counted) if counted else 0.0
    print(f"mutation score, core modules: {score:.3f} (goal >= {args.goal:g})")
    return 0 if score >= args.goal else 1


if __name__ == "__main__":
    sys.exit(main())
