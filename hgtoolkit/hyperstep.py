r"""The one hyper-level step: learn the hyperparameters θ of an update from the update that used them.

A *level* holds a variable x (the weights w, or the raw coordinates of the hyperparameters of
the level below) and runs one pure :mod:`hgtoolkit.dynamics` step Φ, projected onto a box
Π = clip to [lo, hi] (no box for the weights)::

    x' = Π(Φ(x, G; θ))                                          (level_update)

The level above learns θ from the derivative of the next loss through that ONE update, every
other input of it (x, G, the moments, t) held fixed::

    G_θ = ⟨v, ∂x'/∂θ⟩   at the update's stored inputs            (hypergradient)

with v the cotangent of x' (the gradient of the loss at the new point, or the level below's own
hypergradient). Closed form where the dynamics has one (:meth:`Dynamics.hyper_vjp
<hgtoolkit.dynamics.Dynamics.hyper_vjp>`: SGD's η and momentum, Adam's η, β1, β2), ``torch.func``
otherwise; through Π the derivative is 0 where x' sits on a bound. Every update has the form
w' = w − η d, so for θ = η it is G_η = −⟨v, d⟩: with SGD −∇L_t(w_t)·∇L_{t−1}(w_{t−1}),
Baydin et al.'s HD hypergradient h_t. The online engine (:mod:`hgtoolkit.online`) forms that
number in forward mode (z_t = ∂w_t/∂η = −d_{t−1}, kept from the update; with μ > 0 the same
tangent runs over many steps: RTHO, MARTHE); tests/test_towers.py holds SGD-, SGDN- and Adam-HD
equal to the two-level towers built from this step.

Built from this step: every level of a tower (:mod:`hgtoolkit.towers`: level k's hypergradient
is :func:`hypergradient` of level k−1's last update, its update :func:`level_update`) and HDM
(:mod:`hgtoolkit.hdm`: the stepsize and momentum of its trial step, learnt by one AdaGrad level
projected onto [0, P_max] × [0, β_max]).

``t`` is the step index of the update, or ``{t: indices}`` for a state held as a list of
leaves whose entries have different update counts (the drop-in optimizers: Adam's bias
correction counts each parameter's own updates); the update then runs once per count.
"""
from __future__ import annotations

from typing import Any

import torch

from . import dynamics as _dynamics
from . import fastpaths as _fastpaths

__all__ = ["level_update", "hypergradient", "plain_number"]


def plain_number(v: Any) -> Any:
    """A plain 0-d tensor that nothing differentiates as a Python number, else ``v`` itself
    (a tensor inside ``torch.func`` or with ``requires_grad`` stays one): the dynamics' fused
    in-place kernels take numbers (same values)."""
    if (isinstance(v, torch.Tensor) and v.numel() == 1 and not v.requires_grad
            and not torch._C._functorch.is_functorch_wrapped_tensor(v)):
        return v.item()
    return v


def _split(hyper: dict, lr_scale: Any, numbers: bool) -> tuple[Any, dict]:
    """(η = θ_lr·c, the other hyperparameters) of ``hyper`` (which names "lr")."""
    hp = dict(hyper)
    lr = hp.pop("lr")
    if lr_scale is not None:
        lr = lr * lr_scale
    if numbers:
        hp = {k: plain_number(v) for k, v in hp.items()}
    return lr, hp


def _sub(tree: dict, idx: list[int]) -> dict:
    return {k: [v[i] for i in idx] for k, v in tree.items()}


def level_update(dynamics: _dynamics.Dynamics, state: dict, grad: Any, t: "int | dict[int, list[int]]",
                 hyper: dict, *, lr_scale: Any = None, bounds: "tuple[Any, Any] | None" = None,
                 differentiable: bool = True, keep: dict | None = None, out_w: Any = None) -> dict:
    r"""x' = Π(Φ(x, G; θ)): one step of ``dynamics`` from ``state`` (its ``"w"`` = x) with
    gradient ``grad`` = G and hyperparameters ``hyper`` ({"lr": θ_lr, name: value}; the others
    are the dynamics' own), the LR times ``lr_scale`` (c, optional), projected onto
    ``bounds`` = (lo, hi) when given. ``differentiable=False``: :func:`hgtoolkit.fastpaths.update` of the
    dynamics (the same numbers as its step, fewer passes) for an update
    nothing differentiates, which may leave its intermediates in ``keep`` (for the next
    :func:`hypergradient`) and write the new x into the buffers ``out_w`` (one ``t``)."""
    lr, hp = _split(hyper, lr_scale, numbers=not differentiable)
    keeping = keep is not None and not differentiable

    def one(st: dict, gr: Any, c: int, kp: dict | None, into: Any) -> dict:
        if differentiable:
            return dynamics.step(st, gr, lr, c, **hp)
        return _fastpaths.update(dynamics, st, gr, lr, c, out_state=None if into is None else {"w": into},
                                 keep=kp, **hp)

    if not isinstance(t, dict):
        out = dict(one(state, grad, t, keep if keeping else None, out_w))
    else:
        n = len(grad)
        out = {k: [None] * n for k in state}
        for c, idx in t.items():
            part_keep: dict = {}
            part = one(_sub(state, idx), [grad[i] for i in idx], c, part_keep if keeping else None, None)
            for k, leaves in part.items():
                for i, x in zip(idx, leaves):
                    out[k][i] = x
            for k, leaves in part_keep.items():
                slot = keep.setdefault(k, [None] * n)
                for i, x in zip(idx, leaves):
                    slot[i] = x
    if bounds is not None:
        lo, hi = bounds
        out["w"] = torch.minimum(torch.maximum(out["w"], lo), hi)
    return out


def hypergradient(dynamics: _dynamics.Dynamics, state: dict, grad: Any, t: "int | dict[int, list[int]]",
                  cotangent: Any, names: tuple[str, ...], hyper: dict, *, lr_scale: Any = None,
                  at: Any = None, bounds: "tuple[Any, Any] | None" = None, kept: dict | None = None,
                  numbers: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""G_θ = ⟨v, ∂x'/∂θ⟩ for each θ in ``names``, of the update x' = :func:`level_update`
    (``dynamics``, ``state``, ``grad``, ``t``, ``hyper``, ``lr_scale``, ``bounds``) — the
    arguments that update was given — with v = ``cotangent`` (shaped like x). A vector of the
    entries of every name in turn (one each for scalar hyperparameters), in ``dtype`` (default
    the dynamics'); for "lr" the derivative is
    w.r.t. θ_lr (times c = ``lr_scale``). With ``bounds``, ``at`` is that update's result x':
    coordinates on a bound pass nothing (the projection's derivative). ``kept``: what that
    update left in ``keep=`` (reused, not recomputed); ``numbers``: pass the hyperparameters
    as plain numbers, as a ``differentiable=False`` update did."""
    if bounds is not None and at is not None:
        lo, hi = bounds
        cotangent = torch.where((at > lo) & (at < hi), cotangent, torch.zeros_like(cotangent))
    lr, hp = _split(hyper, lr_scale, numbers)
    if isinstance(t, dict):
        parts = []
        for c, idx in t.items():
            parts.append(dynamics.hyper_vjp(_sub(state, idx), [grad[i] for i in idx], lr, c,
                                            [cotangent[i] for i in idx], names,
                                            kept=None if kept is None else _sub(kept, idx), **hp))
        out = {n: sum(p[n] for p in parts) for n in names}
    else:
        out = dynamics.hyper_vjp(state, grad, lr, t, cotangent, names, kept=kept, **hp)
    vals = [out[n] * lr_scale if n == "lr" and lr_scale is not None else out[n] for n in names]
    if dtype is not None:
        vals = [v.to(dtype) for v in vals]
    # one entry per name (a hyperparameter with one value per coordinate, HDM's diagonal
    # stepsize, gives as many entries, in order)
    return torch.stack(vals) if all(v.ndim == 0 for v in vals) else torch.cat([v.reshape(-1) for v in vals])

