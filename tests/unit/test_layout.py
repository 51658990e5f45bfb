"""Package layout: dependencies point one way, and every package says what it is.

artwatch (the composition root: the command line) -> streams -> alerts ->
infra, models -> infra. infra imports none of the others; nothing imports
artwatch, and its command line imports what a command runs lazily, inside the
function of each command.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("artwatch", "infra", "streams", "models", "alerts")
# package -> first-party packages it must never import
FORBIDDEN = {
    "infra": {"artwatch", "streams", "alerts", "models"},
    "models": {"artwatch", "streams", "alerts"},
    "alerts": {"artwatch", "streams"},
    "streams": {"artwatch"},
}


def modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, root: Path = ROOT) -> list[tuple[str, bool, int]]:
    """``(absolute module, inside a function, line)`` for every import in ``path``.

    Relative imports are resolved; ``importlib.import_module("x")`` and
    ``__import__("x")`` with a literal name count too.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    prefix = ".".join(base)
                    mod = f"{prefix}.{child.module}" if child.module else prefix
                else:
                    mod = child.module or ""
                found.append((mod, in_function, child.lineno))
                found.extend((f"{mod}.{a.name}", in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant):
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__") and isinstance(child.args[0].value, str):
                    found.append((child.args[0].value, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependency_direction(package):
    files = modules(package)
    assert files, f"no modules under {package}/"
    bad = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for module, in_function, line in imported(path):
            top = _top(module)
            if top not in FORBIDDEN[package]:
                continue
            bad.append(f"{rel}:{line} imports {module}" + (" (at module level)" if not in_function else ""))
    assert not bad, "dependency direction violated:\n" + "\n".join(bad)


def test_cli_imports_streams_only_lazily():
    cli = ROOT / "artwatch/cli.py"
    streams_imports = [(m, f, n) for m, f, n in imported(cli) if _top(m) == "streams"]
    assert streams_imports, "artwatch/cli.py is expected to start the streams commands"
    assert all(in_function for _, in_function, _ in streams_imports), streams_imports


def test_the_scanner_sees_every_kind_of_import(tmp_path):
    """The checker itself: module level, nested, relative and dynamic imports."""
    path = tmp_path / "infra" / "_probe.py"
    path.parent.mkdir()
    path.write_text(
        "import os\n"
        "from streams import records\n"
        "def f():\n"
        "    import streams.worker\n"
        "    class C:\n"
        "        from alerts.alert import Alert\n"
        "import importlib\n"
        "importlib.import_module('models.x')\n"
        "from . import settings\n"
        "from .db import sink\n"
    )
    found = {(m, fn) for m, fn, _ in imported(path, root=tmp_path)}
    assert ("streams", False) in found and ("streams.records", False) in found
    assert ("streams.worker", True) in found
    assert ("alerts.alert", True) in found
    assert ("models.x", False) in found
    assert ("infra.settings", False) in found
    assert ("infra.db.sink", False) in found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_has_a_docstring(package):
    init = ROOT / package / "__init__.py"
    assert init.is_file(), f"{package}/ is not a package"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.strip()) >= 20, f"{package}/__init__.py needs a docstring saying what the package is"


def test_every_module_parses():
    for package in PACKAGES:
        for path in modules(package):
            ast.parse(path.read_text(), filename=str(path))
