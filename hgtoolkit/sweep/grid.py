"""Grids and cells: the validators of a grid's values, cell kinds, :class:`Cell` (one run with a
stable id), :class:`Grid` and the YAML loader."""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import records
from ..errors import OLD_NAMES
from ..settings import Spec


EXECUTORS = ("local", "processes", "ray")
RECORD_FORMAT = "hgtoolkit.sweep.cell/1"
_ID_SALT = "hgtoolkit.sweep/1"


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, floats by their shortest repr: a stable text."""
    return json.dumps(records.to_jsonable(obj), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=False)


# ============================================================================ validators
# A validator maps a written value to its normalised form or raises ValueError("must be …"); the
# built-in kinds' validators come from hgtoolkit.settings (settings.validators).

SEED_SPEC = Spec("seed", kind="int", lo=0).check
FLAG_SPEC = Spec("flag", kind="flag").check


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
    module's own result object from a loaded record; ``version``: part of every cell id;
    ``run_batch(problem_factory, cells)``: optional, runs a batch group (cells that differ only in
    the params named by ``batch_axes``, default seed and β,
    :func:`~hgtoolkit.sweep.executors.batch_groups`) in one go and returns one result per cell,
    in order (the online kind's is :func:`hgtoolkit.batched.run_online_batch`).
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
    run_batch: Callable[..., list] | None = None
    batch_axes: tuple = ("seed", "hypergrad_lr")


CELL_KINDS: dict[str, CellKind] = {}


def register_cell_kind(kind: CellKind) -> CellKind:
    """Add a cell kind (its ``run`` must be importable by name in Ray workers)."""
    if not isinstance(kind, CellKind):
        raise TypeError(f"kind must be a CellKind, got {type(kind).__name__}")
    CELL_KINDS[kind.name] = kind
    return kind


def get_kind(name: Any, where: str = "kind") -> CellKind:
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
        """Cells with equal keys differ only in their kind's ``batch_axes`` (default: seed and
        β): what a batched runner may vary."""
        axes = CELL_KINDS[self.kind].batch_axes if self.kind in CELL_KINDS else ("seed", "hypergrad_lr")
        rest = {k: v for k, v in self.params.items() if k not in axes}
        return canonical_json([self.kind, self.problem, rest])


# ----------------------------------------------------------------------------- problems

def _problem_parameters(name: str) -> dict:
    """The keywords of problem ``name``'s constructor (a built-in name or ``module:function``)."""
    from .. import problems
    try:
        return problems.parameters(name)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"problem.name: {exc}") from None


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _validate_problem(problem: Any) -> dict:
    if not isinstance(problem, dict):
        raise ValueError(f"problem must be a mapping with a 'name', got {problem!r}")
    if "name" not in problem:
        raise ValueError("problem.name is missing: say which problem to run (e.g. 'mnist_mlp')")
    if not isinstance(problem["name"], str):
        raise ValueError(f"problem.name must be a string, got {problem['name']!r}")
    params = _problem_parameters(problem["name"])
    allowed = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for key, value in problem.items():
        if key == "name":
            continue
        if key not in allowed and len(allowed) == len(params):
            raise ValueError(f"problem.{key}: unknown argument of problem {problem['name']!r}; "
                             f"it takes {allowed}")
        if key == "dtype" and value not in _DTYPES:
            raise ValueError(f"problem.dtype must be one of {tuple(_DTYPES)}, got {value!r}")
    try:
        return json.loads(canonical_json(problem))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"problem: values must be JSON numbers, strings, lists or mappings: {exc}") from None


def _takes_seed(name: str) -> bool:
    return "seed" in _problem_parameters(name)


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
    from .. import problems
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
    """Given to a cell runner: where it may checkpoint, how to build the problem for a seed, and
    the store it is computed into (None when not storing): a cell may read the records of cells
    stored before it (``store.has(id)``, ``store.read(id)``)."""

    checkpoint: Path | None
    problem_factory: Callable[[int | None], Any]
    cell_id: str = ""
    store: Any = None


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
        kind = get_kind(self.kind, f"{where}: kind")
        if not isinstance(self.axes, dict):
            raise ValueError(f"{where}: axes must be a mapping key → list of values, got {self.axes!r}")
        if not isinstance(self.fixed, dict):
            raise ValueError(f"{where}: fixed must be a mapping key → value, got {self.fixed!r}")

        def norm(key: str, value: Any, loc: str) -> Any:
            if key not in kind.params:
                new = OLD_NAMES.get(key)
                hint = f" ({key!r} was renamed {new!r}, docs/glossary.md)" if new in kind.params else ""
                raise ValueError(f"{where}: {loc}: unknown key {key!r} for kind {kind.name!r}{hint}; "
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


def as_grids(grids: Any) -> list[Grid]:
    if isinstance(grids, Grid):
        return [grids]
    if isinstance(grids, (str, os.PathLike, dict)):
        return load_grids(grids)
    if isinstance(grids, (list, tuple)) and grids and all(isinstance(g, Grid) for g in grids):
        return list(grids)
    raise TypeError(f"grids must be a Grid, a list of Grids, a mapping or a grid file path, got {grids!r}")


# kind name -> converter of what its runner returns into a CellOutput (filled by .kinds)
OUTPUT_CONVERTERS: dict[str, Callable[[Any], CellOutput]] = {}
