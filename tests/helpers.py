"""Test helpers, in one place: run configs, in-process materialization, warehouse reads, and the
machinery of the slow end-to-end tests (GraphQL client, webserver, headless Chromium).

Fixtures live in `conftest.py`; everything a test imports lives here (`from helpers import ...`).
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import duckdb
import pandas as pd
import pytest

from assets.conversion_models.assets import CONVERSION_MODELS
from assets.trace_models.aggregate_models import AGGREGATE_MODELS
from assets.trace_models.assets import SEQUENCE_MODELS

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# ---------------------------------------------------------------------------------------------
# Ingestion in process, warehouse reads


def pipeline_resources(home: Path, events: str = "", events_format: str = "", **simulator) -> dict:
    """The resources of `trace_dagster.definitions`, pointed at `home` and an event source."""
    from resources.event_sources import EventSource
    from resources.paths import TraceDagsterPaths
    from resources.warehouse import DuckDBWarehouse

    paths = TraceDagsterPaths(home=str(home))
    return {
        "paths": paths,
        "warehouse": DuckDBWarehouse(paths=paths, memory_limit="1GB", threads=2),
        "event_source": EventSource(paths=paths, events=str(events), events_format=events_format, **simulator),
    }


def materialize_pipeline(
    resources: dict,
    run_config: dict | None = None,
    sessionize: bool = True,
    raise_on_error: bool = True,
    max_rejected_share: float = 1.0,
):
    """Materialize ingestion (and sessionization) with their checks, in process.

    Hand-made bad-input files are mostly bad rows, so the rejected-share check is relaxed unless
    a test sets it (through `max_rejected_share` or its own run_config).
    """
    import dagster as dg

    from assets.ingestion.raw_events import ingested_events, ingestion_checks
    from assets.ingestion.sessionized_events import sessionization_checks, sessionized_events

    definitions = [ingested_events, ingestion_checks]
    if sessionize:
        definitions += [sessionized_events, sessionization_checks]
    run_config = dict(run_config or {})
    ops = dict(run_config.get("ops", {}))
    ops.setdefault("ingestion_checks", {"config": {"max_rejected_share": max_rejected_share}})
    run_config["ops"] = ops
    return dg.materialize(definitions, resources=resources, run_config=run_config, raise_on_error=raise_on_error)


def query(home: Path, sql: str) -> pd.DataFrame:
    """Read the warehouse of `home` (read-only, UTC session)."""
    con = duckdb.connect(str(home / "warehouse.duckdb"), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(sql).df()
    finally:
        con.close()


def check_results(result) -> dict[str, bool]:
    """{'asset:check': passed} of a materialize() result."""
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}


def write_lines(path: Path, lines: list[str], trailing_newline: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + ("\n" if trailing_newline else "")).encode())
    return path


# ---------------------------------------------------------------------------------------------
# The whole graph in process

TAOBAO_FILES = [
    (SHARED_DATA / "taobao_userbehavior" / f).resolve()  # ingestion records resolved paths
    for f in ("userbehavior_head.csv.gz", "userbehavior_tail.csv.gz")
]

#: The contract's tables (shared/design/contract.md) and the columns each must hold.
CONTRACT_TABLES = {
    "raw_events": ["user_id", "event_time", "event_name", "item_id", "category", "source_file", "source_row"],
    "rejected_events": ["source_file", "source_row", "raw", "reason"],
    "sessionized_events": [
        "user_id",
        "event_time",
        "event_name",
        "session_id",
        "session_index",
        "event_index",
        "event_index_in_session",
        "seconds_since_prev_event",
        "seconds_since_session_start",
        "hour_of_day",
        "day_of_week",
    ],
    "user_embeddings": ["user_id", "model_name", "model_version", "embedding", "as_of"],
    "evaluation_metrics": ["model", "task", "task_kind", "metric", "value", "split"],
    "drift_report": ["checked_at", "dataset_drift", "drift_share", "report_path"],
}
TRACE_FAMILY = [*SEQUENCE_MODELS, *AGGREGATE_MODELS]  # trace ... myopic_last_page, st_agg, st_cohort
MTLDS_FAMILY = list(CONVERSION_MODELS)  # mtlds_<agg> x4, single_task, shared_bottom, esmm, mmoe


@dataclass
class PipelineRun:
    home: Path
    tracking_uri: str
    result: dg.ExecuteInProcessResult
    seconds: float
    resources: dict
    instance: dg.DagsterInstance

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        con = duckdb.connect(str(self.warehouse), read_only=True)
        try:
            con.execute("SET TimeZone = 'UTC'")
            return con.execute(sql, params or []).df()
        finally:
            con.close()

    def checks(self) -> dict[str, tuple[bool, str]]:
        """{'asset:check': (passed, severity)} of the run."""
        return {
            f"{e.asset_key.to_user_string()}:{e.check_name}": (e.passed, e.severity.value)
            for e in self.result.get_asset_check_evaluations()
        }


def materialize_full_graph(
    home: Path, run_config: dict | None = None, instance: dg.DagsterInstance | None = None, **event_source
) -> PipelineRun:
    """Materialize ASSETS + ASSET_CHECKS of the code location into `home` (MLflow store beside it).

    `event_source`: fields of `EventSource` (`events`, `events_format`, `simulator_n_users`, ...).
    Pass `instance` to re-materialize single assets later on top of this run (the default IO
    manager keeps the model assets' outputs in the instance's storage).
    """
    from trace_dagster.definitions import ASSET_CHECKS, ASSETS, build_resources
    from trace_dagster.jobs import FULL_PIPELINE_SELECTION

    home.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{home}/mlflow.db"
    resources = build_resources(home=str(home), tracking_uri=tracking_uri, **event_source)
    started = time.perf_counter()
    instance = instance or dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [*ASSETS, *ASSET_CHECKS],
        selection=FULL_PIPELINE_SELECTION,  # what `full_pipeline` runs: the reproduction group stays out
        resources=resources,
        instance=instance,
        run_config=run_config or small_run_config(),
        raise_on_error=False,
    )
    return PipelineRun(home, tracking_uri, result, time.perf_counter() - started, resources, instance)


def failed_steps(result: dg.ExecuteInProcessResult) -> list[str]:
    """Step keys that failed, with their error message (for assertion messages)."""
    return [
        f"{e.step_key}: {e.event_specific_data.error.message.strip()[:500]}"
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    ]


# ---------------------------------------------------------------------------------------------
# Run config


def small_run_config(
    job_name: str = "full_pipeline",
    *,
    sequence_epochs: int = 2,
    conversion_epochs: int = 2,
    epochs: int | None = None,
    bootstrap_samples: int = 50,
    map_users: int = 300,
    torch_threads: int | None = None,
    simulator: dict | None = None,
    max_concurrent: int | None = None,
) -> dict:
    """Run config making `job_name` small: few epochs per model, few bootstrap replicates, a small
    t-SNE map; optionally a small simulator and the multiprocess executor.

    Op names come from the job itself (every `*_model` asset is a training op), so a model added to
    the definitions is made small too, and no op config is given to a job that lacks the op
    (Dagster rejects config for ops outside the job). `epochs` sets both families at once.
    `simulator`: `EventSource` fields (`simulator_n_users`, ...) as resource config, for launched
    jobs; tests calling `materialize()` pass configured resources instead. `max_concurrent`: the
    multiprocess executor from a forkserver (launched jobs); None leaves the executor alone
    (`materialize()` runs in process).
    """
    from trace_dagster.definitions import defs

    nodes = {node.name for node in defs.resolve_job_def(job_name).nodes}
    sequence_ops = {f"{kind}_model" for kind in SEQUENCE_MODELS}
    ops: dict[str, dict] = {}
    for name in sorted(n for n in nodes if n.endswith("_model")):
        op_epochs = epochs if epochs is not None else sequence_epochs if name in sequence_ops else conversion_epochs
        ops[name] = {"config": {"epochs": op_epochs}}
        if torch_threads is not None:
            ops[name]["config"]["torch_threads"] = torch_threads
    if "evaluation_metrics" in nodes:
        ops["evaluation_metrics"] = {"config": {"bootstrap_samples": bootstrap_samples}}
    if "user_embeddings" in nodes:
        ops["user_embeddings"] = {"config": {"map_users": map_users}}
    config: dict = {"ops": ops} if ops else {}
    if simulator:
        config["resources"] = {"event_source": {"config": dict(simulator)}}
    if max_concurrent is not None:
        config["execution"] = {
            "config": {
                "multiprocess": {
                    "max_concurrent": max_concurrent,
                    "start_method": {"forkserver": {"preload_modules": FORKSERVER_PRELOAD}},
                }
            }
        }
    return config


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


def job_by_name(job_name: str):
    """A job of the code location by name: the reconstructor of `reconstructable_job`."""
    from trace_dagster.definitions import defs

    return defs.resolve_job_def(job_name)


def reconstructable_job(job_name: str):
    """Any job of the definitions, rebuildable in step processes (the multiprocess executor needs
    that; `dg.reconstructable` only takes module-level factories, one per job)."""
    import dagster as dg

    return dg.build_reconstructable_job(
        "helpers",
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


# ---------------------------------------------------------------------------------------------
# Schedules


def _cron_field(spec: str, low: int, high: int) -> set[int]:
    """Values of one cron field (`*`, `a`, `a-b`, `*/n`, `a-b/n`, comma lists)."""
    values: set[int] = set()
    for part in spec.split(","):
        body, _, step = part.partition("/")
        start, end = (low, high) if body == "*" else (int(body.split("-")[0]), int(body.split("-")[-1]))
        values |= set(range(start, end + 1, int(step or 1)))
    return values


def cron_ticks(cron: str, timezone: str, after: datetime, n: int) -> list[datetime]:
    """The next `n` times strictly after `after` that match a 5-field cron in `timezone`.

    Minute by minute on the wall clock of `timezone` (a few weeks take a fraction of a second);
    Dagster has no public tick iterator, and this one is independent of the scheduler it checks.
    Day-of-month and day-of-week combine as in Vixie cron (either matches if both are restricted).
    """
    minute, hour, day, month, weekday = cron.split()
    minutes, hours, months = _cron_field(minute, 0, 59), _cron_field(hour, 0, 23), _cron_field(month, 1, 12)
    days, weekdays = _cron_field(day, 1, 31), {d % 7 for d in _cron_field(weekday, 0, 7)}  # 0 and 7: Sunday
    zone = ZoneInfo(timezone)
    t = after.astimezone(zone).replace(second=0, microsecond=0) + timedelta(minutes=1)
    found: list[datetime] = []
    while len(found) < n:
        cron_weekday = (t.weekday() + 1) % 7  # cron: 0 = Sunday
        if day != "*" and weekday != "*":
            day_ok = t.day in days or cron_weekday in weekdays
        else:
            day_ok = t.day in days and cron_weekday in weekdays
        if t.minute in minutes and t.hour in hours and t.month in months and day_ok:
            found.append(t)
        t += timedelta(minutes=1)
    return found


class QueryLog:
    """A warehouse `connect` (a callable giving a DuckDB connection as a context manager) that
    records every statement run on its connections: what a test asserts a step reads."""

    def __init__(self, connect):
        self.connect, self.queries = connect, []

    @contextlib.contextmanager
    def __call__(self):
        with self.connect() as con:
            yield _RecordingConnection(con, self.queries)


class _RecordingConnection:
    def __init__(self, con, queries):
        self._con, self._queries = con, queries

    def sql(self, query, *args, **kwargs):
        self._queries.append(query)
        return self._con.sql(query, *args, **kwargs)

    def execute(self, query, *args, **kwargs):
        self._queries.append(query)
        return self._con.execute(query, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._con, name)
