"""No import circle: only `trace_dagster/` imports the code location (`trace_dagster.definitions`).

Assets and resources are the parts the definitions are made of; if one of them imported the
definitions (even lazily, inside a function), loading the code location would depend on itself.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("assets", "resources", "model_lib")


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every absolute import in a file, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def part_files() -> list[Path]:
    return sorted(f for part in PARTS for f in (REPO / part).rglob("*.py"))


def test_no_part_imports_the_code_location():
    files = part_files()
    assert len(files) >= 30
    offenders = {
        str(f.relative_to(REPO)): sorted(n for n in imported_modules(f) if n.split(".")[0] == "trace_dagster")
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_every_asset_module_leaves_the_definitions_unloaded():
    modules = sorted(
        ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for f in (REPO / "assets").rglob("*.py")
    )
    assert "assets.model_registry.assets" in modules and len(modules) >= 20
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'trace_dagster')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_checks_see_a_lazy_import(tmp_path):
    """Guard against a checker that can never fail: an import inside a function counts."""
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from trace_dagster.definitions import defs\n    return defs\n")
    assert "trace_dagster.definitions" in imported_modules(source)


def test_the_gate_receives_every_check_upstream_of_it():
    """What the gate used to find by importing the definitions, it now receives: the same keys."""
    from collections import deque

    from trace_dagster.definitions import defs, model_promotion

    graph = defs.resolve_asset_graph()
    seen, queue = set(), deque([model_promotion.key])
    while queue:
        for parent in graph.get(queue.popleft()).parent_keys:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    upstream = {k for k in graph.asset_check_keys if k.asset_key in seen}
    assert {"raw_events", "sessionized_events", "training_examples", "evaluation_metrics"} <= {
        k.asset_key.to_user_string() for k in upstream
    }
    [spec] = model_promotion.specs
    gated = spec.metadata["gated_checks"]
    assert set(gated.value if hasattr(gated, "value") else gated) == {k.to_user_string() for k in upstream}
