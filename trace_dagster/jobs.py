"""Jobs: what a person or a sensor can launch.

- `full_pipeline` (contract.md): every asset, from `raw_events` to `drift_report`.
- `ingest_and_monitor`: new events in, the champion's embeddings refreshed, drift checked; no
  training. What the new-files sensor launches.
- `retrain_models`: examples, every model, evaluation, gated promotion, embeddings, drift.
  What the weekly schedule and the drift sensor launch.
- `rollback_champion`: restore the `previous` version of a registered model as `champion`.
- `score_users` (contract.md): the champion's embeddings and probabilities for a file of raw
  events or a date range of the warehouse, streamed to parquet (`assets/serving/scoring.py`).
- `reproduction` / `ablations` (contract.md): seeds, the papers' comparison set and learning
  curves / the config switches, each ending in `reproduction_report`. Off the default path:
  `full_pipeline` and `retrain_models` leave the `reproduction` group out.
"""

import dagster as dg
from pydantic import Field

from assets.serving.scoring import score_users_op
from resources.mlflow_tracking import MLflowTracking

INGESTION_ASSETS = ("raw_events", "rejected_events", "sessionized_events")


# Dagster's multiprocess executor, two steps at a time (this machine has two cores; training
# steps use one torch thread each), started from a forkserver that has imported the code
# location once: a spawned step would import torch, MLflow and the assets again (~6-10 s per
# step, ~30 steps per full run). The default run config of every asset job; any launch may
# override it.
def execution_config(max_concurrent: int = 2) -> dict:
    return {
        "execution": {
            "config": {
                "multiprocess": {
                    "max_concurrent": max_concurrent,
                    "start_method": {"forkserver": {"preload_modules": ["trace_dagster.definitions"]}},
                }
            }
        }
    }


MONITORING_ASSETS = ("user_embeddings", "drift_report")
REPRODUCTION_GROUP = dg.AssetSelection.groups("reproduction")
#: Every asset but the reproduction group (seeds, ablations: hours, off the default path).
FULL_PIPELINE_SELECTION = dg.AssetSelection.all() - REPRODUCTION_GROUP

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    config=execution_config(),
    selection=FULL_PIPELINE_SELECTION,
    description="Every asset and check: raw events to drift report (contract.md).",
)

ingest_and_monitor = dg.define_asset_job(
    "ingest_and_monitor",
    config=execution_config(),
    selection=dg.AssetSelection.assets(*INGESTION_ASSETS, *MONITORING_ASSETS),
    description="Ingest new event files, refresh the champion's user embeddings, check drift.",
)

retrain_models = dg.define_asset_job(
    "retrain_models",
    config=execution_config(),
    selection=dg.AssetSelection.assets("user_splits").downstream() - REPRODUCTION_GROUP,
    description="Rebuild examples, retrain every model, evaluate, promote a winner, refresh embeddings, check drift.",
)


class RollbackConfig(dg.Config):
    model_name: str = Field(default="trace", description="Registered model whose champion is rolled back.")
    expected_champion: str = Field(default="", description="Only roll back if this version is still champion.")


@dg.op(description="Make `previous` the `champion` again; the demoted version keeps its number and tags.")
def rollback_registered_model(
    context: dg.OpExecutionContext, config: RollbackConfig, mlflow_tracking: MLflowTracking
) -> None:
    result = mlflow_tracking.rollback(config.model_name, config.expected_champion or None)
    context.log.info(f"{config.model_name}: {result.reason}")
    if not result.rolled_back:
        raise dg.Failure(
            f"nothing rolled back: {result.reason}",
            metadata={"champion": str(result.champion_version), "previous": str(result.previous_version)},
        )
    context.log_event(
        dg.AssetObservation(
            asset_key=dg.AssetKey("model_promotion"),
            metadata={
                "rollback": result.reason,
                "model": config.model_name,
                "champion": str(result.champion_version),
                "demoted": str(result.demoted_version),
            },
        )
    )


@dg.job(description="Restore the previous champion of a registered model (trace or mtlds).")
def rollback_champion():
    rollback_registered_model()


@dg.job(description="Score users with the champion: a file of raw events or a warehouse date range -> parquet.")
def score_users():
    score_users_op()


# In-process runs (one step trains every variant in turn): no multiprocess executor needed.
reproduction = dg.define_asset_job(
    "reproduction",
    selection=dg.AssetSelection.assets("reproduction_runs", "reproduction_report"),
    executor_def=dg.in_process_executor,
    description="Seeds x the papers' comparison set on simulator, known-answer and Taobao data, learning "
    "curves, then the reproduction report (reports/reproduction_latest.md). Sized by `size`.",
)

ablations = dg.define_asset_job(
    "ablations",
    selection=dg.AssetSelection.assets("ablation_runs", "reproduction_report"),
    executor_def=dg.in_process_executor,
    description="TRACE and MTLDS config switches (positions, depth, class weights, session gap; lambda, tau, "
    "weights >= 0, relevance, permutation loss alone), then the reproduction report.",
)

JOBS = [full_pipeline, ingest_and_monitor, retrain_models, rollback_champion, score_users, reproduction, ablations]
