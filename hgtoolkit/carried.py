r"""A stateful problem's buffers b_t along an online run, with their tangent (docs/models.md).

For a problem with buffers (``Problem.buffers0``, e.g. BatchNorm's running statistics) the
online state is s_t = (w_t, optimizer moments, b_t) and step t's forward pass is
(L_t, b_{t+1}) = ``train_loss(w_t, t, b_t)``. The online tangent z_t = (z_{t,opt}, z_{t,b})
follows the whole state::

    (dg, db') = jvp of (g_t, b_{t+1}) along (z_{t,w}, z_{t,b})     # H_t z_w + ∂g/∂b z_b, ∂b'/∂(w, b) z
    z_{t+1,opt} = μ_t (∂D/∂s z_{t,opt} + ∂D/∂g dg) + ∂D/∂η          # the engine, with dg as its "H_t z_w"
    z_{t+1,b}   = μ_t db'                                            # b_{t+1} does not depend on η_t: B_t has no b part
    h_t = ⟨∇_w E(w_t, b_t), z_{t,w}⟩ + ⟨∇_b E(w_t, b_t), z_{t,b}⟩     # E in eval mode reads b

so RTHO (μ = 1) with a constant schedule is the exact forward-mode derivative, the path through
the running statistics included. The jvp is the one of the exact forward mode
(:meth:`hgtoolkit._step.Step.pushforward`: the vjp of the vjp of the kept graph). HD (μ ≡ 0)
has z_{t,b} = 0 and needs none of it: its run reads b_t and nothing more.

With ``objective="train"`` h_t = ⟨v_t, z_{t,w}⟩ + ⟨∂L_t/∂b_t, z_{t,b}⟩ with v_t = ∇_w L_t(w_t, b_t)
(+ wd·w_t, regularised): the buffers' share comes from the same backward pass as g_t (zero for
BatchNorm, whose training pass reads the batch statistics, not the running ones; not zero for a
training loss that reads its buffers).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import fastpaths as _fastpaths
from ._step import Step, objective as step_objective
from ._tree import tree_dot, tree_leaves
from .drive import BufferShare
from .trajectory import BUFFERS, autograd_gradient, float_leaves, opt_part, scalar_loss, stateful_loss, with_buffers

__all__ = ["CarriedBuffers", "buffer_tangent", "advance_columns", "state_dot"]


class CarriedBuffers:
    """A mixin over a runs object of :func:`hgtoolkit.drive.drive` constructed as ``(problem,
    engine, *args)`` (a single online run of :mod:`hgtoolkit.online`, the replayed schedule of
    :func:`hgtoolkit.analysis.exact_references`): it carries b_t (and,
    when μ may be ≠ 0, z_{t,b}; module docstring) and hands the run a stateless view of the
    problem whose ``val_loss(w)``/``metrics(w)``/``train_loss(w, t)`` read b_t.

    ``buffers`` = b_t; ``tangent_b`` = z_{t,b} (a list over the floating-point leaves of b, None
    while it is zero)."""

    def __init__(self, problem, engine, *args: Any) -> None:
        self.source, self.buffers, self._next, self._db, self._share = problem, problem.buffers0, None, None, None
        self.tangent_b = None
        loss, metrics = stateful_loss(problem.train_loss), problem.metrics
        view = dataclasses.replace(
            problem, train_loss=lambda w, t: loss(w, t, self.buffers)[0],
            val_loss=lambda w: problem.val_loss(w, self.buffers), buffers0=None,
            metrics=None if metrics is None else (lambda w: metrics(w, self.buffers)))
        super().__init__(view, engine, *args)

    def _state(self, w: Any) -> dict:
        return {"w": w, BUFFERS: self.buffers}

    def gradient(self, w, z_w, t):
        """(g_t, L_t, dg) with dg = H_t z_w + ∂g/∂b z_b (for ``z_w`` not None, with db' kept for
        :meth:`update`); b_{t+1} kept for :meth:`record`."""
        train_share = self.tangent_b is not None and self.engine.objective != "val"
        st = Step(self.source, self.engine.dynamics, self._state(w), t, graph=z_w is not None, loss_b=train_share)
        self._next, dg = st.buffers, None
        self._share = tree_dot(st.loss_b, self.tangent_b) if train_share else None
        if z_w is not None:
            dg, self._db = st.pushforward(z_w, self.tangent_b)
        return st.grad, st.loss, dg

    def val_gradient(self, w) -> tuple[Any, torch.Tensor]:
        """(v, E(w, b_t)): v = ∇_w E(w, b_t), or once z_{t,b} ≠ 0 the
        :class:`~hgtoolkit.drive.BufferShare` (∇_w E, ⟨∇_b E(w, b_t), z_{t,b}⟩)."""
        if self.tangent_b is None:
            return autograd_gradient(scalar_loss(self.problem.val_loss, "val_loss"), w)
        lam, value = step_objective(self.source, self.engine.dynamics, self._state(w))
        return BufferShare(lam["w"], tree_dot(lam[BUFFERS], self.tangent_b)), value

    def objective(self, w, t, g, loss):
        """v_t with the buffers' share of h_t once z_{t,b} ≠ 0 (:meth:`val_gradient`; for
        ``objective="train"`` ``BufferShare(None, ⟨∂L_t/∂b_t, z_{t,b}⟩)``, the share of step t's
        :meth:`gradient`: the engine's training v_t goes with it); else the run's own v_t."""
        if self.tangent_b is None:
            return super().objective(w, t, g, loss)
        if self.engine.objective != "val":
            return BufferShare(None, self._share), None
        return self.val_gradient(w)

    def update(self, state, oracle, t):
        """The engine's step, then z_{t+1,b} = μ_t db' (:func:`buffer_tangent`; μ_t: the μ the
        step used)."""
        state, aux = super().update(state, oracle, t)
        if self._db is not None:
            db, self._db = self._db, None
            self.tangent_b = buffer_tangent(db, None if self.engine.unit_mu else state.mu)
        return state, aux

    def record(self, t, state, aux, pending):
        """b_{t+1} becomes the run's b (after step t), then the run's own record."""
        self.buffers = self._next
        return super().record(t, state, aux, pending)


def buffer_tangent(db: list, mu: Any, rows: bool = False) -> list:
    r"""z_{t+1,b} = μ_t db' (module docstring): ``db`` the buffers' jvp db' (a list over their
    floating-point leaves), ``mu`` the μ_t of the step (None: μ ≡ 1, db' itself); ``rows``: runs
    along a leading axis, μ_t one per run (shape (R,)). Shared by the single run
    (:class:`CarriedBuffers`) and the batched one (:mod:`hgtoolkit.batched`)."""
    if mu is None:
        return list(db)
    plan = _fastpaths.Plan(rows=rows)
    return [x * plan.per_row(mu.to(x.dtype), x) for x in db]


def advance_columns(st: Step, dyn, lr: Any, t: int, columns: list, dlrs: list) -> tuple[dict | None, list]:
    r"""Step t of a stateful problem with tangent columns: z' = (∂D/∂s z_opt + ∂D/∂g dg + B_t·dlr,
    db') for each column z = (optimizer tangent, ``z[BUFFERS]`` a list over the float leaves of
    b, None entries zero) or None (zero), (dg, db') the jvp of (g_t, b_{t+1}) along (z_w, z_b)
    (:meth:`Step.pushforward` of ``st``, built with its graph when some column is not None), dlr
    the tangent of η_t (None: no B_t). Returns (s_{t+1} with b_{t+1}, None for no columns; the
    new columns). Shared by the exact forward mode and the truncated horizons."""
    new, out = None, []
    for n, (z, dlr) in enumerate(zip(columns, dlrs)):
        if z is None:  # (dg, db') = 0 along a zero tangent
            dg, db = None, [None] * len(float_leaves(st.buffers)[2])
        else:
            dg, db = st.pushforward(z["w"], z[BUFFERS], retain=n + 1 < len(columns))
        new, zo = _fastpaths.tangent(dyn, st.state, st.grad, lr, t, None if z is None else opt_part(z), dg, dlr)
        out.append(with_buffers(zo, db))
    return (None if new is None else with_buffers(new, st.buffers)), out


def state_dot(lam: dict, z: dict) -> torch.Tensor:
    """⟨∇_s E, z⟩ = ⟨∇_w E, z_w⟩ (E depends on w only), + ⟨∇_b E, z_b⟩ for a stateful problem
    (``lam`` of :func:`hgtoolkit._step.objective`; None entries of z are zero)."""
    a, b = tree_leaves(lam["w"]), tree_leaves(z["w"])
    if BUFFERS in lam:
        a, b = a + lam[BUFFERS], b + z[BUFFERS]
    return sum((x * y.to(x.dtype)).sum() for x, y in zip(a, b) if y is not None)
