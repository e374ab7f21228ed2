"""`evaluation_metrics`: every model on the same held-out users, as the papers report it.

TRACE family: AUROC/AUPRC per seen task from each model's heads, probe AUROC/AUPRC per unseen
task on frozen embeddings, uplift over the myopic baseline with paired bootstrap intervals.
MTLDS family: AUC per behaviour and per-user NDCG of the funnel order. The markdown report is
written to `TRACE_DAGSTER_HOME/reports/` and shown in the asset's metadata.
"""

from datetime import UTC, datetime

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common.metadata import warehouse_table_metadata
from assets.conversion_models.assets import CONVERSION_MODELS
from assets.evaluation.columns import EVALUATION_METRICS_COLUMNS
from assets.evaluation.tables import (
    conversion_metric_rows,
    mean_uplift,
    metric_rows,
    probe_scores,
    render_report,
    seen_task_scores,
    uplift_rows,
)
from assets.trace_models.assets import SEQUENCE_MODELS
from assets.training_data.assets import read_tasks, training_examples
from resources.paths import TraceDagsterPaths
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse

GROUP = "evaluation"
OWNERS = ["team:ml-platform"]
MODEL_INS = {name: dg.AssetIn(f"{name}_model") for name in SEQUENCE_MODELS + CONVERSION_MODELS}


class EvaluationConfig(dg.Config):
    bootstrap_samples: int = Field(default=200, description="Replicates of the paired bootstrap intervals.")
    seed: int = 0


def evaluate_all(
    models: dict[str, dict], examples: pd.DataFrame, tasks: pd.DataFrame, bootstrap_samples: int, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics rows, per-task uplift rows) from the models' prediction files."""
    seen = list(tasks.loc[tasks["kind"] == "seen", "task"])
    unseen = list(tasks.loc[tasks["kind"] == "unseen", "task"])
    sequence = {m: v for m, v in models.items() if m in SEQUENCE_MODELS}
    seen_scores = seen_task_scores({m: pd.read_parquet(v["predictions"]) for m, v in sequence.items()}, examples, seen)
    unseen_scores = probe_scores(
        {m: pd.read_parquet(v["embeddings"]) for m, v in sequence.items()}, examples, unseen, seed
    )
    metrics = [metric_rows(seen_scores, "seen"), metric_rows(unseen_scores, "unseen")]
    uplifts = [
        uplift_rows(seen_scores, "seen", n_boot=bootstrap_samples, seed=seed),
        uplift_rows(unseen_scores, "unseen", n_boot=bootstrap_samples, seed=seed),
    ]
    for name, value in models.items():
        if name in CONVERSION_MODELS:
            metrics.append(
                conversion_metric_rows(
                    name, pd.read_parquet(value["predictions"]), value["tasks"], value["funnel_tasks"]
                )
            )
    return pd.concat(metrics, ignore_index=True), pd.concat(uplifts, ignore_index=True)


@dg.asset(
    group_name=GROUP,
    owners=OWNERS,
    kinds={"duckdb", "scikit-learn"},
    ins=MODEL_INS,
    deps=[training_examples],
    pool=WAREHOUSE_POOL,
    description="AUROC/AUPRC (seen tasks, unseen-task probes), uplift vs myopic, MTLDS AUC and NDCG; "
    "markdown report under reports/.",
)
def evaluation_metrics(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    warehouse: DuckDBWarehouse,
    paths: TraceDagsterPaths,
    **models: dict,
) -> dg.MaterializeResult:
    with warehouse.connect(read_only=True) as con:
        examples = con.sql("SELECT * FROM training_examples").df()
        tasks = read_tasks(con)
    metrics, uplifts = evaluate_all(models, examples, tasks, config.bootstrap_samples, config.seed)
    evaluated_at = datetime.now(UTC).replace(tzinfo=None)
    versions = {m: str(v["version"]) for m, v in models.items()}
    metrics = metrics.assign(
        model_version=metrics["model"].map(versions), evaluated_at=evaluated_at, dagster_run_id=context.run_id
    )
    uplifts = uplifts.assign(evaluated_at=evaluated_at, dagster_run_id=context.run_id)
    with warehouse.connect() as con:
        con.register("metrics_frame", metrics)
        con.register("uplifts_frame", uplifts)
        rows = warehouse.replace_table(con, "evaluation_metrics", "SELECT * FROM metrics_frame")
        warehouse.replace_table(con, "evaluation_uplifts", "SELECT * FROM uplifts_frame")
        catalog = warehouse_table_metadata(
            con,
            "evaluation_metrics",
            EVALUATION_METRICS_COLUMNS,
            preview_rows=20,
            preview_sql="SELECT * FROM evaluation_metrics WHERE task_kind = 'seen' ORDER BY metric, task, model LIMIT 20",
        )

    dataset = str(tasks["task_set"].iloc[0])
    notes = [
        f"{len(examples)} examples ({(examples['split'] == 'test').sum()} test) from `training_examples`, task set `{dataset}`",
        f"registered versions: {', '.join(f'{m} v{v}' for m, v in versions.items())}",
        f"bootstrap: {config.bootstrap_samples} paired replicates; dagster run {context.run_id}",
    ]
    report = render_report(metrics, uplifts, dataset, notes)
    stamp = evaluated_at.strftime("%Y%m%dT%H%M%S")
    report_path = paths.reports_dir / f"evaluation-{stamp}.md"
    report_path.write_text(report)
    (paths.reports_dir / "evaluation_latest.md").write_text(report)

    trace_family = metrics[metrics["metric"].isin(["auroc", "auprc"])]
    headline = mean_uplift(trace_family) if not trace_family.empty else pd.DataFrame()
    trace_uplift = (
        headline[(headline["model"] == "trace") & (headline["task_kind"] == "seen")] if not headline.empty else headline
    )
    metadata = {
        **catalog,  # column schema, preview as a table
        "dagster/row_count": rows,
        "report_path": dg.MetadataValue.path(str(report_path)),
        "report": dg.MetadataValue.md(report),
    }
    for r in trace_uplift.itertuples():
        metadata[f"trace_mean_{r.metric}_uplift_pct_seen"] = float(r.uplift_pct)
    context.log.info(f"evaluation report: {report_path}")
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=evaluation_metrics,
    blocking=True,
    description="Every model has a finite AUROC/AUC on every task it was evaluated on.",
)
def evaluation_metrics_are_complete(warehouse: DuckDBWarehouse) -> dg.AssetCheckResult:
    with warehouse.connect(read_only=True) as con:
        bad = con.sql("SELECT model, task, metric FROM evaluation_metrics WHERE value IS NULL OR isnan(value)").df()
        models = con.execute("SELECT count(DISTINCT model) FROM evaluation_metrics").fetchall()[0][0]
    return dg.AssetCheckResult(
        passed=bad.empty and models > 0,
        metadata={
            "models": models,
            "undefined_metrics": len(bad),
            "undefined": dg.MetadataValue.md(bad.head(20).to_markdown(index=False) if len(bad) else "none"),
        },
    )
