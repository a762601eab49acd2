r"""Sweeps: a grid of runs expanded into cells, run locally or on a Ray cluster, with every
result streamed to a resumable directory.

A study in this field is a grid — methods × β × μ × η₀ × seeds, plus LRS-OPT per seed. A
:class:`Grid` names a problem, a cell *kind* and the values to sweep::

    grid = Grid("beale_fig1", problem={"name": "beale"}, kind="online",
                axes={"method": ["hd", "rtho"], "beta": [1e-7, 1e-6, 1e-5]},
                fixed={"lr0": 1e-3, "steps": 500})
    report = sweep.run(grid, "results/beale_fig1")                  # in-process
    report = sweep.run(grid, "results/beale_fig1", executor="ray")  # local Ray, or address=…
    print(sweep.summary_table("results/beale_fig1"))

``grid.cells()`` is the Cartesian product of the axes (in the order written) merged over
``fixed``; each :class:`Cell` is one run with a stable id, the first 12 hex digits of the SHA-1
of the canonical JSON of (kind, kind version, problem section, the cell's *written* params):
the same settings give the same id in any process and Python version. Defaults that a grid
leaves out are not part of the id (so adding a new option to a method does not invalidate
stored sweeps); each record keeps the full configuration the run resolved to. A kind's
``version`` is bumped when its meaning changes, which gives all its cells new ids.

Cell kinds (:data:`CELL_KINDS`; add your own with :func:`register_cell_kind`):

- ``"online"``: ``hgtoolkit.online.run(problem, **params)`` (HD / RTHO / MARTHE);
- ``"lrsopt"``: ``hgtoolkit.lrsopt.optimize_schedule`` from the constant schedule η_t = ``lr0``,
  checkpointed in the store so that a killed LRS-OPT cell resumes mid-run;
- ``"train"``: constant-LR training (``hgtoolkit.trajectory.train``), final value E(w_T);
- ``"hypergrad"``: the exact ∇f(η) of a constant schedule (``hgtoolkit.exact.hypergradient``).

The grid's ``problem`` section is ``{"name": …, **kwargs}`` for ``hgtoolkit.problems.get``
(``dtype`` may be written ``"float32"``/``"float64"``). A cell's ``seed`` becomes the problem's
``seed`` (initial weights and minibatch order) when the problem takes one and the section does
not fix it, and is passed on to the run (online: minibatch order; LRS-OPT: the resampled orders).

Validation happens before any work: an unknown kind, key, method or problem, a negative β, μ
outside [0, 1], an empty or non-list axis, repeated axis values, … raise ``ValueError`` naming
the key (``axes.beta[1]``, ``fixed.mu``, ``problem.name``); every expanded cell is also checked
as a whole (e.g. ``mu`` with ``method: hd``) by the kind's ``check``.

The store (:class:`Store`), one directory per sweep::

    results_dir/manifest.json          every grid ever run into this directory
    results_dir/cells/<id>.json        one record per finished cell (written last: the commit mark)
    results_dir/cells/<id>.npz         its arrays (schedules, losses, …), written first
    results_dir/errors/<id>.json       a cell that raised (not finished: a re-run retries it)
    results_dir/checkpoints/<id>.*     in-flight LRS-OPT state (deleted when the cell finishes)
    results_dir/events.jsonl           start / finish / error events, with host, pid and time
    results_dir/driver.lock            the lease of the driver working on it (host, pid, token)

Every file is written atomically (temporary file + rename), so a reader, a re-run or a crash
never sees half a record. ``run`` skips cells whose record exists, so a killed sweep resumes
and nothing is computed twice: the driver checks before dispatching and every worker checks
again just before starting a cell. :func:`load_results` and :func:`summary_table` read the
directory only, never memory.

One driver at a time: :func:`run` takes a lease on the directory (``driver.lock``, refreshed
every 10 s); a second driver waits ``lock_timeout`` seconds and then raises
:class:`StoreLockedError` saying who holds it; the lease of a dead driver is taken over. Tasks
check the lease before each cell and before storing a record, so the tasks of a cancelled or
dead driver store nothing, and a task that does not find the lease file (a node that does not
share the filesystem) returns its records to the driver instead of writing them where the
driver cannot see them. Each record carries the lease token (``meta.run``):
``SweepReport.computed`` lists only this driver's cells.

Batch groups: online cells that differ only in (seed, β) form groups, cut in grid order into
pieces of at most ``batch`` cells (:func:`batch_groups`). The groups depend on the grid alone —
not on the executor, the chunk size or what is already stored (a group always runs whole) — so
a cell's numbers are the same however the sweep runs. When a module ``hgtoolkit.batched``
provides ``run_online_batch(problem_factory, cells)`` (the vmap-batched runner), a group of ≥ 2
cells is handed to it — ``problem_factory(seed)`` builds the problem for a seed, ``cells`` are
:class:`Cell` objects, and it returns one ``OnlineResult`` (or :class:`CellOutput`) per cell, in
order; a group's records are stored as soon as the group finishes. ``batch=False`` runs every
cell alone.

Executors:

- ``"local"`` (default): in-process, group after group.
- ``"ray"``: a new local Ray (``ray.init("local", num_cpus=…)``) unless Ray is already
  initialised in this process (then it is used as it is) or ``address``
  (``"auto"`` for a cluster started with ``ray start``, ``"ray://host:10001"`` for Ray Client)
  is given. Batch groups are packed into chunks of about ``chunk_size`` cells (default ≈ cells /
  (4 × CPUs); a group is never split), the most expensive first (longest-processing-time order
  shortens the tail); each chunk is one ``@ray.remote(max_retries=3, retry_exceptions=False)``
  task that writes each record to the store itself as soon as its cell (or group) finishes. A
  killed worker loses only its in-flight cell or group: Ray re-runs the task, which skips the
  cells already stored; a task that fails ``max_retries + 1`` times is written to
  ``errors/<id>.json`` for each of its unstored cells. ``num_gpus`` per task defaults to 1
  when the problem asks for ``device: cuda`` and the cluster has GPUs, else 0. With
  ``worker_writes=False`` (a cluster without a shared filesystem, or a driver connected from
  outside through Ray Client — the default for ``ray://`` addresses) tasks return their
  records and the driver writes them (a killed worker then loses its whole task). Interrupting
  the driver cancels the outstanding tasks and returns only once Ray reports each of them
  ended (a KeyboardInterrupt first, a kill of the worker after 10 s).

Determinism: every cell runs with ``torch.set_num_threads(threads_per_cell)`` (default 1; a
Ray task reserves that many CPUs) and ``torch.manual_seed(seed)``, so a cell gives
bit-identical numbers in-process and in a Ray worker on the same machine (compare with
:func:`records_equal`, which ignores timings, host and pid); other hardware or library
versions may differ in the last bits. Batched runs (the hook above) are equal to one-by-one
runs only up to rounding, which is why the batch groups are fixed by the grid.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import traceback
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from . import records
from .errors import DivergenceError

__all__ = ["Grid", "Cell", "CellKind", "CellOutput", "CELL_KINDS", "register_cell_kind",
           "load_grids", "run", "SweepReport", "Store", "StoreLockedError", "load_results",
           "summary_table", "records_equal", "to_result", "EXECUTORS", "BATCH_MAX"]

EXECUTORS = ("local", "ray")
_RECORD_FORMAT = "hgtoolkit.sweep.cell/1"
_ID_SALT = "hgtoolkit.sweep/1"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, floats by their shortest repr: a stable text."""
    return json.dumps(records.to_jsonable(obj), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)


# ============================================================================ validators
# A validator maps a written value to its normalised form or raises ValueError("must be …").

def _number(lo: float | None = None, hi: float | None = None, *, integer: bool = False,
            words: Sequence[str] = (), none: bool = False, open_lo: bool = False) -> Callable:
    def describe() -> str:
        what = "an integer" if integer else "a number"
        if lo is not None and hi is not None:
            what += f" in [{lo}, {hi}]"
        elif lo is not None:
            what += f" {'>' if open_lo else '≥'} {lo}"
        alts = [repr(w) for w in words] + (["null"] if none else [])
        return what + (" or " + " or ".join(alts) if alts else "")

    def check(v: Any) -> Any:
        if v is None and none:
            return None
        if isinstance(v, str) and v in words:
            return v
        ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if isinstance(v, bool) or not isinstance(v, ok_type):
            raise ValueError(f"must be {describe()}, got {v!r}")
        v = int(v) if integer else float(v)
        if not math.isfinite(v):
            raise ValueError(f"must be {describe()}, got {v!r}")
        if lo is not None and (v < lo or (open_lo and v == lo)):
            raise ValueError(f"must be {describe()}, got {v!r}")
        if hi is not None and v > hi:
            raise ValueError(f"must be {describe()}, got {v!r}")
        return v

    return check


def _choice(options: Callable[[], Sequence[str]] | Sequence[str]) -> Callable:
    def check(v: Any) -> str:
        opts = tuple(options() if callable(options) else options)
        if not isinstance(v, str) or v not in opts:
            raise ValueError(f"must be one of {opts}, got {v!r}")
        return v
    return check


def _optimizer(v: Any) -> str:
    from . import dynamics
    if not isinstance(v, str):
        raise ValueError(f"must be an optimizer name, got {v!r}")
    dynamics.get(v)  # raises ValueError listing the names
    return v.lower()


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _mapping(v: Any) -> dict:
    if not isinstance(v, dict):
        raise ValueError(f"must be a mapping, got {v!r}")
    return json.loads(canonical_json(v))


_SEED = _number(0, integer=True)
_STEPS = _number(1, integer=True)
_NONNEG = _number(0)


# ============================================================================ cells and kinds

@dataclass
class CellOutput:
    """What a cell runner returns. ``result``: JSON-able values that depend only on the cell's
    settings; ``arrays``: named numpy arrays (same); ``status``: ``"ok"`` or ``"diverged"``;
    ``timing``: wall time and other machine-dependent values (scalars or arrays), kept in the
    record's ``meta`` and ignored by :func:`records_equal`."""

    result: dict
    arrays: dict = field(default_factory=dict)
    status: str = "ok"
    timing: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CellKind:
    """One kind of cell: ``run(problem, params, ctx) -> CellOutput`` plus what a grid may set.

    ``params``: key → validator (value → normalised value, ValueError("must be …") otherwise);
    ``required``: keys every cell must have; ``check(params)``: whole-cell consistency (raise
    ValueError naming the key); ``cost(params)``: relative run time, for scheduling;
    ``summary``: ``result`` keys shown by :func:`summary_table`; ``to_result(record)``: the
    module's own result object from a loaded record; ``version``: part of every cell id.
    ``ctx`` has ``ctx.checkpoint`` (a path stem in the store for resumable runs) and
    ``ctx.problem_factory(seed)``.
    """

    name: str
    run: Callable[..., CellOutput]
    params: dict
    required: tuple = ()
    check: Callable[[dict], None] | None = None
    cost: Callable[[dict], float] = lambda params: 1.0
    summary: tuple = ()
    to_result: Callable[[dict], Any] | None = None
    version: str = "1"


CELL_KINDS: dict[str, CellKind] = {}


def register_cell_kind(kind: CellKind) -> CellKind:
    """Add a cell kind (its ``run`` must be importable by name in Ray workers)."""
    if not isinstance(kind, CellKind):
        raise TypeError(f"kind must be a CellKind, got {type(kind).__name__}")
    CELL_KINDS[kind.name] = kind
    return kind


def _get_kind(name: Any, where: str = "kind") -> CellKind:
    if not isinstance(name, str) or name not in CELL_KINDS:
        raise ValueError(f"{where}: unknown cell kind {name!r}; choose one of {tuple(CELL_KINDS)}")
    return CELL_KINDS[name]


@dataclass(frozen=True)
class Cell:
    """One run: ``kind`` (a key of :data:`CELL_KINDS`), the grid's ``problem`` section and the
    cell's ``params``. ``id`` is stable across processes and Python versions."""

    kind: str
    problem: dict
    params: dict

    @property
    def id(self) -> str:
        version = CELL_KINDS[self.kind].version if self.kind in CELL_KINDS else "?"
        text = canonical_json({"kind": self.kind, "version": version, "problem": self.problem,
                               "params": self.params})
        return hashlib.sha1(f"{_ID_SALT}\n{text}".encode()).hexdigest()[:12]

    @property
    def seed(self) -> int:
        return int(self.params.get("seed", 0) or 0)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "problem": self.problem, "params": self.params}

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        return cls(d["kind"], d["problem"], d["params"])

    def batch_key(self) -> str:
        """Cells with equal keys differ only in (seed, β): what a batched runner may vary."""
        rest = {k: v for k, v in self.params.items() if k not in ("seed", "beta")}
        return canonical_json([self.kind, self.problem, rest])


# ----------------------------------------------------------------------------- problems

def _problem_constructor(name: str) -> Callable:
    """The function ``problems.get(name, **kw)`` calls (for checking keyword names up front)."""
    from . import problems
    try:
        build = problems.constructor(name)
    except ValueError as exc:
        raise ValueError(f"problem.name: {exc}") from None
    # test functions are built by from_function(name, ...): check against its keywords
    return problems.from_function if build not in (problems.mnist_mlp, problems.synthetic_classification) else build


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _validate_problem(problem: Any) -> dict:
    if not isinstance(problem, dict):
        raise ValueError(f"problem must be a mapping with a 'name', got {problem!r}")
    if "name" not in problem:
        raise ValueError("problem.name is missing: say which problem to run (e.g. 'mnist_mlp')")
    if not isinstance(problem["name"], str):
        raise ValueError(f"problem.name must be a string, got {problem['name']!r}")
    params = inspect.signature(_problem_constructor(problem["name"])).parameters
    allowed = [k for k in params if k not in ("f",)]
    for key, value in problem.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ValueError(f"problem.{key}: unknown argument of problem {problem['name']!r}; "
                             f"it takes {allowed}")
        if key == "dtype" and value not in _DTYPES:
            raise ValueError(f"problem.dtype must be one of {tuple(_DTYPES)}, got {value!r}")
    try:
        return json.loads(canonical_json(problem))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"problem: values must be JSON numbers, strings, lists or mappings: {exc}") from None


def _takes_seed(name: str) -> bool:
    return "seed" in inspect.signature(_problem_constructor(name)).parameters


def problem_kwargs(problem: dict, seed: int | None) -> dict:
    """Keyword arguments for ``problems.get(**kw)``: the section, with ``dtype`` resolved and
    the cell's seed as the problem's ``seed`` where the problem takes one and none is fixed."""
    kw = dict(problem)
    if "dtype" in kw:
        kw["dtype"] = _DTYPES[kw["dtype"]]
    if seed is not None and "seed" not in kw and _takes_seed(problem["name"]):
        kw["seed"] = seed
    return kw


_PROBLEM_CACHE: "OrderedDict[str, Any]" = OrderedDict()
_PROBLEM_CACHE_SIZE = 4


def build_problem(problem: dict, seed: int | None):
    """``problems.get`` for a cell, cached per process (data loading is paid once per worker).

    Problems are immutable in use (runs start from ``params0`` and never modify it)."""
    from . import problems
    key = canonical_json([problem, seed if "seed" not in problem and _takes_seed(problem["name"]) else None])
    if key in _PROBLEM_CACHE:
        _PROBLEM_CACHE.move_to_end(key)
        return _PROBLEM_CACHE[key]
    kw = problem_kwargs(problem, seed)
    built = problems.get(kw.pop("name"), **kw)
    _PROBLEM_CACHE[key] = built
    while len(_PROBLEM_CACHE) > _PROBLEM_CACHE_SIZE:
        _PROBLEM_CACHE.popitem(last=False)
    return built


@dataclass
class CellContext:
    """Given to a cell runner: where it may checkpoint, and how to build the problem for a seed."""

    checkpoint: Path | None
    problem_factory: Callable[[int | None], Any]
    cell_id: str = ""


# ============================================================================ the grid

@dataclass(frozen=True)
class Grid:
    """``kind`` runs on ``problem`` for every combination of ``axes`` (key → list of values),
    with ``fixed`` settings shared by all cells. Validated (and normalised) on construction."""

    name: str
    problem: dict
    kind: str = "online"
    axes: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        where = f"grid {self.name!r}"
        try:
            problem = _validate_problem(self.problem)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        kind = _get_kind(self.kind, f"{where}: kind")
        if not isinstance(self.axes, dict):
            raise ValueError(f"{where}: axes must be a mapping key → list of values, got {self.axes!r}")
        if not isinstance(self.fixed, dict):
            raise ValueError(f"{where}: fixed must be a mapping key → value, got {self.fixed!r}")

        def norm(key: str, value: Any, loc: str) -> Any:
            if key not in kind.params:
                raise ValueError(f"{where}: {loc}: unknown key {key!r} for kind {kind.name!r}; "
                                 f"it takes {sorted(kind.params)}")
            try:
                return kind.params[key](value)
            except ValueError as exc:
                raise ValueError(f"{where}: {loc}: {key} {exc}") from None

        fixed = {k: norm(k, v, f"fixed.{k}") for k, v in self.fixed.items()}
        axes = {}
        for key, values in self.axes.items():
            if isinstance(values, (str, bytes, dict)) or not isinstance(values, (list, tuple)):
                raise ValueError(f"{where}: axes.{key} must be a list of values, got {values!r}")
            if len(values) == 0:
                raise ValueError(f"{where}: axes.{key} is empty: an axis needs at least one value")
            if key in fixed:
                raise ValueError(f"{where}: axes.{key} is also in fixed; set it in one place")
            vals = [norm(key, v, f"axes.{key}[{i}]") for i, v in enumerate(values)]
            texts = [canonical_json(v) for v in vals]
            if len(set(texts)) < len(texts):
                dup = next(v for v, t in zip(vals, texts) if texts.count(t) > 1)
                raise ValueError(f"{where}: axes.{key} repeats the value {dup!r}")
            axes[key] = vals
        missing = [k for k in kind.required if k not in fixed and k not in axes]
        if missing:
            raise ValueError(f"{where}: {missing[0]!r} is required for kind {kind.name!r} "
                             "(set it in fixed or axes)")
        object.__setattr__(self, "problem", problem)
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "fixed", fixed)
        if kind.check is not None:  # every cell as a whole, before any work
            for cell in self.cells():
                try:
                    kind.check(cell.params)
                except (ValueError, TypeError) as exc:
                    at = {k: cell.params[k] for k in axes}
                    raise ValueError(f"{where}: cell {at}: {exc}") from None

    def cells(self) -> list[Cell]:
        """The Cartesian product of the axes, in the order written (the last axis fastest)."""
        keys = list(self.axes)
        return [Cell(self.kind, self.problem, {**self.fixed, **dict(zip(keys, combo))})
                for combo in itertools.product(*(self.axes[k] for k in keys))]

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.axes.values())

    def to_dict(self) -> dict:
        return {"name": self.name, "problem": self.problem, "kind": self.kind,
                "axes": self.axes, "fixed": self.fixed}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        if not isinstance(d, dict):
            raise ValueError(f"a grid must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "problem", "kind", "axes", "fixed"}
        if unknown:
            raise ValueError(f"grid {d.get('name')!r}: unknown top-level key {sorted(unknown)[0]!r}; "
                             "a grid has name, problem, kind, axes, fixed")
        for key in ("name", "problem"):
            if key not in d:
                raise ValueError(f"grid: {key!r} is missing")
        return cls(d["name"], d["problem"], d.get("kind", "online"), d.get("axes") or {},
                   d.get("fixed") or {})

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Grid":
        """The one grid in a YAML/JSON file (use :func:`load_grids` for a file with several)."""
        grids = load_grids(path)
        if len(grids) != 1:
            raise ValueError(f"{path} holds {len(grids)} grids; use hgtoolkit.sweep.load_grids")
        return grids[0]


def _yaml_loader():
    import re
    try:
        import yaml
    except ModuleNotFoundError:
        raise ModuleNotFoundError("reading YAML grids needs pyyaml (pip install pyyaml), or write "
                                  "the grid as .json") from None

    class Loader(yaml.SafeLoader):
        """SafeLoader that also reads 1e-3 as a float (YAML 1.1 wants 1.0e-3)."""

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return yaml, Loader


def load_grids(path_or_dict: str | os.PathLike | dict) -> list[Grid]:
    """Grids from a YAML/JSON file (or an already-parsed mapping).

    The file is one grid (``name``, ``problem``, ``kind``, ``axes``, ``fixed``) or a study:
    ``name`` and ``problem`` shared by a list ``grids:`` of partial grids (each with ``kind``,
    ``axes``, ``fixed`` and optionally its own ``name``/``problem``) — e.g. online methods
    over a β grid plus LRS-OPT per seed, in one results directory.
    """
    if isinstance(path_or_dict, dict):
        data, where = path_or_dict, "grid"
    else:
        path = Path(path_or_dict)
        if not path.exists():
            raise FileNotFoundError(f"grid file {path} does not exist")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            yaml, loader = _yaml_loader()
            try:
                data = yaml.load(text, Loader=loader)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML: {exc}") from None
        where = str(path)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    if "grids" not in data:
        return [Grid.from_dict(data)]
    shared = {k: v for k, v in data.items() if k != "grids"}
    unknown = set(shared) - {"name", "problem"}
    if unknown:
        raise ValueError(f"{where}: unknown top-level key {sorted(unknown)[0]!r} beside 'grids' "
                         "(only name and problem are shared)")
    parts = data["grids"]
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"{where}: grids must be a non-empty list of grids")
    grids = []
    for i, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ValueError(f"{where}: grids[{i}] must be a mapping, got {part!r}")
        d = {**shared, **part}
        base = shared.get("name", "grid")
        d["name"] = f"{base}/{part['name']}" if "name" in part else f"{base}[{i}]"
        grids.append(Grid.from_dict(d))
    return grids


def _as_grids(grids: Any) -> list[Grid]:
    if isinstance(grids, Grid):
        return [grids]
    if isinstance(grids, (str, os.PathLike, dict)):
        return load_grids(grids)
    if isinstance(grids, (list, tuple)) and grids and all(isinstance(g, Grid) for g in grids):
        return list(grids)
    raise TypeError(f"grids must be a Grid, a list of Grids, a mapping or a grid file path, got {grids!r}")


# ============================================================================ the store

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


LEASE_STALE_S = 60.0  # a lease on another host without a heartbeat for this long is stale
_HEARTBEAT_S = 10.0


class StoreLockedError(RuntimeError):
    """Another driver holds the results directory."""


def _read_json_named(path: Path, what: str) -> Any:
    """``json.load`` whose errors name the file (a corrupt record says which one, and what to do)."""
    try:
        data = records.read_json(path)
    except json.JSONDecodeError as exc:  # its message names the file
        raise ValueError(f"{exc.msg}: {what} is corrupt; delete the file to recompute it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


class Store:
    """A sweep's results directory (layout in the module docstring). Safe for many writers:
    every file is written atomically and each cell has its own files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.errors_dir = self.root / "errors"
        self.checkpoints_dir = self.root / "checkpoints"
        self.events_path = self.root / "events.jsonl"
        self.manifest_path = self.root / "manifest.json"
        self.lock_path = self.root / "driver.lock"

    # ---------------------------------------------------------------- records
    def record_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def has(self, cell_id: str) -> bool:
        return self.record_path(cell_id).exists()

    def done(self) -> set[str]:
        """Ids of all finished cells (one directory listing)."""
        try:
            names = os.listdir(self.cells_dir)
        except FileNotFoundError:
            return set()
        return {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}

    def write(self, record: dict, arrays: dict, timing_arrays: dict) -> Path:
        """The arrays first, then the JSON record (its presence marks the cell finished)."""
        cid = record["id"]
        all_arrays = {**arrays, **{f"meta.{k}": v for k, v in timing_arrays.items()}}
        if all_arrays:
            records.save_arrays(self.cells_dir / f"{cid}.npz", **all_arrays)
        path = records.atomic_write_json(self.record_path(cid), record)
        with contextlib.suppress(FileNotFoundError):
            (self.errors_dir / f"{cid}.json").unlink()
        return path

    def read(self, cell_id: str, arrays: bool = True) -> dict:
        """A record; with ``arrays`` its arrays as ``record["arrays"]`` (name → ndarray) and
        timing arrays in ``record["meta"]["timing"]``."""
        rec = _read_json_named(self.record_path(cell_id), f"the record of cell {cell_id}")
        if rec.get("format") != _RECORD_FORMAT or not isinstance(rec.get("meta"), dict):
            raise ValueError(f"{self.record_path(cell_id)}: not a sweep cell record (format "
                             f"{rec.get('format')!r}, expected {_RECORD_FORMAT!r}); delete it to "
                             "recompute the cell")
        names, tnames = rec.get("arrays", []), rec["meta"].get("timing_arrays", [])
        if not arrays:
            return rec
        npz = self.cells_dir / f"{cell_id}.npz"
        try:
            data = records.load_arrays(npz) if names or tnames else {}
            rec["arrays"] = {k: data[k] for k in names}
            timing_arrays = {k: data[f"meta.{k}"] for k in tnames}
        except (OSError, ValueError, KeyError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise ValueError(f"{npz}: missing; the arrays of cell {cell_id} are gone "
                                 f"(delete {self.record_path(cell_id)} to recompute it)") from None
            raise ValueError(f"{npz}: corrupt arrays of cell {cell_id} ({type(exc).__name__}: {exc}); "
                             f"delete it and {self.record_path(cell_id)} to recompute the cell") from None
        rec["meta"]["timing"] = {**{k: v for k, v in rec["meta"].get("timing", {}).items()},
                                 **timing_arrays}
        return rec

    # ---------------------------------------------------------------- errors, checkpoints, log
    def write_error(self, cell: Cell, error: str, meta: dict) -> None:
        records.atomic_write_json(self.errors_dir / f"{cell.id}.json",
                                  {"id": cell.id, **cell.to_dict(), "error": error, "meta": meta})

    def error(self, cell_id: str) -> str:
        """The traceback stored for a failed cell ("" if none)."""
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return records.read_json(self.errors_dir / f"{cell_id}.json").get("error", "")
        return ""

    def errors(self) -> dict[str, dict]:
        if not self.errors_dir.exists():
            return {}
        out = {}
        for p in sorted(self.errors_dir.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                out[p.stem] = records.read_json(p)
        return out

    def checkpoint(self, cell_id: str) -> Path:
        return self.checkpoints_dir / cell_id

    def clear_checkpoint(self, cell_id: str) -> None:
        for p in self.checkpoints_dir.glob(f"{cell_id}*") if self.checkpoints_dir.exists() else ():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def log(self, event: str, cell_id: str, **info: Any) -> None:
        """Append one JSON line (a single ``write`` with O_APPEND: lines from concurrent
        processes on a local filesystem do not interleave; on NFS the log is best-effort)."""
        line = json.dumps({"event": event, "id": cell_id, "time": _now(), "host": socket.gethostname(),
                           "pid": os.getpid(), **records.to_jsonable(info)}) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        """The event log (malformed lines, e.g. from a crash mid-write, are skipped)."""
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return _read_json_named(self.manifest_path, "the sweep's manifest")

    def add_grids(self, grids: Sequence[Grid]) -> None:
        """Record the grids in ``manifest.json`` (a re-run with an extended grid adds it).
        The read-modify-write holds an exclusive ``flock`` on ``.manifest.lock``, so two
        processes adding grids at once both land."""
        import fcntl
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                old = self.manifest() or {}
                known = list(old.get("grids", []))
                texts = {canonical_json(g) for g in known}
                for g in grids:
                    if canonical_json(g.to_dict()) not in texts:
                        known.append(g.to_dict())
                records.atomic_write_json(self.manifest_path, {
                    "format": "hgtoolkit.sweep.manifest/1", "grids": known,
                    "created": old.get("created", _now()), "updated": _now()})
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- the driver's lease
    # ``driver.lock`` holds {token, host, pid, started}; its mtime is the driver's heartbeat.
    # Only one driver works on a directory at a time; tasks check the lease before starting a
    # cell and before storing one, so a task of a cancelled (or dead) driver stores nothing, and
    # a task that cannot see the file is on a node without the shared filesystem.

    def holder(self) -> dict | None:
        """The lease (token, host, pid, started) or None when no driver holds the directory."""
        try:
            with open(self.lock_path) as fh:
                return json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def holds(self, token: str) -> bool:
        return (self.holder() or {}).get("token") == token

    def _stale(self, info: dict | None) -> bool:
        if info is None:  # a lock file being written, or garbage: judge by its age
            with contextlib.suppress(FileNotFoundError):
                return time.time() - self.lock_path.stat().st_mtime > LEASE_STALE_S
            return False
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                pass
            return False
        with contextlib.suppress(FileNotFoundError):
            return time.time() - self.lock_path.stat().st_mtime > LEASE_STALE_S
        return False

    def acquire(self, token: str, wait: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for another driver to finish; a lease
        whose driver died (same host: its pid is gone; elsewhere: no heartbeat for
        ``LEASE_STALE_S`` s) is taken over. Raises :class:`StoreLockedError` saying who holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        body = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": _now()}).encode()
        while True:
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self.holder()
                if self._stale(info):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.lock_path)
                    self.log("lease_taken_over", "", previous=info)
                    continue
                if time.monotonic() >= deadline:
                    who = (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
                           if info else "a driver")
                    raise StoreLockedError(
                        f"results_dir {self.root} is in use by another sweep driver ({who}); "
                        f"wait for it to finish (lock_timeout=…, CLI --wait SECONDS), or if that "
                        f"driver is dead and this is not detected, delete {self.lock_path}") from None
                time.sleep(0.2)
                continue
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            return

    def heartbeat(self, token: str) -> None:
        if self.holds(token):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.lock_path)

    def release(self, token: str) -> None:
        if self.holds(token):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)


# ============================================================================ running cells

def _versions() -> dict:
    from . import __version__
    return {"hgtoolkit": __version__, "torch": torch.__version__, "numpy": np.__version__}


@contextlib.contextmanager
def _cell_environment(threads: int, seed: int):
    """Fixed thread count and global seed for the cell; warnings captured for the record."""
    old_threads = torch.get_num_threads()
    old_rng = torch.random.get_rng_state()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.set_num_threads(old_threads)
        torch.random.set_rng_state(old_rng)


def _record(cell: Cell, out: CellOutput, meta: dict) -> tuple[dict, dict, dict]:
    """(record JSON, arrays, timing arrays) for the store."""
    arrays = {k: np.asarray(v) for k, v in out.arrays.items() if v is not None}
    timing_scalars, timing_arrays = {}, {}
    for k, v in out.timing.items():
        if isinstance(v, (np.ndarray, torch.Tensor, list, tuple)):
            timing_arrays[k] = np.asarray(v)
        else:
            timing_scalars[k] = v
    rec = {"format": _RECORD_FORMAT, "id": cell.id, **cell.to_dict(), "status": out.status,
           "result": records.to_jsonable(out.result), "arrays": sorted(arrays),
           "meta": {**meta, "timing": timing_scalars, "timing_arrays": sorted(timing_arrays)}}
    return rec, arrays, timing_arrays


def _warning_texts(caught) -> list[str]:
    seen = []
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in seen:
            seen.append(text)
    return seen[:20]


def _divergence_output(exc: DivergenceError) -> CellOutput:
    return CellOutput({"diverged_at": exc.step, "divergence": str(exc)}, status="diverged")


def _as_output(kind: CellKind, obj: Any) -> CellOutput:
    if isinstance(obj, CellOutput):
        return obj
    convert = _OUTPUT_CONVERTERS.get(kind.name)
    if convert is None:
        raise TypeError(f"the {kind.name!r} runner returned {type(obj).__name__}, not a CellOutput")
    return convert(obj)


class _LeaseLost(RuntimeError):
    """The driver that started this task no longer holds the results directory."""


class _Runner:
    """Runs cells into a store: one process's worth of the sweep (local executor or a Ray task).

    ``token``: the driver's lease; with ``write`` the runner checks it before each cell and
    before storing a record, so that a task whose driver was cancelled (or died, and another
    driver took over) stores nothing."""

    def __init__(self, store: Store, executor: str, threads: int, write: bool,
                 token: str | None = None):
        self.store, self.executor, self.threads, self.write = store, executor, threads, write
        self.token = token
        self.payloads: list = []  # (record, arrays, timing) when the driver writes

    def _check_lease(self) -> None:
        if self.write and self.token is not None and not self.store.holds(self.token):
            raise _LeaseLost(f"the driver's lease on {self.store.root} is gone (cancelled, or "
                             "another driver took over): stopping without storing anything")

    def _meta(self, t0: float, caught, problem=None) -> dict:
        meta = {"executor": self.executor, "host": socket.gethostname(), "pid": os.getpid(),
                "run": self.token, "finished": _now(), "wall_time": time.perf_counter() - t0,
                "warnings": _warning_texts(caught), "versions": _versions()}
        info = getattr(problem, "info", None) or {}
        if "data" in info:  # where the data came from (the MNIST fallback says so)
            meta["data"] = info["data"]
            meta["fallback_data"] = bool(info.get("is_fallback", False))
        return meta

    def _finish(self, cell: Cell, out: CellOutput, meta: dict) -> None:
        rec, arrays, timing = _record(cell, out, meta)
        rec["meta"]["timing"].setdefault("wall_time", meta["wall_time"])
        if self.write:
            self._check_lease()
            self.store.write(rec, arrays, timing)
            self.store.clear_checkpoint(cell.id)
            self.store.log("finish", cell.id, status=out.status, wall_time=meta["wall_time"])
        else:
            self.payloads.append((rec, arrays, timing))

    def _fail(self, cell: Cell, t0: float, caught) -> str:
        error = traceback.format_exc(limit=20)
        meta = self._meta(t0, caught)
        if self.write:
            self._check_lease()
            self.store.write_error(cell, error, meta)
            self.store.log("error", cell.id, error=error.strip().splitlines()[-1])
        else:
            self.payloads.append(({"id": cell.id, "error": error, **cell.to_dict(), "meta": meta}, None, None))
        return error

    def run_cell(self, cell: Cell) -> str:
        """``"existing"`` (already stored: skipped), ``"computed"`` or ``"error"``."""
        if self.write and self.store.has(cell.id):
            return "existing"
        self._check_lease()
        kind = CELL_KINDS[cell.kind]
        if self.write:
            self.store.log("start", cell.id, executor=self.executor)
        t0, problem = time.perf_counter(), None
        with _cell_environment(self.threads, cell.seed) as caught:
            try:
                factory = lambda seed: build_problem(cell.problem, seed)
                ctx = CellContext(self.store.checkpoint(cell.id) if self.write else None, factory, cell.id)
                problem = factory(cell.seed)
                try:
                    out = _as_output(kind, kind.run(problem, dict(cell.params), ctx))
                except DivergenceError as exc:
                    out = _divergence_output(exc)
            except Exception:  # recorded in errors/<id>.json; a re-run retries the cell
                self._fail(cell, t0, caught)
                return "error"
        self._finish(cell, out, self._meta(t0, caught, problem))
        return "computed"

    def run_batch(self, fn: Callable, group: list[Cell]) -> list[str]:
        """A batch group (fixed by the grid, :func:`batch_groups`) through the batched runner.
        The whole group always runs, so that a cell's numbers never depend on which of its
        group-mates were stored before; only the missing cells are stored."""
        todo = [c for c in group if not (self.write and self.store.has(c.id))]
        if not todo:
            return ["existing"] * len(group)
        self._check_lease()
        kind, first = CELL_KINDS[group[0].kind], group[0]
        for c in todo:
            if self.write:
                self.store.log("start", c.id, executor=self.executor, batched=len(group))
        t0, failure, problem = time.perf_counter(), None, None
        with _cell_environment(self.threads, first.seed) as caught:
            try:
                factory = lambda seed: build_problem(first.problem, seed)
                problem = factory(first.seed)
                outs = fn(factory, group)
                outs = [_as_output(kind, o) for o in outs]
                if len(outs) != len(group):
                    raise RuntimeError(f"run_online_batch returned {len(outs)} results for {len(group)} cells")
            except Exception:
                failure = traceback.format_exc(limit=1).strip().splitlines()[-1]
        if failure is not None:  # fall back to one by one
            warnings.warn(f"hgtoolkit.batched.run_online_batch failed ({failure}); running the "
                          f"{len(group)} cells one by one", RuntimeWarning, stacklevel=2)
            return [self.run_cell(c) for c in group]
        meta = self._meta(t0, caught, problem)
        meta["batched"] = len(group)
        for c, o in zip(group, outs):
            if c in todo:
                self._finish(c, o, meta)
        return ["computed" if c in todo else "existing" for c in group]

    def run_groups(self, groups: Sequence[Sequence[Cell]],
                   on_done: Callable[[Cell, str], None] | None = None) -> dict[str, str]:
        """Run batch groups (lists of cells; a group of one runs unbatched), storing each
        cell's record as soon as it (or its group) finishes."""
        fn = _batched_runner() if any(len(g) > 1 for g in groups) else None
        status: dict[str, str] = {}
        for group in groups:
            results = self.run_batch(fn, list(group)) if len(group) > 1 else [self.run_cell(group[0])]
            for c, s in zip(group, results):
                status[c.id] = s
                if on_done is not None:
                    on_done(c, s)
        return status


def _batched_runner() -> Callable | None:
    """``hgtoolkit.batched.run_online_batch`` if that module exists (the vmap hook), else None."""
    import importlib
    try:
        batched = importlib.import_module(f"{__package__}.batched")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.batched":
            return None
        raise
    return getattr(batched, "run_online_batch", None)


BATCH_MAX = 32  # cells per batch group (``batch=True``)


def batch_groups(cells: Sequence[Cell], batch: bool | int = True) -> list[list[Cell]]:
    """The batch groups of ``cells`` (all cells of the grids, in grid order): online cells that
    differ only in (seed, β), cut in grid order into pieces of at most ``batch`` cells
    (``True``: :data:`BATCH_MAX`; ``False``/1 or no batched runner: every cell alone). The
    groups depend on the grid only — never on the executor, the chunk size or what is stored —
    so a cell's numbers are the same however the sweep is run."""
    size = BATCH_MAX if batch is True else int(batch or 1)
    if size < 2 or _batched_runner() is None:
        return [[c] for c in cells]
    keyed: "OrderedDict[str, list[Cell]]" = OrderedDict()
    for c in cells:
        keyed.setdefault(c.batch_key() if c.kind == "online" else c.id, []).append(c)
    return [g[i:i + size] for g in keyed.values() for i in range(0, len(g), size)]


def _ray_chunk(groups: list[list[dict]], root: str, threads: int, write: bool, token: str,
               kind_modules: list[str]) -> list:
    """One Ray task: run a chunk of batch groups, storing each record as it finishes.
    Returns [status, payloads, info]: when this node cannot see the driver's lease in
    ``root`` (no shared filesystem) the records come back as payloads for the driver."""
    import importlib
    for m in kind_modules:  # kinds registered by other modules (e.g. tests) exist here too
        importlib.import_module(m)
    store = Store(root)
    sees = store.holds(token)
    runner = _Runner(store, "ray", threads, write and sees, token if sees else None)
    status = runner.run_groups([[Cell.from_dict(c) for c in g] for g in groups])
    return [status, runner.payloads, {"host": socket.gethostname(), "sees_store": sees}]


# ============================================================================ the driver

@dataclass
class SweepReport:
    """What one call of :func:`run` did. ``existing``: cells already stored (skipped);
    ``computed``: cells finished by this call (this driver's own records); ``failed``: id →
    error (not stored; a re-run retries them); ``missing``: cells neither stored nor failed
    (interrupted); ``notes``: things to know about the results (fallback data, workers that
    could not see the results directory)."""

    results_dir: Path
    executor: str
    total: int
    existing: list = field(default_factory=list)
    computed: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    wall_time: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def missing(self) -> int:
        return self.total - len(self.existing) - len(self.computed) - len(self.failed)

    @property
    def ok(self) -> bool:
        return not self.failed and self.missing == 0

    def __str__(self) -> str:
        rate = len(self.computed) / self.wall_time if self.wall_time > 0 else math.nan
        text = (f"sweep {self.results_dir}: {self.total} cells — {len(self.existing)} already done, "
                f"{len(self.computed)} computed ({rate:.3g} cells/s, {self.executor}), "
                f"{len(self.failed)} failed, {self.missing} missing; {self.wall_time:.1f} s")
        return "\n".join([text] + [f"  note: {n}" for n in self.notes])


def _unique_cells(grids: Sequence[Grid]) -> list[Cell]:
    seen, cells = set(), []
    for g in grids:
        for c in g.cells():
            if c.id not in seen:
                seen.add(c.id)
                cells.append(c)
    return cells


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int ≥ {lo}, got {value!r}")


def run(grids: "Grid | Sequence[Grid] | str | os.PathLike | dict", results_dir: str | os.PathLike, *,
        executor: str = "local", address: str | None = None, num_cpus: int | None = None,
        num_gpus: float | None = None, chunk_size: int | None = None, threads_per_cell: int = 1,
        max_retries: int = 3, runtime_env: dict | None = None, worker_writes: bool | None = None,
        batch: bool | int = True, lock_timeout: float = 0.0, progress: bool = True,
        callback: Callable[[int, int], Any] | None = None) -> SweepReport:
    """Run every cell of ``grids`` not yet in ``results_dir``; return a :class:`SweepReport`.

    ``executor``: ``"local"`` (in-process) or ``"ray"``. For Ray (module docstring):
    ``address`` (None: a local Ray with ``num_cpus`` CPUs, unless Ray is already initialised,
    in which case it is used as it is), ``num_gpus`` and ``max_retries`` per task,
    ``chunk_size`` cells per task (a batch group is never split), ``runtime_env`` for
    ``ray.init``; ``worker_writes``: workers write records into ``results_dir`` (a path they
    must see: local Ray, or a filesystem shared by the cluster — a worker that does not see the
    driver's lease file there sends its records back instead), or with False always return
    them for the driver to write; default False for a ``ray://`` (Ray Client) address, else True.
    ``threads_per_cell``: torch threads inside a cell (1: deterministic across executors).
    ``batch``: batch groups of at most this many online cells (True: :data:`BATCH_MAX`) go
    through the ``hgtoolkit.batched`` hook; False: every cell alone.
    ``lock_timeout``: seconds to wait while another driver holds ``results_dir`` before
    raising :class:`StoreLockedError` (default 0: say so at once).
    ``callback(done, total)`` is called by the driver whenever cells finish
    (an exception raised there interrupts the sweep like Ctrl-C does). Errors inside a cell
    do not stop the sweep: they are stored in ``errors/`` and reported in ``report.failed``.
    """
    grids = _as_grids(grids)
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {EXECUTORS}")
    _check_int("threads_per_cell", threads_per_cell, 1)
    if executor == "local" and (address is not None or num_gpus):
        raise ValueError("address and num_gpus are for executor='ray'")
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)
    _check_int("max_retries", max_retries, 0)
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or num_gpus < 0):
        raise ValueError(f"num_gpus must be a number ≥ 0, got {num_gpus!r}")
    if not isinstance(batch, bool):
        _check_int("batch", batch, 1)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
        raise ValueError(f"lock_timeout must be a number of seconds ≥ 0, got {lock_timeout!r}")

    if executor == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise ModuleNotFoundError("executor='ray' needs Ray: pip install 'hgtoolkit[ray]'")
    if worker_writes is None:
        worker_writes = not (isinstance(address, str) and address.startswith("ray://"))
    store = Store(results_dir)
    token = uuid.uuid4().hex
    store.acquire(token, lock_timeout)
    beat = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, token, beat), daemon=True).start()
    try:
        store.add_grids(grids)
        cells = _unique_cells(grids)
        groups = batch_groups(cells, batch)
        done = store.done()
        report = SweepReport(store.root, executor, len(cells),
                             existing=[c.id for c in cells if c.id in done])
        pending = [g for g in groups if any(c.id not in done for c in g)]
        t0 = time.perf_counter()
        from .trajectory import progress_bar
        bar = progress_bar(None, progress, total=len(cells), initial=len(report.existing), unit="cell",
                           desc=f"sweep {grids[0].name}" + (f" +{len(grids) - 1}" if len(grids) > 1 else ""))
        try:
            if pending:
                if executor == "local":
                    _run_local(pending, store, report, bar, threads_per_cell, callback, token)
                else:
                    _run_ray(pending, store, report, bar, threads_per_cell, callback, address,
                             num_cpus, num_gpus, chunk_size, max_retries, runtime_env, worker_writes, token)
        finally:
            report.wall_time = time.perf_counter() - t0
            if hasattr(bar, "close"):
                bar.close()
        report.notes += _data_notes(store, cells)
    finally:
        beat.set()
        store.release(token)
    return report


def _heartbeat(store: Store, token: str, stop: threading.Event) -> None:
    while not stop.wait(_HEARTBEAT_S):
        store.heartbeat(token)


def _data_notes(store: Store, cells: Sequence[Cell]) -> list[str]:
    """A note when stored cells of this sweep ran on fallback data (e.g. the 5000-digit MNIST)."""
    sources: Counter = Counter()
    for c in cells:
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = _read_json_named(store.record_path(c.id), "a record").get("meta", {})
            if meta.get("fallback_data"):
                sources[str(meta.get("data"))] += 1
    return [f"{n} of {len(cells)} cells ran on fallback data: {src} — not comparable with "
            "results on the full data set" for src, n in sources.items()]


def _run_local(pending, store, report, bar, threads, callback, token) -> None:
    runner = _Runner(store, "local", threads, True, token)
    total, done0 = report.total, len(report.existing)

    def on_done(cell: Cell, status: str) -> None:
        if status == "computed":
            report.computed.append(cell.id)
        elif status == "error":
            report.failed[cell.id] = store.error(cell.id)
        elif status == "existing" and cell.id not in report.existing:  # stored meanwhile
            report.existing.append(cell.id)
        if hasattr(bar, "update"):
            bar.update(1)
        if callback is not None:
            callback(done0 + len(report.computed) + len(report.failed), total)

    runner.run_groups(pending, on_done)


def _cost(group: Sequence[Cell]) -> float:
    return sum(CELL_KINDS[c.kind].cost(c.params) for c in group)


def _chunks(groups: list[list[Cell]], chunk_size: int) -> list[list[list[Cell]]]:
    """Batch groups packed into tasks of about ``chunk_size`` cells (a group is never split),
    the most expensive cells first (longest processing time first shortens the tail)."""
    ordered = sorted(groups, key=lambda g: _cost(g) / len(g), reverse=True)
    chunks: list[list[list[Cell]]] = []
    size = chunk_size + 1
    for g in ordered:
        if size + len(g) > chunk_size:
            chunks.append([])
            size = 0
        chunks[-1].append(g)
        size += len(g)
    return chunks


_REMOTE = None


def _remote_chunk():
    global _REMOTE
    if _REMOTE is None:
        import ray
        _REMOTE = ray.remote(max_retries=3, retry_exceptions=False, num_cpus=1)(_ray_chunk)
    return _REMOTE


def _own_records(store: Store, ids: Iterable[str], token: str) -> list[str]:
    """Those of ``ids`` whose stored record was written under this driver's lease."""
    done, out = store.done(), []
    for cid in ids:
        if cid in done:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if _read_json_named(store.record_path(cid), "a record").get("meta", {}).get("run") == token:
                    out.append(cid)
    return out


def _run_ray(pending, store, report, bar, threads, callback, address, num_cpus, num_gpus,
             chunk_size, max_retries, runtime_env, worker_writes, token) -> None:
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("executor='ray' needs Ray: pip install 'hgtoolkit[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": address, "runtime_env": runtime_env,
                              "logging_level": logging.WARNING}
        if address is None:  # a new local Ray, even if a cluster runs on this machine
            kw.update(address="local", num_cpus=num_cpus, include_dashboard=False)
        ray.init(**kw)
        started_here = True
    pending_cells = [c for g in pending for c in g]
    pending_ids = {c.id for c in pending_cells}
    try:
        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        if num_gpus is None:
            wants_cuda = any(str(c.problem.get("device", "cpu")).startswith("cuda") for c in pending_cells)
            num_gpus = 1 if wants_cuda and ray.cluster_resources().get("GPU", 0) > 0 else 0
        size = chunk_size or max(1, math.ceil(len(pending_cells) / (4 * max(cpus // threads, 1))))
        task = _remote_chunk().options(max_retries=max_retries, num_gpus=num_gpus, num_cpus=threads)
        modules = sorted({CELL_KINDS[c.kind].run.__module__ for c in pending_cells})
        refs = {task.remote([[c.to_dict() for c in g] for g in chunk], str(store.root.resolve()),
                            threads, worker_writes, token, modules): [c for g in chunk for c in g]
                for chunk in _chunks(pending, size)}
        total, done0 = report.total, len(report.existing)
        seen: set[str] = set()
        blind: set[str] = set()

        def account(newly: Iterable[str]) -> None:
            fresh = [i for i in newly if i not in seen]
            if not fresh:
                return
            seen.update(fresh)
            if hasattr(bar, "update"):
                bar.update(len(fresh))
            if callback is not None:
                callback(done0 + len(seen), total)

        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.25)
                for ref in ready:
                    chunk = refs.pop(ref)
                    try:
                        status, payloads, info = ray.get(ref)
                    except Exception as exc:  # the task failed max_retries + 1 times
                        msg = f"{type(exc).__name__}: {exc}".strip()
                        status, payloads, info = {c.id: "error" for c in chunk if not store.has(c.id)}, [], {}
                        meta = {"executor": "ray", "host": socket.gethostname(), "pid": os.getpid(),
                                "run": token, "finished": _now(), "task_failed": True}
                        for c in chunk:
                            if c.id in status:
                                store.write_error(c, msg, meta)  # where the CLI says it is
                                report.failed[c.id] = msg
                    if info and not info.get("sees_store") and worker_writes:
                        blind.add(str(info.get("host")))
                    for rec, arrays, timing in payloads:  # the driver writes
                        if arrays is None:
                            store.write_error(Cell.from_dict(rec), rec["error"], rec["meta"])
                        elif not store.has(rec["id"]):
                            rec["meta"]["run"] = token
                            store.write(rec, arrays, timing)
                            store.log("finish", rec["id"], status=rec["status"], via="driver")
                    for cid, s in status.items():
                        if s == "error" and cid not in report.failed:
                            report.failed[cid] = store.error(cid)
                    account(cid for cid, s in status.items() if s != "error")
                account(store.done() & pending_ids)
        except BaseException:  # Ctrl-C or a callback: stop every task before handing back, so
            _cancel(ray, list(refs))  # that none writes a record behind a re-run's back
            raise
        finally:
            report.computed.extend(_own_records(store, (c.id for c in pending_cells), token))
            own, stored, known = set(report.computed), store.done(), set(report.existing)
            report.existing.extend(c.id for c in pending_cells  # stored by another driver meanwhile
                                   if c.id in stored and c.id not in own and c.id not in known)
            for cid in list(report.failed):
                if cid in own:
                    del report.failed[cid]
            if blind:
                report.notes.append(
                    f"Ray workers on {sorted(blind)} cannot see {store.root} (no shared filesystem): "
                    "their records were sent back to the driver and stored here")
    finally:
        if started_here:
            ray.shutdown()


def _cancel(ray, refs: list, grace: float = 10.0, confirm: float = 120.0) -> None:
    """Cancel tasks and return only once each is confirmed ended: a KeyboardInterrupt in the
    running ones (their workers survive), then after ``grace`` seconds a kill of the workers
    still running; then wait for Ray to report every task finished, cancelled or dead."""
    if not refs:
        return
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    left = _wait_ended(ray, refs, grace)
    for ref in left:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    left = _wait_ended(ray, left, confirm)
    if left:
        warnings.warn(f"{len(left)} cancelled Ray task(s) not confirmed dead after {confirm:.0f} s; "
                      "they cannot store records (the lease is released) but may still run",
                      RuntimeWarning, stacklevel=3)


def _wait_ended(ray, refs: list, timeout: float) -> list:
    """The refs still unresolved after ``timeout`` seconds (a cancelled or killed task's ref
    resolves, with an error, once Ray knows the task stopped)."""
    deadline = time.monotonic() + timeout
    left = list(refs)
    while left and time.monotonic() < deadline:
        try:
            _, left = ray.wait(left, num_returns=len(left), timeout=min(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a ref of a dead task can make wait raise; poll again
            time.sleep(0.1)
    return left


# ============================================================================ reading results

def load_results(results_dir: str | os.PathLike, *, kind: str | None = None,
                 grid: "Grid | Sequence[Grid] | None" = None, arrays: bool = True) -> list[dict]:
    """All finished records in ``results_dir`` (from the directory only), in the order of the
    manifest's grids (then any others by id). Filter by ``kind`` or to the cells of ``grid``.

    A record: ``id``, ``kind``, ``problem``, ``params``, ``status`` (``"ok"``/``"diverged"``),
    ``result`` (values), ``arrays`` (name → ndarray), ``meta`` (executor, host, pid, time,
    warnings, versions, ``timing``)."""
    store = Store(results_dir)
    if not store.root.exists():
        raise FileNotFoundError(f"results directory {store.root} does not exist")
    done = store.done()
    if grid is not None:
        order = [c.id for c in _unique_cells(_as_grids(grid))]
        ids = [i for i in order if i in done]
    else:
        order = []
        manifest = store.manifest() or {}
        for g in manifest.get("grids", []):
            with contextlib.suppress(ValueError, TypeError):
                order += [c.id for c in Grid.from_dict(g).cells()]
        ordered = list(dict.fromkeys(i for i in order if i in done))
        ids = ordered + sorted(done - set(ordered))
    out = []
    for cid in ids:
        try:
            rec = store.read(cid, arrays=arrays)
        except FileNotFoundError:
            continue
        if kind is None or rec["kind"] == kind:
            out.append(rec)
    return out


def records_equal(a: dict, b: dict) -> bool:
    """Same cell and same numbers: everything but ``meta`` (timings, host, pid, executor)."""
    keys = ("id", "kind", "problem", "params", "status", "result")
    if any(canonical_json(a.get(k)) != canonical_json(b.get(k)) for k in keys):
        return False
    xa, xb = a.get("arrays") or {}, b.get("arrays") or {}
    if isinstance(xa, list) or isinstance(xb, list):
        return xa == xb
    return set(xa) == set(xb) and all(np.array_equal(xa[k], xb[k], equal_nan=True) for k in xa)


def to_result(record: dict) -> Any:
    """The module's own result object for a loaded record (online: ``OnlineResult``; lrsopt:
    ``ScheduleResult``), for the plotting code that takes those."""
    kind = _get_kind(record.get("kind"), "record.kind")
    if kind.to_result is None:
        raise ValueError(f"cell kind {kind.name!r} has no result object; use the record itself")
    return kind.to_result(record)


def _fmt(values: list[float]) -> str:
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(vals) == 0:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.4g}"
    return f"{vals.mean():.4g} ± {vals.std(ddof=1):.2g}"


def summary_table(results_dir: str | os.PathLike, *, by: Sequence[str] | None = None) -> str:
    """A Markdown table per cell kind, built from the directory: one row per setting (all
    varying params except ``seed`` unless ``by`` names the columns), mean ± std over the
    seeds of the kind's summary values among runs that did not diverge, and how many runs
    diverged."""
    recs = load_results(results_dir, arrays=False)
    if not recs:
        return f"(no finished cells in {results_dir})\n"
    parts = []
    for kind_name in dict.fromkeys(r["kind"] for r in recs):
        rs = [r for r in recs if r["kind"] == kind_name]
        kind = CELL_KINDS.get(kind_name)
        metrics = list(kind.summary) if kind else []
        keys = list(dict.fromkeys(k for r in rs for k in r["params"]))
        if by is None:
            cols = [k for k in keys if k != "seed" and
                    len({canonical_json(r["params"].get(k)) for r in rs}) > 1]
            if len({canonical_json(r["problem"]) for r in rs}) > 1:
                cols = ["problem"] + cols
        else:
            cols = list(by)
        rows: "OrderedDict[str, list[dict]]" = OrderedDict()
        for r in rs:
            key = canonical_json([r["problem"] if c == "problem" else r["params"].get(c) for c in cols])
            rows.setdefault(key, []).append(r)
        fixed = {k: rs[0]["params"].get(k) for k in keys
                 if k not in cols and k != "seed" and len({canonical_json(r["params"].get(k)) for r in rs}) == 1}
        lines = [f"### {kind_name} ({len(rs)} cells; problem {rs[0]['problem'].get('name')}"
                 + (f"; {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else "") + ")", "",
                 "| " + " | ".join(cols + ["runs", "diverged"] + metrics) + " |",
                 "|" + "---|" * (len(cols) + 2 + len(metrics))]
        for group in rows.values():
            first = group[0]
            head = [first["problem"].get("name") if c == "problem" else str(first["params"].get(c, "–"))
                    for c in cols]
            ok = [g for g in group if g["status"] == "ok"]
            vals = [_fmt([g["result"].get(m) for g in ok]) for m in metrics]
            lines.append("| " + " | ".join(head + [str(len(group)), str(len(group) - len(ok))] + vals) + " |")
        parts.append("\n".join(lines))
    fallback = Counter(str(r["meta"].get("data")) for r in recs if r.get("meta", {}).get("fallback_data"))
    for src, n in fallback.items():
        parts.append(f"**Note: {n} of {len(recs)} cells ran on fallback data — {src}. Not comparable "
                     "with results on the full data set.**")
    return "\n\n".join(parts) + "\n"


# ============================================================================ the cell kinds

def _online_module():
    from . import online
    return online


def _online_check(params: dict) -> None:
    online = _online_module()
    kw = {k: params[k] for k in ("beta", "mu", "kappa", "beta0", "beta_rule", "objective",
                                  "lr_floor", "lr_max") if k in params}
    online.hyper_config(params.get("method", "marthe"), lr0=params["lr0"], **kw)


def run_online_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """``online.run(problem, **params)`` (no progress bar, w_T not kept)."""
    online = _online_module()
    params = {"seed": 0, **params}
    return _online_output(online.run(problem, progress=False, keep_params=False, **params))


def _online_output(r) -> CellOutput:
    arrays = {k: getattr(r, k) for k in ("lrs", "betas", "mus", "hypergrads", "train_losses",
                                         "eval_steps", "val_losses", "val_accuracy")}
    result = {"config": r.config, "final_lr": r.final_lr, "diverged_at": r.diverged_at,
              "divergence": r.divergence, "steps_run": r.steps_run,
              "best_val_loss": r.best_val_loss, "final_val_loss": r.final_val_loss,
              "final_val_accuracy": r.final_val_accuracy}
    timing = {"wall_time": r.wall_time}
    if getattr(r, "step_times", None) is not None:
        timing["step_times"] = r.step_times
    return CellOutput(result, {k: v for k, v in arrays.items() if v is not None},
                      "diverged" if r.diverged else "ok", timing)


def _online_result(record: dict):
    online = _online_module()
    res, arr, timing = record["result"], record["arrays"], record["meta"].get("timing", {})
    nan = lambda v: math.nan if v is None else float(v)
    return online.OnlineResult(config=res["config"], **{k: arr.get(k) for k in (
        "lrs", "betas", "mus", "hypergrads", "train_losses", "eval_steps", "val_losses", "val_accuracy")},
        step_times=timing.get("step_times"), final_lr=nan(res["final_lr"]),
        diverged_at=res["diverged_at"], divergence=res.get("divergence"),
        wall_time=float(timing.get("wall_time", 0.0)))


def _online_cost(params: dict) -> float:
    hvp = params.get("method", "marthe") != "hd"
    return params.get("steps", 1) * (3.0 if hvp else 1.0)


def _lrsopt_check(params: dict) -> None:
    from . import lrsopt
    outer = params.get("outer_optimizer", "adam")
    if outer not in lrsopt.OUTER_OPTIMIZERS:
        raise ValueError(f"outer_optimizer must be one of {lrsopt.OUTER_OPTIMIZERS}, got {outer!r}")
    if outer != "lbfgsb" and "outer_lr" not in params:
        raise ValueError(f"outer_lr is required for outer_optimizer={outer!r}")


def run_lrsopt_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """LRS-OPT from η_t = lr0 (t < steps), checkpointed in the store and resumed after a crash."""
    from . import lrsopt
    p = dict(params)
    lrs0 = torch.full((p.pop("steps"),), p.pop("lr0"), dtype=problem.dtype, device=problem.device)
    kw = {"seed": 0, **p}
    if ctx.checkpoint is not None:
        ctx.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        kw.update(checkpoint_path=ctx.checkpoint.with_suffix(".pt"), resume=True)
    r = lrsopt.optimize_schedule(problem, lrs0, kw.pop("outer_steps"), kw.pop("outer_lr", None),
                                 kw.pop("outer_optimizer", "adam"), progress=False, **kw)
    arrays = {k: getattr(r, k) for k in r._ARRAYS}
    arrays.update({f"outer_state.{k}": np.asarray(v) for k, v in r.outer_state.items()})
    last = r.metrics[-1] if r.metrics and isinstance(r.metrics[-1], dict) else {}
    result = {k: getattr(r, k) for k in ("best_value", "best_step", "n_evaluations",
                                         "outer_steps_done", "status", "config", "problem",
                                         "metrics", "events")}
    result.update(final_value=float(r.history[-1]), initial_value=float(r.history[0]),
                  final_val_accuracy=last.get("val_accuracy"))
    return CellOutput(result, arrays, "ok", {"wall_time": r.wall_time})


def _lrsopt_result(record: dict):
    from . import lrsopt
    res, arr = record["result"], record["arrays"]
    outer = {k.split(".", 1)[1]: (v.item() if v.ndim == 0 else v)
             for k, v in arr.items() if k.startswith("outer_state.")}
    return lrsopt.ScheduleResult(
        outer_state=outer, wall_time=float(record["meta"].get("timing", {}).get("wall_time", 0.0)),
        **{k: arr[k] for k in lrsopt.ScheduleResult._ARRAYS},
        **{k: res[k] for k in ("best_value", "best_step", "n_evaluations", "outer_steps_done",
                               "status", "config", "problem", "metrics", "events")})


def _schedule(problem, params: dict) -> torch.Tensor:
    return torch.full((params["steps"],), params["lr"], dtype=problem.dtype, device=problem.device)


def _metrics(problem, w) -> dict:
    return dict(problem.metrics(w)) if problem.metrics is not None else {}


def run_train_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """Constant-LR training η_t = lr for ``steps`` steps: E(w_T), L_{T−1}, validation metrics."""
    from .trajectory import train
    r = train(problem, _schedule(problem, params), params.get("optimizer", "sgd"))
    result = {"value": float(r.value), "final_train_loss": float(r.train_losses[-1]),
              **_metrics(problem, r.params)}
    return CellOutput(result, {"train_losses": r.train_losses.numpy(force=True)})


def run_hypergrad_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """The exact hypergradient ∇f(η) of the constant schedule η_t = lr."""
    from .exact import hypergradient
    r = hypergradient(problem, _schedule(problem, params), params.get("optimizer", "sgd"),
                      params.get("mode", "reverse"))
    result = {"value": float(r.value), "grad_norm": float(r.grad.norm()), **_metrics(problem, r.params)}
    return CellOutput(result, {"grad": r.grad.numpy(force=True),
                               "train_losses": r.train_losses.numpy(force=True)})


def _exact_modes():
    from .exact import MODES
    return MODES


def _online_methods():
    return _online_module().METHODS


def _online_objectives():
    return _online_module().OBJECTIVES


register_cell_kind(CellKind(
    "online", run_online_cell, required=("lr0", "steps"), check=_online_check, cost=_online_cost,
    summary=("final_val_loss", "best_val_loss", "final_val_accuracy", "final_lr"),
    to_result=_online_result,
    params={"method": _choice(_online_methods), "optimizer": _optimizer, "lr0": _NONNEG,
            "steps": _STEPS, "beta": _number(0, words=("auto",), none=True),
            "mu": _number(0, 1, words=("auto",), none=True), "kappa": _NONNEG, "beta0": _NONNEG,
            "beta_rule": _choice(("hh", "h_eta")), "objective": _choice(_online_objectives),
            "lr_floor": _number(0, none=True), "lr_max": _number(0, open_lo=True, none=True),
            "eval_every": _STEPS, "seed": _SEED}))

register_cell_kind(CellKind(
    "lrsopt", run_lrsopt_cell, required=("lr0", "steps", "outer_steps"), check=_lrsopt_check,
    cost=lambda p: 30.0 * p.get("steps", 1) * p.get("outer_steps", 1),
    summary=("initial_value", "best_value", "final_value", "final_val_accuracy"),
    to_result=_lrsopt_result,
    params={"lr0": _NONNEG, "steps": _STEPS, "outer_steps": _STEPS,
            "outer_lr": _number(0, open_lo=True), "outer_optimizer": _choice(("adam", "sgd", "lbfgsb")),
            "optimizer": _optimizer, "mode": _choice(_exact_modes),
            "checkpoint_every": _number(1, integer=True, none=True),
            "chunk_size": _number(1, integer=True, none=True), "resample_batches": _flag,
            "lr_max": _number(0, open_lo=True, none=True), "outer_options": _mapping,
            "max_backtracks": _number(0, integer=True),
            "snapshot_every": _number(1, integer=True, none=True),
            "checkpoint_interval": _STEPS, "seed": _SEED}))

register_cell_kind(CellKind(
    "train", run_train_cell, required=("lr", "steps"), cost=lambda p: float(p.get("steps", 1)),
    summary=("value", "final_train_loss", "val_accuracy"),
    params={"lr": _NONNEG, "steps": _STEPS, "optimizer": _optimizer, "seed": _SEED}))

register_cell_kind(CellKind(
    "hypergrad", run_hypergrad_cell, required=("lr", "steps"),
    cost=lambda p: 3.0 * p.get("steps", 1), summary=("value", "grad_norm"),
    params={"lr": _NONNEG, "steps": _STEPS, "optimizer": _optimizer,
            "mode": _choice(_exact_modes), "seed": _SEED}))

_OUTPUT_CONVERTERS: dict[str, Callable[[Any], CellOutput]] = {"online": _online_output}
