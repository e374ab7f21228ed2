"""Column descriptions of the tables the serving group owns (shown in the Dagster catalog)."""

USER_EMBEDDINGS_COLUMNS = {
    "user_id": "The user.",
    "model_name": "Registered model that computed the embedding (trace).",
    "model_version": "Its MLflow version (the champion when the row was written).",
    "embedding": "The user representation: TRACE's shared dense layer on the user's whole history.",
    "as_of": "History up to this instant (just after the last event) was encoded.",
}
