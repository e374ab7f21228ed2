"""The datasets of the reproduction, each built by the pipeline's own code into its own warehouse.

A reproduction dataset is a folder ``TRACE_DAGSTER_HOME/reproduction/datasets/<name>/`` with a
DuckDB warehouse filled exactly as ``full_pipeline`` fills the main one: the same ingestion
(`ingest`), sessionization (`build_sessionized_events`), user split (`user_splits_sql`) and example SQL
(`cutoff_times`, `training_examples_sql`), so a rule changed there (labels, cutoffs) changes the
reproduction too. Only the inputs differ: the simulator, the known-answer generator, the Taobao
slices under ../shared/data. The session gap is a parameter of the build (an ablation).

A `ReproductionDataset` is a handle on that warehouse, not a copy of it: the sequence models read
the events in user-hash buckets of ``events_per_bucket`` (`write_sequence_shards`), the other
runners read the example rows or DuckDB aggregates they use, so a run's memory is bounded by the
bucket and the batch, not by the dataset. A learning-curve point is the same warehouse with a SQL
condition on the training users (`train_sample`).
"""

from __future__ import annotations

import shutil
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path

import duckdb
import pandas as pd

from assets.ingestion.raw_events import ingest
from assets.ingestion.sessionized_events import DEFAULT_SESSION_GAP_SECONDS, build_sessionized_events
from assets.trace_models.sequence_data import EVENTS_PER_BUCKET, SPLITS, examples_condition
from assets.training_data.examples_sql import cutoff_times, training_examples_sql, user_splits_sql
from assets.training_data.tasks import SIMULATOR_TASKS, TAOBAO_TASKS, TaskSet
from resources.event_sources import InputFile, get_format
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse, user_hash_sql

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TAOBAO_GLOB = "taobao_userbehavior/*.csv.gz"
DATASETS = ("simulator", "known_answer", "taobao")


@dataclass
class ReproductionDataset:
    """Tasks and warehouse of one dataset; events and examples stay in DuckDB, read where used."""

    name: str
    home: Path  # the dataset's own TRACE_DAGSTER_HOME: warehouse, parquet files, scratch
    tasks: TaskSet
    session_gap_seconds: float = DEFAULT_SESSION_GAP_SECONDS
    notes: list[str] = field(default_factory=list)
    train_sample: str = "true"  # SQL condition on `user_id`: the training users of this view
    events_per_bucket: int = EVENTS_PER_BUCKET  # events the sequence models read and encode at once

    @property
    def warehouse(self) -> DuckDBWarehouse:
        return DuckDBWarehouse(paths=TraceDagsterPaths(home=str(self.home)))

    def connect(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A read-only connection (UTC, the warehouse's memory limit)."""
        return self.warehouse.connect(read_only=True)

    @property
    def seen(self) -> list[str]:
        return [t.name for t in self.tasks.seen]

    @property
    def unseen(self) -> list[str]:
        return [t.name for t in self.tasks.unseen]

    def examples_sql(self, splits: tuple[str, ...] = SPLITS) -> str:
        """SELECT of this view's `training_examples` rows of ``splits``."""
        return f"SELECT * FROM training_examples WHERE {examples_condition(splits, self.train_sample)}"

    def examples(self, *splits: str) -> pd.DataFrame:
        """`training_examples` rows of ``splits`` (default: all) ordered by example_id: one row per
        example (ids, cutoffs, split, labels), what the score rows and probes need."""
        with self.connect() as con:
            return con.sql(f"{self.examples_sql(splits or SPLITS)} ORDER BY example_id").df()

    def example_ids_fingerprint(self) -> tuple[int, int]:
        """(count, xor of the md5 of every `example_id`): two builds hold the same example ids
        when these match (up to an md5 collision), compared without reading the ids into memory."""
        with self.connect() as con:
            count, digest = con.execute(
                f"SELECT count(*), coalesce(bit_xor(md5_number_lower(example_id)), 0) FROM ({self.examples_sql()})"
            ).fetchall()[0]
        return int(count), int(digest)

    def _count(self, what: str, splits: tuple[str, ...] = SPLITS) -> int:
        with self.connect() as con:
            return int(con.execute(f"SELECT {what} FROM ({self.examples_sql(splits)})").fetchall()[0][0])

    @property
    def n_examples(self) -> int:
        return self._count("count(*)")

    @property
    def n_users(self) -> int:
        return self._count("count(DISTINCT user_id)")

    @property
    def n_train_users(self) -> int:
        return self._count("count(DISTINCT user_id)", ("train",))

    def restrict_train_users(self, n_train_users: int, seed: int = 0) -> ReproductionDataset:
        """The same dataset with only ``n_train_users`` training users (valid and test unchanged):
        a point of a learning curve. The users are the first ``n`` by a salted md5 of their id
        (`user_hash_sql`): the same on every run, and for one seed a smaller point's users are a
        subset of a larger one's."""
        if n_train_users >= self.n_train_users:
            return self
        order = f"{user_hash_sql('user_id', 2**32, salt=f'curve{int(seed)}')}, user_id"
        chosen = (
            f"SELECT user_id FROM ({self.examples_sql(('train',))}) "
            f"GROUP BY user_id ORDER BY {order} LIMIT {int(n_train_users)}"
        )
        return replace(self, train_sample=f"user_id IN ({chosen})")


def input_files(name: str, home: Path, n_users: int, seed: int = 0) -> tuple[list[InputFile], TaskSet]:
    """The raw input files of a dataset (generated once per configuration) and its task set."""
    if name == "simulator":
        from resources.event_sources.simulator import SimulatorConfig, write_simulated_parquet

        path = home / "inputs" / f"simulator_n{n_users}_s{seed}.parquet"
        if not path.exists():
            write_simulated_parquet(SimulatorConfig(n_users=n_users, days=35, seed=seed), path)
        return [InputFile(path, "parquet", get_format("canonical"))], SIMULATOR_TASKS
    if name == "known_answer":
        from resources.event_sources.known_answer import KnownAnswerConfig, known_answer_events

        path = home / "inputs" / f"known_answer_n{n_users}_s{seed}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            known_answer_events(KnownAnswerConfig(n_users=n_users, seed=seed)).to_parquet(tmp, index=False)
            tmp.replace(path)
        return [InputFile(path, "parquet", get_format("canonical"))], TAOBAO_TASKS
    if name == "taobao":
        files = sorted(SHARED_DATA.glob(TAOBAO_GLOB))
        if not files:
            raise FileNotFoundError(f"no Taobao slices under {SHARED_DATA / TAOBAO_GLOB}")
        return [InputFile(p, "csv", get_format("taobao")) for p in files], TAOBAO_TASKS
    raise ValueError(f"unknown reproduction dataset {name!r}; known: {DATASETS}")


def build_dataset(
    name: str,
    root: Path,
    n_users: int = 2000,
    session_gap_seconds: float = DEFAULT_SESSION_GAP_SECONDS,
    seed: int = 0,
    events_per_bucket: int = EVENTS_PER_BUCKET,
) -> ReproductionDataset:
    """Ingest, sessionize, split and label one dataset in its own warehouse under ``root``; returns
    the handle on it (no table is read into memory here).

    ``n_users`` sizes the generated datasets (Taobao is what the slices hold). The warehouse is
    rebuilt from scratch on every call, so a change of the pipeline's SQL always shows.
    """
    home = root / f"{name}_n{n_users}_gap{int(session_gap_seconds)}_s{seed}"
    shutil.rmtree(home, ignore_errors=True)
    inputs, tasks = input_files(name, root, n_users, seed)
    dataset = ReproductionDataset(name, home, tasks, session_gap_seconds, events_per_bucket=events_per_bucket)
    warehouse = dataset.warehouse
    with warehouse.connect() as con:
        summary = ingest(warehouse, con, inputs)
        build_sessionized_events(warehouse, con, session_gap_seconds)
        warehouse.replace_table(con, "user_splits", user_splits_sql(seed, 0.15, 0.15))
        cutoffs = cutoff_times(con, tasks)
        warehouse.replace_table(con, "training_examples", training_examples_sql(tasks, cutoffs))
    dataset.notes += [
        f"{summary.rows_read} rows read, {summary.rows_accepted} accepted, {summary.rows_rejected} rejected",
        f"cutoffs {', '.join(str(c) for c in cutoffs)}; session gap {session_gap_seconds / 3600:g} h",
    ]
    return dataset


__all__ = ["DATASETS", "ReproductionDataset", "build_dataset", "input_files"]
