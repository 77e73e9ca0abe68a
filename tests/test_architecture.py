"""lib/ is layered and its imports point one way (the README's "Layout" section, with its layer table).

The import graph is read from the source with ``ast``; an import inside a function counts
like one at the top of the file. Rules:

* every module of lib/ has a layer in :data:`LAYERS` (a new module must be placed there);
* a module imports only modules of its own layer or below, and the graph has no circle;
* a stage imports no other stage (it reads an earlier stage's files through the base
  layer's run layout); only the parts listed in :data:`STAGE_PARTS` are shared;
* imports of lib modules sit at the top of the file (none inside a function); any other import
  inside a function says why on its line (``# heavy: ...``), or moves to the top;
* no module is over 700 lines (one job per module);
* lib modules import each other relatively (``from .x import y``), with no fallback.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"

BASE, LOADERS, STAGES, ORCHESTRATION = 0, 1, 2, 3
LAYER_NAMES = {BASE: "base", LOADERS: "loaders", STAGES: "stages", ORCHESTRATION: "orchestration"}

# module -> layer (the README's "Layout" table lists the same)
LAYERS: dict[str, int] = {
    # base: configuration, files, rules; nothing here loads a model or runs a stage
    "__init__": BASE,
    "config": BASE,
    "io": BASE,
    "quiet": BASE,
    "secrets": BASE,
    "schema": BASE,
    "conditions": BASE,
    "layout": BASE,
    "runinfo": BASE,
    "costs": BASE,
    "metrics": BASE,
    "agreement": BASE,
    "judge_health": BASE,
    "judge_panel": BASE,
    "calibration": BASE,
    "notices": BASE,
    "replication": BASE,
    "chat": BASE,
    "scoring": BASE,
    "judge_protocol": BASE,
    "lock": BASE,
    "proc_guard": BASE,  # a script run by path (standard library only): stops a server when its starter dies
    "references": BASE,
    "progress": BASE,
    "notebook_html": BASE,
    # loaders: models, the embedded models (tiny, SmolLM2), training data, question sets
    "models": LOADERS,
    "embedded": LOADERS,
    "smollm2": LOADERS,
    "data": LOADERS,
    "questions": LOADERS,
    "external": LOADERS,
    "vllm_env": LOADERS,
    # stages: one module per stage (plus the parts in STAGE_PARTS)
    "train": STAGES,
    "evaluate": STAGES,
    "viewer": STAGES,
    "response_tables": STAGES,
    "decoding": STAGES,
    "evaluate_vllm": STAGES,
    "evaluate_vllm_worker": STAGES,  # a script for vLLM's own environment: imports vLLM and the standard library only
    "judge": STAGES,
    "judge_backends": STAGES,
    "judge_openai": STAGES,
    "judge_hf": STAGES,
    "judge_vllm": STAGES,
    "judge_calibrate": STAGES,
    "report": STAGES,
    "report_data": STAGES,
    "report_tables": STAGES,
    "report_views": STAGES,
    "report_judges": STAGES,
    "plots": STAGES,
    # orchestration: runs stages, decides what to skip
    "grid": ORCHESTRATION,
    "grid_jobs": ORCHESTRATION,
    "grid_checks": ORCHESTRATION,
    "grid_runner": ORCHESTRATION,
    "grid_report": ORCHESTRATION,
    "grid_executors": ORCHESTRATION,
    "grid_plan": ORCHESTRATION,
    "estimate": ORCHESTRATION,
    "fingerprint": ORCHESTRATION,
    # analyses beyond replication (05, 06): they run the train / evaluate / judge stages' functions
    "phase": ORCHESTRATION,
    "direction": ORCHESTRATION,
}

# a stage module -> the stage-layer modules it may import (its own parts)
STAGE_PARTS: dict[str, set[str]] = {
    "judge": {"judge_backends", "judge_openai", "judge_hf", "judge_vllm"},
    "judge_backends": {"judge_openai", "judge_hf", "judge_vllm"},  # the registry of the judge's backends
    "judge_vllm": {"judge_openai"},  # the vLLM-served judge calls its server through the API client
    "judge_calibrate": {"judge", "judge_backends"},  # the judge stage's calibration-set scoring
    "evaluate": {"decoding", "evaluate_vllm"},
    "report": {"plots", "viewer", "response_tables", "report_data", "report_tables", "report_views",
               "report_judges"},
    "report_tables": {"report_data"},
    "report_views": {"report_data"},
    "report_judges": {"report_data"},
    "response_tables": {"viewer"},
    "viewer": {"report_tables"},   # the notebook's answer browser shows final-checkpoint answers
}


def _lib_modules() -> list[str]:
    return sorted(p.stem for p in LIB.glob("*.py"))


def _imports(module: str) -> list[tuple[str, bool, bool]]:
    return _imports_in((LIB / f"{module}.py").read_text(encoding="utf-8"), set(_lib_modules()))


def _catches_import_error(node: ast.AST) -> bool:
    if not isinstance(node, ast.Try):
        return False
    names = set()
    for h in node.handlers:
        types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        names |= {t.id for t in types if isinstance(t, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception"})


def _imports_in(source: str, known: set[str]) -> list[tuple[str, bool, bool]]:
    """(imported lib module, inside a function, guarded) for each import of a lib module;
    guarded: an absolute ``lib.`` import, or one inside ``try: ... except ImportError``."""
    out: list[tuple[str, bool, bool]] = []

    def visit(node: ast.AST, in_function: bool, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                if child.level == 1 or (child.level == 0 and child.module and
                                        (child.module == "lib" or child.module.startswith("lib."))):
                    flag = guarded or child.level == 0
                    mod = (child.module or "") if child.level == 1 else child.module[len("lib"):].lstrip(".")
                    if mod:
                        out.append((mod.split(".")[0], in_function, flag))
                    else:  # from . import x, y / from lib import x
                        out.extend((a.name, in_function, flag) for a in child.names if a.name in known)
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("lib."):
                        out.append((a.name.split(".")[1], in_function, True))
            if _catches_import_error(child):
                for part in child.body:
                    visit(ast.Module(body=[part], type_ignores=[]), inner, True)
                for rest in (*child.handlers, *child.orelse, *child.finalbody):
                    visit(ast.Module(body=[rest], type_ignores=[]), inner, guarded)
            else:
                visit(child, inner, guarded)
    visit(ast.parse(source), False, False)
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in _lib_modules()}


def _violations(imports: dict[str, list[tuple[str, bool, bool]]] | None = None
                ) -> tuple[set[tuple[str, str]], set[tuple[str, str]], set[str]]:
    """(upward or stage-to-stage edges, imports inside functions, modules with absolute imports)."""
    if imports is None:
        imports = {m: _imports(m) for m in _lib_modules()}
    bad, lazy, fallbacks = set(), set(), set()
    for m, found in imports.items():
        for target, in_function, absolute in found:
            if in_function:
                lazy.add((m, target))
            if absolute:
                fallbacks.add(m)
            if m not in LAYERS or target not in LAYERS:
                continue
            if LAYERS[target] > LAYERS[m]:
                bad.add((m, target))
            elif LAYERS[m] == LAYERS[target] == STAGES and target != m and target not in STAGE_PARTS.get(m, set()):
                bad.add((m, target))
    return bad, lazy, fallbacks


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


README = LIB.parent / "README.md"
README_ROW = re.compile(r"^\| (base|loaders|stages|orchestration) \| `([a-z_0-9]+)` \| .+\|$")


def test_every_module_has_a_layer():
    missing = [m for m in _lib_modules() if m not in LAYERS]
    assert not missing, f"place these lib modules in LAYERS (tests/test_architecture.py): {missing}"
    gone = sorted(set(LAYERS) - set(_lib_modules()))
    assert not gone, f"LAYERS names modules that no longer exist: {gone}"


def test_readme_lists_every_module_in_its_layer():
    rows = [README_ROW.match(line) for line in README.read_text(encoding="utf-8").splitlines()]
    listed = {m.group(2): m.group(1) for m in rows if m}
    expected = {name: LAYER_NAMES[layer] for name, layer in LAYERS.items() if name != "__init__"}
    assert listed == expected


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_imports_point_down():
    bad, _, _ = _violations()
    assert not bad, "upward or stage-to-stage imports: " + ", ".join(
        f"{a} ({LAYER_NAMES[LAYERS[a]]}) -> {b} ({LAYER_NAMES[LAYERS[b]]})" for a, b in sorted(bad))


def test_lib_imports_at_top_of_file():
    _, lazy, _ = _violations()
    assert not lazy, f"lib imports inside functions (move them to the top of the file): {sorted(lazy)}"


def test_relative_imports_without_fallback():
    _, _, fallbacks = _violations()
    assert not fallbacks, f"absolute lib imports or 'except ImportError' fallbacks in: {sorted(fallbacks)}"


def test_checker_sees_a_circle_an_upward_import_and_a_lazy_one():
    """The rules above can fail: made-up graphs and sources that break each one."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    known = {"judge", "config", "train", "plots"}
    src = ("from .config import RunConfig\n"
           "def f():\n    from .judge import fill_prompt\n"
           "try:\n    from . import train, plots\nexcept ImportError:\n    import lib.train\n")
    found = _imports_in(src, known)
    assert found == [("config", False, False), ("judge", True, False), ("train", False, True),
                     ("plots", False, True), ("train", False, True)]
    bad, lazy, fallbacks = _violations({"models": found[:2], "evaluate": found[2:]})
    assert _imports_in("import lib.judge\n", known) == [("judge", False, True)]
    assert bad == {("models", "judge"), ("evaluate", "train"), ("evaluate", "plots")}
    assert lazy == {("models", "judge")}
    assert fallbacks == {"evaluate"}


def _unexplained_lazy_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function whose line carries no ``# reason`` comment."""
    lines = source.splitlines()
    out = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    last = lines[node.end_lineno - 1]
                    if not re.search(r"#\s*\S", last):
                        out.append(node.lineno)
    return sorted(set(out))


def test_every_lazy_import_says_why():
    """An import inside a function (torch, altair, scipy: heavy or optional) says why on its line,
    in a word; anything cheap belongs at the top of the file."""
    found = {m: lines for m in _lib_modules()
             if (lines := _unexplained_lazy_imports((LIB / f"{m}.py").read_text(encoding="utf-8")))}
    assert not found, ("imports inside functions without a '# reason' comment (say why, or move them "
                       f"to the top): {found}")


def test_lazy_import_checker_can_fail():
    src = ("import os\n"
           "def f():\n    import torch  # heavy\n    import pandas as pd\n"
           "    from scipy.stats import (\n        norm,\n    )\n"
           "    from x import (\n        y,\n    )  # optional\n")
    assert _unexplained_lazy_imports(src) == [4, 5]


MAX_LINES = 700


def test_no_module_over_700_lines():
    """A module that outgrows 700 lines holds more than one job: split it (the README's layer table)."""
    long = {m: n for m in _lib_modules()
            if (n := len((LIB / f"{m}.py").read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"lib modules over {MAX_LINES} lines: {long}"
