#!/usr/bin/env bash
# Create .venv in the repo root (if there is none) and install the project with its dev extras.
# Idempotent: a second call only re-checks the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.trace_dagster_installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  # torch first, exactly this version: the CPU wheel on this machine's pip path.
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[dev,k8s]"  # k8s: so that tests/test_k8s_config.py validates the config
  touch "$stamp"
fi
