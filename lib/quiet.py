"""Known-harmless third-party warnings, filtered where they are raised, by message, in one place.

Each entry says what prints it, why it is harmless here, and matches only that message, so a new
or different warning from the same package still shows. ``install()`` runs when ``lib`` is
imported (notebooks, the grid runner, tests); ``EM_LAB_SHOW_ALL_WARNINGS=1`` turns it off.
``tests/test_grid_demo.py::test_rendered_notebooks_have_no_stderr_blocks`` fails on any stderr
block in the demo's rendered notebooks, so a new third-party warning is seen and either fixed or
listed here.

| source | message | why it is harmless |
|---|---|---|
| bitsandbytes (logger ``bitsandbytes.backends.cpu.ops``) | Failed to load CPU gemm_4bit_forward from kernels-community | an optional faster CPU kernel from the Hugging Face hub (package ``kernels``); bitsandbytes falls back to its own CPU code, which the 4-bit tests exercise |
| transformers (FutureWarning) | `gradient_checkpointing...` / `is_gradient_checkpointing` is deprecated ... Use `activation_checkpointing...` | transformers 5.x renames; TRL and PEFT still call the old names inside their own code, and behaviour is unchanged until v6 (``pyproject.toml`` caps transformers below 6) |
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# (logger name, regex of the message) for warnings raised through logging
LOG_MESSAGES: list[tuple[str, str]] = [
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
]
# (category, regex of the message) for warnings raised through the warnings module
WARNING_MESSAGES: list[tuple[type[Warning], str]] = [
    (FutureWarning, r"`(is_)?gradient_checkpointing(_kwargs|_enable)?` is deprecated and will be removed in v6"),
]


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


_installed = False


def filter_warnings() -> None:
    """The warnings-module part of :func:`install`, again: a ``warnings.catch_warnings`` block
    (pytest runs collection and each test in one) drops filters added inside it, so tests
    re-apply them per test (tests/conftest.py). Idempotent: an identical filter is replaced."""
    if os.environ.get("EM_LAB_SHOW_ALL_WARNINGS") == "1":
        return
    for category, pattern in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def install() -> None:
    """Filter the warnings listed above (idempotent)."""
    global _installed
    if _installed or os.environ.get("EM_LAB_SHOW_ALL_WARNINGS") == "1":
        return
    by_logger: dict[str, list[str]] = {}
    for name, pattern in LOG_MESSAGES:
        by_logger.setdefault(name, []).append(pattern)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropMessages(patterns))
    filter_warnings()
    _installed = True
