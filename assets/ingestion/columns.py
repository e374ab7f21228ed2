"""Column descriptions of the tables the ingestion group owns (shown in the Dagster catalog)."""

CANONICAL_COLUMNS = {
    "user_id": "User id as in the source (ids of every format are kept as strings).",
    "event_time": "When the event happened, UTC (naive timestamps in the source mean UTC).",
    "event_name": "Page or behaviour name (`pv`, `cart`, `property_page`, ...).",
    "item_id": "Item (product, property) the event is about; null if none.",
    "category": "Category of the item; null if unknown.",
}
PROVENANCE_COLUMNS = {
    "source_file": "Absolute path of the file the row was read from.",
    "source_row": "1-based line number in that file (the header is line 1).",
    "ingested_at": "When the ingestion that read the row committed (UTC); one value per run.",
}
ATTRIBUTE = "Attribute column of the source (device, channel, ...), kept as read (VARCHAR)."

RAW_EVENTS_COLUMNS = {**CANONICAL_COLUMNS, **PROVENANCE_COLUMNS, "*": ATTRIBUTE}

REJECTED_EVENTS_COLUMNS = {
    **PROVENANCE_COLUMNS,
    "raw": "The rejected row as read (the line, or its fields as JSON).",
    "reason": "Why it was rejected: blank_line, wrong_column_count, malformed_event_time, duplicate, ...",
}

SESSIONIZED_EVENTS_COLUMNS = {
    **RAW_EVENTS_COLUMNS,
    "session_id": "`user_id:session_index`.",
    "session_index": "0-based position of the session in the user's journey.",
    "event_index": "0-based position of the event in the user's journey.",
    "event_index_in_session": "0-based position of the event in its session.",
    "seconds_since_prev_event": "Seconds since the user's previous event; 0 for the first one.",
    "seconds_since_session_start": "Seconds since the first event of the session.",
    "log_seconds_since_prev_event": "ln(1 + seconds_since_prev_event).",
    "log_seconds_since_session_start": "ln(1 + seconds_since_session_start).",
    "hour_of_day": "Hour of event_time, 0-23 UTC.",
    "day_of_week": "0 = Monday ... 6 = Sunday.",
}
