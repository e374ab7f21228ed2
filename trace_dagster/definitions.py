"""The Dagster code location: assets, checks, resources, jobs, schedules and sensors of trace-dagster.

Glue only: what each asset does lives in `assets/`, how state is stored in `resources/`.
Resources read their settings from the environment when used (`TRACE_DAGSTER_HOME`,
`TRACE_DAGSTER_EVENTS`, `TRACE_DAGSTER_EVENTS_FORMAT`, `MLFLOW_TRACKING_URI`), so this module
loads with no variable set.
"""

from __future__ import annotations

import dagster as dg

from assets.conversion_models.assets import conversion_model_assets
from assets.evaluation.assets import evaluation_metrics, evaluation_metrics_are_complete
from assets.ingestion.raw_events import ingested_events, ingestion_checks
from assets.ingestion.sessionized_events import sessionization_checks, sessionized_events
from assets.model_registry.assets import build_model_promotion, upstream_check_keys
from assets.monitoring.assets import drift_below_threshold, drift_report, model_outputs_stable
from assets.reproduction.assets import REPRODUCTION_ASSETS
from assets.serving.assets import user_embeddings, user_embeddings_are_complete
from assets.trace_models.aggregate_models import aggregate_model_assets
from assets.trace_models.assets import sequence_model_assets
from assets.training_data.assets import (
    funnel_examples,
    funnel_examples_have_conversions,
    training_examples,
    training_examples_labels_are_learnable,
    training_examples_users_in_one_split,
    user_splits,
)
from resources.event_sources import EventSource
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse
from trace_dagster.jobs import JOBS
from trace_dagster.schedules import SCHEDULES
from trace_dagster.sensors import SENSORS

ASSET_CHECKS = [
    ingestion_checks,
    sessionization_checks,
    training_examples_users_in_one_split,
    training_examples_labels_are_learnable,
    funnel_examples_have_conversions,
    evaluation_metrics_are_complete,
    user_embeddings_are_complete,
    drift_below_threshold,
    model_outputs_stable,
]
# Every asset but the promotion gate, which is built with the checks upstream of it (no import circle).
_ASSETS_BUT_THE_GATE = [
    ingested_events,
    sessionized_events,
    user_splits,
    training_examples,
    funnel_examples,
    *sequence_model_assets,
    *aggregate_model_assets,
    *conversion_model_assets,
    evaluation_metrics,
    user_embeddings,
    drift_report,
]
model_promotion = build_model_promotion(upstream_check_keys(_ASSETS_BUT_THE_GATE, ASSET_CHECKS))
ASSETS = [*_ASSETS_BUT_THE_GATE, model_promotion, *REPRODUCTION_ASSETS]


def build_resources(home: str = "", tracking_uri: str | None = None, **event_source: object) -> dict:
    """The resources of the code location; tests pass a tmp home, a tmp MLflow store, a small simulator."""
    paths = TraceDagsterPaths(home=home)
    return {
        "paths": paths,
        "warehouse": DuckDBWarehouse(paths=paths),
        "event_source": EventSource(paths=paths, **event_source),
        "mlflow_tracking": MLflowTracking(tracking_uri=tracking_uri),
    }


defs = dg.Definitions(
    assets=ASSETS,
    asset_checks=ASSET_CHECKS,
    jobs=JOBS,
    schedules=SCHEDULES,
    sensors=SENSORS,
    resources=build_resources(),
)
