"""Architecture rules that review comments would otherwise repeat (see STYLE.md)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import filterd

PACKAGE = Path(filterd.__file__).resolve().parent
# package -> packages it must not import
FORBIDDEN = {
    "protocols": {"engine", "config", "daemon", "mta", "mda", "cli"},
    "engine": {"daemon", "mta", "mda", "cli"},
    "config": {"engine", "daemon", "mta", "mda", "cli", "net"},
    "net": {"engine", "daemon", "mta", "mda", "cli", "protocols"},
    "state": {"engine", "daemon", "mta", "mda", "cli", "protocols", "net"},
    "daemon": {"mta", "mda", "cli"},
    "mta": {"engine", "daemon", "cli"},
    "mda": {"engine", "daemon", "mta", "cli"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("filterd."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("filterd."):
                    found.add(alias.name.split(".")[1])
    return found


def test_packages_import_only_what_the_layering_allows() -> None:
    bad = []
    for package, forbidden in FORBIDDEN.items():
        for path in (PACKAGE / package).rglob("*.py") if (PACKAGE / package).is_dir() else ():
            for imported in _imports(path) & forbidden:
                bad.append(f"{path.relative_to(PACKAGE)} imports filterd.{imported}")
    assert not bad, "\n".join(bad)


def test_every_module_declares_its_public_names() -> None:
    missing = []
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="filterd."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        module = importlib.import_module(info.name)
        if not hasattr(module, "__all__"):
            missing.append(info.name)
            continue
        for name in module.__all__:
            assert hasattr(module, name), f"{info.name}.__all__ names {name}, which does not exist"
    assert not missing, f"modules without __all__: {missing}"
