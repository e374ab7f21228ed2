"""Every benchmark runs both ways: `python bench/<name>.py` and `python -m bench.<name>`."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "bench").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def test_every_benchmark_is_found():
    assert {p.stem for p in SCRIPTS} >= {"sessionize", "trace_model", "mtlds_model"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
@pytest.mark.parametrize("how", ["path", "module"])
def test_benchmark_starts(script: Path, how: str):
    command = [str(script.relative_to(REPO))] if how == "path" else ["-m", f"bench.{script.stem}"]
    done = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
