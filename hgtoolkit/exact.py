r"""Exact hypergradient of a whole LR schedule: ∇f(η) with f(η) = E(w_T), T = len(η).

Tangent Z_t = ds_t/dη:  Z_0 = 0,  Z_{t+1} = A_t Z_t + B_t,  A_t = ∂Φ_t/∂s,  B_t = ∂Φ_t/∂η_t,
and ∇f(η) = Z_Tᵀ ∇E(w_T). Four interchangeable ways to compute it (``mode=``):

- ``"reverse"``: adjoint λ_T = ∇_s E(w_T); for t = T−1 … 0,
  (λ_t, ∂f/∂η_t) = vjp(Φ_t at (s_t, η_t))(λ_{t+1}) — Hessian-vector products, never a Hessian.
  ``checkpoint_every=None`` keeps each step's vjp from the forward pass (fastest, memory O(T));
  ``checkpoint_every=k`` stores every k-th state and recomputes one segment at a time
  (memory O(T/k + k)); both give the same numbers.
- ``"forward"``: the tangent system column by column with ``torch.func.jvp``, ``vmap``-ed over
  ``chunk_size`` columns of Z at a time (column j is zero until step j, so it starts there).
- ``"autograd"``: plain ``torch.autograd`` through the unrolled loop (``create_graph=True``), a
  reference independent of ``torch.func``.
- :func:`finite_difference`: central differences (f(η+εe_t) − f(η−εe_t)) / 2ε, the last word.

:func:`directional_derivative` gives ∇f(η)·v in one forward pass (one jvp per step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import grad_and_value, vjp, vmap

from . import dynamics as _dynamics
from ._tree import tree_dot, tree_map, tree_zeros_like
from .trajectory import (check_finite, check_lrs, make_step, progress_bar, scalar_loss, tangent_step,
                         train)

__all__ = ["HypergradResult", "hypergradient", "directional_derivative", "finite_difference",
           "MODES"]

MODES = ("reverse", "forward", "autograd")


@dataclass
class HypergradResult:
    """f(η) = ``value`` = E(w_T); ``grad``[t] = ∂f/∂η_t; ``params`` = w_T."""

    value: torch.Tensor
    grad: torch.Tensor
    params: Any
    lrs: torch.Tensor
    train_losses: torch.Tensor
    mode: str
    optimizer: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"HypergradResult(mode={self.mode!r}, T={len(self.lrs)}, value={float(self.value):.6g}, "
                f"|grad|={float(self.grad.norm()):.6g})")


def _objective(problem, dyn):
    """s ↦ (∇_s E(params(s)), E): the terminal adjoint λ_T and the value (zero for moments)."""
    val_loss = scalar_loss(problem.val_loss, "val_loss")
    return grad_and_value(lambda s: val_loss(dyn.params(s)))


def _reverse(problem, dyn, lrs, checkpoint_every, progress):
    T = len(lrs)
    step = make_step(problem, dyn)
    s0 = dyn.init(problem.params0)
    losses = torch.empty(T, dtype=lrs.dtype, device=lrs.device)

    def vjp_step(state, t):
        new_state, pullback, loss = vjp(lambda s, lr: step(s, lr, t), state, lrs[t], has_aux=True)
        check_finite(loss, t)
        losses[t] = loss.detach()
        return new_state, pullback

    if checkpoint_every is None:
        # Keep every step's pullback from the forward pass: nothing is recomputed.
        pullbacks, state = [], s0
        for t in progress_bar(range(T), progress, desc="forward", leave=False):
            state, pb = vjp_step(state, t)
            pullbacks.append(pb)
        segments = [(0, T, pullbacks)]
        final = state
    else:
        k = checkpoint_every
        checkpoints, state = {0: s0}, s0
        with torch.no_grad():
            for t in progress_bar(range(T), progress, desc="forward", leave=False):
                state, loss = step(state, lrs[t], t)
                check_finite(loss, t)
                if (t + 1) % k == 0 and t + 1 < T:
                    checkpoints[t + 1] = state
        final = state
        segments = [(a, min(a + k, T), None) for a in range(0, T, k)]

    grad_s, value = _objective(problem, dyn)(final)
    check_finite(value, T - 1, dyn.params(final))
    lam, grads = grad_s, torch.empty(T, dtype=lrs.dtype, device=lrs.device)
    bar = progress_bar(range(T), progress, desc="backward", leave=False)
    for a, b, pullbacks in reversed(segments):
        if pullbacks is None:  # recompute this segment from its checkpoint, keeping pullbacks
            pullbacks, state = [], checkpoints[a]
            for t in range(a, b):
                state, pb = vjp_step(state, t)
                pullbacks.append(pb)
        for t in range(b - 1, a - 1, -1):
            lam, grads[t] = pullbacks[t - a](lam)
            pullbacks[t - a] = None  # free the graph of step t as soon as it is used
            if hasattr(bar, "update"):
                bar.update()
    if hasattr(bar, "close"):
        bar.close()
    if not bool(torch.isfinite(grads).all()):
        raise FloatingPointError("the hypergradient has non-finite entries although training stayed finite")
    return value.detach(), grads, dyn.params(final), losses


def _tangent_pass(step, s0, lrs, z0, lr_tangent, t0=0, batched=False):
    """Propagate z_{t+1} = A_t z_t + B_t·lr_tangent(t) from step t0 (primal from s0 at step t0)."""
    state, z = s0, z0
    losses = []
    for t in range(t0, len(lrs)):
        if batched:
            fn = lambda zz, dd, t=t, s=state: tangent_step(step, s, lrs[t], t, zz, dd)
            state, z, loss = vmap(fn, in_dims=(0, 0), out_dims=(None, 0, None))(z, lr_tangent(t))
        else:
            state, z, loss = tangent_step(step, state, lrs[t], t, z, lr_tangent(t))
        check_finite(loss, t)
        losses.append(loss)
    return state, z, losses


def _forward(problem, dyn, lrs, chunk_size, progress):
    T = len(lrs)
    step = make_step(problem, dyn)
    C = T if chunk_size is None else chunk_size
    grads = torch.empty(T, dtype=lrs.dtype, device=lrs.device)
    # One plain pass stores the states where chunks start (replaying only what is needed).
    starts = list(range(0, T, C))
    state, start_states, losses = dyn.init(problem.params0), {}, torch.empty_like(lrs)
    with torch.no_grad():
        for t in range(T):
            if t in starts:
                start_states[t] = state
            state, losses[t] = step(state, lrs[t], t)
            check_finite(losses[t], t)
    grad_s, value = _objective(problem, dyn)(state)
    check_finite(value, T - 1, dyn.params(state))
    final = state
    for c0 in progress_bar(starts, progress, desc="forward-mode chunks", leave=False):
        cols = torch.arange(c0, min(c0 + C, T), device=lrs.device)
        s0 = start_states[c0]
        Z0 = tree_map(lambda x: x.new_zeros((len(cols), *x.shape)), s0)
        onehot = lambda t: (cols == t).to(lrs.dtype)
        _, Z, _ = _tangent_pass(step, s0, lrs, Z0, onehot, t0=c0, batched=True)
        grads[cols] = vmap(lambda z: tree_dot(grad_s, z))(Z).to(grads.dtype)  # states may mix dtypes
    return value.detach(), grads, dyn.params(final), losses


def _autograd(problem, dyn, lrs, progress):
    T = len(lrs)
    eta = lrs.clone().requires_grad_(True)
    state = dyn.init(tree_map(lambda p: p.clone().requires_grad_(True), problem.params0))
    losses = []
    for t in progress_bar(range(T), progress, desc="autograd", leave=False):
        w = dyn.params(state)
        loss = problem.train_loss(w, t)
        check_finite(loss, t)
        leaves, spec = torch.utils._pytree.tree_flatten(w)
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        state = dyn.step(state, torch.utils._pytree.tree_unflatten(list(g), spec), eta[t], t)
        losses.append(loss.detach())
    value = problem.val_loss(dyn.params(state))
    check_finite(value, T - 1, dyn.params(state))
    (grads,) = torch.autograd.grad(value, eta)
    return value.detach(), grads, tree_map(lambda p: p.detach(), dyn.params(state)), torch.stack(losses)


def hypergradient(problem, lrs: Any, optimizer: "str | _dynamics.Dynamics" = "sgd",
                  mode: str = "reverse", *, checkpoint_every: int | None = None,
                  chunk_size: int | None = None, progress: bool = False) -> HypergradResult:
    """Exact ∇f(η) for the whole schedule ``lrs`` (η_0 … η_{T−1}), f(η) = E(w_T).

    >>> import hgtoolkit, torch
    >>> p = hgtoolkit.problems.from_function("beale")
    >>> r = hgtoolkit.hypergradient(p, torch.full((50,), 1e-3))
    >>> r.grad.shape
    torch.Size([50])
    """
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES} "
                         "(or use hgtoolkit.finite_difference)")
    for name, val in (("checkpoint_every", checkpoint_every), ("chunk_size", chunk_size)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
            raise TypeError(f"{name} must be a positive int or None, got {val!r}")
        if val is not None and val < 1:
            raise ValueError(f"{name} must be ≥ 1, got {val}")
    if mode == "reverse":
        out = _reverse(problem, dyn, lrs, checkpoint_every, progress)
    elif mode == "forward":
        out = _forward(problem, dyn, lrs, chunk_size, progress)
    else:
        out = _autograd(problem, dyn, lrs, progress)
    value, grads, params, losses = out
    return HypergradResult(value, grads.detach(), params, lrs, losses, mode, dyn.config())


def directional_derivative(problem, lrs: Any, direction: Any,
                           optimizer: "str | _dynamics.Dynamics" = "sgd") -> tuple[torch.Tensor, torch.Tensor]:
    """(f(η), ∇f(η)·v) in one forward pass: z_{t+1} = A_t z_t + B_t v_t, ∇f·v = ∇E(w_T)·z_T."""
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)
    v = check_lrs(direction, problem, argname="direction", allow_negative=True)
    if v.shape != lrs.shape:
        raise ValueError(f"direction must have the schedule's shape {tuple(lrs.shape)}, got {tuple(v.shape)}")
    step = make_step(problem, dyn)
    s0 = dyn.init(problem.params0)
    state, z, _ = _tangent_pass(step, s0, lrs, tree_zeros_like(s0), lambda t: v[t])
    grad_s, value = _objective(problem, dyn)(state)
    check_finite(value, len(lrs) - 1, dyn.params(state))
    return value.detach(), tree_dot(grad_s, z).detach()


def finite_difference(problem, lrs: Any, optimizer: "str | _dynamics.Dynamics" = "sgd", *,
                      eps: float | None = None, steps: Any = None) -> torch.Tensor:
    """Central differences ∂f/∂η_t ≈ (f(η + ε e_t) − f(η − ε e_t)) / 2ε for t in ``steps`` (all by default).

    ``eps=None`` scales ε to the schedule and the dtype: r·mean|η| (r·1e-3 for an all-zero
    schedule) with r = max(1e-5, ε_mach^{1/3}/5) — ε_mach^{1/3} balances the O(ε²) truncation
    error against the O(ε_mach/ε) rounding error of central differences, and the factor 1/5
    keeps the step clear of ReLU kinks in small MLPs: 1e-5 in float64, about 1e-3 in float32
    (a float64-sized step in float32 is mostly rounding: 7-60 % off on a small MLP). An
    explicit ``eps`` below that in a lower precision than float64 warns. Entries not in ``steps``
    are NaN. Costs 2 training runs per entry: a reference for tests.
    """
    import warnings
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)
    rel = max(1e-5, torch.finfo(lrs.dtype).eps ** (1 / 3) / 5)
    if eps is None:
        eps = rel * (float(lrs.abs().mean()) or 1e-3)
    elif isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number or None, got {type(eps).__name__}")
    elif not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    elif lrs.dtype != torch.float64 and eps < 0.1 * rel * float(lrs.abs().mean()):
        warnings.warn(f"finite_difference: eps={eps:g} is small for {lrs.dtype} (rounding error "
                      f"dominates); eps=None picks {rel * float(lrs.abs().mean()):.3g}", RuntimeWarning,
                      stacklevel=2)
    T = len(lrs)
    if steps is None:
        idx = range(T)
    else:
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
            raise TypeError(f"steps must be a sequence of step indices, got {type(steps).__name__}")
        idx = list(steps)
        for i, t in enumerate(idx):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"steps[{i}] must be an int, got {t!r}")
            if not -T <= t < T:
                raise ValueError(f"steps[{i}]={t} is out of range for a schedule of T={T} steps "
                                 f"(valid: 0 … {T - 1})")
    out = torch.full_like(lrs, float("nan"))
    for t in idx:
        e = torch.zeros_like(lrs)
        e[t] = eps
        fp = train(problem, lrs + e, dyn, validate=False).value
        fm = train(problem, lrs - e, dyn, validate=False).value
        out[t] = (fp - fm) / (2 * eps)
    return out
