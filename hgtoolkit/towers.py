r"""Hyperoptimizer towers (Chandra et al., "Gradient Descent: The Ultimate Optimizer").

A tower stacks optimizers: level 0 trains the parameters w, level 1 learns level 0's
hyperparameters (its LR, momentum, Adam β1/β2, RMSProp α), level 2 learns level 1's, and so
on; the top level's hyperparameters stay fixed::

    from hgtoolkit import towers
    tower = towers.SGD(lr=0.01, momentum=0.9,
                       hyper=towers.Adam(lr=1e-3, hyper=towers.SGD(lr=1e-4)))   # height 3

Notation (docs/methods.md, "Hyperoptimizer towers"). Level k holds a variable x_k (x_0 = w; for
k ≥ 1, x_k = the raw coordinates of level k−1's tuned hyperparameters, one entry per name) and
the state of its optimizer O_k (a pure :mod:`hgtoolkit.dynamics` step). The value of a tuned
hyperparameter is φ(x): φ = identity for learning rates, kept ≥ 0 by projecting x onto
[0, ∞) after each update; φ = σ (logistic sigmoid) for momentum, β1, β2 and α, so the value
stays in (0, 1) (x is also kept in [−36, 36], where σ(x) < 1 in float64). Hyperparameter
coordinates are float64 whatever the model's dtype.

One training step t, given g_t = ∇L_t(w_t):

1. bottom-up, the hypergradient of every level: G⁰_t = g_t and

       Gᵏ_t = ∂L_t(w_t)/∂x_k = ⟨G^{k−1}_t, ∂x_{k−1}/∂x_k⟩   (k ≥ 1),

   the derivative of the current loss through exactly ONE previous step of the level below
   (everything else of that step held fixed): one ``torch.func.vjp`` of level k−1's previous
   update w.r.t. its hyperparameters, recomputed from that update's stored inputs, applied to
   G^{k−1}_t (times φ'(x)). For the SGD learning rate ∂w_t/∂η = −g_{t−1}, so
   G¹_t = −g_t·g_{t−1}: exactly HD (Baydin et al.). At t = 0 every Gᵏ_0 = 0.
2. top-down, every level's update, each using the values just produced by the level above:

       x_k ← O_k(x_k, Gᵏ_t; hyperparameters φ(x_{k+1}))   (projected for k ≥ 1).

   The base update of w comes last, so (as in HD) a learning rate is updated *before* the
   step that uses it.

Only the previous update's inputs are kept (level 0: its gradient and moments; w too when
weight decay is on): no autograd graph outlives a step, and memory does not grow with the
number of steps. (Reverse mode over a recomputed step: forward-mode jvps were ~10× slower
than the step itself here.)

Three ways to use a tower:

- functional core: ``state = tower.init(params)``, ``state = tower.step(state, grad, t)``
  (pure functions over pytrees; :func:`init`, :func:`step`);
- foundation dynamics: ``tower.dynamics()`` is a :class:`hgtoolkit.dynamics.Dynamics`, so
  ``trajectory.train(problem, torch.ones(T), tower.dynamics())`` runs it and
  ``exact.hypergradient(problem, torch.ones(T), tower.dynamics())`` differentiates through
  the whole adaptive run; the schedule entry c_t multiplies the base LR (c_t = 1: the tower
  as specified). :func:`run` does the same and records every hyperparameter;
  ``result.replay()`` is the base optimizer with the learnt schedules held fixed, for the
  exact analysis of the learnt LR trajectory (:func:`analyse`);
- drop-in ``torch.optim.Optimizer``: ``opt = tower.optimizer(model.parameters())``, then the
  usual ``loss.backward(); opt.step(); opt.zero_grad()`` (:class:`TowerOptimizer`).

A tower whose hyper-levels all have learning rate 0 is the base optimizer, bit for bit (one
caveat: a tuned Adam β enters ``dynamics.Adam`` as a tensor, and torch rounds β^(t+1) for
t + 1 = 3 differently from Python's float power for some β, e.g. 0.99: a 1-ulp difference).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch.func import vjp

from . import dynamics as _dynamics
from ._tree import tree_leaves, tree_zeros_like
from . import online
from . import records
from .errors import DivergenceError, DivergenceWarning
from .optim import DropIn, by_count, loss_limit

__all__ = ["Level", "SGD", "Adam", "AdaGrad", "RMSProp", "parse", "init", "step",
           "hyperparameters", "TowerDynamics", "Scheduled", "History", "TowerResult", "run",
           "analyse", "TowerOptimizer", "UNIT_INTERVAL"]

#: Hyperparameters kept in (0, 1) through the sigmoid φ = σ; all others are learning rates.
UNIT_INTERVAL = ("momentum", "beta1", "beta2", "alpha")


def _raw_bound(dtype: torch.dtype) -> float:
    """|x| bound for sigmoid coordinates: σ(x) stays strictly inside (0, 1) in ``dtype``."""
    return 36.0 if dtype == torch.float64 else 15.0


def _hyper_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------- specification

def _real(owner: str, name: str, value: Any) -> float:
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
            value = _real(owner, f.name, getattr(self, f.name))
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


# ----------------------------------------------------------------------------- functional core

def _check_tower(tower: Any, argname: str = "tower") -> Level:
    if not isinstance(tower, Level):
        raise TypeError(f"{argname} must be a towers optimizer (towers.SGD/Adam/AdaGrad/RMSProp), "
                        f"got {type(tower).__name__}")
    return tower


def _unit_mask(level: Level, device) -> torch.Tensor:
    return torch.tensor([n in UNIT_INTERVAL for n in level.tuned], device=device)


def init(tower: Level, params: Any) -> dict:
    """Initial tower state for ``params`` (a tensor or pytree of tensors).

    ``{"w": params, "moments": [level k's optimizer state without its variable x_k],
    "raw": [x_{k+1}: (m_k,) raw coordinates of level k's tuned hyperparameters],
    "values": [φ(x_{k+1}): their values], "prev": [level k's last update inputs],
    "hypergrads": [G^{k+1} of the last step]}``, lists indexed by level k.
    """
    tower = _check_tower(tower)
    leaves = tree_leaves(params)
    if not leaves or not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        raise TypeError("params must be a floating-point tensor or a pytree of them")
    device = leaves[0].device
    hdt = _hyper_dtype(device)
    levels = tower.levels
    moments, raws, values, prevs, hypergrads = [], [], [], [], []
    x = params
    for k, lvl in enumerate(levels):
        s = dict(lvl.base.init(x))
        s.pop("w")
        moments.append(s)
        if k == len(levels) - 1:
            break
        prevs.append(_prev(lvl, k, x, s, tree_zeros_like(x), torch.ones((), dtype=hdt, device=device)))
        v = torch.tensor([getattr(lvl, n) for n in lvl.tuned], dtype=hdt, device=device)
        raw = torch.where(_unit_mask(lvl, device), torch.log(v) - torch.log1p(-v), v)
        raws.append(raw)
        values.append(v)
        hypergrads.append(torch.zeros_like(v))
        x = raw
    return {"w": params, "moments": moments, "raw": raws, "values": values, "prev": prevs,
            "hypergrads": hypergrads}


def _prev(level: Level, k: int, x: Any, moments: dict, grad: Any, scale: Any) -> dict:
    """What the next step needs to differentiate this update again: its inputs. Level 0 keeps
    no copy of w unless weight decay makes the update direction depend on it (for every
    dynamics w' = w − η·d with d independent of w otherwise, so ∂w'/∂h needs no w)."""
    out = {"moments": moments, "grad": grad}
    if k > 0 or getattr(level, "weight_decay", 0.0) != 0:
        out["x"] = x
    if k == 0:
        out["scale"] = scale
    return out


def _number_or_tensor(v: Any) -> Any:
    """A plain 0-d tensor that nothing differentiates as a Python number, else ``v`` itself
    (a tensor inside ``torch.func`` or with ``requires_grad`` stays one)."""
    if (isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad
            and not torch._C._functorch.is_functorch_wrapped_tensor(v)):
        return v.item()
    return v


def _update(level: Level, state: dict, grad: Any, t: "int | list[int]", hp: dict, lr_scale: Any,
            bounds: "tuple[torch.Tensor, torch.Tensor] | None", differentiable: bool = True,
            keep: dict | None = None, out_w: Any = None) -> dict:
    """One step of O_k with hyperparameters ``hp`` (LR scaled by ``lr_scale``; projected onto
    ``bounds``). ``t``: the step index, or one update count per leaf of a leaf-list state (the
    drop-in's level 0: Adam's bias correction counts each parameter's own updates, as torch.optim).
    ``differentiable=False``: the dynamics' closed-form update (same numbers, fewer passes), for
    an update nothing differentiates (level 0 outside ``torch.func``); ``keep``: with it, a dict
    that receives the update's intermediates for the next step's G¹ (``Dynamics.update``);
    ``out_w`` (with ``differentiable=False`` and one ``t``): buffers the new w is written into."""
    hp = dict(hp)
    lr = hp.pop("lr", level.lr)
    if lr_scale is not None:
        lr = lr * lr_scale
    base_step = level.base.step if differentiable else level.base.update
    if not differentiable:  # numbers: the dynamics' fused in-place kernels take them (same values)
        hp = {k: _number_or_tensor(v) for k, v in hp.items()}
    keeping = keep is not None and not differentiable
    if not isinstance(t, list):
        extra = {"keep": keep} if keeping else {}
        if out_w is not None and not differentiable:
            extra["out_state"] = {"w": out_w}
        out = dict(base_step(state, grad, lr, t, **hp, **extra))
    else:
        buckets = by_count(t)
        out = {k: [None] * len(t) for k in state}
        for c, idx in buckets.items():
            sub = {k: [v[i] for i in idx] for k, v in state.items()}
            part_keep: dict = {}
            part = base_step(sub, [grad[i] for i in idx], lr, c, **hp,
                             **({"keep": part_keep} if keeping else {}))
            for k, leaves in part.items():
                for i, x in zip(idx, leaves):
                    out[k][i] = x
            for k, leaves in part_keep.items():
                slot = keep.setdefault(k, [None] * len(t))
                for i, x in zip(idx, leaves):
                    slot[i] = x
    if bounds is not None:
        lo, hi = bounds
        out["w"] = torch.minimum(torch.maximum(out["w"], lo), hi)
    return out


def _bounds(level: Level, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection box for the raw coordinates of ``level``'s tuned hyperparameters."""
    unit = _unit_mask(level, raw.device)
    b = _raw_bound(raw.dtype)
    lo = torch.where(unit, torch.full_like(raw, -b), torch.zeros_like(raw))
    hi = torch.where(unit, torch.full_like(raw, b), torch.full_like(raw, math.inf))
    return lo, hi


def _dphi(level: Level, v: torch.Tensor) -> torch.Tensor:
    """dφ/dx at the current values: 1 for LRs, σ'(x) = v(1 − v) for sigmoid coordinates."""
    return torch.where(_unit_mask(level, v.device), v * (1 - v), torch.ones_like(v))


def _hypergrad(levels: tuple[Level, ...], k: int, state: dict, cot: Any, t: int,
               counts: "list[int] | None" = None) -> torch.Tensor:
    r"""G^{k+1}_t = ⟨Gᵏ_t, ∂x_k/∂x_{k+1}⟩: the vjp, w.r.t. level k's hyperparameters, of level k's
    previous update x_k ← O_k(x_k, Gᵏ_{t−1}; φ(x_{k+1})), recomputed from its stored inputs
    (everything but the hyperparameters held fixed), applied to the cotangent Gᵏ_t."""
    v = state["values"][k]
    if t == 0:
        return torch.zeros_like(v)
    lvl, prev = levels[k], state["prev"][k]
    x_prev = prev.get("x", state["w"] if k == 0 else None)
    s_prev = {"w": x_prev, **prev["moments"]}
    bounds = _bounds(levels[k - 1], x_prev) if k > 0 else None
    scale = prev.get("scale")
    if k == 0:
        tp = [max(c - 1, 0) for c in counts] if counts is not None else t - 1
        return _level0_hypergrad(lvl, s_prev, prev["grad"], tp, v, scale, cot, prev.get("kept")) * _dphi(lvl, v)

    def update(vv):
        hp = {name: vv[i] for i, name in enumerate(lvl.tuned)}
        tp = [max(c - 1, 0) for c in counts] if k == 0 and counts is not None else t - 1
        return _update(lvl, s_prev, prev["grad"], tp, hp, scale, bounds)["w"]

    _, pullback = vjp(update, v)
    (dv,) = pullback(cot)
    return dv.to(v.dtype) * _dphi(lvl, v)


def _level0_hypergrad(level: Level, state: dict, grad: Any, t: "int | list[int]", values: torch.Tensor,
                      scale: Any, cot: Any, kept: dict | None = None) -> torch.Tensor:
    r"""G¹_t w.r.t. the values θ of level 0's tuned hyperparameters: ⟨G⁰_t, ∂w_t/∂θ⟩ of the
    update w_t = O_0(w_{t−1}, g_{t−1}; θ) (η = θ_lr·scale), by the dynamics' closed form
    (:meth:`hgtoolkit.dynamics.Dynamics.hyper_vjp`: a few passes over the model, no autograd);
    ``t`` may be one update count per leaf (the drop-in), summed over the count buckets;
    ``kept``: what that update left for this (``Dynamics.update(keep=)``)."""
    names = level.tuned
    hp = {n: values[i] for i, n in enumerate(names)}
    lr = hp.pop("lr", level.lr)
    hp = {k: _number_or_tensor(v) for k, v in hp.items()}  # plain numbers, as _update
    if scale is not None:
        lr = lr * scale
    if isinstance(t, list):
        parts = []
        for c, idx in by_count(t).items():
            sub = {k: [x[i] for i in idx] for k, x in state.items()}
            sub_kept = None if kept is None else {k: [x[i] for i in idx] for k, x in kept.items()}
            parts.append(level.base.hyper_vjp(sub, [grad[i] for i in idx], lr, c, [cot[i] for i in idx],
                                              names, kept=sub_kept, **hp))
        out = {n: sum(p[n] for p in parts) for n in names}
    else:
        out = level.base.hyper_vjp(state, grad, lr, t, cot, names, kept=kept, **hp)
    lr_factor = 1.0 if scale is None else scale
    return torch.stack([(out[n] * (lr_factor if n == "lr" else 1.0)).to(values.dtype) for n in names])


def step(tower: Level, state: dict, grad: Any, t: int, lr_scale: Any = None,
         cotangent: Any = None, counts: "list[int] | None" = None, differentiable: bool = True,
         out_w: Any = None, guard: Callable | None = None) -> dict:
    r"""One tower step (module docstring): Gᵏ_t bottom-up (one vjp of each level's previous
    update), then x_k ← O_k(x_k, Gᵏ_t; φ(x_{k+1})) top-down. Pure: returns a new state.

    ``grad`` = g_t = ∇L_t(w_t) (same structure as w); ``t`` = 0-based step index; ``lr_scale``
    (optional) multiplies the base LR used at this step; ``cotangent`` (optional, default
    ``grad``) is the G⁰_t that G¹_t pulls back — the drop-in zeroes it for parameters the
    previous step did not update (∂w_t/∂x_1 = 0 there); ``counts`` (optional, with a leaf-list
    w) the number of earlier updates of each leaf, the ``t`` of its level-0 update (default t);
    ``differentiable=False`` when nothing differentiates the step (level 0's update then takes
    the dynamics' closed form: same numbers, fewer passes); with it, ``out_w`` (buffers shaped
    like w, e.g. the parameters themselves) receives the new w in place. ``guard(values,
    hypergrads)`` runs before level 0's update, on the hyper-levels' new values and the
    hypergradients: a result other than None stops the step there (w untouched) and is
    returned as ``{"diverged": result}``.
    """
    levels = tower.levels
    n = len(levels)
    xs = [state["w"], *state["raw"]]
    G = [grad]
    for k in range(n - 1):
        G.append(_hypergrad(levels, k, state, G[k] if k or cotangent is None else cotangent, t, counts))
    new_x: list[Any] = [None] * n
    new_m: list[Any] = [None] * n
    new_v: list[Any] = [None] * (n - 1)
    new_prev: list[Any] = [None] * (n - 1)
    for k in reversed(range(n)):
        lvl = levels[k]
        scale = lr_scale if k == 0 else None
        bounds = _bounds(levels[k - 1], xs[k]) if k > 0 else None
        hp = {name: new_v[k][i] for i, name in enumerate(lvl.tuned)} if k < n - 1 else {}
        tk = counts if k == 0 and counts is not None else t
        keep = {} if k == 0 and not differentiable and n > 1 else None
        if k == 0 and guard is not None:
            bad = guard(new_v, G[1:])
            if bad is not None:
                return {"diverged": bad}
        out = _update(lvl, {"w": xs[k], **state["moments"][k]}, G[k], tk, hp, scale, bounds,
                      differentiable or k > 0, keep, out_w if k == 0 else None)
        new_x[k] = out.pop("w")
        new_m[k] = out
        if k < n - 1:
            if scale is None and k == 0:
                scale = state["prev"][0]["scale"]
            new_prev[k] = _prev(lvl, k, xs[k], state["moments"][k], G[k], scale)
            if keep:
                new_prev[k]["kept"] = keep
        if k > 0:
            # φ: identity for LRs; σ for unit-interval names, recomputed only where x moved, so a
            # hyperparameter that is never moved keeps its given value bit for bit.
            x_old, x_new, v_old = xs[k], new_x[k], state["values"][k - 1]
            unit = _unit_mask(levels[k - 1], x_new.device)
            new_v[k - 1] = torch.where(unit, torch.where(x_new == x_old, v_old, torch.sigmoid(x_new)),
                                       x_new)
    return {"w": new_x[0], "moments": new_m, "raw": new_x[1:], "values": new_v,
            "prev": new_prev, "hypergrads": G[1:]}


def hyperparameters(tower: Level, state: dict) -> list[dict[str, float]]:
    """Current value of every hyperparameter, one dict per level (the top level's are fixed)."""
    out = []
    for k, lvl in enumerate(tower.levels):
        d = lvl.values()
        if k < len(state["values"]):
            d.update(zip(lvl.tuned, state["values"][k].tolist()))
        out.append(d)
    return out


def _divergence(tower: Level, state: dict, lr_max: float = math.inf,
                lr_scale: float = 1.0) -> "tuple[str, float | None] | None":
    """What went wrong in a tower state after a step, as (what, value), or None (one device
    sync): a non-finite hyperparameter or hypergradient (the first, by level), a base LR
    η·``lr_scale`` above ``lr_max`` — the criteria of :class:`hgtoolkit.online.Engine` that apply
    to a tower (non-finite parameters show in the next hypergradient, as in the engine)."""
    parts = [*state["values"], *state["hypergrads"]]
    flat = torch.cat(parts) if parts else torch.zeros(0)
    lr = state["values"][0][tower.tuned.index("lr")] if "lr" in tower.tuned else None
    lr_ok = lr is None or not math.isfinite(lr_max) or bool(lr.abs() * lr_scale <= lr_max)
    if bool(torch.isfinite(flat).all()) and lr_ok:
        return None
    levels = tower.levels
    for k in range(len(state["values"])):
        for what, vec in (("hyperparameter", state["values"][k]), ("hypergradient", state["hypergrads"][k])):
            bad = ~torch.isfinite(vec)
            if bool(bad.any()):
                i = int(torch.nonzero(bad)[0])
                return (f"level-{k} {what} {levels[k].tuned[i]!r} ({levels[k].kind}) is not finite",
                        float(vec[i]))
    return f"learning rate exceeds lr_max={lr_max:.4g}", float(lr) * lr_scale


# ----------------------------------------------------------------------------- foundation dynamics

@dataclass(frozen=True)
class TowerDynamics(_dynamics.Dynamics):
    r"""A tower as a :class:`hgtoolkit.dynamics.Dynamics`: the state carries the hyperparameters.

    ``step(state, g_t, c_t, t)`` is :func:`step` with the base LR multiplied by c_t, so with
    the schedule c = (1, …, 1) ``trajectory.train`` runs the tower as specified, and
    ``exact.hypergradient(problem, torch.ones(T), tower.dynamics())`` gives
    ∂E(w_T)/∂c_t: the effect of nudging the learnt LR at step t, *including* how the tower
    reacts afterwards (reverse mode differentiates through the tower's own vjps).
    """

    tower: Level = None  # type: ignore[assignment]
    name: ClassVar[str] = "tower"

    def __post_init__(self) -> None:
        _check_tower(self.tower)

    def init(self, params: Any) -> dict:
        return init(self.tower, params)

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        if hyper:
            raise TypeError(f"TowerDynamics.step got hyperparameter(s) {sorted(hyper)}: a tower "
                            "learns its own; only the LR multiplier can be passed")
        return step(self.tower, state, grad, t, lr_scale=lr)

    def config(self) -> dict:
        return {"name": "tower", **self.tower.config()}


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
        self.tower = _check_tower(tower)
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


@records.register("towers", version=2, params="params", readable=("history", "train_losses"),
                  migrations={1: lambda cls, d: {**d, "params": None}},  # old files: JSON only, no params
                  redo="rerun it: `python -m hgtoolkit towers ...` or `towers.run(...).save(path)`")
@dataclass
class TowerResult:
    """A tower run (:func:`run`): the record of every hyperparameter, per-step training losses,
    final validation loss E(w_T), validation metrics and final parameters; ``diverged_at``: the
    step at which the run stopped because it diverged (None when it completed)."""

    tower: Level
    history: History
    train_losses: np.ndarray
    value: float
    params: Any = None
    metrics: dict | None = None
    problem: dict = field(default_factory=dict)
    diverged_at: int | None = None
    divergence: str | None = None

    @property
    def blew_up(self) -> bool:
        """True when the run stopped because it diverged (``divergence`` says how, ``diverged_at`` when)."""
        return self.diverged_at is not None

    @property
    def lrs(self) -> torch.Tensor:
        """The learnt base LR schedule η_0 … η_{T−1} (float64)."""
        return torch.as_tensor(self.history.lrs, dtype=torch.float64)

    def replay(self) -> _dynamics.Dynamics:
        """The base optimizer with every learnt non-LR hyperparameter replayed as a fixed schedule;
        ``trajectory.train(problem, result.lrs, result.replay())`` reproduces the run, and
        ``exact.hypergradient(problem, result.lrs, result.replay())`` gives the exact
        full-horizon hypergradient of the learnt LR schedule."""
        base_level = self.tower.levels[0]
        vals = self.history.values(0)
        sched = {n: torch.as_tensor(vals[n], dtype=torch.float64) for n in base_level.tuned if n != "lr"}
        return Scheduled(base_level.base, sched) if sched else base_level.base

    def _record_fields(self) -> dict:
        """The record codec's fields: the tower's settings, the history's arrays (its spec string
        parses back to the tower), the parameters."""
        return {"tower": self.tower.config(), "history": self.history.to_dict(), "train_losses": self.train_losses,
                "value": self.value, "params": self.params, "metrics": self.metrics, "problem": self.problem,
                "diverged_at": self.diverged_at, "divergence": self.divergence}

    @classmethod
    def _from_record_fields(cls, d: dict) -> "TowerResult":
        hist = History.from_dict(d["history"])
        losses = np.array([np.nan if v is None else v for v in d["train_losses"]], dtype=np.float64)
        return cls(hist.tower, hist, losses, d["value"], d.get("params"), d.get("metrics"), d.get("problem", {}),
                   d.get("diverged_at"), d.get("divergence"))

    def to_dict(self) -> dict:
        return records.to_dict(self)

    def save(self, path: str | Path) -> Path:
        """:func:`hgtoolkit.records.save` (JSON, npz, and the parameters when kept)."""
        return records.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "TowerResult":
        return records.load(path, kind="towers")

    def __repr__(self) -> str:
        return (f"TowerResult({str(self.tower)!r}, steps={len(self.history)}, value={self.value:.6g}, "
                f"final lr={self.history.lrs[-1] if len(self.history) else float('nan'):.4g})")


def run(problem, tower: "Level | str", steps: int, *, progress: bool = False,
        divergence_factor: float | None = 2.0, raise_on_divergence: bool = False) -> TowerResult:
    """Train ``problem`` for ``steps`` steps with ``tower`` (through ``trajectory.make_step`` of
    ``tower.dynamics()``), recording every hyperparameter at every level.

    Divergence, with the criterion of :class:`hgtoolkit.online.Engine`: the minibatch loss L_t
    not finite or above ``divergence_factor`` × L_0 (None: off), a non-finite hyperparameter,
    hypergradient or parameter after step t. The run stops before applying step t, warns
    (:class:`DivergenceWarning`, naming t) and returns the record of steps 0 … t−1 with
    ``result.diverged_at = t``; ``raise_on_divergence=True`` raises :class:`DivergenceError`.

    >>> from hgtoolkit import problems, towers
    >>> r = towers.run(problems.from_function("beale"), "sgd(lr=1e-4) / sgd(lr=1e-9)", steps=20)
    >>> len(r.history.lrs)
    20
    """
    from .trajectory import check_finite, make_step, progress_bar
    tower = parse(tower)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if divergence_factor is not None and not (_real("towers.run", "divergence_factor", divergence_factor) > 1):
        raise ValueError(f"divergence_factor must be > 1 (or None), got {divergence_factor}")
    dyn = tower.dynamics()
    one_step = make_step(problem, dyn)
    state = dyn.init(problem.params0)
    history = History(tower)
    one = torch.ones((), dtype=problem.dtype, device=problem.device)
    losses, diverged_at, divergence, ref = [], None, None, math.nan
    with torch.no_grad():
        for t in progress_bar(range(steps), progress, desc=f"tower h={tower.height}", leave=False):
            new, loss = one_step(state, one, t)
            value = float(loss)
            ref = value if t == 0 else ref
            bad = (((online.DIVERGENCE[1], value) if not math.isfinite(value) else None)
                   or ((online.DIVERGENCE[3], value) if value > loss_limit(ref, divergence_factor) else None)
                   or _divergence(tower, new))
            if bad:
                err = DivergenceError(t, *bad)
                err.args = (f"tower {tower}: training diverged at step {t}: {bad[0]}"
                            + (f" ({bad[1]:.4g})" if bad[1] is not None and math.isfinite(bad[1]) else ""),)
                if raise_on_divergence:
                    raise err
                warnings.warn(f"{err.args[0]}; the run stopped there (result.diverged_at = {t})",
                              DivergenceWarning, stacklevel=2)
                diverged_at, divergence = t, err.args[0]
                break
            state = new
            history.append(state)
            losses.append(loss)
        params = dyn.params(state)
        value = problem.val_loss(params)
    check_finite(value, max(len(losses) - 1, 0), params)
    metrics = problem.metrics(params) if problem.metrics is not None else None
    losses = torch.stack(losses).detach().cpu().double().numpy() if losses else np.zeros(0)
    return TowerResult(tower, history, losses, float(value), params, metrics, problem.describe(),
                       diverged_at, divergence)


def analyse(result: TowerResult, problem, **kwargs: Any):
    """Compare the tower's online LR hypergradients G¹_t (the HD-like one-step estimates it used)
    with the exact references along the learnt schedule (:func:`hgtoolkit.analysis.analyse`,
    ``alignment="before_step"``: G¹_t is formed before step t). Returns an ApproximationReport."""
    from . import analysis
    if "lr" not in result.history.learnt(0):
        raise ValueError("analyse: the tower does not learn the base LR (no hypergradient to compare)")
    kwargs.setdefault("label", f"tower {result.tower}")
    kwargs.setdefault("alignment", "before_step")
    info = {"tower": result.tower.config(), **kwargs.pop("info", {})}
    return analysis.analyse(problem, result.lrs, result.history.hypergrads(0)["lr"],
                            result.replay(), info=info, **kwargs)


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
                return self._diverged(group, t, *bad)
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
        guard = lambda values, hypergrads: _divergence(tower, {"values": values, "hypergrads": hypergrads},
                                                       lr_max, scale)
        new = step(tower, state, grads, t, lr_scale=scale, cotangent=cot,
                   counts=counts if any(c != t for c in counts) else None, differentiable=False,
                   out_w=[p.detach() for p in params] if keep_w else w, guard=guard)
        if "diverged" in new:
            return self._diverged(group, t, *new["diverged"])
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

    def _loss_divergence(self, group: dict, loss, t: int):
        """The engine's loss criterion for a closure's loss (None when fine)."""
        value = float(loss)
        if t == 0 or "ref_loss" not in group:
            group["ref_loss"] = value
        if not math.isfinite(value):
            return online.DIVERGENCE[1], value
        if value > loss_limit(group["ref_loss"], group["divergence_factor"]):
            return online.DIVERGENCE[3], value
        return None

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


# ----------------------------------------------------------------------------- plotting

def __getattr__(name: str):
    """``towers.plot_history`` moved to :func:`hgtoolkit.plotting.plot_tower_history` (plotting
    reads records; it no longer lives in the computational module)."""
    if name == "plot_history":
        from .plotting import plot_tower_history
        return plot_tower_history
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
