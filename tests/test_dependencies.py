"""Dependencies point one way: what listens to training (tracking) never imports the loop,
and tracking and the Azure backends never import each other (lazy imports included)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "phitune"


def imports(folder: str) -> dict[str, set[str]]:
    """{file: every phitune module it imports, at module top or inside functions}."""
    out = {}
    for path in sorted((SRC / folder).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phitune"):
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names if a.name.startswith("phitune")}
        out[path.relative_to(SRC).as_posix()] = names
    return out


def offenders(folder: str, forbidden: tuple) -> list[str]:
    return [f"{f} imports {m}" for f, mods in imports(folder).items() for m in sorted(mods)
            if m.startswith(forbidden)]


def test_tracking_imports_neither_the_loop_nor_azure():
    assert offenders("tracking", ("phitune.train.loop", "phitune.recipe", "phitune.azure")) == []


def test_azure_does_not_import_tracking():
    assert offenders("azure", ("phitune.tracking",)) == []


def test_the_scan_sees_lazy_imports():
    # guard: tracking/run.py imports the callback protocol and the job context inside functions or at top
    mods = imports("tracking")["tracking/run.py"]
    assert "phitune.train.callbacks" in mods and "phitune.tracking.context" in mods
