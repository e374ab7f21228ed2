"""Column descriptions of the tables the monitoring group owns (shown in the Dagster catalog)."""

DRIFT_REPORT_COLUMNS = {
    "checked_at": "When the drift check ran (UTC); one row per check.",
    "dataset_drift": "Gated input drift: in the whole population or a segment (new users, new files), the share "
    "of drifted session features reached the threshold; the retraining sensor watches it.",
    "drift_share": "Share of session features whose distribution drifted (Evidently), whole population.",
    "report_path": "HTML report of the input drift of the whole population.",
    "threshold": "drift_share above which the data are said to drift.",
    "reference_cutoff": "The champion's last training cutoff: end of the reference window, start of the current one.",
    "reference_start": "Start of the reference window (as long as the current one).",
    "current_end": "End of the current window: the newest time on the training cutoff grid before the data's end.",
    "reference_sessions": "Sessions sampled in the reference window (whole population).",
    "current_sessions": "Sessions sampled in the current window (whole population).",
    "drifted_columns": "Comma-separated drifted session features (whole population).",
    "segments": "JSON list, one object per segment (all, new_users, new_files): sessions, share, drifted "
    "features, report, or why it was skipped.",
    "input_reason": "One line: why the gated input-drift check passed or failed.",
    "embedding_drift": "Drift of the champion's user embeddings, reference vs current users.",
    "embedding_drift_score": "Evidently's embedding drift score.",
    "embedding_report_path": "HTML report of the embedding drift.",
    "prediction_drift": "Drift of the champion's task probabilities.",
    "prediction_drift_share": "Share of tasks whose predicted probabilities drifted.",
    "prediction_threshold": "Share of drifted task probabilities at which the predictions drift (warn).",
    "prediction_report_path": "HTML report of the prediction drift.",
    "outputs_reason": "One line: why the model-output warning passed or fired, naming the change.",
    "model_version": "TRACE champion version that produced embeddings and predictions.",
    "dagster_run_id": "The Dagster run that wrote the row.",
    "reference_users": "Users embedded as of the reference cutoff (sample).",
    "current_users": "Users embedded as of the current window's end (sample, same size).",
    "reference_median_history_events": "Median events per embedded reference user.",
    "current_median_history_events": "Median events per embedded current user (same history span).",
}
