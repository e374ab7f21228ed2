"""`event_files`: the dynamic partitions of `raw_events` / `rejected_events`, one per input file.

A key is the file's path relative to the events root (`EventSource.file_key`: `day1.csv`,
`2026/01/day1.csv.gz`; the simulator's generated file name by default). The key is stable: a
file that grows or is rewritten in place keeps its key, and re-materializing that partition reads
what changed (the file ledger of `raw_events.py`: appended rows only, or the rewrite in full).

Keys are added by whoever launches ingestion: the `new_event_files` sensor (a
`SensorResult.dynamic_partitions_requests`) and `trace-dagster run`. A run targets one key or a
range of keys (`dagster/asset_partition_range_start` / `_end`); ranges follow the order in which
keys were added, so `covering_range` spans the keys a launcher wants, and the ledger skips the
unchanged files that lie between them.

Keys are removed by the sensor only, for files it saw on an earlier tick that no longer exist (a
`build_delete_request`, once): the rows ingested from them stay in raw_events / rejected_events
and the ledger. Nothing is removed on the simulator, for an emptied or missing events root (an
unmounted volume), nor for files that still exist but fell out of a changed events spec.
`trace-dagster run` only adds keys: it keeps no memory of the files it saw, and "registered but
not listed" would also match the keys of another source sharing the instance (the simulator's).
"""

from collections.abc import Sequence

import dagster as dg

EVENT_FILES = dg.DynamicPartitionsDefinition(name="event_files")
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"


def covering_range(registered: Sequence[str], wanted: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """(keys to add, run tags targeting `wanted`) given the keys `registered` already, in order.

    New keys are appended (sorted) after the registered ones, as the instance will store them.
    One wanted key is a single-partition run; several are the range from the first to the last of
    them in that order. Empty `wanted`: no tags.
    """
    present = set(registered)
    new = sorted({key for key in wanted if key not in present})
    order = {key: i for i, key in enumerate([*registered, *new])}
    wanted = sorted(set(wanted), key=order.__getitem__)
    if not wanted:
        return new, {}
    if len(wanted) == 1:
        return new, {"dagster/partition": wanted[0]}
    return new, {RANGE_START_TAG: wanted[0], RANGE_END_TAG: wanted[-1]}
