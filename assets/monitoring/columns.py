"""Column descriptions of the tables the monitoring group owns (shown in the Dagster catalog)."""

DRIFT_REPORT_COLUMNS = {
    "checked_at": "When the drift check ran (UTC); one row per check.",
    "dataset_drift": "Input drift: the share of drifted session features exceeds the threshold.",
    "drift_share": "Share of session features whose distribution drifted (Evidently).",
    "report_path": "HTML report of the input drift.",
    "threshold": "drift_share above which the data are said to drift.",
    "reference_cutoff": "Sessions before it are the reference, sessions from it on the current data.",
    "reference_sessions": "Sessions in the reference window.",
    "current_sessions": "Sessions in the current window.",
    "drifted_columns": "Comma-separated drifted session features.",
    "embedding_drift": "Drift of the champion's user embeddings, reference vs current users.",
    "embedding_drift_score": "Evidently's embedding drift score.",
    "embedding_report_path": "HTML report of the embedding drift.",
    "prediction_drift": "Drift of the champion's task probabilities.",
    "prediction_drift_share": "Share of tasks whose predicted probabilities drifted.",
    "prediction_report_path": "HTML report of the prediction drift.",
    "model_version": "TRACE champion version that produced embeddings and predictions.",
    "dagster_run_id": "The Dagster run that wrote the row.",
    "reference_users": "Users in the reference window.",
    "current_users": "Users in the current window.",
}
