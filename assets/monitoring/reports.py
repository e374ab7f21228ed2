"""Drift computation with Evidently 0.7: per-session input features, model scores, embeddings.

Pure functions (pandas/numpy in, dataclasses out, HTML reports on disk); the `drift_report` asset
wraps them. Notes on Evidently 0.7.23 that shaped this module:
- `Report([...]).run(current_data=..., reference_data=...)` returns a snapshot; results are read
  from `snapshot.dict()`. There is no dataset-drift boolean: we compare the drifted-column share
  of `DriftedColumnsCount` with our threshold (`drift_share >= threshold`).
- `ValueDrift` reports a score, its method and its threshold, not whether the column drifted;
  with `include_tests=True` each one gets a test whose FAIL status is Evidently's own verdict
  (p-value below, or distance at/above, the threshold), so we never re-implement the rule.
- Per-column methods are Evidently's defaults (`DataDriftPreset` with no method), chosen by the
  reference size: up to 1000 rows, K-S (numerical) and chi-square / Z-test (categorical) p-values
  at 0.05; above that, normed Wasserstein (numerical) and Jensen-Shannon (categorical) distances
  at 0.1. Numerical columns with 5 distinct values or fewer are tested like categorical ones.
- `EmbeddingsDrift` returns only a score; the verdict comes from the same drift method object,
  applied to the same frames (see `embedding_drift`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import EmbeddingsDrift
from evidently.metrics.embeddings import ModelDriftMethod
from evidently.presets import DataDriftPreset
from threadpoolctl import threadpool_limits

#: Share of drifted features at which the inputs count as drifted. Not Evidently's 0.5: our ~10
#: session features form three correlated groups (event mix, session shape, timing), and a real
#: change usually moves one or two of them: e.g. an 8-hour shift of activity plus 30% of page
#: views turned into carts moves 3 of the 10 Taobao features (share_pv, share_cart, hour_of_day).
#: 0.25 flags that and stays at 0 for two samples of users from the same period.
DEFAULT_DRIFT_SHARE_THRESHOLD = 0.25


@dataclass(frozen=True)
class DriftResult:
    """Dataset-level verdict and per-column detail of one drift check."""

    dataset_drift: bool  # drift_share >= threshold
    drift_share: float  # share of drifted columns, from Evidently's DriftedColumnsCount
    threshold: float
    drifted_columns: list[str]
    per_column: pd.DataFrame  # column, column_type, stattest, stattest_threshold, score, drifted
    report_path: str | None
    n_reference: int
    n_current: int
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not tested
    snapshot: Any = field(default=None, repr=False)  # the Evidently snapshot (.dict(), .json())


def _column_kinds(frame: pd.DataFrame, categorical_columns: Sequence[str] | None) -> tuple[list[str], list[str]]:
    if categorical_columns is not None:
        categorical = [c for c in frame.columns if c in set(categorical_columns)]
    else:
        categorical = [
            c
            for c in frame.columns
            if not pd.api.types.is_numeric_dtype(frame[c])
            or isinstance(frame[c].dtype, pd.CategoricalDtype)
            or pd.api.types.is_bool_dtype(frame[c])
        ]
    numerical = [c for c in frame.columns if c not in categorical]
    return numerical, categorical


def _prepare_categorical(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    # Evidently compares categorical values by equality; strings make ints and strings agree.
    frame = frame.copy()
    for column in columns:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    return frame


def _save_html(snapshot: Any, html_path: str | Path | None) -> str | None:
    """Write the Evidently snapshot as HTML (folders created); its path, or None when not asked for."""
    if html_path is None:
        return None
    html_path = Path(html_path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(html_path))
    return str(html_path)


def input_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    threshold: float = DEFAULT_DRIFT_SHARE_THRESHOLD,
    html_path: str | Path | None = None,
    *,
    categorical_columns: Sequence[str] | None = None,
    method: str | None = None,
    per_column_method: Mapping[str, str] | None = None,
) -> DriftResult:
    """Evidently DataDriftPreset on two feature frames (e.g. from `session_features`).

    `threshold` is the share of drifted columns at which the dataset counts as drifted
    (Evidently's `drift_share`; see DEFAULT_DRIFT_SHARE_THRESHOLD). Column kinds: pandas categoricals, strings and
    booleans are categorical, other numbers numerical, unless `categorical_columns` is given.
    `method` / `per_column_method` override Evidently's per-column tests (e.g. "psi", "ks").
    Columns with no value on one side cannot be tested: they are left out and listed in
    `skipped_columns`, never dropped silently.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold is a share of columns in (0, 1], got {threshold}")
    if list(reference.columns) != list(current.columns):
        only_ref = sorted(set(reference.columns) - set(current.columns))
        only_cur = sorted(set(current.columns) - set(reference.columns))
        raise ValueError(
            f"reference and current must have the same columns in the same order "
            f"(only in reference: {only_ref}; only in current: {only_cur})"
        )
    if reference.empty or current.empty:
        raise ValueError(f"empty frame: {len(reference)} reference rows, {len(current)} current rows")

    skipped = {}
    for column in reference.columns:
        for side, frame in (("reference", reference), ("current", current)):
            if frame[column].notna().sum() == 0 and column not in skipped:
                skipped[column] = f"no values in {side}"
    columns = [c for c in reference.columns if c not in skipped]
    if not columns:
        raise ValueError(f"no testable column: {skipped}")
    numerical, categorical = _column_kinds(reference[columns], categorical_columns)
    ref = _prepare_categorical(reference[columns].reset_index(drop=True), categorical)
    cur = _prepare_categorical(current[columns].reset_index(drop=True), categorical)

    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    preset = DataDriftPreset(
        columns=columns,
        drift_share=threshold,
        method=method,
        per_column_method=dict(per_column_method) if per_column_method else None,
    )
    snapshot = Report([preset], include_tests=True).run(
        current_data=Dataset.from_pandas(cur, data_definition=definition),
        reference_data=Dataset.from_pandas(ref, data_definition=definition),
    )
    report = snapshot.dict()
    verdicts = {
        test["metric_config"]["metric_id"]: test["status"] for test in report["tests"] if test.get("id") == "drift"
    }
    rows, drift_share = [], None
    for metric in report["metrics"]:
        config = metric["config"]
        if config["type"].endswith("DriftedColumnsCount"):
            drift_share = float(metric["value"]["share"])
        elif config["type"].endswith("ValueDrift"):
            column = config["column"]
            if metric["id"] not in verdicts:
                raise RuntimeError(f"Evidently returned no drift test for column {column!r}")
            rows.append(
                {
                    "column": column,
                    "column_type": "categorical" if column in categorical else "numerical",
                    "stattest": config.get("method"),
                    "stattest_threshold": config.get("threshold"),
                    "score": float(metric["value"]),
                    "drifted": verdicts[metric["id"]] == "FAIL",
                }
            )
    if drift_share is None:
        raise RuntimeError("Evidently's report has no DriftedColumnsCount")
    per_column = pd.DataFrame(
        rows, columns=["column", "column_type", "stattest", "stattest_threshold", "score", "drifted"]
    )

    report_path = _save_html(snapshot, html_path)
    return DriftResult(
        dataset_drift=drift_share >= threshold,
        drift_share=drift_share,
        threshold=threshold,
        drifted_columns=per_column.loc[per_column["drifted"], "column"].tolist(),
        per_column=per_column,
        report_path=report_path,
        n_reference=len(reference),
        n_current=len(current),
        skipped_columns=skipped,
        snapshot=snapshot,
    )


def column_verdicts(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    categorical_columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-column (column, stattest, score, drifted) from the functions Evidently's report calls.

    The same default test per column as `input_drift` (chosen by Evidently's `get_stattest` from
    the reference size and the number of values), on the same cleaned columns, without building
    the report: ~100x cheaper, which is what lets `bench/drift_calibration.py` run thousands of
    checks. The bench verifies that the verdicts agree with `input_drift`'s on its own data.
    """
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    columns = [c for c in reference.columns if reference[c].notna().any() and current[c].notna().any()]
    _, categorical = _column_kinds(reference[columns], categorical_columns)
    ref = _prepare_categorical(reference[columns], categorical)
    cur = _prepare_categorical(current[columns], categorical)
    rows = []
    for column in columns:
        kind = ColumnType.Categorical if column in categorical else ColumnType.Numerical
        r = ref[column].replace([-np.inf, np.inf], np.nan).dropna()
        c = cur[column].replace([-np.inf, np.inf], np.nan).dropna()
        test = get_stattest(r, c, kind, None)
        result = test(r, c, kind, None)
        rows.append(
            {
                "column": column,
                "stattest": test.name,
                "score": float(result.drift_score),
                "drifted": bool(result.drifted),
            }
        )
    return pd.DataFrame(rows, columns=["column", "stattest", "score", "drifted"])


def _scores_frame(scores: pd.DataFrame | Mapping[str, Any] | np.ndarray) -> pd.DataFrame:
    if isinstance(scores, pd.DataFrame):
        frame = scores
    elif isinstance(scores, Mapping):
        frame = pd.DataFrame({str(k): np.asarray(v, dtype=float).reshape(-1) for k, v in scores.items()})
    else:
        array = np.asarray(scores, dtype=float)
        array = array.reshape(-1, 1) if array.ndim == 1 else array
        frame = pd.DataFrame(array, columns=[f"score_{i}" for i in range(array.shape[1])])
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise ValueError(f"score columns must be numeric: {non_numeric}")
    return frame.astype(float)


def prediction_drift(
    reference_scores: pd.DataFrame | Mapping[str, Any] | np.ndarray,
    current_scores: pd.DataFrame | Mapping[str, Any] | np.ndarray,
    threshold: float | None = None,
    html_path: str | Path | None = None,
    *,
    method: str | None = None,
) -> DriftResult:
    """Drift of model outputs: one numerical column per task probability (e.g. `p_buy`).

    Scores drift before labels arrive, so this is the early warning for the heads. `threshold`
    is again a share of columns; the default (None) flags the check as soon as any task drifts.
    """
    reference, current = _scores_frame(reference_scores), _scores_frame(current_scores)
    effective = threshold if threshold is not None else 1.0 / max(len(reference.columns), 1)
    return input_drift(reference, current, effective, html_path, categorical_columns=[], method=method)


def default_embedding_method(n_reference: int) -> ModelDriftMethod:
    """Evidently's default made explicit: a domain classifier's ROC AUC; with fewer than 1000
    reference rows its threshold is the 95th percentile of random AUCs (bootstrap), else 0.55."""
    return ModelDriftMethod(bootstrap=n_reference < 1000)


def embedding_drift_verdict(
    reference_emb: np.ndarray, current_emb: np.ndarray, drift_method: Any = None
) -> tuple[float, bool]:
    """(score, drifted) of the method `embedding_drift` uses, without the report and its t-SNE:
    the same verdict at a fraction of the cost (bench/drift_calibration.py calls it many times)."""
    reference_emb, current_emb = np.asarray(reference_emb, float), np.asarray(current_emb, float)
    method = drift_method if drift_method is not None else default_embedding_method(len(reference_emb))
    columns = [f"emb_{i}" for i in range(reference_emb.shape[1])]
    score, detected, _ = method(
        pd.DataFrame(current_emb, columns=columns), pd.DataFrame(reference_emb, columns=columns)
    )
    return float(score), bool(detected)


@dataclass(frozen=True)
class EmbeddingDriftResult:
    """Verdict of Evidently's embedding drift method on two sets of embeddings."""

    drift_detected: bool
    drift_score: float  # for the model method: ROC AUC of a reference-vs-current classifier
    method: str  # Evidently's name of the method ("model", "distance", "ratio", "mmd")
    method_config: dict[str, Any]
    report_path: str | None
    n_reference: int
    n_current: int
    snapshot: Any = field(default=None, repr=False)


def embedding_drift(
    reference_emb: np.ndarray,
    current_emb: np.ndarray,
    html_path: str | Path | None = None,
    *,
    drift_method: Any = None,
    openmp_threads: int | None = 1,
) -> EmbeddingDriftResult:
    """Has the distribution of user embeddings moved? Evidently's `EmbeddingsDrift` metric.

    Default method: Evidently's own default made explicit, the model-based (domain classifier)
    method: an SGD logistic classifier learns to tell reference from current rows on half of
    them; its ROC AUC on the other half is the score. With 1000 reference rows or more, drift
    means AUC > 0.55; with fewer, the threshold is the 95th percentile of the AUCs of 100 random
    predictions on the same split (bootstrap), because a small test half makes AUCs noisy.
    Pass any `evidently.metrics.embeddings` method (`DistanceDriftMethod`, `MMDDriftMethod`,
    `RatioDriftMethod`) as `drift_method` to use another.

    `EmbeddingsDrift` keeps only the score, so the verdict is the method's own, computed by
    calling the same method object on the same frames (deterministic: fixed random states).
    Cost: the metric also computes a t-SNE of up to 2500 rows per side for its plot; that, not
    the test, dominates the run time. scikit-learn's t-SNE runs OpenMP threads that spin when the
    cores are busy: on our shared 2-core machine 300 + 300 rows took 11-22 s with the default
    threads and 2.4-3.2 s with one, hence `openmp_threads=1` (None keeps the library default).
    """
    reference_emb, current_emb = np.asarray(reference_emb, float), np.asarray(current_emb, float)
    if reference_emb.ndim != 2 or current_emb.ndim != 2 or reference_emb.shape[1] != current_emb.shape[1]:
        raise ValueError(f"need two 2-D arrays of the same width, got {reference_emb.shape} and {current_emb.shape}")
    if min(len(reference_emb), len(current_emb)) < 4:
        raise ValueError("need at least 4 embeddings on each side")
    method = drift_method if drift_method is not None else default_embedding_method(len(reference_emb))
    columns = [f"emb_{i}" for i in range(reference_emb.shape[1])]
    reference = pd.DataFrame(reference_emb, columns=columns)
    current = pd.DataFrame(current_emb, columns=columns)
    definition = DataDefinition(numerical_columns=columns, embeddings={"embedding": columns})
    with threadpool_limits(limits=openmp_threads, user_api="openmp"):
        snapshot = Report([EmbeddingsDrift(embeddings_name="embedding", drift_method=method)]).run(
            current_data=Dataset.from_pandas(current, data_definition=definition),
            reference_data=Dataset.from_pandas(reference, data_definition=definition),
        )
    (metric,) = snapshot.dict()["metrics"]
    score = float(metric["value"])
    # The methods add a column to the frames they get: hand them copies.
    method_score, detected, method_name = method(current.copy(), reference.copy())
    if not np.isclose(method_score, score, rtol=1e-6, atol=1e-9):
        raise RuntimeError(f"Evidently's score {score} differs from the method's {method_score}")
    report_path = _save_html(snapshot, html_path)
    return EmbeddingDriftResult(
        drift_detected=bool(detected),
        drift_score=score,
        method=method_name,
        method_config={k: v for k, v in metric["config"]["drift_method"].items() if k != "type"},
        report_path=report_path,
        n_reference=len(reference),
        n_current=len(current),
        snapshot=snapshot,
    )
