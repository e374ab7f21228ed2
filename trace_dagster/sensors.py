"""Sensors: new event files start ingestion once; a failed drift check starts retraining once.

`new_event_files` registers every input file as an `event_files` partition of raw_events (its key
relative to the events root, `assets/ingestion/partitions.py`) and targets the changed files'
partitions, so each file's ingestion shows, and can be re-run, per partition in the UI. A file it
saw on an earlier tick that no longer exists loses its partition (a delete request, once); the
rows ingested from it stay in raw_events / rejected_events and in the `ingested_files` ledger:
deleting a source file is not a retraction. The deletion is recorded as an observation of
raw_events on that partition (source file, "deleted") and in the tick's log.

Both keep a cursor and give every run request a run key derived from what triggered it, so a
re-evaluation (a restarted daemon, a second tick on the same state) never launches twice.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg

from assets.ingestion.partitions import EVENT_FILES, covering_range
from resources.event_sources import EventSource, EventSourceError, partition_key_for
from trace_dagster.jobs import ingest_and_monitor, retrain_models

DRIFT_CHECK = dg.AssetCheckKey(dg.AssetKey("drift_report"), "drift_below_threshold")
#: Jobs that train before they check drift: a failure there means the drift persists after
#: training on these very data (the shift lies after the last cutoff, where examples only have
#: labels), so retraining again would loop without learning anything; new data re-checks it.
TRAINING_JOBS = frozenset({"full_pipeline", "retrain_models"})


def vanished_files(seen: dict[str, str], current: dict[str, str]) -> list[str]:
    """Paths of the cursor (files seen on an earlier tick) that are not listed now and no longer
    exist. A path that still exists but is not listed (the events spec was changed to another
    folder) has not been deleted: its partition is left alone."""
    return sorted(path for path in seen if path not in current and not Path(path).exists())


def deleted_file_observation(key: str, path: str) -> dg.AssetObservation:
    """The record of a deleted input file in raw_events' history, on the partition it removes."""
    return dg.AssetObservation(
        asset_key="raw_events",
        partition=key,
        description="Input file deleted: its event_files partition is removed; the rows ingested "
        "from it stay in raw_events and rejected_events (a deleted file is not a retraction).",
        metadata={"source_file": path, "read": "deleted", "partition_removed": True},
    )


def file_fingerprints(event_source: EventSource) -> dict[str, str]:
    """path -> "size:mtime_ns" of every readable input file: growth or a rewrite changes it."""
    inputs, _ignored = event_source.list_inputs()
    out = {}
    for item in inputs:
        stat = item.path.stat()
        out[str(item.path)] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return out


@dg.sensor(
    job=ingest_and_monitor,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds every event file under TRACE_DAGSTER_EVENTS as an `event_files` partition of raw_events "
    "and launches ingestion (and monitoring) of the files that appeared or changed.",
)
def new_event_files(context: dg.SensorEvaluationContext, event_source: EventSource):
    registered = context.instance.get_dynamic_partitions(EVENT_FILES.name)
    if event_source.uses_simulator:
        # The simulator's one file never changes: register its key (so the UI lists it, ready to
        # materialize) without generating it here, and launch nothing.
        skip = dg.SkipReason("TRACE_DAGSTER_EVENTS is unset: the built-in simulator has no new files")
        key = event_source.simulated_file_name()
        if key in registered:
            return skip
        return dg.SensorResult(skip_reason=skip, dynamic_partitions_requests=[EVENT_FILES.build_add_request([key])])
    seen = json.loads(context.cursor) if context.cursor else {}
    try:
        current = file_fingerprints(event_source)
        root = event_source.events_root()
    except EventSourceError as error:  # e.g. a drop folder with no event file yet: wait, say why
        return dg.SkipReason(str(error))
    keys = {path: partition_key_for(Path(path), root) for path in current}
    unregistered = sorted(set(keys.values()) - set(registered))
    requests = [EVENT_FILES.build_add_request(unregistered)] if unregistered else []
    # Files gone since the last tick: their partitions go (once: the cursor forgets the paths, and
    # a key already removed is not requested again); their rows stay in the warehouse.
    vanished = vanished_files(seen, current)
    live, present = set(keys.values()), set(registered)
    gone = {key: path for path in vanished if (key := partition_key_for(Path(path), root)) in present - live}
    events = [deleted_file_observation(key, path) for key, path in sorted(gone.items())]
    if gone:
        requests.append(EVENT_FILES.build_delete_request(sorted(gone)))
        context.log.info(
            f"{len(gone)} input file(s) deleted, their event_files partitions removed (rows ingested "
            f"from them stay in raw_events): {', '.join(sorted(gone)[:10])}"
        )
    changed = {path: fp for path, fp in current.items() if seen.get(path) != fp}
    if vanished or changed:
        kept = {path: fp for path, fp in seen.items() if path not in vanished}
        context.update_cursor(json.dumps({**kept, **current}, sort_keys=True))
    if not changed:
        skip = dg.SkipReason(
            f"no new files among {len(current)}" + (f"; {len(gone)} deleted file(s) unregistered" if gone else "")
        )
        return dg.SensorResult(skip_reason=skip, dynamic_partitions_requests=requests, asset_events=events)
    # The key names the exact (path, size, mtime) states: the same change never launches twice,
    # and every later growth of a file is a new state, hence a new run.
    run_key = "new-files-" + hashlib.sha256(json.dumps(sorted(changed.items())).encode()).hexdigest()[:16]
    new = [path for path in changed if path not in seen]
    # One run per tick: the changed files' partition, or the range of partitions spanning them
    # (unchanged files in between are skipped by the ingestion ledger, in milliseconds).
    _, target = covering_range(registered, [keys[path] for path in changed])
    single = target.pop("dagster/partition", None)
    request = dg.RunRequest(
        run_key=run_key,
        partition_key=single,
        tags={
            **target,
            "trace_dagster/trigger": "new_files",
            "trace_dagster/new_files": str(len(new)),
            "trace_dagster/changed_files": str(len(changed) - len(new)),
        },
    )
    return dg.SensorResult(run_requests=[request], dynamic_partitions_requests=requests, asset_events=events)


def _job_name(instance: dg.DagsterInstance, run_id: str) -> str | None:
    run = instance.get_run_by_id(run_id)
    return run.job_name if run is not None else None


def _run_in_progress(instance: dg.DagsterInstance, run_id: str) -> bool:
    run = instance.get_run_by_id(run_id)
    return run is not None and not run.is_finished


@dg.sensor(
    job=retrain_models,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Launches retraining when the gated input-drift check on drift_report fails (once per failed "
    "check; not for a check of a run that has just trained on the same data).",
)
def retrain_on_drift(context: dg.SensorEvaluationContext):
    last_seen = int(context.cursor) if context.cursor else 0
    history = context.instance.event_log_storage.get_asset_check_execution_history(DRIFT_CHECK, limit=50)
    newer = sorted((r for r in history if r.id > last_seen), key=lambda r: r.id)
    # A record is created PLANNED and completed in place: never move the cursor past one whose run
    # is still going. A PLANNED record of a finished run (it failed before the check ran) stays
    # PLANNED forever: step over it, or it would hide every later failure.
    running = [r.id for r in newer if r.status.value == "PLANNED" and _run_in_progress(context.instance, r.run_id)]
    newer = [r for r in newer if not running or r.id < min(running)]
    if not newer:
        return dg.SkipReason("no new completed drift check results")
    context.update_cursor(str(newer[-1].id))
    failed = [r for r in newer if r.status.value == "FAILED"]
    if not failed:
        return dg.SkipReason(f"{len(newer)} new drift check result(s), none failed")
    failed = [r for r in failed if _job_name(context.instance, r.run_id) not in TRAINING_JOBS]
    if not failed:
        return dg.SkipReason("drift persists right after training on the same data: waiting for new events")
    latest = failed[-1]
    return dg.RunRequest(
        run_key=f"drift-check-{latest.id}",
        tags={"trace_dagster/trigger": "drift", "trace_dagster/drift_check_run": latest.run_id},
    )


SENSORS = [new_event_files, retrain_on_drift]
