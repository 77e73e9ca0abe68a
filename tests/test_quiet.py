"""lib.quiet: the known-harmless third-party warnings are filtered by message, nothing else is."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lib  # noqa: F401  (installs the filters)

REPO = Path(__file__).resolve().parent.parent
BNB = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _stderr_of(code: str, show_all: bool) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EM_LAB_SHOW_ALL_WARNINGS": "1" if show_all else "0"}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300).stderr


def test_bitsandbytes_kernel_message_is_dropped_only_by_lib():
    pytest.importorskip("bitsandbytes")
    code = "import lib, bitsandbytes"
    shown = _stderr_of(code, show_all=True)
    if BNB not in shown:
        pytest.skip("this bitsandbytes build does not print the message (the optional kernel loaded)")
    assert BNB not in _stderr_of(code, show_all=False)


def test_every_pattern_matches_the_message_it_is_for():
    """The patterns match the real messages (copied from the packages' sources) and not others."""
    real = ["`gradient_checkpointing` is deprecated and will be removed in v6. Use `activation_checkpointing` instead.",
            "`gradient_checkpointing_kwargs` is deprecated and will be removed in v6. Use "
            "`activation_checkpointing_kwargs` instead.",
            "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
            "instead.",
            "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
            "`activation_checkpointing_enable` instead."]
    import re

    pattern = re.compile(lib.quiet.WARNING_MESSAGES[0][1])
    assert all(pattern.match(m) for m in real)
    assert not pattern.match("`use_cache` is deprecated and will be removed in v6.")


def test_rename_warning_filtered_in_a_fresh_interpreter():
    code = ("import warnings, lib; warnings.warn('`gradient_checkpointing_kwargs` is deprecated and will be "
            "removed in v6. Use x instead.', FutureWarning); warnings.warn('other deprecation', FutureWarning)")
    err = _stderr_of(code, show_all=False)
    assert "other deprecation" in err and "gradient_checkpointing_kwargs" not in err
    assert "gradient_checkpointing_kwargs" in _stderr_of(code, show_all=True)


def test_rename_warning_filtered_inside_a_test():
    """pytest drops filters added at collection; tests/conftest.py re-applies them before each test."""
    import warnings

    with warnings.catch_warnings(record=True) as rec:
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
                      "`is_activation_checkpointing` instead.", FutureWarning)
        warnings.warn("other deprecation", FutureWarning)
    assert [str(r.message) for r in rec] == ["other deprecation"]
