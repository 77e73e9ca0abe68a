"""The planted bugs that once survived the whole suite, each planted again and shown caught.

Issue 19 planted small, plausible bugs in the core one at a time; these seven survived every
test then. For each, this script copies the repository's tracked files to a temporary folder,
plants the bug there (your checkout is never touched), and runs the test named to catch it:
the test must fail with the bug and pass without it. A bug whose code has moved so that it can
no longer be planted is reported as such (update its anchor text here when you move the code).

    python bench/planted_mutants.py            # all seven, ~2 minutes on 2 cores
    python bench/planted_mutants.py --only min_mass_boundary

Last line: ``planted mutants caught: <k>/<n> (goal <n>/<n>)``; exit 1 when one survives,
2 when one cannot be planted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("generate_ignores_attention_mask",
           "_generate_batch attends to the left padding (all-ones attention mask)",
           "lib/evaluate.py",
           "model.generate(input_ids=input_ids, attention_mask=attention_mask,",
           "model.generate(input_ids=input_ids, attention_mask=torch.ones_like(attention_mask),",
           ("tests/test_evaluate.py::test_batched_greedy_answers_equal_one_prompt_at_a_time",)),
    Mutant("evaluate_fingerprint_drops_question_contents",
           "the evaluate stage's fingerprint names the question-set files but not their contents",
           "lib/fingerprint.py",
           '"question_sets": text_sources_identity(cfg.question_sets, cfg.outputs_dir, offline),\n'
           '                  "model": model_identity(',
           '"question_sets": list(cfg.question_sets),\n'
           '                  "model": model_identity(',
           ("tests/test_fingerprint.py::test_each_input_change_moves_exactly_the_stages_that_read_it",)),
    Mutant("judge_fingerprint_drops_judge_model_files",
           "the judge stage's fingerprint names an in-process judge model but not its files",
           "lib/fingerprint.py",
           'inputs["judge_model"] = model_identity(cfg.judge_model, "", cache)',
           'inputs["judge_model"] = cfg.judge_model',
           ("tests/test_fingerprint.py::test_each_input_change_moves_exactly_the_stages_that_read_it",)),
    Mutant("bootstrap_never_draws_last_question",
           "the clustered bootstrap draws question indices from 0..m-2",
           "lib/metrics.py",
           "idx = rng.integers(0, len(k), size=(n_boot, len(k)))",
           "idx = rng.integers(0, len(k) - 1, size=(n_boot, len(k)))",
           ("tests/test_metrics_bootstrap.py::test_every_question_is_drawn",)),
    Mutant("bootstrap_90_not_95",
           "the clustered bootstrap returns a 90% interval whatever confidence it is given",
           "lib/metrics.py",
           "return (rate, *_percentile_ci(_ratio_draws(k, n, idx), confidence))",
           "return (rate, *_percentile_ci(_ratio_draws(k, n, idx), 0.90))",
           ("tests/test_metrics_bootstrap.py::test_cluster_bootstrap_default_is_a_95_percent_interval",)),
    Mutant("min_mass_boundary",
           "score_from_logprobs drops a score whose numeric mass equals min_mass (<= instead of <)",
           "lib/scoring.py",
           "if mass <= 0 or mass < min_mass:",
           "if mass <= 0 or mass <= min_mass:",
           ("tests/test_scoring.py::test_min_mass_boundary_scores_at_equality",)),
    Mutant("hf_sampled_judge_attends_to_padding",
           "the in-process judge's sampled method generates a padded batch without its attention mask",
           "lib/judge_hf.py",
           "gen = self.model.generate(**enc, max_new_tokens=",
           'gen = self.model.generate(input_ids=enc["input_ids"], attention_mask=torch.ones_like('
           'enc["attention_mask"]), max_new_tokens=',
           ("tests/test_judge_hf.py::test_hf_sampled_greedy_replies_equal_each_prompt_generated_alone",)),
]


def copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def run_tests(tree: Path, tests: tuple[str, ...]) -> int:
    """pytest's exit code in that tree: 0 passed, 1 a test failed, anything else an error."""
    # every copy reuses the tiny model in the machine's cache (lib.embedded.machine_cache_dir)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                       cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode not in (0, 1):
        print(r.stdout[-3000:] + r.stderr[-3000:], file=sys.stderr)
    return r.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="names of mutants to check")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="em-lab-mutants-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        if run_tests(clean, tests) != 0:
            print(f"the named tests fail WITHOUT any planted bug: {' '.join(tests)}", file=sys.stderr)
            return 1
        caught, unplantable = 0, []
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            target = tree / m.file
            text = target.read_text(encoding="utf-8")
            if text.count(m.old) != 1:
                unplantable.append(m.name)
                print(f"{m.name}: cannot plant: anchor found {text.count(m.old)} times in {m.file}")
                continue
            target.write_text(text.replace(m.old, m.new), encoding="utf-8")
            rc = run_tests(tree, m.tests)
            caught += rc == 1  # a test failed; an import error or no test collected is no catch
            verdict = {0: "SURVIVED", 1: "caught"}.get(rc, f"ERROR (pytest exit {rc})")
            print(f"{m.name}: {verdict} by {', '.join(m.tests)}  ({m.what})")
            shutil.rmtree(tree, ignore_errors=True)
    n = len(chosen)
    print(f"planted mutants caught: {caught}/{n} (goal {n}/{n})")
    if unplantable:
        return 2
    return 0 if caught == n else 1


if __name__ == "__main__":
    sys.exit(main())
