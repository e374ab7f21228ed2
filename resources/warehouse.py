"""The DuckDB warehouse: one file, `TRACE_DAGSTER_HOME/warehouse.duckdb`, tables backed by parquet.

Why parquet first and a view second: a table is published by writing its rows to a new parquet
file (under a temporary name, then renamed) and only then pointing the DuckDB view at it inside a
transaction, together with the bookkeeping rows that describe it. A run killed at any point
leaves either the previous view or the new one, never a half-written table; leftover files are
unreferenced and swept by the next publication.

DuckDB allows one writing process per file, so every asset that opens the warehouse for writing
runs in the Dagster concurrency pool `warehouse` (limit 1); `connect` still waits for a lock held
by a process outside Dagster (a notebook, the CLI) instead of failing at once.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import duckdb
from pydantic import Field

from resources.paths import TraceDagsterPaths

WAREHOUSE_POOL = "warehouse"
PARQUET_CATALOG = "warehouse_parquet_files"


def sql_literal(value: str) -> str:
    """A SQL string literal (DuckDB cannot bind parameters inside COPY targets or view bodies)."""
    return "'" + str(value).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def user_hash_sql(column: str, modulus: int, salt: str | None = None) -> str:
    """A stable bucket in [0, modulus) of a user id: the first 32 bits of its md5 (DuckDB's
    hash() may change across versions). A ``salt`` gives an independent hash per use (splits,
    samples), so that a sample is not a split. Python twin for tests:
    ``int(hashlib.md5(f"{user_id}:{salt}".encode()).hexdigest()[:8], 16) % modulus``."""
    value = f"CAST({column} AS VARCHAR)" + ("" if salt is None else f" || ':{salt}'")
    return f"((('0x' || md5({value})[1:8])::UBIGINT) % {int(modulus)})"


def stage_by_bucket(
    con: duckdb.DuckDBPyConnection,
    query: str,
    bucket_sql: str,
    buckets: int,
    folder: Path,
    column: str = "stage_bucket",
) -> dict[int, str]:
    """Write the rows of ``query`` to one parquet folder per bucket (``bucket_sql``, an expression
    on the query's columns, in [0, buckets)), in one pass; returns, per bucket that has rows, the
    relation that reads them back (the bucket is the folder's name, not a column).

    Why: a loop over user-hash buckets that filters its source table in every bucket re-reads the
    table and hashes every row once per bucket (work that grows with the data times the buckets).
    Stage only the rows and columns the loop reads: the parquet write is this pass's cost.

    ``folder`` is scratch: its previous contents are removed first (COPY's OVERWRITE empties the
    old partition folders but leaves them, so a reused folder would show buckets with no files).
    Works on a read-only connection (COPY TO writes files, not the database). Column types come
    back as parquet keeps them: the warehouse's tables are parquet already, but an ENUM of a
    DuckDB table (a pandas categorical) is read back as VARCHAR."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    name = quote_ident(column)
    con.execute(
        f"COPY (SELECT *, {bucket_sql} AS {name} FROM ({query})) "
        f"TO {sql_literal(str(folder))} (FORMAT parquet, PARTITION_BY ({name}), OVERWRITE)"
    )
    staged = {}
    for b in range(buckets):
        part = folder / f"{column}={b}"
        if any(part.glob("*.parquet")):
            staged[b] = f"read_parquet({sql_literal(str(part / '*.parquet'))}, hive_partitioning = false)"
    return staged


def utc_now() -> datetime:
    """Naive UTC timestamp: the warehouse stores every TIMESTAMP in UTC without a zone."""
    return datetime.now(UTC).replace(tzinfo=None)


class DuckDBWarehouse(dg.ConfigurableResource):
    """Connections to the warehouse and atomic publication of parquet-backed tables."""

    paths: TraceDagsterPaths
    memory_limit: str = Field(default="3GB", description="DuckDB memory_limit; larger work spills to the home's tmp/.")
    threads: int = Field(default=0, description="DuckDB worker threads; 0 lets DuckDB decide.")
    lock_timeout_seconds: float = Field(
        default=120.0,
        description="How long to wait for another process's write lock on the warehouse file.",
    )

    @property
    def path(self) -> Path:
        return self.paths.warehouse_path

    def table_dir(self, table: str) -> Path:
        path = self.paths.parquet_dir / table
        path.mkdir(parents=True, exist_ok=True)
        return path

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection with the project's session settings (UTC, memory limit, spill folder)."""
        config: dict[str, object] = {
            "memory_limit": self.memory_limit,
            # Bulk statements need not keep scan order (every ordered output says ORDER BY);
            # this lets DuckDB parallelise them and spill less.
            "preserve_insertion_order": False,
            "temp_directory": str(self.paths.tmp_dir / "duckdb_spill"),
        }
        if self.threads > 0:
            config["threads"] = self.threads
        deadline = time.monotonic() + self.lock_timeout_seconds
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only, config=config)
                break
            except duckdb.IOException as error:
                if "lock" not in str(error).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        try:
            con.execute("SET TimeZone = 'UTC'")
            if not read_only:
                con.execute(
                    f"CREATE TABLE IF NOT EXISTS {PARQUET_CATALOG} ("
                    "table_name VARCHAR NOT NULL, path VARCHAR NOT NULL, row_count BIGINT, "
                    "written_at TIMESTAMP NOT NULL)"
                )
            yield con
        finally:
            con.close()

    def write_parquet(self, con: duckdb.DuckDBPyConnection, table: str, query: str) -> tuple[Path, int]:
        """Write `query` to a new parquet file of `table`; not visible until `publish`.

        The file is written under a temporary name and renamed, so a file with a final name is
        always complete. Returns the path and its row count.
        """
        directory = self.table_dir(table)
        stamp = utc_now().strftime("%Y%m%dT%H%M%S%f")
        final = directory / f"{table}-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = directory / f".tmp-{final.name}"
        con.execute(f"COPY ({query}) TO {sql_literal(str(tmp))} (FORMAT parquet, COMPRESSION snappy)")
        rows = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(str(tmp))})").fetchall()[0][0]
        tmp.rename(final)
        return final, int(rows)

    def register_parquet(
        self,
        con: duckdb.DuckDBPyConnection,
        table: str,
        files: Sequence[tuple[Path, int]],
        replace: bool,
    ) -> None:
        """Point view `table` at its parquet files; call inside the caller's transaction.

        `replace=True` drops the previous files from the view (a full rebuild), `False` appends
        (an incremental table such as `raw_events`). Files of a table may differ in attribute
        columns (different sources), hence `union_by_name`.
        """
        if replace:
            con.execute(f"DELETE FROM {PARQUET_CATALOG} WHERE table_name = ?", [table])
        now = utc_now()
        for path, rows in files:
            con.execute(f"INSERT INTO {PARQUET_CATALOG} VALUES (?, ?, ?, ?)", [table, str(path), rows, now])
        paths = [
            row[0]
            for row in con.execute(
                f"SELECT path FROM {PARQUET_CATALOG} WHERE table_name = ? ORDER BY written_at, path",
                [table],
            ).fetchall()
        ]
        file_list = "[" + ", ".join(sql_literal(p) for p in paths) + "]"
        con.execute(
            f"CREATE OR REPLACE VIEW {quote_ident(table)} AS "
            f"SELECT * FROM read_parquet({file_list}, union_by_name = true)"
        )

    def sweep_unreferenced(self, con: duckdb.DuckDBPyConnection, table: str) -> int:
        """Delete parquet files of `table` that no committed view references (old versions and
        leftovers of killed runs). Call after the commit; returns the number of files removed."""
        referenced = {
            row[0]
            for row in con.execute(f"SELECT path FROM {PARQUET_CATALOG} WHERE table_name = ?", [table]).fetchall()
        }
        removed = 0
        for path in self.table_dir(table).iterdir():
            if path.is_file() and str(path) not in referenced:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    @contextmanager
    def publish(
        self,
        con: duckdb.DuckDBPyConnection,
        files: Mapping[str, Sequence[tuple[Path, int]]],
        replace: bool,
    ) -> Iterator[None]:
        """Swap the views of `files` (table -> parquet files from `write_parquet`) in one transaction.

        The one commit path of the warehouse: the `with` block runs inside the same transaction, so
        bookkeeping rows (e.g. `ingested_files`) commit or roll back together with the tables. On
        any error the transaction is rolled back (a killed process leaves it uncommitted, the same);
        after the commit, files no view references any more are swept. `replace`: see
        `register_parquet`.
        """
        con.execute("BEGIN TRANSACTION")
        try:
            for table, parts in files.items():
                self.register_parquet(con, table, parts, replace=replace)
            yield
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")  # the new files stay unreferenced: the next publication sweeps them
            raise
        for table in files:
            self.sweep_unreferenced(con, table)

    def replace_table(self, con: duckdb.DuckDBPyConnection, table: str, query: str) -> int:
        """Atomically replace `table` by the result of `query`; returns its row count."""
        path, rows = self.write_parquet(con, table, query)
        with self.publish(con, {table: [(path, rows)]}, replace=True):
            pass
        return rows

    def append_table(self, con: duckdb.DuckDBPyConnection, table: str, query: str) -> int:
        """Atomically add the rows of `query` to `table` (a log such as `drift_report`); returns
        the number of rows added."""
        path, rows = self.write_parquet(con, table, query)
        with self.publish(con, {table: [(path, rows)]}, replace=False):
            pass
        return rows


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """True if `name` is a table or a view of the connected database."""
    (count,) = con.execute(
        "SELECT (SELECT count(*) FROM duckdb_tables() WHERE table_name = $name)"
        " + (SELECT count(*) FROM duckdb_views() WHERE view_name = $name AND NOT internal)",
        {"name": name},
    ).fetchall()[0]
    return count > 0
