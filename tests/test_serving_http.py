"""The champions, served: `mlflow models serve` on raw canonical events, as a client would use it.

One small pipeline run fills a registry (few users, one epoch); then, for `models:/trace@champion`
and `models:/mtlds@champion`, a real `mlflow models serve` process on 127.0.0.1 and a free port
answers raw-event requests with what `.predict()` gives in process, and malformed requests with a
400 that names the problem. Also: the version's requirements cover every library its code imports,
the metrics sit on the logged model, and the version still loads after the home directory moved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import failed_steps, free_port, materialize_full_graph, small_run_config
from mlflow import MlflowClient

from resources.mlflow_tracking import imported_modules

pytestmark = pytest.mark.slow
N_USERS = 150


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    home = tmp_path_factory.mktemp("serving_http") / "trace_home"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRACE_DAGSTER_HOME", str(home))
        for name in ("TRACE_DAGSTER_EVENTS", "TRACE_DAGSTER_EVENTS_FORMAT", "MLFLOW_TRACKING_URI"):
            env.delenv(name, raising=False)
        with dg.DagsterInstance.ephemeral() as instance:
            run = materialize_full_graph(
                home,
                small_run_config(sequence_epochs=1, conversion_epochs=1, bootstrap_samples=20, map_users=100),
                instance=instance,
                simulator_n_users=N_USERS,
                simulator_days=35,
            )
            assert run.result.success, failed_steps(run.result)
            env.setenv("MLFLOW_TRACKING_URI", run.tracking_uri)
            mlflow.set_tracking_uri(run.tracking_uri)
            mlflow.set_registry_uri(run.tracking_uri)
            yield run


class Server:
    """`mlflow models serve` in a subprocess; stopped (its process only) on exit."""

    def __init__(self, model_uri: str, tracking_uri: str, cwd: Path):
        self.port = free_port()
        self.log = cwd / f"serve-{self.port}.log"
        venv_bin = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_uri,
            "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        }
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        self.process = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(self.port)]
            + ["--env-manager", "local", "-w", "1"],
            cwd=cwd,
            env=env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        raise AssertionError(f"server did not answer /ping: {self.log.read_text()[-3000:]}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()

    def post(self, payload: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")


def raw_request(pipeline, users: int = 2) -> pd.DataFrame:
    """Canonical raw events of a few users, as a client holds them (ISO times, string ids)."""
    events = pipeline.query(
        "SELECT user_id, strftime(event_time, '%Y-%m-%dT%H:%M:%SZ') AS event_time, event_name, item_id, category, "
        "device, channel FROM raw_events WHERE user_id IN (SELECT DISTINCT user_id FROM raw_events "
        f"ORDER BY user_id LIMIT {users}) ORDER BY user_id, event_time"
    )
    return events.astype(object).where(events.notna(), None)


def records(frame: pd.DataFrame) -> list[dict]:
    return json.loads(frame.to_json(orient="records"))


def test_trace_champion_serves_raw_events_over_http(pipeline, tmp_path):
    request = raw_request(pipeline)
    as_of = "2030-01-01T00:00:00Z"
    local = mlflow.pyfunc.load_model("models:/trace@champion").predict(request, params={"as_of": as_of})
    tasks = pipeline.query("SELECT task FROM training_tasks WHERE kind = 'seen'")["task"].tolist()
    assert [f"p_{t}" for t in tasks] == [c for c in local.columns if c.startswith("p_")]
    with Server("models:/trace@champion", pipeline.tracking_uri, tmp_path) as server:
        status, body = server.post({"dataframe_records": records(request), "params": {"as_of": as_of}})
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        assert len(served) == request["user_id"].nunique() == len(local)
        assert list(served.columns) == list(local.columns)
        numeric = [c for c in local.columns if c.startswith(("embedding_", "p_"))]
        np.testing.assert_allclose(served[numeric].to_numpy(float), local[numeric].to_numpy(float), atol=1e-5)

        # malformed requests: a 400 naming the problem, and the server keeps serving
        cases = {
            "event_name": request.drop(columns="event_name"),
            "event_time": request.assign(event_time=["not a time"] + list(request["event_time"].iloc[1:])),
            "never seen in training": request.assign(
                event_name=["no_such_page"] + list(request["event_name"].iloc[1:])
            ),
        }
        for expected, bad in cases.items():
            status, body = server.post({"dataframe_records": records(bad)})
            assert status == 400, (expected, status, body)
            assert expected in body.get("message", ""), body
        status, _ = server.post({"dataframe_records": records(request)})
        assert status == 200

        # ids are `string` in the signature (cheaper to enforce than `Any`): a JSON number still
        # reaches the model as an id, while an in-process integer column is refused by name
        one_user = request[request["user_id"] == request["user_id"].iloc[0]]
        status, body = server.post({"dataframe_records": records(one_user.assign(user_id=12345))})
        assert status == 200, body
        assert [str(u) for u in pd.DataFrame(body["predictions"])["user_id"]] == ["12345"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="user_id"):
        mlflow.pyfunc.load_model("models:/trace@champion").predict(one_user.assign(user_id=12345))

    # a one-user request runs on the serving graph the training step stored with the champion
    # (ONNX Runtime): the numbers of its PyTorch network
    champion = mlflow.pyfunc.load_model("models:/trace@champion").unwrap_python_model().model
    assert champion.serving_runtime == "onnxruntime"
    on_torch = dataclasses.replace(champion, serving_graph=None)
    assert on_torch.serving_runtime == "torch"
    got, expected = (m.score_events(one_user, as_of=as_of).iloc[:, 2:] for m in (champion, on_torch))
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), atol=1e-5)


def test_mtlds_champion_ranks_candidates_from_raw_events_over_http(pipeline, tmp_path):
    history = raw_request(pipeline, users=1)[["user_id", "event_time", "event_name", "item_id", "category"]]
    viewed = history.dropna(subset=["item_id"]).drop_duplicates("item_id").tail(3)
    candidates = viewed.assign(event_time=None, event_name=None, is_candidate=True)
    request = pd.concat([history.assign(is_candidate=False), candidates], ignore_index=True)
    local = mlflow.pyfunc.load_model("models:/mtlds@champion").predict(request)
    assert len(local) == len(candidates)
    assert not any(c.startswith(("label_", "split", "censored")) for c in local.columns)
    with Server("models:/mtlds@champion", pipeline.tracking_uri, tmp_path) as server:
        status, body = server.post({"dataframe_records": records(request)})
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        numeric = [c for c in local.columns if c.startswith("p_") or c == "score"]
        assert list(served["item_id"]) == list(local["item_id"])
        np.testing.assert_allclose(served[numeric].to_numpy(float), local[numeric].to_numpy(float), atol=1e-5)
        status, body = server.post({"dataframe_records": records(request.drop(columns="item_id"))})
        assert status == 400 and "item_id" in body.get("message", ""), body


def test_signatures_hold_no_labels_and_no_integer_inference(pipeline):
    for name in ("trace", "mtlds"):
        info = mlflow.models.get_model_info(f"models:/{name}@champion")
        inputs = info.signature.inputs.input_names()
        assert {"user_id", "event_time"} <= set(inputs) | {"event_time"}
        assert not [
            c for c in inputs if c.startswith(("label_", "user_prior", "item_prior")) or c in ("split", "censored")
        ]
    assert "Inferred schema contains integer column" not in pipeline_log_text(pipeline)


def pipeline_log_text(pipeline) -> str:
    return "\n".join(str(e.message) for e in pipeline.result.all_events if getattr(e, "message", None))


def test_champion_requirements_cover_its_code_and_metrics_sit_on_the_logged_model(pipeline):
    client = MlflowClient()
    for name in ("trace", "mtlds"):
        version = client.get_model_version_by_alias(name, "champion")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion"))
        pins = {
            line.split("==")[0].lower() for line in (local / "requirements.txt").read_text().split() if "==" in line
        }
        code = local / "code"
        model_file = [p for p in local.glob("*.py")]  # the wrapper file, copied by "models from code"
        modules = imported_modules([*model_file, *code.iterdir()]) - {p.name for p in code.iterdir()}
        third_party = {m for m in modules if m not in sys.stdlib_module_names}
        from importlib.metadata import packages_distributions

        owners = packages_distributions()
        uncovered = [m for m in third_party if not {d.lower() for d in owners.get(m, [])} & pins]
        assert not uncovered, f"{name}: imported but not pinned: {uncovered} (pins {sorted(pins)})"
        assert "scipy" in pins and "torch" in pins and "mlflow" in pins
        # MLflow 3.17's SQL registry leaves `model_id` unset; the version's source names its logged model.
        model_id = version.model_id or version.source.removeprefix("models:/")
        logged = mlflow.get_logged_model(model_id)
        assert {m.key for m in logged.metrics} & {"test_mean_auroc", "test_ndcg"}, logged.metrics


def test_score_users_streams_a_file_and_a_date_range_to_parquet(pipeline, tmp_path):
    from trace_dagster.jobs import score_users

    events = raw_request(pipeline, users=6)
    path = tmp_path / "events.csv"
    bad = pd.DataFrame([{"user_id": "x", "event_time": "not a time", "event_name": "home"}])
    pd.concat([events, bad], ignore_index=True).to_csv(path, index=False)

    def run(output: Path, batch_events: int, **config) -> pd.DataFrame:
        result = score_users.execute_in_process(
            resources=pipeline.resources,
            run_config={
                "ops": {
                    "score_users_op": {"config": {"output_path": str(output), "batch_events": batch_events, **config}}
                }
            },
        )
        assert result.success
        return pd.read_parquet(output)

    small = run(tmp_path / "small.parquet", 40, events_path=str(path))  # many batches of whole users
    large = run(tmp_path / "large.parquet", 100_000, events_path=str(path))
    assert len(small) == len(large) == events["user_id"].nunique() == 6
    assert list(small["user_id"]) == list(large["user_id"])  # batching changes nothing
    np.testing.assert_allclose(np.stack(small["embedding"]), np.stack(large["embedding"]), atol=1e-5)
    np.testing.assert_allclose(small.filter(like="p_").to_numpy(), large.filter(like="p_").to_numpy(), atol=1e-5)
    assert [c for c in small.columns if c.startswith("p_")] and len(small["embedding"].iloc[0]) > 0
    champion = mlflow.pyfunc.load_model("models:/trace@champion").unwrap_python_model().model
    expected = champion.score_events(events)
    np.testing.assert_allclose(np.stack(small["embedding"]), expected.filter(like="embedding_").to_numpy(), atol=1e-5)
    rejected = pd.read_parquet(tmp_path / "small.rejected.parquet")
    assert list(rejected["reason"]) == ["malformed_event_time"]

    day = pipeline.query("SELECT CAST(max(event_time) AS DATE) AS d FROM raw_events")["d"].iloc[0]
    ranged = run(tmp_path / "range.parquet", 500, start=str(day))
    users = pipeline.query(f"SELECT count(DISTINCT user_id) AS n FROM raw_events WHERE event_time >= '{day}'")[
        "n"
    ].iloc[0]
    assert len(ranged) == users > 0


FRESH_ENV_SCRIPT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
request = pd.read_json(sys.argv[2], orient="split", dtype=False)
print(model.predict(request, params={"as_of": "2030-01-01T00:00:00Z"}).to_json(orient="split"))
"""


@pytest.mark.skipif(
    os.environ.get("TRACE_DAGSTER_FRESH_VENV") != "1",
    reason="downloads the model's requirements from PyPI into a new virtualenv (~1 GB, minutes): "
    "set TRACE_DAGSTER_FRESH_VENV=1; the requirement list is checked above in every run",
)
def test_champion_loads_in_a_fresh_virtualenv_from_its_own_requirements(pipeline, tmp_path):
    """What `mlflow models serve --env-manager virtualenv` does, minus pyenv: a new venv (no site
    packages), `pip install -r` the version's own requirements.txt, load and predict there."""
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/trace@champion", dst_path=str(tmp_path / "m")))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)  # a venv has none of our packages
    pip = subprocess.run(
        [str(env_dir / "bin" / "pip"), "install", "-q", "-r", str(model_dir / "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    request = raw_request(pipeline)
    request_path = tmp_path / "request.json"
    request.to_json(request_path, orient="split", index=False)
    script = tmp_path / "predict.py"
    script.write_text(FRESH_ENV_SCRIPT)
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), str(script), str(model_dir), str(request_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    served = pd.read_json(done.stdout.strip().splitlines()[-1], orient="split")
    local = mlflow.pyfunc.load_model(str(model_dir)).predict(request, params={"as_of": "2030-01-01T00:00:00Z"})
    numeric = [c for c in local.columns if c.startswith(("embedding_", "p_"))]
    np.testing.assert_allclose(served[numeric].to_numpy(float), local[numeric].to_numpy(float), atol=1e-5)


def test_a_version_loads_after_the_home_directory_moved(pipeline, tmp_path):
    """Last in the module: the home really moves (nothing left at the old path)."""
    from resources.mlflow_tracking import MLflowTracking

    request = raw_request(pipeline)
    before = MLflowTracking(tracking_uri=pipeline.tracking_uri).load_model("models:/trace@champion")
    expected = before.score_events(request, as_of="2030-01-01")
    moved = tmp_path / "moved_home"
    shutil.move(pipeline.home, moved)
    tracking = MLflowTracking(tracking_uri=f"sqlite:///{moved}/mlflow.db")
    model = tracking.load_model("models:/trace@champion")  # relocates the store's paths first
    pd.testing.assert_frame_equal(model.score_events(request, as_of="2030-01-01"), expected)
    source = MlflowClient(tracking.resolved_tracking_uri()).get_model_version_download_uri(
        "trace", tracking.champion_version("trace")
    )
    assert str(moved) in source and str(pipeline.home) not in source
    assert tracking.relocate_store() == 0  # done once
