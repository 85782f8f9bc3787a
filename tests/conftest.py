"""Shared pytest configuration."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "zoo: spandrel zoo model outside ZOO_FAST (deselect with -m 'not zoo')"
    )
