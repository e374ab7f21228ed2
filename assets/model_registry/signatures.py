"""What a registered champion accepts and returns: explicit MLflow signatures and input examples.

Explicit rather than inferred: inference types a column from one example (an id that happens to
be numeric becomes `long` and MLflow warns "Inferred schema contains integer column(s)"), and it
would put whatever the example frame holds (labels, splits) into the contract a client sees.

- `trace` takes canonical raw events (contract.md): `user_id`, `event_time` (ISO-8601 or Unix
  seconds), `event_name` required; `item_id`, `category`, attributes optional; the sessionized
  columns are optional too (a `sessionized_events` frame stays accepted). Param `as_of`.
  Returns per user `user_id`, `as_of`, `embedding_0..E-1` and `p_<task>` per seen task.
- `mtlds` takes raw events plus candidate rows (`is_candidate` true), or (user_id, item_id,
  event_time) rows alone. Returns per candidate `p_<behaviour>` and the ranking `score`.

Ids and attributes are `string`, times are `Any`:
- MLflow checks an `Any` column value by value (four `isinstance` calls each): for a user with
  500 events and eight such columns that was ~10 ms of a ~15 ms in-process `predict`. A `string`
  column of object (or pandas string) dtype passes whole.
- A JSON number in a `string` column still reaches the model (the scoring server keeps it as an
  object): ids of every format are strings to the model, numbers in JSON included. In process, a
  frame must hold ids and attributes as strings, as warehouse frames do; MLflow rejects an
  integer column by name.
- Times stay `Any`: ISO-8601 text, Unix seconds or datetimes (a `sessionized_events` frame) all
  parse in the model, which names the bad value. So do the sessionized columns, which only
  warehouse frames carry.
"""

import dagster as dg
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

from model_lib.conversion_service import CANDIDATE_COLUMN, ConversionModel
from model_lib.embedding_service import UserModel
from model_lib.sessionize import DEFAULT_SESSION_GAP_SECONDS, SESSION_COLUMNS

RAW_REQUIRED = ("user_id", "event_time", "event_name")
RAW_OPTIONAL = ("item_id", "category")
# Columns a request may carry but the model does not read: accepted, so a warehouse frame passes.
PROVENANCE = ("source_file", "source_row")
PARAMS = ParamSchema(
    [
        ParamSpec("as_of", "string", ""),  # ISO-8601 or Unix seconds; "" = just after each user's last event
    ]
)


def trained_session_gap(instance: dg.DagsterInstance) -> float:
    """The session gap of the latest `sessionized_events` (its materialization metadata): a model
    trained on those sessions must cut served raw events the same way."""
    event = instance.get_latest_materialization_event(dg.AssetKey("sessionized_events"))
    materialization = event.asset_materialization if event is not None else None
    value = materialization.metadata.get("session_gap_seconds") if materialization is not None else None
    return float(value.value) if value is not None else float(DEFAULT_SESSION_GAP_SECONDS)


def _any(name: str, required: bool) -> ColSpec:
    return ColSpec(AnyType(), name, required=required)


def _text(name: str, required: bool) -> ColSpec:
    return ColSpec("string", name, required=required)


def trace_signature(model: UserModel) -> ModelSignature:
    attributes = [c for c in model.encoder.columns if c not in (*RAW_REQUIRED, *RAW_OPTIONAL)]
    text = dict.fromkeys([*RAW_OPTIONAL, *attributes])
    inputs = Schema(
        [
            _text("user_id", True),
            _any("event_time", True),
            _text("event_name", True),
            *[_text(c, False) for c in text],
            *[_any(c, False) for c in dict.fromkeys([*SESSION_COLUMNS, *PROVENANCE]) if c not in text],
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("datetime", "as_of"),
            *[ColSpec("float", f"embedding_{i}") for i in range(model.embedding_dim)],
            *[ColSpec("float", c) for c in model.probability_columns],
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=PARAMS)


def conversion_signature(model: ConversionModel) -> ModelSignature:
    inputs = Schema(
        [
            _text("user_id", True),
            _text("item_id", True),
            _any("event_time", False),
            _text("event_name", False),
            _text("category", False),
            _any(CANDIDATE_COLUMN, False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("string", "item_id"),
            ColSpec("datetime", "anchor_time"),
            *[ColSpec("float", c) for c in model.output_columns],
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=PARAMS)


def raw_event_example(events: pd.DataFrame, users, last_events: int = 5) -> pd.DataFrame:
    """A request as a client sends it: the last raw events of `users`, canonical columns only,
    times as ISO-8601 strings (the session columns a warehouse frame has are dropped)."""
    frame = events[events["user_id"].isin(list(users))]
    if "event_index" in frame.columns:
        frame = frame.sort_values(["user_id", "event_index"])
    frame = frame.groupby("user_id", sort=False).tail(last_events).reset_index(drop=True)
    drop = [c for c in (*SESSION_COLUMNS, *PROVENANCE, "ingested_at") if c in frame.columns]
    frame = frame.drop(columns=drop)
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    for column in frame.columns:
        if column != "event_time":
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
            frame[column] = frame[column].map(lambda v: v if v is None else str(v))
    return frame


def candidate_example(events: pd.DataFrame, user, candidates: int = 2) -> pd.DataFrame:
    """A ranking request: one user's last raw events, then `candidates` items they viewed marked
    `is_candidate` (scored just after the last event)."""
    history = raw_event_example(events, [user], last_events=8)[
        ["user_id", "event_time", "event_name", "item_id", "category"]
    ]
    items = history.dropna(subset=["item_id"]).drop_duplicates("item_id").tail(candidates)
    rows = items.assign(event_time=None, event_name=None)
    frame = pd.concat([history.assign(**{CANDIDATE_COLUMN: False}), rows.assign(**{CANDIDATE_COLUMN: True})])
    return frame.reset_index(drop=True)
