"""TRACE and its baselines: shapes, masking, positions, class weights, artifacts, determinism."""

import numpy as np
import pandas as pd
import pytest
import torch
from trace_test_data import TASKS, label_examples, sessionize

from model_lib.artifact import load_artifact, save_artifact
from model_lib.embedding_service import UserModel
from model_lib.encoding import EncoderConfig, SequenceEncoder
from model_lib.trace import TRACE, TRACEConfig, class_weights_from_labels, weighted_multitask_bce
from model_lib.trace_baselines import MODEL_KINDS, build_model, encoder_config_for, get_kind, make_config
from model_lib.training import TrainConfig, set_seed

torch.set_num_threads(1)
KINDS = sorted(MODEL_KINDS)


def last_event_recency(encoder, batch):
    """Unstandardised log seconds from each user's most recent event to the cutoff."""
    from model_lib.encoding import TIME_FEATURES

    k = TIME_FEATURES.index("log_seconds_to_cutoff")
    last = batch["mask"].sum(1) - 1
    values = batch["time_features"][torch.arange(len(last)), last.clamp(min=0), k].numpy()
    return values * encoder.time_std[k] + encoder.time_mean[k]


T0 = pd.Timestamp("2026-01-05", tz="UTC")


def random_events(n_users=40, n_events=800, seed=0):
    rng = np.random.default_rng(seed)
    raw = pd.DataFrame(
        {
            "user_id": rng.integers(0, n_users, n_events).astype(str),
            "event_time": T0 + pd.to_timedelta(np.sort(rng.uniform(0, 20 * 86400, n_events)), unit="s"),
            "event_name": rng.choice(
                ["home", "search_results", "property_page", "view_order", "booking_confirmation"], n_events
            ),
            "category": rng.choice(["hotel", "flight", None], n_events),
            "device": rng.choice(["mobile", "desktop"], n_events),
        }
    )
    return sessionize(raw)


@pytest.fixture(scope="module")
def data():
    ev = random_events()
    ex = label_examples(ev, [T0 + pd.Timedelta(days=d) for d in (7, 10, 13)], observation_days=7, horizon_days=7)
    return ev, ex


def fitted(kind, data, max_len=32, **overrides):
    ev, ex = data
    enc = SequenceEncoder(encoder_config_for(kind, EncoderConfig(max_len=max_len))).fit(ev, ex)
    set_seed(0)
    model = build_model(kind, make_config(kind, enc, TASKS, **overrides)).eval()
    return enc, model


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_finite_loss(kind, data):
    ev, ex = data
    enc, model = fitted(kind, data)
    batch = enc.transform(ev, ex.head(6))
    assert model(batch).shape == (6, len(TASKS))
    assert model.embed(batch).shape == (6, 32)
    assert ((model.predict_proba(batch) > 0) & (model.predict_proba(batch) < 1)).all()
    labels = torch.tensor(ex.head(6)[list(TASKS)].to_numpy(np.float32))
    model.train()
    loss = model.loss({**batch, "labels": labels})
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_padding_never_changes_a_result(kind, data):
    """Same examples at max_len 32 and 64 (every history fits in 32): identical outputs; garbage
    in padded slots and other rows of the batch change nothing either."""
    ev, ex = data
    enc, model = fitted(kind, data, max_len=32)
    assert (enc.transform(ev, ex)["mask"].sum(1) < 32).all()
    small = enc.transform(ev, ex)
    wide_enc = SequenceEncoder.from_state_dict(
        {**enc.state_dict(), "config": {**enc.state_dict()["config"], "max_len": 64}}
    )
    wide = wide_enc.transform(ev, ex)
    with torch.no_grad():
        ref = model(small)
        # the network's position tables are sized 32: keep the slots beyond 32 as padding only
        torch.testing.assert_close(model({k: v[:, :32] for k, v in wide.items()}), ref, rtol=0, atol=1e-6)
        garbage = {k: v.clone() for k, v in small.items()}
        pad = ~garbage["mask"]
        garbage["cat_ids"][pad] = 1
        garbage["time_features"][pad] = 7.0
        garbage["event_pos"][pad] = 3
        garbage["session_pos"][pad] = 2
        torch.testing.assert_close(model(garbage), ref, rtol=0, atol=1e-6)
        one = model({k: v[3:4] for k, v in small.items()})
        torch.testing.assert_close(one, ref[3:4], rtol=0, atol=1e-6)


def test_wider_window_with_identical_network_is_identical(data):
    """A network built for max_len 64 gives the same output on 32- and 64-wide encodings."""
    ev, ex = data
    enc64, model = fitted("trace", data, max_len=64)
    enc32 = SequenceEncoder.from_state_dict(
        {**enc64.state_dict(), "config": {**enc64.state_dict()["config"], "max_len": 32}}
    )
    with torch.no_grad():
        torch.testing.assert_close(model(enc32.transform(ev, ex)), model(enc64.transform(ev, ex)), rtol=0, atol=1e-6)


def test_empty_history_gives_a_finite_embedding(data):
    ev, _ = data
    for kind in KINDS:
        enc, model = fitted(kind, data)
        batch = enc.transform(ev, pd.DataFrame({"user_id": ["nobody"], "cutoff": [T0]}))
        assert not batch["mask"].any()
        with torch.no_grad():
            assert torch.isfinite(model.embed(batch)).all(), kind


def test_event_and_session_positions_are_used_only_where_declared(data):
    ev, ex = data
    batch = fitted("trace", data)[0].transform(ev, ex.head(8))
    moved = {**batch, "session_pos": (batch["session_pos"] + 1).clamp(max=31)}
    shifted = {**batch, "event_pos": (batch["event_pos"] + 1).clamp(max=31)}
    with torch.no_grad():
        _, trace = fitted("trace", data)
        assert not torch.allclose(trace(moved), trace(batch))
        assert not torch.allclose(trace(shifted), trace(batch))
        _, no_sessions = fitted("trace", data, use_session_positions=False)
        torch.testing.assert_close(no_sessions(moved), no_sessions(batch))
        assert no_sessions.embedding.session_pos is None and no_sessions.embedding.event_pos is not None
        _, vanilla = fitted("vanilla_transformer", data)
        torch.testing.assert_close(vanilla(moved), vanilla(batch))  # no session positions
        assert not torch.allclose(vanilla(shifted), vanilla(batch))  # sinusoidal event positions
        attrs = {**batch, "cat_ids": batch["cat_ids"].clone()}
        attrs["cat_ids"][..., 1:] = torch.where(batch["mask"][..., None], 1, 0)  # every attribute OOV
        torch.testing.assert_close(vanilla(attrs), vanilla(batch))  # page names only
        assert not torch.allclose(trace(attrs), trace(batch))


def test_class_weights_and_weighted_loss_by_hand():
    labels = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [0.0, 1.0], [0.0, 1.0]])
    # task 0: p = 1/4; task 1: p = 2/3 among the 3 observed labels
    balanced = class_weights_from_labels(labels, "balanced")
    torch.testing.assert_close(balanced, torch.tensor([[0.5 / 0.75, 0.5 / 0.25], [0.5 / (1 / 3), 0.5 / (2 / 3)]]))
    inverse = class_weights_from_labels(labels, "inverse_positive_rate")
    torch.testing.assert_close(inverse, torch.tensor([[1.0, 4.0], [1.0, 1.5]]))
    assert (class_weights_from_labels(labels, "none") == 1).all()
    with pytest.raises(ValueError):
        class_weights_from_labels(labels, "bogus")

    logits = torch.tensor([[0.3, -1.0], [2.0, 55.0], [-0.5, 0.1], [0.0, 0.7]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    task0 = sum(balanced[0, int(y)] * bce(logits[i, 0], labels[i, 0]) for i, y in enumerate(labels[:, 0])) / 4
    task1 = sum(balanced[1, int(labels[i, 1])] * bce(logits[i, 1], labels[i, 1]) for i in (0, 2, 3)) / 3
    torch.testing.assert_close(weighted_multitask_bce(logits, labels, balanced), task0 + task1)


def test_model_stores_class_weights_from_training_labels(data):
    _ev, ex = data
    _enc, model = fitted("trace", data)
    labels = torch.tensor(ex[list(TASKS)].to_numpy(np.float32))
    model.set_class_weights(labels)
    p = np.nanmean(ex[list(TASKS)].to_numpy(), axis=0)
    torch.testing.assert_close(model.class_weights[:, 1], torch.tensor(0.5 / p, dtype=torch.float32))
    assert "class_weights" in model.state_dict()


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_round_trip_gives_identical_outputs(kind, data, tmp_path):
    ev, ex = data
    enc, model = fitted(kind, data)
    model.set_class_weights(torch.tensor(ex[list(TASKS)].to_numpy(np.float32)))
    path = save_artifact(tmp_path / "m.pt", kind, model, enc, metadata={"run_id": "abc", "metrics": {"auroc": 0.7}})
    raw = torch.load(path, weights_only=True)
    assert raw["kind"] == kind and raw["metadata"]["run_id"] == "abc"
    art = load_artifact(path)
    assert art.kind == kind and type(art.model) is type(model) and art.model.config == model.config
    with torch.no_grad():
        assert torch.equal(art.model(art.encoder.transform(ev, ex)), model(enc.transform(ev, ex)))
    assert torch.equal(art.model.class_weights, model.class_weights)
    with pytest.raises(TypeError, match="weights_only"):
        save_artifact(tmp_path / "bad.pt", kind, model, enc, metadata={"when": T0})


def test_user_model_train_is_deterministic_and_serves_consistently(data, tmp_path):
    ev, ex = data
    train, valid = ex.iloc[: len(ex) * 3 // 4], ex.iloc[len(ex) * 3 // 4 :]
    cfg = TrainConfig(epochs=2, batch_size=16, seed=3, num_threads=1)
    runs = [
        UserModel.train("trace", ev, train, valid, TASKS, encoder_config=EncoderConfig(max_len=32), train_config=cfg)
        for _ in range(2)
    ]
    (a, res_a), (b, res_b) = runs
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    assert [h.valid_loss for h in res_a.history] == [h.valid_loss for h in res_b.history]

    emb = a.embed(ev, valid)
    assert emb.shape == (len(valid), 32) and emb.dtype == np.float32
    proba = a.predict_proba(ev, valid)
    assert list(proba.columns) == list(TASKS) and proba.index.equals(valid.index)
    # single-user API == batch API for the same user and moment
    row = valid.iloc[0]
    user_events = ev[ev["user_id"] == row["user_id"]]
    np.testing.assert_allclose(a.embed_user(user_events, as_of=row["cutoff"]), emb[0], rtol=0, atol=1e-6)

    loaded = UserModel.load(a.save(tmp_path / "trace.pt", metadata={"model_version": "1"}))
    np.testing.assert_array_equal(loaded.embed(ev, valid), emb)
    report = a.evaluate(ev, valid)
    assert set(report["metric"]) == {"auroc", "auprc"} and set(report["task"]) == set(TASKS)


def test_registry():
    assert set(MODEL_KINDS) == {"trace", "myopic", "vanilla_transformer", "lstm", "mini_gpt", "myopic_last_page"}
    last_page = encoder_config_for("myopic_last_page", EncoderConfig(max_len=64))
    assert last_page.max_events == 1 and last_page.max_len == 64 and last_page.last_session_only
    assert get_kind("myopic").model_class is TRACE and encoder_config_for("myopic").last_session_only
    assert not encoder_config_for("trace", EncoderConfig(last_session_only=True)).last_session_only
    with pytest.raises(ValueError, match="unknown model kind"):
        get_kind("gpt")
    enc = SequenceEncoder(EncoderConfig(max_len=8))
    enc.columns, enc.fitted = ("event_name",), True
    from model_lib.encoding import Vocabulary

    enc.vocabularies = {"event_name": Vocabulary(["a"])}
    with pytest.raises(ValueError, match="unknown config fields"):
        make_config("lstm", enc, TASKS, n_heads=4)
    with pytest.raises(TypeError):
        build_model("lstm", TRACEConfig())
    cfg = make_config("trace", enc, TASKS, n_layers=2)
    assert cfg.vocab_sizes == (3,) and cfg.max_len == 8 and cfg.n_tasks == 5 and cfg.n_layers == 2
    assert len(build_model("trace", cfg).blocks) == 2


def test_serving_embeds_every_user_as_of_one_moment_as_training_does(data):
    """embed_latest: one cutoff for all users (default 1 s after the frame's latest event), so
    recency is the distance to a common moment, as at a training cutoff; not 1 s for everyone."""
    ev, ex = data
    train, valid = ex.iloc[: len(ex) * 3 // 4], ex.iloc[len(ex) * 3 // 4 :]
    cfg = TrainConfig(epochs=1, batch_size=16, seed=0, num_threads=1)
    model, _ = UserModel.train(
        "trace", ev, train, valid, TASKS, encoder_config=EncoderConfig(max_len=32), train_config=cfg
    )
    served = model.embed_latest(ev).set_index("user_id")
    moment = ev["event_time"].max() + pd.Timedelta(seconds=1)
    users = sorted(ev["user_id"].unique())
    expected = model.embed(ev, pd.DataFrame({"user_id": users, "cutoff": moment}))
    np.testing.assert_allclose(served.loc[users].to_numpy(np.float32), expected, rtol=0, atol=1e-6)
    as_of = moment + pd.Timedelta(days=3)
    later = model.embed_latest(ev, as_of=as_of).set_index("user_id").loc[users].to_numpy(np.float32)
    np.testing.assert_allclose(
        later, model.embed(ev, pd.DataFrame({"user_id": users, "cutoff": as_of})), rtol=0, atol=1e-6
    )
    # the recency each user is served with is its real distance to the moment, not 1 s
    batch = model.encoder.transform(ev, pd.DataFrame({"user_id": users, "cutoff": moment}))
    recency = last_event_recency(model.encoder, batch)
    assert len(np.unique(np.round(recency, 3))) > len(users) // 2
