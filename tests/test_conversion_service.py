"""ConversionModel: the deployable MTLDS-family unit (save/load with weights_only, predict_frame)."""

import numpy as np
import pandas as pd
import pytest
import torch

from model_lib.conversion_service import ConversionModel
from model_lib.funnel_samples import FUNNELS, build_funnel_samples
from model_lib.mtlds import MTLDSConfig
from model_lib.mtlds_baselines import build_model
from resources.event_sources.simulator import SimulatorConfig, simulate_events


@pytest.fixture(scope="module")
def samples() -> pd.DataFrame:
    events = simulate_events(SimulatorConfig(n_users=150, days=14, seed=5))
    events = events.astype({c: "string" for c in ["user_id", "event_name", "item_id", "category"]})
    return build_funnel_samples(
        events[["user_id", "event_time", "event_name", "item_id", "category"]], FUNNELS["travel"]
    )


@pytest.mark.parametrize("name", ["mtlds_linear", "mtlds_max", "esmm", "mmoe"])
def test_save_load_round_trip_gives_identical_predictions(tmp_path, samples, name):
    spec = FUNNELS["travel"]
    model = ConversionModel(name, build_model(name, MTLDSConfig.from_spec(spec), seed=0), spec)
    model.model.eval()
    before = model.predict_frame(samples)
    path = model.save(tmp_path / "model.pt")
    torch.load(path, weights_only=True)  # primitives and tensors only
    loaded = ConversionModel.load(path)
    pd.testing.assert_frame_equal(before, loaded.predict_frame(samples))
    assert loaded.name == name and loaded.spec == spec
    assert list(before.columns) == [f"p_{t}" for t in spec.tasks] + ["score"]
    assert before.index.equals(samples.index)
    assert np.isfinite(before.to_numpy()).all()


def test_unknown_format_is_refused(tmp_path, samples):
    spec = FUNNELS["travel"]
    path = ConversionModel(
        "shared_bottom", build_model("shared_bottom", MTLDSConfig.from_spec(spec), seed=0), spec
    ).save(tmp_path / "m.pt")
    state = torch.load(path, weights_only=True)
    state["format"] = 999
    torch.save(state, path)
    with pytest.raises(ValueError, match="format"):
        ConversionModel.load(path)
