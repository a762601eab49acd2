r"""Test-only sweep cell kind ``"barrier"``: a cell that blocks until a file exists, so that
fault tests (an interrupted driver, a killed worker) know exactly which cells are running and
which are stored when they strike — no timing, no races.

A cell's params: ``dir`` (a directory both the test and the workers see), ``seed`` and
``gate`` (bool). A gated cell writes ``<dir>/<cell id>.started`` (its process id) and then
waits until ``<dir>/release`` exists; an ungated cell finishes at once. The result is
``{"value": seed}``. Importing this module registers the kind (Ray workers import it by
name before running its cells).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import sweep

RELEASE = "release"
TIMEOUT_S = 120.0  # a gated cell that is never released fails instead of hanging a test run


def _path(v):
    if not isinstance(v, str) or not v:
        raise ValueError(f"must be a directory path, got {v!r}")
    return v


def run_barrier_cell(problem, params: dict, ctx: sweep.CellContext) -> sweep.CellOutput:
    d = Path(params["dir"])
    if params.get("gate", False):
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{ctx.cell_id}.started").write_text(str(os.getpid()))
        deadline = time.monotonic() + TIMEOUT_S
        while not (d / RELEASE).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier cell {ctx.cell_id}: {d / RELEASE} never appeared")
            time.sleep(0.01)  # polling a file, not a timed assertion
    return sweep.CellOutput({"value": params.get("seed", 0)})


def started(directory) -> dict[str, int]:
    """Cell id → pid of the gated cells that have started (and are waiting or released)."""
    return {p.name[:-len(".started")]: int(p.read_text() or 0)
            for p in Path(directory).glob("*.started") if p.read_text()}


def release(directory) -> None:
    (Path(directory) / RELEASE).touch()


KIND = sweep.register_cell_kind(sweep.CellKind(
    "barrier", run_barrier_cell, required=("dir",), summary=("value",),
    params={"dir": _path, "seed": sweep.SEED_SPEC, "gate": sweep.FLAG_SPEC}))
