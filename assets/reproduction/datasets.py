"""The datasets of the reproduction, each built by the pipeline's own code into its own warehouse.

A reproduction dataset is a folder ``TRACE_DAGSTER_HOME/reproduction/datasets/<name>/`` with a
DuckDB warehouse filled exactly as ``full_pipeline`` fills the main one: the same ingestion
(`ingest`), sessionization (`build_sessionized_events`), user split (`user_splits_sql`) and example SQL
(`cutoff_times`, `training_examples_sql`), so a rule changed there (labels, cutoffs) changes the
reproduction too. Only the inputs differ: the simulator, the known-answer generator, the Taobao
slices under ../shared/data. The session gap is a parameter of the build (an ablation).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from assets.ingestion.raw_events import ingest
from assets.ingestion.sessionized_events import DEFAULT_SESSION_GAP_SECONDS, build_sessionized_events
from assets.training_data.examples_sql import cutoff_times, training_examples_sql, user_splits_sql
from assets.training_data.tasks import SIMULATOR_TASKS, TAOBAO_TASKS, TaskSet
from resources.event_sources import InputFile, get_format
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TAOBAO_GLOB = "taobao_userbehavior/*.csv.gz"
DATASETS = ("simulator", "known_answer", "taobao")


@dataclass
class ReproductionDataset:
    """Sessionized events, labelled examples and tasks of one dataset, ready for model_lib."""

    name: str
    events: pd.DataFrame  # sessionized events of the example users, before the last cutoff
    examples: pd.DataFrame  # training_examples rows (split, label_<task> ...)
    tasks: TaskSet
    session_gap_seconds: float
    notes: list[str] = field(default_factory=list)
    warehouse_path: Path | None = None  # the dataset's own warehouse (every event, every table)

    @property
    def seen(self) -> list[str]:
        return [t.name for t in self.tasks.seen]

    @property
    def unseen(self) -> list[str]:
        return [t.name for t in self.tasks.unseen]

    @property
    def n_users(self) -> int:
        return int(self.examples["user_id"].nunique())

    def restrict_train_users(self, n_train_users: int, seed: int = 0) -> ReproductionDataset:
        """The same dataset with only ``n_train_users`` training users (valid and test unchanged):
        a point of a learning curve. Users are drawn at random with ``seed``."""
        train_users = self.examples.loc[self.examples["split"] == "train", "user_id"].drop_duplicates()
        if n_train_users >= len(train_users):
            return self
        keep = set(train_users.sample(n_train_users, random_state=seed))
        mask = (self.examples["split"] != "train") | self.examples["user_id"].isin(keep)
        examples = self.examples[mask].reset_index(drop=True)
        events = self.events[self.events["user_id"].isin(set(examples["user_id"]))].reset_index(drop=True)
        return replace(self, events=events, examples=examples)


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
) -> ReproductionDataset:
    """Ingest, sessionize, split and label one dataset in its own warehouse under ``root``.

    ``n_users`` sizes the generated datasets (Taobao is what the slices hold). The warehouse is
    rebuilt from scratch on every call, so a change of the pipeline's SQL always shows.
    """
    home = root / f"{name}_n{n_users}_gap{int(session_gap_seconds)}_s{seed}"
    shutil.rmtree(home, ignore_errors=True)
    inputs, tasks = input_files(name, root, n_users, seed)
    warehouse = DuckDBWarehouse(paths=TraceDagsterPaths(home=str(home)))
    with warehouse.connect() as con:
        summary = ingest(warehouse, con, inputs)
        build_sessionized_events(warehouse, con, session_gap_seconds)
        warehouse.replace_table(con, "user_splits", user_splits_sql(seed, 0.15, 0.15))
        cutoffs = cutoff_times(con, tasks)
        warehouse.replace_table(con, "training_examples", training_examples_sql(tasks, cutoffs))
        examples = con.sql("SELECT * FROM training_examples ORDER BY example_id").df()
        events = con.sql("""
            SELECT * EXCLUDE (source_file, source_row, ingested_at) FROM sessionized_events
            WHERE user_id IN (SELECT DISTINCT user_id FROM training_examples)
              AND event_time < (SELECT max(cutoff) FROM training_examples)
            ORDER BY user_id, event_index""").df()
    notes = [
        f"{summary.rows_read} rows read, {summary.rows_accepted} accepted, {summary.rows_rejected} rejected",
        f"cutoffs {', '.join(str(c) for c in cutoffs)}; session gap {session_gap_seconds / 3600:g} h",
    ]
    return ReproductionDataset(name, events, examples, tasks, session_gap_seconds, notes, warehouse.path)


__all__ = ["DATASETS", "ReproductionDataset", "build_dataset", "input_files"]
