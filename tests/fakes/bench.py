"""The repository's scripts as modules, for tests that call a bench/ or scripts/ file's functions
directly instead of running it: ``load_bench("interval_coverage")`` is bench/interval_coverage.py,
``load_script("screenshots")`` is scripts/screenshots.py."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def _load(path: Path, module_name: str) -> ModuleType:
    """Executes the file as a new module, registered in sys.modules first (a script's dataclasses
    look their module up while they are built)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module."""
    return _load(REPO / "bench" / f"{name}.py", f"bench_{name}")


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module."""
    return _load(REPO / "scripts" / f"{name}.py", f"scripts_{name}")
