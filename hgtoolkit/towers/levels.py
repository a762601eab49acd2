"""Tower levels (:mod:`hgtoolkit.towers`): the specification (:class:`Level` and its optimizers,
:func:`parse`) and what is built from one: the foundation dynamics (:class:`TowerDynamics`,
:class:`Scheduled`), the record of its hyperparameters (:class:`History`) and the drop-in
optimizer (:class:`TowerOptimizer`). The maths is in :mod:`hgtoolkit.towers.core`."""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np
import torch

from .. import divergence as _divergence
from .. import dynamics as _dynamics
from ..drive import Oracle
from ..optim import DropIn
from .core import UNIT_INTERVAL, check_tower, hyperparameters, init, state_divergence, step

__all__ = ["Level", "SGD", "Adam", "AdaGrad", "RMSProp", "KINDS", "parse", "check_real", "TowerDynamics",
           "TowerState", "TowerMethod", "Scheduled", "History", "TowerOptimizer"]


# ----------------------------------------------------------------------------- specification

def check_real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    return value


@dataclass(frozen=True, repr=False)
class Level:
    """One optimizer of a tower; ``hyper`` (another Level) learns its hyperparameters.

    ``tune`` names the hyperparameters that ``hyper`` learns (default: the LR plus every
    momentum/β/α that is > 0, i.e. all of them); the others stay fixed. Subclasses:
    :class:`SGD`, :class:`Adam`, :class:`AdaGrad`, :class:`RMSProp`.
    """

    hyper: "Level | None" = field(default=None, kw_only=True)
    tune: "tuple[str, ...] | None" = field(default=None, kw_only=True)

    tunable: ClassVar[tuple[str, ...]] = ("lr",)
    kind: ClassVar[str] = "level"

    def __post_init__(self) -> None:
        owner = f"towers.{type(self).__name__}"
        if type(self) is Level:
            raise TypeError("towers.Level is abstract: use towers.SGD, Adam, AdaGrad or RMSProp")
        for f in dataclasses.fields(self):
            if f.name in ("hyper", "tune") or f.type in ("bool",):
                continue
            value = check_real(owner, f.name, getattr(self, f.name))
            object.__setattr__(self, f.name, value)
            if value < 0:
                raise ValueError(f"{owner}: {f.name} must be ≥ 0, got {value}")
            if f.name in UNIT_INTERVAL and value >= 1:
                raise ValueError(f"{owner}: {f.name} must be in [0, 1), got {value}")
        if self.hyper is not None and not isinstance(self.hyper, Level):
            hint = (" (a hgtoolkit.dynamics object is a fixed optimizer; use the towers classes)"
                    if isinstance(self.hyper, _dynamics.Dynamics) else "")
            raise TypeError(f"{owner}: hyper must be a towers optimizer such as "
                            f"towers.SGD(lr=1e-4), or None; got {type(self.hyper).__name__}{hint}")
        object.__setattr__(self, "tune", self._check_tune(owner))

    def _check_tune(self, owner: str) -> "tuple[str, ...] | None":
        tune = self.tune
        if tune is None:
            return None
        if isinstance(tune, str):
            tune = (tune,)
        try:
            tune = tuple(tune)
        except TypeError:
            raise TypeError(f"{owner}: tune must be a name or a sequence of names, got "
                            f"{type(self.tune).__name__}") from None
        if not all(isinstance(n, str) for n in tune):
            raise TypeError(f"{owner}: tune must contain hyperparameter names (str), got {tune!r}")
        if self.hyper is None:
            raise ValueError(f"{owner}: tune={tune!r} needs a hyper-optimizer (hyper=...) to learn them")
        if not tune:
            raise ValueError(f"{owner}: tune is empty; give at least one of {self.tunable} "
                             "or drop hyper=")
        for n in tune:
            if n not in self.tunable:
                raise ValueError(f"{owner}: tune names unknown hyperparameter {n!r}; "
                                 f"tunable: {self.tunable}")
            if n in UNIT_INTERVAL and getattr(self, n) == 0:
                raise ValueError(f"{owner}: {n}=0 cannot be tuned (it is learnt through a sigmoid "
                                 f"and needs a start in (0, 1)); set {n} > 0 or leave it out of tune")
        if len(set(tune)) != len(tune):
            raise ValueError(f"{owner}: tune lists a hyperparameter twice: {tune!r}")
        return tuple(n for n in self.tunable if n in tune)  # canonical order

    # -- structure
    @property
    def levels(self) -> tuple["Level", ...]:
        """(level 0 = self, level 1 = self.hyper, …, top)."""
        out, lvl = [], self
        while lvl is not None:
            out.append(lvl)
            lvl = lvl.hyper
        return tuple(out)

    @property
    def height(self) -> int:
        return len(self.levels)

    @property
    def names(self) -> tuple[str, ...]:
        """This optimizer's hyperparameters (the LR first; a zero momentum has none)."""
        return tuple(n for n in self.tunable if n == "lr" or getattr(self, n) > 0)

    @property
    def tuned(self) -> tuple[str, ...]:
        """Hyperparameters learnt by ``hyper`` (empty at the top)."""
        if self.hyper is None:
            return ()
        if self.tune is not None:
            return self.tune
        return self.names

    def values(self) -> dict[str, float]:
        """The hyperparameters as specified (initial values of the learnt ones)."""
        return {n: getattr(self, n) for n in self.names}

    @functools.cached_property
    def base(self) -> _dynamics.Dynamics:
        """The pure step O_k of this level (a :mod:`hgtoolkit.dynamics` object)."""
        return self._base()

    def _base(self) -> _dynamics.Dynamics:
        raise NotImplementedError

    # -- the three uses
    def init(self, params: Any) -> dict:
        return init(self, params)

    def step(self, state: dict, grad: Any, t: int, lr_scale: Any = None) -> dict:
        return step(self, state, grad, t, lr_scale)

    def dynamics(self) -> "TowerDynamics":
        """This tower as a :class:`hgtoolkit.dynamics.Dynamics` (see :class:`TowerDynamics`)."""
        return TowerDynamics(self)

    def optimizer(self, params: Any, **kwargs: Any) -> "TowerOptimizer":
        """A drop-in ``torch.optim.Optimizer`` running this tower on ``params``."""
        return TowerOptimizer(params, self, **kwargs)

    # -- descriptions
    def _fields_str(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in ("hyper", "tune")
                 and (f.name == "lr" or getattr(self, f.name) != f.default)]
        if self.tune is not None:
            parts.append("tune=" + "+".join(self.tune))
        return f"{self.kind}({', '.join(parts)})"

    def __repr__(self) -> str:
        """``SGD(lr=0.01, momentum=0.9, hyper=Adam(lr=0.001))``: the non-default fields."""
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.name not in ("hyper", "tune")
                 and (f.name == "lr" or getattr(self, f.name) != f.default)]
        if self.tune is not None:
            parts.append(f"tune={self.tune!r}")
        if self.hyper is not None:
            parts.append(f"hyper={self.hyper!r}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def __str__(self) -> str:
        """``sgd(lr=0.01, momentum=0.9) / adam(lr=0.001) / sgd(lr=0.0001)``; :func:`parse` reads it back."""
        return " / ".join(lvl._fields_str() for lvl in self.levels)

    def config(self) -> dict:
        """JSON-serialisable description of the whole tower."""
        levels = []
        for lvl in self.levels:
            d = {f.name: getattr(lvl, f.name) for f in dataclasses.fields(lvl)
                 if f.name not in ("hyper", "tune")}
            levels.append({"optimizer": lvl.kind, **d, "tuned_by_next_level": list(lvl.tuned)})
        return {"spec": str(self), "height": self.height, "levels": levels}


@dataclass(frozen=True, repr=False)
class SGD(Level):
    """SGD with optional (Nesterov) momentum: :class:`hgtoolkit.dynamics.SGD`. Tunable: lr, momentum."""

    lr: float = 0.01
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    tunable: ClassVar[tuple[str, ...]] = ("lr", "momentum")
    kind: ClassVar[str] = "sgd"

    def __post_init__(self) -> None:
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"towers.SGD: nesterov must be a bool, got {type(self.nesterov).__name__}")
        super().__post_init__()
        if self.nesterov and self.momentum == 0:
            raise ValueError("towers.SGD: nesterov=True needs momentum > 0")

    def _base(self) -> _dynamics.Dynamics:
        return _dynamics.SGD(momentum=self.momentum, nesterov=self.nesterov,
                             weight_decay=self.weight_decay)


@dataclass(frozen=True, repr=False)
class Adam(Level):
    """Adam with bias correction: :class:`hgtoolkit.dynamics.Adam`. Tunable: lr, beta1, beta2."""

    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    tunable: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2")
    kind: ClassVar[str] = "adam"

    def _base(self) -> _dynamics.Dynamics:
        return _dynamics.Adam(beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                              weight_decay=self.weight_decay)


@dataclass(frozen=True, repr=False)
class AdaGrad(Level):
    """AdaGrad: :class:`hgtoolkit.dynamics.AdaGrad`. Tunable: lr."""

    lr: float = 0.01
    eps: float = 1e-10
    weight_decay: float = 0.0
    kind: ClassVar[str] = "adagrad"

    def _base(self) -> _dynamics.Dynamics:
        return _dynamics.AdaGrad(eps=self.eps, weight_decay=self.weight_decay)


@dataclass(frozen=True, repr=False)
class RMSProp(Level):
    """RMSProp: :class:`hgtoolkit.dynamics.RMSProp`. Tunable: lr, alpha."""

    lr: float = 0.01
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    tunable: ClassVar[tuple[str, ...]] = ("lr", "alpha")
    kind: ClassVar[str] = "rmsprop"

    def _base(self) -> _dynamics.Dynamics:
        return _dynamics.RMSProp(alpha=self.alpha, eps=self.eps, weight_decay=self.weight_decay)


KINDS = {cls.kind: cls for cls in (SGD, Adam, AdaGrad, RMSProp)}
_PART = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$")


def parse(spec: str) -> Level:
    """A tower from text: ``"sgd(lr=0.01, momentum=0.9) / adam(lr=1e-3) / sgd(lr=1e-4)"``.

    Levels from the base up, separated by ``/``; keyword values are numbers, ``true``/``false``
    or, for ``tune``, names joined by ``+`` (``tune=lr+momentum``). ``str(tower)`` gives it back.
    """
    if isinstance(spec, Level):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"tower must be a string such as 'sgd(lr=0.01) / sgd(lr=1e-4)' or a "
                        f"towers optimizer, got {type(spec).__name__}")
    parts = spec.split("/")
    kwargs_per_level = []
    for part in parts:
        m = _PART.match(part)
        if not m:
            raise ValueError(f"tower: cannot read {part.strip()!r}; write e.g. 'sgd(lr=0.01, momentum=0.9)'")
        kind, args = m.group(1).lower(), (m.group(2) or "").strip()
        if kind not in KINDS:
            raise ValueError(f"tower: unknown optimizer {m.group(1)!r}; choose one of {sorted(KINDS)}")
        kw: dict[str, Any] = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            if "=" not in item:
                raise ValueError(f"tower: expected key=value in {part.strip()!r}, got {item!r}")
            key, val = (s.strip() for s in item.split("=", 1))
            if key == "tune":
                kw[key] = tuple(v.strip() for v in val.split("+") if v.strip())
            elif val.lower() in ("true", "false"):
                kw[key] = val.lower() == "true"
            else:
                try:
                    kw[key] = float(val)
                except ValueError:
                    raise ValueError(f"tower: {key}={val!r} in {part.strip()!r} is not a number") from None
        kwargs_per_level.append((KINDS[kind], kw))
    tower = None
    for cls, kw in reversed(kwargs_per_level):
        try:
            tower = cls(**kw, hyper=tower)
        except TypeError as exc:
            if "unexpected keyword" in str(exc):
                names = [f.name for f in dataclasses.fields(cls) if f.name != "hyper"]
                raise ValueError(f"tower: {cls.kind} takes {names}; got {sorted(kw)}") from None
            raise
    return tower


# ----------------------------------------------------------------------------- foundation dynamics

@dataclass(frozen=True)
class TowerDynamics(_dynamics.Dynamics):
    r"""A tower as a :class:`hgtoolkit.dynamics.Dynamics`: the state carries the hyperparameters.

    ``step(state, g_t, c_t, t)`` is :func:`step` with the base LR multiplied by c_t, so with
    the schedule c = (1, …, 1) ``trajectory.train`` runs the tower as specified, and
    ``exact.hypergradient(problem, torch.ones(T), tower.dynamics())`` gives
    ∂E(w_T)/∂c_t: the effect of nudging the learnt LR at step t, *including* how the tower
    reacts afterwards (reverse mode differentiates through the tower's own hypergradients).
    """

    tower: Level = None  # type: ignore[assignment]
    name: ClassVar[str] = "tower"

    def __post_init__(self) -> None:
        check_tower(self.tower)

    def init(self, params: Any) -> dict:
        return init(self.tower, params)

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        if hyper:
            raise TypeError(f"TowerDynamics.step got hyperparameter(s) {sorted(hyper)}: a tower "
                            "learns its own; only the LR multiplier can be passed")
        return step(self.tower, state, grad, t, lr_scale=lr)

    def config(self) -> dict:
        return {"name": "tower", **self.tower.config()}


class TowerState(NamedTuple):
    """A tower run's state as :func:`hgtoolkit.drive.drive` reads it: ``opt`` = the tower state
    of :func:`~hgtoolkit.towers.core.init` / :func:`~hgtoolkit.towers.core.step` (w_t, every
    level's moments, raw coordinates, values, previous update inputs and hypergradients)."""

    opt: dict


@dataclass(frozen=True)
class TowerMethod:
    r"""A tower as a method in the optax shape, as :class:`hgtoolkit.online.Engine` is for the
    online methods: ``init(params, settings) -> state`` and ``update(state, oracle, t) ->
    (state, aux)``, the one tower step :func:`~hgtoolkit.towers.core.step` applied to
    ``oracle.grad`` = g_t; aux = {"loss": ``oracle.loss``} (and ``"divergence"`` when ``guard``
    stopped the step: the state is then returned unchanged). :func:`hgtoolkit.towers.run`
    drives it with :func:`hgtoolkit.drive.drive`; the drop-in :class:`TowerOptimizer` calls
    the same update from the user's loop. A tower asks no Hessian-vector product of the
    problem (``needs_hvp = False``): each level's hypergradient is of its own last update."""

    tower: Level = None  # type: ignore[assignment]
    needs_hvp: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_tower(self.tower)

    @property
    def dynamics(self) -> TowerDynamics:
        """The tower as a :class:`hgtoolkit.dynamics.Dynamics` (w = ``dynamics.params(state.opt)``)."""
        return TowerDynamics(self.tower)

    def init(self, params: Any, settings: Any = None) -> TowerState:
        """s_0 for ``params``; a tower's settings are its levels (``settings`` must be None)."""
        if settings is not None:
            raise TypeError("TowerMethod.init: a tower's settings are its levels, pass settings=None")
        return TowerState(init(self.tower, params))

    def update(self, state: TowerState, oracle: Oracle, t: "int | list[int]", *, lr_scale: Any = None,
               cotangent: Any = None, counts: "list[int] | None" = None, differentiable: bool = True,
               out_w: Any = None, guard: Callable | None = None) -> tuple[TowerState, dict]:
        """One tower step from ``oracle.grad`` (the keywords: those of
        :func:`~hgtoolkit.towers.core.step`)."""
        new = step(self.tower, state.opt, oracle.grad, t, lr_scale, cotangent, counts, differentiable, out_w,
                   guard)
        if "diverged" in new:
            return state, {"loss": oracle.loss, "divergence": new["diverged"]}
        return TowerState(new), {"loss": oracle.loss}


@dataclass(frozen=True, eq=False)
class Scheduled(_dynamics.Dynamics):
    """``base`` with per-step schedules for its non-LR hyperparameters: step t uses
    ``schedules[name][t]`` (e.g. a momentum learnt by a tower, replayed as fixed)."""

    base: _dynamics.Dynamics = None  # type: ignore[assignment]
    schedules: dict = field(default_factory=dict)
    name: ClassVar[str] = "scheduled"

    def __post_init__(self) -> None:
        if not isinstance(self.base, _dynamics.Dynamics):
            raise TypeError(f"base must be a hgtoolkit.dynamics object, got {type(self.base).__name__}")
        for k, v in self.schedules.items():
            if k not in self.base.hyperparameters:
                raise ValueError(f"schedules: {type(self.base).__name__} has no hyperparameter {k!r}")
            if not isinstance(v, torch.Tensor) or v.dim() != 1:
                raise TypeError(f"schedules[{k!r}] must be a 1-D tensor (one value per step)")

    def init(self, params: Any) -> dict:
        return self.base.init(params)

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        h = {k: v[t] for k, v in self.schedules.items()}
        h.update(hyper)
        return self.base.step(state, grad, lr, t, **h)

    def config(self) -> dict:
        return {"name": f"{self.base.name}+schedules", "base": self.base.config(),
                "scheduled": sorted(self.schedules)}


# ----------------------------------------------------------------------------- records

class History:
    """Per-step record of every hyperparameter at every level (the value used at step t) and
    of every hypergradient Gᵏ_t (w.r.t. the raw coordinate x: for an LR, ∂L_t/∂η; for a
    sigmoid-mapped β, ∂L_t/∂x = ∂L_t/∂β · β(1−β)).

    ``values(k)`` / ``hypergrads(k)`` → {name: array (T,)}; ``lrs`` = base LRs η_t.
    """

    def __init__(self, tower: Level):
        self.tower = check_tower(tower)
        self._rows: list[np.ndarray] = []
        self._cache: np.ndarray | None = None
        self._columns: list[tuple[str, int, str]] = []
        for k, lvl in enumerate(tower.levels):
            self._columns += [("value", k, n) for n in lvl.names]
        for k, lvl in enumerate(tower.levels):
            self._columns += [("hypergrad", k, n) for n in lvl.tuned]
        self._fixed = [lvl.values() for lvl in tower.levels]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def height(self) -> int:
        return self.tower.height

    def append(self, state: dict) -> None:
        """Record the state after one step (one device sync)."""
        levels = self.tower.levels
        learnt = {}
        if state["values"]:
            flat = torch.cat([*state["values"], *state["hypergrads"]]).detach().to("cpu", torch.float64).numpy()
            i = 0
            for k in range(len(state["values"])):
                for n in levels[k].tuned:
                    learnt[("value", k, n)] = flat[i]
                    i += 1
            for k in range(len(state["hypergrads"])):
                for n in levels[k].tuned:
                    learnt[("hypergrad", k, n)] = flat[i]
                    i += 1
        row = np.array([learnt.get(c, self._fixed[c[1]].get(c[2], np.nan)) for c in self._columns])
        self._rows.append(row)
        self._cache = None

    def _table(self) -> np.ndarray:
        if self._cache is None:
            self._cache = (np.stack(self._rows) if self._rows
                           else np.zeros((0, len(self._columns))))
        return self._cache

    def _select(self, kind: str, level: int) -> dict[str, np.ndarray]:
        if not isinstance(level, int) or not 0 <= level < self.height:
            raise ValueError(f"level must be an int in [0, {self.height - 1}], got {level!r}")
        tab = self._table()
        return {c[2]: tab[:, i].copy() for i, c in enumerate(self._columns)
                if c[0] == kind and c[1] == level}

    def values(self, level: int = 0) -> dict[str, np.ndarray]:
        """{name: value used at each step} for level ``level``'s hyperparameters."""
        return self._select("value", level)

    def hypergrads(self, level: int = 0) -> dict[str, np.ndarray]:
        """{name: Gᵏ⁺¹_t} for the hyperparameters of level ``level`` that are learnt."""
        return self._select("hypergrad", level)

    def learnt(self, level: int) -> tuple[str, ...]:
        return self.tower.levels[level].tuned

    @property
    def lrs(self) -> np.ndarray:
        """η_t: the base learning rate used at step t."""
        return self.values(0)["lr"]

    def to_dict(self) -> dict:
        levels = []
        for k, lvl in enumerate(self.tower.levels):
            levels.append({"level": k, "optimizer": lvl.kind, "learnt": list(lvl.tuned),
                           "values": self.values(k), "hypergrads": self.hypergrads(k)})
        return {"tower": str(self.tower), "steps": len(self), "levels": levels}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        h = cls(parse(d["tower"]))
        T = int(d["steps"])
        cols = {}
        for lev in d["levels"]:
            for kind in ("values", "hypergrads"):
                for n, arr in lev[kind].items():
                    cols[("value" if kind == "values" else "hypergrad", lev["level"], n)] = arr
        tab = np.array([[np.nan if v is None else v for v in cols[c]] for c in h._columns],
                       dtype=np.float64).reshape(len(h._columns), T).T
        h._rows = list(tab)
        return h

    def __repr__(self) -> str:
        return f"History({str(self.tower)!r}, steps={len(self)})"


# ----------------------------------------------------------------------------- drop-in optimizer

class TowerOptimizer(DropIn):
    """A tower as a ``torch.optim.Optimizer``: reads ``p.grad`` from the usual ``loss.backward()``.

    ::

        opt = towers.SGD(lr=0.01, hyper=towers.SGD(lr=1e-4)).optimizer(model.parameters())
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()      # no create_graph needed
            opt.step()
        opt.history.lrs                           # the learnt base LR, step by step

    torch.optim semantics (shared with :mod:`hgtoolkit.optim`, base :class:`optim.DropIn`):

    - each param group runs its own tower (``{"params": ..., "tower": towers.Adam(...)}``;
      default: the ``tower`` argument); a group may also set level-0 options of its tower
      (``{"params": ..., "lr": 0.05, "weight_decay": 1e-4}``), fixed when the group is added;
    - parameters whose ``.grad`` is None are skipped (no weight decay, momentum or state
      change); a parameter the previous step did not update contributes nothing to G¹_t;
    - the scheduler contract of :mod:`hgtoolkit.optim`: ``group["lr"]`` is the base LR (yours
      and ``torch.optim.lr_scheduler``'s, read at every step); the tower learns η^tower, starting
      at the group's initial LR η_0; the learnt multiplier is ``group["lr_scale"]`` = η^tower/η_0
      and step t uses ``group["effective_lr"]`` = ``group["lr"]`` × ``group["lr_scale"]`` (the
      tower's ``lr_scale`` argument = ``group["lr"]``/η_0). With a constant base LR the optimizer
      is the tower as specified;
    - ``state_dict()`` holds tensors and plain numbers (``torch.load(..., weights_only=True)``
      reads it; the tower is saved as its text spec, the history as a float64 table);
    - divergence — a non-finite hyperparameter, hypergradient or parameter, a base LR above
      ``lr_max`` (default 1e6·η_0), or, when ``step`` gets a closure, its loss not finite or above
      ``divergence_factor`` × its first value (the criterion of :class:`hgtoolkit.online.Engine`):
      the step is not applied, a :class:`DivergenceWarning` names the step, ``group["diverged_at"]``
      records it and the group is no longer updated; ``raise_on_divergence=True`` raises
      :class:`DivergenceError` instead.

    ``step(closure)``: as torch.optim, the closure zeroes the gradients, computes the loss and
    calls ``backward()``. The state holds no autograd graph, only the previous update's inputs;
    ``record=False`` skips the per-step history (and its device sync).
    """

    _KEPT = ("prev_grad",)  # g_t for the next step's G¹, kept by reference where that is safe

    def __init__(self, params: Any, tower: "Level | str", *, record: bool = True,
                 lr_max: float | None = None, divergence_factor: float | None = 2.0,
                 raise_on_divergence: bool = False):
        tower = parse(tower)
        self.record = bool(record)
        self.histories: dict[int, History] = {}
        self._methods: dict[int, TowerMethod] = {}  # group → its tower's method (the update)
        defaults = {"tower": tower, "lr": tower.lr, "lr_max": lr_max,
                    "divergence_factor": divergence_factor}
        super().__init__(params, defaults, raise_on_divergence=raise_on_divergence)

    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        param_group = dict(param_group)
        tower = parse(param_group.get("tower", self.defaults["tower"]))
        # level-0 options given by the group (its own lr, weight_decay, …) define its tower
        own = {f.name: param_group[f.name] for f in dataclasses.fields(tower)
               if f.name not in ("hyper", "tune") and f.name in param_group}
        if "lr" not in param_group and "tower" in param_group:
            own["lr"] = tower.lr
        tower = dataclasses.replace(tower, **own) if own else tower
        param_group["tower"] = tower
        param_group.setdefault("lr", tower.lr)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("initial_lr_for_hyper", tower.lr)
        group.setdefault("tower_state", None)
        self.histories[len(self.param_groups) - 1] = History(tower)

    @property
    def history(self) -> History:
        """The record of the first parameter group (``histories[i]`` for group i)."""
        return self.histories[0]

    def hyperparameters(self, group: int = 0) -> list[dict[str, float]]:
        """Current hyperparameter values of group ``group``, one dict per level."""
        g = self.param_groups[group]
        tower, hs = g["tower"], g["tower_state"]
        return [lvl.values() for lvl in tower.levels] if hs is None else hyperparameters(tower, hs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._observe_grads()
        for i, group in enumerate(self.param_groups):
            if group["diverged_at"] is None:
                self._group_step(i, group, loss)
        return loss

    def _group_step(self, i: int, group: dict, loss) -> None:
        params = self._active(group)
        if not params:
            return
        tower, t = group["tower"], group["t"]
        lvl0, learns = tower, tower.height > 1
        if loss is not None:
            bad = self._loss_divergence(group, loss, t)
            if bad:
                return self._diverged(group, bad)
        # the next step differentiates this update again: it keeps g (by reference or a copy,
        # DropIn._keep), and a copy of w when weight decay makes that update depend on it (see _prev)
        grads = [p.grad.detach() for p in params]
        sts = [self.state[p] for p in params]
        if learns:
            self._check_kept(params, [st.get("prev_grad") for st in sts])
        keep_w = learns and lvl0.weight_decay != 0
        w = [p.detach().clone() if keep_w else p.detach() for p in params]
        hs = group["tower_state"]
        if hs is None:  # the hyper-levels' state (independent of w): levels ≥ 1 of a fresh init
            full = init(tower, w[:1])
            hs = {"moments": full["moments"][1:], "raw": full["raw"], "values": full["values"],
                  "prev": full["prev"][1:], "hypergrads": full["hypergrads"],
                  "scale": full["prev"][0]["scale"] if learns else None}
        keys = [k for k in lvl0.base.init(w[0]) if k != "w"]
        for st, x in zip(sts, w):
            if not st:  # first step of this parameter: its moments; no previous update
                st.update({k: v for k, v in lvl0.base.init(x).items() if k != "w"}, n_updates=0)
                if learns:
                    st.update({"prev_" + k: st[k] for k in keys}, prev_grad=torch.zeros_like(x),
                              last_step=-1)
            if keep_w and "prev_w" not in st:
                st["prev_w"] = x
        moments0 = {k: [st[k] for st in sts] for k in keys}
        state = {"w": w, "moments": [moments0, *hs["moments"]], "raw": hs["raw"],
                 "values": hs["values"], "prev": [], "hypergrads": hs["hypergrads"]}
        cot = None
        if learns:
            prev0 = {"moments": {k: [st["prev_" + k] for st in sts] for k in keys},
                     "grad": [st["prev_grad"] for st in sts], "scale": hs["scale"]}
            if keep_w:
                prev0["x"] = [st["prev_w"] for st in sts]
            kept = [k[5:] for k in sts[0] if k.startswith("kept_")]  # the last update's intermediates
            if kept and all("kept_" + k in st for st in sts for k in kept):
                prev0["kept"] = {k: [st["kept_" + k] for st in sts] for k in kept}
            state["prev"] = [prev0, *hs["prev"]]
            if any(st["last_step"] != t - 1 for st in sts):
                cot = [g if st["last_step"] == t - 1 else torch.zeros_like(g) for g, st in zip(grads, sts)]
        lr0 = group["initial_lr_for_hyper"]
        scale = group["lr"] / lr0 if lr0 > 0 else 1.0
        counts = [st["n_updates"] for st in sts]
        lr_max = group["lr_max"] if group["lr_max"] is not None else (1e6 * lr0 if lr0 > 0 else math.inf)
        # the divergence criteria look at the hyper-levels only: checked before level 0 writes
        # the new w straight into the parameters (a diverged step leaves them as they were)
        guard = lambda values, hypergrads: state_divergence(tower, {"values": values, "hypergrads": hypergrads},
                                                            t, lr_max, scale)
        method = self._methods.get(i)
        if method is None or method.tower is not tower:
            method = self._methods[i] = TowerMethod(tower)
        new, aux = method.update(
            TowerState(state), Oracle(grads, loss), t, lr_scale=scale, cotangent=cot,
            counts=counts if any(c != t for c in counts) else None, differentiable=False,
            out_w=[p.detach() for p in params] if keep_w else w, guard=guard)
        if "divergence" in aux:
            return self._diverged(group, aux["divergence"])
        new = new.opt
        for p, nw in zip(params, new["w"]):
            if nw.data_ptr() != p.data_ptr():  # not written in place (per-parameter update counts)
                p.copy_(nw)
        if learns:
            prev = new["prev"][0]
            # their prev_grad is used up: the buffers for copies of g
            kept = self._keep(params, grads, [st["prev_grad"] for st in sts])
            for j, (st, g) in enumerate(zip(sts, kept)):
                st.update({"prev_" + k: prev["moments"][k][j] for k in keys}, prev_grad=g, last_step=t)
                st.update({"kept_" + k: x[j] for k, x in prev.get("kept", {}).items()})
                if keep_w:
                    st["prev_w"] = prev["x"][j]
            hs = {"moments": new["moments"][1:], "raw": new["raw"], "values": new["values"],
                  "prev": new["prev"][1:], "hypergrads": new["hypergrads"], "scale": prev["scale"]}
        for j, st in enumerate(sts):
            st.update({k: new["moments"][0][k][j] for k in keys})
            st["n_updates"] += 1
        learnt = hyperparameters(tower, hs)[0]["lr"] if learns else tower.lr
        group.update(tower_state=hs if learns else None, t=t + 1,
                     lr_scale=learnt / lr0 if lr0 > 0 else 1.0)
        group["effective_lr"] = group["lr"] * group["lr_scale"]
        if self.record:
            self.histories[i].append(new)

    def _loss_divergence(self, group: dict, loss, t: int) -> "_divergence.Divergence | None":
        """The loss rule (:func:`hgtoolkit.divergence.check_loss`) for a closure's loss."""
        value = float(loss)
        if t == 0 or "ref_loss" not in group:
            group["ref_loss"] = value
        return _divergence.check_loss(t, value, group["ref_loss"], group["divergence_factor"])

    def state_dict(self) -> dict:
        """torch.optim's ``{"state", "param_groups"}`` with every tower as its text spec, plus
        ``"histories"``: {group: float64 table of the record} — tensors and plain values only."""
        sd = super().state_dict()
        sd["param_groups"] = [{**g, "tower": str(g["tower"])} for g in sd["param_groups"]]
        sd["histories"] = {i: torch.from_numpy(h._table().copy()) for i, h in self.histories.items()}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError("state_dict: not a TowerOptimizer state (no 'param_groups')")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, this optimizer "
                             f"{len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if parse(saved.get("tower", "")) != group["tower"]:
                raise ValueError(f"state_dict: group {i} was saved with tower {saved.get('tower')!r}, "
                                 f"this optimizer runs {str(group['tower'])!r}")
        groups = [{**g, "tower": group["tower"]} for g, group in zip(groups, self.param_groups)]
        super().load_state_dict({**state_dict, "param_groups": groups})
        for i, tab in state_dict.get("histories", {}).items():
            h = History(self.param_groups[int(i)]["tower"])
            h._rows = list(torch.as_tensor(tab, dtype=torch.float64).numpy())
            self.histories[int(i)] = h

    def __repr__(self) -> str:
        return "TowerOptimizer(" + "; ".join(str(g["tower"]) for g in self.param_groups) + ")"
