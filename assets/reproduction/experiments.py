"""Training runs of the reproduction: one model variant, one seed, one dataset -> test scores.

Every run writes *scores*, never summary figures: one row per (test example, task) with the label,
the score and the user, so the report can put user- and seed-resampling intervals on any
comparison afterwards (statistics.py). The runners:

- TRACE family (``run_sequence``): a model kind of ``model_lib.trace_baselines`` with config
  overrides (the ablation switches of ``TRACEConfig``), trained on the seen tasks the way the
  pipeline's training assets train: the dataset's warehouse is encoded to shards one user-hash
  bucket at a time (``write_sequence_shards``), ``UserModel.train_on_shards`` reads them batch by
  batch, and the valid and test embeddings are computed from them batch by batch, so a run's
  memory is bounded by ``events_per_bucket`` and the batch, not by the dataset (only the valid
  and test rows, their embeddings and scores are held). Seen tasks are scored by its heads,
  unseen tasks by a logistic probe on the frozen embeddings fitted on the *validation* users and
  scored on the test users (the test users never choose anything).
  ``run_single_task`` is the same with one network per seen task (``trace_single_task``);
  ``run_wide_deep`` adds the ``st_agg`` features to TRACE's embedding (``trace_wide_deep``).
- ``st_agg`` / ``st_cohort`` (``aggregate_runner``): the pipeline's DuckDB aggregate features,
  one row per example; no event leaves DuckDB.
- MTLDS family (``run_funnel``): a ``model_lib.mtlds_baselines`` model with ``MTLDSConfig``
  overrides on the funnel samples (the pipeline's DuckDB SQL: ``funnel_samples``); rows per
  (test sample, task) plus the aggregated score against purchase (``score_vs_<last stage>``),
  ESMM's cart probability against the label it models (``reach_<stage>``: the stage or any
  deeper one), and per-user NDCG on valid and test (valid chooses tau; test reports).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from assets.reproduction.datasets import ReproductionDataset
from assets.trace_models.sequence_data import SequenceShards, write_sequence_shards
from assets.training_data.funnel_sql import create_funnel_samples
from model_lib.embedding_service import UserModel, labels_tensor
from model_lib.encoding import EncoderConfig
from model_lib.funnel_samples import FUNNELS, FunnelSpec, samples_to_tensors
from model_lib.mtlds import MTLDSConfig, funnel_depth, per_user_ndcg_values, predict
from model_lib.mtlds_baselines import build_model as build_funnel_model
from model_lib.training import FitResult, TrainConfig, fit

SCORE_COLUMNS = ["row_id", "user_id", "task", "task_kind", "split", "y", "score"]


@dataclass(frozen=True)
class Variant:
    """A named model configuration: a kind (or funnel model name) and config overrides."""

    name: str
    kind: str
    overrides: dict = field(default_factory=dict)
    family: str = "trace"  # "trace" or "mtlds"


# ------------------------------------------------------------------------------- TRACE family
def _probe_scores(emb_fit: np.ndarray, y_fit: np.ndarray, emb_test: np.ndarray, seed: int) -> np.ndarray:
    """Logistic probe fitted on the validation users' embeddings, scored on the test users."""
    observed = ~np.isnan(y_fit)
    x, y = emb_fit[observed], y_fit[observed].astype(int)
    if len(np.unique(y)) < 2:
        return np.full(len(emb_test), float(y.mean()) if len(y) else 0.5)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    return probe.fit(x, y).predict_proba(emb_test)[:, 1]


def _labels(frame: pd.DataFrame, task: str) -> np.ndarray:
    return frame[f"label_{task}"].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _splits(dataset: ReproductionDataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(valid, test) examples of the dataset: the rows that get embeddings, probes and scores.
    The training rows are never read here, only encoded to shards."""
    return dataset.examples("valid"), dataset.examples("test")


@dataclass
class _Fitted:
    """One trained network of a TRACE-family run, with the embeddings the runners score."""

    model: UserModel
    fit: FitResult
    fit_seconds: float  # encoding to shards and training
    n_train_examples: int
    emb_valid: np.ndarray  # float32 [N_valid, E] in the row order of the valid frame
    emb_test: np.ndarray  # float32 [N_test, E] in the row order of the test frame

    def info(self) -> dict:
        """The run record's fields of a one-network run."""
        return {
            "fit_seconds": self.fit_seconds,
            "best_epoch": self.fit.best_epoch,
            "n_train_examples": self.n_train_examples,
        }


def _fit_and_embed(
    dataset: ReproductionDataset,
    kind: str,
    label_columns: list[str],
    variant: Variant,
    seed: int,
    train_config: TrainConfig,
    max_len: int,
    valid: pd.DataFrame,
    test: pd.DataFrame,
) -> _Fitted:
    """One network of a TRACE-family run, trained the way the pipeline's training assets train:
    the dataset's examples encoded to shards one user-hash bucket at a time
    (`write_sequence_shards`) in a scratch folder beside its warehouse, then
    ``UserModel.train_on_shards``, then the valid and test embeddings batch by batch from the
    shards. The folder is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="sequence_shards-", dir=dataset.warehouse.paths.tmp_dir) as shards:
        started = time.perf_counter()
        data = write_sequence_shards(
            dataset.connect,
            kind,
            label_columns,
            Path(shards),
            EncoderConfig(max_len=max_len),
            dataset.events_per_bucket,
            train_sample=dataset.train_sample,
        )
        model, result = UserModel.train_on_shards(
            kind,
            data.encoder,
            data.splits["train"],
            data.splits["valid"],
            label_columns,
            model_overrides=variant.overrides,
            train_config=replace(train_config, seed=seed),
        )
        fit_seconds = time.perf_counter() - started
        return _Fitted(
            model,
            result,
            fit_seconds,
            len(data.splits["train"]),
            _embeddings(model, data, "valid", valid),
            _embeddings(model, data, "test", test),
        )


def _embeddings(model: UserModel, data: SequenceShards, split: str, frame: pd.DataFrame) -> np.ndarray:
    """float32 [N, E]: embeddings of the ``split`` examples in the row order of ``frame``, computed
    batch by batch from the shards (which hold them in bucket order)."""
    ids, parts = [np.zeros(0, dtype=str)], [np.zeros((0, model.embedding_dim), dtype=np.float32)]
    for batch, embeddings in model.embed_shards(data.ids(split)):
        ids.append(batch["example_id"].astype(str))
        parts.append(embeddings.numpy())
    order = pd.Index(np.concatenate(ids)).get_indexer(frame["example_id"].astype(str))
    if (order < 0).any():
        raise ValueError(f"{split}: {int((order < 0).sum())} examples have no encoded shard row")
    return np.concatenate(parts)[order]


def run_sequence(
    dataset: ReproductionDataset, variant: Variant, seed: int, train_config: TrainConfig, max_len: int = 128
) -> tuple[pd.DataFrame, dict]:
    """(score rows of the test examples, run info) of one TRACE-family variant and seed."""
    valid, test = _splits(dataset)
    label_columns = [f"label_{t}" for t in dataset.seen]
    fitted = _fit_and_embed(dataset, variant.kind, label_columns, variant, seed, train_config, max_len, valid, test)
    proba = fitted.model.proba_from_embeddings(fitted.emb_test)
    parts = []
    for task, column in zip(dataset.seen, label_columns):
        parts.append(_score_frame(test, task, "seen", proba[column].to_numpy()))
    for task in dataset.unseen:
        scores = _probe_scores(fitted.emb_valid, _labels(valid, task), fitted.emb_test, seed)
        parts.append(_score_frame(test, task, "unseen", scores))
    return pd.concat(parts, ignore_index=True), fitted.info()


SINGLE_TASK = "trace_single_task"


def run_single_task(
    dataset: ReproductionDataset, variant: Variant, seed: int, train_config: TrainConfig, max_len: int = 128
) -> tuple[pd.DataFrame, dict]:
    """`trace_single_task` (the paper's single- vs multi-task question): one TRACE network per seen
    task, each trained on its label alone with the same encoder view, loop and seed. Seen task t
    is scored by network t; the unseen-task probes get the concatenated embeddings (T x E
    dimensions), the most a single-task approach can offer a new task. T times TRACE's cost: it
    runs in the reproduction job only."""
    valid, test = _splits(dataset)
    started = time.perf_counter()
    parts, networks = [], []
    for task in dataset.seen:
        column = f"label_{task}"
        # one label per network: its shards hold that one
        fitted = _fit_and_embed(dataset, "trace", [column], variant, seed, train_config, max_len, valid, test)
        proba = fitted.model.proba_from_embeddings(fitted.emb_test)[column].to_numpy()
        parts.append(_score_frame(test, task, "seen", proba))
        networks.append(fitted)
    fit_seconds = time.perf_counter() - started
    valid_x = np.concatenate([n.emb_valid for n in networks], axis=1)
    test_x = np.concatenate([n.emb_test for n in networks], axis=1)
    for task in dataset.unseen:
        parts.append(_score_frame(test, task, "unseen", _probe_scores(valid_x, _labels(valid, task), test_x, seed)))
    best_epochs = [n.fit.best_epoch for n in networks]
    info = {
        "fit_seconds": fit_seconds,
        "best_epoch": max(best_epochs),  # (the run records' column is an integer)
        "best_epoch_per_task": best_epochs,
        "n_train_examples": networks[-1].n_train_examples,
    }
    return pd.concat(parts, ignore_index=True), info


WIDE_DEEP = "trace_wide_deep"


def run_wide_deep(
    dataset: ReproductionDataset, variant: Variant, seed: int, train_config: TrainConfig, max_len: int = 128
) -> tuple[pd.DataFrame, dict]:
    """`trace_wide_deep`: TRACE as published (the deep part) beside the `st_agg` features (the
    wide part). Two-stage, not joint: the network is trained exactly as `trace` is (same seed:
    the same network); then per task, seen and unseen alike, a logistic regression on
    [TRACE embedding, st_agg features] is fitted on the validation users (the training users'
    embeddings are in-sample) and scored on the test users. Does the sequence add anything to
    the aggregates, or the aggregates to the sequence?"""
    valid, test = _splits(dataset)
    label_columns = [f"label_{t}" for t in dataset.seen]
    fitted = _fit_and_embed(dataset, "trace", label_columns, variant, seed, train_config, max_len, valid, test)
    # one aggregate query for both splits: the valid rows, then the test rows
    _, wide = aggregate_matrix(dataset, "st_agg", pd.concat([valid, test], ignore_index=True))
    x_valid = np.concatenate([fitted.emb_valid, wide[: len(valid)]], axis=1)
    x_test = np.concatenate([fitted.emb_test, wide[len(valid) :]], axis=1)
    parts = [
        _score_frame(test, task, kind, _probe_scores(x_valid, _labels(valid, task), x_test, seed))
        for kind, tasks in (("seen", dataset.seen), ("unseen", dataset.unseen))
        for task in tasks
    ]
    return pd.concat(parts, ignore_index=True), fitted.info()


def sequence_runner(variant: Variant) -> Callable[..., tuple[pd.DataFrame, dict]]:
    """The runner of a TRACE-family variant: `run_sequence` unless its kind has its own (same signature)."""
    return {SINGLE_TASK: run_single_task, WIDE_DEEP: run_wide_deep}.get(variant.kind, run_sequence)


def _score_frame(frame: pd.DataFrame, task: str, kind: str, score: np.ndarray, split: str = "test") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "row_id": frame["example_id"].astype(str).to_numpy(),
            "user_id": frame["user_id"].astype(str).to_numpy(),
            "task": task,
            "task_kind": kind,
            "split": split,
            "y": _labels(frame, task),
            "score": np.asarray(score, dtype=np.float64),
        }
    )


# Non-sequence models of the comparison set (issue 12 item 2, the protocol work): a function
# (dataset, seed) -> (score rows in SCORE_COLUMNS, run info). Filled from the protocol's aggregate
# baselines when they are importable; a name absent here and from model_lib's kinds is not run.
EXTRA_MODELS: dict[str, Callable[[ReproductionDataset, int], tuple[pd.DataFrame, dict]]] = {}


def aggregate_matrix(dataset: ReproductionDataset, kind: str, examples: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(feature names, float32 [N, F]): the pipeline's DuckDB aggregate features (`st_agg` /
    `st_cohort`) of the dataset's examples in the splits of ``examples``, one row per row of it."""
    from assets.trace_models.aggregate_models import aggregate_features

    splits = tuple(dict.fromkeys(examples["split"]))
    with dataset.connect() as con:
        ids, names, features = aggregate_features(con, kind, f"({dataset.examples_sql(splits)})")
    pos = pd.Index(ids.astype(str)).get_indexer(examples["example_id"].astype(str))
    if (pos < 0).any():
        raise ValueError(f"{kind}: {int((pos < 0).sum())} examples have no aggregate features")
    return names, features[pos]


def aggregate_runner(kind: str) -> Callable[[ReproductionDataset, int], tuple[pd.DataFrame, dict]]:
    """`st_agg` / `st_cohort`: the pipeline's DuckDB features of the dataset's warehouse and its
    per-task logistic regressions, with the pipeline's own training settings; unseen tasks by a
    probe on the standardised features (the same protocol as the sequence models)."""

    def run(dataset: ReproductionDataset, seed: int) -> tuple[pd.DataFrame, dict]:
        from assets.trace_models.aggregate_models import AggregateTrainingConfig
        from model_lib.aggregate_baselines import predict as predict_aggregate
        from model_lib.aggregate_baselines import train_aggregate_model

        ex = dataset.examples()
        names, x = aggregate_matrix(dataset, kind, ex)
        label_columns = [f"label_{t}" for t in dataset.seen]
        labels = labels_tensor(ex, label_columns).numpy()
        split = ex["split"].to_numpy()
        train, valid, test = (split == s for s in ("train", "valid", "test"))
        started = time.perf_counter()
        config = AggregateTrainingConfig(seed=seed).train_config()
        model, result = train_aggregate_model(
            kind, names, label_columns, x[train], labels[train], x[valid], labels[valid], config
        )
        fit_seconds = time.perf_counter() - started
        probs, emb = predict_aggregate(model, x)
        test_frame, valid_frame = ex[test].reset_index(drop=True), ex[valid].reset_index(drop=True)
        parts = [_score_frame(test_frame, t, "seen", probs[test, i]) for i, t in enumerate(dataset.seen)]
        for task in dataset.unseen:
            scores = _probe_scores(emb[valid], _labels(valid_frame, task), emb[test], seed)
            parts.append(_score_frame(test_frame, task, "unseen", scores))
        info = {"fit_seconds": fit_seconds, "best_epoch": result.best_epoch, "n_train_examples": int(train.sum())}
        return pd.concat(parts, ignore_index=True), info

    return run


try:  # the protocol's aggregate baselines (branch `protocol`)
    from model_lib.aggregate_baselines import AGGREGATE_KINDS

    EXTRA_MODELS.update({kind: aggregate_runner(kind) for kind in AGGREGATE_KINDS})
except ImportError:  # not merged yet: the report lists them as not run
    pass


# ------------------------------------------------------------------------------- MTLDS family
def funnel_spec_of(dataset: ReproductionDataset) -> FunnelSpec:
    return FUNNELS["travel" if dataset.name == "simulator" else "taobao"]


def funnel_samples(dataset: ReproductionDataset) -> pd.DataFrame:
    """The pipeline's funnel samples of the dataset (`create_funnel_samples`: DuckDB SQL over its
    warehouse, no event in pandas), with the same user split as the examples; one row per sample."""
    with dataset.connect() as con:
        table = create_funnel_samples(con, funnel_spec_of(dataset))
        return con.sql(f"""
            SELECT s.*, u.split FROM {table} s
            JOIN (SELECT DISTINCT user_id, split FROM ({dataset.examples_sql()})) u ON u.user_id = s.user_id
            ORDER BY s.user_id, s.anchor_time, s.item_id""").df()


def run_funnel(
    dataset: ReproductionDataset, samples: pd.DataFrame, variant: Variant, seed: int, train_config: TrainConfig
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """(score rows on test, per-user NDCG rows on valid and test, run info) of one funnel model."""
    spec = funnel_spec_of(dataset)
    frames = {s: samples[samples["split"] == s].reset_index(drop=True) for s in ("train", "valid", "test")}
    data = {s: samples_to_tensors(f, spec) for s, f in frames.items()}
    base = dict(bottom=(64, 32), tower=(16,), embed_dim=8)  # the pipeline's validated defaults
    cfg = MTLDSConfig.from_spec(spec, **{**base, **variant.overrides})
    model = build_funnel_model(variant.kind, cfg, seed=seed)
    started = time.perf_counter()
    result = fit(model, data["train"], data["valid"], replace(train_config, seed=seed))
    fit_seconds = time.perf_counter() - started
    parts, ndcg_parts = [], []
    for split in ("valid", "test"):
        probs, scores = predict(model, data[split])
        labels = data[split]["labels"].numpy()
        frame = frames[split]
        row_id = np.arange(len(frame)).astype(str)
        users = frame["user_id"].astype(str).to_numpy()

        def rows(task, y, s, split=split, row_id=row_id, users=users):
            return pd.DataFrame(
                {
                    "row_id": row_id,
                    "user_id": users,
                    "task": task,
                    "task_kind": "seen",
                    "split": split,
                    "y": y,
                    "score": s,
                }
            )

        depth = funnel_depth(torch.as_tensor(labels[:, : len(cfg.funnel_tasks)])).numpy()
        if split == "test":
            for t, task in enumerate(cfg.tasks):
                parts.append(rows(task, labels[:, t], probs[:, t]))
            last = cfg.funnel_tasks[-1]
            parts.append(rows(f"score_vs_{last}", labels[:, len(cfg.funnel_tasks) - 1], scores))
            for t, task in enumerate(cfg.funnel_tasks):  # the label a chain (ESMM) models: stage t or deeper
                parts.append(rows(f"reach_{task}", (depth >= t + 1).astype(np.float64), probs[:, t]))
        groups, user_index = pd.factorize(frame["user_id"].astype(str))
        values = per_user_ndcg_values(groups, depth, scores)
        ndcg_parts.append(pd.DataFrame({"user_id": np.asarray(user_index), "split": split, "ndcg": values}))
    info = {"fit_seconds": fit_seconds, "best_epoch": result.best_epoch, "n_train_examples": len(frames["train"])}
    weights = getattr(getattr(model, "aggregate", None), "weights", None)  # None unless the model's operator is linear
    if weights is not None:
        info["aggregation_weights"] = [round(float(w), 4) for w in weights.detach()]
    return pd.concat(parts, ignore_index=True), pd.concat(ndcg_parts, ignore_index=True), info


__all__ = [
    "EXTRA_MODELS",
    "SCORE_COLUMNS",
    "Variant",
    "funnel_samples",
    "funnel_spec_of",
    "run_funnel",
    "run_sequence",
    "run_single_task",
    "run_wide_deep",
]
