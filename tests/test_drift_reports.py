"""Drift computation on real Taobao slices, on a deliberately shifted copy, and on embeddings.

`session_features` here is the asset's DuckDB SQL run on an in-memory frame (one implementation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from assets.monitoring.features import session_features_of_frame as session_features
from assets.monitoring.reports import (
    DEFAULT_DRIFT_SHARE_THRESHOLD,
    embedding_drift,
    input_drift,
    prediction_drift,
)

TAOBAO = Path(__file__).resolve().parents[2] / "shared" / "data" / "taobao_userbehavior"
TAOBAO_COLUMNS = ["user_id", "item_id", "category_id", "behavior_type", "timestamp"]
SESSION_GAP_SECONDS = 7200
# Features the shift below does not touch: sessions keep their events and their gaps.
UNSHIFTED_FEATURES = ["n_events", "duration_seconds", "mean_log_gap"]


def load_taobao(name: str) -> pd.DataFrame:
    """Canonical events from a Taobao slice; rows with a missing field (the head's last, truncated
    row) are dropped here, as the real reader would quarantine them."""
    path = TAOBAO / name
    if not path.exists():
        pytest.skip(f"real data not found: {path}")
    raw = pd.read_csv(path, header=None, names=TAOBAO_COLUMNS, dtype=str).dropna()
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].to_numpy(),
            "event_time": pd.to_datetime(raw["timestamp"].astype("int64"), unit="s", utc=True).to_numpy(),
            "event_name": raw["behavior_type"].to_numpy(),
            "item_id": raw["item_id"].to_numpy(),
            "category": raw["category_id"].to_numpy(),
        }
    )


def sessionize(events: pd.DataFrame, gap_seconds: int = SESSION_GAP_SECONDS) -> pd.DataFrame:
    """A small pandas version of the `sessionized_events` columns (docs/ARCHITECTURE.md)."""
    e = events.sort_values(["user_id", "event_time"], kind="stable").reset_index(drop=True)
    gap = e.groupby("user_id")["event_time"].diff().dt.total_seconds()
    new_session = gap.isna() | (gap > gap_seconds)
    e["session_index"] = new_session.astype(int).groupby(e["user_id"]).cumsum().astype(int) - 1
    e["session_id"] = e["user_id"] + ":" + e["session_index"].astype(str)
    e["event_index"] = e.groupby("user_id").cumcount()
    e["event_index_in_session"] = e.groupby("session_id").cumcount()
    e["seconds_since_prev_event"] = gap.fillna(0.0)
    start = e.groupby("session_id")["event_time"].transform("min")
    e["seconds_since_session_start"] = (e["event_time"] - start).dt.total_seconds()
    e["log_seconds_since_prev_event"] = np.log1p(e["seconds_since_prev_event"])
    e["log_seconds_since_session_start"] = np.log1p(e["seconds_since_session_start"])
    e["hour_of_day"] = e["event_time"].dt.hour
    e["day_of_week"] = e["event_time"].dt.dayofweek
    return e


def shifted_copy(events: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Every event 8 hours later, and 30% of page views turned into add-to-carts."""
    shifted = events.copy()
    shifted["event_time"] = shifted["event_time"] + pd.Timedelta(hours=8)
    page_views = np.flatnonzero(shifted["event_name"].to_numpy() == "pv")
    chosen = np.random.default_rng(seed).choice(page_views, size=int(0.3 * len(page_views)), replace=False)
    shifted.loc[chosen, "event_name"] = "cart"
    return shifted


@pytest.fixture(scope="module")
def head_events() -> pd.DataFrame:
    return load_taobao("userbehavior_head.csv.gz")


@pytest.fixture(scope="module")
def head_features(head_events) -> pd.DataFrame:
    return session_features(sessionize(head_events))


@pytest.fixture(scope="module")
def event_names(head_features) -> list[str]:
    return [c.removeprefix("share_") for c in head_features.columns if c.startswith("share_") and c != "share_other"]


def test_session_features_by_hand():
    t0 = pd.Timestamp("2024-01-01 09:00", tz="UTC")  # a Monday
    events = sessionize(
        pd.DataFrame(
            {
                "user_id": ["u"] * 4 + ["v"],
                "event_time": [
                    t0,
                    t0 + pd.Timedelta(seconds=9),
                    t0 + pd.Timedelta(seconds=99),
                    t0 + pd.Timedelta(hours=5),
                    t0,
                ],
                "event_name": ["pv", "pv", "cart", "pv", "buy"],
                "item_id": list("abcde"),
                "category": list("xxyyz"),
                "device": ["ios", "web", "web", None, "ios"],
            }
        )
    )
    features = session_features(events, event_names=["pv", "cart"])
    assert list(features.index) == ["u:0", "u:1", "v:0"]
    assert list(features.columns) == [
        "share_pv",
        "share_cart",
        "share_other",
        "n_events",
        "duration_seconds",
        "mean_log_gap",
        "hour_of_day",
        "day_of_week",
        "main_device",
    ]
    u0 = features.loc["u:0"]
    assert (u0["share_pv"], u0["share_cart"], u0["share_other"]) == pytest.approx((2 / 3, 1 / 3, 0))
    assert (u0["n_events"], u0["duration_seconds"]) == (3, 99)
    assert u0["mean_log_gap"] == pytest.approx((np.log1p(9) + np.log1p(90)) / 2)
    assert (u0["hour_of_day"], u0["day_of_week"]) == (9, 0)
    assert u0["main_device"] == "web"
    assert np.isnan(features.loc["u:1", "mean_log_gap"])  # one event: no inter-event time
    assert pd.isna(features.loc["u:1", "main_device"])  # its only value is missing
    assert features.loc["u:1", "hour_of_day"] == 14
    assert features.loc["v:0", "share_other"] == 1.0  # "buy" is not among the given names
    assert isinstance(features["hour_of_day"].dtype, pd.CategoricalDtype)


def test_tail_vs_head_real_data(head_features, event_names, tmp_path, record_property):
    tail_features = session_features(sessionize(load_taobao("userbehavior_tail.csv.gz")), event_names=event_names)
    result = input_drift(head_features, tail_features, html_path=tmp_path / "tail_vs_head.html")
    record_property("taobao_tail_vs_head_drift_share", result.drift_share)
    print(f"\nTaobao tail vs head: drift share {result.drift_share:.3f}, drifted {result.drifted_columns}")
    print(result.per_column.to_string(index=False))

    assert list(result.per_column["column"]) == list(head_features.columns)
    assert result.drift_share == pytest.approx(len(result.drifted_columns) / len(head_features.columns))
    assert result.dataset_drift == (result.drift_share >= DEFAULT_DRIFT_SHARE_THRESHOLD)
    assert (result.n_reference, result.n_current) == (len(head_features), len(tail_features))
    html = Path(result.report_path).read_text(encoding="utf-8")
    assert "share_pv" in html and "hour_of_day" in html


def test_shifted_copy_is_flagged(head_events, head_features, event_names, record_property):
    current = session_features(sessionize(shifted_copy(head_events)), event_names=event_names)
    result = input_drift(head_features, current)
    record_property("taobao_shifted_drift_share", result.drift_share)
    print(f"\nshifted head vs head: drift share {result.drift_share:.3f}, drifted {result.drifted_columns}")
    assert result.dataset_drift
    assert {"share_pv", "share_cart", "hour_of_day"} <= set(result.drifted_columns)
    assert not set(UNSHIFTED_FEATURES) & set(result.drifted_columns)


def test_identical_data_is_not_flagged(head_features):
    result = input_drift(head_features, head_features.copy())
    assert not result.dataset_drift
    assert result.drift_share == 0 and result.drifted_columns == []


def test_input_drift_rejects_mismatched_columns(head_features):
    with pytest.raises(ValueError, match="only in current"):
        input_drift(head_features, head_features.assign(extra=1.0))


def test_prediction_drift_flags_the_task_whose_scores_moved():
    rng = np.random.default_rng(1)
    reference = {"p_cart": rng.beta(2, 8, 3000), "p_buy": rng.beta(1, 20, 3000)}
    same = {"p_cart": rng.beta(2, 8, 3000), "p_buy": rng.beta(1, 20, 3000)}
    moved = {"p_cart": rng.beta(4, 6, 3000), "p_buy": rng.beta(1, 20, 3000)}
    assert not prediction_drift(reference, same).dataset_drift
    result = prediction_drift(reference, moved)
    assert result.dataset_drift and result.drifted_columns == ["p_cart"]


def test_embedding_drift(tmp_path):
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(300, 8))
    same = embedding_drift(reference, rng.normal(size=(300, 8)))
    moved = embedding_drift(reference, rng.normal(size=(300, 8)) + 0.5, html_path=tmp_path / "emb.html")
    print(f"\nembedding drift (ROC AUC): same {same.drift_score:.3f}, mean-shifted {moved.drift_score:.3f}")
    assert same.method == moved.method == "model"
    assert not same.drift_detected
    assert moved.drift_detected and moved.drift_score > same.drift_score
    assert Path(moved.report_path).stat().st_size > 0


def test_drift_asset_default_threshold_matches_the_drift_functions():
    from assets.monitoring.assets import DEFAULT_DRIFT_SHARE_THRESHOLD as asset_default
    from assets.monitoring.reports import DEFAULT_DRIFT_SHARE_THRESHOLD as function_default

    assert asset_default == function_default


def test_column_verdicts_are_the_reports_verdicts(head_events, head_features, event_names):
    from assets.monitoring.reports import column_verdicts

    shifted = session_features(sessionize(shifted_copy(head_events)), event_names=event_names)
    for current, sample in ((head_features.sample(frac=0.5, random_state=1), 800), (shifted, 3000)):
        reference = head_features.sample(n=sample, random_state=0)  # both sides of Evidently's 1000-row switch
        report = input_drift(reference, current).per_column.set_index("column")
        fast = column_verdicts(reference, current).set_index("column")
        assert fast["drifted"].equals(report["drifted"])
        assert fast["score"].to_numpy() == pytest.approx(report["score"].to_numpy())


def test_session_features_sample_is_bounded_and_repeatable(head_events):
    import duckdb

    from assets.monitoring.features import session_features as sql_session_features

    con = duckdb.connect()
    con.register("events", sessionize(head_events))
    first = sql_session_features(con, "events", event_names=["pv", "cart"], max_sessions=500, seed=3)
    again = sql_session_features(con, "events", event_names=["pv", "cart"], max_sessions=500, seed=3)
    assert len(first) == 500
    assert list(first.index) == list(again.index)  # a re-run on unchanged data compares the same sessions
    other = sql_session_features(con, "events", "s.session_index = 0", event_names=["pv", "cart"], max_sessions=500)
    assert other.index.str.endswith(":0").all()


def test_drift_windows_have_equal_lengths_on_the_cutoff_grid():
    from datetime import datetime, timedelta

    from assets.monitoring.features import drift_windows

    cutoff = datetime(2017, 12, 1)
    windows = drift_windows(cutoff, datetime(2017, 12, 3, 15, 59), timedelta(days=1), timedelta(days=4))
    assert windows.current_end == datetime(2017, 12, 3)  # the partial day is left out: same phase
    assert windows.reference_start == datetime(2017, 11, 29)
    assert windows.compares_hour_of_day and not windows.compares_day_of_week  # two days: different weekdays
    weeks = drift_windows(cutoff, datetime(2017, 12, 16), timedelta(days=7), timedelta(days=14))
    assert weeks.length == timedelta(days=14) and weeks.compares_day_of_week
    with pytest.raises(ValueError, match="less than one cutoff step"):
        drift_windows(cutoff, datetime(2017, 12, 1, 20), timedelta(days=1), timedelta(days=4))
