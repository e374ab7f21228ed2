"""TRACE's one-user inference as an ONNX graph, run by ONNX Runtime when a registered model serves.

Why: a served request is one user's sequence (at most ``max_len`` events). At that size the
network's arithmetic is a few MFLOP and PyTorch's per-operator dispatch is most of the cost:
~1.0-1.4 ms for the ~45 eager calls of one forward on this machine, ~2 ms and more once the
request's pandas and numpy work has pushed the dispatcher's code out of the caches. The same
network exported once and run by ONNX Runtime (one thread) takes ~0.4-0.5 ms, and a whole
request (`UserModel.score_events` of 500 raw events) ~1 ms less (bench/serving.py).

The graph is exported from the PyTorch modules themselves (``torch.onnx.export``, the
torch.export-based exporter) when the training asset saves the model (`UserModel.save(...,
serving_graph=True)`), and travels inside the artifact file, so serving needs only
``onnxruntime`` (no exporter, no compiler). It holds the weights of that artifact: a model
loaded from it, frozen for serving (`UserModel.freeze`), checks the graph against its own
PyTorch forward once, then runs it for every one-user request. Batches of users (`embed`,
`score_users`) stay on PyTorch, which is efficient there. Without ``onnxruntime``, or for a
model without a graph (baselines, older artifacts), serving runs on PyTorch: same numbers up to
float rounding (~1e-6, tests/test_serving_graph.py).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_lib.trace import TRACE

log = logging.getLogger(__name__)

#: The encoder's tensors of one user, in the graph's input order ([1, L, ...], no padding).
INPUT_NAMES = ("cat_ids", "time_features", "event_pos", "session_pos")
OUTPUT_NAMES = ("user_embedding", "task_probabilities")  # (not names of nodes inside)
#: ONNX Runtime and PyTorch agree to ~1e-6 on these outputs; a graph further off is not used.
TOLERANCE = 1e-4


def supports(model: nn.Module) -> bool:
    """Whether `export` handles the model: TRACE (any ablation switches) with time features."""
    return isinstance(model, TRACE) and model.embedding.time is not None


class OneUserNetwork(nn.Module):
    """`TRACE.embed` + heads of one unpadded sequence, in tensor ops only (what the exporter
    traces; `EventEmbedding`'s serving lookup goes through numpy). Inputs as the encoder makes
    them: cat_ids [1, L, C], time_features [1, L, F], event_pos, session_pos [1, L] (int32).
    Outputs: embedding [1, E], probabilities [1, T]."""

    def __init__(self, model: TRACE):
        super().__init__()
        self.model = model
        embedding = model.embedding
        table, _, starts = embedding._stacked_table()  # every lookup table end to end, time bias folded in
        self.register_buffer("table", table.detach().clone())
        self.register_buffer("starts", torch.as_tensor(starts, dtype=torch.long))
        self.positions = [key for key, _ in embedding._tables() if key != "cat_ids"]

    def forward(self, cat_ids: Tensor, time_features: Tensor, event_pos: Tensor, session_pos: Tensor):
        positions = {"event_pos": event_pos, "session_pos": session_pos}
        ids = torch.cat([cat_ids[0], *(positions[key][0].unsqueeze(-1) for key in self.positions)], dim=-1)
        x = F.embedding(ids.long() + self.starts, self.table).sum(dim=1)  # [L, D]: one row per table
        x = x + F.linear(time_features[0], self.model.embedding.time.weight)  # (its bias is in the table)
        length = x.shape[0]
        for block in self.model.blocks:
            x = block.infer_unpadded(x, 1, length)
        pooled = self.model.ln_f(x).amax(dim=0, keepdim=True)  # [1, D]: max over the events
        embedding = F.gelu(self.model.shared(pooled))  # [1, E]
        return embedding, torch.sigmoid(self.model.heads(embedding))


def example_inputs(model: TRACE, length: int, seed: int = 0) -> dict[str, Tensor]:
    """A valid one-user input of ``length`` events (random ids within each table, random time
    features): what the export traces and what the checks compare on."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, size, (1, length, 1), generator=generator) for size in config.vocab_sizes]
    return {
        "cat_ids": torch.cat(ids, dim=-1).to(torch.int32),
        "time_features": torch.randn(1, length, config.n_time_features, generator=generator),
        "event_pos": torch.randint(0, max(config.max_len, 1), (1, length), generator=generator).to(torch.int32),
        "session_pos": torch.randint(0, max(config.max_sessions, 1), (1, length), generator=generator).to(torch.int32),
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's own warnings and log lines (missing torchvision ops, pytree deprecations)
    say nothing about this model: kept out of the training step's log."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _one_user_network(model: TRACE) -> Iterator[OneUserNetwork]:
    """``model``'s `OneUserNetwork` in eval mode (no dropout), ``model``'s own mode restored
    after: exporting or checking a model that is still training does not change how it trains."""
    training = model.training
    try:
        yield OneUserNetwork(model).eval()
    finally:
        model.train(training)


def export(model: nn.Module) -> bytes | None:
    """The serving graph of ``model`` (an ONNX model, serialized), checked against the PyTorch
    forward at several lengths; None when the model is not supported or the export fails (the
    model then serves on PyTorch, with a warning in the log)."""
    if not supports(model):
        return None
    max_len = max(model.config.max_len, 2)
    events = torch.export.Dim("events", min=1, max=max_len)
    try:
        with _one_user_network(model) as network, torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                network,
                tuple(example_inputs(model, min(8, max_len)).values()),  # >= 2 events: the length stays symbolic
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={name: {1: events} for name in INPUT_NAMES},
                dynamo=True,
                optimize=True,
                verbose=False,
            )
        graph = program.model_proto.SerializeToString()
        check(ServingSession(graph), model, lengths=(1, 2, 7, max_len))
    except Exception as error:  # any exporter failure leaves the model on PyTorch
        log.warning("serving graph not exported (%s: %s): the model serves on PyTorch", type(error).__name__, error)
        return None
    return graph


def check(session: ServingSession, model: TRACE, lengths=(1, 5)) -> float:
    """Largest difference between a serving graph's session and the PyTorch forward over
    sequences of ``lengths`` events; raises when it exceeds `TOLERANCE` (a graph that does not
    belong to these weights)."""
    worst = 0.0
    with _one_user_network(model) as network, torch.inference_mode():
        for seed, length in enumerate(lengths):
            inputs = example_inputs(model, length, seed)
            expected = [t.numpy() for t in network(*inputs.values())]
            got = session.run(inputs, length)
            worst = max(worst, *(float(np.abs(a - b).max()) for a, b in zip(expected, got)))
    if not worst <= TOLERANCE:
        raise ValueError(f"the serving graph differs from the model by {worst:.2e} (tolerance {TOLERANCE})")
    return worst


class ServingSession:
    """An ONNX Runtime session of a serving graph, on one thread: a request is one user's
    sequence, too small to split (and a server runs one request per worker)."""

    def __init__(self, graph: bytes):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        self._session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(self, batch: dict[str, Tensor], length: int) -> tuple[np.ndarray, np.ndarray]:
        """(embedding [1, E], probabilities [1, T]) of the first ``length`` events of an encoded
        one-user batch (`SequenceEncoder.transform_user`: [1, max_len, ...], padding after)."""
        feed = {name: batch[name][:, :length].numpy() for name in INPUT_NAMES}
        embedding, probabilities = self._session.run(None, feed)
        return embedding, probabilities


def runtime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["INPUT_NAMES", "OUTPUT_NAMES", "OneUserNetwork", "ServingSession", "check", "export", "supports"]
