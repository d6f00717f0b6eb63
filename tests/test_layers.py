"""Layering: the core (config, tracking, device, runtime) sits below the stages, the CLI above the flows,
and no module imports in a circle (deferred imports inside functions count)."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

STAGES = ("data_contracts", "training", "evaluation", "registry", "deployment")
CORE = [p for p in (REPO / "erpops").glob("*.py") if p.stem not in ("cli", "__init__")]


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
    return out


def test_core_imports_no_stage_flow_or_cli():
    assert CORE, "no core modules found"
    bad = {p.name: sorted(_imports(p) & {*STAGES, "flows"}) for p in CORE}
    assert {k: v for k, v in bad.items() if v} == {}


def test_stages_import_no_flow_or_cli():
    bad = {}
    for pkg in STAGES:
        for p in (REPO / pkg).rglob("*.py"):
            found = _imports(p) & {"flows"}
            if any("erpops.cli" in line for line in p.read_text(encoding="utf-8").splitlines() if "import" in line):
                found.add("erpops.cli")
            if found:
                bad[str(p.relative_to(REPO))] = sorted(found)
    assert bad == {}


def test_no_import_cycles():
    tool = REPO.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.is_file():
        import pytest

        pytest.skip(f"{tool} not beside the checkout")
    proc = subprocess.run([sys.executable, str(tool), "--all", str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("cycles=0"), proc.stdout
