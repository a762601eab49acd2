"""The notebooks run top to bottom at their tiny settings, and the claims they check still hold.

Each notebook reads ``HGTOOLKIT_NOTEBOOK_SMALL=1`` at the top and picks tiny sizes; it asserts its
own claims in its cells (a failed claim is a cell error). After the notebook, one more cell checks
a few key variables (``CHECKS``) in the same kernel. The kernel is the interpreter running the
tests (jupyter_client starts the ``python3`` kernelspec with ``sys.executable``), which is checked.
The committed notebooks are stored without outputs (``notebooks/build.py`` strips them).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import hgtoolkit

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))

# Expressions evaluated in the kernel after the notebook ran (each must be true), and text that
# must appear in the notebook's printed output (e.g. the data source).
CHECKS = {
    "00_start_here": {
        "true": ["max_rel_err_rev_fwd < 1e-9", "rel_err['autograd'] < 1e-9",
                 "rel_err['finite differences'] < 1e-5",
                 "schedule.best_value < schedule.history[0]",
                 "runs['RTHO'].final_val_loss < runs['HD'].final_val_loss",
                 "not any(r.diverged for r in runs.values())"],
        "printed": ["data source: analytic function"],
    },
    "01_beale_bukin": {
        "true": ["len(FUNCTIONS) >= 1", "len(out.figure_files('png')) == len(FUNCTIONS)",
                 "all('hd_vs_rtho' in summary['functions'][f] for f in FUNCTIONS)"],
        "printed": ["analytic test functions"],
    },
    "02_mnist_schedules": {
        "true": ["len(out.figure_files('png')) >= 1"],
        "printed": ["data source:"],
    },
    "03_approximation_error": {
        "true": ["hd_vs_one_step < 1e-9", "rtho_vs_constant < 1e-9",
                 "'cosine similarity' in failure_message",
                 "set(beale_reports) == {'HD', 'RTHO', 'MARTHE (μ adaptive)'}",
                 "len(mlp_reports) == 4"],
        "printed": ["data source: analytic function", "data source: synthetic Gaussian blobs"],
    },
    "04_towers": {
        "true": ["sorted(results) == [1, 2, 3]", "results[3].history.height == 3",
                 "all(np.isfinite(r.value) for r in results.values())", "len(spread) >= 1"],
        "printed": ["data source:"],
    },
    "05_horizons": {
        "true": ["rel_err_1d < 1e-10", "opt.best_value <= float(greedy.losses[-1])",
                 "ladders['hd']['best'] == 1", "res.solved"],
        "printed": ["best K ="],
    },
    "06_explore": {
        "true": ["ex.settings['method'] == 'rtho' and ex.settings['hypergrad_lr'] == 1e-6",
                 "ex.widgets is not None and ex.widgets['hypergrad_lr'].value == 1e-6",
                 "bk.settings['method'] == 'hd'"],
        "printed": ["move:"],
    },
}


def _check_cell(name: str) -> str:
    exprs = CHECKS.get(name, {}).get("true", [])
    lines = ["import json as _json, sys as _sys",
             "_failed = [e for e in %r if not eval(e)]" % (exprs,),
             "import hgtoolkit as _hg",
             "print('__CHECKS__' + _json.dumps({'failed': _failed, 'prefix': _sys.prefix, 'package': _hg.__file__}))"]
    return "\n".join(lines)


def _printed(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out.get("text", ""))
            elif "text/plain" in out.get("data", {}):
                text.append(out["data"]["text/plain"])
            if "text/markdown" in out.get("data", {}):
                text.append(out["data"]["text/markdown"])
    return "\n".join(text)


def test_every_notebook_has_checks():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
    names = {p.stem for p in NOTEBOOKS}
    assert "00_start_here" in names
    assert names <= set(CHECKS), f"add CHECKS for {sorted(names - set(CHECKS))}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_small(path, monkeypatch, tmp_path):
    """Executed from a copy in a temporary folder outside the repository (the kernel's working
    directory): a notebook finds its data and results through the installed package."""
    monkeypatch.setenv("HGTOOLKIT_NOTEBOOK_SMALL", "1")
    # the kernel imports the hgtoolkit under test (a worktree's, not another editable install's)
    package_parent = str(Path(hgtoolkit.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    repo = NOTEBOOK_DIR.parent
    assert repo not in tmp_path.resolve().parents, "the copy must lie outside the repository"
    copy = tmp_path / path.name
    copy.write_bytes(path.read_bytes())
    nb = nbformat.read(copy, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_check_cell(path.stem)))
    # a failing cell raises CellExecutionError, with the cell's source and traceback
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = _printed(nb)
    assert "SMALL=True" in printed, "the notebook must print its size switch"
    report = json.loads(printed.split("__CHECKS__")[1].splitlines()[0])
    assert report["failed"] == [], f"{path.name}: checks failed: {report['failed']}"
    assert report["prefix"] == sys.prefix, "the kernel must run the interpreter of the test suite"
    assert Path(report["package"]).resolve() == Path(hgtoolkit.__file__).resolve(), "the kernel's hgtoolkit"
    for text in CHECKS[path.stem].get("printed", []):
        assert text in printed, f"{path.name} does not print {text!r}"
    figures = sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))
    assert figures >= 1, f"{path.name} shows no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(path):
    """Sources only (the suite executes them above): no outputs, counts or timestamps, so that the
    history does not grow at every rebuild. ``notebooks/build.py`` saves them this way."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code"
    assert not [c for c in code if c.get("outputs")], f"{path.name}: saved with outputs (run notebooks/build.py)"
    assert all(c.get("execution_count") is None for c in code), f"{path.name}: saved with execution counts"
    assert not [c for c in nb.cells if "execution" in c.get("metadata", {})]


def _build_module():
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        import build
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    return build


def test_readme_lists_every_notebook():
    """notebooks/README.md is generated from the notebooks (``build.py --readme``): up to date,
    and one entry per notebook with its title."""
    build = _build_module()
    text = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    assert text == build.readme(), "notebooks/README.md is stale: run `python notebooks/build.py --readme`"
    for path in NOTEBOOKS:
        title, paragraph = build.summary(path)
        assert f"[`{path.name}`]({path.name})" in text and title in text and paragraph


def test_results_root_follows_env_then_checkout(monkeypatch, tmp_path):
    from hgtoolkit.experiments import common
    monkeypatch.setenv(common.RESULTS_ENV_VAR, str(tmp_path / "mine"))
    assert common.results_root() == tmp_path / "mine"
    monkeypatch.delenv(common.RESULTS_ENV_VAR)
    monkeypatch.chdir(tmp_path)
    here = Path(common.__file__).resolve().parents[2]
    expected = here / "results" if (here / "pyproject.toml").is_file() else tmp_path / "results"
    assert common.results_root() == expected


def test_build_script_strips_outputs(tmp_path):
    build = _build_module()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 3
    nb.cells[0].metadata["execution"] = {"iopub.status.busy": "then"}
    stripped = build.strip(nb)
    assert stripped.cells[0].outputs == [] and stripped.cells[0].execution_count is None
    assert "execution" not in stripped.cells[0].metadata
