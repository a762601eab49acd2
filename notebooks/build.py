"""Execute the notebooks top to bottom, with the Python running this script as kernel, and save
them *without outputs* (the repository stores sources only; the test suite executes them).

    .venv/bin/python notebooks/build.py                 # every notebook, default settings
    .venv/bin/python notebooks/build.py 00 03           # those whose name starts with 00 or 03
    .venv/bin/python notebooks/build.py --small --no-save   # tiny settings, nothing written (a dry run)
    .venv/bin/python notebooks/build.py --keep-outputs --out /tmp/nb   # executed copies, outputs kept

Each notebook runs with its folder as working directory. ``--small`` sets
``HGTOOLKIT_NOTEBOOK_SMALL=1`` (what the test suite does). A failing cell stops that notebook and
the script exits with status 1. Saving in place strips outputs, execution counts and timestamps
(:func:`strip`), so history does not grow at every rebuild; ``--keep-outputs`` writes the executed
notebooks (with outputs) to ``--out`` instead, e.g. to read them without Jupyter.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def notebooks(prefixes: list[str] | None = None) -> list[Path]:
    """The notebooks in this folder (sorted), optionally only those whose name starts with a prefix."""
    paths = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [p for p in paths if any(p.name.startswith(x) for x in prefixes)]
    return paths


def strip(nb):
    """The notebook without outputs, execution counts or per-cell timestamps (in place)."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def execute(path: Path, *, small: bool = False, timeout: int = 900, save: bool = True,
            record_timing: bool = False, out: Path | None = None):
    """Execute ``path`` top to bottom in a fresh kernel; return (notebook, seconds).

    The kernel is the ``python3`` kernelspec, which jupyter_client starts with ``sys.executable``
    (this interpreter, e.g. the project's venv), so the notebook sees the installed hgtoolkit.
    ``save``: write the notebook back without outputs; ``out``: write the executed notebook,
    outputs kept, into that folder instead.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # timestamps of an earlier run
    previous = os.environ.get("HGTOOLKIT_NOTEBOOK_SMALL")
    os.environ["HGTOOLKIT_NOTEBOOK_SMALL"] = "1" if small else "0"
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=record_timing,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        if previous is None:
            os.environ.pop("HGTOOLKIT_NOTEBOOK_SMALL", None)
        else:
            os.environ["HGTOOLKIT_NOTEBOOK_SMALL"] = previous
    seconds = time.perf_counter() - start
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out / path.name)
    elif save:
        nbformat.write(strip(copy.deepcopy(nb)), path)  # the returned notebook keeps its outputs
    return nb, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="name prefixes (default: every notebook)")
    parser.add_argument("--small", action="store_true", help="tiny settings (HGTOOLKIT_NOTEBOOK_SMALL=1)")
    parser.add_argument("--no-save", action="store_true", help="do not write the executed notebooks")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="write the executed notebooks with their outputs to --out (not in place)")
    parser.add_argument("--out", type=Path, default=None, help="folder for --keep-outputs")
    args = parser.parse_args(argv)
    paths = notebooks(args.names)
    if not paths:
        print(f"no notebook matches {args.names}", file=sys.stderr)
        return 1
    if args.keep_outputs and args.out is None:
        parser.error("--keep-outputs needs --out FOLDER (the sources stay output-free)")
    from nbclient.exceptions import CellExecutionError
    status = 0
    for path in paths:
        try:
            _, seconds = execute(path, small=args.small, timeout=args.timeout, save=not args.no_save,
                                 out=args.out if args.keep_outputs else None)
            where = (f" (with outputs in {args.out})" if args.keep_outputs else
                     "" if args.no_save else " (saved without outputs)")
            print(f"{path.name}: ok in {seconds:.1f} s{where}")
        except CellExecutionError as exc:
            status = 1
            print(f"{path.name}: FAILED\n{exc}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
