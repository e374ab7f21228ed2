"""What `trace-dagster run` shows while a run goes, read from the run's Dagster event log.

Why from the event log: the steps run in other processes (the multiprocess executor), and every
event they emit, DEBUG ones included, is stored in the instance's event log. One watcher thread
reads it back and so owns every line that reaches the console or the log file, in order, with no
interleaving between processes:

- the log file `TRACE_DAGSTER_HOME/logs/<run_id>.log` gets every event (the full stream);
- the console gets one line per finished step and, on a terminal, a live footer (rich) with the
  steps done out of the total, the elapsed time and the running steps, with epoch k of n,
  throughput and validation loss for training steps (parsed from the epoch log line that
  `assets.common.training.epoch_logger` writes); `--verbose` adds the full stream.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO

import dagster as dg
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from assets.common.training import EpochProgress, parse_epoch_message

#: Tag that lets the watcher find the run that `execute_job` is about to create.
WATCH_TAG = "trace_dagster/cli_token"
POLL_SECONDS = 0.5


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def one_line(text: str, width: int = 240) -> str:
    """The first non-empty line of a message, shortened: what a console line can hold."""
    for line in (text or "").strip().splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= width else line[: width - 3] + "..."
    return ""


def failure_message(data) -> str:
    """Why a step failed: the Failure's description, else the user error under Dagster's wrapper."""
    user = getattr(data, "user_failure_data", None)
    if user is not None and user.description:
        return user.description
    error = getattr(data, "error", None)
    while error is not None and error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause  # "Error occurred while executing op ..." wraps the user's exception
    if error is None:
        return "no error recorded"
    # SerializableErrorInfo.message is "module.path.ClassName: text" for some errors, "text" for others.
    text = error.message.strip()
    qualified = text.split(":", 1)[0]
    if qualified.endswith(error.cls_name):
        text = text[len(qualified) + 1 :].strip()
    return f"{error.cls_name}: {text or 'no message (a crashed process: its stderr is in the full log)'}"


@dataclass
class CheckOutcome:
    """One asset check evaluation, with the reason a person reads."""

    name: str  # "asset:check"
    passed: bool
    severity: str  # "ERROR" or "WARN"
    blocking: bool
    reason: str
    step_key: str = ""  # the step that ran it (a multi-check op runs several)

    @property
    def status(self) -> str:
        if self.passed:
            return "passed"
        return "WARN" if self.severity == "WARN" else "FAILED"


@dataclass
class StepState:
    key: str
    started: float
    epoch: EpochProgress | None = None
    finished: float | None = None
    status: str = "running"  # starting (process spawn), running, ok, FAILED, skipped
    error: str = ""


@dataclass
class RunProgress:
    """Everything the console and the summary need, updated event by event."""

    total_steps: int = 0
    steps: dict[str, StepState] = field(default_factory=dict)
    checks: list[CheckOutcome] = field(default_factory=list)
    run_status: str = ""

    @property
    def running(self) -> list[StepState]:
        return [s for s in self.steps.values() if s.status in ("starting", "running")]

    @property
    def finished(self) -> list[StepState]:
        return [s for s in self.steps.values() if s.status not in ("starting", "running")]

    @property
    def failed(self) -> list[StepState]:
        return [s for s in self.steps.values() if s.status == "FAILED"]


def check_descriptions(checks_and_assets) -> dict[str, str]:
    """'asset:check' -> the check's description: the fallback reason when a result has none."""
    out = {}
    for definition in checks_and_assets:
        for spec in getattr(definition, "check_specs", []) or []:
            out[f"{spec.asset_key.to_user_string()}:{spec.name}"] = spec.description or ""
    return out


def check_reason(evaluation, fallback: str) -> str:
    """The `reason` metadata a failing/warning check carries, else its description, else the fallback."""
    value = evaluation.metadata.get("reason")
    if value is not None:
        reason = getattr(value, "value", value)
        if str(reason).strip():
            return one_line(str(reason))
    if evaluation.description:
        return one_line(evaluation.description)
    return one_line(fallback) or "no reason recorded"


class RunWatcher:
    """Follows one run's event log: updates `RunProgress`, writes the log file and the console."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        token: str,
        console: Console,
        log_file: IO[str],
        verbose: bool = False,
        check_descriptions: dict[str, str] | None = None,
    ):
        self.instance = instance
        self.token = token
        self.console = console
        self.log_file = log_file
        self.verbose = verbose
        self.descriptions = check_descriptions or {}
        self.progress = RunProgress()
        self.run_id: str | None = None
        self.run_id_known = threading.Event()
        self.started = time.monotonic()
        self._cursor: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="trace-dagster-run-watcher", daemon=True)

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Read what is left of the log (the run has ended) and stop."""
        self._stop.set()
        self._thread.join()

    def _follow(self) -> None:
        live = Live(self._footer(), console=self.console, refresh_per_second=4, transient=True, auto_refresh=False)
        use_live = self.console.is_terminal and not self.verbose
        if use_live:
            live.start()
        try:
            while True:
                stopping = self._stop.is_set()
                self._find_run()
                if self.run_id is not None:
                    self._drain(live if use_live else None)
                if use_live:
                    live.update(self._footer(), refresh=True)
                if stopping:
                    break
                self._stop.wait(POLL_SECONDS)
        finally:
            if use_live:
                live.stop()

    def _find_run(self) -> None:
        if self.run_id is not None:
            return
        runs = self.instance.get_runs(filters=dg.RunsFilter(tags={WATCH_TAG: self.token}), limit=1)
        if runs:
            run = runs[0]
            self.run_id = run.run_id
            if run.execution_plan_snapshot_id:
                plan = self.instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
                self.progress.total_steps = len(plan.step_keys_to_execute or plan.steps)
            self.run_id_known.set()

    def _drain(self, live: Live | None) -> None:
        while True:
            connection = self.instance.get_records_for_run(self.run_id, cursor=self._cursor, limit=500)
            for record in connection.records:
                self._on_entry(record.event_log_entry, live)
            self.log_file.flush()
            self._cursor = connection.cursor
            if not connection.has_more:
                return

    # ------------------------------------------------------------------ events

    def _say(self, text: str, live: Live | None) -> None:
        (live.console if live is not None else self.console).print(text, highlight=False, markup=False)

    def _on_entry(self, entry, live: Live | None) -> None:
        line = self._log_line(entry)
        self.log_file.write(line + "\n")
        if self.verbose:
            self._say(line, live)
        event = entry.dagster_event
        if event is None:
            epoch = parse_epoch_message(entry.user_message or "")
            if epoch is not None and entry.step_key in self.progress.steps:
                self.progress.steps[entry.step_key].epoch = epoch
            return
        kind = event.event_type_value
        key = event.step_key
        now = time.monotonic()
        if kind == "STEP_WORKER_STARTING" and key:  # a process is being started for the step
            self.progress.steps[key] = StepState(key, now, status="starting")
        elif kind == "STEP_START" and key:
            self.progress.steps[key] = StepState(key, now)
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED") and key:
            state = self.progress.steps.setdefault(key, StepState(key, now))
            state.finished = now
            state.status = {"STEP_SUCCESS": "ok", "STEP_FAILURE": "FAILED", "STEP_SKIPPED": "skipped"}[kind]
            if kind == "STEP_FAILURE":
                state.error = one_line(failure_message(event.event_specific_data))
                blocking = [c.name for c in self.progress.checks if c.step_key == key and c.status == "FAILED"]
                if blocking and "AssetCheckFailed" in state.error:  # the reason is on the check's own line
                    state.error = f"blocking check failed: {', '.join(blocking)}"
            self._say(self._finished_line(state), live)
        elif kind == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            name = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            self.progress.checks.append(
                CheckOutcome(
                    name=name,
                    passed=evaluation.passed,
                    severity=evaluation.severity.value,
                    blocking=bool(evaluation.blocking),
                    reason="" if evaluation.passed else check_reason(evaluation, self.descriptions.get(name, "")),
                    step_key=key or "",
                )
            )
        elif kind in ("PIPELINE_SUCCESS", "PIPELINE_FAILURE", "PIPELINE_CANCELED"):  # the stored names of RUN_*
            self.progress.run_status = kind

    def _log_line(self, entry) -> str:
        stamp = datetime.fromtimestamp(entry.timestamp).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        level = logging.getLevelName(entry.level) if isinstance(entry.level, int) else str(entry.level)
        event = entry.dagster_event
        kind = event.event_type_value if event is not None else "LOG"
        message = entry.message if event is not None else (entry.user_message or "")
        if event is not None and kind == "STEP_FAILURE" and event.event_specific_data.error is not None:
            message += "\n" + event.event_specific_data.error_display_string
        return f"{stamp} {level:<7} {entry.step_key or '-'} {kind} - {message}"

    # ------------------------------------------------------------------ console

    def _counter(self) -> str:
        total = self.progress.total_steps or "?"
        return f"[{len(self.progress.finished):>2}/{total}] {format_duration(time.monotonic() - self.started):>5}"

    def _finished_line(self, state: StepState) -> str:
        seconds = (state.finished or state.started) - state.started
        detail = f"{seconds:5.1f}s"
        if state.epoch is not None:
            e = state.epoch
            detail += f"  {e.epoch}/{e.epochs} epochs, valid loss {e.valid_loss:.4f}, {e.rate} {e.unit}"
        line = f"{self._counter()}  {state.status:<7} {state.key:<34} {detail}"
        if state.status == "FAILED":  # checks that failed or warned are listed with reasons in the summary
            line += f"\n{'':>16}why: {state.error}"
        return line

    def _footer(self):
        """The live part on a terminal: progress bar, elapsed time, the running steps."""
        total = self.progress.total_steps or 1
        done = len(self.progress.finished)
        head = Table.grid(padding=(0, 1))
        head.add_row(
            Text("full_pipeline", style="bold"),
            ProgressBar(total=total, completed=done, width=30),
            Text(f"{done}/{self.progress.total_steps or '?'} steps"),
            Text(f"elapsed {format_duration(time.monotonic() - self.started)}"),
        )
        rows = Table.grid(padding=(0, 2))
        for state in self.progress.running:
            e = state.epoch
            if e is not None:
                detail = f"epoch {e.epoch}/{e.epochs}  {e.rate} {e.unit}  valid loss {e.valid_loss:.4f}"
            else:
                detail = state.status  # "starting" (its process) or "running"
            rows.add_row(
                Text(f"  {state.key}", style="cyan"),
                Text(detail),
                Text(format_duration(time.monotonic() - state.started)),
            )
        return Group(head, rows)
