"""Gated promotion: a challenger takes the MLflow alias `champion` only when it wins.

After retraining, the newly registered versions of `trace` and `mtlds` (the challengers) are
compared with the current champions *on the same held-out examples*: the champion is loaded
back from the registry and scored on today's test split, so both numbers measure the same
thing. The challenger is promoted only if it is better by `margin` and every asset check
upstream of this asset passed; the old champion becomes `previous` (rollback restores it).
Every decision is written as tags on the model version and as this asset's metadata.
"""

import tempfile
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.evaluation.assets import evaluation_metrics
from assets.model_registry.policy import promote_if_better
from assets.trace_models.sequence_data import bucket_count, read_bucket, stage_buckets
from assets.training_data.assets import funnel_spec_for, read_tasks
from model_lib.metrics import auroc
from resources.event_sources import EventSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse

GROUP = "model_registry"
OWNERS = ["team:ml-platform"]


class PromotionConfig(dg.Config):
    margin: float = Field(default=0.0, description="The challenger must beat the champion by more than this.")
    events_per_bucket: int = Field(
        default=2_000_000, description="Test users are scored in user-hash buckets of about this many events."
    )


PROMOTION_KEY = dg.AssetKey("model_promotion")
SCORING_BATCH_ROWS = 65_536  # funnel samples per scoring batch
#: What the gate reads: the challengers and the evaluation run on the same test users.
PROMOTION_UPSTREAM = (dg.AssetKey("trace_model"), dg.AssetKey("mtlds_linear_model"), evaluation_metrics.key)


def upstream_check_keys(
    assets: Sequence[dg.AssetsDefinition], asset_checks: Sequence[dg.AssetChecksDefinition]
) -> list[dg.AssetCheckKey]:
    """Check keys of every asset upstream of the gate (its inputs and their ancestors) among
    `assets` + `asset_checks`: what `build_model_promotion` should be given.

    The code location computes them from its own lists, so this module needs no import of the
    definitions (which import it) and a check added anywhere upstream gates promotion at once.
    """
    parents: dict[dg.AssetKey, set[dg.AssetKey]] = {}
    for definition in assets:
        for key, deps in definition.asset_deps.items():
            parents.setdefault(key, set()).update(deps)
    seen, queue = set(PROMOTION_UPSTREAM), deque(PROMOTION_UPSTREAM)
    while queue:
        for parent in parents.get(queue.popleft(), ()):
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    check_keys = {spec.key for definition in [*assets, *asset_checks] for spec in definition.check_specs}
    return sorted((k for k in check_keys if k.asset_key in seen), key=lambda k: k.to_user_string())


def check_status(context: dg.AssetExecutionContext, keys: list[dg.AssetCheckKey]) -> dict[str, str]:
    """Latest status of each check ("SUCCEEDED", "FAILED", "PLANNED", or "NEVER_RAN")."""
    records = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(keys)
    return {k.to_user_string(): records[k].status.value if k in records else "NEVER_RAN" for k in keys}


def trace_test_auroc(
    warehouse: DuckDBWarehouse, models: dict[str, object], events_per_bucket: int
) -> tuple[dict[str, float | None], int]:
    """Mean test AUROC over the seen tasks of each model (None: trained on other tasks), and the
    number of test examples.

    The test users are read and scored one user-hash bucket at a time, so memory holds one
    bucket's events plus a label and a score per test example, never the events table; their
    events are staged by bucket in one pass first (`stage_buckets`), not filtered per bucket.
    """
    with warehouse.connect(read_only=True) as con:
        tasks = read_tasks(con)
        label_columns = list(tasks.loc[tasks["kind"] == "seen", "label_column"])
        comparable = {name: m for name, m in models.items() if list(m.task_names) == label_columns}
        labels: list[np.ndarray] = []
        scores: dict[str, list[np.ndarray]] = {name: [] for name in comparable}
        buckets = bucket_count(con, events_per_bucket)
        with tempfile.TemporaryDirectory(prefix="test-buckets-", dir=warehouse.paths.tmp_dir) as staging:
            staged = stage_buckets(con, buckets, Path(staging), splits=("test",))
            for bucket in range(buckets):
                events, test = read_bucket(con, bucket, buckets, splits=("test",), staged=staged)
                if test.empty:
                    continue
                labels.append(
                    np.column_stack([test[c].astype("Float64").to_numpy(float, na_value=np.nan) for c in label_columns])
                )
                for name, model in comparable.items():
                    scores[name].append(model.predict_proba(events, test)[label_columns].to_numpy(float))
    n_test = sum(len(x) for x in labels)
    result: dict[str, float | None] = dict.fromkeys(models)
    if n_test:
        y = np.concatenate(labels)  # NaN: an excluded label (next-session tasks)
        for name, parts in scores.items():
            p = np.concatenate(parts)
            result[name] = float(np.nanmean([auroc(y[:, j], p[:, j]) for j in range(len(label_columns))]))
    return result, n_test


def build_model_promotion(gated_checks: Sequence[dg.AssetCheckKey]) -> dg.AssetsDefinition:
    """The gate asset, promoting only if every check of `gated_checks` last SUCCEEDED
    (the code location passes `upstream_check_keys(...)` of its own assets and checks)."""
    gated_checks = list(gated_checks)

    @dg.asset(
        name=PROMOTION_KEY.path[-1],
        group_name=GROUP,
        owners=OWNERS,
        kinds={"mlflow"},
        ins={"trace_model": dg.AssetIn("trace_model"), "mtlds_model": dg.AssetIn("mtlds_linear_model")},
        deps=[evaluation_metrics],
        description="Challenger vs `champion` on the same test users; promotes only a winner whose checks all passed.",
        metadata={"gated_checks": dg.MetadataValue.json([k.to_user_string() for k in gated_checks])},
    )
    def model_promotion(
        context: dg.AssetExecutionContext,
        config: PromotionConfig,
        warehouse: DuckDBWarehouse,
        event_source: EventSource,
        mlflow_tracking: MLflowTracking,
        trace_model: dict,
        mtlds_model: dict,
    ) -> dg.MaterializeResult:
        statuses = check_status(context, gated_checks)
        failing = {k: s for k, s in statuses.items() if s != "SUCCEEDED"}
        checks_passed = not failing
        if failing:
            context.log.warning(f"checks not passed, nothing will be promoted: {failing}")

        decisions = []
        # TRACE: mean test AUROC over the seen tasks, challenger and champion on the same users.
        models = {"challenger": mlflow_tracking.load_model(trace_model["model_uri"])}
        champion_version = mlflow_tracking.champion_version("trace")
        if champion_version and champion_version != str(trace_model["version"]):
            models["champion"] = mlflow_tracking.load_model(f"models:/trace/{champion_version}")
        trace_auroc, n_test = trace_test_auroc(warehouse, models, config.events_per_bucket)
        decisions.append(
            promote_if_better(
                mlflow_tracking,
                "trace",
                trace_model["version"],
                trace_auroc["challenger"],
                trace_auroc.get("champion"),
                config.margin,
                checks_passed,
                {
                    "metric": "mean test AUROC over seen tasks",
                    "test_examples": n_test,
                    "dagster_run_id": context.run.run_id,
                    "failing_checks": failing,
                },
            )
        )

        # MTLDS: AUC of the funnel's last stage (purchase) on the test samples.
        spec = funnel_spec_for(event_source)
        last = spec.funnel[-1]
        conversion_models = {"challenger": mlflow_tracking.load_model(mtlds_model["model_uri"])}
        champion_version = mlflow_tracking.champion_version("mtlds")
        if champion_version and champion_version != str(mtlds_model["version"]):
            conversion_models["champion"] = mlflow_tracking.load_model(f"models:/mtlds/{champion_version}")
        comparable = {n: m for n, m in conversion_models.items() if tuple(m.cfg.tasks) == tuple(spec.tasks)}
        # model: model_lib.conversion_service.ConversionModel; samples scored in Arrow batches
        labels, scores = [], {name: [] for name in comparable}
        with warehouse.connect(read_only=True) as con:
            reader = con.sql("SELECT * FROM funnel_examples WHERE split = 'test'").to_arrow_reader(SCORING_BATCH_ROWS)
            for batch in reader:
                samples = batch.to_pandas()
                labels.append(samples[f"label_{last}"].to_numpy(float))
                for name, model in comparable.items():
                    scores[name].append(model.predict_frame(samples)[f"p_{last}"].to_numpy())
        n_samples = sum(len(x) for x in labels)
        purchase_auc: dict[str, float | None] = dict.fromkeys(conversion_models)
        if n_samples:
            for name, parts in scores.items():
                purchase_auc[name] = float(auroc(np.concatenate(labels), np.concatenate(parts)))
        decisions.append(
            promote_if_better(
                mlflow_tracking,
                "mtlds",
                mtlds_model["version"],
                purchase_auc["challenger"],
                purchase_auc.get("champion"),
                config.margin,
                checks_passed,
                {
                    "metric": f"test AUC of {last}",
                    "test_samples": n_samples,
                    "dagster_run_id": context.run.run_id,
                    "failing_checks": failing,
                },
            )
        )

        table = pd.DataFrame([{"model": name, **d.as_metadata()} for name, d in zip(("trace", "mtlds"), decisions)])
        for name, d in zip(("trace", "mtlds"), decisions):
            context.log.info(
                f"{name}: {'PROMOTED' if d.promoted else 'kept champion'} v{d.champion_version} ({d.reason})"
            )
        return dg.MaterializeResult(
            metadata={
                "decisions": dg.MetadataValue.md(table.to_markdown(index=False)),
                "checks_passed": checks_passed,
                "checks": dg.MetadataValue.json(statuses),
                "trace_champion": str(decisions[0].champion_version),
                "mtlds_champion": str(decisions[1].champion_version),
            }
        )

    return model_promotion
