"""What the registered champions compute from raw events, in process (fast; HTTP: test_serving_http.py).

- `UserModel.score_events`: raw canonical events -> one row per user with the embedding and
  `p_<task>`; equal to the training path (`embed` on SQL-style sessionized events), to the
  sessionized input, and independent of the order of the request's rows.
- `ConversionModel.score_candidates`: a candidate's features equal `build_funnel_samples`'s for
  the same (user, item, time), from raw history; item counts come from the bundled statistics.
- The requirement list of a logged model covers every library its code imports.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from model_lib.conversion_service import ConversionModel, item_statistics
from model_lib.embedding_service import UserModel
from model_lib.funnel_samples import FunnelSpec, build_funnel_samples
from model_lib.mtlds import MTLDSConfig
from model_lib.mtlds_baselines import build_model as build_conversion
from model_lib.sessionize import InvalidEventsError, sessionize
from model_lib.trace_baselines import build_model, make_config
from model_lib.training import set_seed
from tests.trace_test_data import encoder_at_last_events, simulated_raw_events

TASKS = ("label_booking", "label_bounce")


@pytest.fixture(scope="module")
def raw_events() -> pd.DataFrame:
    return simulated_raw_events(n_users=60, days=21, seed=3)


@pytest.fixture(scope="module")
def user_model(raw_events) -> UserModel:
    encoder = encoder_at_last_events(raw_events, max_len=32)
    set_seed(0)
    return UserModel("trace", build_model("trace", make_config("trace", encoder, TASKS)), encoder)


def client_request(raw: pd.DataFrame, users: list[str]) -> pd.DataFrame:
    frame = raw[raw["user_id"].isin(users)].copy()
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return frame.drop(columns=[c for c in ("source_file", "source_row") if c in frame])


def test_raw_events_score_like_the_training_path(user_model, raw_events):
    users = sorted(raw_events["user_id"].unique())[:3]
    request = client_request(raw_events, users)
    served = user_model.score_events(request.sample(frac=1.0, random_state=1))  # any row order
    assert list(served.columns[:3]) == ["user_id", "as_of", "embedding_0"]
    assert [c for c in served.columns if c.startswith("p_")] == ["p_booking", "p_bounce"]
    assert list(served["user_id"]) == users
    # training path: the warehouse-style sessionized frame, embed at each user's last event + 1 s
    events = sessionize(raw_events[raw_events["user_id"].isin(users)])
    last = events.groupby("user_id")["event_time"].max()
    cutoffs = pd.DataFrame({"user_id": last.index, "cutoff": last.to_numpy() + pd.Timedelta(seconds=1)})
    expected = user_model.embed(events, cutoffs)
    np.testing.assert_allclose(served.filter(like="embedding_").to_numpy(), expected, atol=1e-6)
    proba = user_model.proba_from_embeddings(expected)
    np.testing.assert_allclose(served[["p_booking", "p_bounce"]].to_numpy(), proba.to_numpy(), atol=1e-6)
    # one user alone takes the encoder's one-user path: the same numbers
    alone = user_model.score_events(request[request["user_id"] == users[1]])
    np.testing.assert_allclose(alone.filter(like="embedding_").to_numpy()[0], expected[1], atol=1e-6)
    # sessionized input stays accepted and gives the same answer
    again = user_model.score_events(events)
    np.testing.assert_allclose(again.filter(like="embedding_").to_numpy(), expected, atol=1e-6)


def test_as_of_hides_later_events(user_model, raw_events):
    user = sorted(raw_events["user_id"].unique())[0]
    request = client_request(raw_events, [user])
    times = pd.to_datetime(request["event_time"], utc=True)
    middle = times.sort_values().iloc[len(times) // 2]
    cut = user_model.score_events(request, as_of=middle.isoformat())
    earlier = user_model.score_events(request[times < middle], as_of=middle.isoformat())
    pd.testing.assert_frame_equal(cut, earlier)
    assert cut["as_of"].iloc[0] == middle.tz_localize(None)


def test_bad_requests_raise_clear_errors(user_model, raw_events):
    request = client_request(raw_events, sorted(raw_events["user_id"].unique())[:1])
    with pytest.raises(InvalidEventsError, match="never seen in training"):
        user_model.score_events(request.assign(event_name="no_such_page"))
    kept = user_model.score_events(request.assign(event_name="no_such_page"), unknown_event_names="keep")
    assert len(kept) == 1  # batch scoring maps unseen names to the OOV token
    with pytest.raises(InvalidEventsError, match="event_time"):
        user_model.score_events(request.assign(event_time="soon"))
    fewer = user_model.score_events(request.drop(columns=["device", "category"]))  # optional columns
    assert len(fewer) == 1 and np.isfinite(fewer.filter(like="embedding_").to_numpy()).all()
    with pytest.raises(InvalidEventsError, match="user_id"):
        user_model.score_events(request.drop(columns="user_id"))


def _one_user_cases(raw: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Requests of one user, each with something the fast path must get right."""
    user = raw.groupby("user_id", observed=True).size().idxmax()  # longer than max_len, several sessions
    full = client_request(raw, [user]).reset_index(drop=True)
    utc = pd.to_datetime(full["event_time"], utc=True)
    tie = full.head(6).copy()
    tie["event_time"] = tie["event_time"].iloc[0]  # one instant: the request's order decides
    tie["event_name"] = ["home", "search_results", "home", "help", "home", "search_results"]
    return {
        "simulated": full,
        "one event": full.tail(1),
        "out of order": full.sample(frac=1.0, random_state=2),
        "ties in time": tie,
        "attributes absent": full.drop(columns=["device", "category", "destination"]),
        "seconds, Z": full.assign(event_time=utc.dt.strftime("%Y-%m-%dT%H:%M:%SZ")),
        "offsets": full.assign(event_time=utc.dt.tz_convert("Asia/Kolkata").map(pd.Timestamp.isoformat)),
        "epoch seconds": full.assign(event_time=utc.astype("int64") // 10**9),
        "epoch strings": full.assign(event_time=(utc.astype("int64") // 10**9).astype(str)),
        "mixed widths": full.assign(
            event_time=[t.strftime("%Y-%m-%dT%H:%M:%S" + (".%fZ" if i % 2 else "Z")) for i, t in enumerate(utc)]
        ),
        "datetimes": full.assign(event_time=utc),
        "non-string attributes": full.assign(device=np.where(np.arange(len(full)) % 3, full["device"], 7)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "simulated",
        "one event",
        "out of order",
        "ties in time",
        "attributes absent",
        "seconds, Z",
        "offsets",
        "epoch seconds",
        "epoch strings",
        "mixed widths",
        "datetimes",
        "non-string attributes",
    ],
)
def test_one_user_fast_path_equals_the_general_path(user_model, raw_events, case, monkeypatch):
    """A request of one user skips every DataFrame between request and answer (sessionize_user,
    arrays into the encoder): same answer as the multi-user path and as `embed` on `sessionize`."""
    import model_lib.embedding_service as service

    request = _one_user_cases(raw_events)[case]
    other = client_request(raw_events, [sorted(raw_events["user_id"].unique())[0]])
    assert other["user_id"].iloc[0] < request["user_id"].iloc[0]  # the user of interest is row 1 below
    both = pd.concat([other, request], ignore_index=True)
    general = user_model.score_events(both).iloc[[1]].reset_index(drop=True)
    earlier = (general["as_of"].iloc[0] - pd.Timedelta(minutes=30)).isoformat()
    for as_of in (None, earlier):
        expected = general if as_of is None else user_model.score_events(both, as_of=as_of).iloc[[1]]
        with monkeypatch.context() as m:  # the fast path builds no sessionized frame
            m.setattr(service, "sessionize", lambda *a, **k: pytest.fail("the general path was taken"))
            fast = user_model.score_events(request, as_of=as_of)
        pd.testing.assert_frame_equal(fast, expected.reset_index(drop=True), check_exact=False, rtol=0, atol=1e-6)
    # and the training path: `embed` on the sessionized frame (absent attributes: missing) at the last event + 1 s
    events = user_model.as_sessionized(request)
    cutoff = pd.DataFrame({"user_id": events["user_id"].iloc[:1], "cutoff": events["event_time"].max()})
    cutoff["cutoff"] += pd.Timedelta(seconds=1)
    np.testing.assert_allclose(
        general.filter(like="embedding_").to_numpy(), user_model.embed(events, cutoff), atol=1e-6
    )


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("event_time", "soon", "event_time"),
        ("event_time", None, "event_time"),
        ("event_time", "2024-02-30T10:00:00Z", "event_time"),  # the layout of the fast parser, not a date
        ("event_name", None, "event_name"),
        ("event_name", "no_such_page", "never seen in training"),
    ],
)
def test_one_user_fast_path_raises_the_general_errors(user_model, raw_events, column, value, message):
    request = client_request(raw_events, sorted(raw_events["user_id"].unique())[:1]).reset_index(drop=True)
    bad = request.astype(object)
    bad.loc[3, column] = value
    with pytest.raises(InvalidEventsError, match=message) as fast:
        user_model.score_events(bad)
    with pytest.raises(InvalidEventsError, match=message) as general:
        user_model.score_events(pd.concat([bad, bad.iloc[[0]].assign(user_id="zz")]))  # two users: general path
    assert str(fast.value) == str(general.value)


def test_candidate_features_equal_the_training_samples(raw_events):
    spec = FunnelSpec(("property_page", "checkout", "booking_confirmation"), horizon=None, drop_censored=False)
    samples = build_funnel_samples(raw_events, spec)
    model = ConversionModel(
        "mtlds_linear",
        build_conversion("mtlds_linear", MTLDSConfig.from_spec(spec), seed=0),
        spec,
        item_statistics(raw_events, spec),
    )
    picked = samples[samples["user_prior_events"] > 3].groupby("user_id").head(2).head(12)
    assert len(picked) >= 6
    candidates = picked[["user_id", "item_id", "category", "anchor_time"]].reset_index(drop=True)
    history = raw_events.assign(event_time=pd.to_datetime(raw_events["event_time"], utc=True))
    served = model.candidate_samples(history, candidates.assign(anchor_time=candidates["anchor_time"]))
    user_side = [c for c in spec.dense_columns if not c.startswith("item_prior")]
    for column in [*user_side, "user_bucket", "item_bucket", "category_bucket", "hour", "weekday"]:
        np.testing.assert_array_equal(served[column].to_numpy(float), picked[column].to_numpy(float), err_msg=column)
    # item counts: the bundled totals, not the past-only counts of the training samples
    totals = item_statistics(raw_events, spec)["item_prior_views"]
    np.testing.assert_array_equal(served["item_prior_views"], totals.reindex(candidates["item_id"]).to_numpy())


def test_candidates_ranked_from_a_raw_request_survive_a_save(tmp_path, raw_events):
    spec = FunnelSpec(("property_page", "checkout", "booking_confirmation"))
    model = ConversionModel(
        "mtlds_linear",
        build_conversion("mtlds_linear", MTLDSConfig.from_spec(spec), seed=0),
        spec,
        item_statistics(raw_events, spec),
    )
    loaded = ConversionModel.load(model.save(tmp_path / "m.pt"))
    pd.testing.assert_frame_equal(loaded.item_stats, model.item_stats, check_names=False)
    user = raw_events["user_id"].iloc[0]
    history = client_request(raw_events, [user])[["user_id", "event_time", "event_name", "item_id", "category"]]
    items = history.dropna(subset=["item_id"]).drop_duplicates("item_id").tail(3)
    candidates = items.assign(is_candidate=True, event_time=None, event_name=None).astype(object)
    request = pd.concat([history.assign(is_candidate=False).astype(object), candidates])
    ranked = loaded.score_candidates(request)
    assert list(ranked["item_id"]) == list(items["item_id"].astype(str))
    assert list(ranked.columns) == [
        "user_id",
        "item_id",
        "anchor_time",
        "p_checkout",
        "p_booking_confirmation",
        "score",
    ]
    assert ranked[["p_checkout", "p_booking_confirmation"]].stack().between(0, 1).all()
    with pytest.raises(InvalidEventsError, match="candidates"):
        loaded.score_candidates(history)


def test_pinned_requirements_cover_the_imports_of_model_lib():
    from resources.mlflow_tracking import code_paths_for, model_pip_requirements

    code = code_paths_for(["model_lib.embedding_service:UserModel.load"])
    pins = {p.split("==")[0].lower() for p in model_pip_requirements(code)}
    assert {"mlflow", "numpy", "pandas", "torch", "scipy"} <= pins
    assert "dagster" not in pins  # model_lib never imports the workflow


def test_user_batches_keep_each_user_whole_and_lose_no_row():
    import pyarrow as pa

    from assets.serving.scoring import user_batches

    users = np.repeat([f"u{i:02d}" for i in range(12)], np.arange(1, 13))  # 1..12 events per user
    table = pa.table({"user_id": users, "n": np.arange(len(users)), "empty": pa.nulls(len(users), pa.string())})
    reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=7))
    frames = list(user_batches(reader, batch_events=10))
    assert len(frames) > 3
    assert sum(map(len, frames)) == len(users)
    assert np.array_equal(np.concatenate([f["n"].to_numpy() for f in frames]), np.arange(len(users)))
    seen = [set(f["user_id"]) for f in frames]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])  # no user split


def test_item_statistics_sql_equals_the_reference(raw_events):
    """The asset counts item statistics in DuckDB; they are the model_lib reference's counts."""
    from assets.conversion_models.assets import item_statistics_sql

    spec = FunnelSpec(("property_page", "checkout", "booking_confirmation"))
    con = duckdb.connect()
    con.register("events_frame", raw_events)
    by_sql = con.sql(item_statistics_sql(spec, "events_frame")).df().set_index("item_id")
    expected = item_statistics(raw_events, spec)
    assert len(by_sql) > 10 and by_sql["item_prior_booking_confirmation"].sum() > 0
    pd.testing.assert_frame_equal(by_sql, expected, check_dtype=False, check_names=False)


@pytest.mark.parametrize("rows", [0, 1, 3])
def test_answer_frame_from_blocks_equals_the_public_constructor(rows):
    """`score_events`' answer is built from its three blocks; the frame is the one the public
    constructor builds from its columns (dtypes, names, index, values), and stays usable."""
    from model_lib.embedding_service import _answer_columns, _answer_frame, _answer_frame_from_columns

    columns = _answer_columns(4, ("p_a", "p_b"))
    users = np.array([f"u{i}" for i in range(rows)], dtype=object)
    cutoff = (np.datetime64("2025-01-01T00:00:00", "us") + np.arange(rows) * np.timedelta64(90, "s")).astype(
        "datetime64[us]"
    )
    numbers = np.random.default_rng(0).random((rows, 6)).astype(np.float32)
    fast = _answer_frame(columns, users.copy(), cutoff.copy(), numbers.copy())
    public = _answer_frame_from_columns(columns, users, cutoff, numbers)
    pd.testing.assert_frame_equal(fast, public, check_exact=True)
    assert list(fast.dtypes.astype(str)) == ["object", "datetime64[us]"] + ["float32"] * 6
    assert fast.to_json(orient="records") == public.to_json(orient="records")
    pd.testing.assert_frame_equal(pd.concat([fast, fast]), pd.concat([public, public]))
    fast.loc[:, "p_a"] = 0.5  # its own memory: writable, nothing else changes
    assert (fast["p_a"] == 0.5).all() and np.array_equal(public["p_a"].to_numpy(), numbers[:, 4])


def test_answer_without_pandas_block_api_is_the_same(user_model, raw_events, monkeypatch):
    """With another pandas' internals (no block API), the answer goes through the public constructor."""
    import model_lib.embedding_service as service

    request = client_request(raw_events, sorted(raw_events["user_id"].unique())[:1])
    fast = user_model.score_events(request)
    monkeypatch.setattr(service, "_make_block", None)
    pd.testing.assert_frame_equal(user_model.score_events(request), fast, check_exact=True)


def test_a_request_after_training_mode_is_scored_in_eval_mode(user_model, raw_events):
    """`_eval_mode` keeps the network's module list: a network (or one of its blocks) put back in
    training mode between requests is scored in eval mode again (no dropout: the same answer)."""
    request = client_request(raw_events, sorted(raw_events["user_id"].unique())[:1])
    first = user_model.score_events(request)
    for module in (user_model.model, user_model.model.blocks[0]):
        module.train()
        pd.testing.assert_frame_equal(user_model.score_events(request), first, check_exact=True)
        assert not any(m.training for m in user_model.model.modules())
