"""Gated promotion: a challenger takes the MLflow alias `champion` only when it wins.

After retraining, the newly registered versions of `trace` and `mtlds` (the challengers) are
compared with the current champions *on the same held-out examples*: the champion is loaded
back from the registry and scored on today's test split, so both numbers measure the same
thing. The challenger is promoted only if it is better by `margin` and every asset check
upstream of this asset passed; the old champion becomes `previous` (rollback restores it).
Every decision is written as tags on the model version and as this asset's metadata.
"""

from collections import deque
from collections.abc import Sequence

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.evaluation.assets import evaluation_metrics
from assets.model_registry.policy import promote_if_better
from assets.trace_models.assets import load_sequence_inputs
from assets.training_data.assets import funnel_spec_for
from model_lib.metrics import auroc
from resources.event_sources import EventSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse

GROUP = "model_registry"
OWNERS = ["team:ml-platform"]


class PromotionConfig(dg.Config):
    margin: float = Field(default=0.0, description="The challenger must beat the champion by more than this.")


PROMOTION_KEY = dg.AssetKey("model_promotion")
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


def trace_scores(model, events: pd.DataFrame, test: pd.DataFrame, label_columns: list[str]) -> float | None:
    """Mean AUROC over the seen tasks; None when the model was trained on other tasks."""
    if list(model.task_names) != label_columns:
        return None
    proba = model.predict_proba(events, test)
    labels = {
        c: test[c].astype("Float64").to_numpy(dtype=float, na_value=np.nan) for c in label_columns
    }  # NaN: excluded
    return float(np.nanmean([auroc(labels[c], proba[c].to_numpy()) for c in label_columns]))


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
        # TRACE: mean test AUROC over the seen tasks.
        examples, events, tasks = load_sequence_inputs(warehouse)
        test = examples[examples["split"] == "test"]
        label_columns = list(tasks.loc[tasks["kind"] == "seen", "label_column"])
        challenger = mlflow_tracking.load_model(trace_model["model_uri"])
        champion_version = mlflow_tracking.champion_version("trace")
        champion_score = None
        if champion_version and champion_version != str(trace_model["version"]):
            champion_score = trace_scores(
                mlflow_tracking.load_model(f"models:/trace/{champion_version}"), events, test, label_columns
            )
        decisions.append(
            promote_if_better(
                mlflow_tracking,
                "trace",
                trace_model["version"],
                trace_scores(challenger, events, test, label_columns),
                champion_score,
                config.margin,
                checks_passed,
                {
                    "metric": "mean test AUROC over seen tasks",
                    "test_examples": len(test),
                    "dagster_run_id": context.run_id,
                    "failing_checks": failing,
                },
            )
        )

        # MTLDS: AUC of the funnel's last stage (purchase) on the test samples.
        spec = funnel_spec_for(event_source)
        with warehouse.connect(read_only=True) as con:
            samples = con.sql("SELECT * FROM funnel_examples WHERE split = 'test'").df()
        last = spec.funnel[-1]

        def purchase_auc(model) -> float | None:  # model: model_lib.conversion_service.ConversionModel
            if tuple(model.cfg.tasks) != tuple(spec.tasks):
                return None
            return float(
                auroc(samples[f"label_{last}"].to_numpy(float), model.predict_frame(samples)[f"p_{last}"].to_numpy())
            )

        champion_version = mlflow_tracking.champion_version("mtlds")
        champion_score = None
        if champion_version and champion_version != str(mtlds_model["version"]):
            champion_score = purchase_auc(mlflow_tracking.load_model(f"models:/mtlds/{champion_version}"))
        decisions.append(
            promote_if_better(
                mlflow_tracking,
                "mtlds",
                mtlds_model["version"],
                purchase_auc(mlflow_tracking.load_model(mtlds_model["model_uri"])),
                champion_score,
                config.margin,
                checks_passed,
                {
                    "metric": f"test AUC of {last}",
                    "test_samples": len(samples),
                    "dagster_run_id": context.run_id,
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
