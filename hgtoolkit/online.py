r"""Online learning-rate adaptation: HD, RTHO and MARTHE as configurations of ONE recursion.

All three methods keep one tangent vector z (the derivative of the optimizer state w.r.t. a
learning rate shared by the past steps, discounted by μ) and update η during a single training
run (METHODS.md, "Online methods: one recursion"):

    z_0 = 0
    for t = 0 … T−1:
        z_{t+1} = μ_t·A_t z_t + B_t                 # jvp of Φ_t at (s_t, η_t), tangent (μ_t z_t, 1)
        s_{t+1} = Φ_t(s_t, η_t)                     # primal output of the same jvp
        h_{t+1} = v_{t+1} · z_{t+1}                 # v = ∇E(w_{t+1}) ("val") or ∇L_{t+1}(w_{t+1}) ("train")
        η_{t+1} = max(η_t − β_t h_{t+1}, η_floor)   # η_floor = lr_floor (None: no clipping)
        β_{t+1}, μ_{t+1} = adaptive rules (MARTHE) or constants

- ``method="hd"``: μ ≡ 0, so z_{t+1} = B_t (SGD: −g_t) and h_{t+1} = −v_{t+1}·d_t with d_t the
  update direction. With ``objective="train", lr_floor=None`` this is exactly Baydin et al.'s
  SGD-HD / SGDN-HD / Adam-HD (their α_t = α_{t−1} − β ∇L_t(θ_t)·∇_α u_{t−1} is our
  η_t = η_{t−1} − β h_t, updated before step t with the gradient step t computes anyway).
- ``method="rtho"``: μ ≡ 1 (Franceschi et al. 2017): z_t = dw_t/dη exactly, for the schedule
  held constant — the real-time forward-mode hypergradient.
- ``method="marthe"`` (Donini et al. 2020): μ fixed in [0, 1] or adaptive (``mu="auto"``, the
  rule of :func:`hgtoolkit.marthe.adaptive_mu`, replaceable with ``mu_rule=``), β fixed or
  adaptive (``beta="auto"``: β_{t+1} = max(β_t + κ h_{t+1} h_t, 0), :func:`hgtoolkit.marthe.adaptive_beta`).

Cost per step and why the step is split in two
----------------------------------------------
Φ_t(s, η) = D_t(s, ∇L_t(w), η) with D_t the optimizer update of :mod:`hgtoolkit.dynamics` (an
elementwise function of state and gradient). By the chain rule, the jvp of Φ_t with tangent
(μz, 1) is the jvp of D_t with tangent (μz, μ·H_t z_w, 1), where (g_t, H_t z_w) is ONE
forward-over-reverse ``torch.func.jvp`` of the gradient of L_t — the only model-sized
differentiation in a step; the jvp of D_t costs a few elementwise operations. The split gives
exactly ``trajectory.tangent_step(make_step(...), s, η, t, μz, 1)`` (tested) but exposes g_t
*before* η_t is fixed, which the train objective needs: with ``objective="train"``
h_t = ∇L_t(w_t)·z_t uses the gradient of the very minibatch that step t differentiates anyway,
so per step there is one gradient(+HVP) evaluation and no second training-gradient
evaluation. Since jvp is linear in its tangent, H_t z_w is computed for the unscaled z and
scaled by μ_t afterwards, so μ_t may itself depend on g_t (the MARTHE rule in train mode).
With μ ≡ 0 (HD) the HVP is skipped altogether: a step costs one gradient, as in Baydin et al.

So the hyper-update of iteration t (h_{t+1}, η_{t+1}, β_{t+1}, μ_{t+1}) is done at the start
of step t+1 (and once after the loop for the last one). ``objective="val"`` adds one
validation gradient ∇E(w_{t+1}) per step (its value E(w_{t+1}) is recorded for free);
``objective="train"`` needs one extra training gradient per *run*, ∇L_T(w_T), for the final
h_T that only the record uses.

The record, :class:`OnlineResult`, is a plain data record (numpy arrays + a config dict) that
saves to JSON + npz and loads back.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.func import grad_and_value, jvp

from . import dynamics as _dynamics
from . import marthe as _marthe
from . import records
from ._tree import tree_all_finite, tree_clone, tree_dot, tree_scale, tree_zeros_like
from .errors import DivergenceError, DivergenceWarning
from .trajectory import progress_bar

__all__ = ["OnlineResult", "run", "HyperConfig", "HyperState", "hyper_config", "hyper_update",
           "gradient_and_hvp", "dynamics_tangent", "METHODS", "OBJECTIVES", "DivergenceWarning"]

METHODS = ("hd", "rtho", "marthe")
OBJECTIVES = ("val", "train")

_ARRAYS = ("lrs", "betas", "mus", "hypergrads", "train_losses", "step_times", "eval_steps",
           "val_losses", "val_accuracy")


# ----------------------------------------------------------------------------- the record

@dataclass(repr=False)
class OnlineResult(records.RunRecord):
    r"""One online run. Per-step arrays have one entry per step t = 0 … n−1 that ran
    (n = ``steps_run`` = T, or ``diverged_at`` when the run stopped early):

    - ``lrs[t]`` = η_t, the learning rate step t used;
    - ``mus[t]`` = μ_t, the discount in z_{t+1} = μ_t A_t z_t + B_t;
    - ``hypergrads[t]`` = h_{t+1} = v_{t+1}·z_{t+1}, the estimate formed after step t (the one
      that sets η_{t+1}; ``analysis`` calls this alignment "after_step"); NaN if it could not
      be formed because the run diverged;
    - ``betas[t]`` = β_t, the hyper-LR in η_{t+1} = max(η_t − β_t h_{t+1}, floor);
    - ``train_losses[t]`` = L_t(w_t), the minibatch loss of step t;
    - ``step_times[t]``: seconds since the start of the run when step t had finished.

    Evaluations: ``val_losses[i]`` = E(w_k) for k = ``eval_steps[i]`` (steps taken: 0 is the
    initial point, the last is n), every ``eval_every`` steps; ``val_accuracy`` likewise when
    the problem has ``metrics`` giving "val_accuracy" (else None).

    ``final_lr`` = η_n (after the last update); ``diverged_at`` (None if the run completed):
    the first step that could not be run properly — t when L_t or w_{t+1} is not finite, t+1
    when h_{t+1}, η_{t+1} (|η| > ``lr_max``) or β_{t+1} is bad (then ``hypergrads[t]`` holds
    the offending h; T means only the final update η_T failed); so n = ``diverged_at``;
    ``divergence``: what diverged; ``wall_time``: seconds for the whole run; ``final_params``:
    w_n (a detached pytree) or None; ``config``: everything needed to rerun it (method,
    optimizer, lr0, beta, mu, kappa, …, ``problem`` = ``problem.describe()``).
    """

    config: dict
    lrs: np.ndarray
    betas: np.ndarray
    mus: np.ndarray
    hypergrads: np.ndarray
    train_losses: np.ndarray
    eval_steps: np.ndarray
    val_losses: np.ndarray
    val_accuracy: np.ndarray | None = None
    step_times: np.ndarray | None = None
    final_lr: float = math.nan
    diverged_at: int | None = None
    divergence: str | None = None
    wall_time: float = 0.0
    final_params: Any = None

    KIND = "online"
    ARRAYS = _ARRAYS
    SCALARS = ("final_lr",)

    def __repr__(self) -> str:
        div = f", diverged_at={self.diverged_at}" if self.diverged else ""
        return (f"OnlineResult(method={self.method!r}, steps={self.steps_run}{div}, "
                f"final_lr={self.final_lr:.4g}, final_val_loss={self.final_val_loss:.6g}, "
                f"best_val_loss={self.best_val_loss:.6g})")


# ----------------------------------------------------------------------------- hyper-update

@dataclass(frozen=True)
class HyperConfig:
    """Resolved, validated settings of the hyper-update (shared by :func:`run` and
    :mod:`hgtoolkit.optim`). ``mu_rule``/``beta_rule`` are None for a constant μ/β."""

    method: str
    mu_rule: Callable | None
    beta_rule: Callable | None
    lr_floor: float | None
    lr_max: float
    objective: str
    description: dict = field(default_factory=dict)

    @property
    def needs_hvp(self) -> bool:
        """False only when μ ≡ 0 (HD): then z_{t+1} = B_t and no Hessian-vector product is needed."""
        return self.mu_rule is not None or self.description["mu"] != 0.0


@dataclass(frozen=True)
class HyperState:
    """The online hyper-variables after an update: η, β, μ, the μ rule's memory (its counter c)
    and the last estimate h (h_0 = 0)."""

    lr: float
    beta: float
    mu: float
    memory: float = 0.0
    hypergrad: float = 0.0


def _number(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        if isinstance(x, torch.Tensor) and x.numel() == 1:
            x = float(x)
        else:
            raise TypeError(f"{name} must be a number, got {type(x).__name__} ({x!r})")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def hyper_config(method: str = "marthe", *, lr0: float, beta: Any = None, mu: Any = None,
                 kappa: float = 1e-6, beta0: float = 0.0, beta_rule: str = "hh",
                 mu_rule: Callable | None = None, objective: str = "val",
                 lr_floor: float | None = 0.0, lr_max: float | None = None) -> tuple[HyperConfig, HyperState]:
    """Validate the hyper-hyperparameters and return (config, initial state η_0, β_0, μ_0).

    Raises ``ValueError`` naming the argument for an unknown method/objective/rule, a negative
    β/κ/η_0, μ outside [0, 1], a μ or ``mu_rule`` that contradicts the method, …
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if not isinstance(objective, str) or objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    lr0 = _number(lr0, "lr0")
    if lr0 < 0:
        raise ValueError(f"lr0 must be ≥ 0, got {lr0}")
    if lr_floor is not None:
        lr_floor = _number(lr_floor, "lr_floor")
        if lr_floor < 0 or lr_floor > lr0:
            raise ValueError(f"lr_floor must be in [0, lr0={lr0}] (or None for no clipping), got {lr_floor}")
    if lr_max is None:
        lr_max = 1e6 * lr0 if lr0 > 0 else math.inf
    else:
        lr_max = float(lr_max)
        if not lr_max > lr0:
            raise ValueError(f"lr_max must be > lr0={lr0}, got {lr_max}")

    # μ: fixed by the method (hd: 0, rtho: 1), a constant in [0, 1], or a rule.
    fixed_mu = {"hd": 0.0, "rtho": 1.0}.get(method)
    if mu_rule is not None and not callable(mu_rule):
        raise TypeError(f"mu_rule must be callable as mu_rule(mu, memory, stats) -> (mu, memory), "
                        f"got {type(mu_rule).__name__}")
    if fixed_mu is not None:
        if mu_rule is not None:
            raise ValueError(f"mu_rule is only for method='marthe'; method={method!r} fixes μ={fixed_mu}")
        if mu is not None and (isinstance(mu, str) or _number(mu, "mu") != fixed_mu):
            raise ValueError(f"mu={mu!r} contradicts method={method!r}, which fixes μ={fixed_mu}; "
                             "use method='marthe' for another μ")
        mu_value, rule = fixed_mu, None
    elif mu_rule is not None:
        if mu not in (None, "auto"):
            raise ValueError(f"mu={mu!r} with a mu_rule: leave mu=None (or 'auto')")
        mu_value, rule = 0.0, mu_rule
    elif mu is None or mu == "auto":
        mu_value, rule = 0.0, _marthe.adaptive_mu
    elif isinstance(mu, str):
        raise ValueError(f"mu must be a number in [0, 1] or 'auto', got {mu!r}")
    else:
        mu_value, rule = _number(mu, "mu"), None
        if not 0.0 <= mu_value <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {mu_value}")

    # β: a constant ≥ 0, or "auto" (MARTHE only) starting from beta0 with step size κ.
    if not isinstance(beta_rule, str) or beta_rule not in _marthe.BETA_RULES:
        raise ValueError(f"unknown beta_rule {beta_rule!r}; choose one of {tuple(_marthe.BETA_RULES)}")
    kappa = _number(kappa, "kappa")
    if kappa < 0:
        raise ValueError(f"kappa must be ≥ 0, got {kappa}")
    if beta is None:
        if method != "marthe":
            raise ValueError(f"beta (the hyper-learning rate) is required for method={method!r}")
        beta = "auto"
    if isinstance(beta, str):
        if beta != "auto":
            raise ValueError(f"beta must be a number ≥ 0 or 'auto', got {beta!r}")
        if method != "marthe":
            raise ValueError(f"beta='auto' is MARTHE's adaptive rule; method={method!r} needs a number")
        beta_value = _number(beta0, "beta0")
        if beta_value < 0:
            raise ValueError(f"beta0 must be ≥ 0, got {beta_value}")
        brule = _bind_kappa(_marthe.BETA_RULES[beta_rule], kappa)
    else:
        beta_value, brule = _number(beta, "beta"), None
        if beta_value < 0:
            raise ValueError(f"beta must be ≥ 0, got {beta_value}")

    desc = {"method": method, "lr0": lr0, "objective": objective, "lr_floor": lr_floor,
            "lr_max": lr_max if math.isfinite(lr_max) else None,
            "beta": "auto" if brule is not None else beta_value,
            "beta0": beta_value if brule is not None else None,
            "kappa": kappa if brule is not None else None,
            "beta_rule": beta_rule if brule is not None else None,
            "mu": (getattr(rule, "__name__", repr(rule)) if rule is not None else mu_value)}
    if rule is _marthe.adaptive_mu:
        desc["mu"] = "auto"
    cfg = HyperConfig(method, rule, brule, lr_floor, lr_max, objective, desc)
    return cfg, HyperState(lr=lr0, beta=beta_value, mu=mu_value)


def _bind_kappa(rule: Callable, kappa: float) -> Callable:
    def beta_rule(beta: float, stats: "_marthe.HyperStats") -> float:
        return rule(beta, kappa, stats)
    beta_rule.__name__ = rule.__name__
    return beta_rule


def hyper_update(state: HyperState, cfg: HyperConfig, h: float, grad_dot: float, t: int) -> HyperState:
    r"""One hyper-update after step t, given h = h_{t+1} and grad_dot = v_{t+1}·g_t:

    η_{t+1} = max(η_t − β_t h_{t+1}, floor);  β_{t+1} = β rule (or β_t);  μ_{t+1} = μ rule (or μ_t).

    Raises :class:`DivergenceError` for step t+1 (the step that would use η_{t+1}) when h is
    not finite or |η_{t+1}| > ``lr_max``.
    """
    if not math.isfinite(h):
        raise DivergenceError(t + 1, "hypergradient h", h)
    lr = state.lr - state.beta * h
    if cfg.lr_floor is not None:
        lr = max(lr, cfg.lr_floor)
    if not math.isfinite(lr) or abs(lr) > cfg.lr_max:
        err = DivergenceError(t + 1, "learning rate", lr)
        err.args = (f"training diverged at step {t + 1}: the learning rate {lr:.4g} exceeds "
                    f"lr_max={cfg.lr_max:.4g}",)
        raise err
    stats = _marthe.HyperStats(t=t, lr=lr, prev_lr=state.lr, hypergrad=h,
                               prev_hypergrad=state.hypergrad, grad_dot=grad_dot)
    beta = state.beta if cfg.beta_rule is None else float(cfg.beta_rule(state.beta, stats))
    mu, memory = state.mu, state.memory
    if cfg.mu_rule is not None:
        mu, memory = cfg.mu_rule(state.mu, state.memory, stats)
        mu, memory = float(mu), float(memory)
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"mu_rule returned μ={mu} at step {t}; it must be in [0, 1]")
    if not math.isfinite(beta) or beta < 0:
        raise DivergenceError(t + 1, "hyper-learning rate β", beta)
    return HyperState(lr=lr, beta=beta, mu=mu, memory=memory, hypergrad=h)


# ----------------------------------------------------------------------------- the engine

def gradient_and_hvp(problem) -> Callable:
    """``fn(w, z_w, t) -> (g_t, L_t, H_t z_w)``: ∇L_t(w) and its jvp along z_w, i.e. ONE
    forward-over-reverse ``torch.func.jvp`` (the Hessian-vector product comes with the gradient).

    ``problem`` may also be a loss function ``loss(w, x)`` itself; then ``fn(w, z_w, x)``
    differentiates it (``hgtoolkit.batched`` passes ``problem.batch_loss`` and a minibatch x)."""
    grad_train = grad_and_value(problem if callable(problem) else problem.train_loss)

    def fn(w, z_w, t):
        (g, loss), (hz, _) = jvp(lambda w_: grad_train(w_, t), (w,), (z_w,))
        return g, loss, hz

    return fn


def dynamics_tangent(dyn: _dynamics.Dynamics, state: dict, grad: Any, lr: torch.Tensor, t: int,
                     mu: torch.Tensor | None = None, z: Any = None, hz: Any = None,
                     dlr: float = 1.0) -> tuple[dict, dict]:
    r"""(s_{t+1}, z_{t+1}) with s_{t+1} = D_t(s_t, g_t, η_t) and z_{t+1} = μ A_t z_t + dlr·B_t.

    D_t is ``dyn.step``; A_t z = ∂D/∂s·z + ∂D/∂g·H_t z_w, so the jvp of D_t with tangent
    (μz, μ·H_t z_w, dlr) equals the jvp of the whole step Φ_t with tangent (μz, dlr) (what
    ``trajectory.tangent_step`` computes). With ``mu=None`` (or z = None) it returns dlr·B_t.
    """
    dlr = torch.full_like(lr, dlr)
    if mu is None or z is None:
        return jvp(lambda lr_: dyn.step(state, grad, lr_, t), (lr,), (dlr,))
    return jvp(lambda s, g_, lr_: dyn.step(s, g_, lr_, t), (state, grad, lr),
               (tree_scale(mu, z), tree_scale(mu, hz), dlr))


def _check_int(x: Any, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {x}")
    return int(x)


def run(problem, method: str = "marthe", optimizer: "str | _dynamics.Dynamics" = "sgd", *,
        lr0: float, steps: int, beta: Any = None, mu: Any = None, kappa: float = 1e-6,
        beta0: float = 0.0, beta_rule: str = "hh", mu_rule: Callable | None = None,
        objective: str = "val", lr_floor: float | None = 0.0, lr_max: float | None = None,
        eval_every: int = 1, seed: int | None = None, progress: bool = False,
        raise_on_divergence: bool = False, keep_params: bool = True) -> OnlineResult:
    r"""Train ``problem`` for ``steps`` steps while adapting η online (module docstring).

    Arguments:
        method: ``"hd"`` (μ ≡ 0), ``"rtho"`` (μ ≡ 1) or ``"marthe"`` (μ and β fixed or adaptive).
        optimizer: the dynamics Φ (``"sgd"``, ``"nesterov"``, ``"adam"``, … or a
            :mod:`hgtoolkit.dynamics` object).
        lr0: η_0 ≥ 0.
        beta: β ≥ 0, or ``"auto"`` (MARTHE; the default there): β_0 = ``beta0`` and
            β_{t+1} = max(β_t + κ h_{t+1} h_t, 0) (``beta_rule="hh"``) or the authors'-code
            variant max(β_t + κ h_{t+1} η_{t+1}, 0) (``beta_rule="h_eta"``); κ = ``kappa``.
        mu: MARTHE's μ: a number in [0, 1] or ``"auto"`` (the default: the heuristic of
            :func:`hgtoolkit.marthe.adaptive_mu`, starting from μ_0 = 0). ``mu_rule``:
            any callable ``(mu, memory, stats) -> (mu, memory)`` replacing it.
        objective: ``"val"``: h_{t+1} = ∇E(w_{t+1})·z_{t+1}, E = ``problem.val_loss``;
            ``"train"``: ∇L_{t+1}(w_{t+1}) (the next minibatch's training gradient), as in HD.
        lr_floor: η is clipped to ≥ lr_floor (default 0); None allows η < 0 ("unlearning", as
            Baydin et al.).
        lr_max: the run is declared divergent when |η| exceeds it (default 1e6·lr0; no bound
            when lr0 = 0). Non-finite losses, parameters or h also count as divergence.
        eval_every: record E(w_k) (and accuracy) every this many steps, plus at 0 and the end.
        seed: for problems with ``resample`` (stochastic minibatch order), run on
            ``problem.resample(seed)``; ignored by deterministic problems.
        progress: show a tqdm bar. ``keep_params``: keep w_T in the record.
        raise_on_divergence: raise :class:`DivergenceError` instead of recording and warning.

    On divergence the run stops at the offending step, records it in ``result.diverged_at``
    and warns (:class:`hgtoolkit.errors.DivergenceWarning`). Computation happens on the
    problem's device and dtype.

    >>> import hgtoolkit
    >>> from hgtoolkit import online, problems
    >>> r = online.run(problems.from_function("beale"), "rtho", lr0=1e-3, beta=1e-7, steps=100)
    >>> r.lrs.shape, r.hypergrads.shape
    ((100,), (100,))
    """
    problem, cfg, hs, dyn, T, eval_every, config = _setup(
        problem, method, optimizer, lr0=lr0, steps=steps, beta=beta, mu=mu, kappa=kappa,
        beta0=beta0, beta_rule=beta_rule, mu_rule=mu_rule, objective=objective, lr_floor=lr_floor,
        lr_max=lr_max, eval_every=eval_every, seed=seed)

    dtype, device = problem.dtype, problem.device
    scalar = lambda x: torch.tensor(x, dtype=dtype, device=device)
    grad_train = grad_and_value(problem.train_loss)          # (w, t) -> (g_t, L_t)
    grad_val = grad_and_value(problem.val_loss)               # w -> (∇E, E)
    grad_hvp = gradient_and_hvp(problem)                      # (w, z_w, t) -> (g_t, L_t, H_t z_w)

    def objective_grad(w, g_k):
        """(v_k, E(w_k) or None): ∇E(w_k) for "val"; the training gradient g_k for "train"."""
        if cfg.objective == "train":
            return g_k, None
        return grad_val(w)

    rec = {k: [] for k in ("lrs", "betas", "mus", "hypergrads", "train_losses", "step_times",
                           "eval_steps", "val_losses", "val_accuracy")}

    def evaluate(k, w, value=None):
        if value is None:
            with torch.no_grad():
                value = problem.val_loss(w)
        rec["eval_steps"].append(k)
        rec["val_losses"].append(float(value))
        if problem.metrics is not None:
            rec["val_accuracy"].append(float(problem.metrics(w).get("val_accuracy", math.nan)))

    state = dyn.init(problem.params0)
    z = tree_zeros_like(state)
    g_prev = None
    diverged: DivergenceError | None = None
    start = time.perf_counter()
    bar = progress_bar(range(T), progress, desc=f"online {cfg.method}", leave=False)
    try:
        evaluate(0, dyn.params(state))
        for t in bar:
            w = dyn.params(state)
            if cfg.needs_hvp and t > 0:
                g, loss, hz = grad_hvp(w, dyn.params(z), t)
            else:
                (g, loss), hz = grad_train(w, t), None
            if not bool(torch.isfinite(loss)):
                raise DivergenceError(t, "training loss", float(loss))
            if t > 0:  # hyper-update of iteration t−1: h_t, η_t, β_t, μ_t
                v, value = objective_grad(w, g)
                h = float(tree_dot(v, dyn.params(z)))
                rec["hypergrads"].append(h)
                hs = hyper_update(hs, cfg, h, float(tree_dot(v, g_prev)), t - 1)
                if t % eval_every == 0:
                    evaluate(t, w, value)  # "val": E(w_t) came with ∇E(w_t)
            rec["lrs"].append(hs.lr)
            rec["betas"].append(hs.beta)
            rec["mus"].append(hs.mu)
            rec["train_losses"].append(float(loss))

            # step t: s_{t+1} = Φ_t(s_t, η_t), z_{t+1} = μ_t A_t z_t + B_t (one cheap jvp of D_t)
            if hz is None or hs.mu == 0.0:  # z_{t+1} = B_t
                state, z = dynamics_tangent(dyn, state, g, scalar(hs.lr), t)
            else:
                state, z = dynamics_tangent(dyn, state, g, scalar(hs.lr), t, scalar(hs.mu), z, hz)
            if not tree_all_finite(state):
                raise DivergenceError(t, "parameters after the step")
            g_prev = g
            rec["step_times"].append(time.perf_counter() - start)
            if progress and t % 10 == 0:
                bar.set_postfix(lr=f"{hs.lr:.3g}", loss=f"{rec['train_losses'][-1]:.4g}", refresh=False)
        # the last hyper-update (h_T, η_T): for "train" this is the run's one extra gradient
        w = dyn.params(state)
        g_T, value = None, None
        if cfg.objective == "train":
            g_T, loss_T = grad_train(w, T)
            if not bool(torch.isfinite(loss_T)):
                raise DivergenceError(T, "training loss", float(loss_T))
        v, value = objective_grad(w, g_T)
        h = float(tree_dot(v, dyn.params(z)))
        rec["hypergrads"].append(h)
        hs = hyper_update(hs, cfg, h, float(tree_dot(v, g_prev)), T - 1)
        evaluate(T, w, value)
    except DivergenceError as exc:
        diverged = exc
    finally:
        if hasattr(bar, "close"):
            bar.close()
    wall = time.perf_counter() - start

    result = _result(config, rec, hs, diverged, wall, problem.metrics is not None,
                     tree_clone(dyn.params(state)) if keep_params and diverged is None else None)
    if diverged is not None:
        if raise_on_divergence:
            raise diverged
        warnings.warn(f"online {cfg.method} run stopped: {diverged} (result.diverged_at="
                      f"{diverged.step})", DivergenceWarning, stacklevel=2)
    return result


def _setup(problem, method, optimizer, *, lr0, steps, beta, mu, kappa, beta0, beta_rule, mu_rule,
           objective, lr_floor, lr_max, eval_every, seed):
    """Validate :func:`run`'s arguments: (problem (resampled for ``seed``), hyper config,
    initial hyper state, dynamics, T, eval_every, the record's config). Shared with
    :mod:`hgtoolkit.batched`."""
    cfg, hs = hyper_config(method, lr0=lr0, beta=beta, mu=mu, kappa=kappa, beta0=beta0,
                           beta_rule=beta_rule, mu_rule=mu_rule, objective=objective,
                           lr_floor=lr_floor, lr_max=lr_max)
    dyn = _dynamics.get(optimizer)
    T = _check_int(steps, "steps")
    eval_every = _check_int(eval_every, "eval_every")
    if seed is not None:
        seed = _check_int(seed, "seed", minimum=0)
        if problem.resample is not None:
            problem = problem.resample(seed)
    config = {**cfg.description, "optimizer": dyn.config(), "steps": T, "eval_every": eval_every,
              "seed": seed, "problem": problem.describe()}
    return problem, cfg, hs, dyn, T, eval_every, config


def _result(config: dict, rec: dict, hs: HyperState, diverged: DivergenceError | None, wall: float,
            has_metrics: bool, final_params: Any) -> OnlineResult:
    """The record of one run from its per-step lists ``rec`` (keys as in :func:`run`): the
    arrays are cut to the n = ``diverged.step`` steps that ran (NaN-padded where a value was
    not formed), evaluations after step n dropped. Shared with :mod:`hgtoolkit.batched`."""
    n = len(rec["train_losses"]) if diverged is None else diverged.step
    per_step = {}
    for k in ("lrs", "betas", "mus", "hypergrads", "train_losses", "step_times"):
        vals = rec[k][:n] + [math.nan] * max(0, n - len(rec[k]))
        per_step[k] = np.asarray(vals, dtype=np.float64)
    keep = [i for i, k in enumerate(rec["eval_steps"]) if k <= n]
    return OnlineResult(
        config=config, **per_step,
        eval_steps=np.asarray([rec["eval_steps"][i] for i in keep], dtype=np.int64),
        val_losses=np.asarray([rec["val_losses"][i] for i in keep], dtype=np.float64),
        val_accuracy=(np.asarray([rec["val_accuracy"][i] for i in keep], dtype=np.float64)
                      if has_metrics else None),
        final_lr=hs.lr if diverged is None else math.nan,
        diverged_at=None if diverged is None else diverged.step,
        divergence=None if diverged is None else str(diverged),
        wall_time=wall, final_params=final_params)
