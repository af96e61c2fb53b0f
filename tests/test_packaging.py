"""Every package lenscan imports is declared in pyproject.toml (a plain install must run)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules() -> dict[str, set[str]]:
    """Top-level module -> files of lenscan/ that import it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "lenscan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def _declared() -> tuple[set[str], set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    extras = set().union(*(names(v) for v in project["optional-dependencies"].values()))
    return names(project["dependencies"]), extras


def test_every_import_is_declared():
    required, extras = _declared()
    dists = packages_distributions()
    undeclared = {}
    for module, files in _imported_modules().items():
        if module in sys.stdlib_module_names or module in ("lenscan", "__future__"):
            continue
        candidates = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not candidates & (required | extras | {"dask", "distributed"}):
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_core_imports_are_core_dependencies():
    """Modules the scan path needs are in the core dependencies, not only in an extra."""
    required, _ = _declared()
    for dist in ("scipy", "google-crc32c", "numcodecs", "numpy", "pyarrow", "zarr"):
        assert dist in required, f"{dist} must be a core dependency"
