"""MLflow tracking and model registry: our own thin Dagster resource.

`dagster-mlflow` is legacy (MLflow 2 stages, no aliases), so this resource wraps the few MLflow 3
calls the pipeline needs: create the store once, open runs, register models as pyfunc wrappers that
keep `embed()`, read and move the `champion` / `previous` aliases under a store lock, roll back.
When a challenger deserves `champion` is decided in `assets/model_registry/policy.py`.

Store: `tracking_uri` (config) > env `MLFLOW_TRACKING_URI` > `sqlite:///$TRACE_DAGSTER_HOME/mlflow.db`
(TRACE_DAGSTER_HOME defaults to `.trace_dagster/` under the current directory). For SQLite stores
the artifacts live beside the database, in `mlartifacts/`, never in the current directory.

Aliases (contract: registered models `trace` and `mtlds`, aliases `champion` and `previous`):
- `champion` is the version served; a challenger takes it only if it beats the champion by a margin
  on the same held-out examples *and* every asset check passed (`policy.promote_if_better`).
- `previous` is the champion it replaced: `rollback` makes it champion again.
- MLflow keeps an alias on one version at a time, and moving it is one write, so there is never more
  than one champion. Promotion writes `previous` before `champion`: a crash in between leaves the old
  champion both champion and previous (still served, still reachable); the reverse order could leave
  the old champion with no alias at all.
- Every decision is written as `promotion.*` tags on the challenger's model version.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import dagster as dg
import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import Field

from assets.model_registry import pyfunc_model as mlflow_models
from resources.paths import MLFLOW_DB, resolve_home

CHAMPION = "champion"
PREVIOUS = "previous"
TAG_PREFIX = "promotion."
#: Version tags that `promote_if_better` and `rollback` write (the audit trail of the registry).
TAG_DECISION = TAG_PREFIX + "decision"  # "promoting" (interrupted), "promoted" or "rejected"
TAG_REASON = TAG_PREFIX + "reason"
TAG_DELTA = TAG_PREFIX + "delta"
TAG_DECIDED_AT = TAG_PREFIX + "decided_at"


def default_tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite file in TRACE_DAGSTER_HOME (read from the env)."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        return from_env
    return f"sqlite:///{resolve_home() / MLFLOW_DB}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (absolute or relative), None for other stores."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    path = tracking_uri[len(prefix) :].split("?", 1)[0]
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive advisory lock (fcntl) that serializes processes sharing one local store."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _installed_package_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    return [Path(paths[key]).resolve() for key in ("purelib", "platlib", "stdlib") if key in paths]


def code_paths_for(import_paths: Sequence[str]) -> list[str]:
    """Local source that a model's loader needs in a fresh process, for `log_model(code_paths=...)`.

    For each "package.module:function", the top-level package directory (or single module file)
    is shipped with the model, unless it is installed in site-packages or the standard library
    (the serving environment installs those from the model's requirements).
    """
    installed = _installed_package_dirs()
    found: list[str] = []
    for import_path in import_paths:
        top_level = import_path.partition(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top_level)
        if spec is None:
            raise ValueError(f"cannot find module {top_level!r} (from {import_path!r})")
        if spec.submodule_search_locations:  # a package: ship its directory
            location = Path(next(iter(spec.submodule_search_locations))).resolve()
        elif spec.origin and spec.origin not in ("built-in", "frozen"):
            location = Path(spec.origin).resolve()
        else:
            continue
        if any(location.is_relative_to(root) for root in installed):
            continue
        if str(location) not in found:
            found.append(str(location))
    return found


def _default_pip_requirements() -> list[str]:
    """Pins of the libraries the wrapper needs; skips MLflow's slow requirement inference."""
    pins = []
    for package in ("mlflow", "numpy", "pandas", "torch"):
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version registered by `log_model_artifact`."""

    name: str
    version: str
    model_uri: str  # models:/<name>/<version>
    run_id: str | None
    logged_model_uri: str  # models:/<logged model id>, the MLflow 3 LoggedModel


@dataclass(frozen=True)
class RollbackResult:
    """Outcome of `rollback`."""

    rolled_back: bool
    champion_version: str | None  # the champion after the rollback
    demoted_version: str | None  # the champion that was rolled back
    previous_version: str | None  # the `previous` alias after the rollback
    reason: str


class MLflowTracking(dg.ConfigurableResource):
    """MLflow tracking + registry for the pipeline's assets.

    Set `tracking_uri` from resource config (e.g. `dg.EnvVar("MLFLOW_TRACKING_URI")`) or leave it
    unset to use the env var or the SQLite store in TRACE_DAGSTER_HOME. `start_run` sets MLflow's
    process-wide tracking URI and experiment (MLflow's fluent API has no other way), so one process
    should use one store at a time; Dagster's default multiprocess executor gives each step its own.
    """

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow store URI. Unset: env MLFLOW_TRACKING_URI, else "
        "sqlite:///$TRACE_DAGSTER_HOME/mlflow.db with artifacts in $TRACE_DAGSTER_HOME/mlartifacts.",
    )
    experiment_name: str = Field(default="trace-dagster", description="MLflow experiment of every run.")

    # ---------------------------------------------------------------- store

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()

    def artifact_location(self) -> str | None:
        """`mlartifacts/` beside a SQLite database; None lets other stores (servers) decide."""
        db_path = sqlite_path(self.resolved_tracking_uri())
        return (db_path.parent / "mlartifacts").as_uri() if db_path else None

    def client(self) -> MlflowClient:
        uri = self.resolved_tracking_uri()
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    @contextmanager
    def store_lock(self) -> Iterator[None]:
        """Serializes store creation and alias moves between processes on a local SQLite store.

        A tracking server (http URI) serializes its own writes; there is no local file to lock.
        """
        db_path = sqlite_path(self.resolved_tracking_uri())
        if db_path is None:
            yield
            return
        with _file_lock(db_path.with_name(db_path.name + ".lock")):
            yield

    def ensure_store(self) -> str:
        """Create the store (SQLite schema) and the experiment if needed; return the experiment id.

        Creating a SQLite store runs MLflow's schema migrations, and two processes doing that on a
        new file at once fail; the file lock makes the first one create it and the others find it.
        Call it once before a parallel run (the CLI does); calling it again is cheap and harmless.
        """
        with self.store_lock():
            db_path = sqlite_path(self.resolved_tracking_uri())
            if db_path is not None:
                db_path.parent.mkdir(parents=True, exist_ok=True)
            client = self.client()
            experiment = client.get_experiment_by_name(self.experiment_name)  # creates the schema
            client.search_registered_models(max_results=1)  # and the registry's tables
            if experiment is not None:
                return experiment.experiment_id
            try:
                return client.create_experiment(self.experiment_name, artifact_location=self.artifact_location())
            except MlflowException:  # created meanwhile by a process outside our lock (server)
                experiment = client.get_experiment_by_name(self.experiment_name)
                if experiment is None:
                    raise
                return experiment.experiment_id

    # ---------------------------------------------------------------- runs

    def _use_store(self) -> None:
        # MLflow's fluent API (runs, log_model, `models:/` URIs) reads process-wide URIs.
        uri = self.resolved_tracking_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)

    @contextmanager
    def start_run(
        self,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
    ) -> Iterator[mlflow.ActiveRun]:
        """Open an MLflow run in our store and experiment; yields the active run.

        The run ends FAILED if the block raises, so a crashed training shows up as such.
        """
        experiment_id = self.ensure_store()
        self._use_store()
        mlflow.set_experiment(experiment_id=experiment_id)
        str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        with mlflow.start_run(run_name=run_name, tags=str_tags, nested=nested) as run:
            yield run

    def log_model_artifact(
        self,
        artifact_path_on_disk: str | os.PathLike,
        *,
        registered_model_name: str,
        loader: str,
        name: str = "model",
        predict_method: str = "embed",
        input_format: str = "frame",
        input_adapter: str | None = None,
        output_prefix: str | None = None,
        input_example: Any = None,
        signature: Any = None,
        extra_code_paths: Sequence[str | os.PathLike] = (),
        pip_requirements: Sequence[str] | None = None,
        version_tags: Mapping[str, Any] | None = None,
    ) -> RegisteredVersion:
        """Log our model artifact file as a pyfunc wrapper in the active run and register it.

        `loader` ("package.module:function") turns the artifact's path into the model object, e.g.
        "model_lib.artifact:load_model"; its package is shipped as code_paths so that
        `mlflow.pyfunc.load_model("models:/<name>/<version>")` works in a fresh process. There,
        `.unwrap_python_model()` exposes the object (`.model`, and `.embed(...)` by delegation),
        and `.predict(frame)` returns the output of `predict_method` as a DataFrame.
        `input_format` / `input_adapter`: see `assets.model_registry.pyfunc_model.ArtifactModel`.
        """
        artifact = Path(artifact_path_on_disk)
        if not artifact.is_file():
            raise FileNotFoundError(f"model artifact not found: {artifact}")
        if input_format not in mlflow_models.INPUT_FORMATS:
            raise ValueError(f"input_format must be one of {mlflow_models.INPUT_FORMATS}")
        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("log_model_artifact needs an active run: call it inside start_run()")
        mlflow_models.resolve_import_path(loader)  # fail here, not in the serving process
        import_paths = [loader] + ([input_adapter] if input_adapter else [])
        code_paths = code_paths_for(import_paths) + [str(Path(p).resolve()) for p in extra_code_paths]
        model_config = {
            "loader": loader,
            "predict_method": predict_method,
            "input_format": input_format,
            "output_prefix": output_prefix or predict_method,
        }
        if input_adapter:
            model_config["input_adapter"] = input_adapter
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=mlflow_models.__file__,
            artifacts={mlflow_models.MODEL_ARTIFACT_KEY: str(artifact.resolve())},
            model_config=model_config,
            code_paths=code_paths or None,
            input_example=input_example,
            signature=signature,
            pip_requirements=list(pip_requirements or _default_pip_requirements()),
            registered_model_name=registered_model_name,
        )
        version = str(info.registered_model_version)
        if version_tags:
            client = self.client()
            for key, value in version_tags.items():
                client.set_model_version_tag(registered_model_name, version, key, str(value))
        return RegisteredVersion(
            name=registered_model_name,
            version=version,
            model_uri=f"models:/{registered_model_name}/{version}",
            run_id=run.info.run_id,
            logged_model_uri=info.model_uri,
        )

    def load_model(self, model_uri: str) -> Any:
        """The object a registered version wraps (e.g. `models:/trace/3`), loaded through MLflow.

        What the version's loader returned (for TRACE, model_lib's artifact with `embed()` and
        `predict_proba()`), built from the code and artifact stored with the version, as any
        consumer of the registry would get it. `mlflow.pyfunc.load_model` gives the pyfunc view.
        """
        self._use_store()
        wrapper = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
        model = vars(wrapper).get("model")
        if model is None:
            raise TypeError(f"{model_uri} was not logged by log_model_artifact: no wrapped model")
        return model

    # ---------------------------------------------------------------- registry

    def aliases(self, model_name: str) -> dict[str, str]:
        """alias -> version (as str) of a registered model ({} if the model is not registered yet).

        MLflow 3.17's `RegisteredModel.aliases` holds versions as int, everything else as str.
        """
        try:
            aliases = self.client().get_registered_model(model_name).aliases
            return {alias: str(version) for alias, version in aliases.items()}
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    def champion_version(self, model_name: str) -> str | None:
        return self.aliases(model_name).get(CHAMPION)

    def previous_version(self, model_name: str) -> str | None:
        return self.aliases(model_name).get(PREVIOUS)

    def set_version_tags(self, model_name: str, version: str, tags: Mapping[str, Any]) -> None:
        client = self.client()
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, "" if value is None else str(value))

    def move_champion(self, model_name: str, challenger: str, champion: str | None) -> None:
        """Make `challenger` the champion and `champion` (if any) `previous`; call under `store_lock`.

        `previous` is written first: a crash in between leaves the old champion both champion and
        previous (still served, still reachable); the reverse order could leave it with no alias.
        """
        client = self.client()
        if champion is not None:
            client.set_registered_model_alias(model_name, PREVIOUS, champion)
        client.set_registered_model_alias(model_name, CHAMPION, challenger)
        if champion is not None:
            self.set_version_tags(model_name, champion, {TAG_PREFIX + "superseded_by": challenger})

    def rollback(self, model_name: str, expected_champion: str | int | None = None) -> RollbackResult:
        """Make `previous` the champion again; the rolled-back version loses both aliases.

        Design: the demoted version is *not* made `previous`, so a repeated rollback (an operator's
        double click, a sensor firing twice) cannot reinstate the bad model; it fails clearly
        instead. The demoted version stays reachable by number and is tagged
        `promotion.rolled_back_at` / `promotion.rolled_back_to`. `expected_champion` makes the
        rollback conditional (compare-and-swap): nothing happens unless it is still the champion.
        Order of writes: `champion` moves first (one write: never zero or two champions), then
        `previous` is removed; a crash in between leaves the restored version both champion and
        previous, which is valid.
        """
        with self.store_lock():
            aliases = self.aliases(model_name)
            champion, previous = aliases.get(CHAMPION), aliases.get(PREVIOUS)
            if expected_champion is not None and champion != str(expected_champion):
                return RollbackResult(
                    False,
                    champion,
                    None,
                    previous,
                    f"{CHAMPION} is v{champion}, not v{expected_champion}: nothing rolled back",
                )
            if previous is None or previous == champion:
                return RollbackResult(False, champion, None, previous, f"no {PREVIOUS} version to roll back to")
            client = self.client()
            client.set_registered_model_alias(model_name, CHAMPION, previous)
            client.delete_registered_model_alias(model_name, PREVIOUS)
            now = utc_now_iso()
            if champion is not None:
                self.set_version_tags(
                    model_name,
                    champion,
                    {TAG_PREFIX + "rolled_back_at": now, TAG_PREFIX + "rolled_back_to": previous},
                )
            self.set_version_tags(model_name, previous, {TAG_PREFIX + "restored_at": now})
            return RollbackResult(
                True,
                previous,
                champion,
                None,
                f"v{champion} rolled back to v{previous}" if champion else f"v{previous} restored",
            )
