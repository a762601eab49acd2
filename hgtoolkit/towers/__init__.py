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
   (everything else of that step held fixed): :func:`hgtoolkit.hyperstep.hypergradient` of
   level k−1's previous update w.r.t. its hyperparameters, from that update's stored inputs,
   applied to G^{k−1}_t (times φ'(x); closed form where the dynamics has one). For the SGD
   learning rate ∂w_t/∂η = −g_{t−1}, so G¹_t = −g_t·g_{t−1}: exactly HD (Baydin et al.).
   At t = 0 every Gᵏ_0 = 0.
2. top-down, every level's update, each using the values just produced by the level above:

       x_k ← O_k(x_k, Gᵏ_t; hyperparameters φ(x_{k+1}))   (projected for k ≥ 1),

   :func:`hgtoolkit.hyperstep.level_update`. Every level is the same step (the one
   :mod:`hgtoolkit.hdm` and, in forward mode, HD in :mod:`hgtoolkit.online` are built from):
   a tower is a chain of it, as ``optax.inject_hyperparams`` chains optimizers.

   The base update of w comes last, so (as in HD) a learning rate is updated *before* the
   step that uses it.

Only the previous update's inputs are kept (level 0: its gradient and moments; w too when
weight decay is on): no autograd graph outlives a step, and memory does not grow with the
number of steps (reverse mode over a recomputed step; why not forward mode:
docs/performance.md).

Three ways to use a tower:

- functional core: ``state = tower.init(params)``, ``state = tower.step(state, grad, t)``
  (pure functions over pytrees; :func:`init`, :func:`step`), and the same step in the optax
  shape of every method, :class:`TowerMethod`: ``init(params, settings)`` and
  ``update(state, oracle, t) -> (state, aux)``, which :func:`run` drives through
  :func:`hgtoolkit.drive.drive` and the drop-in calls;
- foundation dynamics: ``tower.dynamics()`` is a :class:`hgtoolkit.dynamics.Dynamics`, so
  ``trajectory.train(problem, torch.ones(T), tower.dynamics())`` runs it and
  ``exact.hypergradient(problem, torch.ones(T), tower.dynamics())`` differentiates through
  the whole adaptive run; the schedule entry c_t multiplies the base LR (c_t = 1: the tower
  as specified). :func:`run` computes the same numbers and records every hyperparameter;
  ``result.replay()`` is the base optimizer with the learnt schedules held fixed, for the
  exact analysis of the learnt LR trajectory (:func:`analyse`);
- drop-in ``torch.optim.Optimizer``: ``opt = tower.optimizer(model.parameters())``, then the
  usual ``loss.backward(); opt.step(); opt.zero_grad()`` (:class:`TowerOptimizer`).

A tower whose hyper-levels all have learning rate 0 is the base optimizer, bit for bit (one
caveat: a tuned Adam β enters ``dynamics.Adam`` as a tensor, and torch rounds β^(t+1) for
t + 1 = 3 differently from Python's float power for some β, e.g. 0.99: a 1-ulp difference).
"""
from __future__ import annotations

from ..errors import moved
from .core import UNIT_INTERVAL, hyperparameters, init, state_divergence, step
from .levels import (KINDS, SGD, AdaGrad, Adam, History, Level, RMSProp, Scheduled, TowerDynamics,
                     TowerMethod, TowerOptimizer, TowerState, parse)
from .training import TowerResult, analyse, run

__all__ = ["Level", "SGD", "Adam", "AdaGrad", "RMSProp", "parse", "init", "step",
           "hyperparameters", "TowerDynamics", "TowerMethod", "TowerState", "Scheduled", "History", "TowerResult", "run",
           "analyse", "TowerOptimizer", "UNIT_INTERVAL", "KINDS", "state_divergence"]

plot_history = moved("hgtoolkit.towers.plot_history", "hgtoolkit.plotting.plot_tower_history")
