"""Shared fixtures. Tests never touch the network: models are built locally, servers bind 127.0.0.1."""
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
