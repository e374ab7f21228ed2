"""Sequence examples from the warehouse to shards on disk, one user-hash bucket at a time.

Why: holding every event of the example users and every encoded example in one process grows
with the data (0.8 GB of tensors per 100k examples, plus the events). Here the example users are
split into buckets by a stable hash (md5) of their id; each bucket's events and examples are
read from DuckDB as Arrow record batches, encoded, and appended as a shard per split
(`model_lib/sequence_shards.py`). Two passes: the first fits the encoder's vocabularies and time
statistics on the training examples (their counts add up across buckets), the second encodes.
Memory is bounded by the bucket size (`events_per_bucket`), which is config, not by the table.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from assets.common.training import user_sample_sql
from model_lib.embedding_service import labels_tensor
from model_lib.encoding import EncoderConfig, SequenceEncoder
from model_lib.sequence_shards import ShardedExamples, ShardWriter
from model_lib.trace_baselines import encoder_config_for
from resources.warehouse import quote_ident, stage_by_bucket, user_hash_sql

SPLITS = ("train", "valid", "test")
ARROW_BATCH_ROWS = 262_144
EVENTS_PER_BUCKET = 2_000_000
STAGING_FOLDER = "_staged"  # under a shards root: `stage_buckets`' scratch, removed by `write_sequence_shards`
MODEL_KEYS = ("cat_ids", "time_features", "event_pos", "session_pos", "mask", "labels")


def user_bucket_sql(column: str, buckets: int) -> str:
    """The bucket in [0, buckets) of a user id that its events and examples are read in (`user_hash_sql`)."""
    return user_hash_sql(column, buckets)


def bucket_count(con: duckdb.DuckDBPyConnection, events_per_bucket: int) -> int:
    """Buckets so that each holds about ``events_per_bucket`` events of example users."""
    (n_events,) = con.execute(
        "SELECT count(*) FROM sessionized_events "
        "WHERE user_id IN (SELECT DISTINCT user_id FROM training_examples) "
        "AND event_time < (SELECT max(cutoff) FROM training_examples)"
    ).fetchall()[0]
    return max(1, math.ceil(n_events / max(1, events_per_bucket)))


def examples_condition(splits: tuple[str, ...] = SPLITS, train_sample: str = "true") -> str:
    """SQL condition on `training_examples`: rows of ``splits``, and of the training split only the
    users meeting ``train_sample`` (a condition on `user_id`; valid and test stay whole)."""
    split_list = ", ".join(f"'{s}'" for s in splits)
    return f"split IN ({split_list}) AND (split <> 'train' OR ({train_sample}))"


EVENT_COLUMNS_SQL = "* EXCLUDE (source_file, source_row, ingested_at)"  # what `read_bucket` gives of an event


@dataclass(frozen=True)
class StagedBuckets:
    """The example users' events and examples written once per user-hash bucket (`stage_buckets`):
    per bucket that has rows, the relation of its staged rows."""

    events: dict[int, str]
    examples: dict[int, str]
    buckets: int
    event_columns: str  # the SELECT list of the staged events


def event_columns_sql(con: duckdb.DuckDBPyConnection, encoder: SequenceEncoder) -> str:
    """The SELECT list of the `sessionized_events` columns ``encoder`` reads (of those
    `read_bucket` gives, in the table's order: `SequenceEncoder.event_columns`)."""
    available = [d[0] for d in con.execute(f"SELECT {EVENT_COLUMNS_SQL} FROM sessionized_events LIMIT 0").description]
    return ", ".join(quote_ident(c) for c in encoder.event_columns(available))


def stage_buckets(
    con: duckdb.DuckDBPyConnection,
    buckets: int,
    folder: Path,
    splits: tuple[str, ...] = SPLITS,
    train_sample: str = "true",
    event_columns: str = EVENT_COLUMNS_SQL,
) -> StagedBuckets:
    """Write the rows `read_bucket` reads, for every bucket at once, under ``folder`` (scratch: the
    caller removes it): the `training_examples` rows of ``splits`` (of the training split only the
    users meeting ``train_sample``) and their users' events before the last cutoff (the columns of
    the SELECT list ``event_columns``), each in one pass partitioned by bucket (`stage_by_bucket`).
    Then a bucket's read is a read of its folders, not a scan and an md5 of every row of the tables.
    The events' write is the cost of this pass (~7 s of 19 columns, ~4.5 s of 14 at 1e7 events):
    stage only the columns the reader uses (`event_columns_sql`)."""
    wanted = examples_condition(splits, train_sample)
    bucket = user_bucket_sql("user_id", buckets)
    examples = stage_by_bucket(
        con, f"SELECT * FROM training_examples WHERE {wanted}", bucket, buckets, folder / "examples"
    )
    events = stage_by_bucket(
        con,
        f"""
        SELECT {event_columns} FROM sessionized_events
        WHERE user_id IN (SELECT DISTINCT user_id FROM training_examples WHERE {wanted})
          AND event_time < (SELECT max(cutoff) FROM training_examples)""",
        bucket,
        buckets,
        folder / "events",
    )
    return StagedBuckets(events, examples, buckets, event_columns)


def read_bucket(
    con: duckdb.DuckDBPyConnection,
    bucket: int,
    buckets: int,
    splits: tuple[str, ...] = SPLITS,
    train_sample: str = "true",
    staged: StagedBuckets | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(events, examples) of the example users in one bucket, read as Arrow record batches; of
    the training users, only those meeting ``train_sample`` (a SQL condition on `user_id`).

    From ``staged`` (`stage_buckets` of the same buckets, of splits and a training sample that
    hold these) if given: a loop over the buckets must stage them, else every bucket filters the
    whole tables by an md5 of each user id (`_filtered`: a one-off read, the tests)."""
    if staged is None:
        examples_of, events_of = _filtered(bucket, buckets)
    else:
        if staged.buckets != buckets:
            raise ValueError(f"staged for {staged.buckets} buckets, read as one of {buckets}")
        examples_of = staged.examples.get(bucket, "(SELECT * FROM training_examples LIMIT 0)")
        events_of = staged.events.get(bucket, f"(SELECT {staged.event_columns} FROM sessionized_events LIMIT 0)")
    wanted = examples_condition(splits, train_sample)
    examples = _arrow_frame(con, f"SELECT * FROM {examples_of} WHERE {wanted} ORDER BY example_id")
    events = _arrow_frame(
        con,
        f"""
        SELECT * FROM {events_of}
        WHERE user_id IN (SELECT DISTINCT user_id FROM {examples_of} WHERE {wanted})
        ORDER BY user_id, event_index""",
    )
    return events, examples


def _filtered(bucket: int, buckets: int) -> tuple[str, str]:
    """(examples, events) of one bucket as filters of the whole tables (no staging)."""
    in_bucket = f"{user_bucket_sql('user_id', buckets)} = {int(bucket)}"
    return (
        f"(SELECT * FROM training_examples WHERE {in_bucket})",
        f"""(SELECT {EVENT_COLUMNS_SQL} FROM sessionized_events
            WHERE {in_bucket} AND event_time < (SELECT max(cutoff) FROM training_examples))""",
    )


def _arrow_frame(con: duckdb.DuckDBPyConnection, query: str) -> pd.DataFrame:
    """A query's result streamed as Arrow record batches, then one pandas frame (of one bucket)."""
    reader = con.sql(query).to_arrow_reader(ARROW_BATCH_ROWS)
    return pa.Table.from_batches(list(reader), schema=reader.schema).to_pandas()


@dataclass
class SequenceShards:
    """The encoded examples of one model, per split, and what was needed to make them."""

    encoder: SequenceEncoder
    splits: dict[str, ShardedExamples]  # model inputs + labels, what `fit` reads
    root: Path
    buckets: int
    n_events: int
    n_train_examples: int  # of the warehouse's training split; the shards may hold a sample of them

    def ids(self, split: str) -> ShardedExamples:
        """The same shards with their example ids (for predictions and embeddings tables)."""
        return ShardedExamples(self.root / split)


def write_sequence_shards(
    connect: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]],
    kind: str,
    label_columns: list[str],
    root: Path,
    encoder_config: EncoderConfig,
    events_per_bucket: int = EVENTS_PER_BUCKET,
    max_train_examples: int = 0,
    train_sample: str = "true",
) -> SequenceShards:
    """Fit the encoder on the training examples, bucket by bucket, then write one shard per
    bucket and split under ``root/<split>/``: ``cat_ids``, ``time_features``, ``event_pos``,
    ``session_pos``, ``mask``, ``labels`` (float32, NaN = missing) and ``example_id``.

    ``connect`` opens a read-only warehouse connection; one is opened per bucket read, so that no
    lock is held while encoding (a writer elsewhere in the graph waits only for a read). The
    example users' events and examples are first staged by bucket in one pass under
    ``root/_staged`` (`stage_buckets`; of the events only the columns the encoder reads), removed
    at the end: the two passes read each bucket's folders, never the whole tables again.

    ``max_train_examples`` (0: all) keeps the training split to a stable sample of whole users of
    about that many examples (`user_sample_sql`): a step that trains on a sample budget has no use
    for more, and encoding them would grow the step with the data. Valid and test stay whole.
    ``train_sample`` (a SQL condition on `user_id`) narrows the training users further: a
    reproduction's learning-curve point."""
    staging = root / STAGING_FOLDER
    try:
        with connect() as con:
            buckets = bucket_count(con, events_per_bucket)
            (n_train,) = con.execute("SELECT count(*) FROM training_examples WHERE split = 'train'").fetchall()[0]
            if 0 < max_train_examples < n_train:
                train_sample = f"({train_sample}) AND {user_sample_sql(max_train_examples / n_train)}"
            encoder = SequenceEncoder(encoder_config_for(kind, encoder_config))
            staged = stage_buckets(con, buckets, staging, SPLITS, train_sample, event_columns_sql(con, encoder))

        def train_parts() -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
            for b in range(buckets):
                with connect() as con:
                    events, examples = read_bucket(con, b, buckets, ("train",), train_sample, staged=staged)
                if len(examples):
                    yield events, examples

        encoder.fit_parts(train_parts())
        writers = {s: ShardWriter(root / s) for s in SPLITS}
        n_events = 0
        for b in range(buckets):
            with connect() as con:
                events, examples = read_bucket(con, b, buckets, SPLITS, train_sample, staged=staged)
            n_events += len(events)
            for split in SPLITS:
                part = examples[examples["split"] == split].reset_index(drop=True)
                if part.empty:
                    continue
                encoded = encoder.transform(events, part)
                writers[split].write(
                    {
                        **encoded,
                        "labels": labels_tensor(part, label_columns),
                        "example_id": part["example_id"].astype(str).to_numpy().astype(str),  # fixed-width unicode
                    }
                )
            del events, examples
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return SequenceShards(
        encoder, {s: ShardedExamples(root / s, keys=MODEL_KEYS) for s in SPLITS}, root, buckets, n_events, n_train
    )


__all__ = [
    "EVENTS_PER_BUCKET",
    "SequenceShards",
    "StagedBuckets",
    "event_columns_sql",
    "examples_condition",
    "read_bucket",
    "stage_buckets",
    "user_bucket_sql",
    "write_sequence_shards",
]
