"""The package's layout: no import cycles between lenscan modules."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lenscan"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Module -> lenscan modules it imports (anywhere in the file, lazy imports included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                while target not in mods and "." in target:
                    target = target.rsplit(".", 1)[0]
                # A module importing its own package's __init__ is how Python loads it anyway.
                if target in mods and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


# --- Short functions, public names, light import -------------------------------------------

MAX_FUNCTION_LINES = 80
# A function may exceed the limit only with a comment on its ``def`` line (or the line above it)
# that starts with this marker and says why.
LONG_FUNCTION_MARKER = "# long-function:"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _long_functions(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for fn in _functions(ast.parse("\n".join(lines))):
        first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
        length = fn.end_lineno - first + 1
        excused = any(LONG_FUNCTION_MARKER in lines[i - 1] for i in (first - 1, fn.lineno) if i > 0)
        if length > MAX_FUNCTION_LINES and not excused:
            found.append(f"{path.relative_to(ROOT.parent)}:{fn.lineno} {fn.name} ({length} lines)")
    return found


def test_the_length_rule_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    long = tmp_path / "long.py"
    long.write_text(f"def f():\n{body}\n")
    excused = tmp_path / "excused.py"
    excused.write_text(f"{LONG_FUNCTION_MARKER} a table of constants\ndef f():\n{body}\n")
    assert [s.split()[-3] for s in _long_functions_at(long)] == ["f"]
    assert _long_functions_at(excused) == []


def _long_functions_at(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent / "pkg"
    try:
        return _long_functions(path)
    finally:
        ROOT = saved


def test_no_function_is_longer_than_the_limit():
    found = [entry for path in sorted(ROOT.rglob("*.py")) for entry in _long_functions(path)]
    assert found == [], "functions over {} lines:\n{}".format(MAX_FUNCTION_LINES, "\n".join(found))


def _is_public(module: str) -> bool:
    return not any(part.startswith("_") for part in module.split(".")[1:])


def test_every_public_module_declares_all():
    missing = []
    for name, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text())
        targets = [
            t
            for node in tree.body
            if isinstance(node, ast.Assign | ast.AnnAssign)
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        ]
        declares = any(getattr(t, "id", None) == "__all__" for t in targets)
        if _is_public(name) and not declares:
            missing.append(name)
    assert missing == []


def test_private_names_do_not_cross_modules():
    """A helper used by several modules is public in a ``_``-prefixed module, not ``_name``."""
    crossing = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] != "lenscan":
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        crossing.append(f"{name} imports {node.module}.{alias.name}")
    assert crossing == []


def test_import_lenscan_is_light():
    import subprocess
    import sys

    code = (
        "import sys, lenscan; lenscan.__version__; "
        "print(sorted(m for m in ('torch', 'distributed', 'dask', 'zarr', 'astropy') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_public_function_hides_a_module():
    """``lenscan.scan`` is the function and ``lenscan.sweep`` its module: no name does both."""
    import importlib
    import pkgutil

    hidden = []
    for info in pkgutil.walk_packages([str(ROOT)], prefix="lenscan."):
        if not info.ispkg:
            continue
        package = importlib.import_module(info.name)
        for sub in pkgutil.iter_modules(package.__path__):
            if sub.name in getattr(package, "__all__", []):
                hidden.append(f"{info.name}.{sub.name}")
    top = importlib.import_module("lenscan")
    for sub in pkgutil.iter_modules(top.__path__):
        if sub.name in top.__all__:
            hidden.append(f"lenscan.{sub.name}")
    assert hidden == []


# The kernels layer of docs/architecture.md: arrays in, arrays out. A kernel imports only other
# kernels and plain data (survey presets); never the store, a graph or an interface module.
KERNELS = {
    "lenscan.select",
    "lenscan.stamps",
    "lenscan.metrics",
    "lenscan.images",
    "lenscan.simulate.physics",
    "lenscan.simulate.artefacts",
    "lenscan.simulate.mer_detect",
    "lenscan.models.architectures",
}
KERNEL_DATA = {"lenscan.simulate.presets", "lenscan._version"}


def test_kernels_do_no_io():
    graph = _import_graph()
    assert set(graph) >= KERNELS, "a kernel module was renamed: update KERNELS and the docs"
    outside = {k: sorted(graph[k] - KERNELS - KERNEL_DATA) for k in sorted(KERNELS)}
    assert {k: v for k, v in outside.items() if v} == {}
