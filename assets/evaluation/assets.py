"""`evaluation_metrics`: every model on the same held-out users, as the papers report it.

TRACE family (the sequence models and the aggregate baselines `st_agg`, `st_cohort`): AUROC/AUPRC
per seen task from each model's heads, probe AUROC/AUPRC per unseen task on frozen embeddings
(probes fitted on validation users), uplift over `myopic` and over `st_agg` with paired
user-level bootstrap intervals. Models are read one at a time, and only their validation and
test rows: memory grows with the test set, not with the number of models or the training set.
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
    UPLIFT_BASELINES,
    bootstrap_metrics,
    conversion_metric_rows,
    mean_uplift,
    metric_rows,
    probe_scores,
    render_report,
    seen_task_scores,
    uplift_rows,
    user_ids_of_test_split,
)
from assets.trace_models.aggregate_models import AGGREGATE_MODELS
from assets.trace_models.assets import SEQUENCE_MODELS
from assets.training_data.assets import read_tasks, training_examples
from resources.paths import TraceDagsterPaths
from resources.warehouse import WAREHOUSE_POOL, DuckDBWarehouse

GROUP = "evaluation"
OWNERS = ["team:ml-platform"]
MODEL_INS = {name: dg.AssetIn(f"{name}_model") for name in SEQUENCE_MODELS + AGGREGATE_MODELS + CONVERSION_MODELS}


class EvaluationConfig(dg.Config):
    bootstrap_samples: int = Field(default=200, description="Replicates of the paired bootstrap intervals.")
    seed: int = 0


def evaluate_all(
    models: dict[str, dict],
    examples: pd.DataFrame,
    tasks: pd.DataFrame,
    bootstrap_samples: int,
    seed: int,
    baselines=UPLIFT_BASELINES,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics rows, uplift rows) from the models' prediction files, one model at a time.

    `models` maps a model name to its training asset's output: TRACE-family outputs carry
    `predictions` and `embeddings` parquet paths, conversion models (CONVERSION_MODELS) their
    own predictions. Also what the `reproduction` job calls per seed.
    """
    seen = list(tasks.loc[tasks["kind"] == "seen", "task"])
    unseen = list(tasks.loc[tasks["kind"] == "unseen", "task"])
    examples = examples[examples["split"].isin(["valid", "test"])]  # probes fit on valid, score test
    seen_scores, unseen_scores, metrics = {}, {}, []
    for name, value in models.items():
        if name in CONVERSION_MODELS:
            metrics.append(
                conversion_metric_rows(
                    name, pd.read_parquet(value["predictions"]), value["tasks"], value["funnel_tasks"]
                )
            )
            continue
        needed = [("split", "in", ["valid", "test"])]
        predictions = pd.read_parquet(
            value["predictions"], columns=["example_id", *[f"p_{t}" for t in seen]], filters=needed
        )
        seen_scores.update(seen_task_scores({name: predictions}, examples, seen))
        embeddings = pd.read_parquet(value["embeddings"], columns=["example_id", "embedding"], filters=needed)
        unseen_scores.update(probe_scores({name: embeddings}, examples, unseen, seed))
        del predictions, embeddings
    groups = user_ids_of_test_split(examples)
    metrics = [metric_rows(seen_scores, "seen"), metric_rows(unseen_scores, "unseen"), *metrics]
    uplifts = []
    for kind, scores in (("seen", seen_scores), ("unseen", unseen_scores)):
        boot = bootstrap_metrics(scores, bootstrap_samples, seed, groups)  # one scoring pass for every pair
        uplifts += [uplift_rows(scores, kind, baseline=b, groups=groups, boot=boot) for b in baselines]
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
        tasks = read_tasks(con)
        labels = ", ".join(f'"{c}"' for c in tasks["label_column"])
        examples = con.sql(
            f"SELECT example_id, user_id, split, {labels} FROM training_examples "
            "WHERE split IN ('valid', 'test') ORDER BY example_id"
        ).df()
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
        f"{(examples['split'] == 'test').sum()} test examples of {examples.loc[examples['split'] == 'test', 'user_id'].nunique()} "
        f"test users from `training_examples` (probes fitted on {(examples['split'] == 'valid').sum()} validation "
        f"examples), task set `{dataset}`",
        f"registered versions: {', '.join(f'{m} v{v}' for m, v in versions.items())}",
        f"bootstrap: {config.bootstrap_samples} paired replicates resampling test users; dagster run {context.run_id}",
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
    vs_agg = uplifts[(uplifts["model"] == "trace") & (uplifts["baseline"] == "st_agg") & (uplifts["task"] == "mean")]
    for r in vs_agg[vs_agg["metric"] == "auroc"].itertuples():
        metadata[f"trace_vs_st_agg_mean_auroc_uplift_pct_{r.task_kind}"] = dg.MetadataValue.text(
            f"{r.uplift_pct:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
        )
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
