"""Tasks as data and the rolling-cutoff examples: labels on a hand-made journey, splits, validation."""

import dataclasses
import hashlib
import json
from datetime import datetime, timedelta

import duckdb
import pandas as pd
import pytest

from assets.training_data.examples_sql import (
    NO_NEXT_SESSION,
    cutoff_times,
    label_balance,
    training_examples_sql,
    user_split_bucket_sql,
    user_splits_sql,
)
from assets.training_data.tasks import (
    DEFAULT_TASK_SETS,
    SIMULATOR_TASKS,
    EngagementTask,
    TaskSet,
    default_task_set,
    load_task_set,
)

T0 = datetime(2026, 3, 2)  # a Monday


def _sessionized(rows: list[tuple[str, float, str, str | None]]) -> pd.DataFrame:
    """(user, hours after T0, event_name, category) -> the sessionized columns the SQL reads."""
    df = pd.DataFrame(rows, columns=["user_id", "hours", "event_name", "category"])
    df["event_time"] = [T0 + timedelta(hours=h) for h in df.hours]
    df["item_id"] = df.category.map(lambda c: None if c is None else f"item_{c}")
    df = df.sort_values(["user_id", "event_time"]).reset_index(drop=True)
    gap = df.groupby("user_id").event_time.diff().dt.total_seconds()
    df["session_index"] = (gap > 7200).astype(int).groupby(df.user_id).cumsum()
    df["session_id"] = df.user_id + ":" + df.session_index.astype(str)
    return df.drop(columns="hours")


TASKS = TaskSet(
    name="hand",
    horizon=timedelta(days=2),
    observation=timedelta(days=3),
    n_cutoffs=2,
    cutoff_step=timedelta(days=1),
    tasks=(
        EngagementTask("buy_2d", "seen", "bool_or(event_name = 'buy')"),
        EngagementTask("bounce_next", "seen", "count(*) = 1", "next_session"),
        EngagementTask("search_next", "seen", "bool_or(event_name = 'search')", "next_session"),
        EngagementTask("buy_known_category", "unseen", "bool_or(event_name = 'buy' AND category_seen_before)"),
        EngagementTask("several_sessions", "unseen", "count(DISTINCT session_id) >= 2"),
    ),
)


@pytest.fixture()
def con():
    events = _sessionized(
        [
            # alice: data ends at hour 120, so the cutoffs are hours 72 and 48 (days 3 and 2, 00:00)
            ("alice", 1, "view", "shoes"),
            ("alice", 1.2, "view", "hats"),
            ("alice", 50, "view", "shoes"),
            ("alice", 74, "view", "bags"),
            ("alice", 80, "search", None),
            ("alice", 80.1, "buy", "shoes"),
            ("alice", 120, "buy", "bags"),  # at cutoff + horizon: outside every label window
            # bob: last active 78 hours before the first cutoff, beyond the 3-day observation window
            ("bob", -30, "view", "hats"),
            ("bob", 100, "view", "hats"),
            # carol: a single event just before the later cutoff, nothing after
            ("carol", 71, "view", "toys"),
        ]
    )
    c = duckdb.connect()
    c.register("sessionized_events", events)
    c.execute(f"CREATE TABLE user_splits AS {user_splits_sql(0, 0.2, 0.2)}")
    yield c
    c.close()


def _examples(con):
    return con.sql(training_examples_sql(TASKS, cutoff_times(con, TASKS))).df().set_index("example_id")


def test_cutoffs_leave_a_full_label_window(con):
    assert cutoff_times(con, TASKS) == [datetime(2026, 3, 5), datetime(2026, 3, 4)]


def test_labels_on_a_hand_made_journey(con):
    ex = _examples(con)
    a1 = ex.loc["alice@2026-03-04T00:00:00"]  # history: hours 1, 1.2; window [48, 96)
    assert a1.n_history_events == 2 and a1.n_history_sessions == 1
    assert a1.label_buy_2d  # hour 80.1
    assert a1.label_bounce_next and not a1.label_search_next  # next session: hour 50, one page
    assert a1.label_buy_known_category  # shoes seen at hour 1
    assert a1.label_several_sessions  # sessions at 50, 74, 80
    a2 = ex.loc["alice@2026-03-05T00:00:00"]  # history: hours 1, 1.2, 50; window [72, 120)
    assert a2.n_history_events == 3 and a2.n_history_sessions == 2
    assert a2.label_buy_2d and a2.label_bounce_next and not a2.label_search_next
    assert a2.label_buy_known_category and a2.label_several_sessions
    c2 = ex.loc["carol@2026-03-05T00:00:00"]
    assert not (c2.label_buy_2d or c2.label_several_sessions)  # no future: horizon labels are false
    assert pd.isna(c2.label_bounce_next) and pd.isna(c2.label_search_next)  # no next session: excluded
    assert "carol@2026-03-04T00:00:00" not in ex.index  # no history yet
    assert not ex.user_id.eq("bob").any()  # inactive in both observation windows
    assert len(ex) == 3


def test_a_buy_in_a_category_first_seen_after_the_cutoff_is_not_known():
    events = _sessionized(
        [("dan", 1, "view", "a"), ("dan", 50, "view", "b"), ("dan", 60, "buy", "b"), ("dan", 120, "view", "a")]
    )
    c = duckdb.connect()
    c.register("sessionized_events", events)
    c.execute(f"CREATE TABLE user_splits AS {user_splits_sql(0, 0.2, 0.2)}")
    ex = c.sql(training_examples_sql(TASKS, [datetime(2026, 3, 4)])).df()
    assert ex.label_buy_2d.item() and not ex.label_buy_known_category.item()


def test_history_never_includes_the_cutoff_or_later(con):
    ex = _examples(con)
    assert (ex.seconds_since_last_event > 0).all()


def test_splits_are_per_user_and_match_their_python_twin(con):
    splits = con.sql("SELECT * FROM user_splits").df()
    assert splits.user_id.is_unique
    for uid, split in zip(splits.user_id, splits.split):
        bucket = int(hashlib.md5(f"{uid}:0".encode()).hexdigest()[:8], 16) % 10000
        expected = "test" if bucket < 2000 else "valid" if bucket < 4000 else "train"
        assert split == expected
    ex = _examples(con)
    assert ex.groupby("user_id").split.nunique().max() == 1


def test_split_shares_on_many_users():
    c = duckdb.connect()
    c.register("sessionized_events", pd.DataFrame({"user_id": [f"u{i}" for i in range(20000)]}))
    shares = c.sql(f"SELECT split, count(*) / 20000 AS share FROM ({user_splits_sql(7, 0.15, 0.15)}) GROUP BY 1").df()
    shares = dict(zip(shares.split, shares.share))
    assert abs(shares["test"] - 0.15) < 0.01 and abs(shares["valid"] - 0.15) < 0.01
    assert "md5" in user_split_bucket_sql("user_id", 7)


def test_label_balance_table(con):
    """The SQL GROUP BY agrees with counting the examples in pandas, excluded labels included."""
    ex = _examples(con).reset_index()
    con.register("examples_frame", ex)
    balance = label_balance(con, "examples_frame", TASKS)
    assert set(balance.task) == {t.name for t in TASKS.tasks}
    assert len(balance) == len(TASKS.tasks) * 3  # every split, even an empty one
    total = balance.groupby("task").examples.sum()
    assert (total == len(ex)).all()
    for row in balance.itertuples():
        task = next(t for t in TASKS.tasks if t.name == row.task)
        labels = ex.loc[ex["split"] == row.split, task.column]
        assert row.examples == len(labels) and row.labelled == labels.notna().sum()
        assert row.positives == labels.dropna().astype(bool).sum()
        if labels.notna().any():
            assert row.positive_rate == pytest.approx(labels.dropna().astype(float).mean())


def test_every_default_task_set_is_valid_sql_on_its_columns():
    events = _sessionized([("u", 1, "view", "a"), ("u", 30, "buy", "a"), ("u", 60, "view", "b")])
    c = duckdb.connect()
    c.register("sessionized_events", events)
    c.execute(f"CREATE TABLE user_splits AS {user_splits_sql(0, 0.2, 0.2)}")
    for name, task_set in DEFAULT_TASK_SETS.items():
        assert len(task_set.seen) == 5 and len(task_set.unseen) >= 3, name
        c.sql(training_examples_sql(task_set, [T0 + timedelta(hours=20)])).df()  # raises on bad SQL


def test_task_declarations_are_validated():
    with pytest.raises(ValueError, match="snake_case"):
        EngagementTask("Bad Name", "seen", "count(*) > 0")
    with pytest.raises(ValueError, match="kind"):
        EngagementTask("x", "maybe", "count(*) > 0")
    with pytest.raises(ValueError, match="single expression"):
        EngagementTask("x", "seen", "true; DROP TABLE raw_events")
    with pytest.raises(ValueError, match="unseen"):
        TaskSet("s", (EngagementTask("x", "seen", "true"),), timedelta(days=1), timedelta(days=1))
    with pytest.raises(ValueError, match="no default tasks"):
        default_task_set("nope")


def test_task_set_json_round_trip(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(TASKS.to_json())
    assert load_task_set(path) == TASKS
    assert json.loads(path.read_text())["horizon"] == 2 * 86400


def _straddling_journey() -> pd.DataFrame:
    """erin: a session (hours 47 to 49) in progress at the cutoff (hour 48); frank: no return."""
    return _sessionized(
        [
            ("erin", 10, "view", "shoes"),  # session 0: history
            ("erin", 47, "view", "hats"),  # session 1 starts before the cutoff ...
            ("erin", 47.5, "search", None),
            ("erin", 48.5, "buy", "hats"),  # ... and goes on after it: neither side
            ("erin", 49, "view", "hats"),
            ("erin", 60, "view", "bags"),  # session 2: the next session, a single page
            ("erin", 70, "view", "bags"),  # session 3
            ("frank", 20, "view", "toys"),  # history, then nothing
        ]
    )


def test_a_session_in_progress_at_the_cutoff_is_neither_history_nor_label():
    c = duckdb.connect()
    c.register("sessionized_events", _straddling_journey())
    c.execute(f"CREATE TABLE user_splits AS {user_splits_sql(0, 0.2, 0.2)}")
    ex = c.sql(training_examples_sql(TASKS, [datetime(2026, 3, 4)])).df().set_index("user_id")
    erin = ex.loc["erin"]
    assert erin.cutoff == datetime(2026, 3, 4)  # the cutoff stays where it is ...
    assert erin.history_end == T0 + timedelta(hours=47)  # ... the history stops where the session began
    assert erin.n_history_events == 1 and erin.n_history_sessions == 1
    assert erin.seconds_since_last_event == 38 * 3600  # recency to the cutoff, from hour 10
    assert not erin.label_buy_2d  # the buy at hour 48.5 is in the straddling session: not a label
    assert erin.label_bounce_next and not erin.label_search_next  # the next session is hour 60's
    assert not erin.label_buy_known_category  # hats were first seen in the straddling session
    frank = ex.loc["frank"]
    assert frank.history_end == frank.cutoff and not frank.label_buy_2d
    assert pd.isna(frank.label_bounce_next) and NO_NEXT_SESSION is None


def test_the_test_helper_follows_the_same_two_rules_as_the_pipeline():
    """tests/trace_test_data.label_examples (pandas) == training_examples_sql (DuckDB) on the same
    hand-made journey, for the simulator's seen tasks."""
    from trace_test_data import TASKS as HELPER_TASKS
    from trace_test_data import label_examples, sessionize

    t0 = pd.Timestamp("2026-03-02", tz="UTC")
    hours = [
        ("erin", 10, "home"),
        ("erin", 47, "search_results"),
        ("erin", 48.5, "booking_confirmation"),  # straddling session: neither side
        ("erin", 60, "property_page"),
        ("erin", 60.2, "view_order"),
        ("frank", 20, "home"),  # no next session: excluded next-session labels
        ("gina", 30, "search_results"),
        ("gina", 100, "booking_confirmation"),  # a single-page next session
    ]
    raw = pd.DataFrame(
        [(u, t0 + pd.Timedelta(hours=h), page) for u, h, page in hours], columns=["user_id", "event_time", "event_name"]
    )
    raw["category"], raw["item_id"] = None, None
    events = sessionize(raw)
    cutoff = t0 + pd.Timedelta(hours=48)
    helper = label_examples(events, [cutoff]).set_index("user_id").sort_index()
    c = duckdb.connect()
    c.register("sessionized_events", events.assign(event_time=events["event_time"].dt.tz_localize(None)))
    c.execute(f"CREATE TABLE user_splits AS {user_splits_sql(0, 0.2, 0.2)}")
    sql = c.sql(training_examples_sql(SIMULATOR_TASKS, [cutoff.tz_localize(None).to_pydatetime()])).df()
    sql = sql.set_index("user_id").sort_index()
    assert list(sql.index) == list(helper.index) == ["erin", "frank", "gina"]
    for task in HELPER_TASKS:
        expected = helper[task].to_numpy()
        got = sql[f"label_{task}"].astype("Float64").to_numpy(dtype=float, na_value=float("nan"))
        assert ((expected == got) | (pd.isna(expected) & pd.isna(got))).all(), (task, expected, got)
    assert (helper["history_end"].dt.tz_localize(None) == sql["history_end"]).all()
    assert helper.loc["erin", "booking_14d"] == 0 and pd.isna(helper.loc["frank", "search_next_session"])


def test_training_examples_built_by_user_bucket_equal_the_whole_build(tmp_path):
    """At scale the table is built one user-hash bucket at a time (DuckDB's working set bounded by
    config), from each bucket's events staged once with only the columns the build reads: it must
    be the same table, row for row, in the same order, also for a label on a column the default
    tasks do not read."""
    from assets.training_data.examples_sql import bucketed_training_examples_sql, example_event_columns
    from resources.event_sources.simulator import SimulatorConfig, simulate_events
    from tests.trace_test_data import sessionize

    events = sessionize(simulate_events(SimulatorConfig(n_users=120, days=35, seed=0)))
    c = duckdb.connect()
    c.execute("SET TimeZone = 'UTC'")
    c.register("sessionized_frame", events.assign(event_time=events["event_time"].dt.tz_localize(None)))
    c.execute("CREATE TABLE sessionized_events AS SELECT * FROM sessionized_frame")
    c.execute(f"CREATE TABLE user_splits AS {user_splits_sql(0, 0.2, 0.2)}")
    on_device = EngagementTask("app_14d", "unseen", "bool_or(\"Device\" = 'app')")
    with_device = dataclasses.replace(SIMULATOR_TASKS, tasks=(*SIMULATOR_TASKS.tasks, on_device))
    assert "device" in example_event_columns(c, with_device)
    assert "device" not in example_event_columns(c, SIMULATOR_TASKS)
    staging = tmp_path / "staging"
    for tasks in (SIMULATOR_TASKS, with_device):  # the second build reuses the staging folder
        cutoffs = cutoff_times(c, tasks)
        whole = c.sql(training_examples_sql(tasks, cutoffs)).df()
        bucketed = c.sql(bucketed_training_examples_sql(c, tasks, cutoffs, 4, staging)).df()
        assert len(list(staging.glob("bucket-*.parquet"))) == 4
        assert len(whole) > 100
        pd.testing.assert_frame_equal(bucketed, whole)
    assert whole["label_app_14d"].any() and not whole["label_app_14d"].all()
