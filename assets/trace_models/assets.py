"""TRACE and its sequence baselines: trained on the seen tasks, logged to MLflow, registered.

One asset per model (`trace_model`, `myopic_model`, `vanilla_transformer_model`, `lstm_model`,
`mini_gpt_model`, `myopic_last_page_model`), built by one factory, so they share every line of
training, logging and evaluation code and differ only in `model_lib`'s kind. Which event
attributes enter the models is the format's declared allow-list (`model_lib.encoding`
`ATTRIBUTE_ALLOW_LISTS`, chosen by the `event_format` recorded in `training_tasks`). The
aggregate baselines are in `aggregate_models.py`. Independent assets run in parallel under the multiprocess
executor; each pins torch to `torch_threads` so two of them share the two cores fairly.

Each asset writes, under `TRACE_DAGSTER_HOME/models/<model>/<dagster run id>/`:
- `model.pt`: the model_lib artifact (config + vocabularies + weights, `weights_only` loadable);
- `predictions.parquet`: `example_id`, `split`, `p_<task>` for every seen task, every example;
- `embeddings.parquet`: `example_id`, `split`, `embedding`, every example (probes need train too);
and returns their paths with the registered MLflow version for the evaluation downstream.
"""

import json

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import torch
from pydantic import Field

from assets.common.training import ModelTrainingConfig, epoch_logger
from assets.training_data.assets import read_tasks, training_examples
from model_lib.embedding_service import UserModel, labels_tensor
from model_lib.encoding import EncoderConfig, attribute_rules_for
from model_lib.metrics import auprc, auroc
from resources.mlflow_tracking import MLflowTracking
from resources.paths import TraceDagsterPaths
from resources.warehouse import DuckDBWarehouse

SEQUENCE_MODELS = ("trace", "myopic", "vanilla_transformer", "lstm", "mini_gpt", "myopic_last_page")
GROUP = "trace_models"
OWNERS = ["team:ml-platform"]
LOADER = "model_lib.embedding_service:UserModel.load"
DESCRIPTIONS = {
    "trace": "TRACE: attributed events of many sessions, event- and session-position embeddings, "
    "one transformer block, max pooling, shared dense user embedding, one head per task.",
    "myopic": "Myopic baseline: the TRACE network fed only the user's most recent session.",
    "vanilla_transformer": "Vanilla transformer baseline: event names only, sinusoidal positions.",
    "lstm": "LSTM baseline over the same inputs as TRACE.",
    "mini_gpt": "Mini-GPT baseline: a small causal transformer over page names with a next-page loss.",
    "myopic_last_page": "Myopic baseline, last-page reading: the TRACE network fed only the most recent page.",
}


class SequenceTrainingConfig(ModelTrainingConfig):
    max_len: int = Field(default=128, description="Most recent events per example.")


def load_sequence_inputs(warehouse: DuckDBWarehouse) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(examples, events of the example users before the last cutoff, tasks)."""
    with warehouse.connect(read_only=True) as con:
        examples = con.sql("SELECT * FROM training_examples ORDER BY example_id").df()
        tasks = read_tasks(con)
        events = con.sql("""
            SELECT * EXCLUDE (source_file, source_row, ingested_at) FROM sessionized_events
            WHERE user_id IN (SELECT DISTINCT user_id FROM training_examples)
              AND event_time < (SELECT max(cutoff) FROM training_examples)
            ORDER BY user_id, event_index""").df()
    return examples, events, tasks


def attribute_rules_of(tasks: pd.DataFrame):
    """The attribute allow-list of the event format the examples were built from."""
    event_format = str(tasks["event_format"].iloc[0]) if "event_format" in tasks.columns else "canonical"
    return attribute_rules_for(event_format)


def build_sequence_model_asset(kind: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"{kind}_model",
        group_name=GROUP,
        owners=OWNERS,
        kinds={"pytorch", "mlflow"},
        deps=[training_examples, "sessionized_events"],
        description=DESCRIPTIONS[kind] + f" Trained on the seen tasks; registered in MLflow as `{kind}`.",
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
        label_columns = list(seen["label_column"])
        train, valid = examples[examples["split"] == "train"], examples[examples["split"] == "valid"]
        out_dir = paths.home_dir / "models" / kind / context.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        tags = {
            "dagster.run_id": context.run_id,
            "model": kind,
            "model_family": "trace",
            "task_set": str(tasks["task_set"].iloc[0]),
        }
        with mlflow_tracking.start_run(run_name=f"{kind}-{context.run_id[:8]}", tags=tags) as run:
            mlflow.log_params(
                {
                    **config.model_dump(),
                    "model": kind,
                    "seen_tasks": ",".join(seen["task"]),
                    "n_train": len(train),
                    "n_valid": len(valid),
                    "n_events": len(events),
                }
            )
            model, fit_result = UserModel.train(
                kind,
                events,
                train,
                valid,
                label_columns,
                encoder_config=EncoderConfig(max_len=config.max_len, attributes=attribute_rules_of(tasks)),
                train_config=config.train_config(),
                on_epoch=epoch_logger(context, kind, unit="seq/s"),
                checkpoint_path=paths.checkpoints_dir / f"{kind}-{context.run_id}.pt",  # a retried step resumes
            )
            artifact = model.save(out_dir / "model.pt", metadata={"dagster_run_id": context.run_id})
            embeddings = model.embed(events, examples)  # encoded once: the probabilities come from the heads
            probabilities = model.proba_from_embeddings(embeddings)
            predictions = pd.DataFrame(
                {"example_id": examples["example_id"].to_numpy(), "split": examples["split"].to_numpy()}
            )
            for task, column in zip(seen["task"], label_columns):
                predictions[f"p_{task}"] = probabilities[column].to_numpy()
            predictions.to_parquet(out_dir / "predictions.parquet", index=False)
            pd.DataFrame(
                {
                    "example_id": examples["example_id"].to_numpy(),
                    "split": examples["split"].to_numpy(),
                    "embedding": list(embeddings),
                }
            ).to_parquet(out_dir / "embeddings.parquet", index=False)

            test = examples["split"].to_numpy() == "test"
            test_metrics = {}
            for task, column in zip(seen["task"], label_columns):
                y = labels_tensor(examples.loc[test], [column]).numpy()[:, 0]  # NaN: excluded label
                p = predictions.loc[test, f"p_{task}"].to_numpy()
                test_metrics[f"test_auroc_{task}"] = auroc(y, p)
                test_metrics[f"test_auprc_{task}"] = auprc(y, p)
            test_metrics["test_mean_auroc"] = float(np.nanmean([v for k, v in test_metrics.items() if "auroc" in k]))
            mlflow.log_metrics(
                {**test_metrics, "best_epoch": fit_result.best_epoch, "best_valid_loss": fit_result.best_valid_loss}
            )
            mlflow.log_dict(model.encoder.state_dict(), "encoder.json")  # vocabularies + time-feature statistics
            mlflow.log_dict(json.loads(seen.to_json(orient="records")), "seen_tasks.json")

            example_users = examples.loc[test, "user_id"].drop_duplicates().head(2)
            input_example = (
                events[events["user_id"].isin(example_users)].groupby("user_id").tail(5).reset_index(drop=True)
            )
            signature = mlflow.models.infer_signature(input_example, model.embed_latest(input_example))
            registered = mlflow_tracking.log_model_artifact(
                artifact,
                registered_model_name=kind,
                loader=LOADER,
                predict_method="embed_latest",
                input_example=input_example,
                signature=signature,
                version_tags={
                    "dagster.run_id": context.run_id,
                    "test_mean_auroc": f"{test_metrics['test_mean_auroc']:.6f}",
                },
            )
        history = pd.DataFrame([r.__dict__ for r in fit_result.history])
        value = {
            "model": kind,
            "artifact": str(artifact),
            "predictions": str(out_dir / "predictions.parquet"),
            "embeddings": str(out_dir / "embeddings.parquet"),
            "mlflow_run_id": run.info.run_id,
            "registered_model": registered.name,
            "version": registered.version,
            "model_uri": registered.model_uri,
            "seen_tasks": list(seen["task"]),
            "test_mean_auroc": test_metrics["test_mean_auroc"],
        }
        return dg.Output(
            value,
            metadata={
                "registered_version": dg.MetadataValue.text(registered.model_uri),
                "mlflow_run_id": run.info.run_id,
                "test_mean_auroc": test_metrics["test_mean_auroc"],
                "best_epoch": fit_result.best_epoch,
                "stopped_early": fit_result.stopped_early,
                "training_history": dg.MetadataValue.md(history.round(4).to_markdown(index=False)),
                "test_metrics": dg.MetadataValue.md(
                    pd.Series(test_metrics).round(4).rename("value").to_frame().to_markdown()
                ),
                "train_examples": len(train),
            },
        )

    return _train


sequence_model_assets = [build_sequence_model_asset(kind) for kind in SEQUENCE_MODELS]
