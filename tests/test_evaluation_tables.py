"""Evaluation tables: metric rows, probes, uplift with intervals, funnel NDCG, the report."""

import re

import numpy as np
import pandas as pd
import pytest

from assets.evaluation.tables import (
    mean_uplift,
    metric_rows,
    probe_scores,
    render_report,
    seen_task_scores,
    uplift_rows,
)


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    n = 1200
    split = np.array(["test", "valid", "train"])[np.arange(n) % 3]
    signal = rng.normal(size=n)
    y = (signal + rng.normal(scale=0.7, size=n) > 0).astype(bool)
    examples = pd.DataFrame({"example_id": [f"e{i}" for i in range(n)], "split": split, "label_a": y, "label_b": ~y})
    good = pd.DataFrame({"example_id": examples.example_id, "p_a": signal, "p_b": -signal})
    noisy = pd.DataFrame(
        {
            "example_id": examples.example_id,
            "p_a": signal + rng.normal(scale=3, size=n),
            "p_b": -signal + rng.normal(scale=3, size=n),
        }
    )
    emb_good = pd.DataFrame(
        {"example_id": examples.example_id, "embedding": list(np.c_[signal, rng.normal(size=(n, 3))])}
    )
    emb_noise = pd.DataFrame({"example_id": examples.example_id, "embedding": list(rng.normal(size=(n, 4)))})
    return examples, {"trace": good, "myopic": noisy}, {"trace": emb_good, "myopic": emb_noise}


def test_seen_scores_and_uplift(data):
    examples, preds, _ = data
    scores = seen_task_scores(preds, examples, ["a", "b"])
    rows = metric_rows(scores, "seen")
    assert set(rows.metric) == {"auroc", "auprc"} and (rows.split == "test").all()
    auc = rows.set_index(["model", "task", "metric"]).value
    assert auc["trace", "a", "auroc"] > auc["myopic", "a", "auroc"] + 0.1
    up = uplift_rows(scores, "seen", n_boot=100)
    assert (up.model == "trace").all() and (up.ci_low <= up.uplift_pct).all() and (up.uplift_pct <= up.ci_high).all()
    assert (up[up.metric == "auroc"].ci_low > 0).all()  # a clearly better model: the whole interval above 0
    mu = mean_uplift(rows).set_index(["model", "task_kind", "metric"])
    assert mu.loc[("trace", "seen", "auroc"), "uplift_pct"] > 0
    assert mu.loc[("myopic", "seen", "auroc"), "uplift_pct"] == pytest.approx(0)


def test_missing_predictions_are_an_error(data):
    examples, preds, _ = data
    with pytest.raises(ValueError, match="no prediction"):
        seen_task_scores({"trace": preds["trace"].iloc[:10]}, examples, ["a"])


def test_probes_find_signal_only_where_the_embedding_has_it(data):
    examples, _, embs = data
    rows = metric_rows(probe_scores(embs, examples, ["a"]), "unseen").set_index(["model", "metric"]).value
    assert rows["trace", "auroc"] > 0.75
    assert abs(rows["myopic", "auroc"] - 0.5) < 0.1


def test_report_has_the_papers_tables(data):
    examples, preds, embs = data
    seen = seen_task_scores(preds, examples, ["a"])
    unseen = probe_scores(embs, examples, ["b"])
    metrics = pd.concat([metric_rows(seen, "seen"), metric_rows(unseen, "unseen")])
    report = render_report(metrics, uplift_rows(seen, "seen", n_boot=20), "synthetic", ["a note"])
    for heading in ("Seen tasks", "Unseen tasks", "Uplift of the mean", "paired user-level bootstrap"):
        assert heading in report
    assert re.search(r"^\| trace +\|", report, re.M) and "a note" in report  # a row of the table
