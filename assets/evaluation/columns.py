"""Column descriptions of the tables the evaluation group owns (shown in the Dagster catalog)."""

EVALUATION_METRICS_COLUMNS = {
    "model": "Model family (trace, myopic, ..., mtlds_linear, esmm, ...).",
    "task": "Engagement task, conversion stage, or funnel_order (NDCG).",
    "task_kind": "seen (trained head) or unseen (probe on frozen embeddings).",
    "metric": "auroc, auprc (sequence models), auc, ndcg (conversion models).",
    "value": "The metric on the split.",
    "split": "Always test: held-out users.",
    "model_version": "Registered MLflow version of the model that was scored.",
    "evaluated_at": "When the evaluation ran (UTC).",
    "dagster_run_id": "The Dagster run that wrote the row.",
}

EVALUATION_UPLIFTS_COLUMNS = {
    "model": "Model compared with the myopic baseline.",
    "task": "Engagement task.",
    "task_kind": "seen or unseen.",
    "metric": "auroc or auprc.",
    "uplift_pct": "100 * (model - myopic) / myopic on the same test examples.",
    "ci_low": "Lower bound of the paired bootstrap 95% interval of uplift_pct.",
    "ci_high": "Upper bound of the paired bootstrap 95% interval of uplift_pct.",
    "evaluated_at": "When the evaluation ran (UTC).",
    "dagster_run_id": "The Dagster run that wrote the row.",
}
