"""One file per trained TRACE-family model: kind + config + encoder state + weights.

Everything in the file is a primitive, list, dict or tensor, so it loads with
``torch.load(weights_only=True)``: loading a model never executes code from the file (pickled
classes would), which matters for artifacts pulled from a shared MLflow registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from model_lib.encoding import SequenceEncoder
from model_lib.trace import SequenceUserModel
from model_lib.trace_baselines import build_model, get_kind

ARTIFACT_FORMAT = 1


@dataclass
class Artifact:
    kind: str
    model: SequenceUserModel  # in eval mode
    encoder: SequenceEncoder
    metadata: dict = field(default_factory=dict)
    serving_graph: bytes | None = None  # serving_graph.py: the one-user network as ONNX, if exported


def config_to_dict(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(kind: str, values: dict):
    cls = get_kind(kind).config_class
    tuple_fields = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
    return cls(**{k: tuple(v) if k in tuple_fields else v for k, v in values.items()})


def _check_primitive(value, where: str = "metadata") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_primitive(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_primitive(v, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool, torch.Tensor))):
        raise TypeError(f"{where}: {type(value).__name__} is not loadable with weights_only=True")


def save_artifact(
    path: str | Path,
    kind: str,
    model: SequenceUserModel,
    encoder: SequenceEncoder,
    metadata: dict | None = None,
    serving_graph: bytes | None = None,
) -> Path:
    """Write the artifact atomically (tmp file + rename); returns the path. ``serving_graph``
    (optional) is stored as a uint8 tensor: still a file that loads with ``weights_only=True``."""
    get_kind(kind)
    metadata = dict(metadata or {})
    _check_primitive(metadata)
    state = {
        "format": ARTIFACT_FORMAT,
        "kind": kind,
        "config": config_to_dict(model.config),
        "encoder": encoder.state_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": metadata,
    }
    if serving_graph is not None:
        state["serving_graph"] = torch.frombuffer(bytearray(serving_graph), dtype=torch.uint8)
    return save_atomically(state, path)


def save_atomically(state: dict, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_artifact(path: str | Path) -> Artifact:
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if state.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: artifact format {state.get('format')!r}, this code reads {ARTIFACT_FORMAT}")
    kind = state["kind"]
    model = build_model(kind, config_from_dict(kind, state["config"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    graph = state.get("serving_graph")  # absent in artifacts saved without one
    return Artifact(
        kind,
        model,
        SequenceEncoder.from_state_dict(state["encoder"]),
        state["metadata"],
        None if graph is None else graph.numpy().tobytes(),
    )


__all__ = [
    "ARTIFACT_FORMAT",
    "Artifact",
    "config_from_dict",
    "config_to_dict",
    "load_artifact",
    "save_artifact",
    "save_atomically",
]
