"""MTLDS (four aggregation operators) and its baselines on the funnel samples, logged and registered.

One asset per model, from one factory: `mtlds_linear_model`, `mtlds_mul_model`,
`mtlds_max_model`, `mtlds_sum_model`, `single_task_model`, `shared_bottom_model`, `esmm_model`,
`mmoe_model`. The configured primary aggregation (linear, the paper's best) is registered in
MLflow as `mtlds`; every other model under its own name. Each writes its test-split predictions
(`user_id`, `label_<task>`, `p_<task>`, `score`) for `evaluation_metrics`.
"""

import json

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from assets.common.training import ModelTrainingConfig, epoch_logger, split_rows_sql
from assets.model_registry.signatures import candidate_example, conversion_signature
from assets.training_data.assets import funnel_examples, funnel_spec_for
from assets.training_data.examples_sql import SPLITS
from model_lib.conversion_service import ConversionModel
from model_lib.funnel_samples import FunnelSpec, samples_to_tensors
from model_lib.mtlds import AGGREGATIONS, MTLDSConfig, evaluate, predict
from model_lib.mtlds_baselines import BASELINES, build_model
from model_lib.training import fit
from resources.event_sources import EventSource
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse, sql_literal

CONVERSION_MODELS = tuple(f"mtlds_{a}" for a in AGGREGATIONS) + tuple(BASELINES)
PRIMARY_MTLDS = "mtlds_linear"  # registered as `mtlds` (contract.md)
GROUP = "conversion_models"
OWNERS = ["team:ml-platform"]
LOADER = "model_lib.conversion_service:ConversionModel.load"
DESCRIPTIONS = {
    "mtlds_linear": "MTLDS, linear aggregation (learned weights) + SoftSort permutation loss.",
    "mtlds_mul": "MTLDS, multiplicative aggregation + SoftSort permutation loss.",
    "mtlds_max": "MTLDS, max aggregation + SoftSort permutation loss.",
    "mtlds_sum": "MTLDS, sum aggregation + SoftSort permutation loss.",
    "single_task": "Baseline: one independent network per behaviour.",
    "shared_bottom": "Baseline: shared-bottom multi-task network, BCE only.",
    "esmm": "Baseline: ESMM, CTR x CVR over the entire space.",
    "mmoe": "Baseline: multi-gate mixture of experts.",
}


class ConversionTrainingConfig(ModelTrainingConfig):
    """Defaults are the widths and regularisation validated on the Taobao slices in
    tests/test_mtlds_taobao.py: wider, barely regularised networks overfit after one epoch there."""

    epochs: int = Field(default=8, description="Upper bound; early stopping on validation loss.")
    batch_size: int = 256
    learning_rate: float = 1e-3
    patience: int = 2
    bottom: list[int] = Field(default=[64, 32], description="Shared-bottom widths (MMoE: each expert).")
    tower: list[int] = Field(default=[16], description="Per-task tower widths.")
    embed_dim: int = Field(default=8, description="Width of the hashed id embeddings.")
    tau: float = Field(
        default=1.0, description="SoftSort temperature (sharper settings hurt NDCG on Taobao; see model_lib/mtlds.py)."
    )
    perm_weight: float = Field(default=1.0, description="Weight of the permutation loss.")


def item_statistics_sql(spec: FunnelSpec, events: str = "sessionized_events") -> str:
    """Per item, the counts a served model bundles (`model_lib.conversion_service.item_statistics`),
    as one GROUP BY in DuckDB: the step holds one row per item, never the events."""
    last = spec.funnel[-1]
    return f"""
        SELECT CAST(item_id AS VARCHAR) AS item_id,
               count_if(CAST(event_name AS VARCHAR) = {sql_literal(spec.funnel[0])}) AS item_prior_views,
               count_if(CAST(event_name AS VARCHAR) = {sql_literal(last)}) AS "item_prior_{last}"
        FROM {events} WHERE item_id IS NOT NULL
        GROUP BY 1 ORDER BY 1"""


def registered_name(model: str) -> str:
    return "mtlds" if model == PRIMARY_MTLDS else model


def build_conversion_model_asset(model_name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{model_name}_model",
        group_name=GROUP,
        owners=OWNERS,
        kinds={"pytorch", "mlflow"},
        deps=[funnel_examples],
        description=DESCRIPTIONS[model_name] + f" Registered in MLflow as `{registered_name(model_name)}`.",
        tags={"model_family": "mtlds"},
    )
    def _train(
        context: dg.AssetExecutionContext,
        config: ConversionTrainingConfig,
        warehouse: DuckDBWarehouse,
        event_source: EventSource,
        paths: TraceDagsterPaths,
        mlflow_tracking: MLflowTracking,
    ) -> dg.Output[dict]:
        torch.set_num_threads(config.torch_threads)
        spec = funnel_spec_for(event_source)
        with warehouse.connect(read_only=True) as con:
            # one frame per split, each at most about max_rows_per_split rows (whole users); training
            # no more than the sample budget can use
            queries = {s: split_rows_sql(con, "funnel_examples", s, config.max_split_rows(s)) for s in SPLITS}
            splits = {s: con.sql(q).df() for s, (q, _, _) in queries.items()}
            item_stats = con.sql(item_statistics_sql(spec)).df().set_index("item_id")
            example_events = con.sql(
                "SELECT * EXCLUDE (source_file, source_row, ingested_at) FROM sessionized_events "
                "WHERE user_id = (SELECT min(user_id) FROM funnel_examples WHERE split = 'test') ORDER BY event_index"
            ).df()
        sampled = {s: f"{len(splits[s])} of {total}" for s, (_, _, total) in queries.items() if len(splits[s]) < total}
        if sampled:
            context.log.info(f"splits larger than max_rows_per_split, user-hash samples: {sampled}")
        data = {s: samples_to_tensors(frame, spec) for s, frame in splits.items()}
        cfg = MTLDSConfig.from_spec(
            spec,
            tau=config.tau,
            perm_weight=config.perm_weight,
            bottom=tuple(config.bottom),
            tower=tuple(config.tower),
            embed_dim=config.embed_dim,
        )
        model = build_model(model_name, cfg, seed=config.seed)
        out_dir = paths.home_dir / "models" / model_name / context.run.run_id
        out_dir.mkdir(parents=True, exist_ok=True)

        tags = {"dagster.run_id": context.run.run_id, "model": model_name, "model_family": "mtlds"}
        with mlflow_tracking.start_run(run_name=f"{model_name}-{context.run.run_id[:8]}", tags=tags) as run:
            mlflow.log_params(
                {
                    **config.model_dump(),
                    "model": model_name,
                    "funnel": " < ".join(spec.funnel),
                    "sampled_splits": json.dumps(sampled),
                    "extra_labels": ",".join(spec.extra_labels),
                    **{f"n_{s}": len(f) for s, f in splits.items()},
                }
            )
            fit_result = fit(
                model,
                data["train"],
                data["valid"],
                config.train_config(),
                on_epoch=epoch_logger(context, model_name, unit="samples/s"),
                checkpoint_path=paths.checkpoints_dir / f"{model_name}-{context.run.run_id}.pt",
            )
            served = ConversionModel(model_name, model, spec, item_stats)  # with the item counts a request cannot know
            artifact = served.save(out_dir / "model.pt")
            probs, scores = predict(model, data["test"])
            test = splits["test"]
            predictions = pd.DataFrame({"user_id": test["user_id"].astype(str).to_numpy(), "score": scores})
            for t, task in enumerate(cfg.tasks):
                predictions[f"label_{task}"] = test[f"label_{task}"].to_numpy()
                predictions[f"p_{task}"] = probs[:, t]
            predictions.to_parquet(out_dir / "predictions.parquet", index=False)
            metrics = evaluate(model, data["test"])
            flat = {f"test_auc_{t}": v for t, v in metrics["auc"].items()} | {"test_ndcg": metrics["ndcg"]}
            mlflow.log_metrics(
                {k: v for k, v in flat.items() if np.isfinite(v)} | {"best_epoch": fit_result.best_epoch}
            )
            registered = mlflow_tracking.log_model_artifact(
                artifact,
                registered_model_name=registered_name(model_name),
                loader=LOADER,
                predict_method="score_candidates",  # raw events + candidate items in, p_<task> + score out
                input_example=candidate_example(example_events, example_events["user_id"].iloc[-1]),
                signature=conversion_signature(served),
                version_tags={
                    "dagster.run_id": context.run.run_id,
                    "model": model_name,
                    f"test_auc_{spec.funnel[-1]}": f"{metrics['auc'][spec.funnel[-1]]:.6f}",
                },
                metrics=flat,
            )
        history = pd.DataFrame([r.__dict__ for r in fit_result.history])
        value = {
            "model": model_name,
            "artifact": str(artifact),
            "predictions": str(out_dir / "predictions.parquet"),
            "mlflow_run_id": run.info.run_id,
            "registered_model": registered.name,
            "version": registered.version,
            "model_uri": registered.model_uri,
            "tasks": list(cfg.tasks),
            "funnel_tasks": list(cfg.funnel_tasks),
            f"test_auc_{spec.funnel[-1]}": metrics["auc"][spec.funnel[-1]],
            "test_ndcg": metrics["ndcg"],
        }
        return dg.Output(
            value,
            metadata={
                "registered_version": dg.MetadataValue.text(registered.model_uri),
                "mlflow_run_id": run.info.run_id,
                "test_ndcg": metrics["ndcg"],
                **{f"test_auc_{t}": v for t, v in metrics["auc"].items()},
                "best_epoch": fit_result.best_epoch,
                "training_history": dg.MetadataValue.md(history.round(4).to_markdown(index=False)),
            },
        )

    return _train


conversion_model_assets = [build_conversion_model_asset(name) for name in CONVERSION_MODELS]
