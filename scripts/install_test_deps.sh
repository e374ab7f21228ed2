#!/usr/bin/env bash
# System packages that only the slow end-to-end tests need: Debian's chromium (headless
# screenshots of the Dagster UI in tests/test_ui_e2e.py). Idempotent and quiet: does nothing when
# /usr/bin/chromium exists. Exit codes: 0 installed/present, 2 apt-get unavailable, 1 install failed.
set -euo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [[ -x $CHROMIUM ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_test_deps: apt-get not found; install chromium by hand" >&2
  exit 2
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_test_deps: not root and no password-less sudo; install chromium by hand" >&2
    exit 2
  fi
fi
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Several test sessions may start at once: apt's own lock serializes them (wait up to 10 min).
if ! { $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq &&
       $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
  echo "install_test_deps: apt-get failed:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
if [[ ! -x $CHROMIUM ]]; then
  echo "install_test_deps: chromium installed but $CHROMIUM is missing" >&2
  exit 1
fi
