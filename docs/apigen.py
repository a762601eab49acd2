"""Writes the API reference's reStructuredText pages (``docs/reference/``, not committed).

One page per public module of ``hgtoolkit`` and ``testfunctions`` (every module found by
:func:`pkgutil.walk_packages` none of whose name parts starts with ``_``): the module's docstring,
a summary table and the autodoc entry of every name in its ``__all__`` (a module without
``__all__`` gets its docstring and its public members). ``conf.py`` calls :func:`write` before
Sphinx reads the sources; ``tests/test_docs.py`` checks the built inventory against
:func:`public_names`.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import types
from pathlib import Path

from sphinx.pycode import ModuleAnalyzer
from sphinx.errors import PycodeError

PACKAGES = ("hgtoolkit", "testfunctions")
OUT = Path(__file__).resolve().parent / "reference"


def public_modules() -> list[str]:
    """Dotted names of the public modules, sorted, packages before their submodules."""
    names = []
    for top in PACKAGES:
        package = importlib.import_module(top)
        names.append(top)
        for info in pkgutil.walk_packages(package.__path__, prefix=top + "."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                names.append(info.name)
    return sorted(set(names))


def shadowed(modname: str) -> bool:
    """True when the parent package exports another object under the module's name
    (``hgtoolkit.explore`` is the function; the module of the same name is documented without
    its own index entry, its members under ``hgtoolkit.explore.``)."""
    parent, _, last = modname.rpartition(".")
    if not parent:
        return False
    value = getattr(importlib.import_module(parent), last, None)
    return value is not None and value is not importlib.import_module(modname)


def public_names() -> dict[str, list[str]]:
    """``{module: its __all__}`` for every public module that defines ``__all__``."""
    out = {}
    for name in public_modules():
        module = importlib.import_module(name)
        if hasattr(module, "__all__"):
            out[name] = list(module.__all__)
    return out


def _directive(obj) -> str:
    if isinstance(obj, types.ModuleType):
        return ""
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or isinstance(obj, types.MethodType):
        return "function"
    return "data"


def page(modname: str) -> str:
    """The reStructuredText page of one module."""
    module = importlib.import_module(modname)
    title = modname
    lines = [title, "=" * len(title), "", f".. automodule:: {modname}"]
    if shadowed(modname):
        lines.append("   :no-index:")
    exported = getattr(module, "__all__", None)
    if exported is None:
        lines += ["   :members:", ""]
        return "\n".join(lines) + "\n"
    lines += ["   :no-members:", ""]
    try:
        documented = {(modname, attr) for (_, attr) in ModuleAnalyzer.for_module(modname).find_attr_docs()}
    except PycodeError:
        documented = set()
    submodules = [n for n in exported if isinstance(getattr(module, n), types.ModuleType)]
    others = [n for n in exported if n not in submodules]
    lines += [f".. currentmodule:: {modname}", ""]
    if submodules:
        lines += ["Modules", "-------", "", ".. autosummary::", ""]
        lines += [f"   {n}" for n in submodules] + [""]
    # the table: classes and functions (a constant's summary would be its type's docstring)
    tabled = [n for n in others if _directive(getattr(module, n)) != "data"] if not shadowed(modname) else []
    if tabled:
        lines += ["Summary", "-------", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in tabled] + [""]
    if others:
        lines += ["Contents", "--------", ""]
        for n in others:
            kind = _directive(getattr(module, n))
            options = ["   :members:", "   :show-inheritance:"] if kind in ("class", "exception") else []
            if kind == "data" and (modname, n) not in documented:
                # no ``#:`` comment: autodoc would show the docstring of the value's type (dict, …)
                value = repr(getattr(module, n))
                shown = [f"   :value: {value}"] if len(value) <= 70 and "\n" not in value else []
                lines += [f".. py:data:: {n}", f"   :type: {type(getattr(module, n)).__name__}", *shown, "",
                          "   Described in the module's docstring above.", ""]
                continue
            lines += [f".. auto{kind}:: {modname}.{n}", *options, ""]
    return "\n".join(lines) + "\n"


def write(out: Path = OUT) -> list[str]:
    """Write ``index.rst`` and one page per public module into ``out``; returns the module names."""
    out.mkdir(parents=True, exist_ok=True)
    modules = public_modules()
    for stale in out.glob("*.rst"):
        stale.unlink()
    for modname in modules:
        (out / f"{modname}.rst").write_text(page(modname), encoding="utf-8")
    index = ["API reference", "=============", "",
             "Every name in ``hgtoolkit.__all__`` and in the ``__all__`` of each public submodule,",
             "from the docstrings. The equations they state use the notation of :doc:`../methods`",
             "and the names of the :doc:`../glossary`.", "",
             ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {m}" for m in modules]
    (out / "index.rst").write_text("\n".join(index) + "\n", encoding="utf-8")
    return modules
