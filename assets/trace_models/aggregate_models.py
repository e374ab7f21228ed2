"""The aggregate-feature baselines `st_agg` and `st_cohort`: DuckDB features, one regression per task.

The TRACE paper's strongest baselines are single-task models on hand-built features ("ST Agg",
"ST Cohort", only a little behind TRACE). Ours, with their features computed by DuckDB over the
same histories the sequence models read (events of the sessions that ended before each
example's cutoff, `examples_sql.history_events_sql`), so they scale with the warehouse:

- `st_agg`, over *all* of a user's past sessions: event and session counts, count and share per
  page name, recency, tenure, mean session length and duration, distinct items and categories,
  events in the last day and week.
- `st_cohort`, the cohort and the last session only: tenure and first-session length (when and
  how the user arrived), and the most recent session's counts and shares per page name, length,
  duration, last page and recency. Our reading of "ST Cohort": what a single-task model knows
  without the cross-session history.

Each asset writes predictions and "embeddings" (the standardised features, for the unseen-task
probes) in the layout of the sequence models (`assets.py`), so the evaluation treats them alike.
"""

import json

import dagster as dg
import duckdb
import mlflow
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from assets.common.training import ModelTrainingConfig, epoch_logger, split_rows_sql
from assets.training_data.assets import read_tasks, training_examples
from assets.training_data.examples_sql import SPLITS, history_events_sql
from model_lib.aggregate_baselines import AGGREGATE_KINDS, predict, train_aggregate_model
from model_lib.embedding_service import labels_tensor
from model_lib.metrics import auprc, auroc
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse

AGGREGATE_MODELS = AGGREGATE_KINDS
GROUP = "trace_models"
OWNERS = ["team:ml-platform"]
MAX_EVENT_NAMES = 40  # the most frequent page names get their own count and share
DESCRIPTIONS = {
    "st_agg": "ST Agg baseline: one logistic regression per task on aggregate features over all past "
    "sessions (counts and shares per page, sessions, recency, mean session length), from DuckDB SQL.",
    "st_cohort": "ST Cohort baseline: one logistic regression per task on cohort features (tenure, first "
    "session) and the last session's counts, shares, length and last page, from DuckDB SQL.",
}


def _literal(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def frequent_event_names(con: duckdb.DuckDBPyConnection, limit: int = MAX_EVENT_NAMES) -> list[str]:
    """The page names that get their own feature columns (by frequency, then name)."""
    rows = con.execute(
        "SELECT event_name FROM sessionized_events GROUP BY event_name ORDER BY count(*) DESC, event_name LIMIT ?",
        [int(limit)],
    ).fetchall()
    return [r[0] for r in rows]


def _per_page(names: list[str], relation_total: str, prefix: str) -> tuple[list[str], list[str]]:
    """(aggregate expressions, feature expressions) of a count and a share per page name."""
    counts, features = [], []
    for i, name in enumerate(names):
        counts.append(f"count(*) FILTER (event_name = {_literal(name)}) AS c{i}")
        features += [
            f"ln(1 + coalesce(c{i}, 0)) AS {_ident(f'{prefix}log_count[{name}]')}",
            f"coalesce(c{i} / nullif({relation_total}, 0), 0) AS {_ident(f'{prefix}share[{name}]')}",
        ]
    return counts, features


def aggregate_features_sql(kind: str, event_names: list[str], examples: str = "training_examples") -> str:
    """One row per example of the relation `examples` (example_id, user_id, cutoff, history_end),
    ordered by example_id: `example_id` then the kind's features (all DOUBLE, no NULL)."""
    if kind not in AGGREGATE_KINDS:
        raise ValueError(f"unknown aggregate kind {kind!r}; known: {AGGREGATE_KINDS}")
    history = history_events_sql(examples)
    if kind == "st_agg":
        counts, per_page = _per_page(event_names, "n_events", "")
        return f"""
        WITH history AS ({history}),
        sessions AS (
            SELECT example_id, session_id, count(*) AS n, epoch(max(event_time)) - epoch(min(event_time)) AS seconds
            FROM history GROUP BY ALL
        ),
        per_session AS (
            SELECT example_id, count(*) AS n_sessions, avg(n) AS mean_session_events,
                   avg(seconds) AS mean_session_seconds
            FROM sessions GROUP BY ALL
        ),
        totals AS (
            SELECT example_id, count(*) AS n_events, {", ".join(counts) + "," if counts else ""}
                   max(event_time) AS last_time, min(event_time) AS first_time,
                   count(DISTINCT item_id) AS n_items, count(DISTINCT category) AS n_categories,
                   count(*) FILTER (event_time >= cutoff - INTERVAL 1 DAY) AS events_last_day,
                   count(*) FILTER (event_time >= cutoff - INTERVAL 7 DAY) AS events_last_week
            FROM history GROUP BY ALL
        )
        SELECT x.example_id,
               ln(1 + coalesce(n_events, 0)) AS log_events,
               ln(1 + coalesce(n_sessions, 0)) AS log_sessions,
               {", ".join(per_page) + "," if per_page else ""}
               coalesce(ln(1 + epoch(x.cutoff) - epoch(last_time)), 0) AS log_seconds_since_last_event,
               coalesce(ln(1 + epoch(x.cutoff) - epoch(first_time)), 0) AS log_seconds_since_first_event,
               coalesce(mean_session_events, 0) AS mean_session_events,
               coalesce(ln(1 + mean_session_seconds), 0) AS log_mean_session_seconds,
               ln(1 + coalesce(n_items, 0)) AS log_distinct_items,
               ln(1 + coalesce(n_categories, 0)) AS log_distinct_categories,
               ln(1 + coalesce(events_last_day, 0)) AS log_events_last_day,
               ln(1 + coalesce(events_last_week, 0)) AS log_events_last_week
        FROM {examples} x LEFT JOIN totals USING (example_id) LEFT JOIN per_session USING (example_id)
        ORDER BY x.example_id
        """
    counts, per_page = _per_page(event_names, "last_n", "last_session_")
    last_page = [
        f"coalesce(last_page = {_literal(name)}, false)::DOUBLE AS {_ident(f'last_page[{name}]')}"
        for name in event_names
    ]
    return f"""
    WITH history AS ({history}),
    cohort AS (
        SELECT example_id, min(event_time) AS first_time, max(session_index) AS last_session,
               min(session_index) AS first_session
        FROM history GROUP BY ALL
    ),
    first_session AS (
        SELECT h.example_id, count(*) AS first_n
        FROM history h JOIN cohort c ON h.example_id = c.example_id AND h.session_index = c.first_session
        GROUP BY ALL
    ),
    last_session AS (
        SELECT h.example_id, count(*) AS last_n, {", ".join(counts) + "," if counts else ""}
               epoch(max(h.event_time)) - epoch(min(h.event_time)) AS last_seconds,
               max(h.event_time) AS last_time, arg_max(h.event_name, h.event_index) AS last_page
        FROM history h JOIN cohort c ON h.example_id = c.example_id AND h.session_index = c.last_session
        GROUP BY ALL
    )
    SELECT x.example_id,
           coalesce(ln(1 + epoch(x.cutoff) - epoch(first_time)), 0) AS log_seconds_since_first_event,
           ln(1 + coalesce(first_n, 0)) AS log_first_session_events,
           ln(1 + coalesce(last_n, 0)) AS log_last_session_events,
           coalesce(ln(1 + last_seconds), 0) AS log_last_session_seconds,
           coalesce(ln(1 + epoch(x.cutoff) - epoch(last_time)), 0) AS log_seconds_since_last_event,
           {", ".join(per_page + last_page)}
    FROM {examples} x LEFT JOIN cohort USING (example_id) LEFT JOIN first_session USING (example_id)
         LEFT JOIN last_session USING (example_id)
    ORDER BY x.example_id
    """


def aggregate_features(
    con: duckdb.DuckDBPyConnection, kind: str, examples: str = "training_examples"
) -> tuple[pd.Series, list[str], np.ndarray]:
    """(example ids, feature names, float32 [N, F] matrix) of every example, by DuckDB."""
    frame = con.sql(aggregate_features_sql(kind, frequent_event_names(con), examples)).df()
    names = [c for c in frame.columns if c != "example_id"]
    return frame["example_id"], names, frame[names].to_numpy(np.float32)


class AggregateTrainingConfig(ModelTrainingConfig):
    epochs: int = Field(default=40, description="Upper bound; early stopping on validation loss.")
    batch_size: int = 256
    learning_rate: float = 1e-2
    weight_decay: float = 1e-3
    patience: int = 4
    hidden: int = Field(default=0, description="0: logistic regression per task; >0: a hidden layer per task.")


def train_aggregate_baseline(
    kind: str,
    examples: pd.DataFrame,
    feature_names: list[str],
    features: np.ndarray,
    label_columns,
    config: AggregateTrainingConfig,
    on_epoch=None,
):
    """Fit on the train split (early stopping on valid): (model, fit result, probabilities, embeddings)."""
    split = examples["split"].to_numpy()
    labels = labels_tensor(examples, label_columns).numpy()
    train, valid = split == "train", split == "valid"
    model, result = train_aggregate_model(
        kind,
        feature_names,
        label_columns,
        features[train],
        labels[train],
        features[valid],
        labels[valid],
        config.train_config(),
        hidden=config.hidden,
        on_epoch=on_epoch,
    )
    probabilities, embeddings = predict(model, features)
    return model, result, probabilities, embeddings


def build_aggregate_model_asset(kind: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{kind}_model",
        group_name=GROUP,
        owners=OWNERS,
        kinds={"duckdb", "pytorch", "mlflow"},
        deps=[training_examples, "sessionized_events"],
        description=DESCRIPTIONS[kind] + " Trained on the seen tasks; logged to MLflow.",
        tags={"model_family": "trace"},
    )
    def _train(
        context: dg.AssetExecutionContext,
        config: AggregateTrainingConfig,
        warehouse: DuckDBWarehouse,
        paths: TraceDagsterPaths,
        mlflow_tracking: MLflowTracking,
    ) -> dg.Output[dict]:
        torch.set_num_threads(config.torch_threads)
        with warehouse.connect(read_only=True) as con:
            # every split, each at most about max_rows_per_split examples (whole users); training
            # no more than the sample budget can use
            queries = [split_rows_sql(con, "training_examples", s, config.max_split_rows(s)) for s in SPLITS]
            examples_sql = "(" + " UNION ALL ".join(f"({query})" for query, _, _ in queries) + ")"
            examples = con.sql(f"SELECT * FROM {examples_sql} ORDER BY example_id").df()
            tasks = read_tasks(con)
            ids, names, features = aggregate_features(con, kind, examples_sql)
        if not np.array_equal(ids.to_numpy(), examples["example_id"].to_numpy()):
            raise dg.Failure(f"{kind}: the feature rows do not match training_examples")
        seen = tasks[tasks["kind"] == "seen"]
        label_columns = list(seen["label_column"])
        out_dir = paths.home_dir / "models" / kind / context.run.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        tags = {"dagster.run_id": context.run.run_id, "model": kind, "model_family": "trace"}
        with mlflow_tracking.start_run(run_name=f"{kind}-{context.run.run_id[:8]}", tags=tags) as run:
            mlflow.log_params({**config.model_dump(), "model": kind, "n_features": len(names)})
            model, fit_result, probabilities, embeddings = train_aggregate_baseline(
                kind,
                examples,
                names,
                features,
                label_columns,
                config,
                on_epoch=epoch_logger(context, kind, unit="rows/s"),
            )
            artifact = out_dir / "model.pt"
            torch.save(model.artifact({"dagster_run_id": context.run.run_id}), artifact)
            predictions = examples[["example_id", "split"]].copy()
            for i, task in enumerate(seen["task"]):
                predictions[f"p_{task}"] = probabilities[:, i]
            predictions.to_parquet(out_dir / "predictions.parquet", index=False)
            pd.DataFrame(
                {"example_id": examples["example_id"], "split": examples["split"], "embedding": list(embeddings)}
            ).to_parquet(out_dir / "embeddings.parquet", index=False)
            test = examples["split"].to_numpy() == "test"
            test_metrics = {}
            for i, (task, column) in enumerate(zip(seen["task"], label_columns)):
                y = labels_tensor(examples.loc[test], [column]).numpy()[:, 0]
                test_metrics[f"test_auroc_{task}"] = auroc(y, probabilities[test, i])
                test_metrics[f"test_auprc_{task}"] = auprc(y, probabilities[test, i])
            test_metrics["test_mean_auroc"] = float(np.nanmean([v for k, v in test_metrics.items() if "auroc" in k]))
            mlflow.log_metrics({**test_metrics, "best_epoch": fit_result.best_epoch})
            mlflow.log_dict({"features": names}, "features.json")
            mlflow.log_artifact(str(artifact))
        weights = model.linear.weight.detach().numpy() if config.hidden == 0 else None
        metadata = {
            "mlflow_run_id": run.info.run_id,
            "test_mean_auroc": test_metrics["test_mean_auroc"],
            "best_epoch": fit_result.best_epoch,
            "n_features": len(names),
            "features": dg.MetadataValue.json(names),
            "dagster/column_schema": dg.TableSchema(
                columns=[dg.TableColumn(n, "DOUBLE") for n in ["example_id", *names]]
            ),
        }
        if weights is not None:  # the features each task leans on most (standardised coefficients)
            top = {task: [names[j] for j in np.argsort(-np.abs(weights[i]))[:5]] for i, task in enumerate(seen["task"])}
            metadata["top_features_per_task"] = dg.MetadataValue.md(
                pd.DataFrame({t: v for t, v in top.items()}).to_markdown(index=False)
            )
        value = {
            "model": kind,
            "artifact": str(artifact),
            "predictions": str(out_dir / "predictions.parquet"),
            "embeddings": str(out_dir / "embeddings.parquet"),
            "mlflow_run_id": run.info.run_id,
            "version": f"run-{run.info.run_id[:8]}",
            "seen_tasks": list(seen["task"]),
            "test_mean_auroc": test_metrics["test_mean_auroc"],
            "features": json.dumps(names),
        }
        return dg.Output(value, metadata=metadata)

    return _train


aggregate_model_assets = [build_aggregate_model_asset(kind) for kind in AGGREGATE_MODELS]
