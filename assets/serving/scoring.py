"""Batch scoring with the champion: user batches streamed from DuckDB, results streamed to parquet.

Memory is bounded by `batch_events`, not by the data: DuckDB sorts the events by user (spilling
to disk when needed) and hands them over as Arrow record batches; `user_batches` regroups them
into frames of whole users, each scored by the champion's own API (`UserModel.score_events`, or
`UserModel.embed` for `user_embeddings`) and appended to a parquet file with a `ParquetWriter`.

The `score_users` job (trace_dagster/jobs.py) runs `score_users_op`: a file of raw canonical
events, or a date range of `raw_events`, to a parquet of the champion's embeddings and task
probabilities. Rows of a file that cannot be scored (no user, no event name, a time that does
not parse) go to `<output>.rejected.parquet` with a reason, never silently away.
"""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from resources.event_sources import time_expression
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse, sql_literal

DEFAULT_BATCH_EVENTS = 200_000


def user_batches(reader: pa.RecordBatchReader, batch_events: int = DEFAULT_BATCH_EVENTS) -> Iterator[pd.DataFrame]:
    """Arrow batches of rows sorted by `user_id` -> DataFrames of whole users, each of about
    `batch_events` rows (more only when a single user has more events)."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in reader:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows < batch_events:
            continue
        table = pa.Table.from_batches(pending)
        users = table.column("user_id").to_numpy(zero_copy_only=False)
        others = np.flatnonzero(users != users[-1])  # the last user may continue in the next batch
        complete = int(others[-1]) + 1 if len(others) else 0
        if complete:
            yield table.slice(0, complete).to_pandas()
        rest = table.slice(complete)  # sliced in Arrow: the schema stays the reader's
        pending = rest.to_batches()
        pending_rows = rest.num_rows
    if pending_rows:
        yield pa.Table.from_batches(pending).to_pandas()


class ParquetStream:
    """Appends frames to one parquet file (schema from the first frame); written under a
    temporary name and renamed on close, so a file with the final name is always complete."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".tmp-{self.path.name}")
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="snappy")
        self._writer.write_table(table.cast(self._writer.schema))
        self.rows += len(frame)

    def close(self, empty_schema: pa.Schema | None = None) -> Path:
        if self._writer is None:
            pq.write_table(pa.Table.from_pylist([], schema=empty_schema or pa.schema([])), self._tmp)
        else:
            self._writer.close()
        self._tmp.replace(self.path)
        return self.path


def scores_frame(scored: pd.DataFrame, model_name: str, model_version: str) -> pd.DataFrame:
    """`score_events` output -> the parquet rows: embedding as one FLOAT[] like `user_embeddings`."""
    embedding_columns = [c for c in scored.columns if c.startswith("embedding_")]
    probabilities = [c for c in scored.columns if c.startswith("p_")]
    vectors = scored[embedding_columns].to_numpy(np.float32)
    frame = pd.DataFrame(
        {
            "user_id": scored["user_id"].astype(str),
            "model_name": model_name,
            "model_version": str(model_version),
            "as_of": scored["as_of"],
            "embedding": list(vectors),
        }
    )
    return pd.concat([frame, scored[probabilities].astype(np.float32)], axis=1)


class ScoreUsersConfig(dg.Config):
    events_path: str = Field(
        default="",
        description="A file of raw canonical events (CSV with a header, CSV.gz or parquet). Empty: "
        "`raw_events` of the warehouse between `start` and `end`.",
    )
    start: str = Field(default="", description="Warehouse range: events at or after this time (UTC; empty: all).")
    end: str = Field(default="", description="Warehouse range: events before this time (UTC; empty: all).")
    as_of: str = Field(default="", description="Score every user as of this time; empty: after their last event.")
    output_path: str = Field(
        default="", description="Parquet to write; empty: TRACE_DAGSTER_HOME/scores/score_users-<run id>.parquet."
    )
    model_name: str = Field(default="trace", description="Registered model whose `champion` scores.")
    batch_events: int = Field(default=DEFAULT_BATCH_EVENTS, description="Events per scored batch (memory bound).")


def _file_relation(path: str) -> str:
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return f"read_parquet({sql_literal(path)})"
    return f"read_csv({sql_literal(path)}, header = true, all_varchar = true)"


def file_events_sql(con: duckdb.DuckDBPyConnection, path: str) -> tuple[str, str]:
    """(accepted rows ordered by user, rejected rows with a reason) of a raw canonical events file."""
    relation = _file_relation(path)
    names = [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
    missing = [c for c in ("user_id", "event_time", "event_name") if c not in names]
    if missing:
        raise dg.Failure(f"{path}: no column(s) {missing}; canonical events need user_id, event_time, event_name")
    others = [c for c in names if c not in ("user_id", "event_time", "event_name")]
    text = "CAST(event_time AS VARCHAR)"
    staged = (
        f"SELECT CAST(user_id AS VARCHAR) AS user_id, {time_expression(text, 'auto')} AS event_time_parsed, "
        f"{text} AS event_time_text, CAST(event_name AS VARCHAR) AS event_name"
        + "".join(f', CAST("{c}" AS VARCHAR) AS "{c}"' for c in others)
        + f", row_number() OVER () AS source_row FROM {relation}"
    )
    reason = (
        "CASE WHEN user_id IS NULL OR trim(user_id) = '' THEN 'missing_user_id' "
        "WHEN event_time_text IS NULL THEN 'missing_event_time' "
        "WHEN event_time_parsed IS NULL THEN 'malformed_event_time' "
        "WHEN event_name IS NULL OR trim(event_name) = '' THEN 'missing_event_name' END"
    )
    con.execute(f"CREATE TEMP TABLE staged AS SELECT *, {reason} AS reason FROM ({staged})")
    columns = ", ".join(f'"{c}"' for c in others)
    accepted = (
        f"SELECT user_id, event_time_parsed AS event_time, event_name{', ' + columns if columns else ''}, "
        f"{sql_literal(path)} AS source_file, source_row FROM staged WHERE reason IS NULL ORDER BY user_id"
    )
    rejected = "SELECT source_row, reason, user_id, event_time_text, event_name FROM staged WHERE reason IS NOT NULL"
    return accepted, rejected


@dg.op(
    description="The champion's embeddings and task probabilities for a file of raw events or a date "
    "range of the warehouse, streamed to parquet in user batches.",
    tags={"kind": "mlflow"},
)
def score_users_op(
    context: dg.OpExecutionContext,
    config: ScoreUsersConfig,
    warehouse: DuckDBWarehouse,
    paths: TraceDagsterPaths,
    mlflow_tracking: MLflowTracking,
) -> dg.Output[str]:
    version = mlflow_tracking.champion_version(config.model_name)
    if version is None:
        raise dg.Failure(f"registered model `{config.model_name}` has no `champion`: run full_pipeline first")
    model = mlflow_tracking.load_model(f"models:/{config.model_name}/{version}")
    if not hasattr(model, "score_events"):
        raise dg.Failure(f"`{config.model_name}` v{version} cannot score raw events (no score_events)")
    output = (
        Path(config.output_path)
        if config.output_path
        else paths.home_dir / "scores" / f"score_users-{context.run.run_id}.parquet"
    )
    stream = ParquetStream(output)
    rejected_rows = 0
    unknown_names: set[str] = set()
    known = model.known_event_names or frozenset()
    batches = 0

    def score(reader: pa.RecordBatchReader) -> None:
        nonlocal batches
        for frame in user_batches(reader, config.batch_events):
            if known:
                unknown_names.update(set(frame["event_name"].astype(str).unique()) - known)
            scored = model.score_events(frame, as_of=config.as_of or None, unknown_event_names="keep")
            stream.write(scores_frame(scored, config.model_name, version))
            batches += 1
            context.log.info(f"batch {batches}: {len(frame)} events, {len(scored)} users")

    if config.events_path:
        spill = str(paths.tmp_dir / "duckdb_spill")
        con = duckdb.connect(config={"memory_limit": warehouse.memory_limit, "temp_directory": spill})
        try:
            con.execute("SET TimeZone = 'UTC'")
            accepted, rejected = file_events_sql(con, config.events_path)
            rejected_rows = con.execute(f"SELECT count(*) FROM ({rejected})").fetchall()[0][0]
            if rejected_rows:
                rejected_path = output.with_name(output.stem + ".rejected.parquet")
                con.execute(f"COPY ({rejected}) TO {sql_literal(str(rejected_path))} (FORMAT parquet)")
            score(con.sql(accepted).to_arrow_reader(min(config.batch_events, 100_000)))
        finally:
            con.close()
        source = config.events_path
    else:
        where = []
        if config.start:
            where.append(f"event_time >= CAST({sql_literal(config.start)} AS TIMESTAMP)")
        if config.end:
            where.append(f"event_time < CAST({sql_literal(config.end)} AS TIMESTAMP)")
        sql = "SELECT * EXCLUDE (ingested_at) FROM raw_events" + (" WHERE " + " AND ".join(where) if where else "")
        with warehouse.connect(read_only=True) as con:
            score(con.sql(sql + " ORDER BY user_id").to_arrow_reader(min(config.batch_events, 100_000)))
        source = f"raw_events [{config.start or '-inf'}, {config.end or '+inf'})"
    path = stream.close(
        pa.schema([("user_id", pa.string()), ("model_name", pa.string()), ("model_version", pa.string())])
    )
    return dg.Output(
        str(path),
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "source": source,
            "users": stream.rows,
            "batches": batches,
            "rejected_rows": int(rejected_rows),
            "event_names_unseen_in_training": ", ".join(sorted(unknown_names)[:20]) or "none",
            "model": f"{config.model_name} v{version}",
        },
    )
