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
- `predictions.parquet`: `example_id`, `split`, `p_<task>` for every seen task, valid and test examples;
- `embeddings.parquet`: `example_id`, `split`, `embedding`, valid and test examples (probes fit on valid);
and returns their paths with the registered MLflow version for the evaluation downstream.
"""

import json
import shutil

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from assets.common.training import ModelTrainingConfig, epoch_logger
from assets.model_registry.signatures import raw_event_example, trace_signature, trained_session_gap
from assets.trace_models.sequence_data import EVENTS_PER_BUCKET, SequenceShards, write_sequence_shards
from assets.training_data.assets import read_tasks, training_examples
from model_lib.embedding_service import UserModel
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
    events_per_bucket: int = Field(
        default=EVENTS_PER_BUCKET,
        description="Events read and encoded at once (one user-hash bucket): bounds the step's memory.",
    )
    ddp_processes: int = Field(
        default=1,
        description="Worker processes of PyTorch DistributedDataParallel (gloo on CPU, NCCL on GPU), "
        "started the torchrun way; 1 trains in the step's own process.",
    )


def attribute_rules_of(tasks: pd.DataFrame):
    """The attribute allow-list of the event format the examples were built from."""
    event_format = str(tasks["event_format"].iloc[0]) if "event_format" in tasks.columns else "canonical"
    return attribute_rules_for(event_format)


def read_example_events(warehouse: DuckDBWarehouse, user_ids: list[str]) -> pd.DataFrame:
    """The sessionized events of a few users (the MLflow input example), before the last cutoff."""
    with warehouse.connect(read_only=True) as con:
        con.register("wanted_users", pd.DataFrame({"user_id": user_ids}))
        return con.sql("""
            SELECT * EXCLUDE (source_file, source_row, ingested_at) FROM sessionized_events
            WHERE user_id IN (SELECT user_id FROM wanted_users)
              AND event_time < (SELECT max(cutoff) FROM training_examples)
            ORDER BY user_id, event_index""").df()


@torch.inference_mode()
def write_model_outputs(model: UserModel, data: SequenceShards, seen: pd.DataFrame, out_dir, batch_size: int = 2048):
    """Stream predictions and embeddings of the valid and test examples (what evaluation reads:
    probes fit on valid, everything is scored on test) to parquet, shard by shard; returns
    (test labels [N, T], test probabilities [N, T]) for the test metrics. Training examples are
    left out: nothing reads them, and at scale they would be most of the step's scoring."""
    tasks = list(seen["task"])
    writers: dict[str, pq.ParquetWriter] = {}
    test_labels, test_probs = [], []
    try:
        for split in ("valid", "test"):
            for batch, embeddings in model.embed_shards(data.ids(split), batch_size):  # embeddings [B, E]
                ids = batch["example_id"]  # numpy strings
                probs = torch.sigmoid(model.model.heads(embeddings)).numpy()  # [B, T]
                split_column = pa.array([split] * len(ids))
                tables = {
                    "predictions": pa.table(
                        {"example_id": pa.array(ids.astype(str)), "split": split_column}
                        | {f"p_{t}": pa.array(probs[:, i]) for i, t in enumerate(tasks)}
                    ),
                    "embeddings": pa.table(
                        {
                            "example_id": pa.array(ids.astype(str)),
                            "split": split_column,
                            "embedding": pa.array(list(embeddings.numpy()), type=pa.list_(pa.float32())),
                        }
                    ),
                }
                for name, table in tables.items():
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(out_dir / f"{name}.parquet", table.schema)
                    writers[name].write_table(table)
                if split == "test":
                    test_labels.append(batch["labels"].numpy())
                    test_probs.append(probs)
    finally:
        for writer in writers.values():
            writer.close()
    width = len(tasks)
    return (
        np.concatenate(test_labels) if test_labels else np.zeros((0, width)),
        np.concatenate(test_probs) if test_probs else np.zeros((0, width)),
    )


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
        with warehouse.connect(read_only=True) as con:
            tasks = read_tasks(con)
            test_users = [
                r[0]
                for r in con.execute(
                    "SELECT DISTINCT user_id FROM training_examples WHERE split = 'test' ORDER BY user_id LIMIT 2"
                ).fetchall()
            ]
        seen = tasks[tasks["kind"] == "seen"]
        label_columns = list(seen["label_column"])
        out_dir = paths.home_dir / "models" / kind / context.run.run_id
        out_dir.mkdir(parents=True, exist_ok=True)
        shard_root = paths.tmp_dir / "sequence_shards" / f"{kind}-{context.run.run_id}"
        if shard_root.exists():  # a retried step re-encodes from scratch
            shutil.rmtree(shard_root)
        data = write_sequence_shards(
            lambda: warehouse.connect(read_only=True),
            kind,
            label_columns,
            shard_root,
            EncoderConfig(max_len=config.max_len, attributes=attribute_rules_of(tasks)),
            config.events_per_bucket,
            max_train_examples=config.max_train_rows(),
        )
        train, valid = data.splits["train"], data.splits["valid"]
        sampled = (
            f" (a user sample of the {data.n_train_examples}: sample budget / max_rows_per_split)"
            if len(train) < data.n_train_examples
            else ""
        )
        context.log.info(
            f"{kind}: {data.n_events} events of example users encoded in {data.buckets} user-hash bucket(s): "
            f"{len(train)} train{sampled} / {len(valid)} valid / {len(data.splits['test'])} test examples on disk"
        )
        tags = {
            "dagster.run_id": context.run.run_id,
            "model": kind,
            "model_family": "trace",
            "task_set": str(tasks["task_set"].iloc[0]),
        }
        try:
            with mlflow_tracking.start_run(run_name=f"{kind}-{context.run.run_id[:8]}", tags=tags) as run:
                mlflow.log_params(
                    {
                        **config.model_dump(),
                        "model": kind,
                        "seen_tasks": ",".join(seen["task"]),
                        "n_train": len(train),
                        "n_valid": len(valid),
                        "n_events": data.n_events,
                        "buckets": data.buckets,
                    }
                )
                model, fit_result = UserModel.train_on_shards(
                    kind,
                    data.encoder,
                    train,
                    valid,
                    label_columns,
                    train_config=config.train_config(),
                    on_epoch=epoch_logger(context, kind, unit="seq/s"),
                    checkpoint_path=paths.checkpoints_dir / f"{kind}-{context.run.run_id}.pt",  # a retried step resumes
                    processes=config.ddp_processes,
                )
                model.session_gap_seconds = trained_session_gap(context.instance)  # served raw events are cut alike
                # TRACE also carries its one-user network as ONNX, which the served model runs (serving_graph.py)
                artifact = model.save(
                    out_dir / "model.pt", metadata={"dagster_run_id": context.run.run_id}, serving_graph=True
                )
                serving_runtime = UserModel.load(artifact).freeze().serving_runtime
                # encoded once, streamed: the probabilities come from the heads on the embeddings
                y_test, p_test = write_model_outputs(model, data, seen, out_dir)

                test_metrics = {}
                for i, task in enumerate(seen["task"]):
                    test_metrics[f"test_auroc_{task}"] = auroc(y_test[:, i], p_test[:, i])
                    test_metrics[f"test_auprc_{task}"] = auprc(y_test[:, i], p_test[:, i])
                test_metrics["test_mean_auroc"] = float(
                    np.nanmean([v for k, v in test_metrics.items() if "auroc" in k])
                )
                mlflow.log_metrics(
                    {
                        **test_metrics,
                        "best_epoch": fit_result.best_epoch,
                        "best_valid_loss": fit_result.best_valid_loss,
                    }
                )
                mlflow.log_dict(model.encoder.state_dict(), "encoder.json")  # vocabularies + time-feature statistics
                mlflow.log_dict(json.loads(seen.to_json(orient="records")), "seen_tasks.json")

                example_events = read_example_events(warehouse, test_users)
                registered = mlflow_tracking.log_model_artifact(
                    artifact,
                    registered_model_name=kind,
                    loader=LOADER,
                    predict_method="score_events",  # raw canonical events in, embedding + p_<task> out
                    input_example=raw_event_example(example_events, test_users),
                    signature=trace_signature(model),
                    version_tags={
                        "dagster.run_id": context.run.run_id,
                        "test_mean_auroc": f"{test_metrics['test_mean_auroc']:.6f}",
                    },
                    metrics=test_metrics,
                )
        finally:
            shutil.rmtree(shard_root, ignore_errors=True)
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
                "train_examples_in_warehouse": data.n_train_examples,
                "samples_seen": sum(r.samples for r in fit_result.history),
                "user_hash_buckets": data.buckets,
                "serving_runtime": serving_runtime,  # what runs the served model's one-user requests
            },
        )

    return _train


sequence_model_assets = [build_sequence_model_asset(kind) for kind in SEQUENCE_MODELS]
