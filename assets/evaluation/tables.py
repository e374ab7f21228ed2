"""Turning model predictions into the `evaluation_metrics` rows and the markdown report.

The training assets write, per model, a predictions table (one row per example: `example_id`,
`split`, and `p_<task>` for each task the model was trained on) and, for the TRACE family, an
embeddings table (`example_id`, `split`, `embedding`). Everything here is a function of those
tables and the labels, so the numbers in the report can be recomputed from what is on disk.

Seen tasks are scored from the models' own heads. Unseen tasks were never shown to any model:
a logistic-regression probe is fitted on the frozen embeddings of the training users and scored
on the test users, which is how the TRACE paper measures what a representation generalises to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from assets.common.metadata import markdown_table
from model_lib.metrics import auprc, auroc, paired_bootstrap_uplift_ci
from model_lib.mtlds import funnel_depth, per_user_ndcg

TRACE_METRICS = {"auroc": auroc, "auprc": auprc}
BASELINE = "myopic"


def _metric_rows(
    model: str,
    task: str,
    kind: str,
    y: np.ndarray,
    score: np.ndarray,
    metrics: Mapping[str, callable],
    split: str = "test",
) -> list[dict]:
    return [
        {"model": model, "task": task, "task_kind": kind, "metric": name, "value": float(fn(y, score)), "split": split}
        for name, fn in metrics.items()
    ]


def seen_task_scores(
    predictions: Mapping[str, pd.DataFrame], examples: pd.DataFrame, tasks: Sequence[str], split: str = "test"
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{model: {task: (labels, scores)}} on the examples of `split`, aligned by example_id."""
    labels = examples.loc[examples["split"] == split].set_index("example_id")
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for model, pred in predictions.items():
        pred = pred.set_index("example_id").reindex(labels.index)
        if pred.isna().any().any():
            missing = int(pred.isna().any(axis=1).sum())
            raise ValueError(f"{model}: {missing} test examples have no prediction")
        out[model] = {t: (labels[f"label_{t}"].to_numpy(float), pred[f"p_{t}"].to_numpy(float)) for t in tasks}
    return out


def probe_scores(
    embeddings: Mapping[str, pd.DataFrame], examples: pd.DataFrame, tasks: Sequence[str], seed: int = 0
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Logistic-regression probes on frozen embeddings: fitted on train users, scored on test users."""
    ex = examples.set_index("example_id")
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for model, emb in embeddings.items():
        emb = emb.set_index("example_id")
        train_ids = ex.index[ex["split"] == "train"].intersection(emb.index)
        test_ids = ex.index[ex["split"] == "test"].intersection(emb.index)
        x_train = np.stack(emb.loc[train_ids, "embedding"].to_numpy())
        x_test = np.stack(emb.loc[test_ids, "embedding"].to_numpy())
        out[model] = {}
        for task in tasks:
            y_train = ex.loc[train_ids, f"label_{task}"].to_numpy(int)
            y_test = ex.loc[test_ids, f"label_{task}"].to_numpy(float)
            if len(np.unique(y_train)) < 2:
                score = np.full(len(test_ids), float(y_train.mean()) if len(y_train) else 0.5)
            else:
                probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
                score = probe.fit(x_train, y_train).predict_proba(x_test)[:, 1]
            out[model][task] = (y_test, score)
    return out


def metric_rows(scores: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], task_kind: str) -> pd.DataFrame:
    rows = []
    for model, per_task in scores.items():
        for task, (y, s) in per_task.items():
            rows += _metric_rows(model, task, task_kind, y, s, TRACE_METRICS)
    return pd.DataFrame(rows)


def uplift_rows(
    scores: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    task_kind: str,
    baseline: str = BASELINE,
    n_boot: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Uplift in % of every model over the baseline per task, with paired bootstrap 95% intervals."""
    if baseline not in scores:
        return pd.DataFrame(columns=["model", "task", "task_kind", "metric", "uplift_pct", "ci_low", "ci_high"])
    rows = []
    for model, per_task in scores.items():
        if model == baseline:
            continue
        for task, (y, s) in per_task.items():
            y_base, s_base = scores[baseline][task]
            assert np.array_equal(y, y_base, equal_nan=True), "uplift needs the same examples for both models"
            for name, fn in TRACE_METRICS.items():
                point, low, high = paired_bootstrap_uplift_ci(fn, y, s, s_base, n_boot=n_boot, seed=seed)
                rows.append(
                    {
                        "model": model,
                        "task": task,
                        "task_kind": task_kind,
                        "metric": name,
                        "uplift_pct": point,
                        "ci_low": low,
                        "ci_high": high,
                    }
                )
    return pd.DataFrame(rows)


def mean_uplift(metrics: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """The papers' headline: uplift of the mean metric over tasks, per model, kind and metric."""
    means = metrics.groupby(["model", "task_kind", "metric"], as_index=False)["value"].mean()
    base = means[means["model"] == baseline].rename(columns={"value": "baseline"}).drop(columns="model")
    out = means.merge(base, on=["task_kind", "metric"], how="left")
    out["uplift_pct"] = 100.0 * (out["value"] - out["baseline"]) / out["baseline"]
    return out


def conversion_metric_rows(
    model: str, predictions: pd.DataFrame, tasks: list[str], funnel_tasks: list[str]
) -> pd.DataFrame:
    """AUC per task and per-user NDCG of the funnel order (model_lib.mtlds.evaluate's definitions)."""
    labels = predictions[[f"label_{t}" for t in tasks]].to_numpy(np.float32)
    rows = [
        {
            "model": model,
            "task": t,
            "task_kind": "seen",
            "metric": "auc",
            "value": auroc(labels[:, i], predictions[f"p_{t}"].to_numpy()),
            "split": "test",
        }
        for i, t in enumerate(tasks)
    ]
    depth = funnel_depth(torch.as_tensor(labels[:, : len(funnel_tasks)])).numpy()
    groups = pd.factorize(predictions["user_id"])[0]
    rows.append(
        {
            "model": model,
            "task": "funnel_order",
            "task_kind": "seen",
            "metric": "ndcg",
            "value": per_user_ndcg(groups, depth, predictions["score"].to_numpy()),
            "split": "test",
        }
    )
    return pd.DataFrame(rows)


def _pivot_markdown(df: pd.DataFrame, metric: str) -> str:
    """Models x tasks of one metric, with a mean column (the papers' table shape)."""
    table = df[df["metric"] == metric].pivot_table(index="model", columns="task", values="value")
    if table.empty:
        return "_no rows_"
    table["mean"] = table.mean(axis=1)
    return markdown_table(table, max_rows=None, index=True, floatfmt=".4f")


def render_report(metrics: pd.DataFrame, uplifts: pd.DataFrame, dataset: str, notes: Sequence[str] = ()) -> str:
    """The markdown report: tables shaped like the papers' (models x tasks, a mean column)."""
    trace = metrics[metrics["metric"].isin(TRACE_METRICS)]
    parts = [f"# Evaluation report: {dataset}\n", *[f"- {n}" for n in notes], ""]
    for kind, title in (
        ("seen", "Seen tasks (trained heads)"),
        ("unseen", "Unseen tasks (probes on frozen embeddings)"),
    ):
        for metric in TRACE_METRICS:
            part = trace[trace["task_kind"] == kind]
            if not part.empty:
                parts += [f"## {title}: {metric.upper()} (test split)\n", _pivot_markdown(part, metric)]
    if not trace.empty:
        mu = mean_uplift(trace)
        mu = mu[mu["model"] != BASELINE]
        parts += [
            "## Uplift of the mean over tasks vs the myopic baseline (%)\n",
            markdown_table(
                pd.DataFrame(
                    {
                        "model": mu["model"],
                        "kind": mu["task_kind"],
                        "metric": mu["metric"],
                        "mean": mu["value"],
                        "myopic mean": mu["baseline"],
                        "uplift %": mu["uplift_pct"].map(lambda v: f"{v:+.2f}"),
                    }
                ),
                max_rows=None,
                floatfmt=".4f",
            ),
        ]
    if not uplifts.empty:
        parts += [
            "## Per-task uplift vs myopic with paired bootstrap 95% intervals (%)\n",
            markdown_table(
                pd.DataFrame(
                    {
                        "model": uplifts["model"],
                        "task": uplifts["task"],
                        "kind": uplifts["task_kind"],
                        "metric": uplifts["metric"],
                        "uplift %": uplifts["uplift_pct"].map(lambda v: f"{v:+.2f}"),
                        "95% CI": [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(uplifts["ci_low"], uplifts["ci_high"])],
                    }
                ),
                max_rows=None,
            ),
        ]
    conv = metrics[metrics["metric"].isin(["auc", "ndcg"])]
    if not conv.empty:
        table = conv.assign(col=conv["task"] + " " + conv["metric"]).pivot_table(
            index="model", columns="col", values="value"
        )
        parts += [
            "## Conversion models (MTLDS family): AUC per task, NDCG of the behaviour order (test split)\n",
            markdown_table(table, max_rows=None, index=True, floatfmt=".4f"),
        ]
    return "\n".join(parts) + "\n"
