"""Running the whole asset graph in process, as `full_pipeline` does, with small settings.

Shared by the end-to-end tests (simulator, Taobao slices). `dagster.materialize()` runs every step
in this process (in-process executor) against an ephemeral instance, so the run is sequential and
the warehouse has one writer at a time without any pool configuration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd

from assets.conversion_models.assets import CONVERSION_MODELS
from assets.trace_models.aggregate_models import AGGREGATE_MODELS
from assets.trace_models.assets import SEQUENCE_MODELS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TAOBAO_FILES = [
    (SHARED_DATA / "taobao_userbehavior" / f).resolve()  # ingestion records resolved paths
    for f in ("userbehavior_head.csv.gz", "userbehavior_tail.csv.gz")
]

#: The contract's tables (shared/design/contract.md) and the columns each must hold.
CONTRACT_TABLES = {
    "raw_events": ["user_id", "event_time", "event_name", "item_id", "category", "source_file", "source_row"],
    "rejected_events": ["source_file", "source_row", "raw", "reason"],
    "sessionized_events": [
        "user_id",
        "event_time",
        "event_name",
        "session_id",
        "session_index",
        "event_index",
        "event_index_in_session",
        "seconds_since_prev_event",
        "seconds_since_session_start",
        "hour_of_day",
        "day_of_week",
    ],
    "user_embeddings": ["user_id", "model_name", "model_version", "embedding", "as_of"],
    "evaluation_metrics": ["model", "task", "task_kind", "metric", "value", "split"],
    "drift_report": ["checked_at", "dataset_drift", "drift_share", "report_path"],
}
TRACE_FAMILY = [*SEQUENCE_MODELS, *AGGREGATE_MODELS]  # trace ... myopic_last_page, st_agg, st_cohort
MTLDS_FAMILY = list(CONVERSION_MODELS)  # mtlds_<agg> x4, single_task, shared_bottom, esmm, mmoe


def small_run_config(
    sequence_epochs: int = 2,
    conversion_epochs: int = 2,
    bootstrap_samples: int = 50,
    map_users: int = 300,
    torch_threads: int = 1,
) -> dict:
    """Run config of the whole graph with few epochs: every `<model>_model` op, evaluation, t-SNE."""
    ops: dict[str, dict] = {}
    for kind in SEQUENCE_MODELS:
        ops[f"{kind}_model"] = {"config": {"epochs": sequence_epochs, "torch_threads": torch_threads}}
    for kind in AGGREGATE_MODELS:
        ops[f"{kind}_model"] = {"config": {"epochs": sequence_epochs, "torch_threads": torch_threads}}
    for name in CONVERSION_MODELS:
        ops[f"{name}_model"] = {"config": {"epochs": conversion_epochs, "torch_threads": torch_threads}}
    ops["evaluation_metrics"] = {"config": {"bootstrap_samples": bootstrap_samples}}
    ops["user_embeddings"] = {"config": {"map_users": map_users}}
    return {"ops": ops}


@dataclass
class PipelineRun:
    home: Path
    tracking_uri: str
    result: dg.ExecuteInProcessResult
    seconds: float
    resources: dict
    instance: dg.DagsterInstance

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        con = duckdb.connect(str(self.warehouse), read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            return con.execute(sql, params or []).df()
        finally:
            con.close()

    def checks(self) -> dict[str, tuple[bool, str]]:
        """{'asset:check': (passed, severity)} of the run."""
        return {
            f"{e.asset_key.to_user_string()}:{e.check_name}": (e.passed, e.severity.value)
            for e in self.result.get_asset_check_evaluations()
        }


def materialize_full_graph(
    home: Path, run_config: dict | None = None, instance: dg.DagsterInstance | None = None, **event_source
) -> PipelineRun:
    """Materialize ASSETS + ASSET_CHECKS of the code location into `home` (MLflow store beside it).

    `event_source`: fields of `EventSource` (`events`, `events_format`, `simulator_n_users`, ...).
    Pass `instance` to re-materialize single assets later on top of this run (the default IO
    manager keeps the model assets' outputs in the instance's storage).
    """
    from trace_dagster.definitions import ASSET_CHECKS, ASSETS, build_resources

    home.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{home}/mlflow.db"
    resources = build_resources(home=str(home), tracking_uri=tracking_uri, **event_source)
    started = time.perf_counter()
    instance = instance or dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        resources=resources,
        instance=instance,
        run_config=run_config or small_run_config(),
        raise_on_error=False,
    )
    return PipelineRun(home, tracking_uri, result, time.perf_counter() - started, resources, instance)


def failed_steps(result: dg.ExecuteInProcessResult) -> list[str]:
    """Step keys that failed, with their error message (for assertion messages)."""
    return [
        f"{e.step_key}: {e.event_specific_data.error.message.strip()[:500]}"
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    ]
