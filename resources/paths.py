"""Where trace-dagster keeps its state: one folder, `TRACE_DAGSTER_HOME`, never the repository.

Every other resource asks this one for a path, so moving the state (tests use `tmp_path`, the CLI
uses the environment) is a single setting.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

HOME_ENV_VAR = "TRACE_DAGSTER_HOME"
DEFAULT_HOME = ".trace_dagster"
WAREHOUSE_FILE = "warehouse.duckdb"
MLFLOW_DB = "mlflow.db"
REPORTS_DIR = "reports"
DAGSTER_DIR = "dagster"  # DAGSTER_HOME of the CLI's instance


def resolve_home(home: str | None = None) -> Path:
    """The state folder: `home` if given, else `$TRACE_DAGSTER_HOME`, else `./.trace_dagster`.

    Resolved to an absolute path at call time (not import time) so that subprocesses of the
    multiprocess executor, which inherit the environment and the working directory, agree.
    """
    chosen = home or os.environ.get(HOME_ENV_VAR) or DEFAULT_HOME
    return Path(chosen).expanduser().resolve()


class TraceDagsterPaths(dg.ConfigurableResource):
    """Paths under `TRACE_DAGSTER_HOME` (contract default: `.trace_dagster/` under the cwd).

    `home` is empty by default and then read from the environment when used, rather than through
    `EnvVar`, because the variable is optional: an unset `EnvVar` is a load error in Dagster.
    """

    home: str = Field(
        default="",
        description="State folder; empty means $TRACE_DAGSTER_HOME, else ./.trace_dagster.",
    )

    @property
    def home_dir(self) -> Path:
        path = resolve_home(self.home)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _subdir(self, *parts: str) -> Path:
        path = self.home_dir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def warehouse_path(self) -> Path:
        """The DuckDB file holding every table of the contract."""
        return self.home_dir / WAREHOUSE_FILE

    @property
    def parquet_dir(self) -> Path:
        """Parquet files behind the warehouse tables (one folder per table)."""
        return self._subdir("parquet")

    @property
    def simulated_dir(self) -> Path:
        """Simulator output, written once per configuration and then ingested like any file."""
        return self._subdir("simulated")

    @property
    def reports_dir(self) -> Path:
        return self._subdir(REPORTS_DIR)

    @property
    def checkpoints_dir(self) -> Path:
        return self._subdir("checkpoints")

    @property
    def tmp_dir(self) -> Path:
        """Scratch space on the same filesystem as the warehouse (DuckDB spill, atomic renames)."""
        return self._subdir("tmp")

    @property
    def dagster_home_dir(self) -> Path:
        """DAGSTER_HOME of the instance the CLI runs jobs in (its dagster.yaml limits pools)."""
        return self._subdir(DAGSTER_DIR)

    @property
    def mlflow_db_path(self) -> Path:
        return self.home_dir / MLFLOW_DB

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self._subdir("mlartifacts")
