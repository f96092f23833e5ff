"""docs/architecture.md's layering, checked over the whole tree with ast.

virtbus imports nothing of agent/drivers/scheduler except the demo (the composition
root), and nothing imports the demo but the CLI's entry point, by name, when
``virtbus demo`` runs; drivers imports only virtbus; agent imports virtbus and drivers;
scheduler imports only virtbus. Static imports and imports by literal name
(``importlib.import_module("...")``, ``__import__("...")``) both count.
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
DEMO_LOADER = "virtbus.cli.main"  # loads the demo by name, only when `virtbus demo` runs


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dynamic_name(node: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` / ``__import__("x")``."""
    func = node.func
    called = (
        func.attr
        if isinstance(func, ast.Attribute)
        else func.id
        if isinstance(func, ast.Name)
        else None
    )
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def imports_of(source: str, filename: str = "<source>") -> list[tuple[str, bool]]:
    """(module name, imported dynamically) for every import in ``source``."""
    found: list[tuple[str, bool]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, False))
        elif isinstance(node, ast.Call):
            name = _dynamic_name(node)
            if name is not None:
                found.append((name, True))
    return found


def violations(modules: dict[str, str]) -> list[str]:
    """Layering violations of ``{module name: source}``."""
    bad = []
    for module, source in sorted(modules.items()):
        package = module.split(".")[0]
        in_demo = module == DEMO or module.startswith(DEMO + ".")
        for name, dynamic in imports_of(source, module):
            top = name.split(".")[0]
            if top not in OURS or in_demo:
                continue
            if name == DEMO or name.startswith(DEMO + "."):
                if not (dynamic and module == DEMO_LOADER):
                    bad.append(f"{module} imports the demo ({name})")
            elif top not in ALLOWED[package]:
                how = "by name " if dynamic else ""
                bad.append(f"{module} imports {how}{name}")
    return bad


def _tree() -> dict[str, str]:
    return {
        _module(path): path.read_text(encoding="utf-8")
        for package in OURS
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_layering_holds_over_the_whole_tree() -> None:
    assert violations(_tree()) == []


def test_the_checker_sees_the_demo_and_the_cli_loading_it() -> None:
    tree = _tree()
    names = [n for n, _ in imports_of(tree["virtbus.demo.cluster"])]
    assert any(n.startswith("agent") for n in names)
    assert any(n.startswith("scheduler") for n in names)
    assert ("virtbus.demo.main", True) in imports_of(tree[DEMO_LOADER])


def test_the_checker_catches_each_kind_of_violation() -> None:
    bad = {
        "scheduler.x": "import drivers.qemu\n",
        "drivers.y": "from agent.service import AgentService\n",
        "virtbus.z": "import importlib\nimportlib.import_module('agent.handlers')\n",
        "virtbus.w": "__import__('scheduler.service')\n",
        "agent.v": "from importlib import import_module\nimport_module('virtbus.demo.main')\n",
        "virtbus.cli.u": "import virtbus.demo.tour\n",
    }
    found = violations(bad)
    assert found == [
        "agent.v imports the demo (virtbus.demo.main)",
        "drivers.y imports agent.service",
        "scheduler.x imports drivers.qemu",
        "virtbus.cli.u imports the demo (virtbus.demo.tour)",
        "virtbus.w imports by name scheduler.service",
        "virtbus.z imports by name agent.handlers",
    ]
    allowed = "import drivers.base\nimport importlib\nimportlib.import_module('drivers.qemu')"
    assert violations({"agent.t": allowed}) == []
