"""The deployable unit of the MTLDS family: funnel spec + network, saved and served as one.

The twin of `embedding_service.UserModel` for conversion models. `ConversionModel.save` writes
one file of primitives and tensors (funnel spec, `MTLDSConfig`, model name, weights), so it loads
with `torch.load(weights_only=True)`; `predict_frame` scores a frame of funnel samples (the
columns `funnel_samples.build_funnel_samples` produces), which is what the MLflow pyfunc serves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pandas as pd
import torch

from model_lib.artifact import save_atomically
from model_lib.funnel_samples import FunnelSpec, samples_to_tensors
from model_lib.mtlds import FunnelModel, MTLDSConfig, predict
from model_lib.mtlds_baselines import build_model

CONVERSION_ARTIFACT_FORMAT = 1
_TUPLE_FIELDS = {f.name for f in fields(MTLDSConfig) if str(f.type).startswith("tuple")}


def _spec_to_dict(spec: FunnelSpec) -> dict:
    d = asdict(spec)
    d["funnel"], d["extra_labels"] = list(spec.funnel), list(spec.extra_labels)
    d["horizon"] = None if spec.horizon is None else float(pd.Timedelta(spec.horizon).total_seconds())
    return d


def _spec_from_dict(d: dict) -> FunnelSpec:
    horizon = None if d["horizon"] is None else pd.Timedelta(seconds=d["horizon"])
    return FunnelSpec(
        **{**d, "funnel": tuple(d["funnel"]), "extra_labels": tuple(d["extra_labels"]), "horizon": horizon}
    )


@dataclass
class ConversionModel:
    name: str  # public model name: mtlds_linear, ..., single_task, shared_bottom, esmm, mmoe
    model: FunnelModel
    spec: FunnelSpec

    @property
    def cfg(self) -> MTLDSConfig:
        return self.model.cfg

    def predict_frame(self, samples: pd.DataFrame) -> pd.DataFrame:
        """`p_<task>` per task and the ranking `score`, one row per sample (index kept)."""
        probs, scores = predict(self.model, samples_to_tensors(samples, self.spec))
        out = pd.DataFrame(probs, columns=[f"p_{t}" for t in self.cfg.tasks], index=samples.index)
        out["score"] = scores
        return out

    def save(self, path: str | Path) -> Path:
        state = {
            "format": CONVERSION_ARTIFACT_FORMAT,
            "name": self.name,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.cfg).items()},
            "spec": _spec_to_dict(self.spec),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
        }
        return save_atomically(state, path)

    @classmethod
    def load(cls, path: str | Path) -> ConversionModel:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if state.get("format") != CONVERSION_ARTIFACT_FORMAT:
            raise ValueError(
                f"{path}: conversion artifact format {state.get('format')!r}, this code reads {CONVERSION_ARTIFACT_FORMAT}"
            )
        cfg = MTLDSConfig(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in state["config"].items()})
        model = build_model(state["name"], cfg)
        model.load_state_dict(state["state_dict"])
        model.eval()
        return cls(state["name"], model, _spec_from_dict(state["spec"]))


__all__ = ["CONVERSION_ARTIFACT_FORMAT", "ConversionModel"]
