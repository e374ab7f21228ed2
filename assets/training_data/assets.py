"""Training data: who is held out (`user_splits`), TRACE's labelled examples (`training_examples`)
and MTLDS's funnel samples (`funnel_examples`).

One user split serves both model families, so the test users of TRACE and of MTLDS are the same
people and no user's history crosses from training into evaluation.
"""

import math
import shutil

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common.metadata import warehouse_table_metadata
from assets.training_data.columns import FUNNEL_EXAMPLES_COLUMNS, TRAINING_EXAMPLES_COLUMNS, USER_SPLITS_COLUMNS
from assets.training_data.examples_sql import (
    SPLITS,
    bucketed_training_examples_sql,
    cutoff_times,
    label_balance,
    training_examples_sql,
    user_splits_sql,
)
from assets.training_data.funnel_sql import create_funnel_samples
from assets.training_data.tasks import TaskSet, default_task_set, load_task_set
from model_lib.funnel_samples import FUNNELS, FunnelSpec
from resources.event_sources import EventSource
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse

GROUP = "training_data"
OWNERS = ["team:ml-platform"]


class SplitConfig(dg.Config):
    seed: int = Field(default=0, description="Salt of the md5 user hash that assigns splits.")
    valid_share: float = 0.15
    test_share: float = 0.15


class ExamplesConfig(dg.Config):
    tasks_file: str = Field(
        default="",
        description="JSON task set (see assets/tasks.py); empty: the default tasks of the event format.",
    )
    events_per_bucket: int = Field(
        default=2_000_000,
        description="Events of the users built at once (one user-hash bucket): bounds DuckDB's working set "
        "by config, not by the data size.",
    )


def task_set_for(event_source: EventSource, tasks_file: str = "") -> TaskSet:
    """The task set in force: a file if given, else the default of the input format."""
    if tasks_file:
        return load_task_set(tasks_file)
    return default_task_set(event_format_of(event_source))


def event_format_of(event_source: EventSource) -> str:
    """`simulator` or the TRACE_DAGSTER_EVENTS_FORMAT preset: keys of the per-format defaults
    (tasks, attribute allow-lists)."""
    return "simulator" if event_source.uses_simulator else event_source.preset.name


def task_frame(task_set: TaskSet, event_format: str = "canonical") -> pd.DataFrame:
    """The `training_tasks` table: which label columns are seen (train) and unseen (probes only),
    and the event format the examples come from (it selects the attribute allow-list)."""
    return pd.DataFrame(
        [
            {
                "position": i,
                "task": t.name,
                "kind": t.kind,
                "label_column": t.column,
                "window": t.window,
                "label_sql": t.label_sql,
                "description": t.description,
                "task_set": task_set.name,
                "event_format": event_format,
            }
            for i, t in enumerate(task_set.tasks)
        ]
    )


def read_tasks(con) -> pd.DataFrame:
    """The task set the current `training_examples` were built with."""
    return con.sql("SELECT * FROM training_tasks ORDER BY position").df()


def funnel_spec_for(event_source: EventSource) -> FunnelSpec:
    name = (
        "travel" if event_source.uses_simulator or event_source.preset.name == "canonical" else event_source.preset.name
    )
    return FUNNELS[name]


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"duckdb"},
    deps=["sessionized_events"],
    pool=WAREHOUSE_POOL,
    description="Every user in exactly one of train/valid/test (stable md5 hash of the user id).",
)
def user_splits(
    context: dg.AssetExecutionContext, config: SplitConfig, warehouse: DuckDBWarehouse
) -> dg.MaterializeResult:
    with warehouse.connect() as con:
        rows = warehouse.replace_table(
            con, "user_splits", user_splits_sql(config.seed, config.valid_share, config.test_share)
        )
        counts = con.execute("SELECT split, count(*) FROM user_splits GROUP BY split ORDER BY split").fetchall()
        catalog = warehouse_table_metadata(con, "user_splits", USER_SPLITS_COLUMNS)
    return dg.MaterializeResult(
        metadata={
            **catalog,
            "dagster/row_count": rows,
            "users_per_split": dg.MetadataValue.md(
                pd.DataFrame(counts, columns=["split", "users"]).to_markdown(index=False)
            ),
        }
    )


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"duckdb"},
    deps=["sessionized_events", user_splits],
    pool=WAREHOUSE_POOL,
    description="One row per (user, cutoff) at rolling cutoffs: history before, a label per task after. "
    "Also writes `training_tasks` (which labels are seen and unseen).",
)
def training_examples(
    context: dg.AssetExecutionContext, config: ExamplesConfig, warehouse: DuckDBWarehouse, event_source: EventSource
) -> dg.MaterializeResult:
    task_set = task_set_for(event_source, config.tasks_file)
    with warehouse.connect() as con:
        cutoffs = cutoff_times(con, task_set)
        (n_events,) = con.execute("SELECT count(*) FROM sessionized_events").fetchall()[0]
        buckets = max(1, math.ceil(n_events / max(1, config.events_per_bucket)))
        if buckets == 1:
            query = training_examples_sql(task_set, cutoffs)
        else:
            staging = warehouse.paths.tmp_dir / f"training_examples-{context.run.run_id}"
            shutil.rmtree(staging, ignore_errors=True)
            query = bucketed_training_examples_sql(con, task_set, cutoffs, buckets, staging)
        try:
            rows = warehouse.replace_table(con, "training_examples", query)
        finally:
            if buckets > 1:
                shutil.rmtree(staging, ignore_errors=True)
        context.log.info(f"training_examples: {rows} rows from {n_events} events in {buckets} user-hash bucket(s)")
        con.register("task_frame", task_frame(task_set, event_format_of(event_source)))
        warehouse.replace_table(con, "training_tasks", "SELECT * FROM task_frame")
        balance = label_balance(con, "training_examples", task_set)
        catalog = warehouse_table_metadata(con, "training_examples", TRAINING_EXAMPLES_COLUMNS, preview_rows=5)
    if rows == 0:
        raise dg.Failure(
            f"no training examples: no user is active within {task_set.observation} before any cutoff "
            f"({[str(c) for c in cutoffs]})"
        )
    context.log.info(f"{rows} examples for task set {task_set.name} at cutoffs {[str(c) for c in cutoffs]}")
    return dg.MaterializeResult(
        metadata={
            **catalog,  # column schema, preview as a table
            "dagster/row_count": rows,
            "task_set": task_set.name,
            "cutoffs": [str(c) for c in cutoffs],
            "examples_per_split": dg.MetadataValue.json(
                balance.drop_duplicates("split").set_index("split")["examples"].reindex(SPLITS, fill_value=0).to_dict()
            ),
            "label_balance": dg.MetadataValue.md(
                balance.pivot_table(index=["task", "kind"], columns="split", values="positive_rate")
                .round(4)
                .reset_index()
                .to_markdown(index=False)
            ),
            "tasks": dg.MetadataValue.json(task_set.to_json()),
        }
    )


@dg.asset_check(asset=training_examples, blocking=True, description="No user appears in two splits.")
def training_examples_users_in_one_split(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    with warehouse.connect(read_only=True) as con:
        crossing = con.execute(
            "SELECT count(*) FROM (SELECT user_id FROM training_examples GROUP BY user_id "
            "HAVING count(DISTINCT split) > 1)"
        ).fetchall()[0][0]
    reason = f"{crossing} users appear in more than one split" if crossing else "every user in one split"
    return dg.AssetCheckResult(passed=crossing == 0, metadata={"reason": reason, "users_in_several_splits": crossing})


@dg.asset_check(
    asset=training_examples,
    blocking=True,
    description="Every task has positives and negatives among the training examples.",
)
def training_examples_labels_are_learnable(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    with warehouse.connect(read_only=True) as con:
        labels = [c for c in con.sql("SELECT * FROM training_examples LIMIT 0").columns if c.startswith("label_")]
        # next-session labels are NULL for users with no next session (excluded): rates over the labelled
        means = ", ".join(f'avg("{c}"::DOUBLE)' for c in labels)
        n_train, *values = con.execute(
            f"SELECT count(*){', ' if labels else ''}{means} FROM training_examples WHERE split = 'train'"
        ).fetchall()[0]
    rates = {c.removeprefix("label_"): float("nan") if v is None else float(v) for c, v in zip(labels, values)}
    degenerate = sorted(t for t, r in rates.items() if not 0 < r < 1)
    if n_train == 0:
        reason = "no training examples in the train split"
    elif degenerate:
        reason = "single-class tasks in train: " + ", ".join(f"{t} (positive rate {rates[t]:.3g})" for t in degenerate)
    else:
        reason = f"every task has both classes among {n_train} training examples"
    return dg.AssetCheckResult(
        passed=not degenerate and n_train > 0,
        metadata={
            "reason": reason,
            "positive_rate": dg.MetadataValue.json(rates),
            "single_class_tasks": ", ".join(degenerate) or "none",
        },
    )


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"duckdb"},
    deps=["sessionized_events", user_splits],
    pool=WAREHOUSE_POOL,
    description="MTLDS samples: one row per viewed (user, item), a label per later funnel behaviour. "
    "Built in DuckDB SQL (window functions, out of core); model_lib/funnel_samples.py is the pandas reference.",
)
def funnel_examples(
    context: dg.AssetExecutionContext, warehouse: DuckDBWarehouse, event_source: EventSource
) -> dg.MaterializeResult:
    spec = funnel_spec_for(event_source)
    with warehouse.connect() as con:
        samples = create_funnel_samples(con, spec)
        unsplit = con.execute(
            f"SELECT count(*) FROM {samples} s ANTI JOIN user_splits u ON u.user_id = s.user_id"
        ).fetchall()[0][0]
        if unsplit:
            raise dg.Failure(
                f"{unsplit} funnel samples of users without a split: user_splits is stale, rematerialize it"
            )
        rows = warehouse.replace_table(
            con,
            "funnel_examples",
            f"SELECT s.*, u.split FROM {samples} s JOIN user_splits u ON u.user_id = s.user_id "
            "ORDER BY s.user_id, s.anchor_time, s.item_id",
        )
        means = ", ".join(f"round(avg({c}), 4) AS {c}" for c in spec.label_columns)
        by_split = con.sql(f"SELECT split, {means} FROM funnel_examples GROUP BY split ORDER BY split")
        # At most three rows (one per split): fetched as tuples, not through a pandas load.
        rates = pd.DataFrame(by_split.fetchall(), columns=by_split.columns).astype(
            {c: "float64" for c in spec.label_columns}
        )
        catalog = warehouse_table_metadata(con, "funnel_examples", FUNNEL_EXAMPLES_COLUMNS)
    context.log.info(f"{rows} funnel samples for funnel {' < '.join(spec.funnel)}")
    return dg.MaterializeResult(
        metadata={
            **catalog,
            "dagster/row_count": rows,
            "funnel": " < ".join(spec.funnel),
            "extra_labels": ", ".join(spec.extra_labels) or "none",
            "label_rate_per_split": dg.MetadataValue.md(rates.to_markdown(index=False)),
        }
    )


@dg.asset_check(
    asset=funnel_examples,
    blocking=True,
    description="Purchase (the funnel's last stage) has positives in train and test.",
)
def funnel_examples_have_conversions(warehouse: DuckDBWarehouse, event_source: EventSource) -> dg.AssetCheckResult:
    last = f"label_{funnel_spec_for(event_source).funnel[-1]}"
    with warehouse.connect(read_only=True) as con:
        counts = dict(
            con.execute(f'SELECT split, sum(CAST("{last}" AS INTEGER)) FROM funnel_examples GROUP BY split').fetchall()
        )
    missing = [s for s in ("train", "test") if not counts.get(s)]
    reason = (
        f"no positive {last} in the {' and '.join(missing)} split(s): the funnel never completes there"
        if missing
        else f"{last} has positives in train ({int(counts['train'])}) and test ({int(counts['test'])})"
    )
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "reason": reason,
            f"{last}_positives": dg.MetadataValue.json({k: int(v or 0) for k, v in counts.items()}),
        },
    )
