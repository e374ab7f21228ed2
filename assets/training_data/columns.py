"""Column descriptions of the tables the training_data group owns (shown in the Dagster catalog)."""

USER_SPLITS_COLUMNS = {
    "user_id": "Every user of sessionized_events, once.",
    "split": "train, valid or test, from a stable md5 bucket of the user id (no user in two splits).",
}

TRAINING_EXAMPLES_COLUMNS = {
    "example_id": "`user_id@cutoff`.",
    "user_id": "The user whose history before the cutoff is the model input.",
    "cutoff": "History strictly before it; labels from events in [cutoff, cutoff + horizon).",
    "split": "The user's split (user_splits).",
    "n_history_events": "Events of the user before the cutoff.",
    "n_history_sessions": "Sessions of the user before the cutoff.",
    "seconds_since_last_event": "Seconds from the user's last event before the cutoff to the cutoff.",
    "label_*": "Engagement label of one task after the cutoff (training_tasks says which are seen/unseen).",
}

TRAINING_TASKS_COLUMNS = {
    "position": "Order of the task in the task set.",
    "task": "Task name.",
    "kind": "seen (a TRACE head) or unseen (probes on frozen embeddings only).",
    "label_column": "Its column in training_examples.",
    "window": "horizon (events after the cutoff) or next_session (the first session after it).",
    "label_sql": "The SQL that computes the label.",
    "description": "What the task means.",
    "task_set": "Name of the task set.",
}

FUNNEL_EXAMPLES_COLUMNS = {
    "user_id": "The user.",
    "item_id": "The item the user viewed (one sample per viewed user-item pair).",
    "category": "The item's category.",
    "anchor_time": "The first view of the item by the user: features use only events before it.",
    "censored": "True if the data end before the label window does.",
    "user_bucket": "Stable hash bucket of user_id (embedding index).",
    "item_bucket": "Stable hash bucket of item_id (embedding index).",
    "category_bucket": "Stable hash bucket of category (embedding index).",
    "hour": "Hour of anchor_time, UTC.",
    "weekday": "Weekday of anchor_time, 0 = Monday.",
    "user_prior_*": "Count of the user's earlier events of that kind (past only).",
    "user_item_prior_*": "Count of the user's earlier events of that kind on this item.",
    "item_prior_*": "Count of earlier events of that kind on the item, all users.",
    "seconds_since_prev_event": "Seconds since the user's previous event; NaN for a first event.",
    "label_*": "1 if the user reached that funnel stage (or extra behaviour) on the item, else 0.",
    "split": "The user's split (user_splits).",
}
