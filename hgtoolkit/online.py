r"""Online learning-rate adaptation: HD, RTHO and MARTHE as ONE pure, tensor-valued step.

All three methods keep one tangent vector z (the derivative of the optimizer state w.r.t. a
learning rate shared by the past steps, discounted by μ) and update η during a single training
run (docs/methods.md, "Online methods: one recursion")::

    z_0 = 0
    for t = 0 … T−1:
        z_{t+1} = μ_t·A_t z_t + B_t                 # closed-form tangent of the update (dynamics)
        s_{t+1} = Φ_t(s_t, η_t)
        h_{t+1} = v_{t+1} · z_{t+1}                 # v = ∇E(w_{t+1}) ("val") or ∇L_{t+1}(w_{t+1}) ("train")
        η_{t+1} = max(η_t − β_t h_{t+1}, η_floor)   # η_floor = lr_floor (None: no clipping)
        β_{t+1}, μ_{t+1} = adaptive rules (MARTHE) or constants

- ``method="hd"``: μ ≡ 0, so z_{t+1} = B_t (SGD: −g̃_t) and h_{t+1} = −v_{t+1}·d_t with d_t the
  update direction. With ``objective="train", lr_floor=None`` this is Baydin et al.'s
  SGD-HD / SGDN-HD / Adam-HD (their α_t = α_{t−1} − β ∇L_t(θ_t)·∇_α u_{t−1} is our
  η_t = η_{t−1} − β h_t, updated before step t with the gradient step t computes anyway); with
  weight decay, v is the gradient of the *regularised* loss L_t + wd/2‖w‖², the one the
  optimizer minimises, as in their code (``hd_gradient="raw"`` uses the plain minibatch gradient).
- ``method="rtho"``: μ ≡ 1 (Franceschi et al. 2017): z_t = dw_t/dη exactly, for the schedule
  held constant — the real-time forward-mode hypergradient.
- ``method="marthe"`` (Donini et al. 2020): μ fixed in [0, 1] or adaptive (``mu="auto"``, the
  rule of :func:`hgtoolkit.marthe.adaptive_mu`, replaceable with ``mu_rule=``), β fixed or
  adaptive (``hypergrad_lr="auto"``: β_{t+1} = max(β_t + κ h_{t+1} h_t, 0), bounded, see below).

The engine
----------
:class:`Engine` is the recursion as two pure functions over an :class:`OnlineState` whose
fields are all tensors (the optax shape): ``init(params, settings) -> state`` and
``update(state, oracle, t) -> (state, aux)``, the :class:`~hgtoolkit.drive.Oracle` holding what
the problem says of w_t (g_t, L_t, H_t z_{t,w}, v_t, E(w_t)). Clipping, the μ and β rules
and divergence detection are tensor operations (``torch.where``), so ``update`` runs unchanged
under ``torch.func.vmap`` over a leading run axis: seeds × η_0 × β × κ × μ × method are one
computation (:mod:`hgtoolkit.batched`). Every per-run setting lives in the state
(:class:`Settings`); what must be shared by a batch (the dynamics, the objective, whether an HVP
is needed, the μ rule's function) lives in the Engine. :func:`run`, :mod:`hgtoolkit.batched`
and the analysis references drive it through the one loop :func:`hgtoolkit.drive.drive`; the
drop-in optimizers of :mod:`hgtoolkit.optim` call its pieces from the user's loop.

One step t: the hyper-update of iteration t−1 (t > 0) from v_t = objective gradient at w_t
(h_t = v_t·z_t, η_t, β_t, μ_t), then s_{t+1}, z_{t+1} = ``dynamics.tangent(s_t, g_t, η_t, t,
μ_t z_t, μ_t H_t z_{t,w}, 1)``: A_t z = ∂D/∂s·z + ∂D/∂g·H_t z_w in closed form. The only
model-sized derivatives are the gradient g_t (HD) and one Hessian-vector product H_t z_w
(μ ≠ 0). ``finish(state, v, T)`` is the last hyper-update (h_T, η_T), after the loop.

Divergence (``state.diverged_at`` = the first step that went wrong, −1 while fine; ``why`` a
code of :data:`DIVERGENCE`): a non-finite loss, h, η or β (non-finite parameters show in the
next loss and h: the step itself is never checked, so that it can run in place); |η| > ``lr_max``; or the
loss that defines the run — E(w_t) for ``objective="val"`` (full validation set), else the
minibatch loss L_t — above ``divergence_factor`` × its initial value (for a loss that may be
negative: above ref + (factor − 1)·|ref|). With adaptive β, β is also bounded: after each
update β_{t+1} ≤ ``hypergrad_lr_bound``·max(η_{t+1}, η_0)/|h_{t+1}|, i.e. with the latest hypergradient
one LR update moves η by at most ``hypergrad_lr_bound``·max(η, η_0) (the record counts the steps where
the bound bit);
the MARTHE paper's other remedy, decimating κ until the run does not diverge, is :func:`find_hypergrad_lr`.

The record, :class:`OnlineResult`, is a plain data record (numpy arrays + a config dict) that
saves to JSON + npz and loads back.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.func import grad_and_value

from . import dynamics as _dynamics
from . import fastpaths as _fastpaths
from . import marthe as _marthe
from . import settings as _settings
from ._tree import tree_clone, tree_dot, tree_leaves, tree_map, tree_zeros_like
from . import divergence as _divergence
from . import errors as _errors
from .drive import BufferShare, Oracle, closing_update, drive
from .online_record import OnlineResult
from .divergence import DivergenceWarning
from .settings import OnlineSettings
from .carried import CarriedBuffers
from .trajectory import autograd_gradient, autograd_gradient_hvp, check_problem

__all__ = ["OnlineResult", "run", "find_hypergrad_lr", "Engine", "Oracle", "OnlineState", "Settings", "HyperConfig",
           "hyper_config", "gradient_and_hvp", "METHODS", "OBJECTIVES", "DIVERGENCE",
           "DivergenceWarning"]

#: The online methods and objectives (the choices of :class:`~hgtoolkit.settings.OnlineSettings`).
METHODS = _settings.specs(OnlineSettings)["method"][1].choices
#: The hyper-variables (η, β, μ, c, h) are float64 whatever the model's dtype, like the Python
#: floats they replace: η_0 = 0.01 stays 0.01 for a float32 model.
HYPER_DTYPE = torch.float64
OBJECTIVES = _settings.specs(OnlineSettings)["objective"][1].choices

#: ``state.why`` codes: what made a run diverge (:data:`hgtoolkit.divergence.CODES`, as text).
DIVERGENCE = {code: f"{quantity} {reason}" for code, (quantity, reason) in _divergence.CODES.items()}


# ----------------------------------------------------------------------------- settings

class Settings(NamedTuple):
    """One run's hyper-settings as 0-d tensors (so that runs with different settings share one
    vmapped computation). ``lr_floor`` = −inf for no clipping; ``beta_bound`` and
    ``divergence_factor`` = inf to switch them off; booleans select the adaptive rules."""

    lr: torch.Tensor
    mu_adaptive: torch.Tensor
    beta_adaptive: torch.Tensor
    beta_rule_eta: torch.Tensor
    kappa: torch.Tensor
    lr_floor: torch.Tensor
    lr_max: torch.Tensor
    beta_bound: torch.Tensor
    divergence_factor: torch.Tensor


@dataclass(frozen=True)
class HyperConfig:
    """Validated settings of one online run (:func:`hyper_config`): the static part shared by
    a batch (``method``, ``objective``, ``mu_rule``: the μ function or None for a constant μ)
    and the per-run numbers, turned into tensors by :meth:`settings` / :meth:`initial`."""

    method: str
    objective: str
    lr: float
    beta0: float
    beta_adaptive: bool
    kappa: float
    beta_rule: str
    mu0: float
    mu_rule: Callable | None
    lr_floor: float | None
    lr_max: float
    beta_bound: float | None
    divergence_factor: float | None
    hd_gradient: str
    description: dict = field(default_factory=dict)

    @property
    def needs_hvp(self) -> bool:
        """False only when μ ≡ 0 (HD): then z_{t+1} = B_t and no Hessian-vector product is needed."""
        return self.mu_rule is not None or self.mu0 != 0.0

    def settings(self, dtype: torch.dtype, device: Any) -> Settings:
        f = lambda x: torch.tensor(x, dtype=dtype, device=device)
        b = lambda x: torch.tensor(bool(x), device=device)
        return Settings(lr=f(self.lr), mu_adaptive=b(self.mu_rule is not None), beta_adaptive=b(self.beta_adaptive),
                        beta_rule_eta=b(self.beta_rule == "h_eta"), kappa=f(self.kappa),
                        lr_floor=f(-math.inf if self.lr_floor is None else self.lr_floor),
                        lr_max=f(min(self.lr_max, sys.float_info.max)),  # finite: |η| ≤ it fails for inf
                        beta_bound=f(math.inf if self.beta_bound is None else self.beta_bound),
                        divergence_factor=f(math.inf if self.divergence_factor is None
                                            else self.divergence_factor))


def _plain(settings: dict) -> dict:
    """A one-element tensor given for a number setting as the Python number it holds."""
    return {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in settings.items()}


@_settings.takes(OnlineSettings)
def hyper_config(method: str = "marthe", *, mu_rule: Callable | None = None, **settings: Any) -> HyperConfig:
    """Validate the hyper-hyperparameters of an online run (arguments as :func:`run`).

    The settings are those of :class:`~hgtoolkit.settings.OnlineSettings`, each checked by its
    declaration there (``ValueError``/``TypeError`` naming it: an unknown method, objective or
    rule, a negative β/κ/η_0, μ outside [0, 1], …); here the rules between them: η_floor ≤ η_0 <
    η_max, a μ or ``mu_rule`` that contradicts the method, a ``mu_rule`` that is not a tensor
    function, β required (or ``"auto"`` only) by the method, a setting the method or β mode does
    not use (``kappa`` with ``method="hd"`` or a numeric ``hypergrad_lr``, even at its default:
    :func:`hgtoolkit.settings.check_used`; not passed it is silent). The ones that are not
    hyper-settings (``steps``, ``seed``, …) are checked and otherwise ignored.
    """
    c = _settings.bind(OnlineSettings, _plain({"method": method, **settings}), "hyper_config", required=False)
    if "lr" not in c:
        raise TypeError("hyper_config() missing required keyword argument 'lr'")
    given = _settings.passed(c)
    c = _settings.check(OnlineSettings, c)  # each setting by its declaration; the rules between them here
    method, lr, beta, mu, kappa, beta0 = c["method"], c["lr"], c["hypergrad_lr"], c["mu"], c["kappa"], c["hypergrad_lr_init"]
    beta_rule, objective, lr_floor, lr_max = c["hypergrad_lr_rule"], c["objective"], c["lr_floor"], c["lr_max"]
    beta_bound, divergence_factor = c["hypergrad_lr_bound"], c["divergence_factor"]
    hd_gradient = c["hd_gradient"]
    if lr_floor is not None and lr_floor > lr:
        raise ValueError(f"lr_floor must be in [0, lr={lr}] (or None for no clipping), got {lr_floor}")
    if lr_max is None:
        lr_max = 1e6 * lr if lr > 0 else math.inf
    elif not lr_max > lr:
        raise ValueError(f"lr_max must be > lr={lr}, got {lr_max}")

    # μ: fixed by the method (hd: 0, rtho: 1), a constant in [0, 1], or a rule.
    fixed_mu = {"hd": 0.0, "rtho": 1.0}.get(method)
    if mu_rule is not None:
        _marthe.check_mu_rule(mu_rule)
    if fixed_mu is not None:
        if mu_rule is not None:
            raise ValueError(f"mu_rule is only for method='marthe'; method={method!r} fixes μ={fixed_mu}")
        if mu is not None and mu != fixed_mu:
            raise ValueError(f"mu={mu!r} contradicts method={method!r}, which fixes μ={fixed_mu}; "
                             "use method='marthe' for another μ")
        mu_value, rule = fixed_mu, None
    elif mu_rule is not None:
        if mu not in (None, "auto"):
            raise ValueError(f"mu={mu!r} with a mu_rule: leave mu=None (or 'auto')")
        mu_value, rule = 0.0, mu_rule
    elif mu is None or mu == "auto":
        mu_value, rule = 0.0, _marthe.adaptive_mu
    else:
        mu_value, rule = mu, None

    # β = hypergrad_lr: a constant ≥ 0, or "auto" (MARTHE only) from hypergrad_lr_init, step size κ.
    if beta is None:
        if method != "marthe":
            raise ValueError(f"hypergrad_lr (the hyper-learning rate β) is required for method={method!r}")
        beta = "auto"
    adaptive = beta == "auto"
    if adaptive and method != "marthe":
        raise ValueError(f"hypergrad_lr='auto' is MARTHE's adaptive rule; method={method!r} needs a number")
    beta_value = beta0 if adaptive else beta
    # a setting the method (or β mode) does not use, passed (at its default or not; μ: checked above)
    _settings.check_used(OnlineSettings, {**c, "hypergrad_lr": beta},
                         given - {"mu"} if fixed_mu is not None else given)

    desc = {"method": method, "lr": lr, "objective": objective, "lr_floor": lr_floor,
            "lr_max": lr_max if math.isfinite(lr_max) else None,
            "hypergrad_lr": "auto" if adaptive else beta_value,
            "hypergrad_lr_init": beta_value if adaptive else None,
            "kappa": kappa if adaptive else None,
            "hypergrad_lr_rule": beta_rule if adaptive else None,
            "hypergrad_lr_bound": beta_bound if adaptive else None,
            "divergence_factor": divergence_factor,
            "mu": ("auto" if rule is _marthe.adaptive_mu else
                   getattr(rule, "__name__", repr(rule)) if rule is not None else mu_value)}
    if hd_gradient != "regularised":
        desc["hd_gradient"] = hd_gradient
    return HyperConfig(method, objective, lr, beta_value, adaptive, kappa, beta_rule, mu_value,
                       rule, lr_floor, lr_max, beta_bound if adaptive else None,
                       divergence_factor, hd_gradient, desc)


# ----------------------------------------------------------------------------- the engine

class OnlineState(NamedTuple):
    r"""Everything one online run carries from step t to t+1, all tensors (a pytree):
    ``opt`` = s_t (the optimizer state, parameters under "w"), ``z`` = z_t (state-shaped
    tangent), ``lr`` = η_t, ``beta`` = β_t, ``mu`` = μ_t, ``counter`` = c_t (the μ rule's
    memory), ``h`` = h_t (0 at the start), ``g_prev`` = g_{t−1} (the gradient of the last
    step), ``ref_loss`` = the initial loss the divergence criterion compares with (NaN until
    step 0 sets it), ``diverged_at`` (−1 while fine) and ``why`` (a :data:`DIVERGENCE` code),
    ``beta_capped`` (updates clipped by the β bound) and ``settings`` (:class:`Settings`)."""

    opt: dict
    z: dict
    lr: torch.Tensor
    beta: torch.Tensor
    mu: torch.Tensor
    counter: torch.Tensor
    h: torch.Tensor
    g_prev: Any
    ref_loss: torch.Tensor
    diverged_at: torch.Tensor
    why: torch.Tensor
    beta_capped: torch.Tensor
    settings: Settings


_NO_FAILURE = 99  # above every DIVERGENCE code
_CODES: dict = {}  # (codes, device) -> the codes as a tensor, made once


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """x is ±inf or NaN: x − x is NaN exactly then (two kernels; ``isfinite`` takes five)."""
    return (x - x) != 0


def _fail(state: OnlineState, t: int, bad: list, codes: tuple) -> OnlineState:
    """Record the first failure of step t: ``bad`` are 0-d booleans, ``codes`` their DIVERGENCE
    codes in ascending (= priority) order; diverged_at = t and why = the first code whose ``bad``
    holds, unless the run already failed. A handful of tensor ops whatever the number of checks
    (the step's scalar bookkeeping costs as much as a small model's update)."""
    key = (codes, state.why.device)
    if key not in _CODES:
        _CODES[key] = torch.tensor(codes, dtype=state.why.dtype, device=state.why.device)
    bad = torch.stack(bad)  # (checks,) or (checks, runs) for an engine with rows
    code = torch.where(bad, _CODES[key].view(-1, *[1] * (bad.dim() - 1)), _NO_FAILURE).amin(0)
    new = (state.diverged_at < 0) & (code < _NO_FAILURE)
    return state._replace(diverged_at=torch.where(new, t, state.diverged_at),
                          why=torch.where(new, code, state.why))


@dataclass(frozen=True)
class Engine:
    r"""The online recursion as pure tensor functions (module docstring). Static settings
    shared by every run that goes through it: the dynamics, the objective and whether a
    Hessian-vector product is needed (``needs_hvp``; False only for HD runs: z_{t+1} = B_t),
    the μ rule (a tensor function, or None when every run has a constant μ), and whether HD's
    v includes weight decay (``regularised``). ``unit_mu``: every run has μ ≡ 1 (RTHO), so
    z_{t+1} = A_t z_t + B_t skips the product by μ; ``adaptive_beta``: False when no run adapts
    β (the β rule's ops are then skipped). Without a Hessian-vector product z is carried for w
    only (A_t is never applied, so the tangents of the optimizer's moments would stay unused).

    ``plan``: how the steps run (:class:`hgtoolkit.fastpaths.Plan`: buffer donation, HD's
    direction kept as z, runs as rows; the default is the reference), made by
    :meth:`~hgtoolkit.fastpaths.Plan.choose` from what the caller knows of its runs. The
    numbers are the reference's (tests/test_fastpaths.py).
    """

    dynamics: _dynamics.Dynamics
    objective: str = "val"
    needs_hvp: bool = True
    mu_rule: Callable | None = None
    regularised: bool = True
    unit_mu: bool = False
    adaptive_beta: bool = True
    plan: _fastpaths.Plan = _fastpaths.Plan()

    def __post_init__(self) -> None:
        if not isinstance(self.plan, _fastpaths.Plan):
            raise TypeError(f"Engine: plan must be a hgtoolkit.fastpaths.Plan, got {type(self.plan).__name__}")
        if self.plan.direction_as_z and self.needs_hvp:
            raise ValueError("Engine: plan.direction_as_z is for HD (needs_hvp=False): A_t z needs z itself")

    def init(self, params: Any, cfg: HyperConfig) -> OnlineState:
        """s_0 = dynamics.init(params), z_0 = 0, η_0, β_0, μ_0 and the settings of ``cfg``."""
        leaf = tree_leaves(params)[0]
        f = lambda x: torch.tensor(x, dtype=HYPER_DTYPE, device=leaf.device)
        opt = self.plan.start(self.dynamics, params)
        z = tree_zeros_like(opt if self.needs_hvp else {"w": self.dynamics.params(opt)})
        return OnlineState(opt=opt, z=z, lr=f(cfg.lr), beta=f(cfg.beta0),
                           mu=f(cfg.mu0), counter=f(0.0), h=f(0.0), g_prev=tree_zeros_like(params),
                           ref_loss=f(math.nan),
                           diverged_at=torch.tensor(-1, device=leaf.device),
                           why=torch.tensor(0, device=leaf.device),
                           beta_capped=torch.tensor(0, device=leaf.device),
                           settings=cfg.settings(HYPER_DTYPE, leaf.device))

    def objective_gradient(self, state: OnlineState, grad: Any, share: Any = None) -> Any:
        """v for ``objective="train"``: the gradient the optimizer uses, g + wd·w (regularised);
        with ``share`` (a stateful run's ⟨∂L_t/∂b_t, z_{t,b}⟩) the :class:`~hgtoolkit.drive.BufferShare`
        of the two."""
        wd = getattr(self.dynamics, "weight_decay", 0.0)
        if self.regularised and wd:
            grad = tree_map(lambda g, w: torch.add(g, w, alpha=wd), grad, self.dynamics.params(state.opt))
        return grad if share is None else BufferShare(grad, share)

    def hyper_update(self, state: OnlineState, v: Any, t: int) -> OnlineState:
        r"""The hyper-update of iteration t−1 at the start of step t, from v = v_t:

        h_t = v·z_t,  η_t = max(η_{t−1} − β_{t−1} h_t, floor),  β_t = β rule (bounded) or β_{t−1},
        μ_t, c_t = μ rule or (μ_{t−1}, c_{t−1}).  Divergence (step t): h, η or β bad, |η| > lr_max.
        """
        s = state.settings
        share = None
        if isinstance(v, BufferShare):  # a stateful problem: h_t has a buffers part (docs/models.md)
            v, share = v
        h = self.plan.hypergradient(v, self.dynamics.params(state.z), state.lr.dtype, share)
        lr = torch.maximum(state.lr - state.beta * h, s.lr_floor)
        beta, capped = state.beta, None
        if self.adaptive_beta:
            # one hypergradient step on β (hh or the authors' h·η), ≥ 0, ≤ bound·max(η_t, η_0)/|h_t|
            beta = (state.beta + s.kappa * h * torch.where(s.beta_rule_eta, lr, state.h)).clamp_min(0.0)
            cap = s.beta_bound * torch.maximum(lr, s.lr) / h.abs()
            cap = torch.nan_to_num(cap, nan=math.inf, posinf=math.inf)  # no cap for h = 0, no bound
            capped = s.beta_adaptive & (beta > cap)
            beta = torch.where(s.beta_adaptive, torch.minimum(beta, cap), state.beta)
        mu, counter = state.mu, state.counter
        if self.mu_rule is not None:
            stats = _marthe.HyperStats(t=t - 1, lr=lr, prev_lr=state.lr, hypergrad=h,
                                       prev_hypergrad=state.h,
                                       grad_dot=self.plan.dot(v, state.g_prev).to(h.dtype))
            mu_r, c_r = self.mu_rule(state.mu, state.counter, stats)
            mu_r = torch.as_tensor(mu_r, dtype=h.dtype, device=h.device).clamp(0.0, 1.0)
            c_r = torch.as_tensor(c_r, dtype=h.dtype, device=h.device)
            mu = torch.where(s.mu_adaptive, mu_r, state.mu)
            counter = torch.where(s.mu_adaptive, c_r, state.counter)
        new = state._replace(lr=lr, beta=beta, mu=mu, counter=counter, h=h)
        if capped is not None:
            new = new._replace(beta_capped=state.beta_capped + capped.to(state.beta_capped.dtype))
        # h, β not finite (a constant β is a validated number); η not finite or |η| > lr_max (a
        # finite stand-in for "no bound")
        if not self.adaptive_beta:
            return _fail(new, t, [_nonfinite(h), ~(lr.abs() <= s.lr_max)], (4, 5))
        return _fail(new, t, [_nonfinite(h), ~(lr.abs() <= s.lr_max), _nonfinite(beta)], (4, 5, 6))

    def check_loss(self, state: OnlineState, loss: torch.Tensor, value: Any, t: int) -> OnlineState:
        """Divergence at step t from the losses: L_t (or E(w_t)) not finite, or the loss that
        defines the run above ``divergence_factor`` × its value at step 0 (which t = 0 records)."""
        key = value if (self.objective == "val" and value is not None) else loss
        if t == 0:
            state = state._replace(ref_loss=key.detach().to(state.ref_loss.dtype))
        limit = _divergence.loss_limit(state.ref_loss, state.settings.divergence_factor)
        if value is None:
            return _fail(state, t, [_nonfinite(loss), key > limit], (1, 3))
        return _fail(state, t, [_nonfinite(loss), _nonfinite(value), key > limit], (1, 2, 3))

    def optimizer_step(self, state: OnlineState, grad: Any, t: int, hvp: Any = None) -> OnlineState:
        r"""s_{t+1} = D(s_t, g_t, η_t), z_{t+1} = μ_t A_t z_t + B_t (closed-form tangent of D, with
        A_t z = ∂D/∂s·z + ∂D/∂g·H_t z_w; ``hvp`` = H_t z_{t,w}, None for z_{t+1} = B_t)."""
        dyn = self.dynamics
        w0 = tree_leaves(dyn.params(state.opt))[0]
        dtype = w0.dtype
        lr = self.plan.per_row(state.lr.to(dtype), w0)  # the step runs in the model's dtype (η: float64)
        scale = None if hvp is None or self.unit_mu else self.plan.per_row(state.mu.to(dtype), w0)
        opt, z = self.plan.step(dyn, state.opt, grad, lr, t, state.z, hvp, scale)
        return state._replace(opt=opt, z=z, g_prev=grad)

    def update(self, state: OnlineState, oracle: "Oracle", t: int) -> tuple[OnlineState, dict]:
        r"""Step t: the hyper-update of iteration t−1 (t > 0) from v_t (``oracle.v``: ∇E(w_t) for
        ``objective="val"``; default for "train": the training gradient of this step), then
        s_{t+1}, z_{t+1}, from what the :class:`Oracle` says of w_t (``hvp`` required when
        ``needs_hvp`` and t > 0). Returns (state, aux) with aux = {"lr": η_t, "beta": β_t,
        "mu": μ_t, "h": h_t (NaN at t = 0), "loss": L_t} — the values step t used."""
        grad, loss, hvp, v, value = oracle
        if t > 0:
            if v is None or (isinstance(v, BufferShare) and v.grad is None):  # the training v (+ the buffers' share)
                if self.objective == "val":
                    raise ValueError("objective='val' needs v = ∇E(w_t) at every step t > 0")
                v = self.objective_gradient(state, grad, None if v is None else v.share)
            state = self.hyper_update(state, v, t)
            h = state.h
        else:
            h = torch.full_like(state.lr, math.nan)
        state = self.check_loss(state, loss, value, t)
        aux = {"lr": state.lr, "beta": state.beta, "mu": state.mu, "h": h, "loss": loss.detach()}
        if value is not None:  # E(w_t), named by a divergence of the validation loss
            aux["value"] = value.detach()
        if self.needs_hvp and t > 0:
            if hvp is None:
                raise ValueError("this engine needs hvp = H_t z_t (μ ≠ 0) at every step t > 0")
        else:
            hvp = None
        return self.optimizer_step(state, grad, t, hvp), aux

    def step(self, *args: Any, **kwargs: Any):
        """Renamed: ``Engine.update(state, Oracle(grad, loss, hvp, v, value), t)``."""
        raise TypeError("Engine.step(state, grad, t, loss=, hvp=, v=, value=) is now "
                        "Engine.update(state, Oracle(grad, loss, hvp, v, value), t)")

    def finish(self, state: OnlineState, v: Any, t: int) -> OnlineState:
        """The last hyper-update (h_T, η_T) after the loop, t = T."""
        return self.hyper_update(state, v, t)


def _refuse_old_flags(init: Callable) -> Callable:
    """Engine(donate=, owns_grad=, rows=) became one record: a TypeError naming it."""
    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        old = sorted({"donate", "owns_grad", "rows"} & set(kwargs))
        if old:
            raise TypeError(f"Engine(): {', '.join(old)} are now one record, plan=hgtoolkit.fastpaths."
                            "Plan.choose(needs_hvp, single_run=…, owns_grad=…, rows=…) (or Plan(donate=…, "
                            "direction_as_z=…, rows=…))")
        init(self, *args, **kwargs)
    return wrapper


Engine.__init__ = _refuse_old_flags(Engine.__init__)


# ----------------------------------------------------------------------------- gradients

def gradient_and_hvp(loss: Callable) -> Callable:
    """``fn(w, z_w, x) -> (∇ℓ(w, x), ℓ(w, x), H z_w)`` with ``torch.func`` (vmappable), the
    Hessian-vector product as ∇_w(∇ℓ(w)·z_w) (reverse over reverse: H is symmetric). ``loss``
    is ``problem.train_loss`` (x = t; a Problem stands for it) or ``problem.batch_loss`` (x = a
    minibatch). Reverse over reverse rounds like :func:`run`'s plain-autograd double backward,
    so a batched run equals the single one (why not forward over reverse: docs/performance.md)."""
    grad_loss = grad_and_value(loss.train_loss if hasattr(loss, "train_loss") else loss)

    def fn(w, z_w, x):
        def along_z(w_):
            g, value = grad_loss(w_, x)
            return tree_dot(g, z_w), (g, value)
        hz, (g, value) = torch.func.grad(along_z, has_aux=True)(w)
        return g, value, hz

    return fn


def _check_scalar(value: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"problem.{name} must return a scalar (one-element) tensor, got {shape}")
    return value.reshape(())


# ----------------------------------------------------------------------------- the driver

def setup(problem, settings: dict, mu_rule: Callable | None = None):
    """Validate :func:`run`'s arguments: (problem (resampled for ``seed``), HyperConfig,
    dynamics, T, eval_every, val_batch_size, the record's config). Shared with
    :mod:`hgtoolkit.batched`. ``settings``: :func:`run`'s settings (those of
    :class:`~hgtoolkit.settings.OnlineSettings`, bound by :func:`hgtoolkit.settings.bind`)."""
    check_problem(problem)
    cfg = hyper_config(mu_rule=mu_rule, **_settings.given_only(settings))  # what was passed, as passed
    settings = _settings.check(OnlineSettings, _plain(settings))
    dyn = _dynamics.get(settings["optimizer"])
    T = settings["steps"]
    eval_every, val_batch_size, seed = settings["eval_every"], settings["val_batch_size"], settings["seed"]
    if eval_every is None:  # E(w_t) is free every step with the val objective
        eval_every = 1 if cfg.objective == "val" and val_batch_size is None else T
    if val_batch_size is not None:
        if cfg.objective != "val":
            raise ValueError("val_batch_size is for objective='val' (a validation minibatch per step)")
        if getattr(problem, "val_batch", None) is None:
            raise ValueError(f"val_batch_size needs a problem with val_batch(t, size) and batch_loss "
                             f"(e.g. problems.mnist_mlp); {problem.name!r} has none")
    if seed is not None:
        if problem.resample is not None:
            problem = problem.resample(seed)
    config = {**cfg.description, "optimizer": dyn.config(), "steps": T, "eval_every": eval_every,
              "seed": seed, "problem": problem.describe()}
    if val_batch_size is not None:
        config["val_batch_size"] = val_batch_size
    return problem, cfg, dyn, T, eval_every, val_batch_size, config


def engine_for(cfg: HyperConfig, dyn: _dynamics.Dynamics, needs_hvp: bool | None = None,
               single_run: bool = False, owns_grad: bool = True) -> Engine:
    """The :class:`Engine` of a run with settings ``cfg`` (``needs_hvp`` may be forced on for a
    batch that mixes HD with other methods); ``single_run``, ``owns_grad``: what
    :meth:`hgtoolkit.fastpaths.Plan.choose` picks the engine's fast paths from."""
    needs = cfg.needs_hvp if needs_hvp is None else needs_hvp
    unit_mu = needs_hvp is None and cfg.mu_rule is None and cfg.mu0 == 1.0
    plan = _fastpaths.Plan.choose(needs, single_run=single_run, owns_grad=owns_grad)
    return Engine(dyn, cfg.objective, needs, cfg.mu_rule, cfg.hd_gradient == "regularised",
                  unit_mu, cfg.beta_adaptive, plan)


def divergence_of(config: dict, auxes: list[dict], state: OnlineState) -> "_divergence.Divergence | None":
    """The :class:`hgtoolkit.divergence.Divergence` of a run that stopped (None when it did not):
    its step, the quantity (the training or the validation loss, h, η, β) and its value."""
    step = int(state.diverged_at)
    if step < 0:
        return None
    why = int(state.why)
    aux = auxes[step] if step < len(auxes) else {}
    value = None
    if why in (1, 2, 3):
        value = aux.get("value") if (why == 2 or (why == 3 and "value" in aux)) else aux.get("loss")
    elif why == 5:
        value = state.lr
    objective = "val" if why == 3 and "value" in aux else "train"
    return _divergence.from_code(step, why, None if value is None else float(value), objective)


def report_divergence(div: "_divergence.Divergence | None", method: str, raise_on_divergence: bool,
                      stacklevel: int = 2) -> None:
    """A stopped online run's :class:`DivergenceWarning` (or :class:`DivergenceError`)."""
    if div is None:
        return
    if raise_on_divergence:
        raise div.error()
    div.warn(f"online {method} run stopped: ", f" (result.diverged_at={div.step})", stacklevel=stacklevel + 1)


class _SingleRun:
    """One run of :func:`run` as :func:`hgtoolkit.drive.drive` drives it: autograd gradients
    and HVPs of the problem's losses, the per-step ``aux`` kept as tensors (one sync per step:
    the divergence test) and the evaluations (k, E(w_k), validation accuracy)."""

    def __init__(self, problem, engine: Engine, cfg: HyperConfig, val_bs: int | None):
        self.problem, self.engine, self.cfg, self.val_bs = problem, engine, cfg, val_bs
        self.auxes: list[dict] = []
        self.times: list[float] = []
        self.evals: list[tuple[int, float, float]] = []
        self.state = None
        self.start = time.perf_counter()

    def gradient(self, w, z_w, t):
        if z_w is None:
            (g, loss), hz = autograd_gradient(self.problem.train_loss, w, t), None
        else:
            g, loss, hz = autograd_gradient_hvp(self.problem.train_loss, w, z_w, t)
        return g, _check_scalar(loss, "train_loss"), hz

    def objective(self, w, t, g, loss):
        """(v_t, E(w_t) or None) for the val objective: E = L_t's gradient already computed
        where the problem's validation loss is its training loss, else the full validation
        set or a minibatch of it (none at t = 0 with a minibatch: h_0 is not formed)."""
        problem = self.problem
        if self.cfg.objective != "val":
            return None, None
        if problem.val_is_train:
            return (g, loss) if g is not None else self.gradient(w, None, t)[:2]
        if self.val_bs is not None:
            if t == 0:
                return None, None
            return autograd_gradient(problem.batch_loss, w, problem.val_batch(t, self.val_bs))[0], None
        g, value = autograd_gradient(problem.val_loss, w)
        return g, _check_scalar(value, "val_loss")

    def evaluate(self, k, w, value=None) -> tuple[int, float, float]:
        """(k, E(w_k), validation accuracy): one forward pass when the metrics give E too; at
        k = 0 (w_0 = params0) the problem's cached evaluation."""
        problem, acc, metrics = self.problem, math.nan, None
        if k == 0:
            metrics = problem.initial_metrics()
            acc = float(metrics.get("val_accuracy", math.nan))
        elif problem.metrics is not None:
            metrics = problem.metrics(w)
            acc = float(metrics.get("val_accuracy", math.nan))
        if value is None:
            value = metrics.get("val_loss") if metrics is not None else None
        if value is None:
            with torch.no_grad():
                value = problem.val_loss(w)
        return k, float(value), acc

    def update(self, state, oracle, t):
        return self.engine.update(state, oracle, t)

    def record(self, t, state, aux, pending):
        self.auxes.append(aux)
        self.times.append(time.perf_counter() - self.start)
        if int(state.diverged_at) >= 0:
            self.state = state
            return None
        if pending is not None:
            self.evals.append(pending)
        return state

    def close(self, state, steps):
        engine = self.engine
        state, v, value = closing_update(engine, self, state, steps)
        if int(state.diverged_at) < 0:
            state = engine.finish(state, v, steps)
            self.auxes.append({"h": state.h})
        if int(state.diverged_at) < 0:
            self.evals.append(self.evaluate(steps, engine.dynamics.params(state.opt), value))
        return state


class _BufferedRun(CarriedBuffers, _SingleRun):
    """:class:`_SingleRun` of a stateful problem: b_t and its tangent carried
    (:class:`hgtoolkit.carried.CarriedBuffers`)."""


@_settings.takes(OnlineSettings)
def run(problem, method: str = "marthe", optimizer: "str | _dynamics.Dynamics" = "sgd", *,
        mu_rule: Callable | None = None, progress: bool = False, raise_on_divergence: bool = False,
        keep_params: bool = True, **settings: Any) -> OnlineResult:
    r"""Train ``problem`` for ``steps`` steps while adapting η online (module docstring): a loop
    driven by :func:`hgtoolkit.drive.drive` (:meth:`Engine.update` at every step).

    Arguments:
        method: ``"hd"`` (μ ≡ 0), ``"rtho"`` (μ ≡ 1) or ``"marthe"`` (μ and β fixed or adaptive).
        optimizer: the dynamics Φ (``"sgd"``, ``"nesterov"``, ``"adam"``, … or a
            :mod:`hgtoolkit.dynamics` object).
        lr: η_0 ≥ 0.
        hypergrad_lr: β ≥ 0, or ``"auto"`` (MARTHE; the default there): β_0 =
            ``hypergrad_lr_init`` and β_{t+1} = max(β_t + κ h_{t+1} h_t, 0)
            (``hypergrad_lr_rule="hh"``) or the authors'-code variant max(β_t + κ h_{t+1} η_{t+1}, 0)
            (``hypergrad_lr_rule="h_eta"``); κ = ``kappa``; bounded by
            β_{t+1} ≤ ``hypergrad_lr_bound``·max(η_{t+1}, η_0)/|h_{t+1}| (None: unbounded).
            (``beta``, ``beta0``, ``beta_rule``, ``beta_bound``: the old names, accepted
            with a ``FutureWarning`` until 0.2.)
        mu: MARTHE's μ: a number in [0, 1] or ``"auto"`` (the default: the heuristic of
            :func:`hgtoolkit.marthe.adaptive_mu`, starting from μ_0 = 0). ``mu_rule``:
            a tensor function ``(mu, counter, stats) -> (mu, counter)`` replacing it.
        objective: ``"val"``: h_{t+1} = ∇E(w_{t+1})·z_{t+1}, E = ``problem.val_loss`` (or a
            fresh validation minibatch of ``val_batch_size`` examples per step, as the authors'
            code does); ``"train"``: the next minibatch's training gradient, as in HD — of the
            regularised loss when the optimizer has weight decay (``hd_gradient="raw"``: without).
        lr_floor: η is clipped to ≥ lr_floor (default 0); None allows η < 0 ("unlearning", as
            Baydin et al.).
        lr_max: the run is declared divergent when |η| exceeds it (default 1e6·lr; no bound
            when lr = 0). ``divergence_factor``: also when the run's loss (E(w_t) for "val",
            L_t for "train") exceeds this multiple of its initial value (default 2; None: off).
            Non-finite losses, h or β always count as divergence (non-finite parameters
            make the next loss non-finite).
        eval_every: record E(w_k) (and accuracy) every this many steps, plus at 0 and the end;
            default every step for "val" with the full validation set (E(w_t) comes with its
            gradient), else only w_0 and w_T (an evaluation costs a validation forward pass).
        seed: for problems with ``resample`` (stochastic minibatch order), run on
            ``problem.resample(seed)``; ignored by deterministic problems.
        progress: show a tqdm bar. ``keep_params``: keep w_T in the record.
        raise_on_divergence: raise :class:`DivergenceError` instead of recording and warning.

    On divergence the run stops at the offending step, records it in ``result.diverged_at``
    and warns (:class:`hgtoolkit.errors.DivergenceWarning`). Computation happens on the
    problem's device and dtype.

    >>> import hgtoolkit
    >>> from hgtoolkit import online, problems
    >>> r = online.run(problems.from_function("beale"), "rtho", lr=1e-3, hypergrad_lr=1e-7, steps=100)
    >>> r.lrs.shape, r.hypergrads.shape
    ((100,), (100,))
    """
    settings = _settings.bind(OnlineSettings, {"method": method, "optimizer": optimizer, **settings}, "run")
    problem, cfg, dyn, T, eval_every, val_bs, config = setup(problem, settings, mu_rule)
    engine = engine_for(cfg, dyn, single_run=True)
    state = engine.init(problem.params0, cfg)
    runs = (_BufferedRun if problem.stateful else _SingleRun)(problem, engine, cfg, val_bs)
    state = drive(engine, runs, state, T, eval_every=eval_every,
                  progress=progress, desc=f"online {cfg.method}",
                  postfix=lambda aux, _: {"lr": f"{float(aux['lr']):.3g}", "loss": f"{float(aux['loss']):.4g}"})
    state = runs.state if state is None else state
    auxes, times, evals, start = runs.auxes, runs.times, runs.evals, runs.start
    wall = time.perf_counter() - start
    final = tree_clone(dyn.params(state.opt)) if keep_params else None
    result = build_result(config, auxes, times, evals, state, wall, problem.metrics is not None, final)
    report_divergence(divergence_of(config, auxes, state), cfg.method, raise_on_divergence)
    return result


def build_result(config: dict, auxes: list[dict], times: list[float], evals: list, state: OnlineState,
                 wall: float, has_metrics: bool, final_params: Any) -> OnlineResult:
    """The record of one run from the per-step ``aux`` of :meth:`Engine.update` (plus a last
    ``{"h": h_T}``), the evaluations (k, E(w_k), accuracy) and the final state. Arrays are cut
    to the n = ``diverged_at`` steps that ran (NaN-padded where a value was not formed)."""
    diverged_at = int(state.diverged_at)
    n = len([a for a in auxes if "lr" in a]) if diverged_at < 0 else diverged_at

    def column(key, shift=0):
        vals = [float(a[key]) for a in auxes[shift:] if key in a][:n]
        return np.asarray(vals + [math.nan] * (n - len(vals)), dtype=np.float64)

    keep = [e for e in evals if e[0] <= n]
    step_times = np.asarray((times + [math.nan] * n)[:n], dtype=np.float64)
    div = divergence_of(config, auxes, state)
    divergence = None if div is None else div.message
    return OnlineResult(
        config=config, lrs=column("lr"), hypergrad_lrs=column("beta"), mus=column("mu"),
        hypergrads=column("h", shift=1), train_losses=column("loss"), step_times=step_times,
        eval_steps=np.asarray([e[0] for e in keep], dtype=np.int64),
        val_losses=np.asarray([e[1] for e in keep], dtype=np.float64),
        val_accuracy=(np.asarray([e[2] for e in keep], dtype=np.float64) if has_metrics else None),
        final_lr=float(state.lr) if diverged_at < 0 else math.nan,
        diverged_at=None if diverged_at < 0 else diverged_at, divergence=divergence,
        wall_time=wall, final_params=final_params if diverged_at < 0 else None,
        hypergrad_lr_capped=int(state.beta_capped))


def find_hypergrad_lr(problem, start: float = 1.0, *, factor: float = 10.0, max_tries: int = 12,
                      verbose: bool = False, **run_kwargs: Any) -> OnlineResult:
    r"""The MARTHE paper's wrapper: start from a large hyper-learning rate and decimate it (divide
    by ``factor``) until the run does not diverge (by any criterion of :func:`run`, the loss
    rising above ``divergence_factor`` × its initial value included).

    The searched value is κ when ``hypergrad_lr="auto"`` (MARTHE's default) and β =
    ``hypergrad_lr`` otherwise (so ``method="hd"``/``"rtho"``, or MARTHE with a fixed β: pass
    ``hypergrad_lr=<anything numeric>``). ``start`` is the first value tried. Other keyword
    arguments go to :func:`run` (``method``, ``lr``, ``steps``, …). Returns the first run that
    did not diverge; its ``config["hypergrad_lr_search"]`` lists every value tried with the step
    it diverged at. Raises :class:`hgtoolkit.errors.DivergenceError` if all ``max_tries``
    values diverge.

    >>> from hgtoolkit import online, problems
    >>> r = online.find_hypergrad_lr(problems.from_function("beale"), start=1.0, method="rtho",
    ...                              lr=1e-3, steps=50)
    >>> r.diverged_at is None
    True
    """
    run_kwargs = _errors.check_renamed("find_hypergrad_lr", run_kwargs, takes=_settings.specs(OnlineSettings))
    method = run_kwargs.get("method", "marthe")
    beta = run_kwargs.get("hypergrad_lr", "auto" if method == "marthe" else None)
    name = "kappa" if beta == "auto" else "hypergrad_lr"
    run_kwargs.pop(name, None)
    if name == "kappa":
        run_kwargs["hypergrad_lr"] = "auto"
    for arg, val in (("start", start), ("factor", factor)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val) or val <= 0:
            raise ValueError(f"{arg} must be a positive number, got {val!r}")
    if factor <= 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive int, got {max_tries!r}")
    run_kwargs.pop("raise_on_divergence", None)

    tried, value, result = [], float(start), None
    for _ in range(max_tries):
        with _divergence.recorded() as seen:  # expected: the record of every value tried says it
            result = run(problem, **{**run_kwargs, name: value})
        tried.append({name: value, "diverged_at": result.diverged_at, "divergence": result.divergence})
        if verbose:
            print(f"find_hypergrad_lr: {name}={value:.3g} -> "
                  f"{'diverged at step %d' % result.diverged_at if result.diverged else 'ok'}")
        if not result.diverged:
            result.config["hypergrad_lr_search"] = tried
            return result
        value /= factor
    raise seen[-1].error(prefix=f"find_hypergrad_lr: all {max_tries} values of {name} from {start:g} down to "
                            f"{value * factor:g} diverged; the last: ")


#: Its old name (docs/glossary.md): calling it raises, naming :func:`find_hypergrad_lr`.
find_beta = _errors.moved("hgtoolkit.online.find_beta", "hgtoolkit.online.find_hypergrad_lr")
