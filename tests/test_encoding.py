"""SequenceEncoder: windows before the cutoff, positions, vocabularies, statistics, persistence."""

import numpy as np
import pandas as pd
import pytest
import torch
from trace_test_data import sessionize, tiny_events

from model_lib.encoding import (
    MISSING,
    OOV,
    PAD,
    TIME_FEATURES,
    EncoderConfig,
    SequenceEncoder,
    Vocabulary,
    _as_strings,
    prepare_events,
)

T0 = pd.Timestamp("2026-01-05 08:00", tz="UTC")


def examples(*pairs):
    return pd.DataFrame({"user_id": [u for u, _ in pairs], "cutoff": pd.to_datetime([c for _, c in pairs], utc=True)})


def test_window_is_the_most_recent_events_strictly_before_the_cutoff():
    ev = tiny_events()
    ex = examples(
        ("u1", T0 + pd.Timedelta(hours=5, minutes=1)),  # after the first event of session 1
        ("u1", T0 + pd.Timedelta(days=2)),  # all five events, truncated to max_len=4
        ("u2", T0 + pd.Timedelta(days=2)),
        ("nobody", T0 + pd.Timedelta(days=2)),  # unknown user: no history
        ("u1", T0),  # cutoff equal to the first event: strictly before means nothing
    )
    enc = SequenceEncoder(EncoderConfig(max_len=4))
    t = enc.fit_transform(ev, ex)
    names = enc.vocabularies["event_name"].tokens
    decoded = [[names[int(i) - 2] for i in row[m]] for row, m in zip(t["cat_ids"][..., 0], t["mask"])]
    assert decoded == [
        ["home", "search_results", "property_page"],
        ["search_results", "property_page", "checkout", "view_order"],
        ["home", "help"],
        [],
        [],
    ]
    # left-aligned, chronological, padding on the right
    assert t["mask"].tolist()[0] == [True, True, True, False]
    assert t["event_pos"].tolist()[:3] == [[2, 1, 0, 0], [3, 2, 1, 0], [1, 0, 0, 0]]
    assert t["session_pos"].tolist()[:3] == [[1, 1, 0, 0], [2, 1, 1, 0], [0, 0, 0, 0]]
    assert (t["cat_ids"][~t["mask"]] == PAD).all() and (t["time_features"][~t["mask"]] == 0).all()
    assert t["cat_ids"].dtype == torch.int32 and t["time_features"].shape == (5, 4, len(TIME_FEATURES))


def test_recent_events_keep_their_positions_when_max_len_changes():
    ev = tiny_events()
    ex = examples(("u1", T0 + pd.Timedelta(days=2)), ("u2", T0 + pd.Timedelta(days=2)))
    long = SequenceEncoder(EncoderConfig(max_len=16)).fit(ev, ex).transform(ev, ex)
    short = SequenceEncoder(EncoderConfig(max_len=2)).fit(ev, ex).transform(ev, ex)
    for key in ("event_pos", "session_pos"):
        for i in range(2):
            recent_long = long[key][i][long["mask"][i]][-2:]
            assert torch.equal(short[key][i][short["mask"][i]], recent_long)


def test_session_positions_are_clipped():
    t0 = pd.Timestamp("2026-01-05", tz="UTC")
    raw = pd.DataFrame(
        {"user_id": "u", "event_time": [t0 + pd.Timedelta(hours=3 * i) for i in range(6)], "event_name": "home"}
    )
    ev = sessionize(raw)
    assert ev["session_index"].tolist() == list(range(6))
    t = SequenceEncoder(EncoderConfig(max_len=8, max_sessions=3)).fit_transform(
        ev, examples(("u", t0 + pd.Timedelta(days=1)))
    )
    assert t["session_pos"][0][:6].tolist() == [2, 2, 2, 2, 1, 0]


def test_last_session_only_sees_the_current_session_without_its_gap():
    ev = tiny_events()
    ex = examples(
        ("u1", T0 + pd.Timedelta(hours=5, minutes=5)),
        ("u1", T0 + pd.Timedelta(days=2)),
        ("u2", T0 + pd.Timedelta(days=2)),
    )
    full = SequenceEncoder(EncoderConfig(max_len=8))
    myopic = SequenceEncoder(EncoderConfig(max_len=8, last_session_only=True))
    full.fit(ev, ex)
    myopic.fit(ev, ex)
    t = myopic.transform(ev, ex)
    assert t["mask"].sum(1).tolist() == [2, 1, 2]
    assert (t["session_pos"] == 0).all()
    assert t["event_pos"][0][:2].tolist() == [1, 0]
    # the first event of the window has its gap to the hidden previous session zeroed (raw value 0)
    prev = 0  # index of log_seconds_since_prev_event
    first_raw = t["time_features"][0, 0, prev] * myopic.time_std[prev] + myopic.time_mean[prev]
    assert float(first_raw) == pytest.approx(0.0, abs=1e-5)


def test_vocabularies_come_from_training_windows_only_with_pad_oov_and_missing():
    ev = tiny_events()
    train = examples(("u1", T0 + pd.Timedelta(hours=6)))  # u1's first two sessions only
    enc = SequenceEncoder(EncoderConfig(max_len=8)).fit(ev, train)
    assert enc.columns == ("event_name", "category", "device")
    tokens = set(enc.vocabularies["event_name"].tokens)
    assert tokens == {
        "home",
        "search_results",
        "property_page",
        "checkout",
    }  # no view_order (after cutoff), no help (u2)
    assert MISSING in enc.vocabularies["category"].tokens
    t = enc.transform(ev, examples(("u2", T0 + pd.Timedelta(days=2))))
    ids = t["cat_ids"][0, :2, 0].tolist()
    assert ids[1] == OOV and ids[0] == 2 + enc.vocabularies["event_name"].tokens.index("home")
    assert len(enc.vocabularies["event_name"]) == 4 + 2  # PAD and OOV reserved

    rare = SequenceEncoder(EncoderConfig(max_len=8, min_count=2)).fit(ev, train)
    assert rare.vocabularies["event_name"].tokens == []  # every page seen once
    assert rare.vocabularies["device"].tokens == ["desktop", "mobile"]  # count 2 each, ties by name


def test_time_features_are_standardised_with_training_statistics():
    rng = np.random.default_rng(0)
    t0 = pd.Timestamp("2026-01-05", tz="UTC")
    raw = pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, 600).astype(str),
            "event_time": t0 + pd.to_timedelta(rng.uniform(0, 10 * 86400, 600), unit="s"),
            "event_name": rng.choice(["a", "b", "c"], 600),
        }
    )
    ev = sessionize(raw)
    ex = examples(*[(u, t0 + pd.Timedelta(days=8)) for u in ev["user_id"].unique()])
    enc = SequenceEncoder(EncoderConfig(max_len=64))
    t = enc.fit_transform(ev, ex)
    x = t["time_features"][t["mask"]].double()
    assert torch.allclose(x.mean(0), torch.zeros(len(TIME_FEATURES), dtype=torch.double), atol=1e-4)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(len(TIME_FEATURES), dtype=torch.double), atol=1e-3)
    # the raw log time to the cutoff is exactly ln(1 + seconds)
    k = TIME_FEATURES.index("log_seconds_to_cutoff")
    user0 = ev[ev["user_id"] == ex["user_id"][0]]
    last = user0[user0["event_time"] < ex["cutoff"][0]]["event_time"].max()
    n0 = int(t["mask"][0].sum())
    raw_last = t["time_features"][0, n0 - 1, k] * enc.time_std[k] + enc.time_mean[k]
    assert float(raw_last) == pytest.approx(np.log1p((ex["cutoff"][0] - last).total_seconds()), rel=1e-4)


def test_chunks_prepared_frames_and_row_order_do_not_change_the_result():
    ev = tiny_events()
    ex = examples(
        ("u2", T0 + pd.Timedelta(days=2)), ("u1", T0 + pd.Timedelta(hours=6)), ("u1", T0 + pd.Timedelta(days=2))
    )
    enc = SequenceEncoder(EncoderConfig(max_len=4)).fit(ev, ex)
    ref = enc.transform(ev, ex)
    shuffled_events = ev.sample(frac=1.0, random_state=0)
    for t in (enc.transform(prepare_events(ev), ex, chunk_size=1), enc.transform(shuffled_events, ex)):
        assert all(torch.equal(ref[k], t[k]) for k in ref)


def test_categorical_columns_encode_like_strings_including_repeated_calls():
    """The simulator's columns are pandas Categoricals (with unused categories and nulls)."""
    ev = tiny_events()
    ex = examples(("u1", T0 + pd.Timedelta(days=2)), ("u2", T0 + pd.Timedelta(days=2)))
    cat = ev.copy()
    for c in ("user_id", "event_name", "category", "device"):
        cat[c] = pd.Categorical(cat[c], categories=sorted(set(cat[c].dropna())) + ["never_seen"])
    enc = SequenceEncoder(EncoderConfig(max_len=4)).fit(ev, ex)
    ref = enc.transform(ev, ex)
    for _ in range(2):  # the second call uses the cached category lookup
        t = enc.transform(cat, ex)
        assert all(torch.equal(ref[k], t[k]) for k in ref)
    u2 = cat[cat["user_id"] == "u2"]  # a slice shares the dtype of its frame
    assert torch.equal(enc.transform(u2, ex.iloc[1:])["cat_ids"], ref["cat_ids"][1:])
    fitted_on_categoricals = SequenceEncoder(EncoderConfig(max_len=4)).fit(cat, ex)
    assert fitted_on_categoricals.state_dict()["vocabularies"] == enc.state_dict()["vocabularies"]


@pytest.mark.parametrize("last_session_only", [False, True])
def test_single_user_path_equals_the_batch_path(last_session_only):
    ev = tiny_events()
    u1 = ev[ev["user_id"] == "u1"].sample(frac=1.0, random_state=1)  # any row order
    cutoffs = [T0, T0 + pd.Timedelta(hours=5, minutes=1), T0 + pd.Timedelta(days=2)]
    ex = examples(*[("u1", c) for c in cutoffs])
    enc = SequenceEncoder(EncoderConfig(max_len=4, last_session_only=last_session_only)).fit(ev, ex)
    batch = enc.transform(ev, ex)
    arrays = {c: u1[c].to_numpy() for c in u1.columns}  # `sessionize_user`'s form: no frame
    arrays["event_time"] = u1["event_time"].dt.tz_convert(None).to_numpy()
    for i, cutoff in enumerate(cutoffs):
        one = enc.transform_user(u1, cutoff.tz_convert(None))  # naive means UTC
        assert all(torch.equal(one[k][0], batch[k][i]) for k in batch), cutoff
        one = enc.transform_user(arrays, cutoff)
        assert all(torch.equal(one[k][0], batch[k][i]) for k in batch), cutoff
    assert not enc.transform_user(u1.iloc[:0], cutoffs[-1])["mask"].any()
    assert not enc.transform(ev.iloc[:0], ex)["mask"].any()


def test_vocabulary_ids_of_raw_values_equal_those_of_their_strings():
    """A request's raw values (None, NaN, numbers, numpy strings) get the ids of the strings
    `_as_strings` makes of them, as the batch path looks them up."""
    vocab = Vocabulary(["home", MISSING, "3", "1.5", "True"])
    values = np.array(["home", None, np.nan, pd.NA, pd.NaT, 3, np.int64(3), 1.5, True, np.str_("home"), "x"], object)
    expected = [2, 3, 3, 3, 3, 4, 4, 5, 6, 2, OOV]
    assert vocab.ids(values).tolist() == expected
    assert vocab.ids(_as_strings(pd.Series(values))).tolist() == expected
    assert Vocabulary(["home"]).ids(np.array([None, "home"], object)).tolist() == [OOV, 2]  # no MISSING token


def test_state_dict_round_trip_is_primitive_and_exact():
    ev = tiny_events()
    ex = examples(("u1", T0 + pd.Timedelta(days=2)), ("u2", T0 + pd.Timedelta(days=2)))
    enc = SequenceEncoder(EncoderConfig(max_len=4, categorical_columns=("event_name", "device"))).fit(ev, ex)
    state = enc.state_dict()

    def primitive(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and primitive(x) for k, x in v.items())
        if isinstance(v, list):
            return all(primitive(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))

    assert primitive(state)
    back = SequenceEncoder.from_state_dict(state)
    assert back.columns == ("event_name", "device")
    a, b = enc.transform(ev, ex), back.transform(ev, ex)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clear_errors():
    ev = tiny_events()
    with pytest.raises(ValueError, match="session_index"):
        SequenceEncoder().fit(ev.drop(columns=["session_index"]), examples(("u1", T0)))
    with pytest.raises(ValueError, match="cutoff"):
        SequenceEncoder().fit(ev, pd.DataFrame({"user_id": ["u1"]}))
    with pytest.raises(ValueError, match="not in the events"):
        SequenceEncoder(EncoderConfig(categorical_columns=("event_name", "nope"))).fit(ev, examples(("u1", T0)))
    with pytest.raises(RuntimeError, match="before fit"):
        SequenceEncoder().transform(ev, examples(("u1", T0)))


def test_attribute_allow_list_thresholds_hashing_and_exclusions():
    """Only declared columns become tokens; rare values fall to OOV below their threshold; a
    high-cardinality column is hashed into a fixed table; ids (session ids) never enter."""
    from model_lib.encoding import ATTRIBUTE_ALLOW_LISTS, AttributeRule, attribute_rules_for

    rng = np.random.default_rng(0)
    n = 600
    raw = pd.DataFrame(
        {
            "user_id": rng.integers(0, 30, n).astype(str),
            "event_time": T0 + pd.to_timedelta(np.sort(rng.uniform(0, 5 * 86400, n)), unit="s"),
            "event_name": rng.choice(["pv", "cart", "buy"], n, p=[0.8, 0.15, 0.05]),
            "device": np.where(np.arange(n) < 3, "fridge", rng.choice(["mobile", "desktop"], n)),  # 3 rare values
            "price": rng.uniform(1, 500, n).round(2).astype(str),  # a number: one value per row
            "user_session": [f"s{i}" for i in range(n)],  # an id
        }
    )
    ev = sessionize(raw)
    ex = examples(*[(u, T0 + pd.Timedelta(days=6)) for u in sorted(ev["user_id"].unique())])
    rules = (
        AttributeRule("event_name"),
        AttributeRule("device", min_count=5),
        AttributeRule("price", hash_buckets=64),
        AttributeRule("not_in_this_frame"),  # declared for another source: skipped
    )
    enc = SequenceEncoder(EncoderConfig(max_len=64, attributes=rules)).fit(ev, ex)
    assert enc.columns == ("event_name", "device", "price")  # user_session: not declared, not a token
    assert "fridge" not in enc.vocabularies["device"].tokens  # seen 3 times < 5: OOV
    assert set(enc.vocabularies["device"].tokens) == {"mobile", "desktop"}
    assert len(enc.vocabularies["price"]) == 64 + 2 and enc.vocabularies["price"].tokens == []
    t = enc.transform(ev, ex)
    price_ids = t["cat_ids"][..., 2][t["mask"]]
    assert int(price_ids.min()) >= 2 and int(price_ids.max()) < 66 and len(price_ids.unique()) > 40
    # hashing is stable (md5), and survives the artifact round trip
    clone = SequenceEncoder.from_state_dict(enc.state_dict())
    assert clone.config.attributes == rules
    assert torch.equal(clone.transform(ev, ex)["cat_ids"], t["cat_ids"])
    # defaults per format: identifiers and prices are never tokens; every list has the page name
    for fmt, allow in ATTRIBUTE_ALLOW_LISTS.items():
        columns = {r.column for r in allow}
        assert "event_name" in columns and not columns & {"user_session", "transactionid", "price", "item_id"}, fmt
    assert any(r.hash_buckets for r in attribute_rules_for("taobao"))
    with pytest.raises(ValueError, match="allow-list"):
        attribute_rules_for("nope")
    with pytest.raises(ValueError, match="event_name"):
        SequenceEncoder(EncoderConfig(attributes=(AttributeRule("device"),))).fit(ev, ex)


def test_history_end_stops_the_window_but_recency_counts_to_the_cutoff():
    ev = tiny_events()
    cutoff = T0 + pd.Timedelta(days=2)
    plain = examples(("u1", cutoff))
    cut = plain.assign(history_end=pd.to_datetime([T0 + pd.Timedelta(hours=5, minutes=1)], utc=True))
    enc = SequenceEncoder(EncoderConfig(max_len=8)).fit(ev, plain)
    a, b = enc.transform(ev, plain), enc.transform(ev, cut)
    assert int(a["mask"].sum()) == 5 and int(b["mask"].sum()) == 3  # session 1 from 5:02 on is cut
    recency = TIME_FEATURES.index("log_seconds_to_cutoff")
    raw = b["time_features"][0, 2, recency] * enc.time_std[recency] + enc.time_mean[recency]
    expected = np.log1p((cutoff - (T0 + pd.Timedelta(hours=5))).total_seconds())
    assert float(raw) == pytest.approx(expected, rel=1e-4)
