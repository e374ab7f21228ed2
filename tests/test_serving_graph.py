"""The served network on ONNX Runtime (model_lib/serving_graph.py) computes what PyTorch does.

- The exported graph equals the PyTorch forward at every length from 1 event to ``max_len``,
  for the paper's TRACE and its ablation variants.
- It travels in the artifact; a model loaded and frozen serves raw events on it, with the same
  answers as the PyTorch network (also for an empty history).
- Where it cannot be used (a baseline without a graph, no onnxruntime, a graph that belongs to
  other weights), serving falls back to PyTorch, and says so.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from model_lib import serving_graph
from model_lib.embedding_service import UserModel
from model_lib.encoding import SequenceEncoder
from model_lib.trace_baselines import build_model, make_config
from model_lib.training import set_seed
from tests.trace_test_data import encoder_at_last_events, simulated_raw_events

TASKS = ("label_booking", "label_bounce", "label_purchase")


@pytest.fixture(scope="module")
def raw_events() -> pd.DataFrame:
    return simulated_raw_events(n_users=40, days=28, seed=5)


@pytest.fixture(scope="module")
def encoder(raw_events) -> SequenceEncoder:
    return encoder_at_last_events(raw_events, max_len=48)


def trace_model(encoder: SequenceEncoder, seed: int = 0, kind: str = "trace", **overrides) -> UserModel:
    set_seed(seed)
    network = build_model(kind, make_config(kind, encoder, TASKS, **overrides))
    for p in network.parameters():  # weights far from their initial values, so that a mix-up shows
        p.data.add_(0.3 * torch.randn_like(p))
    return UserModel(kind, network, encoder)


def request(raw: pd.DataFrame, user: str) -> pd.DataFrame:
    frame = raw[raw["user_id"] == user].drop(columns=["source_file", "source_row"], errors="ignore")
    return frame.assign(event_time=pd.to_datetime(frame["event_time"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"))


def numbers(answer: pd.DataFrame) -> np.ndarray:
    return answer.drop(columns=["user_id", "as_of"]).to_numpy(np.float64)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_event_positions": False},
        {"use_session_positions": False, "position_encoding": "sinusoidal"},
        {"n_layers": 2},
    ],
    ids=["paper", "no-event-positions", "sinusoidal-no-sessions", "two-blocks"],
)
def test_the_graph_equals_the_pytorch_forward_at_every_length(encoder, overrides):
    model = trace_model(encoder, **overrides).model.eval()
    graph = serving_graph.export(model)
    assert graph is not None
    max_len = model.config.max_len
    worst = serving_graph.check(serving_graph.ServingSession(graph), model, lengths=range(1, max_len + 1))
    assert worst < 1e-5


def test_a_loaded_model_serves_raw_events_on_the_graph(encoder, raw_events, tmp_path):
    model = trace_model(encoder)
    path = model.save(tmp_path / "model.pt", serving_graph=True)
    assert all(m.training for m in model.model.modules())  # exporting leaves a model in training as it was
    served = UserModel.load(path).freeze()
    assert served.serving_runtime == "onnxruntime"
    on_torch = dataclasses.replace(UserModel.load(path), serving_graph=None).freeze()
    assert on_torch.serving_runtime == "torch"
    sizes = raw_events.groupby("user_id").size().sort_values()
    users = [sizes.index[0], sizes.index[len(sizes) // 2], sizes.index[-1]]  # fewest, median, most events
    assert sizes.iloc[-1] > encoder.config.max_len  # a history longer than the window
    for user in users:
        events = request(raw_events, user)
        got, expected = served.score_events(events), on_torch.score_events(events)
        assert list(got.columns) == list(expected.columns)
        np.testing.assert_allclose(numbers(got), numbers(expected), atol=1e-5)
        # also before the first event: an empty history (one padding slot)
        early = pd.Timestamp(events["event_time"].min()) - pd.Timedelta(days=1)
        np.testing.assert_allclose(
            numbers(served.score_events(events, as_of=early)),
            numbers(on_torch.score_events(events, as_of=early)),
            atol=1e-5,
        )
    # batches of users stay on PyTorch, and agree with the one-user answers
    both = pd.concat([request(raw_events, u) for u in users[:2]])
    np.testing.assert_allclose(
        numbers(served.score_events(both))[0], numbers(served.score_events(request(raw_events, users[0])))[0], atol=1e-5
    )


def test_models_without_a_usable_graph_serve_on_pytorch(encoder, tmp_path, monkeypatch, caplog):
    # a baseline has no graph: saved without one, served on PyTorch
    lstm = trace_model(encoder, kind="lstm")
    assert UserModel.load(lstm.save(tmp_path / "lstm.pt", serving_graph=True)).serving_graph is None
    # a graph exported from other weights is caught by the check on load
    model, other = trace_model(encoder, seed=0), trace_model(encoder, seed=1)
    path = model.save(tmp_path / "model.pt", serving_graph=True)
    mixed = dataclasses.replace(other, serving_graph=UserModel.load(path).serving_graph)
    with caplog.at_level(logging.WARNING, logger="model_lib.embedding_service"):
        assert mixed.freeze().serving_runtime == "torch"
    assert "serving graph not used" in caplog.text and "differs from the model" in caplog.text
    # no onnxruntime in the serving environment
    monkeypatch.setattr(serving_graph, "runtime_available", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model_lib.embedding_service"):
        assert UserModel.load(path).freeze().serving_runtime == "torch"
    assert "onnxruntime is not installed" in caplog.text
