"""MLflowTracking: store creation across processes, and the registry round trip in a fresh process.

The tiny model and its save/load functions live here on purpose: the wrapper takes its loader by
import path, so the same code serves this module's loader and model_lib's real artifact loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from resources.mlflow_tracking import MLflowTracking, code_paths_for, default_tracking_uri, sqlite_path

REPO = Path(__file__).resolve().parents[1]


class TinyEmbedder(torch.nn.Module):
    """Stands in for TRACE: a custom `embed()` besides `forward()`."""

    def __init__(self, n_features: int = 4, dim: int = 3):
        super().__init__()
        self.n_features, self.dim = n_features, dim
        self.encoder = torch.nn.Linear(n_features, dim)
        self.head = torch.nn.Linear(dim, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, D)
        return torch.tanh(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B,) probabilities
        return torch.sigmoid(self.head(self.embed(x))).squeeze(-1)


def save_tiny(model: TinyEmbedder, path: Path) -> None:
    config = {"n_features": model.n_features, "dim": model.dim}
    torch.save({"config": config, "state_dict": model.state_dict()}, path)


def load_tiny(path: str) -> TinyEmbedder:
    payload = torch.load(path, weights_only=True)
    model = TinyEmbedder(**payload["config"])
    model.load_state_dict(payload["state_dict"])
    return model


def _subprocess_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(REPO))
    env.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)  # the wrapper must not need pickle
    return env


def test_default_uri_is_sqlite_in_trace_dagster_home(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("TRACE_DAGSTER_HOME", str(tmp_path / "home"))
    resource = MLflowTracking()
    assert resource.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert resource.artifact_location() == (tmp_path / "home" / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert default_tracking_uri() == "http://mlflow.example:5000"
    assert MLflowTracking(tracking_uri="sqlite:///x.db").resolved_tracking_uri() == "sqlite:///x.db"
    assert sqlite_path("sqlite:///rel/x.db") == Path("rel/x.db").resolve()
    assert sqlite_path("http://host") is None


def test_store_created_concurrently_by_two_processes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from resources.mlflow_tracking import MLflowTracking
        resource = MLflowTracking(tracking_uri={uri!r})
        Path(sys.argv[1]).touch()
        while not Path({str(go)!r}).exists():
            time.sleep(0.01)
        print(resource.ensure_store())
        """
    )
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(flag)],
            env=_subprocess_env(uri),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    deadline = time.monotonic() + 120
    while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both processes start creating the store at the same moment
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    experiment_ids = {out.strip().splitlines()[-1] for out, _ in outputs}
    assert len(experiment_ids) == 1
    resource = MLflowTracking(tracking_uri=uri)
    assert resource.ensure_store() in experiment_ids
    experiments = resource.client().search_experiments()
    assert [e.name for e in experiments if e.name == "trace-dagster"] == ["trace-dagster"]
    assert experiments[0].artifact_location is not None


def test_code_paths_ship_local_packages_only():
    assert code_paths_for([f"{__name__}:load_tiny"]) == [str(Path(__file__).resolve())]
    assert code_paths_for(["resources.warehouse:sql_literal"]) == [str(REPO / "resources")]
    assert code_paths_for(["torch:load", "json:loads"]) == []


def test_registered_model_embeds_in_a_fresh_process(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = MLflowTracking(tracking_uri=uri, experiment_name="registry-roundtrip")
    torch.manual_seed(0)
    model = TinyEmbedder()
    artifact = tmp_path / "tiny.pt"
    save_tiny(model, artifact)
    example = pd.DataFrame(np.random.default_rng(0).normal(size=(5, 4)), columns=list("abcd"))

    with tracking.start_run(run_name="tiny", tags={"purpose": "test"}) as run:
        registered = tracking.log_model_artifact(
            artifact,
            registered_model_name="tiny",
            loader=f"{__name__}:load_tiny",
            predict_method="embed",
            input_format="tensor",
            input_example=example,
            version_tags={"data_version": "abc"},
        )
    assert registered.version == "1" and registered.model_uri == "models:/tiny/1"
    assert registered.run_id == run.info.run_id
    version = tracking.client().get_model_version("tiny", "1")
    assert version.tags["data_version"] == "abc"
    # artifacts beside the database, not in the current directory
    assert (tmp_path / "mlartifacts").is_dir()
    reloaded = tracking.load_model(registered.model_uri)
    x = torch.tensor(example.to_numpy(), dtype=torch.float32)
    assert type(reloaded).__name__ == "TinyEmbedder" and reloaded is not model
    torch.testing.assert_close(reloaded.embed(x), model.embed(x))

    script = textwrap.dedent(
        """
        import json, sys
        import mlflow, pandas as pd, torch
        loaded = mlflow.pyfunc.load_model(sys.argv[1])
        wrapper = loaded.unwrap_python_model()
        frame = pd.DataFrame(json.loads(sys.argv[2]))
        x = torch.tensor(frame.to_numpy(), dtype=torch.float32)
        print(json.dumps({
            "class": type(wrapper.model).__name__,
            "module_file": sys.modules[type(wrapper.model).__module__].__file__,
            "wrapper_module": type(wrapper).__module__,
            "embed": wrapper.embed(x).tolist(),
            "embed_via_model": wrapper.model.embed(x).tolist(),
            "predict": loaded.predict(frame).to_numpy().tolist(),
            "predict_columns": list(loaded.predict(frame).columns),
        }))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, registered.model_uri, example.to_json(orient="columns")],
        env=_subprocess_env(uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    expected = model.embed(torch.tensor(example.to_numpy(), dtype=torch.float32)).detach().numpy()
    assert payload["class"] == "TinyEmbedder"
    assert payload["wrapper_module"].startswith("code_model_")  # models from code, no pickle
    # the loader came from the code shipped with the model, not from this checkout
    module_file = Path(payload["module_file"])
    assert module_file.parent.name == "code" and module_file.is_relative_to(tmp_path / "mlartifacts")
    np.testing.assert_allclose(payload["embed"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(payload["embed_via_model"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(payload["predict"], expected, rtol=1e-5, atol=1e-6)
    assert payload["predict_columns"] == ["embed_0", "embed_1", "embed_2"]


def test_log_model_artifact_needs_an_active_run(tmp_path):
    tracking = MLflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    artifact = tmp_path / "tiny.pt"
    save_tiny(TinyEmbedder(), artifact)
    with pytest.raises(RuntimeError, match="active run"):
        tracking.log_model_artifact(artifact, registered_model_name="tiny", loader=f"{__name__}:load_tiny")
    with tracking.start_run("bad loader"), pytest.raises((ImportError, AttributeError)):
        tracking.log_model_artifact(artifact, registered_model_name="tiny", loader=f"{__name__}:no_such_loader")


def test_resource_in_a_dagster_asset(tmp_path):
    @dg.asset
    def trained(context, mlflow_tracking: MLflowTracking) -> dg.MaterializeResult:
        with mlflow_tracking.start_run(run_name=context.run.run_id, tags={"dagster.run_id": context.run.run_id}) as run:
            mlflow.log_metric("auroc", 0.75)
        return dg.MaterializeResult(metadata={"mlflow_run_id": run.info.run_id})

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = dg.materialize([trained], resources={"mlflow_tracking": MLflowTracking(tracking_uri=uri)})
    assert result.success
    metadata = result.asset_materializations_for_node("trained")[0].metadata
    run = MLflowTracking(tracking_uri=uri).client().get_run(metadata["mlflow_run_id"].value)
    assert run.data.metrics["auroc"] == 0.75
    assert run.data.tags["dagster.run_id"] == result.run_id and run.info.status == "FINISHED"
