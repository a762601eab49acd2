"""Re-execute the notebooks in place (outputs saved), with the Python running this script as kernel.

    .venv/bin/python notebooks/build.py                 # every notebook, default settings
    .venv/bin/python notebooks/build.py 00 03           # those whose name starts with 00 or 03
    .venv/bin/python notebooks/build.py --small --no-save   # tiny settings, nothing written (a dry run)

Each notebook runs with its folder as working directory. ``--small`` sets
``HGTOOLKIT_NOTEBOOK_SMALL=1`` (what the test suite does); committed notebooks are executed at
the default settings. A failing cell stops that notebook and the script exits with status 1.
"""
from __future__ import annotations

import argparse
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


def execute(path: Path, *, small: bool = False, timeout: int = 900, save: bool = True,
            record_timing: bool = False):
    """Execute ``path`` top to bottom in a fresh kernel; return (notebook, seconds).

    The kernel is the ``python3`` kernelspec, which jupyter_client starts with ``sys.executable``
    (this interpreter, e.g. the project's venv), so the notebook sees the installed hgtoolkit.
    ``record_timing=False`` keeps per-cell timestamps out of the saved file (smaller diffs).
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
    if save:
        nbformat.write(nb, path)
    return nb, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="name prefixes (default: every notebook)")
    parser.add_argument("--small", action="store_true", help="tiny settings (HGTOOLKIT_NOTEBOOK_SMALL=1)")
    parser.add_argument("--no-save", action="store_true", help="do not write the executed notebooks")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = parser.parse_args(argv)
    paths = notebooks(args.names)
    if not paths:
        print(f"no notebook matches {args.names}", file=sys.stderr)
        return 1
    from nbclient.exceptions import CellExecutionError
    status = 0
    for path in paths:
        try:
            _, seconds = execute(path, small=args.small, timeout=args.timeout, save=not args.no_save)
            print(f"{path.name}: ok in {seconds:.1f} s" + ("" if args.no_save else " (saved)"))
        except CellExecutionError as exc:
            status = 1
            print(f"{path.name}: FAILED\n{exc}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
