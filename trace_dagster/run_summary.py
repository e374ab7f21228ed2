"""The closing summary of `trace-dagster run`: what a person reads in ten seconds.

Every figure is read back from where the run wrote it (the warehouse's `evaluation_metrics`,
`evaluation_uplifts` and `drift_report`, the MLflow registry's aliases and promotion tags), never
from the console stream, so the summary says what the UI and the report say. Each section
degrades to one line when its source is missing (a run that failed before evaluation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import duckdb

from assets.conversion_models.assets import CONVERSION_MODELS, registered_name
from assets.trace_models.assets import SEQUENCE_MODELS
from resources.mlflow_tracking import TAG_DECISION, TAG_REASON, MLflowTracking
from resources.paths import REPORTS_DIR, WAREHOUSE_FILE
from trace_dagster.run_view import RunProgress, format_duration

PROMOTED_MODELS = ("trace", "mtlds")  # the registered models whose `champion` alias is gated


@dataclass
class RunOutcome:
    run_id: str
    success: bool
    seconds: float
    home: Path
    log_path: Path
    progress: RunProgress


def _query(warehouse: Path, sql: str, params: list | None = None) -> list[tuple] | None:
    """Rows of a read-only query, or None when the warehouse or the table is not there."""
    if not warehouse.exists():
        return None
    try:
        con = duckdb.connect(str(warehouse), read_only=True)
    except duckdb.Error:
        return None
    try:
        return con.execute(sql, params or []).fetchall()
    except duckdb.Error:
        return None
    finally:
        con.close()


def _columns(warehouse: Path, table: str) -> list[str]:
    rows = _query(warehouse, "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])
    return [name for (name,) in rows or []]


def model_lines(warehouse: Path, run_id: str, champions: dict[str, str]) -> list[str]:
    """One line per model evaluated in this run: version, champion or not, headline metric, uplift."""
    metrics = _query(
        warehouse,
        "SELECT model, any_value(model_version), task_kind, metric, avg(value), count(*) FROM evaluation_metrics "
        "WHERE dagster_run_id = ? AND split = 'test' GROUP BY model, task_kind, metric",
        [run_id],
    )
    if not metrics:
        return ["Models: no evaluation in this run"]
    # The mean-over-seen-tasks rows: their interval comes from the paired user bootstrap of the mean.
    uplifts = _query(
        warehouse,
        "SELECT model, baseline, uplift_pct, ci_low, ci_high FROM evaluation_uplifts "
        "WHERE dagster_run_id = ? AND task_kind = 'seen' AND metric = 'auroc' AND task = 'mean'",
        [run_id],
    )
    uplift = {(m, b): (u, lo, hi) for m, b, u, lo, hi in uplifts or []}
    value = {(m, kind, metric): (v, n) for m, _, kind, metric, v, n in metrics}
    version = {m: str(v) for m, v, *_ in metrics}
    lines = [
        "Models               version  headline (test, mean over tasks)        seen AUROC uplift vs myopic [95% CI, users]"
    ]
    for model in [*SEQUENCE_MODELS, *CONVERSION_MODELS]:
        if model not in version:
            continue
        name = registered_name(model) if model in CONVERSION_MODELS else model
        tag = "champion" if champions.get(name) == version[model] else ""
        if model in SEQUENCE_MODELS:
            seen, unseen = value.get((model, "seen", "auroc")), value.get((model, "unseen", "auroc"))
            headline = f"AUROC seen {seen[0]:.3f}" if seen else "AUROC seen n/a"
            headline += f", unseen {unseen[0]:.3f}" if unseen else ""
            gains = [
                f"{u:+.1f}% [{lo:+.1f}, {hi:+.1f}]" + ("" if baseline == "myopic" else f" vs {baseline}")
                for baseline in ("myopic", "st_agg")
                if (model, baseline) in uplift
                for u, lo, hi in [uplift[(model, baseline)]]
            ]
            gain = "; ".join(gains) or ("(baseline)" if model == "myopic" else "")
        else:
            auc, ndcg = value.get((model, "seen", "auc")), value.get((model, "seen", "ndcg"))
            headline = f"AUC {auc[0]:.3f}" if auc else "AUC n/a"
            headline += f", NDCG {ndcg[0]:.3f}" if ndcg else ""
            gain = ""
        lines.append(f"  {model:<20} v{version[model]:<3} {tag:<8} {headline:<31} {gain}".rstrip())
    return lines


def champion_lines(tracking: MLflowTracking, run_versions: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Who is `champion` of `trace` and `mtlds`, and what the gate decided for this run's version."""
    champions: dict[str, str] = {}
    parts = []
    try:
        client = tracking.client()
        for name in PROMOTED_MODELS:
            champion = tracking.champion_version(name)
            if champion is None:
                parts.append(f"{name}: none")
                continue
            champions[name] = champion
            mine = run_versions.get(name)
            if mine is None or mine == champion:
                parts.append(f"{name} v{champion}" + (" (this run)" if mine == champion else ""))
            else:
                tags = client.get_model_version(name, mine).tags
                why = tags.get(TAG_REASON) or tags.get(TAG_DECISION) or "not decided"
                parts.append(f"{name} v{champion} (kept; v{mine}: {why})")
    except Exception as error:  # a registry we cannot read must not hide the rest of the summary
        return [f"Champion: registry unreadable ({error.__class__.__name__}: {error})"], champions
    if not champions:
        return [f"Champion: none yet ({', '.join(PROMOTED_MODELS)})"], champions
    return ["Champion: " + "; ".join(parts)], champions


def check_lines(progress: RunProgress) -> list[str]:
    passed = sum(c.passed for c in progress.checks)
    warned = [c for c in progress.checks if c.status == "WARN"]
    failed = [c for c in progress.checks if c.status == "FAILED"]
    lines = [f"Checks: {passed} passed, {len(warned)} warned, {len(failed)} failed"]
    for c in failed + warned:
        lines.append(
            f"  {c.status:<6} {c.name}{' (blocking)' if c.blocking and c.status == 'FAILED' else ''}: {c.reason}"
        )
    return lines


def drift_lines(warehouse: Path, progress: RunProgress) -> tuple[list[str], str | None]:
    """Drift status from the run's drift checks and the latest `drift_report` row; the HTML report."""
    drift_checks = [c for c in progress.checks if c.name.startswith("drift_report:")]
    columns = _columns(warehouse, "drift_report")
    wanted = [c for c in ("dataset_drift", "drift_share", "report_path") if c in columns]
    row = _query(warehouse, f"SELECT {', '.join(wanted)} FROM drift_report ORDER BY checked_at DESC LIMIT 1")
    if not drift_checks and not row:
        return ["Drift: not checked in this run"], None
    latest = dict(zip(wanted, row[0])) if row else {}
    if all(c.passed for c in drift_checks):
        verdict = "no drift"
    elif any(c.status == "FAILED" for c in drift_checks):
        verdict = "DRIFT (a gated check failed: retraining is due)"
    else:
        verdict = "warning only"
    detail = []
    if "drift_share" in latest:
        detail.append(f"input drift share {latest['drift_share']:.2f}")
    for c in drift_checks:
        detail.append(f"{c.name.split(':', 1)[1]} {c.status}")
    return [f"Drift: {verdict} ({', '.join(detail)})"], latest.get("report_path")


def render_summary(outcome: RunOutcome) -> str:
    """The closing lines, from the run's event log, the warehouse and the registry."""
    home, progress = outcome.home, outcome.progress
    warehouse = home / WAREHOUSE_FILE
    tracking = MLflowTracking()
    state = "succeeded" if outcome.success else "FAILED"
    done = len(progress.finished)
    skipped = max(progress.total_steps - done, 0)
    lines = [
        "",
        f"full_pipeline {state} in {format_duration(outcome.seconds)}: {done} of {progress.total_steps} steps"
        + (f" ({skipped} not run)" if skipped else "")
        + f", run {outcome.run_id}",
    ]
    for step in progress.failed:
        lines.append(f"  step {step.key} failed: {step.error}")
    versions = _query(
        warehouse,
        "SELECT model, any_value(model_version) FROM evaluation_metrics WHERE dagster_run_id = ? GROUP BY model",
        [outcome.run_id],
    )
    run_versions = {
        (registered_name(m) if m in CONVERSION_MODELS else m): str(v) for m, v in versions or [] if v is not None
    }
    champion, champions = champion_lines(tracking, run_versions)
    lines += [*model_lines(warehouse, outcome.run_id, champions), *champion]
    lines += check_lines(progress)
    drift, drift_html = drift_lines(warehouse, progress)
    lines += drift
    uri = tracking.resolved_tracking_uri()
    report = home / REPORTS_DIR / "evaluation_latest.md"
    lines += [
        "",
        "Where to look:",
        f"  report      {report if report.exists() else '(not written in this run)'}",
    ]
    if drift_html:
        lines.append(f"  drift       {drift_html}")
    lines += [
        f"  full log    {outcome.log_path}",
        f"  Dagster UI  {_venv_bin('trace-dagster')} dev   -> http://127.0.0.1:3000/runs/{outcome.run_id}",
        f"  MLflow UI   {_venv_bin('mlflow')} ui --backend-store-uri {uri} -p 5000",
    ]
    return "\n".join(lines)


def _venv_bin(name: str) -> str:
    """The command as the README spells it when run from the repository, else the absolute path."""
    import sys

    path = Path(sys.executable).with_name(name)
    try:
        return str(path.relative_to(Path(os.getcwd()))) if path.is_relative_to(os.getcwd()) else str(path)
    except ValueError:
        return str(path)
