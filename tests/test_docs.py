"""The documentation site builds with warnings as errors, and its API reference covers every
public name.

The build is ``make docs``'s, with the notebooks not executed (``nb_execution_mode=off``): a
broken cross-reference, a malformed docstring or a missing page fails here, in ``make test``.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the docs extra (in dev) is not installed")
from sphinx.util.inventory import InventoryFile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
           "-D", "nb_execution_mode=off", "-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out / "html"


def _apigen():
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("apigen")
    finally:
        sys.path.remove(str(DOCS))


def test_reference_lists_every_public_name(site):
    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for kind, objects in inventory.items() if kind.startswith("py:") for name in objects}
    apigen = _apigen()
    public = apigen.public_names()
    assert "hgtoolkit" in public and "hgtoolkit.online" in public and "testfunctions" in public
    missing = []
    for module, names in public.items():
        page = site / "reference" / f"{module}.html"
        assert page.is_file(), f"module {module} has no page"
        assert module in documented or apigen.shadowed(module), f"module {module} not in the index"
        for name in names:
            obj = getattr(importlib.import_module(module), name)
            target = obj.__name__ if isinstance(obj, type(sys)) else f"{module}.{name}"
            if isinstance(obj, type(sys)) and apigen.shadowed(target):
                target = f"{module}.{name}"  # the exported object, not the module it shadows
            if target not in documented:
                missing.append(f"{module}.{name}")
    assert not missing, f"not in the API reference: {missing}"


def test_pages_and_gallery(site):
    for page in ("index", "guide", "methods", "glossary", "performance", "results", "notebooks/index",
                 "reference/index"):
        assert (site / f"{page}.html").is_file(), f"{page}.html missing"
    for page in DOCS.glob("*.md"):  # every page of docs/ is on the site (architecture, memory, …)
        if page.name != "README.md":
            assert (site / f"{page.stem}.html").is_file(), f"{page.name} not built"
    gallery = (site / "notebooks" / "index.html").read_text(encoding="utf-8")
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert (site / "notebooks" / f"{path.stem}.html").is_file(), f"{path.name} not rendered"
        assert f"{path.stem}.html" in gallery, f"{path.name} not in the gallery"
    reference = (site / "reference" / "hgtoolkit.exact.html").read_text(encoding="utf-8")
    assert "Z_{t+1} = A_t Z_t + B_t" in reference or "A_t Z_t + B_t" in reference, "docstrings rendered"
