"""Shared pytest configuration."""

from __future__ import annotations

import pytest
import torch


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest's reporter
    """Print how many random networks the fuzz suite checked (CI logs show it)."""
    import sys

    fuzz = sys.modules.get("test_fuzz") or sys.modules.get("tests.test_fuzz")
    if fuzz is not None and fuzz.STATS:
        terminalreporter.write_line(f"fuzz examples checked: {dict(fuzz.STATS)}")


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: a second thread only adds contention on a shared 2-core machine.

    Modules that want it say ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
