"""Turning model predictions into the `evaluation_metrics` rows and the markdown report.

The training assets write, per model, a predictions table (one row per example: `example_id`,
`split`, and `p_<task>` for each task the model was trained on) and, for the TRACE family, an
embeddings table (`example_id`, `split`, `embedding`). Everything here is a function of those
tables and the labels, so the numbers in the report can be recomputed from what is on disk.

Seen tasks are scored from the models' own heads. Unseen tasks were never shown to any model:
a logistic-regression probe is fitted on the frozen embeddings of the *validation* users (the
training users' embeddings are in-sample: the network was fitted to them) and scored on the
test users, which is how the TRACE paper measures what a representation generalises to.

Intervals resample test *users* (each user sits at up to `n_cutoffs` examples), paired: both
models of a comparison are scored on the same resampled users (model_lib.metrics).
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
from model_lib.metrics import GroupResampler, SortedScores, auprc, auroc, uplift_pct
from model_lib.mtlds import funnel_depth, per_user_ndcg

TRACE_METRICS = {"auroc": auroc, "auprc": auprc}
BASELINE = "myopic"
UPLIFT_BASELINES = ("myopic", "st_agg")  # every model against each: the papers' baseline, the strongest simple one


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
        pred = pred.set_index("example_id")[[f"p_{t}" for t in tasks]].reindex(labels.index)
        if pred.isna().any().any():
            missing = int(pred.isna().any(axis=1).sum())
            raise ValueError(f"{model}: {missing} test examples have no prediction")
        out[model] = {t: (_labels(labels, f"label_{t}"), pred[f"p_{t}"].to_numpy(float)) for t in tasks}
    return out


def _labels(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A label column as float with NaN for excluded labels (no next session)."""
    return frame[column].astype("Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def probe_scores(
    embeddings: Mapping[str, pd.DataFrame],
    examples: pd.DataFrame,
    tasks: Sequence[str],
    seed: int = 0,
    fit_split: str = "valid",
) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Logistic-regression probes on frozen embeddings: fitted on `fit_split` users (validation:
    out of sample for the network), scored on the test examples in the order of `examples`."""
    ex = examples.set_index("example_id")
    test_ids = ex.index[ex["split"] == "test"]
    out: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for model, emb in embeddings.items():
        emb = emb.set_index("example_id")
        fit_ids = ex.index[ex["split"] == fit_split].intersection(emb.index)
        if not test_ids.isin(emb.index).all():
            raise ValueError(f"{model}: {int((~test_ids.isin(emb.index)).sum())} test examples have no embedding")
        x_fit = np.stack(emb.loc[fit_ids, "embedding"].to_numpy()) if len(fit_ids) else np.zeros((0, 1))
        x_test = np.stack(emb.loc[test_ids, "embedding"].to_numpy())
        out[model] = {}
        for task in tasks:
            y_fit = _labels(ex.loc[fit_ids], f"label_{task}")
            labelled = ~np.isnan(y_fit)  # excluded labels (no next session) are not fitted on
            y_fit = y_fit[labelled].astype(int)
            y_test = _labels(ex.loc[test_ids], f"label_{task}")
            if len(np.unique(y_fit)) < 2:
                score = np.full(len(test_ids), float(y_fit.mean()) if len(y_fit) else 0.5)
            else:
                probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
                score = probe.fit(x_fit[labelled], y_fit).predict_proba(x_test)[:, 1]
            out[model][task] = (y_test, score)
    return out


def user_ids_of_test_split(examples: pd.DataFrame) -> np.ndarray | None:
    """The user of each test example, in the order the score functions use (None: no user_id)."""
    if "user_id" not in examples.columns:
        return None
    return examples.loc[examples["split"] == "test", "user_id"].astype(str).to_numpy()


def metric_rows(scores: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], task_kind: str) -> pd.DataFrame:
    rows = []
    for model, per_task in scores.items():
        for task, (y, s) in per_task.items():
            rows += _metric_rows(model, task, task_kind, y, s, TRACE_METRICS)
    return pd.DataFrame(rows)


BootstrapMetrics = dict[tuple[str, str, str], np.ndarray]


def bootstrap_metrics(
    scores: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    n_boot: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> BootstrapMetrics:
    """{(model, task, metric): [n_boot] values}: every model and task scored on the *same*
    replicates (resampled test users), so any two models can be compared pairwise afterwards
    without scoring again. Cost: n_boot x models x tasks x metrics metric calls."""
    first = next(iter(scores.values()), {})
    if not first:
        return {}
    n = len(next(iter(first.values()))[0])
    weights = list(GroupResampler(groups, n).row_weights(n_boot, seed))
    out = {}
    for model, per_task in scores.items():
        for task, (y, s) in per_task.items():
            ranked = SortedScores(y, s)  # sorted once; each replicate is a weighted sum, O(n)
            for name in TRACE_METRICS:
                score = getattr(ranked, name)
                out[(model, task, name)] = np.array([score(w) for w in weights])
    return out


def _uplift(value, baseline):
    with np.errstate(divide="ignore", invalid="ignore"):
        return 100.0 * (np.asarray(value, float) - baseline) / baseline


def _interval(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def uplift_rows(
    scores: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    task_kind: str,
    baseline: str = BASELINE,
    n_boot: int = 200,
    seed: int = 0,
    groups: np.ndarray | None = None,
    boot: BootstrapMetrics | None = None,
) -> pd.DataFrame:
    """Uplift in % of every model over the baseline, per task and for the mean over tasks (the
    papers' headline, `task` = "mean"), with paired 95% intervals that resample `groups` (the
    test users; rows if None). Pass `boot` (`bootstrap_metrics` of the same scores) to compare
    against several baselines without re-scoring."""
    columns = ["model", "baseline", "task", "task_kind", "metric", "uplift_pct", "ci_low", "ci_high"]
    if baseline not in scores:
        return pd.DataFrame(columns=columns)
    boot = bootstrap_metrics(scores, n_boot, seed, groups) if boot is None else boot
    rows = []
    for model, per_task in scores.items():
        if model == baseline:
            continue
        for name, fn in TRACE_METRICS.items():
            points, base_points = {}, {}
            for task, (y, s) in per_task.items():
                y_base, s_base = scores[baseline][task]
                assert np.array_equal(y, y_base, equal_nan=True), "uplift needs the same examples for both models"
                points[task], base_points[task] = fn(y, s), fn(y, s_base)
                samples = _uplift(boot[(model, task, name)], boot[(baseline, task, name)])
                rows.append(
                    [
                        model,
                        baseline,
                        task,
                        task_kind,
                        name,
                        uplift_pct(points[task], base_points[task]),
                        *_interval(samples),
                    ]
                )
            tasks = list(per_task)
            mean_model = np.nanmean(np.stack([boot[(model, t, name)] for t in tasks]), axis=0)
            mean_base = np.nanmean(np.stack([boot[(baseline, t, name)] for t in tasks]), axis=0)
            point = uplift_pct(float(np.nanmean(list(points.values()))), float(np.nanmean(list(base_points.values()))))
            rows.append([model, baseline, "mean", task_kind, name, point, *_interval(_uplift(mean_model, mean_base))])
    return pd.DataFrame(rows, columns=columns)


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


def _uplift_table(uplifts: pd.DataFrame, with_task: bool) -> str:
    columns = {"model": uplifts["model"], "vs": uplifts["baseline"]}
    if with_task:
        columns["task"] = uplifts["task"]
    columns |= {
        "kind": uplifts["task_kind"],
        "metric": uplifts["metric"],
        "uplift %": uplifts["uplift_pct"].map(lambda v: f"{v:+.2f}"),
        "95% CI": [f"[{lo:+.2f}, {hi:+.2f}]" for lo, hi in zip(uplifts["ci_low"], uplifts["ci_high"])],
    }
    return markdown_table(pd.DataFrame(columns), max_rows=None)


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
        means = uplifts[uplifts["task"] == "mean"]
        per_task = uplifts[uplifts["task"] != "mean"]
        parts += [
            "## Uplift of the mean over tasks, paired user-level bootstrap 95% intervals (%)\n",
            "Intervals resample test users (the same users for both models). An interval that "
            "contains 0 does not resolve the comparison at this data size.\n",
            _uplift_table(means, with_task=False),
            "## Per-task uplift with paired user-level bootstrap 95% intervals (%)\n",
            _uplift_table(per_task, with_task=True),
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
