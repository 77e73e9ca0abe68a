"""Project habits: lib/ is tracked, notebooks are committed clean, secrets and outputs stay out of git."""
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def test_lib_is_not_ignored():
    assert git("check-ignore", "-q", "lib/config.py").returncode == 1  # 1 = not ignored
    for p in ("outputs/x.parquet", ".env", ".venv/bin/python"):
        assert git("check-ignore", "-q", p).returncode == 0, p


def test_notebooks_have_no_outputs_and_one_parameters_cell():
    nbs = sorted((REPO / "notebooks").glob("*.ipynb"))
    if not nbs:
        pytest.skip("no notebooks yet")
    for nb_path in nbs:
        nb = json.loads(nb_path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert not any(c.get("outputs") for c in code), f"{nb_path.name} has stored outputs"
        assert not any(c.get("execution_count") for c in code), f"{nb_path.name} has execution counts"
        tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb_path.name}: expected exactly one 'parameters' cell"


def test_every_notebook_shows_tables_whole():
    """A shared notebook never elides a table ("..."): each one's first code cell sets pandas' display
    options before any table is shown, and the options really lift pandas' limits."""
    import pandas as pd

    from lib import plots

    for nb_path in sorted((REPO / "notebooks").glob("*.ipynb")):
        nb = json.loads(nb_path.read_text())
        first = next(c for c in nb["cells"] if c["cell_type"] == "code")
        assert "plots.display_options()" in "".join(first["source"]), nb_path.name
    wide = pd.DataFrame({f"column_{i}": range(80) for i in range(30)})
    wide["reason"] = "x" * 300
    with pd.option_context("display.max_rows", 10):
        plots.display_options()
        text = repr(wide)
        assert "..." not in text and "column_29" in text and "x" * 300 in text
    for key in ("display.max_rows", "display.max_columns", "display.max_colwidth", "display.width"):
        pd.reset_option(key)


def test_cpu_lock_pins_cpu_torch_and_no_cuda_packages():
    lock = (REPO / "requirements" / "cpu.lock").read_text().splitlines()
    assert "torch==2.13.0+cpu" in lock
    assert not [l for l in lock if l.lower().startswith(("nvidia-", "triton"))]


def test_ci_calls_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()
