"""Shared fixtures. Tests never touch the network: models are built locally, servers bind 127.0.0.1.

Where tests live: a module's tests are in tests/test_<module>.py (lib/judge.py: test_judge.py,
lib/scoring.py: test_scoring.py, lib/metrics.py: test_metrics.py, ...); where one file would mix
setups that clash or grow too long, a topic file next to it carries the module's name first:
test_<module>_<topic>.py (test_metrics_intervals.py, test_metrics_bootstrap.py,
test_metrics_differences.py, test_judge_openai_retries.py, test_report_identity.py,
test_grid_lock.py). Tests across several stages are named by what they cover (test_grid_demo,
test_slurm, test_smollm2_pipeline, test_analysis_notebooks, test_file_modes, test_secrets_e2e) and
those of the scripts by the script (test_benchmarks, test_bench_interval, test_gpu_suite,
test_screenshots); test_architecture and test_repo_hygiene check the repository itself.

Shared helpers: fixtures here (``tiny`` and ``tiny_float64``: the embedded tiny model and its
tokenizer; ``tiny_model_dir``; ``static_server``); fakes and builders in tests/fakes/ (a scripted
chat server, judge inputs, synthetic runs, ``bench.load_bench``/``load_script`` for bench/ and
scripts/ files, ``floats.up``/``down`` for boundary values)."""
from __future__ import annotations

import functools
import http.server
import json
import os
import threading
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """lib.quiet's filters inside each test, before its fixtures (a module fixture may train):
    pytest runs every test in a warnings.catch_warnings block that drops the filters lib added
    when it was imported (during collection)."""
    from lib import quiet

    quiet.filter_warnings()


def pytest_collection_modifyitems(config, items):
    """Under mutmut (``make mutation``), one mutant's tests run cheapest module first, each
    module's tests cheapest first: pytest stops at the first failure (``-x``), so a mutant a
    unit test kills never waits for the stage-level tests. Order only: every test still runs
    for a surviving mutant. Durations come from mutmut's own stats run (mutants/mutmut-stats.json)."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from inside mutants/
    try:
        dur = json.loads(stats.read_text(encoding="utf-8"))["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return
    cost = {it.nodeid: float(dur.get(it.nodeid, 0.0)) for it in items}
    module_cost: dict[str, float] = {}
    for it in items:  # a module's weight is its slowest selected test (its fixtures are set up once)
        m = it.nodeid.split("::", 1)[0]
        module_cost[m] = max(module_cost.get(m, 0.0), cost[it.nodeid])
    items.sort(key=lambda it: (module_cost[it.nodeid.split("::", 1)[0]], it.nodeid.split("::", 1)[0], cost[it.nodeid]))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny Llama model (built once per cache)."""
    from lib.embedded import embedded_model_dir

    return embedded_model_dir()


def _tiny(dtype: str):
    from lib.models import load_model, load_tokenizer  # heavy (torch, transformers): only where a test asks

    tok = load_tokenizer("embedded:tiny", padding_side="left")
    model, _ = load_model("embedded:tiny", device="cpu", dtype=dtype)
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer) of the embedded tiny model on CPU in float32, the tokenizer padding on the
    left. Built once per test file that asks (module scope: a test may change the model's state)."""
    return _tiny("float32")


@pytest.fixture(scope="module")
def tiny_float64():
    """``tiny`` in float64 (tests comparing sampled values to a reference computed in float64)."""
    return _tiny("float64")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


@pytest.fixture
def static_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving files from a folder; yields (folder, base_url)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    handler.disable_nagle_algorithm = True
    srv = _Server(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
