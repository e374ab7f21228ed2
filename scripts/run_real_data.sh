#!/usr/bin/env bash
# Run the full pipeline on the real Taobao UserBehavior slices through the product's own CLI, then
# print the evaluation report.
#
#   bash scripts/run_real_data.sh [HOME_DIR]
#
# - Input: both slices under ../shared/data/taobao_userbehavior/ (TRACE_DAGSTER_EVENTS, a glob;
#   override with TRACE_DAGSTER_EVENTS=... if the data lives elsewhere), format `taobao`.
# - State: a separate TRACE_DAGSTER_HOME (default .trace_dagster/taobao/ in the repository root,
#   git-ignored; or the first argument), so the simulator's home (.trace_dagster/) never mixes its
#   tables, models or registry with real data. The warehouse,
#   the MLflow store (sqlite:///HOME/mlflow.db unless MLFLOW_TRACKING_URI is set), the Dagster
#   instance and the reports all live there. Re-running on the same home ingests nothing new
#   (files are read once per content), retrains every model and lets promotion decide.
# - Settings: the assets' defaults (real epochs with early stopping, 200 bootstrap replicates),
#   `full_pipeline` under the multiprocess executor with two steps at once. Several minutes on
#   two cores.
# - Output: the CLI's run summary (materializations and checks), then
#   HOME/reports/evaluation_latest.md. The exit code is the run's (0 only if every step succeeded);
#   the report is printed whenever this run wrote one (never a stale one from an earlier run).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
data="${TAOBAO_DIR:-$repo/../shared/data/taobao_userbehavior}"
home="${1:-$repo/.trace_dagster/taobao}"

if [[ -z "${TRACE_DAGSTER_EVENTS:-}" ]]; then
  shopt -s nullglob
  files=("$data"/*.csv.gz)
  shopt -u nullglob
  if (( ${#files[@]} == 0 )); then
    echo "no Taobao slices (*.csv.gz) under $data: set TAOBAO_DIR or TRACE_DAGSTER_EVENTS" >&2
    exit 2
  fi
  export TRACE_DAGSTER_EVENTS="$(cd "$data" && pwd)/*.csv.gz"
fi
export TRACE_DAGSTER_EVENTS_FORMAT=taobao
mkdir -p "$home"
export TRACE_DAGSTER_HOME="$(cd "$home" && pwd)"

echo "events:  $TRACE_DAGSTER_EVENTS (format $TRACE_DAGSTER_EVENTS_FORMAT)"
echo "home:    $TRACE_DAGSTER_HOME"
echo "started: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
start=$SECONDS
stamp="$(mktemp)"
trap 'rm -f "$stamp"' EXIT
status=0
"$repo/.venv/bin/trace-dagster" run || status=$?
echo "finished: $(date -u +%Y-%m-%dT%H:%M:%SZ) after $((SECONDS - start))s, exit code $status"

report="$TRACE_DAGSTER_HOME/reports/evaluation_latest.md"
if [[ -f $report && $report -nt $stamp ]]; then
  echo
  echo "=== $report ==="
  cat "$report"
else
  echo "this run wrote no evaluation report ($report)" >&2
  (( status != 0 )) || status=1
fi
exit "$status"
