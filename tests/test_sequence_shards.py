"""Sequence examples out of core: shards on disk, bucketed encoding from DuckDB, bounded memory."""

import tracemalloc

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import QueryLog

from assets.trace_models.sequence_data import (
    STAGING_FOLDER,
    read_bucket,
    stage_buckets,
    write_sequence_shards,
)
from model_lib.encoding import EncoderConfig, SequenceEncoder
from model_lib.sequence_shards import ShardedExamples, ShardedIterableDataset, ShardWriter
from model_lib.training import TrainConfig, fit, iterate_batches
from tests.trace_test_data import TASKS, simulated_split

torch.set_num_threads(1)


def write_rows(root, n, rows_per_shard):
    writer = ShardWriter(root)
    for lo in range(0, n, rows_per_shard):
        idx = np.arange(lo, min(n, lo + rows_per_shard))
        writer.write({"x": np.stack([idx, idx * 2], 1).astype(np.float32), "row": idx})
    return ShardedExamples(root)


def test_shards_cover_every_row_once_and_shuffle_reproducibly(tmp_path):
    data = write_rows(tmp_path, 103, 20)
    assert len(data) == 103 and len(data.shards) == 6
    plain = torch.cat([b["row"] for b in iterate_batches(data, 8)])
    assert torch.equal(plain, torch.arange(103))
    shuffled = [torch.cat([b["row"] for b in data.batches(8, True, torch.Generator().manual_seed(s))]) for s in (1, 1)]
    assert sorted(shuffled[0].tolist()) == list(range(103)) and not torch.equal(shuffled[0], plain)
    assert torch.equal(shuffled[0], shuffled[1])
    for batch in data.batches(8, True, torch.Generator().manual_seed(2)):
        assert len(batch["row"]) <= 8 and torch.equal(batch["x"][:, 1], batch["row"].float() * 2)


def test_iterable_dataset_splits_shards_across_ranks(tmp_path):
    data = write_rows(tmp_path, 100, 10)
    ranks = [ShardedIterableDataset(data, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    loaders = [torch.utils.data.DataLoader(ds, batch_size=None) for ds in ranks]
    rows = [torch.cat([b["row"] for b in loader]).tolist() for loader in loaders]
    assert not set(rows[0]) & set(rows[1])
    assert sorted(rows[0] + rows[1]) == list(range(100))
    ranks[0].set_epoch(1)
    assert torch.cat([b["row"] for b in loaders[0]]).tolist() != rows[0]  # a new order each epoch


def test_shard_writer_rejects_misaligned_arrays(tmp_path):
    with pytest.raises(ValueError, match="first dimension"):
        ShardWriter(tmp_path).write({"a": np.zeros(3), "b": np.zeros(4)})


@pytest.fixture(scope="module")
def small_split():
    return simulated_split(n_users=300)


def warehouse_of(events, examples_by_split, path):
    """A DuckDB file with the two tables the sequence path reads."""
    con = duckdb.connect(str(path))
    con.execute("SET TimeZone = 'UTC'")
    frames = []
    for split, ex in examples_by_split.items():
        frames.append(ex.assign(split=split, example_id=ex["user_id"] + "@" + ex["cutoff"].astype(str)))
    con.register("events_frame", events.assign(source_file="sim", source_row=1, ingested_at=pd.Timestamp("2026-01-01")))
    con.register("examples_frame", pd.concat(frames, ignore_index=True))
    con.execute("CREATE TABLE sessionized_events AS SELECT * FROM events_frame")
    con.execute("CREATE TABLE training_examples AS SELECT * FROM examples_frame")
    con.close()


class Connect:
    def __init__(self, path):
        self.path = path

    def __call__(self):
        con = duckdb.connect(str(self.path), read_only=True)
        con.execute("SET TimeZone = 'UTC'")
        return con


def test_bucketed_encoder_and_shards_equal_the_in_memory_path(small_split, tmp_path):
    events, train, valid, test = small_split
    warehouse_of(events, {"train": train, "valid": valid, "test": test}, tmp_path / "w.duckdb")
    config = EncoderConfig(max_len=32)
    data = write_sequence_shards(
        Connect(tmp_path / "w.duckdb"), "trace", list(TASKS), tmp_path / "shards", config, 3000
    )
    assert data.buckets > 3
    whole = SequenceEncoder(config).fit(events, train)
    assert data.encoder.state_dict()["vocabularies"] == whole.state_dict()["vocabularies"]
    assert np.allclose(data.encoder.time_mean, whole.time_mean, rtol=1e-5)
    assert np.allclose(data.encoder.time_std, whole.time_std, rtol=1e-5)
    shards = data.ids("test")
    ids = shards.column("example_id")
    expected_ids = (test["user_id"] + "@" + test["cutoff"].astype(str)).to_numpy()
    assert sorted(ids.tolist()) == sorted(expected_ids.tolist())
    order = pd.Index(expected_ids).get_indexer(ids)
    reference = whole.transform(events, test.iloc[order].reset_index(drop=True))
    got = {k: torch.cat([b[k] for b in data.splits["test"].batches(64)]) for k in reference}
    for k in reference:
        assert torch.allclose(got[k].float(), reference[k].float(), atol=1e-5), k


def test_buckets_are_staged_once_and_read_as_the_table_filters_read_them(small_split, tmp_path):
    """`write_sequence_shards` reads `sessionized_events` in one statement (the staging COPY, plus
    the count of `bucket_count`; a `LIMIT 0` look-up of its columns reads no row), whatever the
    bucket count; a bucket read from the staged folders
    equals the one filtered from the tables; the scratch folder is gone afterwards, and a root
    holding a stale one (a killed run with more buckets) gives the same shards."""
    events, train, valid, test = small_split
    path = tmp_path / "w.duckdb"
    warehouse_of(events, {"train": train, "valid": valid, "test": test}, path)
    connect = QueryLog(Connect(path))
    config = EncoderConfig(max_len=16)
    sample = "user_id < 'u0150'"
    data = write_sequence_shards(connect, "trace", list(TASKS), tmp_path / "a", config, 3000, train_sample=sample)
    assert data.buckets > 3
    reads = [q for q in connect.queries if "sessionized_events" in q and "LIMIT 0" not in q]  # not a schema look-up
    assert len(reads) == 2 and sum("COPY" in q for q in reads) == 1, reads
    assert not (tmp_path / "a" / STAGING_FOLDER).exists()

    stale = tmp_path / "b" / STAGING_FOLDER / "events" / f"stage_bucket={data.buckets + 1}"
    stale.mkdir(parents=True)
    (stale / "data_0.parquet").write_bytes(b"not parquet")
    again = write_sequence_shards(
        Connect(path), "trace", list(TASKS), tmp_path / "b", config, 3000, train_sample=sample
    )
    assert not (tmp_path / "b" / STAGING_FOLDER).exists()
    for split in ("train", "valid", "test"):
        for key in ("example_id", "cat_ids", "time_features", "labels"):
            assert np.array_equal(
                data.ids(split).column(key), again.ids(split).column(key), equal_nan=key != "example_id"
            ), (split, key)

    with Connect(path)() as con:
        staged = stage_buckets(con, data.buckets, tmp_path / "staged", train_sample=sample)
        for b in range(data.buckets):
            for splits in (("train",), ("train", "valid", "test"), ("test",)):
                filtered = read_bucket(con, b, data.buckets, splits, sample)
                from_staged = read_bucket(con, b, data.buckets, splits, sample, staged=staged)
                for got, expected in zip(from_staged, filtered):
                    assert len(expected) > 0
                    # this fixture's tables come from pandas (a categorical is an ENUM), parquet
                    # gives VARCHAR back; the warehouse's tables are parquet already
                    for c in [c for c in expected if isinstance(expected[c].dtype, pd.CategoricalDtype)]:
                        expected[c] = expected[c].astype(object).where(expected[c].notna(), None)
                    pd.testing.assert_frame_equal(got, expected)


def test_training_split_is_a_sample_of_whole_users_when_capped(small_split, tmp_path):
    """A step on a sample budget encodes about that many training examples (whole users, the same
    ones on every run); valid and test stay whole."""
    events, train, valid, test = small_split
    warehouse_of(events, {"train": train, "valid": valid, "test": test}, tmp_path / "w.duckdb")
    cap = len(train) // 3

    def shards(root, max_train_examples):
        return write_sequence_shards(
            Connect(tmp_path / "w.duckdb"),
            "trace",
            list(TASKS),
            tmp_path / root,
            EncoderConfig(max_len=16),
            3000,
            max_train_examples=max_train_examples,
        )

    whole, capped, again = shards("all", 0), shards("cap", cap), shards("again", cap)
    assert len(whole.splits["train"]) == whole.n_train_examples == len(train)
    assert 0.6 * cap <= len(capped.splits["train"]) <= 1.4 * cap and capped.n_train_examples == len(train)
    ids = sorted(capped.ids("train").column("example_id").tolist())
    assert ids == sorted(again.ids("train").column("example_id").tolist())  # stable sample
    users = {i.split("@")[0] for i in ids}
    per_user = train.assign(example_id=train["user_id"] + "@" + train["cutoff"].astype(str))
    assert sorted(per_user.loc[per_user["user_id"].isin(users), "example_id"]) == ids  # every example of a kept user
    for split in ("valid", "test"):
        assert len(capped.splits[split]) == len(whole.splits[split])


class RecordingModel(torch.nn.Module):
    """Counts the rows of every batch it is given: the unit in which a step's memory grows."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        self.batch_rows = []

    def loss(self, batch):
        self.batch_rows.append(len(batch["mask"]))
        x = batch["time_features"].mean(dim=(1, 2), keepdim=False)[:, None]
        return torch.nn.functional.mse_loss(self.w(x).squeeze(-1), torch.nan_to_num(batch["labels"][:, 0]))


EVENTS_PER_BUCKET = 2500


def step_footprint(n_users, tmp_path):
    """(largest bucket read in events, largest batch in rows, peak traced bytes) of encoding to
    shards and training over them, for a simulated warehouse of ``n_users``."""
    events, train, valid, test = simulated_split(n_users=n_users)
    path = tmp_path / f"w{n_users}.duckdb"
    warehouse_of(events, {"train": train, "valid": valid, "test": test}, path)
    tracemalloc.start()
    data = write_sequence_shards(
        Connect(path), "trace", list(TASKS), tmp_path / f"s{n_users}", EncoderConfig(max_len=32), EVENTS_PER_BUCKET
    )
    model = RecordingModel()
    fit(model, data.splits["train"], data.splits["valid"], TrainConfig(epochs=1, batch_size=32))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with Connect(path)() as con:
        largest = max(len(read_bucket(con, b, data.buckets)[0]) for b in range(data.buckets))
    return len(events), data.buckets, largest, max(model.batch_rows), peak


def test_memory_of_the_training_step_is_bounded_by_its_bucket_and_batch(tmp_path):
    """10x the users: 10x the buckets, but the same bucket size, batch size and peak of traced
    allocations (numpy and Python; not wall time)."""
    small = step_footprint(80, tmp_path)
    large = step_footprint(800, tmp_path)
    events_small, buckets_small, bucket_small, batch_small, peak_small = small
    events_large, buckets_large, bucket_large, batch_large, peak_large = large
    assert events_large > 8 * events_small
    assert buckets_large >= 5 * buckets_small
    assert (
        bucket_large < 2 * EVENTS_PER_BUCKET and bucket_small < 2 * EVENTS_PER_BUCKET
    )  # ~events_per_bucket, whatever the table size
    assert batch_small == batch_large == 32
    assert peak_large < 2 * peak_small, (peak_small, peak_large)


def test_steps_holding_rows_in_memory_read_a_bounded_user_sample():
    """`split_rows_sql` (conversion and aggregate models): a split 10x larger than the cap is read
    as about the cap's rows, whole users only; a split under the cap is read in full."""
    import duckdb

    from assets.common.training import split_rows_sql

    con = duckdb.connect()
    read = {}
    for n_users in (2_000, 20_000):
        con.execute(
            f"CREATE OR REPLACE TABLE samples AS SELECT 'u' || (i // 5) AS user_id, "
            f"CASE WHEN (i // 5) % 10 < 8 THEN 'train' ELSE 'test' END AS split, i "
            f"FROM range({n_users * 5}) t(i)"
        )
        query, expected, total = split_rows_sql(con, "samples", "train", max_rows=10_000)
        rows = con.sql(query).df()
        read[n_users] = len(rows)
        assert total == n_users * 4 and expected == min(total, 10_000)
        assert (rows.groupby("user_id").size() == 5).all()  # whole users
    assert read[2_000] == 8_000  # under the cap: every row
    assert 9_000 <= read[20_000] <= 11_000  # 10x the data, about the cap
