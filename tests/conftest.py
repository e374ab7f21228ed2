"""Shared fixtures: every test gets its own TRACE_DAGSTER_HOME under tmp_path."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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


def pipeline_resources(home: Path, events: str = "", events_format: str = "", **simulator) -> dict:
    """The resources of `trace_dagster.definitions`, pointed at `home` and an event source."""
    from resources.event_sources import EventSource
    from resources.paths import TraceDagsterPaths
    from resources.warehouse import DuckDBWarehouse

    paths = TraceDagsterPaths(home=str(home))
    return {
        "paths": paths,
        "warehouse": DuckDBWarehouse(paths=paths, memory_limit="1GB", threads=2),
        "event_source": EventSource(paths=paths, events=str(events), events_format=events_format, **simulator),
    }


def materialize_pipeline(
    resources: dict,
    run_config: dict | None = None,
    sessionize: bool = True,
    raise_on_error: bool = True,
    max_rejected_share: float = 1.0,
):
    """Materialize ingestion (and sessionization) with their checks, in process.

    Hand-made bad-input files are mostly bad rows, so the rejected-share check is relaxed unless
    a test sets it (through `max_rejected_share` or its own run_config).
    """
    import dagster as dg

    from assets.ingestion.raw_events import ingested_events, ingestion_checks
    from assets.ingestion.sessionized_events import sessionization_checks, sessionized_events

    definitions = [ingested_events, ingestion_checks]
    if sessionize:
        definitions += [sessionized_events, sessionization_checks]
    run_config = dict(run_config or {})
    ops = dict(run_config.get("ops", {}))
    ops.setdefault("ingestion_checks", {"config": {"max_rejected_share": max_rejected_share}})
    run_config["ops"] = ops
    return dg.materialize(definitions, resources=resources, run_config=run_config, raise_on_error=raise_on_error)


def query(home: Path, sql: str) -> pd.DataFrame:
    """Read the warehouse of `home` (read-only, UTC session)."""
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).df()
    finally:
        con.close()


def check_results(result) -> dict[str, bool]:
    """{'asset:check': passed} of a materialize() result."""
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}


def write_lines(path: Path, lines: list[str], trailing_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + ("\n" if trailing_newline else "")).encode())
    return path
