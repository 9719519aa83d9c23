"""The package's shape (STYLE.md rule 8, small flat modules): no import cycles between dpscale's
modules and no module over MAX_LINES lines. Read from the source with ast: nothing is imported.

Which imports make an edge of the graph. An ``import`` runs when the statement does, so:

* module level: the module body and everything nested in it that runs when the module is first
  imported (``if`` / ``try`` / ``with`` blocks, class bodies). A cycle of these fails, or half-works,
  at import time: one of the modules sees the other partially initialised. ``test_no_import_cycles``
  counts these only.
* deferred: inside a function (or lambda) body. It runs at the first call, after both modules are
  loaded, so it never breaks an import; but a deferred import that closes a cycle is the usual
  work-around for one (``noise`` imports ``noise_torch`` in ``gaussian``), and the two modules still
  cannot be understood, tested or moved apart. ``test_no_deferred_import_cycles`` counts module-level
  and deferred imports together.
* ``if TYPE_CHECKING:`` blocks never run and count in neither graph.

Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``, so an import makes an edge to
the target and to each of its enclosing packages, except the importer's own enclosing packages
(they are already being imported when the importer runs; a package ``__init__`` that imports its
own submodules is the normal layout, not a cycle). An import of a name that is not a submodule
(``from dpscale.noise import NoiseKey``) targets the module that defines it. The lazy names of
``dpscale/__init__.py`` (``importlib.import_module`` in ``__getattr__``) are not statements and do
not count.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dpscale"
MAX_LINES = 500


# the graph ------------------------------------------------------------------------------------------


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under package_dir (a package's name is its
    ``__init__.py``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_statements(tree: ast.Module, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run at import time (and, with ``deferred``, those in function
    bodies too); never those under ``if TYPE_CHECKING:``."""
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and not deferred:
            return  # runs at call time, not at import time
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _enclosing(name: str) -> list[str]:
    """a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict) -> set[str]:
    """The package modules one import statement names (before enclosing packages are added)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:  # relative: from the importer's package, up level - 1
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module
    targets = set()
    for alias in node.names:
        submodule = f"{origin}.{alias.name}"
        targets.add(submodule if submodule in modules else origin)
    return targets


def import_graph(package_dir: Path, package: str, *, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules its imports run (see the module docstring for which count)."""
    modules = module_names(package_dir, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for importer, path in modules.items():
        is_package = path.name == "__init__.py"
        own = set(_enclosing(importer)) | ({importer} if is_package else set())
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_statements(tree, deferred):
            for target in _targets(node, importer, is_package, modules):
                if not (target == package or target.startswith(package + ".")):
                    continue  # another library
                while target not in modules and "." in target:  # an attribute path: its module
                    target = target.rsplit(".", 1)[0]
                edges = {target} | (set(_enclosing(target)) - own)
                graph[importer] |= edges - {importer}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node: str) -> None:  # the package is small: recursion depth is at most its size
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def _describe(graph: dict[str, set[str]], component: list[str]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return f"{{{', '.join(component)}}}: " + "; ".join(edges)


# the package -----------------------------------------------------------------------------------------


def test_no_import_cycles():
    graph = import_graph(ROOT / PACKAGE, PACKAGE)
    found = cycles(graph)
    assert not found, "import cycles at module level:\n" + "\n".join(_describe(graph, c) for c in found)


def test_no_deferred_import_cycles():
    graph = import_graph(ROOT / PACKAGE, PACKAGE, deferred=True)
    found = cycles(graph)
    assert not found, ("import cycles counting imports inside functions (a deferred import that closes a cycle "
                       "hides it):\n" + "\n".join(_describe(graph, c) for c in found))


def test_no_module_is_too_long():
    lengths = {path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
               for path in sorted((ROOT / PACKAGE).rglob("*.py"))}
    offenders = {path: n for path, n in lengths.items() if n > MAX_LINES}
    assert not offenders, f"modules over {MAX_LINES} lines: " + ", ".join(
        f"{path} ({n})" for path, n in sorted(offenders.items(), key=lambda item: -item[1]))


# the graph function on toy packages -----------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "toy"


def test_graph_of_a_layered_toy_package_has_no_cycle(tmp_path):
    package = _write(tmp_path, {
        "toy/__init__.py": "from toy.api import run\nfrom . import util\n",
        "toy/api.py": "import os\nfrom toy.core import engine\nfrom .util import helper\n",
        "toy/core/__init__.py": "from .engine import Engine\n",
        "toy/core/engine.py": "from ..util import helper\nimport toy.util as u\n",
        "toy/util.py": "import typing\nif typing.TYPE_CHECKING:\n    from toy.api import run\n",
    })
    graph = import_graph(package, "toy")
    assert graph == {
        "toy": {"toy.api", "toy.util"},
        "toy.api": {"toy.core", "toy.core.engine", "toy.util"},
        "toy.core": {"toy.core.engine"},
        "toy.core.engine": {"toy.util"},
        "toy.util": set(),  # the TYPE_CHECKING import does not count
    }
    assert cycles(graph) == []
    assert cycles(import_graph(package, "toy", deferred=True)) == []


def test_graph_finds_cycles_and_tells_module_level_from_deferred(tmp_path):
    package = _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/a.py": "from toy.b import x\n",
        "toy/b.py": "from toy import c\nx = 1\n",
        "toy/c.py": "import toy.a\n",  # a -> b -> c -> a at import time
        "toy/d.py": """\
            from toy.a import x
            def late():
                from toy.e import y
            """,
        "toy/e.py": "from . import d\ny = 2\n",  # d <-> e only through d's function body
        "toy/f/__init__.py": "from toy.f.g import z\n",
        "toy/f/g.py": "z = 3\n",  # a package importing its submodule: no cycle
        "toy/h.py": """\
            try:
                from toy.i import w
            except ImportError:
                w = None
            class K:
                from toy.e import y  # class bodies run at import time
            """,
        "toy/i.py": "from toy.h import K\nw = 4\n",
    })
    assert cycles(import_graph(package, "toy")) == [["toy.a", "toy.b", "toy.c"], ["toy.h", "toy.i"]]
    assert cycles(import_graph(package, "toy", deferred=True)) == [
        ["toy.a", "toy.b", "toy.c"], ["toy.d", "toy.e"], ["toy.h", "toy.i"]]


def test_an_import_of_a_subpackage_runs_its_init(tmp_path):
    """x -> p.q also runs p/__init__, which imports x: a cycle, unless x lives inside p."""
    package = _write(tmp_path, {
        "toy/__init__.py": "",
        "toy/x.py": "from toy.p.q import v\n",
        "toy/p/__init__.py": "from toy.x import *\n",
        "toy/p/q.py": "v = 1\n",
        "toy/p/r.py": "from toy.p.q import v\n",  # inside p: p's __init__ is already running
    })
    graph = import_graph(package, "toy")
    assert graph["toy.x"] == {"toy.p", "toy.p.q"} and graph["toy.p.r"] == {"toy.p.q"}
    assert cycles(graph) == [["toy.p", "toy.x"]]
