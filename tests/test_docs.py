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


def _docs_script(name: str):
    """The module ``docs/<name>.py`` (the docs' scripts are no package)."""
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DOCS))


def test_reference_lists_every_public_name(site):
    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for kind, objects in inventory.items() if kind.startswith("py:") for name in objects}
    apigen = _docs_script("apigen")
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


def test_generated_pages_come_from_the_measurements(tmp_path, monkeypatch):
    """docs/generate.py: a benchmark's rows and an experiment's summary.md reach the pages as
    written (with the date and machine the benchmark file records; headings moved down, figures
    as paths), and a machine without any says how to produce them."""
    import json
    generate = _docs_script("generate")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setattr(generate, "BENCH_RESULTS", fresh)
    assert "make bench" in generate.benchmarks_page()
    row = {"metric": "HD ÷ SGD | T=30", "value": 1.2345, "unit": "×", "target": "≤ 1.1", "met": False, "note": "n"}
    (fresh / "online.json").write_text(json.dumps({"rows": [row], "quick": True, "env": {
        "cpu": "X1", "cpu_count": 2, "torch_threads": 1, "date": "2026-12-04 02:30 UTC", "loadavg_before": [3.5]}}))
    page = generate.benchmarks_page()
    assert "| HD ÷ SGD \\| T=30 | 1.23 | × | ≤ 1.1 | NO | n |" in page
    assert "2026-12-04 02:30 UTC; X1 (2 CPUs)" in page and "load average 3.50" in page and "--quick" in page
    results = tmp_path / "results"
    (results / "fig1").mkdir(parents=True)
    (results / "fig1" / "summary.md").write_text("# Fig. 1\n\n## table\n\n![best](figures/best.png)\n")
    monkeypatch.setenv("HGTOOLKIT_RESULTS", str(results))
    text = generate.results_page()
    assert "### Fig. 1" in text and "#### table" in text and "(figure `fig1/figures/best.png`)" in text
    monkeypatch.setenv("HGTOOLKIT_RESULTS", str(tmp_path / "none"))
    assert "make demo" in generate.results_page()
