"""model_lib is pure PyTorch/numpy/pandas: it never imports the workflow (docs/ARCHITECTURE.md)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

MODEL_LIB = Path(__file__).resolve().parents[1] / "model_lib"
FORBIDDEN = ("dagster", "assets", "resources", "trace_dagster", "mlflow", "evidently", "duckdb")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            roots |= {
                a.value.split(".")[0] for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return roots


def test_no_forbidden_import_statement_in_model_lib():
    files = sorted(MODEL_LIB.glob("*.py"))
    assert len(files) >= 8
    offenders = {f.name: sorted(imported_roots(f) & set(FORBIDDEN)) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_model_lib_module_loads_no_workflow_package():
    modules = sorted(f"model_lib.{f.stem}" for f in MODEL_LIB.glob("*.py") if f.stem != "__init__")
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=MODEL_LIB.parent, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_static_check_sees_imports():
    """Guard against a checker that can never fail."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(
            "import os\nfrom dagster import asset\nimport resources.event_sources.simulator as s\nimportlib.import_module('duckdb')\n"
        )
    assert imported_roots(Path(f.name)) >= {"dagster", "resources", "duckdb"}
