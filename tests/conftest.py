"""Shared pytest configuration."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "zoo: spandrel zoo model outside ZOO_FAST (deselect with -m 'not zoo')"
    )


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's reporter
    """Print how many random networks the fuzz suite checked (CI logs show it)."""
    import sys

    fuzz = sys.modules.get("test_fuzz") or sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.STATS:
        terminalreporter.write_line(f"fuzz examples checked: {dict(fuzz.STATS)}")
