r"""The one loop over t of the online recursion (:class:`hgtoolkit.online.Engine`) and of the
towers (:class:`hgtoolkit.towers.TowerMethod`).

Every driven use of a method — a single online run (:func:`hgtoolkit.online.run`), R runs
stacked along a leading axis (:mod:`hgtoolkit.batched`: the same step under ``vmap``, or
natively on row-wise problems), a prescribed schedule replayed to read its derivatives
(:func:`hgtoolkit.analysis.exact_references`) and a tower run (:func:`hgtoolkit.towers.run`) —
is :func:`drive` with a different :class:`Runs`: what the loop asks of the problem and what it
keeps. The method (``engine``) has ``dynamics`` (w_t = ``dynamics.params(state.opt)``),
``needs_hvp`` (z_{t,w} = ``dynamics.params(state.z)`` is passed when True) and the update.
Step t is

    (g_t, L_t, H_t z_{t,w}) = runs.gradient(w_t, z_{t,w} if μ may be ≠ 0 and t > 0, t)
    (v_t, E(w_t))           = runs.objective(w_t, t, g_t, L_t)      # (None, None) when not needed
    pending                 = runs.evaluate(t, w_t, E(w_t))          # every ``eval_every`` steps
    state, aux              = runs.update(state, Oracle(g_t, L_t, H_t z, v_t, E(w_t)), t)
    state                   = runs.record(t, state, aux, pending)    # None: every run stopped

and after step T−1, ``runs.close(state, T)`` — for the online runs :func:`closing_update`, the
last hyper-update (h_T, η_T) from v_T. The drop-in optimizers (:mod:`hgtoolkit.optim`) live
in the user's loop: they share the engine's update (its pieces ``hyper_update``,
``check_loss``, ``optimizer_step``), not this loop; so does the towers' drop-in
(:class:`hgtoolkit.towers.TowerOptimizer` calls :meth:`TowerMethod.update`). The method is the
engine: ``init(params, settings) -> state`` and ``update(state, oracle, t) -> (state, aux)``
(the optax shape). :func:`hgtoolkit.hdm.run` keeps its own loop (docs/architecture.md: its
oracle is called at a trial point the step chooses, not at w_t before it).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

from .trajectory import progress_bar

__all__ = ["Oracle", "BufferShare", "Runs", "drive", "closing_update"]


class Oracle(NamedTuple):
    """What the problem says of w_t to step t of :meth:`hgtoolkit.online.Engine.update`: ``grad`` = g_t =
    ∇L_t(w_t), ``loss`` = L_t(w_t), ``hvp`` = H_t z_{t,w} (needed when μ may be ≠ 0 and t > 0,
    else None), ``v`` = v_t, the objective's gradient at w_t (``objective="val"``, t > 0; None
    for "train": the training gradient), ``value`` = E(w_t) where it comes with v_t (else None)."""

    grad: Any
    loss: torch.Tensor
    hvp: Any = None
    v: Any = None
    value: Any = None


class BufferShare(NamedTuple):
    r"""``Oracle.v`` of a stateful problem's run whose tangent has a buffers part z_{t,b}
    (docs/models.md): ``grad`` = ∇_w E(w_t, b_t), and ``share`` = ⟨∇_b E(w_t, b_t), z_{t,b}⟩,
    the running statistics' part of h_t = ⟨∇_s E, z_t⟩ = ⟨∇_w E, z_{t,w}⟩ + ``share``. For
    ``objective="train"`` E is L_t and ``grad`` is None: the engine's own training v_t
    (:meth:`hgtoolkit.online.Engine.objective_gradient`) goes with the share."""

    grad: Any
    share: Any


class Runs(Protocol):
    """What :func:`drive` asks of one run or of a stack of runs (module docstring)."""

    def gradient(self, w: Any, z_w: Any, t: int) -> tuple[Any, Any, Any]:
        """(g_t, L_t, H_t z_w): the training gradient, loss and — for ``z_w`` not None — the
        Hessian-vector product along z_w (None otherwise)."""

    def objective(self, w: Any, t: int, g: Any, loss: Any) -> tuple[Any, Any]:
        """(v_t, E(w_t)): the objective's gradient where step t needs it (else None), and the
        objective's value where it comes with it (else None); ``g``/``loss`` of step t or None."""

    def evaluate(self, t: int, w: Any, value: Any) -> Any:
        """What an evaluation at w_t records (kept by :meth:`record` for runs still fine)."""

    def update(self, state: Any, oracle: Any, t: int) -> tuple[Any, dict]:
        """:meth:`Engine.update` (mapped over the runs)."""

    def record(self, t: int, state: Any, aux: dict, pending: Any) -> Any:
        """Keep step t's ``aux`` (and ``pending``); the state to go on with, None to stop."""

    def close(self, state: Any, steps: int) -> Any:
        """After the last step."""


def drive(engine: Any, runs: Runs, state: Any, steps: int, *, eval_every: int | None = None,
          progress: bool = False, desc: str = "online",
          postfix: Callable[[dict, Any], dict] | None = None) -> Any:
    """Run steps t = 0 … ``steps``−1 of ``engine`` through ``runs`` from ``state`` (module
    docstring), then ``runs.close``; returns the last state (None if every run stopped).
    ``eval_every``: call ``runs.evaluate`` at every multiple of it (None: never);
    ``postfix(aux, state)``: the progress bar's postfix every ten steps."""
    dyn = engine.dynamics
    bar = progress_bar(range(steps), progress, desc=desc, leave=False)
    try:
        for t in bar:
            w = dyn.params(state.opt)
            z_w = dyn.params(state.z) if engine.needs_hvp and t > 0 else None
            g, loss, hvp = runs.gradient(w, z_w, t)
            v, value = runs.objective(w, t, g, loss)
            # evaluated before the step, which may write w_{t+1} over w_t (a donating engine)
            pending = runs.evaluate(t, w, value) if eval_every and t % eval_every == 0 else None
            state, aux = runs.update(state, Oracle(g, loss, hvp, v, value), t)
            state = runs.record(t, state, aux, pending)
            if state is None:
                return None
            if progress and postfix is not None and t % 10 == 0:
                bar.set_postfix(**postfix(aux, state), refresh=False)
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return runs.close(state, steps)


def closing_update(engine: Any, runs: Runs, state: Any, steps: int,
                   mapped: Callable[[Callable], Callable] = lambda f: f) -> tuple[Any, Any, Any]:
    r"""The losses at w_T and v_T of an online run after its last step, T = ``steps``:
    returns (state checked for divergence at T, v_T, E(w_T) or None), with v_T the objective's
    gradient ("val") or the training gradient of minibatch T ("train": the run's one extra
    gradient; with weight decay regularised as :meth:`Engine.objective_gradient`). ``mapped``
    maps the engine's functions over the runs (``vmap`` for a stack). The caller then applies
    :meth:`Engine.finish` (h_T, η_T) to the runs still fine."""
    w = engine.dynamics.params(state.opt)
    if engine.objective == "train":
        g, loss, _ = runs.gradient(w, None, steps)
        state = mapped(lambda s, l: engine.check_loss(s, l, None, steps))(state, loss)
        extra, _ = runs.objective(w, steps, g, loss)  # a stateful run's share through its buffers
        share = (extra.share,) if isinstance(extra, BufferShare) else ()
        return state, mapped(engine.objective_gradient)(state, g, *share), None
    v, value = runs.objective(w, steps, None, None)
    if value is not None:
        state = mapped(lambda s, e: engine.check_loss(s, e, e, steps))(state, value)
    return state, v, value
