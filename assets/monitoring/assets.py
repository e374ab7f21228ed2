"""`drift_report`: is today's traffic still the traffic the champion was trained on?

Like with like (see `features.py`): the reference window ends at the champion's last training
cutoff `T_r`, the current window at the newest time `T_c` on the same cutoff grid, and both
have the same length, so both sides cover the same phase of the day and week. Three Evidently
0.7 reports per check, saved as HTML under `reports/`:

- **input drift** (GATED: a failure starts `retrain_models` through the `retrain_on_drift`
  sensor) on per-session features (event mix, length, duration, gaps, hour, weekday,
  attributes), for the whole population and per segment (`new_users`, `new_files`), so that a
  shifted sub-population is not diluted. Gated because it is model-free, calibrated
  (`bench/drift_calibration.py`: at most 5% false alarms on stationary splits) and a change in
  what users do is exactly what retraining on fresh examples repairs;
- **embedding drift** and **prediction drift** of the champion (WARN only): the same champion
  embeds the users active within the observation window before each side's end, as of that end,
  from histories of the same span (the reference's: from the data's start to `T_r`).
  They only warn because they move with the champion itself (a retrained model has a new
  embedding space) and, when the inputs did not drift, a retraining would learn the same thing
  again; they tell a reader that the model sees its users differently, and the report says why.

Memory is bounded by `max_sessions` and `max_users` (SQL aggregates over `USING SAMPLE`), never by
the number of events. One row per check run is appended to the `drift_report` table.
"""

import json
from datetime import UTC, datetime, timedelta

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common.metadata import warehouse_table_metadata
from assets.monitoring.columns import DRIFT_REPORT_COLUMNS
from assets.monitoring.features import (
    MIN_SEGMENT_SESSIONS,
    attribute_columns,
    drift_segments,
    drift_windows,
    infer_cutoff_grid,
    session_features,
    sql_timestamp,
    top_event_names,
)
from assets.serving.assets import MODEL_NAME, user_embeddings
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse

GROUP = "monitoring"
# assets/monitoring/reports imports Evidently (~4 s): only the drift step should pay for it, not
# every step process that loads the code location. Keep in sync with
# reports.DEFAULT_DRIFT_SHARE_THRESHOLD (a test checks it). Values from bench/drift_calibration.py.
DEFAULT_DRIFT_SHARE_THRESHOLD = 0.11
DEFAULT_PREDICTION_DRIFT_SHARE = 0.6  # 3 of 5 tasks: 0/20 stationary false alarms on both datasets
MIN_EMBEDDING_ROWS = 4  # Evidently's embedding drift needs a few rows on each side
OWNERS = ["team:ml-platform"]
SESSION_COLUMNS_NOT_NEEDED = "source_file, source_row, ingested_at"


class DriftConfig(dg.Config):
    drift_share_threshold: float = Field(
        default=DEFAULT_DRIFT_SHARE_THRESHOLD,
        description="Input drift (gated) when this share of session features drifted, in any segment.",
    )
    prediction_drift_share: float = Field(
        default=DEFAULT_PREDICTION_DRIFT_SHARE,
        description="Prediction drift (warn) when this share of the champion's task probabilities drifted.",
    )
    max_sessions: int = Field(
        default=10_000, description="Sessions sampled per window and segment (seeded): bounds cost and memory."
    )
    max_users: int = Field(default=1000, description="Users embedded per side (md5-ordered sample): bounds cost.")
    seed: int = 0


def task_probabilities(model, embeddings: np.ndarray) -> pd.DataFrame:
    """`p_<task>` columns of the champion's heads on the embeddings (no re-encoding)."""
    proba = model.proba_from_embeddings(embeddings)
    return proba.rename(columns={c: "p_" + c.removeprefix("label_") for c in proba.columns})


def _user_sample(con, examples_sql: str, n: int, seed: int) -> pd.DataFrame:
    """A deterministic sample of `n` (user_id, cutoff) rows: the same users on every re-run."""
    return con.sql(
        f"SELECT user_id, cutoff FROM ({examples_sql}) ORDER BY md5(user_id || ':{int(seed)}') LIMIT {int(n)}"
    ).df()


def _events_of(con, sample: pd.DataFrame, since, cutoff) -> pd.DataFrame:
    """Sessionized events in [since, cutoff) of the sampled users only (what the encoder reads)."""
    con.register("drift_user_sample", sample[["user_id"]])
    try:
        return con.sql(
            f"SELECT * EXCLUDE ({SESSION_COLUMNS_NOT_NEEDED}) FROM sessionized_events "
            f"WHERE user_id IN (SELECT user_id FROM drift_user_sample) AND event_time >= {sql_timestamp(since)} "
            f"AND event_time < {sql_timestamp(cutoff)} "
            "ORDER BY user_id, event_index"
        ).df()
    finally:
        con.unregister("drift_user_sample")


def _input_reason(segments: list[dict], threshold: float) -> str:
    drifted = [s for s in segments if s.get("dataset_drift")]
    if not drifted:
        tested = ", ".join(f"{s['segment']} {s['drift_share']:.2f}" for s in segments if "drift_share" in s)
        return f"no segment reached drift share {threshold} ({tested})"
    return "; ".join(
        f"input drift in {s['segment']}: share {s['drift_share']:.2f} >= {threshold} ({s['drifted_columns']})"
        for s in drifted
    )


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"evidently", "duckdb"},
    deps=["sessionized_events", "training_examples", user_embeddings],
    pool=WAREHOUSE_POOL,
    description="Evidently input (per segment; gated), embedding and prediction drift (warn) of the current "
    "window against an equal window before the last training cutoff; HTML under reports/, a row in `drift_report`.",
)
def drift_report(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    warehouse: DuckDBWarehouse,
    paths: TraceDagsterPaths,
    mlflow_tracking: MLflowTracking,
) -> dg.MaterializeResult:
    from assets.monitoring.reports import embedding_drift, input_drift, prediction_drift

    version = mlflow_tracking.champion_version(MODEL_NAME)
    if version is None:
        raise dg.Failure(f"`{MODEL_NAME}` has no champion: nothing to monitor yet")
    registered_ms = mlflow_tracking.client().get_model_version(MODEL_NAME, version).creation_timestamp
    trained_at = datetime.fromtimestamp(registered_ms / 1000, UTC).replace(tzinfo=None)
    checked_at = datetime.now(UTC).replace(tzinfo=None)
    stamp = checked_at.strftime("%Y%m%dT%H%M%S")
    reports = paths.reports_dir
    source = "sessionized_events"
    with warehouse.connect(read_only=True) as con:
        cutoffs = [row[0] for row in con.execute("SELECT DISTINCT cutoff FROM training_examples").fetchall()]
        if not cutoffs:
            raise dg.Failure("training_examples is empty: no training cutoff to compare against")
        last_cutoff = max(cutoffs)
        [(window_seconds,)] = con.execute(
            "SELECT max(seconds_since_last_event) FROM training_examples WHERE cutoff = ?", [last_cutoff]
        ).fetchall()
        [(data_end,)] = con.execute(f"SELECT max(event_time) FROM {source}").fetchall()
        try:
            windows = drift_windows(
                last_cutoff,
                data_end,
                infer_cutoff_grid(cutoffs, last_cutoff, data_end),
                timedelta(seconds=float(window_seconds)),
            )
        except ValueError as error:
            raise dg.Failure(str(error)) from error
        context.log.info(f"drift windows: {windows.describe()}")

        # ---- input drift, per segment (gated)
        reference_events = (
            f"e.event_time >= {sql_timestamp(windows.reference_start)} "
            f"AND e.event_time < {sql_timestamp(windows.reference_end)}"
        )
        feature_args = {
            "event_names": top_event_names(con, source, reference_events),
            "attributes": attribute_columns(con, source),
            "max_sessions": config.max_sessions,
            "seed": config.seed,
            "hour_of_day": windows.compares_hour_of_day,
            "day_of_week": windows.compares_day_of_week,
        }
        segments, per_column = [], []
        for segment in drift_segments(con, source, windows, trained_at):
            reference = session_features(con, source, segment.reference_where, **feature_args)
            current = session_features(con, source, segment.current_where, **feature_args)
            entry = {
                "segment": segment.name,
                "description": segment.description,
                "reference_sessions": len(reference),
                "current_sessions": len(current),
            }
            if min(len(reference), len(current)) < MIN_SEGMENT_SESSIONS:
                entry["skipped"] = f"fewer than {MIN_SEGMENT_SESSIONS} sessions on a side"
                segments.append(entry)
                continue
            result = input_drift(
                reference,
                current,
                config.drift_share_threshold,
                reports / f"drift-input-{segment.name}-{stamp}.html",
            )
            entry.update(
                dataset_drift=bool(result.dataset_drift),
                drift_share=float(result.drift_share),
                drifted_columns=", ".join(result.drifted_columns) or "none",
                report_path=str(result.report_path),
            )
            segments.append(entry)
            per_column.append(result.per_column.assign(segment=segment.name))
        whole = next(s for s in segments if s["segment"] == "all")
        if "skipped" in whole:
            raise dg.Failure(
                f"too few sessions to compare the whole population ({whole['reference_sessions']} reference, "
                f"{whole['current_sessions']} current; {windows.describe()})"
            )

        # ---- embeddings and predictions of the same champion, same as-of semantics (warn)
        observation = int(windows.observation.total_seconds())
        reference_sql = f"SELECT user_id, cutoff FROM training_examples WHERE cutoff = {sql_timestamp(last_cutoff)}"
        current_sql = (
            f"SELECT user_id, {sql_timestamp(windows.current_end)} AS cutoff FROM {source} "
            f"WHERE event_time < {sql_timestamp(windows.current_end)} GROUP BY user_id "
            f"HAVING max(event_time) >= {sql_timestamp(windows.current_end)} - to_seconds({observation})"
        )
        [(n_reference,)] = con.execute(f"SELECT count(*) FROM ({reference_sql})").fetchall()
        [(n_current,)] = con.execute(f"SELECT count(*) FROM ({current_sql})").fetchall()
        n_users = min(config.max_users, n_reference, n_current)
        if n_users < MIN_EMBEDDING_ROWS:
            raise dg.Failure(
                f"too few active users to compare embeddings: {n_reference} as of {last_cutoff}, {n_current} as of "
                f"{windows.current_end} (need {MIN_EMBEDDING_ROWS})"
            )
        reference_users = _user_sample(con, reference_sql, n_users, config.seed)
        current_users = _user_sample(con, current_sql, n_users, config.seed)
        # Same history span on both sides: the reference users' histories start with the data;
        # the current users' are cut to as long a span before T_c. Otherwise a population that
        # merely grows older (every simulated user starts on day 0) reads as embedding drift.
        [(data_start,)] = con.execute(f"SELECT min(event_time) FROM {source}").fetchall()
        history_span = windows.reference_end - data_start
        reference_events_frame = _events_of(con, reference_users, data_start, windows.reference_end)
        current_events_frame = _events_of(con, current_users, windows.current_end - history_span, windows.current_end)

    model = mlflow_tracking.load_model(f"models:/{MODEL_NAME}/{version}")
    reference_emb = model.embed(reference_events_frame, reference_users)
    current_emb = model.embed(current_events_frame, current_users)
    history = (
        float(reference_events_frame.groupby("user_id").size().median()),
        float(current_events_frame.groupby("user_id").size().median()),
    )
    del reference_events_frame, current_events_frame
    embeddings = embedding_drift(reference_emb, current_emb, reports / f"drift-embeddings-{stamp}.html")
    predictions = prediction_drift(
        task_probabilities(model, reference_emb),
        task_probabilities(model, current_emb),
        config.prediction_drift_share,
        html_path=reports / f"drift-predictions-{stamp}.html",
    )
    outputs_drifted = bool(embeddings.drift_detected or predictions.dataset_drift)
    if outputs_drifted:
        parts = []
        if embeddings.drift_detected:
            parts.append(f"embedding drift ({embeddings.method}: score {embeddings.drift_score:.3f})")
        if predictions.dataset_drift:
            parts.append(
                f"prediction drift (share {predictions.drift_share:.2f} >= {config.prediction_drift_share}: "
                f"{', '.join(predictions.drifted_columns)})"
            )
        outputs_reason = "; ".join(parts) + (
            f"; median history {history[0]:.0f} -> {history[1]:.0f} events per user, "
            f"input drift share {whole['drift_share']:.2f}"
        )
    else:
        outputs_reason = (
            f"embeddings ({embeddings.method} score {embeddings.drift_score:.3f}) and predictions "
            f"(share {predictions.drift_share:.2f}) stable"
        )

    dataset_drift = any(s.get("dataset_drift") for s in segments)
    input_reason = _input_reason(segments, config.drift_share_threshold)
    row = pd.DataFrame(
        [
            {
                "checked_at": checked_at,
                "dataset_drift": dataset_drift,
                "drift_share": float(whole["drift_share"]),
                "report_path": whole["report_path"],
                "threshold": config.drift_share_threshold,
                "reference_cutoff": pd.Timestamp(last_cutoff),
                "reference_start": pd.Timestamp(windows.reference_start),
                "current_end": pd.Timestamp(windows.current_end),
                "reference_sessions": whole["reference_sessions"],
                "current_sessions": whole["current_sessions"],
                "drifted_columns": whole["drifted_columns"],
                "segments": json.dumps(segments),
                "input_reason": input_reason,
                "embedding_drift": bool(embeddings.drift_detected),
                "embedding_drift_score": float(embeddings.drift_score),
                "embedding_report_path": str(embeddings.report_path),
                "prediction_drift": bool(predictions.dataset_drift),
                "prediction_drift_share": float(predictions.drift_share),
                "prediction_threshold": config.prediction_drift_share,
                "prediction_report_path": str(predictions.report_path),
                "outputs_reason": outputs_reason,
                "model_version": str(version),
                "dagster_run_id": context.run.run_id,
                "reference_users": len(reference_users),
                "current_users": len(current_users),
                "reference_median_history_events": history[0],
                "current_median_history_events": history[1],
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
                "signal": f"input, {s['segment']} (gated)",
                "drifted": s.get("dataset_drift", "skipped"),
                "score": f"share {s['drift_share']:.3f}" if "drift_share" in s else s["skipped"],
                "sessions": f"{s['reference_sessions']} vs {s['current_sessions']}",
                "html": s.get("report_path", ""),
            }
            for s in segments
        ]
        + [
            {
                "signal": f"embeddings, {embeddings.method} (warn)",
                "drifted": embeddings.drift_detected,
                "score": f"{embeddings.drift_score:.3f}",
                "sessions": f"{len(reference_users)} vs {len(current_users)} users",
                "html": embeddings.report_path,
            },
            {
                "signal": "predictions, task probabilities (warn)",
                "drifted": predictions.dataset_drift,
                "score": f"share {predictions.drift_share:.3f}",
                "sessions": f"{len(reference_users)} vs {len(current_users)} users",
                "html": predictions.report_path,
            },
        ]
    )
    return dg.MaterializeResult(
        metadata={
            **catalog,
            "dataset_drift": dataset_drift,
            "drift_share": float(whole["drift_share"]),
            "embedding_drift": bool(embeddings.drift_detected),
            "prediction_drift_share": float(predictions.drift_share),
            "windows": windows.describe(),
            "input_reason": input_reason,
            "outputs_reason": outputs_reason,
            "summary": dg.MetadataValue.md(summary.to_markdown(index=False)),
            "per_column": dg.MetadataValue.md(pd.concat(per_column).round(4).to_markdown(index=False)),
            "report_path": dg.MetadataValue.path(whole["report_path"]),
            "report_url": dg.MetadataValue.url(f"file://{whole['report_path']}"),
            "reference_cutoff": str(last_cutoff),
        }
    )


def _latest_drift_row(warehouse: DuckDBWarehouse) -> dict:
    with warehouse.connect(read_only=True) as con:
        latest = con.sql("SELECT * FROM drift_report ORDER BY checked_at DESC LIMIT 1").df()
    return latest.iloc[0].to_dict()


def _report_links(paths: dict[str, str]) -> dict:
    """Each HTML report as a path and a clickable file:// URL (Dagster renders URLs as links)."""
    metadata = {}
    for name, path in paths.items():
        metadata[name] = dg.MetadataValue.path(path)
        metadata[name.replace("_path", "_url")] = dg.MetadataValue.url(f"file://{path}")
    return metadata


@dg.asset_check(
    asset=drift_report,
    description="Gated: fails when the share of drifted session features reaches the threshold in the whole "
    "population or in a segment (new users, new files); the retraining sensor watches this check.",
)
def drift_below_threshold(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    row = _latest_drift_row(warehouse)
    segments = json.loads(row["segments"])
    reports = {f"{s['segment']}_report_path": s["report_path"] for s in segments if s.get("report_path")}
    return dg.AssetCheckResult(
        passed=not row["dataset_drift"],
        metadata={
            "reason": row["input_reason"],
            "drift_share": float(row["drift_share"]),
            "threshold": float(row["threshold"]),
            "drifted_columns": row["drifted_columns"] or "none",
            "segments": dg.MetadataValue.json(segments),
            "report_path": dg.MetadataValue.path(row["report_path"]),
            "report_url": dg.MetadataValue.url(f"file://{row['report_path']}"),
            **_report_links(reports),
        },
    )


@dg.asset_check(
    asset=drift_report,
    description="Warns (never retrains) when the champion's embeddings or task probabilities drifted.",
)
def model_outputs_stable(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    row = _latest_drift_row(warehouse)
    return dg.AssetCheckResult(
        passed=not (row["embedding_drift"] or row["prediction_drift"]),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "reason": row["outputs_reason"],
            "embedding_drift_score": float(row["embedding_drift_score"]),
            "prediction_drift_share": float(row["prediction_drift_share"]),
            **_report_links(
                {
                    "embedding_report_path": row["embedding_report_path"],
                    "prediction_report_path": row["prediction_report_path"],
                }
            ),
        },
    )
