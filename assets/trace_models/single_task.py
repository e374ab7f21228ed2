"""`trace_single_task`: one TRACE network per seen task (the paper's single- vs multi-task question).

Costlier than the multi-task model by the number of seen tasks, so it is not part of
`full_pipeline`: `build_trace_single_task_asset()` makes the asset `trace_single_task_model`
for the `reproduction` job, and `train_single_task_trace` / `single_task_outputs` are the plain
functions behind it. Its outputs have the layout of every TRACE-family model (`assets.py`):
`p_<task>` comes from the network trained on that task alone; the "embedding" handed to the
unseen-task probes is the concatenation of the per-task embeddings (T x 32 dimensions), the
most a single-task approach can offer a new task.
"""

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import torch

from assets.common.training import epoch_logger
from assets.trace_models.assets import SequenceTrainingConfig, attribute_rules_of, load_sequence_inputs
from assets.training_data.assets import training_examples
from model_lib.embedding_service import UserModel
from model_lib.encoding import EncoderConfig, PreparedEvents, prepare_events
from model_lib.training import TrainConfig
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse

NAME = "trace_single_task"


def train_single_task_trace(
    events: pd.DataFrame | PreparedEvents,
    train: pd.DataFrame,
    valid: pd.DataFrame,
    label_columns,
    encoder_config: EncoderConfig | None = None,
    train_config: TrainConfig | None = None,
    on_epoch=None,
) -> dict[str, UserModel]:
    """{label column: TRACE trained on that label alone}, same encoder view, loop and seed."""
    ev = events if isinstance(events, PreparedEvents) else prepare_events(events)
    models = {}
    for column in label_columns:
        model, _ = UserModel.train(
            "trace",
            ev,
            train,
            valid,
            [column],
            encoder_config=encoder_config,
            train_config=train_config,
            on_epoch=on_epoch,
        )
        models[column] = model
    return models


def single_task_outputs(
    models: dict[str, UserModel], events: pd.DataFrame | PreparedEvents, examples: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray]:
    """(probabilities, one column per label column; concatenated embeddings [N, T*E])."""
    ev = events if isinstance(events, PreparedEvents) else prepare_events(events)
    proba, embeddings = {}, []
    for column, model in models.items():
        emb = model.embed(ev, examples)
        proba[column] = model.proba_from_embeddings(emb)[column].to_numpy()
        embeddings.append(emb)
    return pd.DataFrame(proba, index=examples.index), np.concatenate(embeddings, axis=1)


def build_trace_single_task_asset() -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{NAME}_model",
        group_name="trace_models",
        owners=["team:ml-platform"],
        kinds={"pytorch", "mlflow"},
        deps=[training_examples, "sessionized_events"],
        description="Single-task TRACE: one TRACE network per seen task (reproduction job only).",
        tags={"model_family": "trace"},
    )
    def _train(
        context: dg.AssetExecutionContext,
        config: SequenceTrainingConfig,
        warehouse: DuckDBWarehouse,
        paths: TraceDagsterPaths,
        mlflow_tracking: MLflowTracking,
    ) -> dg.Output[dict]:
        torch.set_num_threads(config.torch_threads)
        examples, events, tasks = load_sequence_inputs(warehouse)
        seen = tasks[tasks["kind"] == "seen"]
        ev = prepare_events(events)
        out_dir = paths.home_dir / "models" / NAME / context.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        with mlflow_tracking.start_run(run_name=f"{NAME}-{context.run_id[:8]}", tags={"model": NAME}) as run:
            mlflow.log_params({**config.model_dump(), "model": NAME})
            models = train_single_task_trace(
                ev,
                examples[examples["split"] == "train"],
                examples[examples["split"] == "valid"],
                list(seen["label_column"]),
                EncoderConfig(max_len=config.max_len, attributes=attribute_rules_of(tasks)),
                config.train_config(),
                on_epoch=epoch_logger(context, NAME, unit="seq/s"),
            )
            proba, embeddings = single_task_outputs(models, ev, examples)
            predictions = examples[["example_id", "split"]].copy()
            for task, column in zip(seen["task"], seen["label_column"]):
                predictions[f"p_{task}"] = proba[column].to_numpy()
                models[column].save(out_dir / f"{task}.pt", metadata={"dagster_run_id": context.run_id})
            predictions.to_parquet(out_dir / "predictions.parquet", index=False)
            pd.DataFrame(
                {"example_id": examples["example_id"], "split": examples["split"], "embedding": list(embeddings)}
            ).to_parquet(out_dir / "embeddings.parquet", index=False)
        value = {
            "model": NAME,
            "predictions": str(out_dir / "predictions.parquet"),
            "embeddings": str(out_dir / "embeddings.parquet"),
            "mlflow_run_id": run.info.run_id,
            "version": f"run-{run.info.run_id[:8]}",
            "seen_tasks": list(seen["task"]),
        }
        return dg.Output(value, metadata={"mlflow_run_id": run.info.run_id, "networks": len(models)})

    return _train
