"""The DuckDB SQL funnel samples equal the pandas reference (`model_lib.funnel_samples`) row for row."""

from dataclasses import replace

import duckdb
import numpy as np
import pandas as pd
import pytest

from assets.training_data.funnel_sql import create_funnel_samples
from model_lib.funnel_samples import FUNNELS, build_funnel_samples
from tests.helpers import TAOBAO_FILES


def random_events(n=4000, seed=0):
    """Second-resolution times (ties on purpose), null categories and items, all four behaviours."""
    rng = np.random.default_rng(seed)
    events = pd.DataFrame(
        {
            "user_id": rng.integers(0, 40, n).astype(str),
            "event_time": pd.Timestamp("2020-01-01", tz="UTC")
            + pd.to_timedelta(rng.integers(0, 4 * 86400, n) // 600 * 600, unit="s"),
            "event_name": rng.choice(["pv", "cart", "buy", "fav"], n, p=[0.7, 0.15, 0.1, 0.05]),
            "item_id": rng.integers(0, 50, n).astype(str),
            "category": rng.integers(0, 5, n).astype(str),
        }
    )
    events.loc[rng.random(n) < 0.05, "category"] = None
    events.loc[rng.random(n) < 0.03, "item_id"] = None
    return with_event_index(events)


def with_event_index(events):
    """The sessionized order: (user, time) with a per-user event_index, as `sessionized_events` has."""
    events = events.sort_values(["user_id", "event_time"], kind="stable").reset_index(drop=True)
    return events.assign(event_index=events.groupby("user_id").cumcount())


def sql_samples(events, spec):
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.register("events_frame", events)
    table = create_funnel_samples(con, spec, events="events_frame")
    return con.sql(f"SELECT * FROM {table}").df()


def assert_same_samples(expected, got):
    assert list(got.columns) == list(expected.columns)
    got = got.assign(anchor_time=pd.to_datetime(got["anchor_time"], utc=True))
    expected = expected.assign(category=expected["category"].astype(object).where(expected["category"].notna(), None))
    got = got.assign(category=got["category"].astype(object).where(got["category"].notna(), None))
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=False, rtol=1e-9)


@pytest.mark.parametrize(
    "horizon,drop_censored",
    [(pd.Timedelta(hours=12), False), (pd.Timedelta(days=2), True), (None, False)],
)
def test_sql_equals_pandas_on_random_events(horizon, drop_censored):
    spec = replace(FUNNELS["taobao"], horizon=horizon, drop_censored=drop_censored)
    events = random_events(seed=3)
    expected = build_funnel_samples(events, spec)
    assert len(expected) > 500 and expected["label_cart"].sum() > 0
    assert_same_samples(expected, sql_samples(events, spec))


def test_sql_equals_pandas_on_a_real_taobao_slice():
    raw = pd.read_csv(
        TAOBAO_FILES[1], header=None, names=["user_id", "item_id", "category", "event_name", "ts"], dtype=str
    )
    events = with_event_index(raw.assign(event_time=pd.to_datetime(raw.pop("ts").astype(int), unit="s", utc=True)))
    spec = FUNNELS["taobao"]
    expected = build_funnel_samples(events, spec)
    assert len(expected) > 1000
    assert_same_samples(expected, sql_samples(events, spec))


def test_funnel_examples_reports_the_label_rate_per_split(home):
    """The asset's `label_rate_per_split` table: each split's mean of every label, as pandas renders
    the same query's frame (the asset reads its three rows with fetchall, not a pandas load)."""
    import dagster as dg

    from assets.training_data.assets import funnel_examples, funnel_spec_for, user_splits
    from tests.helpers import materialize_pipeline, pipeline_resources, query

    resources = pipeline_resources(home, simulator_n_users=60)
    assert materialize_pipeline(resources).success
    result = dg.materialize(
        [user_splits, funnel_examples], resources=resources, selection=[user_splits, funnel_examples]
    )
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("funnel_examples")]
    table = event.materialization.metadata["label_rate_per_split"].value
    labels = funnel_spec_for(resources["event_source"]).label_columns
    means = ", ".join(f"round(avg({c}), 4) AS {c}" for c in labels)
    expected = query(home, f"SELECT split, {means} FROM funnel_examples GROUP BY split ORDER BY split")
    assert len(expected) == 3 and table == expected.to_markdown(index=False)
