"""Shared fixtures: every test gets its own TRACE_DAGSTER_HOME under tmp_path (helpers: `helpers.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items):
    """Lint and format first: a style failure shows before minutes of end-to-end tests."""
    items.sort(key=lambda item: item.get_closest_marker("style") is None)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """No test reads or writes the developer's real home or event settings."""
    monkeypatch.setenv("TRACE_DAGSTER_HOME", str(tmp_path / "trace_home"))
    monkeypatch.delenv("TRACE_DAGSTER_EVENTS", raising=False)
    monkeypatch.delenv("TRACE_DAGSTER_EVENTS_FORMAT", raising=False)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "trace_home"
