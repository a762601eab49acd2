"""The package's layout: every module imports on its own, and no two modules import each other
(directly or through others), at module level or inside functions; no module ``__getattr__``, no
private name of another module used, no module over 900 lines, and nothing inside the library
silences DivergenceWarning (docs/architecture.md).

A moved public name (``marthe.find_beta``, ``towers.plot_history``, ``analysis.plot_approximation``)
is a stand-in that raises an error naming its new place (``hgtoolkit.errors.moved``), not a module
``__getattr__`` forwarding to it."""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import hgtoolkit

PACKAGE = Path(hgtoolkit.__file__).parent


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["hgtoolkit", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _source(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a ``from … import`` statement of ``module`` (file ``path``) imports from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str, path: Path, node: ast.AST, modules: dict) -> set[str]:
    """hgtoolkit modules named by one import statement (``from . import x`` names module x)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        prefix = _source(module, path, node)
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
    found = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


@functools.lru_cache(maxsize=None)
def _graph(module_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {}

    def imports(node, module, path, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imported(module, path, child, modules)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not (module_level_only or (top and child.name == "__getattr__")):
                    imports(child, module, path, False)
            else:
                imports(child, module, path, top and isinstance(child, (ast.If, ast.Try)))

    for module, path in modules.items():
        graph[module] = set()
        imports(ast.parse(path.read_text(encoding="utf-8")), module, path, True)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_relative_and_function_level_imports():
    graph = _graph(module_level_only=False)
    assert "hgtoolkit.online" in graph["hgtoolkit.sweep.kinds"]       # `from .. import online` in a function
    assert "hgtoolkit.sweep.grid" in graph["hgtoolkit.sweep.kinds"]   # `from .grid import …`
    assert "hgtoolkit.online" not in graph["hgtoolkit.marthe"]        # marthe.find_beta is a stand-in


def test_no_import_cycle_at_module_level():
    assert _cycle(_graph(module_level_only=True)) is None


def test_no_import_cycle_inside_functions_either():
    assert _cycle(_graph(module_level_only=False)) is None


def test_every_module_imports_on_its_own():
    """Each module imported as in a fresh interpreter: ``import hgtoolkit`` (which always runs
    first) once, then for each module the package reset to what that import loaded and the module
    imported alone. Third-party libraries stay loaded, so this takes seconds, not a minute."""
    names = [m for m in _modules() if not m.endswith("__main__")]
    script = (
        "import importlib, sys, torch, numpy\n"
        "import hgtoolkit\n"
        "base = set(sys.modules)\n"
        "bad = []\n"
        f"for name in {names!r}:\n"
        "    for key in [k for k in sys.modules if k not in base and k.startswith(('hgtoolkit.', 'testfunctions'))]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def _trees():
    return {m: (p, ast.parse(p.read_text(encoding="utf-8"))) for m, p in _modules().items()}


def test_no_module_getattr_and_no_module_over_900_lines():
    for module, (path, tree) in _trees().items():
        assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"], (
            f"{module}: a module __getattr__ (a moved name raises through hgtoolkit.errors.moved instead)")
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 900, f"{module}: over 900 lines"


def test_no_private_name_of_another_module_is_used():
    modules = _modules()
    found = []
    for module, (path, tree) in _trees().items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _source(module, path, node)
                if not target.startswith("hgtoolkit"):
                    continue
                for a in node.names:
                    if f"{target}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
                    elif a.name.startswith("_") and not a.name.startswith("__") and target != module:
                        found.append(f"{path.name}: {a.name} from {target}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != module):
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, found


def test_the_library_never_silences_divergence():
    """Callers that expect divergence collect it (hgtoolkit.divergence.recorded); nothing filters it."""
    found = []
    for module, (path, tree) in _trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                src = ast.unparse(node)
                if name in ("simplefilter", "filterwarnings") and "ignore" in src and (
                        "Divergence" in src or "RuntimeWarning" in src):
                    found.append(f"{path.name}:{node.lineno}")
    assert not found, found
