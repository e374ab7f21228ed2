"""`drift_report`: is today's traffic still the traffic the champion was trained on?

Reference: sessions that started before the last training cutoff (what the models learned
from). Current: sessions that started at or after it (the label window of the latest cutoff
plus every newer file). Three Evidently 0.7 reports, all saved as HTML under `reports/`:
- input drift on per-session features (event mix, length, duration, gaps, hour, weekday,
  attributes): the share of drifted columns against `drift_share_threshold`; this is the
  contract's `dataset_drift` and the check the retraining sensor watches;
- embedding drift of the champion's user embeddings: users active in the observation window
  before the last cutoff, against `user_embeddings` of the users active in the same window
  before `as_of`;
- prediction drift of the champion's task probabilities computed from those embeddings.
One row per check run is appended to the `drift_report` table.
"""

from datetime import UTC, datetime

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common.metadata import warehouse_table_metadata
from assets.monitoring.columns import DRIFT_REPORT_COLUMNS
from assets.serving.assets import MODEL_NAME, user_embeddings
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse, sql_literal

GROUP = "monitoring"
# assets/drift_reports imports Evidently (~4 s): only the drift step should pay for it, not every
# step process that loads the code location. Keep in sync with drift_reports.DEFAULT_DRIFT_SHARE_THRESHOLD
# (a test checks it).
DEFAULT_DRIFT_SHARE_THRESHOLD = 0.25
MIN_EMBEDDING_ROWS = 4  # Evidently's embedding drift needs a few rows on each side
OWNERS = ["team:ml-platform"]


class DriftConfig(dg.Config):
    drift_share_threshold: float = Field(
        default=DEFAULT_DRIFT_SHARE_THRESHOLD,
        description="Input drift when this share of session features drifted (see drift_reports).",
    )
    max_sessions: int = Field(
        default=50_000, description="Sessions sampled per window (seeded) to bound the report's cost."
    )
    seed: int = 0


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    return frame if len(frame) <= n else frame.sample(n=n, random_state=seed)


def task_probabilities(model, embeddings: np.ndarray) -> pd.DataFrame:
    """`p_<task>` columns of the champion's heads on the embeddings (no re-encoding)."""
    proba = model.proba_from_embeddings(embeddings)
    return proba.rename(columns={c: "p_" + c.removeprefix("label_") for c in proba.columns})


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"evidently", "duckdb"},
    deps=["sessionized_events", "training_examples", user_embeddings],
    pool=WAREHOUSE_POOL,
    description="Evidently input, embedding and prediction drift of the current window against the "
    "training reference; HTML reports under reports/, one row per check in `drift_report`.",
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    warehouse: DuckDBWarehouse,
    paths: TraceDagsterPaths,
    mlflow_tracking: MLflowTracking,
) -> dg.MaterializeResult:
    from assets.monitoring.reports import (
        embedding_drift,
        input_drift,
        prediction_drift,
        session_features,
        top_event_names,
    )

    version = mlflow_tracking.champion_version(MODEL_NAME)
    if version is None:
        raise dg.Failure(f"`{MODEL_NAME}` has no champion: nothing to monitor yet")
    with warehouse.connect(read_only=True) as con:
        cutoff = con.execute("SELECT max(cutoff) FROM training_examples").fetchall()[0][0]
        sessions = con.sql("""
            SELECT * EXCLUDE (source_file, source_row, ingested_at),
                   min(event_time) OVER (PARTITION BY session_id) AS session_start
            FROM sessionized_events ORDER BY user_id, event_index""").df()
        reference_examples = con.sql(
            "SELECT example_id, user_id, cutoff, seconds_since_last_event FROM training_examples "
            "WHERE cutoff = (SELECT max(cutoff) FROM training_examples)"
        ).df()
        # Like with like: the reference is the users active within the observation window before
        # the cutoff (that is what an example is), so the current side is the users active within
        # the same window before `as_of`; comparing against every user ever seen would flag drift
        # on every run just because the population grew.
        window_seconds = float(reference_examples["seconds_since_last_event"].max())
        current_embeddings = con.sql(f"""
            SELECT u.user_id, u.embedding FROM user_embeddings u
            JOIN (SELECT user_id, max(event_time) AS last_event FROM sessionized_events GROUP BY user_id) e USING (user_id)
            WHERE u.model_name = {sql_literal(MODEL_NAME)} AND u.model_version = {sql_literal(str(version))}
              AND e.last_event >= u.as_of - to_seconds(CAST({window_seconds} AS BIGINT))""").df()
    before = sessions["session_start"] < pd.Timestamp(cutoff)
    if before.all() or (~before).all():
        raise dg.Failure(f"cannot split sessions at the last training cutoff {cutoff}: one window is empty")
    names = top_event_names(sessions[before])
    reference = _sample(
        session_features(sessions[before].drop(columns="session_start"), event_names=names),
        config.max_sessions,
        config.seed,
    )
    current = _sample(
        session_features(sessions[~before].drop(columns="session_start"), event_names=names),
        config.max_sessions,
        config.seed,
    )

    checked_at = datetime.now(UTC).replace(tzinfo=None)
    stamp = checked_at.strftime("%Y%m%dT%H%M%S")
    reports = paths.reports_dir
    inputs = input_drift(reference, current, config.drift_share_threshold, reports / f"drift-input-{stamp}.html")

    model = mlflow_tracking.load_model(f"models:/{MODEL_NAME}/{version}")
    reference_emb = model.embed(sessions, reference_examples)
    if len(current_embeddings) < MIN_EMBEDDING_ROWS or len(reference_emb) < MIN_EMBEDDING_ROWS:
        raise dg.Failure(
            f"too few embeddings to compare: {len(reference_emb)} reference, {len(current_embeddings)} current "
            f"(need {MIN_EMBEDDING_ROWS}); materialize user_embeddings for champion v{version}"
        )
    current_emb = np.stack(current_embeddings["embedding"].to_numpy())
    embeddings = embedding_drift(reference_emb, current_emb, reports / f"drift-embeddings-{stamp}.html")
    predictions = prediction_drift(
        task_probabilities(model, reference_emb),
        task_probabilities(model, current_emb),
        html_path=reports / f"drift-predictions-{stamp}.html",
    )

    row = pd.DataFrame(
        [
            {
                "checked_at": checked_at,
                "dataset_drift": bool(inputs.dataset_drift),
                "drift_share": float(inputs.drift_share),
                "report_path": str(inputs.report_path),
                "threshold": config.drift_share_threshold,
                "reference_cutoff": pd.Timestamp(cutoff),
                "reference_sessions": inputs.n_reference,
                "current_sessions": inputs.n_current,
                "drifted_columns": ", ".join(inputs.drifted_columns),
                "embedding_drift": bool(embeddings.drift_detected),
                "embedding_drift_score": float(embeddings.drift_score),
                "embedding_report_path": str(embeddings.report_path),
                "prediction_drift": bool(predictions.dataset_drift),
                "prediction_drift_share": float(predictions.drift_share),
                "prediction_report_path": str(predictions.report_path),
                "model_version": str(version),
                "dagster_run_id": context.run_id,
                "reference_users": len(reference_examples),
                "current_users": len(current_embeddings),
            }
        ]
    )
    with warehouse.connect() as con:
        con.register("drift_row", row)
        warehouse.append_table(con, "drift_report", "SELECT * FROM drift_row")  # one row per check
        catalog = warehouse_table_metadata(con, "drift_report", DRIFT_REPORT_COLUMNS)

    summary = pd.DataFrame(
        [
            {
                "report": "input (session features)",
                "drifted": inputs.dataset_drift,
                "score": f"share {inputs.drift_share:.3f} (threshold {config.drift_share_threshold})",
                "html": inputs.report_path,
            },
            {
                "report": f"embeddings ({embeddings.method})",
                "drifted": embeddings.drift_detected,
                "score": f"{embeddings.drift_score:.3f}",
                "html": embeddings.report_path,
            },
            {
                "report": "predictions (task probabilities)",
                "drifted": predictions.dataset_drift,
                "score": f"share {predictions.drift_share:.3f}",
                "html": predictions.report_path,
            },
        ]
    )
    return dg.MaterializeResult(
        metadata={
            **catalog,
            "dataset_drift": bool(inputs.dataset_drift),
            "drift_share": float(inputs.drift_share),
            "embedding_drift": bool(embeddings.drift_detected),
            "prediction_drift_share": float(predictions.drift_share),
            "summary": dg.MetadataValue.md(summary.to_markdown(index=False)),
            "per_column": dg.MetadataValue.md(inputs.per_column.round(4).to_markdown(index=False)),
            "report_path": dg.MetadataValue.path(str(inputs.report_path)),
            "reference_cutoff": str(cutoff),
        }
    )


def _latest_drift_row(warehouse: DuckDBWarehouse) -> dict:
    with warehouse.connect(read_only=True) as con:
        latest = con.sql("SELECT * FROM drift_report ORDER BY checked_at DESC LIMIT 1").df()
    return latest.iloc[0].to_dict()


@dg.asset_check(
    asset=drift_report,
    description="Fails when the share of drifted session features passes the "
    "threshold; the retraining sensor watches this check.",
)
def drift_below_threshold(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    row = _latest_drift_row(warehouse)
    return dg.AssetCheckResult(
        passed=not row["dataset_drift"],
        metadata={
            "drift_share": float(row["drift_share"]),
            "threshold": float(row["threshold"]),
            "drifted_columns": row["drifted_columns"] or "none",
            "report_path": dg.MetadataValue.path(row["report_path"]),
        },
    )


@dg.asset_check(asset=drift_report, description="Warns when the champion's embeddings or predictions drifted.")
def model_outputs_stable(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    row = _latest_drift_row(warehouse)
    return dg.AssetCheckResult(
        passed=not (row["embedding_drift"] or row["prediction_drift"]),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "embedding_drift_score": float(row["embedding_drift_score"]),
            "prediction_drift_share": float(row["prediction_drift_share"]),
        },
    )
