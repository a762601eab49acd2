"""The towers' functional core (:mod:`hgtoolkit.towers`, equations in its docstring): :func:`init`,
:func:`step` — Gᵏ_t bottom-up (the hypergradient of each level's previous update), then every
level's update top-down, both the one hyper-level step of :mod:`hgtoolkit.hyperstep` —
:func:`hyperparameters` and :func:`state_divergence`. Pure functions over pytrees; a tower is
any :class:`~hgtoolkit.towers.Any` (read through its ``levels``, ``tuned``, ``kind``)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from .. import divergence as _divergence
from .._tree import tree_leaves, tree_zeros_like
from ..hyperstep import hypergradient, level_update
from ..optim import by_count

__all__ = ["UNIT_INTERVAL", "raw_bound", "hyper_dtype", "check_tower", "init", "step", "hyperparameters",
           "state_divergence"]

#: Hyperparameters kept in (0, 1) through the sigmoid φ = σ; all others are learning rates.
UNIT_INTERVAL = ("momentum", "beta1", "beta2", "alpha")


def raw_bound(dtype: torch.dtype) -> float:
    """|x| bound for sigmoid coordinates: σ(x) stays strictly inside (0, 1) in ``dtype``."""
    return 36.0 if dtype == torch.float64 else 15.0


def hyper_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------- functional core

def check_tower(tower: Any, argname: str = "tower") -> Any:
    """``tower`` if it is a tower specification (a :class:`~hgtoolkit.towers.Any`), else TypeError."""
    if not (hasattr(tower, "levels") and hasattr(tower, "tuned") and hasattr(tower, "kind")):
        raise TypeError(f"{argname} must be a towers optimizer (towers.SGD/Adam/AdaGrad/RMSProp), "
                        f"got {type(tower).__name__}")
    return tower


def _unit_mask(level: Any, device) -> torch.Tensor:
    return torch.tensor([n in UNIT_INTERVAL for n in level.tuned], device=device)


def init(tower: Any, params: Any) -> dict:
    """Initial tower state for ``params`` (a tensor or pytree of tensors).

    ``{"w": params, "moments": [level k's optimizer state without its variable x_k],
    "raw": [x_{k+1}: (m_k,) raw coordinates of level k's tuned hyperparameters],
    "values": [φ(x_{k+1}): their values], "prev": [level k's last update inputs],
    "hypergrads": [G^{k+1} of the last step]}``, lists indexed by level k.
    """
    tower = check_tower(tower)
    leaves = tree_leaves(params)
    if not leaves or not all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in leaves):
        raise TypeError("params must be a floating-point tensor or a pytree of them")
    device = leaves[0].device
    hdt = hyper_dtype(device)
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


def _prev(level: Any, k: int, x: Any, moments: dict, grad: Any, scale: Any) -> dict:
    """What the next step needs to differentiate this update again: its inputs. Any 0 keeps
    no copy of w unless weight decay makes the update direction depend on it (for every
    dynamics w' = w − η·d with d independent of w otherwise, so ∂w'/∂h needs no w)."""
    out = {"moments": moments, "grad": grad}
    if k > 0 or getattr(level, "weight_decay", 0.0) != 0:
        out["x"] = x
    if k == 0:
        out["scale"] = scale
    return out


def _update(level: Any, state: dict, grad: Any, t: "int | list[int]", hp: dict, lr_scale: Any,
            bounds: "tuple[torch.Tensor, torch.Tensor] | None", differentiable: bool = True,
            keep: dict | None = None, out_w: Any = None) -> dict:
    """One step of O_k with hyperparameters ``hp`` (LR scaled by ``lr_scale``; projected onto
    ``bounds``): :func:`hgtoolkit.hyperstep.level_update` of ``level.base``. ``t``: the step
    index, or one update count per leaf of a leaf-list state (the drop-in's level 0: Adam's bias
    correction counts each parameter's own updates, as torch.optim)."""
    return level_update(level.base, state, grad, _counts(t), {"lr": level.lr, **hp}, lr_scale=lr_scale,
                        bounds=bounds, differentiable=differentiable, keep=keep, out_w=out_w)


def _counts(t: "int | list[int]") -> "int | dict[int, list[int]]":
    """``t``, or {count: leaves} for per-leaf update counts (:func:`hgtoolkit.optim.by_count`)."""
    return by_count(t) if isinstance(t, list) else t


def _bounds(level: Any, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection box for the raw coordinates of ``level``'s tuned hyperparameters."""
    unit = _unit_mask(level, raw.device)
    b = raw_bound(raw.dtype)
    lo = torch.where(unit, torch.full_like(raw, -b), torch.zeros_like(raw))
    hi = torch.where(unit, torch.full_like(raw, b), torch.full_like(raw, math.inf))
    return lo, hi


def _dphi(level: Any, v: torch.Tensor) -> torch.Tensor:
    """dφ/dx at the current values: 1 for LRs, σ'(x) = v(1 − v) for sigmoid coordinates."""
    return torch.where(_unit_mask(level, v.device), v * (1 - v), torch.ones_like(v))


def _hypergrad(levels: tuple[Any, ...], k: int, state: dict, cot: Any, t: int,
               counts: "list[int] | None" = None) -> torch.Tensor:
    r"""G^{k+1}_t = ⟨Gᵏ_t, ∂x_k/∂x_{k+1}⟩: :func:`hgtoolkit.hyperstep.hypergradient` of level k's
    previous update x_k ← O_k(x_k, Gᵏ_{t−1}; φ(x_{k+1})), from its stored inputs (everything but
    the hyperparameters held fixed), applied to the cotangent Gᵏ_t, times φ'(x_{k+1}). The same
    step at every level; level 0's update was not differentiable (numbers, ``kept``)."""
    v = state["values"][k]
    if t == 0:
        return torch.zeros_like(v)
    lvl, prev = levels[k], state["prev"][k]
    x_prev = prev.get("x", state["w"] if k == 0 else None)
    hp = {"lr": lvl.lr, **{name: v[i] for i, name in enumerate(lvl.tuned)}}
    tp = [max(c - 1, 0) for c in counts] if k == 0 and counts is not None else t - 1
    box = (state["raw"][k - 1], _bounds(levels[k - 1], x_prev)) if k > 0 else (None, None)
    G = hypergradient(lvl.base, {"w": x_prev, **prev["moments"]}, prev["grad"], _counts(tp), cot, lvl.tuned,
                      hp, lr_scale=prev.get("scale"), at=box[0], bounds=box[1], kept=prev.get("kept"),
                      numbers=k == 0, dtype=v.dtype)
    return G * _dphi(lvl, v)


def step(tower: Any, state: dict, grad: Any, t: int, lr_scale: Any = None,
         cotangent: Any = None, counts: "list[int] | None" = None, differentiable: bool = True,
         out_w: Any = None, guard: Callable | None = None) -> dict:
    r"""One tower step (module docstring): Gᵏ_t bottom-up (the hypergradient of each level's
    previous update), then x_k ← O_k(x_k, Gᵏ_t; φ(x_{k+1})) top-down. Pure: returns a new state.

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


def hyperparameters(tower: Any, state: dict) -> list[dict[str, float]]:
    """Current value of every hyperparameter, one dict per level (the top level's are fixed)."""
    out = []
    for k, lvl in enumerate(tower.levels):
        d = lvl.values()
        if k < len(state["values"]):
            d.update(zip(lvl.tuned, state["values"][k].tolist()))
        out.append(d)
    return out


def state_divergence(tower: Any, state: dict, t: int, lr_max: float = math.inf,
                     lr_scale: float = 1.0) -> "_divergence.Divergence | None":
    """The divergence of a tower state after step ``t`` (None when fine; one device sync): a
    non-finite hyperparameter or hypergradient (the first, by level), or a base LR
    η·``lr_scale`` above ``lr_max`` — the rules of :mod:`hgtoolkit.divergence` that apply to a
    tower (non-finite parameters show in the next hypergradient, as in the online engine)."""
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
                return _divergence.Divergence(t, f"level-{k} {what} {levels[k].tuned[i]!r} ({levels[k].kind})",
                                              float(vec[i]))
    return _divergence.Divergence(t, "learning rate", float(lr) * lr_scale, f"exceeds lr_max={lr_max:.4g}")
