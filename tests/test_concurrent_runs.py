"""Two runs at the same moment on one instance and one home: what a sensor and a schedule do.

`new_event_files` launches `ingest_and_monitor` when a file arrives; `weekly_retraining` (and
`retrain_on_drift`) launch `retrain_models`. Both need prior state (a champion to embed with and
to beat), so a small `full_pipeline` runs first; then `retrain_models` and `ingest_and_monitor`
start together, in two processes, on the CLI's instance (`prepare_instance`: pools limited to one
step, the `warehouse` pool set to 1 as `trace-dagster run` does). `ingest_and_monitor` reads a
new simulated week (a later start date: a new file), so it really writes the warehouse while
`retrain_models` rebuilds examples, trains, registers models in MLflow's SQLite store, promotes
and writes embeddings.

Both must succeed with no DuckDB "Could not set lock" nor SQLite "database is locked" anywhere in
their logs, and the `warehouse` steps of the two runs must never have run at the same time.

Run as a script, this module executes one job (the test's worker processes).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, query, small_run_config, tail

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a hang guard: the machine may be shared

LOCK_ERRORS = re.compile(r"could not set lock|database is locked|conflicting lock", re.IGNORECASE)
SIMULATOR = {"simulator_n_users": 300, "simulator_days": 35}
SMALL = {"epochs": 1, "bootstrap_samples": 30, "max_concurrent": 2}  # one epoch per model, two steps at once
NEW_WEEK = {"simulator_start_date": "2026-02-09"}  # the day after the first file's 35 days
WORKER_TIMEOUT_S = 600  # a hang guard per worker: retrain took >420 s on 2 cores shared with a training run


# ---------------------------------------------------------------------------------------------
# The worker: one job in this process, on the CLI's instance, started when `go` appears.


def run_job(job_name: str, run_config: dict, ready: Path, go: Path, result_path: Path) -> int:
    import dagster as dg
    from helpers import reconstructable_job

    from resources.warehouse import WAREHOUSE_POOL
    from trace_dagster.cli import prepare_instance

    prepare_instance()  # TRACE_DAGSTER_HOME from the environment, as the CLI
    job = reconstructable_job(job_name)
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        if storage.supports_global_concurrency_limits:  # what `trace-dagster run` does
            storage.set_concurrency_slots(WAREHOUSE_POOL, 1)
        ready.touch()
        deadline = time.monotonic() + 300
        while not go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{go} never appeared")
            time.sleep(0.05)
        started = time.time()
        with dg.execute_job(
            job, instance=instance, run_config=run_config, tags={"launched_by": "test_concurrent_runs"}
        ) as result:
            failures = [
                f"{e.step_key}: {e.step_failure_data.error.to_string()}" for e in result.all_events if e.is_step_failure
            ]
            result_path.write_text(
                json.dumps(
                    {
                        "job": job_name,
                        "run_id": result.run_id,
                        "success": result.success,
                        "started": started,
                        "ended": time.time(),
                        "failures": failures,
                    }
                )
            )
            return 0 if result.success else 1


# ---------------------------------------------------------------------------------------------
# The test


def start_worker(tmp_path: Path, name: str, job_name: str, run_config: dict, go: Path):
    config_path = tmp_path / f"{name}.run_config.json"
    config_path.write_text(json.dumps(run_config))
    ready, result, log = tmp_path / f"{name}.ready", tmp_path / f"{name}.result.json", tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                job_name,
                str(config_path),
                str(ready),
                str(go),
                str(result),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
    return {"name": name, "job": job_name, "process": process, "ready": ready, "result": result, "log": log}


def finish(worker: dict, timeout: float) -> dict:
    process = worker["process"]
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        pytest.fail(f"{worker['job']} did not finish in {timeout:.0f}s:\n{tail(worker['log'])}")
    if not worker["result"].exists():
        pytest.fail(f"{worker['job']} exited {process.returncode} without a result:\n{tail(worker['log'])}")
    outcome = json.loads(worker["result"].read_text())
    assert outcome["success"], f"{worker['job']} failed:\n" + "\n".join(outcome["failures"])[-6000:]
    assert process.returncode == 0, tail(worker["log"])
    return outcome


def kill_if_running(*workers: dict) -> None:
    for worker in workers:
        if worker["process"].poll() is None:
            os.killpg(worker["process"].pid, 9)
            worker["process"].wait()


def run_alone(tmp_path: Path, name: str, job_name: str, run_config: dict) -> dict:
    go = tmp_path / f"{name}.go"
    go.touch()
    worker = start_worker(tmp_path, name, job_name, run_config, go)
    try:
        return finish(worker, WORKER_TIMEOUT_S)
    finally:
        kill_if_running(worker)


def lock_errors_in(text: str) -> list[str]:
    return sorted({line.strip()[:300] for line in text.splitlines() if LOCK_ERRORS.search(line)})


def run_log_text(instance, run_id: str) -> str:
    """Every message of a run's event log, with the errors of failed steps and runs."""
    lines = []
    for entry in instance.all_logs(run_id):
        lines.append(entry.user_message or "")
        event = entry.dagster_event
        if event is not None:
            lines.append(event.message or "")
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                lines.append(error.to_string())
    return "\n".join(lines)


def step_intervals(instance, run_id: str, steps: set[str]) -> list[tuple[float, float, str]]:
    """(start, end, step) from STEP_START to STEP_SUCCESS/FAILURE of the given steps."""
    import dagster as dg

    starts, intervals = {}, []
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or entry.step_key not in steps:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[entry.step_key] = entry.timestamp
        elif event.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
            intervals.append((starts[entry.step_key], entry.timestamp, f"{run_id[:8]}:{entry.step_key}"))
    return intervals


def warehouse_steps(job_name: str) -> set[str]:
    from resources.warehouse import WAREHOUSE_POOL
    from trace_dagster.definitions import defs

    return {
        node.name
        for node in defs.resolve_job_def(job_name).nodes
        if getattr(node.definition, "pool", None) == WAREHOUSE_POOL
    }


def test_retraining_and_ingestion_at_the_same_moment(home: Path, tmp_path: Path, monkeypatch):
    import dagster as dg

    from trace_dagster.cli import prepare_instance

    monkeypatch.setenv("TRACE_DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))  # restored after the test
    prepare_instance(home)

    # Prior state: a champion, examples, embeddings (a tiny full_pipeline).
    first = run_alone(
        tmp_path, "full", "full_pipeline", small_run_config("full_pipeline", **SMALL, simulator=SIMULATOR)
    )

    # A "schedule tick" and a "new file" at the same moment.
    go = tmp_path / "together.go"
    retrain = start_worker(
        tmp_path, "retrain", "retrain_models", small_run_config("retrain_models", **SMALL, simulator=SIMULATOR), go
    )
    ingest = start_worker(
        tmp_path,
        "ingest",
        "ingest_and_monitor",
        small_run_config("ingest_and_monitor", **SMALL, simulator={**SIMULATOR, **NEW_WEEK}),
        go,
    )
    try:
        deadline = time.monotonic() + 180
        while not (retrain["ready"].exists() and ingest["ready"].exists()):
            for worker in (retrain, ingest):
                if worker["process"].poll() is not None:
                    pytest.fail(f"{worker['job']} exited before the start:\n{tail(worker['log'])}")
            assert time.monotonic() < deadline, "workers not ready in 180s"
            time.sleep(0.2)
        go.touch()
        outcomes = {w["job"]: finish(w, WORKER_TIMEOUT_S) for w in (retrain, ingest)}
    finally:
        kill_if_running(retrain, ingest)

    with dg.DagsterInstance.get() as instance:
        runs = {job: instance.get_run_by_id(o["run_id"]) for job, o in outcomes.items()}
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs.values())
        stats = {job: instance.get_run_stats(run.run_id) for job, run in runs.items()}
        # They really overlapped: each started before the other ended.
        (a, b) = stats.values()
        assert a.start_time < b.end_time and b.start_time < a.end_time, stats

        # No lock error anywhere: event logs, captured step output, worker output.
        texts = {f"event log {job}": run_log_text(instance, run.run_id) for job, run in runs.items()}
        texts["event log full_pipeline"] = run_log_text(instance, first["run_id"])
        for worker in (retrain, ingest):
            texts[f"worker {worker['job']}"] = worker["log"].read_text(errors="replace")
        for path in (home / "dagster" / "storage").rglob("*"):
            if path.is_file() and path.suffix in (".out", ".err", ".log"):
                texts[str(path)] = path.read_text(errors="replace")
        # The scan reads real logs: the step output captured in compute logs is among them.
        assert any("compute_logs" in where and text for where, text in texts.items()), sorted(texts)[:5]
        assert "ingested 1 file(s)" in texts["event log ingest_and_monitor"]
        found = {where: lock_errors_in(text) for where, text in texts.items() if lock_errors_in(text)}
        assert not found, f"lock errors: {json.dumps(found, indent=1)[:6000]}"

        # The warehouse pool (one writer for the DuckDB file) held across both runs.
        intervals = sorted(
            interval
            for job, run in runs.items()
            for interval in step_intervals(instance, run.run_id, warehouse_steps(job))
        )
        assert {i[2].split(":")[1] for i in intervals} >= {"ingested_events", "user_splits", "training_examples"}
        overlaps, latest = [], intervals[0]
        for interval in intervals[1:]:
            if interval[0] < latest[1]:
                overlaps.append((latest, interval))
            if interval[1] > latest[1]:
                latest = interval
        assert not overlaps, f"warehouse steps ran at the same time: {overlaps}"

    # The ingestion run added the new week while retraining ran.
    counts = query(
        home,
        "SELECT count(*) FILTER (WHERE event_time >= TIMESTAMP '2026-02-09') AS new_week, "
        "count(*) AS total FROM sessionized_events",
    ).iloc[0]
    assert 0 < counts["new_week"] < counts["total"], counts.to_dict()

    print(
        f"full_pipeline {first['ended'] - first['started']:.0f}s; together:",
        {job: f"{s.end_time - s.start_time:.0f}s" for job, s in stats.items()},
        f"overlap {min(a.end_time, b.end_time) - max(a.start_time, b.start_time):.0f}s;",
        f"{len(intervals)} warehouse steps, none at the same time",
    )


if __name__ == "__main__":
    job_name, config_path, ready, go, result_path = sys.argv[1:6]
    sys.exit(run_job(job_name, json.loads(Path(config_path).read_text()), Path(ready), Path(go), Path(result_path)))
