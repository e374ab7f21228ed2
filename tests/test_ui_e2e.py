"""The UI end to end: `trace-dagster dev`, a run of `full_pipeline` launched through GraphQL, the
asset catalog and the definitions as the UI sees them, and a headless-Chromium capture of the
asset graph.

Why `trace-dagster dev` (= `dagster dev -w workspace.yaml` on the CLI's instance) and not the
webserver alone: an instance without `run_coordinator` in its dagster.yaml (ours) uses the
QueuedRunCoordinator, so a run launched from the UI or GraphQL stays QUEUED until the daemon
dequeues it; `dagster dev` starts the webserver *and* the daemon, the way a person opens the UI.
The daemon then hands the run to the DefaultRunLauncher (a run-worker subprocess of the code
server), whose multiprocess executor honours the `warehouse` pool of the instance.

Route of the asset graph in Dagster 1.13: `/asset-groups` ("Lineage", the global asset graph);
groups are collapsed unless named in `?expanded=` as `global@global:<group>`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import (
    REPO,
    GraphQL,
    default_signals,
    ensure_chromium,
    free_port,
    image_stats,
    run_chromium,
    small_run_config,
    stop_process_group,
    tail,
    wait_for_webserver,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LOCATION = "trace_dagster"  # workspace.yaml
REPOSITORY = "__repository__"  # the implicit repository of a Definitions object
JOBS = {"full_pipeline", "ingest_and_monitor", "retrain_models", "rollback_champion"}
SCHEDULES = {"weekly_retraining"}
SENSORS = {"new_event_files", "retrain_on_drift"}
RUN_TIMEOUT_S = 480
WINDOW = (1600, 1200)

LAUNCH_RUN = """
mutation Launch($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message path reason } }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}"""

RUN_STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status startTime endTime }
    ... on Error { message }
  }
}"""

RUN_LOGS = """
query Logs($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor, limit: 1000) {
    __typename
    ... on EventConnection {
      cursor hasMore
      events {
        __typename
        ... on MessageEvent { message level }
        ... on ExecutionStepFailureEvent { stepKey error { message stack causes { message } } }
        ... on RunFailureEvent { error { message stack } }
        ... on EngineEvent { error { message } }
      }
    }
    ... on Error { message }
  }
}"""

REPOSITORY_QUERY = """
query Repo($selector: RepositorySelector!) {
  repositoryOrError(repositorySelector: $selector) {
    __typename
    ... on Repository {
      jobs { name }
      schedules { id name cronSchedule scheduleState { status } }
      sensors { id name sensorState { status } }
      assetNodes { assetKey { path } groupName }
    }
    ... on Error { message }
  }
}"""

ASSET_CATALOG = """
{
  assetsOrError {
    __typename
    ... on AssetConnection {
      nodes { key { path } assetMaterializations(limit: 1) { runId timestamp } }
    }
    ... on Error { message }
  }
}"""

ASSET_METADATA = """
query Metadata($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        metadataEntries {
          label
          __typename
          ... on TableSchemaMetadataEntry { schema { columns { name type description } } }
          ... on TableMetadataEntry { table { records } }
        }
      }
    }
    ... on Error { message }
  }
}"""

#: Every asset that is a warehouse table: the catalog must show its columns.
TABLE_ASSETS = {
    "raw_events",
    "rejected_events",
    "sessionized_events",
    "user_splits",
    "training_examples",
    "funnel_examples",
    "evaluation_metrics",
    "user_embeddings",
    "drift_report",
}
PREVIEW_ASSETS = {"raw_events", "sessionized_events", "training_examples", "evaluation_metrics"}
SCHEMA_PAGE_ASSET = "sessionized_events"
SCHEMA_PAGE_WINDOW = (1600, 2000)

STOP_SENSOR = """
mutation Stop($id: String!) {
  stopSensor(id: $id) {
    __typename
    ... on StopSensorMutationResult { instigationState { name status } }
    ... on Error { message }
  }
}"""


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium, installed by scripts/install_test_deps.sh when missing."""
    return ensure_chromium()


@pytest.fixture
def dagster_dev(home: Path, tmp_path: Path, monkeypatch):
    """`trace-dagster dev` on a fresh home and a free loopback port; killed (whole group) at the end."""
    from trace_dagster.cli import prepare_instance

    # prepare_instance exports both variables; registering them with monkeypatch first makes
    # pytest restore the caller's values after the test.
    monkeypatch.setenv("TRACE_DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    dagster_home = prepare_instance(home)
    assert (dagster_home / "dagster.yaml").read_text().count("default_limit: 1") == 1
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    trace_dagster = Path(sys.executable).with_name("trace-dagster")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(trace_dagster), "dev", "-p", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group: the finalizer kills exactly it
            preexec_fn=default_signals,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_webserver(base_url, process, log, timeout=180)
        yield base_url, process, log
    finally:
        stop_process_group(process)


def run_failure_details(graphql: GraphQL, run_id: str) -> str:
    """The failing steps' errors (and the run failure) of a run, from its event log."""
    details, cursor = [], None
    while True:
        data = graphql(RUN_LOGS, {"runId": run_id, "cursor": cursor})["logsForRun"]
        if data["__typename"] != "EventConnection":
            return f"logsForRun: {data}"
        for event in data["events"]:
            error = event.get("error")
            if event["__typename"] == "ExecutionStepFailureEvent" and error:
                details.append(f"step {event['stepKey']}: {error['message']}\n{''.join(error['stack'][-8:])}")
            elif event["__typename"] in ("RunFailureEvent", "EngineEvent") and error:
                details.append(f"{event['__typename']}: {event['message']}\n{error['message']}")
        cursor = data["cursor"]
        if not data["hasMore"]:
            return "\n---\n".join(details) or "no step failure recorded"


def wait_for_run(graphql: GraphQL, run_id: str, log: Path, timeout: float) -> dict:
    """Poll until the run ends; fail fast if it never leaves QUEUED (no daemon) or fails."""
    started = time.monotonic()
    seen = []
    while True:
        run = graphql(RUN_STATUS, {"runId": run_id})["runOrError"]
        assert run["__typename"] == "Run", run
        status = run["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        elapsed = time.monotonic() - started
        if status == "SUCCESS":
            return {"statuses": seen, "seconds": elapsed}
        if status in ("FAILURE", "CANCELED", "CANCELING"):
            pytest.fail(
                f"run {run_id} ended {status} (statuses {seen}):\n"
                f"{run_failure_details(graphql, run_id)}\n--- dagster dev log ---\n{tail(log, 3000)}"
            )
        if status == "QUEUED" and elapsed > 90:
            pytest.fail(
                f"run {run_id} still QUEUED after {elapsed:.0f}s: the QueuedRunCoordinator needs "
                f"the daemon (dagster dev starts one)\n{tail(log, 3000)}"
            )
        if elapsed > timeout:
            pytest.fail(f"run {run_id} not finished after {elapsed:.0f}s (statuses {seen})")
        time.sleep(3)


def test_full_pipeline_through_the_ui(dagster_dev, chromium, home: Path, tmp_path: Path):
    from trace_dagster.definitions import defs

    base_url, _process, log = dagster_dev
    graphql = GraphQL(base_url)
    selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}

    # The definitions as the UI lists them: jobs, the schedule, the sensors (default RUNNING).
    repo = graphql(REPOSITORY_QUERY, {"selector": selector})["repositoryOrError"]
    assert repo["__typename"] == "Repository", repo
    assert {j["name"] for j in repo["jobs"]} >= JOBS
    schedules = {s["name"]: s for s in repo["schedules"]}
    sensors = {s["name"]: s for s in repo["sensors"]}
    assert set(schedules) >= SCHEDULES and set(sensors) >= SENSORS
    assert {s["sensorState"]["status"] for s in sensors.values()} == {"RUNNING"}
    assert schedules["weekly_retraining"]["scheduleState"]["status"] == "RUNNING"
    # The daemon evaluates the sensors: retrain_on_drift would launch retrain_models as soon as a
    # drift check of our run failed, and that run would compete with this test for two cores.
    for name in SENSORS:
        stopped = graphql(STOP_SENSOR, {"id": sensors[name]["id"]})["stopSensor"]
        assert stopped["__typename"] == "StopSensorMutationResult", stopped
        assert stopped["instigationState"]["status"] == "STOPPED"

    expected_keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"/".join(n["assetKey"]["path"]) for n in repo["assetNodes"]} == expected_keys

    # Launch full_pipeline, small, through GraphQL (what the Launchpad does).
    run_config = small_run_config(
        "full_pipeline",
        epochs=1,
        bootstrap_samples=30,
        simulator={"simulator_n_users": 300, "simulator_days": 35},
        max_concurrent=2,
    )
    launched = graphql(
        LAUNCH_RUN,
        {
            "executionParams": {
                "selector": {**selector, "jobName": "full_pipeline"},
                "runConfigData": run_config,
                "executionMetadata": {"tags": [{"key": "launched_by", "value": "test_ui_e2e"}]},
            }
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    outcome = wait_for_run(graphql, run_id, log, timeout=RUN_TIMEOUT_S)
    print(f"run {run_id}: {' -> '.join(outcome['statuses'])} in {outcome['seconds']:.0f}s")

    # The asset catalog: every asset of the definitions, materialized by this run.
    catalog = graphql(ASSET_CATALOG)["assetsOrError"]
    assert catalog["__typename"] == "AssetConnection", catalog
    latest = {"/".join(n["key"]["path"]): n["assetMaterializations"] for n in catalog["nodes"]}
    assert expected_keys <= set(latest), f"missing from the catalog: {sorted(expected_keys - set(latest))}"
    assert {"raw_events", "sessionized_events", "trace_model", "drift_report"} <= expected_keys
    full_pipeline_keys = {
        k.to_user_string() for k in defs.resolve_job_def("full_pipeline").asset_layer.selected_asset_keys
    }
    assert full_pipeline_keys == expected_keys - {"reproduction_runs", "ablation_runs", "reproduction_report"}
    not_materialized = sorted(k for k in full_pipeline_keys if not latest[k] or latest[k][0]["runId"] != run_id)
    assert not not_materialized, f"not materialized by run {run_id}: {not_materialized}"

    # The asset graph, rendered by the UI's JavaScript in headless Chromium, every group expanded.
    graphql("mutation { setNuxSeen }")  # the "join the community" dialog would cover the graph
    groups = sorted({n["groupName"] for n in repo["assetNodes"]})
    url = f"{base_url}/asset-groups?expanded=" + quote(",".join(f"global@global:{g}" for g in groups))
    screenshot = tmp_path / "asset_graph.png"
    shot = run_chromium(url, tmp_path / "chromium-shot", f"--screenshot={screenshot}", window=WINDOW)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr[-3000:]
    reports = home / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    shutil.copy(screenshot, reports / "asset_graph.png")
    size, grey_std, grey_levels = image_stats(screenshot)
    assert size == WINDOW
    assert grey_std > 5 and grey_levels > 20, f"blank-looking screenshot: std {grey_std:.1f}, {grey_levels} levels"

    dumped = run_chromium(url, tmp_path / "chromium-dom", "--dump-dom", window=WINDOW)
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    dom = dumped.stdout
    assert "Global asset lineage" in dom, dom[:2000]
    # Node labels of the graph (long names may be shortened with an ellipsis, and only nodes in
    # the viewport are rendered): these two must be drawn, and most of the others.
    drawn = sorted(k for k in expected_keys if f">{k}<" in dom)
    assert "sessionized_events" in drawn, f"drawn: {drawn}"
    assert len(drawn) >= len(expected_keys) // 2, f"only {drawn} of {sorted(expected_keys)} drawn"
    # The global graph outgrew one viewport (nodes outside it are not rendered), so the TRACE
    # model is looked for on its own group's page, where the whole group fits.
    group_url = f"{base_url}/locations/trace_dagster/asset-groups/trace_models"
    group_dom = run_chromium(group_url, tmp_path / "chromium-group", "--dump-dom", window=WINDOW)
    assert group_dom.returncode == 0, group_dom.stderr[-3000:]
    group_drawn = sorted(k for k in expected_keys if f">{k}<" in group_dom.stdout)
    assert "trace_model" in group_drawn, f"drawn on the trace_models page: {group_drawn}"
    print(
        f"screenshot {screenshot} (copied to {reports / 'asset_graph.png'}): {size}, std {grey_std:.1f}; "
        f"{len(drawn)}/{len(expected_keys)} asset names in the DOM"
    )

    # The catalog: every warehouse table reports its columns (types and descriptions), four a preview.
    for key in sorted(TABLE_ASSETS):
        asset = graphql(ASSET_METADATA, {"key": {"path": [key]}})["assetOrError"]
        assert asset["__typename"] == "Asset", asset
        entries = {e["label"]: e for e in asset["assetMaterializations"][0]["metadataEntries"]}
        schema = entries.get("dagster/column_schema")
        assert schema and schema["__typename"] == "TableSchemaMetadataEntry", f"{key}: no column schema"
        columns = schema["schema"]["columns"]
        assert len(columns) >= 2 and all(c["type"] for c in columns), f"{key}: {columns}"
        undescribed = [c["name"] for c in columns if not c["description"]]
        assert not undescribed, f"{key}: columns without a description: {undescribed}"
        if key in PREVIEW_ASSETS:
            assert entries["preview"]["__typename"] == "TableMetadataEntry", f"{key}: {entries['preview']}"
            assert entries["preview"]["table"]["records"], f"{key}: empty preview"

    # One table asset's page, as a person opens it from the catalog: its columns are drawn.
    page = f"{base_url}/assets/{SCHEMA_PAGE_ASSET}"
    asset_png = tmp_path / "asset_page.png"
    shot = run_chromium(page, tmp_path / "chromium-asset", f"--screenshot={asset_png}", window=SCHEMA_PAGE_WINDOW)
    assert shot.returncode == 0 and asset_png.exists(), shot.stderr[-3000:]
    shutil.copy(asset_png, reports / "asset_page.png")
    size, grey_std, grey_levels = image_stats(asset_png)
    assert size == SCHEMA_PAGE_WINDOW and grey_std > 5 and grey_levels > 20, (size, grey_std, grey_levels)
    dom = run_chromium(page, tmp_path / "chromium-asset-dom", "--dump-dom", window=SCHEMA_PAGE_WINDOW).stdout
    for column in ("session_id", "event_index_in_session", "log_seconds_since_prev_event"):
        assert column in dom, f"column {column} not on the page of {SCHEMA_PAGE_ASSET}"
    assert "0-based position of the event in its session." in dom  # a description, from columns.py
    print(f"asset page {asset_png} (copied to {reports / 'asset_page.png'}): {size}, std {grey_std:.1f}")
