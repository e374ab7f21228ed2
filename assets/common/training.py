"""What every model-training asset shares: its run-config fields and how it reports an epoch."""

import re
from dataclasses import dataclass

import dagster as dg
import mlflow
from pydantic import Field

from model_lib.training import EpochReport, TrainConfig
from resources.warehouse import user_hash_sql


class ModelTrainingConfig(dg.Config):
    """Optimiser and loop settings of one training step; each model family adjusts the defaults."""

    epochs: int = Field(default=12, description="Upper bound; early stopping on validation loss.")
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-2
    patience: int = 3
    seed: int = 0
    torch_threads: int = Field(default=1, description="torch threads of this step (the executor runs two at once).")
    sample_budget: int = Field(
        default=1_000_000,
        description="Most training rows seen over all epochs (0: epochs alone). Bounds the step's cost "
        "at scale; the default run (~5k training rows x 12 epochs) stays below it.",
    )
    max_rows_per_split: int = Field(
        default=2_000_000,
        description="Steps that hold their rows in memory read at most about this many per split: a "
        "user-hash sample (whole users) when a split is larger. Bounds memory by config, not data size.",
    )

    def max_train_rows(self) -> int:
        """Training rows worth reading (0: all): no more than the sample budget can use, nor
        than `max_rows_per_split`."""
        caps = [n for n in (self.sample_budget, self.max_rows_per_split) if n > 0]
        return min(caps) if caps else 0

    def max_split_rows(self, split: str) -> int:
        """Rows worth reading of one split (0: all)."""
        return self.max_train_rows() if split == "train" else self.max_rows_per_split

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            patience=self.patience,
            seed=self.seed,
            num_threads=self.torch_threads,
            sample_budget=self.sample_budget or None,
        )


def user_sample_sql(share: float, column: str = "user_id") -> str:
    """A condition true for a stable sample of about ``share`` of the users (whole users; md5, so
    the same users on every run and DuckDB version, independent of the user-hash buckets)."""
    return f"{user_hash_sql(column, 1_000_000, salt='sample')} < {max(1, int(1_000_000 * share))}"


def split_rows_sql(con, table: str, split: str, max_rows: int, columns: str = "*") -> tuple[str, int, int]:
    """(query, rows it returns about, rows of the split) for one split of `table`: every row, or a
    sample of whole users (`user_sample_sql`) of about `max_rows` when the split is larger."""
    where = f"split = '{split}'"
    (total,) = con.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchall()[0]
    if max_rows <= 0 or total <= max_rows:
        return f"SELECT {columns} FROM {table} WHERE {where}", total, total
    return f"SELECT {columns} FROM {table} WHERE {where} AND {user_sample_sql(max_rows / total)}", max_rows, total


#: How a training step reports an epoch in the Dagster run log; `trace-dagster run` parses it back
#: (`parse_epoch_message`) for its live view, so the two live here together.
EPOCH_MESSAGE = re.compile(
    r"^(?P<model>\S+) epoch (?P<epoch>\d+)/(?P<epochs>\d+): train (?P<train_loss>\S+) "
    r"valid (?P<valid_loss>\S+) \((?P<rate>\d+) (?P<unit>[^)]+)\)"
)


@dataclass(frozen=True)
class EpochProgress:
    """One epoch of one training step, as read back from its log line."""

    model: str
    epoch: int
    epochs: int  # the configured upper bound (early stopping may end sooner)
    train_loss: float
    valid_loss: float
    rate: int
    unit: str  # "seq/s" or "samples/s"


def parse_epoch_message(message: str) -> EpochProgress | None:
    """The epoch a log message reports, or None if it is another message."""
    match = EPOCH_MESSAGE.match(message)
    if match is None:
        return None
    g = match.groupdict()
    return EpochProgress(
        g["model"],
        int(g["epoch"]),
        int(g["epochs"]),
        float(g["train_loss"]),
        float(g["valid_loss"]),
        int(g["rate"]),
        g["unit"],
    )


def epoch_logger(context: dg.AssetExecutionContext, model: str, unit: str):
    """Per-epoch losses to the MLflow run and the Dagster run log (progress visible while it trains)."""
    epochs = (context.op_execution_context.op_config or {}).get("epochs", 0)  # the upper bound, shown as "epoch k/n"

    def on_epoch(report: EpochReport) -> None:
        mlflow.log_metrics(
            {
                "train_loss": report.train_loss,
                "valid_loss": report.valid_loss,
                "samples_per_second": report.samples_per_second,
            },
            step=report.epoch,
        )
        context.log.info(
            f"{model} epoch {report.epoch}/{epochs}: train {report.train_loss:.4f} valid {report.valid_loss:.4f} "
            f"({report.samples_per_second:.0f} {unit}){' best' if report.is_best else ''}"
        )

    return on_epoch
