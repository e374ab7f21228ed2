"""`trace-dagster run` as a new user meets it: short output with a summary, the full log in a file.

The fast tests cover the pieces (flags, the epoch line the live view parses, check reasons); the
slow ones run the real command in a subprocess whose stdout is a pipe (no terminal), on a small
configuration passed with `--config`: once on the simulator (short output, summary, full event
log) and once on a file whose rows are mostly malformed, so that the blocking ingestion check
`rejected_share_below_threshold` fails and the run must stop with its reason and exit 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from helpers import small_run_config

from assets.common.training import parse_epoch_message
from trace_dagster.cli import apply_flags, build_parser, deep_merge
from trace_dagster.run_view import check_reason, failure_message

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = ("TRACE_DAGSTER_HOME", "TRACE_DAGSTER_EVENTS", "TRACE_DAGSTER_EVENTS_FORMAT", "MLFLOW_TRACKING_URI")


def test_run_help_lists_the_flags_with_their_defaults(monkeypatch):
    for name in ENV_VARS:  # the defaults shown are the environment's when set
        monkeypatch.delenv(name, raising=False)
    text = build_parser()._subparsers._group_actions[0].choices["run"].format_help()
    for flag, default in (
        ("--events", "unset: the built-in simulator"),
        ("--format", "canonical"),
        ("--home", ".trace_dagster/"),
        ("--verbose", "off"),
        ("--max-concurrent", "2"),
    ):
        assert flag in text
        assert default in " ".join(text.split()), f"{flag}: default {default!r} not shown"


def test_flags_set_the_environment_variables(monkeypatch, tmp_path):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(
        ["run", "--events", "data/*.csv.gz", "--format", "taobao", "--home", str(tmp_path / "h")]
    )
    apply_flags(args)
    assert os.environ["TRACE_DAGSTER_EVENTS"] == "data/*.csv.gz"
    assert os.environ["TRACE_DAGSTER_EVENTS_FORMAT"] == "taobao"
    assert os.environ["TRACE_DAGSTER_HOME"] == str((tmp_path / "h").resolve())
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--format", "parquet-ish"])


def test_config_file_is_merged_over_the_defaults():
    base = {"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}, "ops": {"a": {"config": {"x": 1}}}}
    merged = deep_merge(base, {"ops": {"a": {"config": {"y": 2}}, "b": {"config": {}}}})
    assert merged["ops"]["a"]["config"] == {"x": 1, "y": 2}
    assert merged["execution"] == base["execution"] and "b" in merged["ops"]


def test_epoch_line_is_parsed_back_for_the_live_view():
    epoch = parse_epoch_message("trace epoch 3/12: train 0.4123 valid 0.3990 (1520 seq/s) best")
    assert (epoch.model, epoch.epoch, epoch.epochs, epoch.valid_loss, epoch.rate, epoch.unit) == (
        "trace",
        3,
        12,
        0.399,
        1520,
        "seq/s",
    )
    assert parse_epoch_message("evaluation report: /tmp/x.md") is None


def test_check_reason_prefers_metadata_then_description_then_spec():
    def evaluation(metadata, description=None):
        return dg.AssetCheckEvaluation(
            asset_key=dg.AssetKey("raw_events"),
            check_name="c",
            passed=False,
            metadata=metadata,
            description=description,
        )

    assert check_reason(evaluation({"reason": dg.MetadataValue.text("share 0.4 > 0.05\nmore")}), "spec") == (
        "share 0.4 > 0.05"
    )
    assert check_reason(evaluation({}, "result description"), "spec") == "result description"
    assert check_reason(evaluation({}), "spec description") == "spec description"


def test_failure_message_unwraps_the_user_error():
    @dg.op
    def broken():
        raise ValueError("no conversions in funnel_examples")

    @dg.op
    def refuses():
        raise dg.Failure("labels are constant: nothing to learn")

    for op, expected in ((broken, "ValueError: no conversions in funnel_examples"), (refuses, "labels are constant")):
        result = (
            dg.GraphDefinition(name=f"g_{op.name}", node_defs=[op]).to_job().execute_in_process(raise_on_error=False)
        )
        failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
        assert failure_message(failure.event_specific_data).startswith(expected)


# ---------------------------------------------------------------------- the real command


def run_cli(tmp_path: Path, run_config: dict, *flags: str) -> tuple[subprocess.CompletedProcess, Path]:
    home = tmp_path / "home"
    config = tmp_path / "run_config.yaml"
    config.write_text(yaml.safe_dump(run_config))
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    command = [sys.executable, "-m", "trace_dagster.cli", "run", "--home", str(home), "--config", str(config), *flags]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    return done, home


def run_log(home: Path, stdout: str) -> str:
    run_id = re.search(r"run ([0-9a-f-]{36})", stdout).group(1)
    return (home / "logs" / f"{run_id}.log").read_text()


@pytest.mark.slow
def test_cli_without_terminal_prints_a_short_run_and_a_summary(tmp_path):
    config = small_run_config(sequence_epochs=2, conversion_epochs=2, bootstrap_samples=50)
    config["resources"] = {"event_source": {"config": {"simulator_n_users": 300, "simulator_days": 35}}}
    done, home = run_cli(tmp_path, config)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    lines = out.splitlines()
    # "under about 60 lines": one per step (34 now that full_pipeline trains st_agg, st_cohort, mini_gpt
    # and myopic_last_page too) plus a ~28-line summary; a log dump is ~600 lines.
    assert len(lines) < 66, out
    for section in ("full_pipeline succeeded", "Models ", "Champion: trace v1", "Checks:", "Drift:", "Where to look:"):
        assert section in out, f"{section!r} missing from:\n{out}"
    assert re.search(r"^  trace +v1 +champion +AUROC seen 0\.\d{3}.*[+-]\d+\.\d% \[", out, re.M), out
    # No Dagster DEBUG events, MLflow artifact bars or library warnings on the console.
    for noise in ("STEP_WORKER_STARTING", "LOADED_INPUT", "Downloading artifacts", "Warning"):
        assert noise not in out
    # One line per finished step, and the log file holds every event of the run.
    steps = [line for line in lines if re.match(r"^\[ ?\d+/\d+\]", line)]
    log = run_log(home, out)
    assert len(steps) == log.count(" STEP_SUCCESS - ") == log.count(" STEP_START - ")
    # The stored event types keep their old names for runs: PIPELINE_START, PIPELINE_SUCCESS.
    for event in (
        "PIPELINE_START",
        "STEP_WORKER_STARTING",
        "RESOURCE_INIT_STARTED",
        "LOADED_INPUT",
        "PIPELINE_SUCCESS",
    ):
        assert f" {event} - " in log, event
    assert re.search(r"trace epoch 2/2: train", log)


@pytest.mark.slow
def test_failing_blocking_check_prints_its_reason_and_exits_non_zero(tmp_path):
    """A file whose rows are mostly malformed: ingestion quarantines them, the blocking share check fails."""
    events = tmp_path / "events.csv"
    good = [f"u{i % 7},2026-01-05T{10 + i % 10}:00:00,page_view,i{i},c1" for i in range(40)]
    bad = [f"u{i},not-a-time,page_view,i{i},c1" for i in range(60)]
    events.write_text("user_id,event_time,event_name,item_id,category\n" + "\n".join(good + bad) + "\n")
    done, home = run_cli(tmp_path, {}, "--events", str(events), "--format", "canonical")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "full_pipeline FAILED" in out
    summary = out[out.index("full_pipeline FAILED") :]
    match = re.search(r"FAILED raw_events:rejected_share_below_threshold \(blocking\): (.+)", summary)
    assert match, out
    assert "reject" in match.group(1) and match.group(1) != "no reason recorded", out
    assert "step ingestion_checks failed: blocking check failed: raw_events:rejected_share_below_threshold" in out
    assert "not run" in out, out  # the blocking check stopped everything downstream
    assert " STEP_SKIPPED - " in run_log(home, out) or "ASSET_CHECK_EVALUATION" in run_log(home, out)
