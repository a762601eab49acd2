"""The docstrings' examples run (doctest) and show what they say, in every public module.

Modules are those of the API reference (``docs/apigen.py``: every module of ``hgtoolkit`` and
``testfunctions`` none of whose name parts starts with ``_``). Output is compared with
``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``; an example that prints nothing checks that it runs.
"""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest


def _modules() -> list[str]:
    names = []
    for top in ("hgtoolkit", "testfunctions"):
        package = importlib.import_module(top)
        names.append(top)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix=top + ".")
                  if not any(part.startswith("_") for part in m.name.split("."))]
    return sorted(names)


MODULES = _modules()
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_there_are_examples():
    finder = doctest.DocTestFinder(exclude_empty=True)
    count = sum(len(t.examples) for m in MODULES for t in finder.find(importlib.import_module(m)))
    assert count >= 10, f"only {count} docstring examples found"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    failures = []
    for test in finder.find(module, name):  # globals: a copy of the module's, as pytest's doctests
        if test.examples:
            out = []
            result = runner.run(test, out=out.append, clear_globs=True)
            if result.failed:
                failures.append("".join(out))
    assert not failures, "\n".join(failures)
