r"""Exact hypergradient of a whole LR schedule: ∇f(η) with f(η) = E(w_T), T = len(η).

One step is s_{t+1} = Φ_t(s_t, η_t) = D(s_t, g_t, η_t) with g_t = ∇L_t(w_t) and D the
optimizer's element-wise update (:mod:`hgtoolkit.dynamics`). Its derivatives factor into the
closed-form derivatives of D and one Hessian-vector product H_t v = ∇²L_t(w_t) v:

    A_t z = ∂D/∂s·z + ∂D/∂g·H_t z_w,        B_t = ∂D/∂η,
    Aᵀ_t λ = s̄ + H_t ḡ  with (s̄, ḡ, η̄) = vjp of D at λ,  ∂f/∂η_t = η̄.

Tangent Z_t = ds_t/dη:  Z_0 = 0,  Z_{t+1} = A_t Z_t + B_t,  ∇f(η) = Z_Tᵀ ∇E(w_T). Ways to
compute it (``mode=``):

- ``"reverse"``: adjoint λ_T = ∇_s E(w_T); for t = T−1 … 0,
  (s̄, ḡ, η̄) = ``dyn.cotangent(s_t, g_t, η_t, t, λ_{t+1})``, λ_t = s̄ + H_t ḡ, ∂f/∂η_t = η̄:
  one HVP per step. The forward pass builds each step's gradient g_t with plain autograd
  (``create_graph=True``) and keeps that graph, so H_t ḡ is a second backward through it
  (no activation is recomputed). What is kept is a schedule (:mod:`hgtoolkit.checkpointing`):
  ``checkpoint=None`` keeps every step's graph (fastest, memory T·(state + graph));
  ``checkpoint=k`` keeps every k-th state and rebuilds one segment's graphs at a time;
  ``checkpoint="binomial"`` (``snapshots=c``) is revolve; the default ``"auto"`` takes the
  fastest that fits ``memory=``. All give bit-identical numbers.
- ``"reversible"``: heavy-ball momentum run backwards exactly in fixed point
  (:mod:`hgtoolkit.reversible`, Maclaurin, Duvenaud & Adams 2015): no state stored but
  ≈ T·d·log₂(1/γ) bits, the gradient of each step recomputed in the reverse pass.
- ``"forward"``: the tangent system column by column, z ← ``dyn.tangent(s_t, g_t, η_t, t, z,
  H_t z_w, δ_{jt})``, ``chunk_size`` columns at a time (column j is zero until step j); the
  HVPs of a step share its gradient graph.
- ``"autograd"``: plain ``torch.autograd`` through the unrolled loop (``create_graph=True``), a
  reference independent of the closed-form derivatives.
- :func:`finite_difference`: central differences (f(η+εe_t) − f(η−εe_t)) / 2ε, the last word.

:func:`directional_derivative` gives ∇f(η)·v in one forward pass (one HVP per step).

Why a double backward through the kept graph: it reuses the forward activations and the
backward's intermediates of the training pass (the alternatives and their measurements:
docs/performance.md, "Measurements behind the design choices").
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpointing as _ckpt
from . import dynamics as _dynamics
from . import fastpaths as _fastpaths
from . import records
from . import settings as _settings
from ._step import Step as _Step, add_w as _add_w, objective as _objective, probe as _probe
from ._tree import tree_map
from .carried import advance_columns, state_dot
from .divergence import VALIDATION_LOSS, check_finite
from .reversible import reversible_reverse
from .trajectory import (BUFFERS, check_lrs, check_pure, initial_state, opt_part, progress_bar, scalar_loss,
                         stateful_loss, train, with_buffers)

__all__ = ["HypergradResult", "hypergradient", "hypergradient_rows", "directional_derivative", "finite_difference",
           "MODES", "REVERSE_ONLY", "for_mode"]

#: The ways to compute ∇f(η) (the choices of :class:`~hgtoolkit.settings.ExactSettings`' ``mode``).
MODES = _settings.specs(_settings.ExactSettings)["mode"][1].choices


@records.register("hypergradient", version=1, params="params",
                  redo="recompute it: `hgtoolkit.hypergradient(problem, lrs)` and `hgtoolkit.save(result, path)`")
@dataclass
class HypergradResult:
    """f(η) = ``value`` = E(w_T); ``grad``[t] = ∂f/∂η_t; ``params`` = w_T. A record
    (:func:`hgtoolkit.save` / :func:`hgtoolkit.load`: tensors come back as tensors, bit for bit)."""

    value: torch.Tensor
    grad: torch.Tensor
    params: Any
    lrs: torch.Tensor
    train_losses: torch.Tensor
    mode: str
    optimizer: dict = field(default_factory=dict)
    #: reverse modes: the schedule run ("stored", "every k", "binomial", "reversible")
    schedule: str | None = None
    #: training states (snapshots, s_0 included) held at once by the schedule in memory
    snapshots: int | None = None
    #: binomial with ``disk=``: snapshots held on disk at once (0: the disk tier was not needed)
    disk_snapshots: int | None = None
    #: forward steps run beyond one training pass (0 when every step is stored)
    recomputed_steps: int | None = None
    #: bytes the schedule was predicted to hold (docs/memory.md), and the budget it was chosen for
    memory_estimate: int | None = None
    memory_budget: int | None = None
    #: largest growth of the process's memory over its start (CPU: resident set size, CUDA:
    #: bytes allocated), sampled after every step of the schedule, in bytes
    peak_memory: int | None = None
    #: mode="reversible": bytes of the information buffer at the end of the forward pass
    buffer_bytes: int | None = None
    #: a stateful problem's buffers b_T (docs/models.md), None otherwise
    buffers: Any = None

    def save(self, path) -> Path:
        """:func:`hgtoolkit.save` (JSON + npz + the parameters, checksummed); returns the JSON path."""
        return records.save(self, path)

    @classmethod
    def load(cls, path) -> "HypergradResult":
        """:func:`hgtoolkit.load` of a ``hypergradient`` record."""
        return records.load(path, kind="hypergradient")

    def __repr__(self) -> str:
        return (f"HypergradResult(mode={self.mode!r}, T={len(self.lrs)}, value={float(self.value):.6g}, "
                f"|grad|={float(self.grad.norm()):.6g})")


def _reverse(problem, dyn, lrs, checkpoint, snapshots, memory, progress, disk=None):
    T = len(lrs)
    s0 = initial_state(problem, dyn)
    device = lrs.device
    sampler = _ckpt.MemorySampler(device)
    losses = torch.empty(T, dtype=lrs.dtype, device=device)
    started = time.perf_counter()
    first, fp = _probe(problem, dyn, s0)
    probe_s = time.perf_counter() - started  # one step with its graph: the disk tier's unit of time
    limit, how = _ckpt.budget(memory, device)
    tier = _ckpt.disk_budget(disk)
    if tier is not None:
        tier = _ckpt.measure_io(tier, s0, probe_s, device)
    plan = _ckpt.plan(T, fp, checkpoint, snapshots, limit, tier)
    fbar = progress_bar(None, progress, desc="forward", total=T, leave=False)
    bar = progress_bar(None, progress, desc="backward", total=T, leave=False)

    def advance(state, t, graph):
        nonlocal first
        if t == 0 and first is not None and state is s0:  # the probe is step 0
            st, first = first, None
        else:
            st = _Step(problem, dyn, state, t, graph)
        check_finite(st.loss, t)
        losses[t] = st.loss
        # a step kept for the reverse pass: s_{t+1} on demand (checkpointing.run), as the
        # schedule mostly restores a snapshot next
        new = (lambda: st.advance(dyn, lrs[t], t)) if graph else st.advance(dyn, lrs[t], t)
        if hasattr(fbar, "update"):
            fbar.update()
        return new, (st if graph else None)

    out = {}

    def begin(final):
        lam, value = _objective(problem, dyn, final)
        check_finite(value, T - 1, dyn.params(final), VALIDATION_LOSS)
        out.update(lam=lam, value=value, final=final)

    grads = torch.empty(T, dtype=lrs.dtype, device=device)

    def adjoint(st, t):
        lam = out["lam"]
        if st.buffers is None:
            out["lam"], lbar = _adjoint_step(dyn, st, lrs[t], t, lam)
        else:  # λ_t = (s̄ + H_t ḡ + (∂b'/∂w)ᵀb̄', (∂g/∂b)ᵀḡ + (∂b'/∂b)ᵀb̄')
            sbar, gbar, lbar = dyn.cotangent(st.state, st.grad, lrs[t], t, opt_part(lam))
            hw, bbar = st.pullback(gbar, lam[BUFFERS])
            out["lam"] = with_buffers(_add_w(sbar, hw), bbar)
        grads[t] = lbar
        if hasattr(bar, "update"):
            bar.update()

    if plan.disk:
        with _ckpt.DiskSnapshots(tier, device) as store:
            stats = _ckpt.run(plan.actions(), s0, advance, begin, adjoint, sampler, store)
    else:
        stats = _ckpt.run(plan.actions(), s0, advance, begin, adjoint, sampler)
    first = None
    for b in (fbar, bar):
        if hasattr(b, "close"):
            b.close()
    if not bool(torch.isfinite(grads).all()):
        raise FloatingPointError("the hypergradient has non-finite entries although training stayed finite")
    info = {"schedule": plan.kind if plan.kind != "every" else f"every {plan.k}",
            "snapshots": stats.snapshots, "recomputed_steps": stats.forward_steps - T,
            "disk_snapshots": stats.disk_snapshots if tier is not None else None,
            "memory_estimate": plan.estimate, "memory_budget": limit, "peak_memory": sampler.peak,
            "buffers": out["final"].get(BUFFERS)}
    return out["value"], grads, dyn.params(out["final"]), losses, info


def _adjoint_step(dyn, st: _Step, lr, t: int, lam: dict, rows: bool = False):
    r"""One step of the reverse pass, the one adjoint recursion of :func:`hypergradient` and
    :func:`hypergradient_rows`: (λ_t, ∂f/∂η_t) = (s̄ + H_t ḡ, η̄) with (s̄, ḡ, η̄) =
    ``dyn.cotangent(s_t, g_t, η_t, t, λ_{t+1})``, H_t ḡ = ``st.hvp(ḡ)`` (for SGD in place on
    λ_{t+1}: :func:`hgtoolkit.fastpaths.adjoint_in_place`). ``rows``: the state
    holds runs as rows, η_t per row, η̄ per row (:func:`hgtoolkit.fastpaths.cotangent`)."""
    if not rows:  # SGD: in place on λ_{t+1}, which the reverse pass owns
        fast = _fastpaths.adjoint_in_place(dyn, st.state, st.grad, lr, lam, st.hvp)
        if fast is not None:
            return fast
    sbar, gbar, lbar = _fastpaths.cotangent(dyn, st.state, st.grad, lr, t, lam, rows=rows)
    return _add_w(sbar, st.hvp(gbar)), lbar


def _tangent_pass(problem, dyn, state, lrs, cols, t0=0, progress=False):
    r"""From s_{t0}, propagate the tangents of ``cols`` to step T: an int j is column j of Z
    (z_{t+1} = A_t z_t + δ_{jt} B_t, zero before step j), a callable v the direction
    z_{t+1} = A_t z_t + v(t) B_t. Returns (s_T, [z_T per column], train losses)."""
    T = len(lrs)
    z = [None] * len(cols)
    first = [0 if callable(j) else j for j in cols]
    losses = torch.empty(T - t0, dtype=lrs.dtype, device=lrs.device)
    for t in progress_bar(range(t0, T), progress, desc="tangents", leave=False):
        live = [i for i, j in enumerate(first) if j <= t]
        st = _Step(problem, dyn, state, t, graph=any(z[i] is not None for i in live))
        check_finite(st.loss, t)
        losses[t - t0] = st.loss
        new = None
        dlrs = [cols[i](t) if callable(cols[i]) else (1.0 if cols[i] == t else None) for i in live]
        if st.buffers is not None:  # the buffers' tangents too (docs/models.md)
            new, out = advance_columns(st, dyn, lrs[t], t, [z[i] for i in live], dlrs)
            for i, zi in zip(live, out):
                z[i] = zi
        else:
            for n, (i, dlr) in enumerate(zip(live, dlrs)):
                hz = st.hvp(z[i]["w"] if z[i] is not None else None, retain=n + 1 < len(live))
                new, z[i] = _fastpaths.tangent(dyn, st.state, st.grad, lrs[t], t, z[i], hz, dlr)
        state = new if new is not None else st.advance(dyn, lrs[t], t)
    return state, z, losses


_dot_w = state_dot  # ⟨∇_s E, z⟩, the buffers' part included (hgtoolkit.carried)


def _forward(problem, dyn, lrs, chunk_size, progress):
    T = len(lrs)
    C = T if chunk_size is None else chunk_size
    grads = torch.empty(T, dtype=lrs.dtype, device=lrs.device)
    # One plain pass stores the states where chunks start (replaying only what is needed).
    starts = list(range(0, T, C))
    state, start_states, losses = initial_state(problem, dyn), {}, torch.empty_like(lrs)
    for t in range(T):
        if t in starts:
            start_states[t] = state
        st = _Step(problem, dyn, state, t, graph=False)
        check_finite(st.loss, t)
        losses[t] = st.loss
        state = st.advance(dyn, lrs[t], t)
    final = state
    lam, value = _objective(problem, dyn, final)
    check_finite(value, T - 1, dyn.params(final), VALIDATION_LOSS)
    for c0 in progress_bar(starts, progress, desc="forward-mode chunks", leave=False):
        cols = list(range(c0, min(c0 + C, T)))
        _, Z, _ = _tangent_pass(problem, dyn, start_states.pop(c0), lrs, cols, t0=c0)
        for j, z in zip(cols, Z):
            grads[j] = _dot_w(lam, z)
    return value, grads, dyn.params(final), losses, {"buffers": final.get(BUFFERS)}


def _autograd(problem, dyn, lrs, progress):
    T = len(lrs)
    eta = lrs.clone().requires_grad_(True)
    state = dyn.init(tree_map(lambda p: p.clone().requires_grad_(True), problem.params0))
    buffers = getattr(problem, "buffers0", None)
    losses = []
    for t in progress_bar(range(T), progress, desc="autograd", leave=False):
        w = dyn.params(state)
        if buffers is None:
            loss = scalar_loss(problem.train_loss, "train_loss")(w, t)
        else:  # b_{t+1} keeps its graph: E(w_T, b_T) is differentiated through it
            loss, buffers = stateful_loss(problem.train_loss)(w, t, buffers)
        check_finite(loss, t)
        leaves, spec = torch.utils._pytree.tree_flatten(w)
        g = torch.autograd.grad(loss, leaves, create_graph=True)
        state = dyn.step(state, torch.utils._pytree.tree_unflatten(list(g), spec), eta[t], t)
        losses.append(loss.detach())
    value = scalar_loss(problem.val_loss, "val_loss")(dyn.params(state), *(() if buffers is None else (buffers,)))
    check_finite(value, T - 1, dyn.params(state), VALIDATION_LOSS)
    (grads,) = torch.autograd.grad(value, eta)
    info = {} if buffers is None else {"buffers": tree_map(lambda b: b.detach(), buffers)}
    return value.detach(), grads, tree_map(lambda p: p.detach(), dyn.params(state)), torch.stack(losses), info


@_settings.takes(_settings.ExactSettings)
def hypergradient(problem, lrs: Any, optimizer: "str | _dynamics.Dynamics" = "sgd",
                  mode: str = "reverse", *, progress: bool = False, disk: Any = None,
                  **settings: Any) -> HypergradResult:
    """Exact ∇f(η) for the whole schedule ``lrs`` (η_0 … η_{T−1}), f(η) = E(w_T).

    The settings (``optimizer``, ``mode``, ``checkpoint``, ``snapshots``, ``memory``,
    ``chunk_size``) are those of :class:`~hgtoolkit.settings.ExactSettings`, each checked by
    its declaration; ``mode`` is one of :data:`MODES` (a numerical check:
    :func:`finite_difference`).

    Reverse mode's memory (:mod:`hgtoolkit.checkpointing`, docs/memory.md): ``checkpoint=None``
    stores every step, an int k keeps every k-th state, ``"binomial"`` runs revolve with
    ``snapshots`` states; ``"auto"`` (default) picks the fastest of them that fits ``memory``
    (bytes, "2GB", or "auto" = half the device's free memory, cgroup limit included; None =
    "auto"). A schedule that does not fit is refused (:class:`~hgtoolkit.checkpointing.
    MemoryBudgetError`) before any step beyond the first. ``disk=True`` (a temporary directory)
    or ``disk="dir"`` adds a disk tier: binomial snapshots that do not fit in memory are written
    there (checksummed ``torch.save`` files, removed afterwards). ``mode="reversible"`` (heavy-ball
    momentum only, :mod:`hgtoolkit.reversible`) runs training backwards instead.

    >>> import hgtoolkit, torch
    >>> p = hgtoolkit.problems.from_function("beale")
    >>> r = hgtoolkit.hypergradient(p, torch.full((50,), 1e-3))
    >>> r.grad.shape
    torch.Size([50])
    """
    table = _settings.specs(_settings.ExactSettings)
    _ckpt.reject_removed({k: v for k, v in settings.items() if k not in table}, "hypergradient")
    s = _settings.check(_settings.ExactSettings, _settings.bind(
        _settings.ExactSettings, {"optimizer": optimizer, "mode": mode, **settings}, "hypergradient"))
    mode, checkpoint, snapshots, memory, chunk_size = (s[k] for k in ("mode", "checkpoint", "snapshots",
                                                                       "memory", "chunk_size"))
    dyn = _dynamics.get(s["optimizer"])
    lrs = check_lrs(lrs, problem)
    check_pure(problem)
    if mode != "reverse" and (checkpoint != "auto" or snapshots is not None):
        raise ValueError(f"checkpoint=/snapshots= schedule the reverse pass of mode='reverse'; "
                         f"mode={mode!r} has none")
    if mode in ("forward", "autograd") and memory is not None:
        raise ValueError(f"memory= applies to mode='reverse' or 'reversible', not {mode!r}")
    if mode != "reverse" and disk is not None and disk is not False:
        raise ValueError(f"disk= holds the snapshots of mode='reverse'; mode={mode!r} has none")
    _ckpt.check_checkpoint(checkpoint, snapshots, disk)
    info = {}
    if mode == "reverse":
        value, grads, params, losses, info = _reverse(problem, dyn, lrs, checkpoint, snapshots, memory, progress,
                                                      disk)
    elif mode == "reversible":
        value, grads, params, losses, info = reversible_reverse(problem, dyn, lrs, memory, progress)
    elif mode == "forward":
        value, grads, params, losses, info = _forward(problem, dyn, lrs, chunk_size, progress)
    else:
        value, grads, params, losses, info = _autograd(problem, dyn, lrs, progress)
    return HypergradResult(value, grads.detach(), params, lrs, losses, mode, dyn.config(), **info)


def hypergradient_rows(problem, paths: "list[np.ndarray]", schedules: "list[np.ndarray]",
                       horizons: "list[int]") -> "list[tuple[np.ndarray, float] | None]":
    r"""The exact hypergradients g_t = ∂f(w_T)/∂η_t (t < T) of plain gradient descent
    w_{t+1} = w_t − η_t ∇L_t(w_t), f = E(w_T), for many (path, schedule, horizon T) at once:
    :func:`hypergradient`'s reverse pass (its one adjoint step, λ_T = ∇E(w_T),
    λ_t = λ_{t+1} + H_t(−η_t λ_{t+1}), g_t = −λ_{t+1}·∇L_t(w_t)) with every (path, T) a row of
    one row-wise computation (``fastpaths.cotangent`` with ``rows``: η_t and the dot per row). The
    problem is row-wise with closed-form derivatives (a test function,
    :func:`hgtoolkit.problems.from_function`); the numbers agree with :func:`hypergradient`'s
    to rounding (≤ 1e-12 relative, ``tests/test_exact.py``). ``paths[i]``: w_0 … w_n of
    ``schedules[i]`` (η_0 … η_{n−1}; the explorer's replay), ``horizons[i]`` ≤ n. The forward
    pass is not rerun: each step's gradient and Hessian are evaluated at the given w_t.
    Returns ``(g_0 … g_{T−1}, E(w_T))`` per row, None where g or E is not finite."""
    from .trajectory import closed_form, rowwise_gradient_hvp
    R = len(paths)
    if not R:
        return []
    if closed_form(problem.train_loss, problem.params0) is None:
        raise TypeError("hypergradient_rows: problem.train_loss must have closed-form derivatives "
                        "(a test function: problems.from_function(name))")
    dyn = _dynamics.SGD()
    T = np.asarray(horizons, dtype=int)
    order = np.argsort(-T, kind="stable")  # by horizon, longest first: the rows alive at t are a prefix
    Tmax = int(T.max())
    W = np.full((Tmax + 1, R, 2), np.nan)
    eta = np.zeros((R, Tmax))
    for j, i in enumerate(order):
        W[:T[i] + 1, j] = paths[i][:T[i] + 1]
        eta[j, :T[i]] = schedules[i][:T[i]]
    W = torch.as_tensor(W, dtype=problem.dtype, device=problem.device)
    eta = torch.as_tensor(eta, dtype=problem.dtype, device=problem.device)
    Ts = torch.as_tensor(T[order], device=problem.device)
    lam, value = rowwise_gradient_hvp(problem.val_loss, W[Ts, torch.arange(R)], None)[:2]
    grads = torch.zeros((R, Tmax), dtype=problem.dtype, device=problem.device)
    alive = np.searchsorted(-T[order], -np.arange(Tmax), side="left")  # rows with T > t
    for t in range(Tmax - 1, -1, -1):
        n = int(alive[t])
        st = _Step(problem, dyn, {"w": W[t, :n]}, t, graph=True)
        new, grads[:n, t] = _adjoint_step(dyn, st, eta[:n, t:t + 1], t, {"w": lam[:n]}, rows=True)
        lam[:n] = new["w"]
    grads, value = grads.numpy(force=True), value.numpy(force=True)
    out: list = [None] * R
    for j, i in enumerate(order):
        g = grads[j, :T[i]].copy()
        if np.all(np.isfinite(g)) and np.isfinite(value[j]):
            out[i] = (g, float(value[j]))
    return out


#: The settings only reverse mode has (its pass's schedule and disk tier).
REVERSE_ONLY = ("checkpoint", "snapshots", "disk")


def for_mode(given: dict) -> dict:
    """The settings of ``given`` (those of :class:`~hgtoolkit.settings.HypergradSettings` or
    more) that :func:`hypergradient` takes for ``given["mode"]``: a grid's or the command line's
    reverse-pass schedule (:data:`REVERSE_ONLY`) is left out for the other modes, which have none."""
    takes = {*_settings.specs(_settings.ExactSettings), "disk"}
    reverse = given.get("mode", "reverse") == "reverse"
    return {k: v for k, v in given.items() if k in takes and (reverse or k not in REVERSE_ONLY)}


def directional_derivative(problem, lrs: Any, direction: Any,
                           optimizer: "str | _dynamics.Dynamics" = "sgd") -> tuple[torch.Tensor, torch.Tensor]:
    """(f(η), ∇f(η)·v) in one forward pass: z_{t+1} = A_t z_t + B_t v_t, ∇f·v = ∇E(w_T)·z_T
    (one HVP H_t z_w per step, a double backward through the step's gradient graph)."""
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)
    v = check_lrs(direction, problem, argname="direction", allow_negative=True)
    check_pure(problem)
    if v.shape != lrs.shape:
        raise ValueError(f"direction must have the schedule's shape {tuple(lrs.shape)}, got {tuple(v.shape)}")
    state, (z,), _ = _tangent_pass(problem, dyn, initial_state(problem, dyn), lrs, [lambda t: v[t]])
    lam, value = _objective(problem, dyn, state)
    check_finite(value, len(lrs) - 1, dyn.params(state), VALIDATION_LOSS)
    return value, _dot_w(lam, z).detach()


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
    check_pure(problem)
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
