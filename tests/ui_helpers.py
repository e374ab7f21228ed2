"""Helpers of the slow end-to-end tests: small run configs, a GraphQL client, headless Chromium.

Shared by `test_ui_e2e.py` (the UI and its GraphQL API on `trace-dagster dev`) and
`test_concurrent_runs.py` (two runs at once on the CLI's instance).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INSTALL_TEST_DEPS = REPO / "scripts" / "install_test_deps.sh"
CHROMIUM = Path("/usr/bin/chromium")

# Flags that keep a root, offline, headless Chromium from sandboxing, using a GPU or calling home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
)

# Step subprocesses forked from a server that has already imported the code location, torch,
# MLflow and Evidently: a spawned step pays ~15 s of imports on this 2-core machine, which makes
# the 30-step full_pipeline take ~9 minutes instead of ~3 on tiny data.
FORKSERVER_PRELOAD = ["trace_dagster.definitions", "torch", "mlflow", "evidently"]


# ---------------------------------------------------------------------------------------------
# Run config


def small_run_config(
    job_name: str,
    n_users: int = 300,
    days: int = 35,
    epochs: int = 1,
    bootstrap_samples: int = 30,
    max_concurrent: int = 2,
    **simulator,
) -> dict:
    """Run config making `job_name` small: a small simulator, one epoch per model, few replicates.

    Op names come from the job itself (every `*_model` asset is a training op), so a model added
    to the definitions is made small too, and no op config is given to a job that lacks the op
    (Dagster rejects config for ops outside the job).
    """
    from trace_dagster.definitions import defs

    nodes = {node.name for node in defs.resolve_job_def(job_name).nodes}
    ops: dict[str, dict] = {name: {"config": {"epochs": epochs}} for name in sorted(nodes) if name.endswith("_model")}
    if "evaluation_metrics" in nodes:
        ops["evaluation_metrics"] = {"config": {"bootstrap_samples": bootstrap_samples}}
    config: dict = {
        "resources": {"event_source": {"config": {"simulator_n_users": n_users, "simulator_days": days, **simulator}}},
        "execution": {
            "config": {
                "multiprocess": {
                    "max_concurrent": max_concurrent,
                    "start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}},
                }
            }
        },
    }
    if ops:
        config["ops"] = ops
    return config


def job_by_name(job_name: str):
    """A job of the code location by name: the reconstructor of `reconstructable_job`."""
    from trace_dagster.definitions import defs

    return defs.resolve_job_def(job_name)


def reconstructable_job(job_name: str):
    """Any job of the definitions, rebuildable in step processes (the multiprocess executor needs
    that; `dg.reconstructable` only takes module-level factories, one per job)."""
    import dagster as dg

    return dg.build_reconstructable_job(
        "ui_helpers",
        "job_by_name",
        reconstructable_args=(job_name,),
        reconstructor_working_directory=str(Path(__file__).resolve().parent),
    )


# ---------------------------------------------------------------------------------------------
# Processes and the webserver


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_signals() -> None:
    """Popen `preexec_fn`: a test run in the background of a shell inherits SIGINT ignored, and
    dagster dev maps SIGTERM onto SIGINT's handler, so it would ignore both; restore the default."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 20.0) -> None:
    """SIGINT the leader (dagster dev shuts its webserver and daemon down), then SIGKILL the group.

    The process must have been started with `start_new_session=True`: its group is then exactly
    the processes it started (webserver, daemon, code server, run workers, step processes).
    """
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_seconds)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)  # stragglers: run workers, step processes
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class GraphQLError(AssertionError):
    pass


class GraphQL:
    """A minimal client of the webserver's `/graphql` endpoint (POST JSON)."""

    def __init__(self, base_url: str, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def __call__(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.base_url}/graphql", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise GraphQLError(f"HTTP {error.code}: {error.read()[:2000]!r}") from error
        if payload.get("errors"):
            raise GraphQLError(json.dumps(payload["errors"], indent=1)[:4000])
        return payload["data"]


def wait_for_webserver(base_url: str, process: subprocess.Popen, log: Path, timeout: float) -> dict:
    """Poll `/server_info` until it answers and the code location is loaded; return the info."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{base_url}/server_info", timeout=5) as response:
                info = json.loads(response.read())
            break
        except (urllib.error.URLError, OSError, ValueError) as error:
            last_error = str(error)
            time.sleep(1)
    else:
        raise AssertionError(f"no answer from {base_url} in {timeout:.0f}s ({last_error}):\n{tail(log)}")
    graphql = GraphQL(base_url)
    while time.monotonic() < deadline:
        data = graphql("""{ workspaceOrError { __typename ... on Workspace { locationEntries {
            name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
        entries = data["workspaceOrError"].get("locationEntries", [])
        if entries and all(e["loadStatus"] == "LOADED" for e in entries):
            errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
            if errors:
                raise AssertionError(f"code location failed to load: {errors}")
            return info
        time.sleep(1)
    raise AssertionError(f"code location not loaded in {timeout:.0f}s:\n{tail(log)}")


# ---------------------------------------------------------------------------------------------
# Chromium


def ensure_chromium() -> Path:
    """Install Debian's chromium through scripts/install_test_deps.sh if missing; skip if impossible."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get is unavailable: run {INSTALL_TEST_DEPS} on a Debian machine")
    done = subprocess.run(["bash", str(INSTALL_TEST_DEPS)], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0 or not CHROMIUM.exists():
        pytest.skip(
            f"{INSTALL_TEST_DEPS} could not install chromium (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-1500:]}"
        )
    return CHROMIUM


def run_chromium(
    url: str,
    user_data_dir: Path,
    *mode: str,
    window: tuple[int, int] = (1600, 1000),
    budget_ms: int = 20_000,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """One headless Chromium call on `url` (e.g. mode `--screenshot=PATH` or `--dump-dom`).

    `--virtual-time-budget` lets the single-page app fetch its GraphQL data and lay the graph out
    before the page is captured. A new empty profile per call: nothing cached, nothing synced.
    """
    user_data_dir.mkdir(parents=True, exist_ok=False)
    command = [
        str(CHROMIUM),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={user_data_dir}",
        f"--window-size={window[0]},{window[1]}",
        f"--virtual-time-budget={budget_ms}",
        *mode,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def image_stats(path: Path) -> tuple[tuple[int, int], float, int]:
    """((width, height), grey-level standard deviation, number of distinct grey levels)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        size = image.size
        grey = np.asarray(image.convert("L"), dtype=np.float64)
    return size, float(grey.std()), len(np.unique(grey))
