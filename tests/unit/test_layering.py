"""docs/architecture.md's layering, checked over the whole tree with ast (static imports only).

virtbus imports nothing of agent/drivers/scheduler except the demo (the composition
root), and nothing imports the demo; drivers imports only virtbus; agent imports virtbus
and drivers; scheduler imports only virtbus.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = ("virtbus", "agent", "drivers", "scheduler")
ALLOWED = {
    "virtbus": {"virtbus"},
    "drivers": {"virtbus", "drivers"},
    "agent": {"virtbus", "drivers", "agent"},
    "scheduler": {"virtbus", "scheduler"},
}
DEMO = "virtbus.demo"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def _violations() -> list[str]:
    bad = []
    for package in OURS:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module(path)
            in_demo = module == DEMO or module.startswith(DEMO + ".")
            for name in _imports(path):
                top = name.split(".")[0]
                if top not in OURS:
                    continue
                if (name == DEMO or name.startswith(DEMO + ".")) and not in_demo:
                    bad.append(f"{module} imports the demo ({name})")
                elif top not in ALLOWED[package] and not in_demo:
                    bad.append(f"{module} imports {name}")
    return bad


def test_layering_holds_over_the_whole_tree() -> None:
    assert _violations() == []


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    demo = ROOT / "virtbus" / "demo" / "cluster.py"
    names = _imports(demo)
    assert any(n.startswith("agent") for n in names)
    assert any(n.startswith("scheduler") for n in names)
