r"""HDM, HDM-HB and HDM-Best: hypergradient descent as online learning (Chu, Gao, Ye, Udell, ICML 2025).

Deterministic, L-smooth ``min_x f(x)`` (docs/methods.md, "Horizons and HDM"). One iteration scores the stepsize
P (a scalar αI or a nonnegative diagonal) — and with heavy-ball momentum the coefficient β —
by the normalised one-step progress at a *trial* point

    x̃ = x − P∇f(x) + β d,   d = x − x⁻  (d = 0, β = 0 without momentum)
    h(P, β) = [f(x̃) − f(x)] / D,   D = ‖∇f(x)‖² + (τ/2)‖d‖²                        (A.2, A.5)
    ∂h/∂P = −∇f(x̃) ⊙ ∇f(x) / D  (diagonal),  −⟨∇f(x̃), ∇f(x)⟩ / D  (scalar)
    ∂h/∂β = ⟨∇f(x̃), d⟩ / D

and updates them by element-wise AdaGrad with projection (A.3, A.4.2–3):

    U ← U + G⊙G,  P ← clip(P − η_p G/(√U + 1e-12), 0, P_max);  v ← v + g_β², β ← clip(β − η_b g_β/(√v + 1e-12), 0, β_max)

Stabilisation (A.4): (1) null step — move to x̃ only if f(x̃) < f(x), else stay (P and β are
updated either way; x⁻ ← x before the test, so a rejected trial zeroes the next momentum
term); (4) hyper-LR decay — every ``decay_every`` iterations η_p ← max(0.8η_p, 1e-3η_p⁰)
until curvature is estimated; (5) curvature estimate and restart — on accepted steps with
‖x̃ − x‖ > 1e-3 record ‖∇f(x̃) − ∇f(x)‖/‖x̃ − x‖; a counter goes +1 per accepted step and −2
per null step (≥ 0); when it passes max(min(max_iter/4, 200), 20): L̂ = mean of the records,
η_p = 1/L̂, U = 0, and τ/2 = L̂²/4 (before: τ/2·‖d‖² ≡ 1e-12). Defaults are HDM-Best's (A.6):
P_0 = 0 (the first trial is x itself, a wasted evaluation after which every P_i = η_p),
β_0 = 0.95, β_max = 0.9995, P_max = 1e10/L, η_p = 10/L, η_b = 10.

Each iteration costs exactly one gradient and one function evaluation, both at x̃ (an accepted
trial's gradient is the next iterate's); ``init`` costs one of each at x_0. Both are counted.

Relation to Baydin et al.'s HD (A.8): SGD-HD updates α_t = α_{t−1} + β_hd ∇f(θ_{t−1})·∇f(θ_{t−2})
from the same raw signal — the gradient after a step dotted with the gradient that produced
it, i.e. −∂f(θ_{t−1})/∂α (the one-step hypergradient d⁽¹⁾ of :mod:`hgtoolkit.analysis`).
HDM (i) divides it by ‖∇f(x)‖² (scale-free, bounded by 1 + L‖P‖), (ii) measures it at a trial
point and accepts or rejects the step, (iii) uses AdaGrad with projection instead of a constant
β_hd, (iv) allows a diagonal P and learns β, (v) is full-batch and deterministic, and (vi)
costs one extra function evaluation per iteration. With ``mode="scalar"``, ``momentum=False``,
``null_steps=False``, ``adagrad=False``, ``normalise=False`` and ``schedule_hyper_lr=False``
(no decay/restart of η_p = β_hd) the step is Baydin's HD (its
update applied after instead of before the step). h is a one-step (greedy) objective, so the
short-horizon analysis of :mod:`hgtoolkit.horizons` applies: optimal on deterministic problems,
biased toward small steps under noise.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np
import torch
from torch.func import grad_and_value

from . import divergence as _divergence
from . import dynamics as _dynamics
from . import records
from .errors import renamed
from .hyperstep import hypergradient, level_update

__all__ = ["HDMConfig", "HDMState", "HDMResult", "TrialStep", "init", "step", "run", "surrogate",
           "surrogate_grad", "MODES"]

MODES = ("scalar", "diag")
Oracle = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class HDMConfig:
    """Hyperparameters (module docstring). ``eta_p``/``p_max`` default to 10/L and 1e10/L;
    ``schedule_hyper_lr`` switches the η_p decay and the curvature restart (A.4.4–5)."""

    L: float
    mode: str = "diag"
    momentum: bool = True
    eta_p: float | None = None
    eta_b: float = 10.0
    p0: float = 0.0
    momentum_init: float = 0.95
    momentum_max: float = 0.9995
    p_max: float | None = None
    null_steps: bool = True
    adagrad: bool = True
    normalise: bool = True
    schedule_hyper_lr: bool = True
    decay_every: int = 50
    restart_after: int = 200
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if isinstance(self.L, bool) or not isinstance(self.L, (int, float)) or not (self.L > 0 and math.isfinite(self.L)):
            raise ValueError(f"L must be a finite number > 0, got {self.L!r}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode={self.mode!r}; choose one of {MODES}")
        for name in ("eta_p", "p_max"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name} must be None or > 0, got {v!r}")
        if not (0 <= self.momentum_init <= self.momentum_max < 1):
            raise ValueError(f"momentum_init and momentum_max need 0 ≤ momentum_init ≤ momentum_max < 1, got {self.momentum_init}, {self.momentum_max}")
        if not self.eta_b > 0 or not self.p0 >= 0:
            raise ValueError(f"eta_b must be > 0 and p0 ≥ 0, got eta_b={self.eta_b}, p0={self.p0}")
        for name in ("decay_every", "restart_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {v!r}")

    @property
    def eta_p0(self) -> float:
        return 10.0 / self.L if self.eta_p is None else float(self.eta_p)

    @property
    def p_upper(self) -> float:
        return 1e10 / self.L if self.p_max is None else float(self.p_max)


HDMConfig.__init__ = renamed(beta0="momentum_init", beta_max="momentum_max")(HDMConfig.__init__)


class HDMState(NamedTuple):
    """Tensors for what has the shape of x or θ, Python numbers for the counters. ``x``,
    ``x_prev``, ``fx``, ``gx`` = f and ∇f at x; ``theta`` = θ = (P, β): the stepsize (one entry,
    or one per coordinate) then β when it is learnt (``momentum=True``), ``acc`` (the AdaGrad
    accumulators of θ: U, v), ``eta`` (the hyper-LR of each entry: η_p for P, η_b for β),
    ``upper`` (the box [0, upper]: P_max, β_max); ``momentum`` (β, the heavy-ball coefficient:
    the last entry of θ, or a constant 0; was ``beta``); ``tau_half`` (0 until curvature is estimated); ``curv_sum``/``curv_count`` (records of
    ‖Δg‖/‖Δx‖ until then); ``counter``; ``k`` (iterations); ``n_grad``/``n_f`` (evaluations);
    ``accepted`` (last trial moved x); ``feedback`` = h(P, β) and ``grad_P`` = ∂h/∂P of the last
    iteration. ``P``, ``U``, ``v`` and ``eta_p`` read their parts of θ, ``acc`` and ``eta``."""

    x: torch.Tensor
    x_prev: torch.Tensor
    fx: torch.Tensor
    gx: torch.Tensor
    theta: torch.Tensor
    acc: torch.Tensor
    eta: torch.Tensor
    upper: torch.Tensor
    momentum: torch.Tensor
    tau_half: float
    curv_sum: float
    curv_count: int
    counter: int
    k: int
    n_grad: int
    n_f: int
    accepted: bool
    feedback: torch.Tensor
    grad_P: torch.Tensor

    @property
    def beta(self):
        """The old name of :attr:`momentum`: raises, naming it."""
        raise AttributeError("HDMState.beta was renamed HDMState.momentum (the heavy-ball coefficient β; "
                             "docs/glossary.md)")

    @property
    def n_p(self) -> int:
        """Entries of P in θ (1: a scalar stepsize)."""
        return self.grad_P.numel()

    def _part(self, vec: torch.Tensor) -> torch.Tensor:
        return vec[:self.n_p].reshape(self.grad_P.shape)

    @property
    def P(self) -> torch.Tensor:
        return self._part(self.theta)

    @property
    def U(self) -> torch.Tensor:
        return self._part(self.acc)

    @property
    def v(self) -> torch.Tensor:
        return self.acc[self.n_p] if self.acc.numel() > self.n_p else torch.zeros_like(self.acc[0])

    @property
    def eta_p(self) -> torch.Tensor:
        return self.eta[0]


@dataclass(frozen=True)
class TrialStep(_dynamics.Dynamics):
    r"""HDM's trial update as a :mod:`hgtoolkit.dynamics` step, the level whose hyperparameters
    HDM learns: heavy ball x̃ = x − P⊙g + β d on the state {"w": x, "d": d = x − x⁻} (without
    "d": no momentum term), ``lr`` = P (a number or one per coordinate), ``momentum`` = β; the
    new state is {"w": x̃, "d": x̃ − x}. Its :meth:`hyper_vjp` in closed form:
    ⟨v, ∂x̃/∂P⟩ = −v⊙g (summed for a scalar P), ⟨v, ∂x̃/∂β⟩ = ⟨v, d⟩."""

    momentum: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("momentum",)
    name: ClassVar[str] = "hdm-trial"

    def init(self, params: Any) -> dict:
        return {"w": params, "d": torch.zeros_like(params)}

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        x = state["w"]
        new = x - lr * grad
        if "d" not in state:
            return {"w": new}
        new = new + hyper.get("momentum", self.momentum) * state["d"]
        return {"w": new, "d": new - x}

    def hyper_vjp(self, state: dict, grad: Any, lr: Any, t: int, bar_w: Any, names: tuple[str, ...],
                  kept: dict | None = None, **hyper: Any) -> dict[str, torch.Tensor]:
        out = {}
        for n in names:
            if n == "lr":
                gP = -(bar_w * grad)
                out[n] = gP if isinstance(lr, torch.Tensor) and lr.ndim else gP.sum()
            elif n == "momentum":
                out[n] = (bar_w * state["d"]).sum()
            else:
                raise TypeError(f"TrialStep has no hyperparameter {n!r}")
        return out


@renamed(beta="momentum")
def surrogate(f: Callable, x: torch.Tensor, P: Any, momentum: Any = 0.0, x_prev: torch.Tensor | None = None,
              tau_half: float = 0.0) -> torch.Tensor:
    """h(P, β) = [f(x − P∇f(x) + β(x − x⁻)) − f(x)] / (‖∇f(x)‖² + τ/2‖x − x⁻‖²) (differentiable in P, β;
    β = ``momentum``, the heavy-ball coefficient, was ``beta=``)."""
    g, fx = grad_and_value(f)(x)
    d = torch.zeros_like(x) if x_prev is None else x - x_prev
    D = (g * g).sum() + tau_half * (d * d).sum()
    return (f(x - P * g + momentum * d) - fx) / D


def _names(momentum: bool) -> tuple[str, ...]:
    return ("lr", "momentum") if momentum else ("lr",)


def _hypergrad(trial: dict, g: torch.Tensor, P: torch.Tensor, beta: torch.Tensor, g_trial: torch.Tensor,
               D: torch.Tensor) -> torch.Tensor:
    """(∂h/∂P, ∂h/∂β) as one vector: the hypergradient of the trial update (the one hyper-level
    step, :func:`hgtoolkit.hyperstep.hypergradient`) with cotangent ∇f(x̃)/D."""
    return hypergradient(_TRIAL, trial, g, 0, g_trial / D, _names("d" in trial),
                         {"lr": P, "momentum": beta})


def surrogate_grad(g_trial: torch.Tensor, g: torch.Tensor, d: torch.Tensor, D: torch.Tensor,
                   mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂h/∂P, ∂h/∂β) from ∇f(x̃), ∇f(x), d and D (module docstring): the hypergradient of the
    trial update x̃ = x − P⊙g + β d, the one hyper-level step of :mod:`hgtoolkit.hyperstep`."""
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    P = zero if mode == "scalar" else torch.zeros_like(g)
    G = _hypergrad({"w": torch.zeros_like(d), "d": d}, g, P, zero, g_trial, D)
    return (G[0] if mode == "scalar" else G[:-1]), G[-1]


_TRIAL = TrialStep()


@functools.lru_cache(maxsize=None)
def _level(adagrad: bool, eps: float) -> _dynamics.Dynamics:
    """The dynamics of θ's level: AdaGrad (ε) or, with a constant hyper-LR, SGD."""
    return _dynamics.AdaGrad(eps=eps) if adagrad else _dynamics.SGD()


HDMState.__new__ = renamed(beta="momentum")(HDMState.__new__)  # HDMState(beta=…): a TypeError naming it


def init(config: HDMConfig, x0: torch.Tensor, oracle: Oracle) -> HDMState:
    """State at x_0 (one f and ∇f evaluation)."""
    if not isinstance(x0, torch.Tensor) or x0.ndim != 1 or not x0.is_floating_point():
        got = (f"{x0.dtype} of shape {tuple(x0.shape)}" if isinstance(x0, torch.Tensor) else type(x0).__name__)
        raise TypeError(f"x0 must be a 1-D floating-point tensor, got {got}")
    fx, gx = oracle(x0)
    s = lambda v: torch.tensor(v, dtype=x0.dtype, device=x0.device)
    n_p = 1 if config.mode == "scalar" else x0.numel()
    full = lambda p, b: torch.cat([torch.full((n_p,), p, dtype=x0.dtype, device=x0.device),
                                   *([s(b).reshape(1)] if config.momentum else [])])
    theta = full(config.p0, config.momentum_init)
    z = s(0.0)
    grad_P = z if config.mode == "scalar" else torch.zeros_like(x0)
    momentum = theta[-1] if config.momentum else z
    return HDMState(x0, x0, fx.detach(), gx.detach(), theta, torch.zeros_like(theta),
                    full(config.eta_p0, config.eta_b), full(config.p_upper, config.momentum_max), momentum,
                    0.0, 0.0, 0, 0, 0, 1, 1, True, z, grad_P)


def step(config: HDMConfig, state: HDMState, oracle: Oracle, max_iter: int = 1000) -> HDMState:
    """One HDM/HDM-HB iteration (module docstring); ``max_iter`` sets the restart threshold.

    Two levels of the one hyper-level step (:mod:`hgtoolkit.hyperstep`): the trial update
    x̃ = :class:`TrialStep` (stepsize P, momentum β), then θ = (P, β) ←
    Π_[0, upper](AdaGrad(θ, G; η)) (SGD with ``adagrad=False``) with G = its hypergradient at
    cotangent ∇f(x̃)/D; HDM's own parts around them: the normalisation D, the null step, the
    curvature record and the η_p schedule."""
    c, st = config, state
    x, g = st.x, st.gx
    n_p, P = st.n_p, st.P
    estimated = st.tau_half > 0 or not c.schedule_hyper_lr
    trial = {"w": x, "d": x - st.x_prev} if c.momentum else {"w": x}
    if c.normalise:
        D = (g * g).sum()
        if c.momentum:  # + τ/2‖d‖², ≡ 1e-12 until curvature is estimated
            D = D + (st.tau_half * (trial["d"] * trial["d"]).sum() if st.tau_half > 0 else 1e-12)
    else:
        D = torch.ones((), dtype=x.dtype, device=x.device)
    x_trial = _TRIAL.step(trial, g, P, 0, momentum=st.momentum)["w"]
    f_t, g_t = oracle(x_trial)
    f_t, g_t = f_t.detach(), g_t.detach()
    feedback = (f_t - st.fx) / D
    G = _hypergrad(trial, g, P, st.momentum, g_t, D)
    ok = torch.isfinite(f_t) & torch.isfinite(g_t).all()
    accept = bool(ok & (f_t < st.fx) if c.null_steps else ok)
    # θ's level: AdaGrad (or a constant hyper-LR) with projection onto [0, upper]
    G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
    level = {"w": st.theta, "G": st.acc} if c.adagrad else {"w": st.theta}
    new = level_update(_level(c.adagrad, c.eps), level, G, 0, {"lr": st.eta},
                       bounds=(torch.zeros_like(st.upper), st.upper), differentiable=False)
    theta, acc = new["w"], new.get("G", st.acc)
    # curvature record and counter (A.4.5), until curvature is estimated
    curv_sum, curv_count = st.curv_sum, st.curv_count
    counter = st.counter + 1 if accept else max(st.counter - 2, 0)
    if accept and not estimated:
        step_len, dg = torch.stack([(x_trial - x).norm(), (g_t - g).norm()]).tolist()
        if step_len > 1e-3:
            curv_sum, curv_count = curv_sum + dg / step_len, curv_count + 1
    k = st.k + 1
    eta, tau_half = st.eta, st.tau_half
    if not estimated and k % c.decay_every == 0:
        eta_p = torch.maximum(0.8 * st.eta_p, torch.full_like(st.eta_p, 1e-3 * c.eta_p0))
        eta = torch.cat([eta_p.expand(n_p), eta[n_p:]])
    threshold = max(min(max_iter // 4, c.restart_after), 20)
    if not estimated and counter > threshold and curv_count > 0:
        L_hat = curv_sum / curv_count
        eta = torch.cat([torch.full_like(eta[:n_p], 1.0 / L_hat), eta[n_p:]])
        acc, tau_half = torch.cat([torch.zeros_like(acc[:n_p]), acc[n_p:]]), L_hat * L_hat / 4
    x_new, fx, gx = (x_trial, f_t, g_t) if accept else (x, st.fx, g)
    return HDMState(x_new, x, fx, gx, theta, acc, eta, st.upper, theta[-1] if c.momentum else st.momentum, tau_half,
                    curv_sum, curv_count, counter, k, st.n_grad + 1, st.n_f + 1, accept, feedback,
                    G[:n_p].reshape(st.grad_P.shape))


# ----------------------------------------------------------------------------- the record

_ARRAYS = ("lrs", "momentums", "val_losses", "eval_steps", "grad_inf", "grad_evals", "accepted",
           "feedback", "train_losses", "val_accuracy", "step_times")


@records.register_run(redo="rerun it: `hdm.run(...).save(path)` or `python -m hgtoolkit reproduce hdm`")
@dataclass(repr=False)
class HDMResult(records.RunRecord):
    r"""One HDM run; arrays have one entry per iterate k = 0 … n (``eval_steps`` = k):
    ``val_losses[k]`` = f(x_k), ``grad_inf[k]`` = ‖∇f(x_k)‖∞, ``grad_evals[k]`` = gradient
    evaluations spent to reach x_k; and one per iteration k = 0 … n−1: ``lrs[k]`` = the
    stepsize P used (its mean for a diagonal P), ``momentums[k]`` = β (the learnt heavy-ball
    coefficient; was ``betas``), ``accepted[k]`` (1: the trial became x_{k+1}, 0: null step),
    ``feedback[k]`` = h(P, β). ``solved_at`` = gradient
    evaluations when ‖∇f‖∞ ≤ tol was first reached (NaN: not within ``max_iter``).
    ``train_losses`` = ``val_losses[:-1]`` (f before each iteration; the problem has one loss).
    """

    config: dict
    lrs: np.ndarray
    momentums: np.ndarray
    val_losses: np.ndarray
    eval_steps: np.ndarray
    grad_inf: np.ndarray
    grad_evals: np.ndarray
    accepted: np.ndarray
    feedback: np.ndarray
    train_losses: np.ndarray
    val_accuracy: np.ndarray | None = None
    step_times: np.ndarray | None = None
    solved_at: float = math.nan
    total_grad_evals: float = 0.0
    total_f_evals: float = 0.0
    diverged_at: int | None = None
    divergence: str | None = None
    wall_time: float = 0.0
    final_params: Any = None

    KIND = "hdm"
    ARRAYS = _ARRAYS
    SCALARS = ("solved_at", "total_grad_evals", "total_f_evals")
    #: version 5: ``betas`` → ``momentums``; older files load with their fields and config keys renamed
    VERSION = 5
    RENAMED_FIELDS = {"betas": "momentums"}
    CONFIG_RENAMED = {"beta0": "momentum_init", "beta_max": "momentum_max"}

    @property
    def solved(self) -> bool:
        return math.isfinite(self.solved_at)

    def __repr__(self) -> str:
        return (f"HDMResult({self.config.get('method', 'hdm')}, iterations={self.steps_run}, "
                f"f={self.final_val_loss:.6g}, solved_at={self.solved_at}, grad_evals={self.total_grad_evals:g})")


def _oracle(f: Callable) -> Oracle:
    def scalar_f(x):
        out = f(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"f must return a scalar (0-d) tensor, got {got}; reduce it, e.g. with .sum()")
        return out
    gv = grad_and_value(scalar_f)

    def oracle(x):
        g, fx = gv(x)
        return fx.detach(), g.detach()

    return oracle


def run(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, config: HDMConfig, *,
        max_iter: int = 1000, tol: float = 1e-4, label: str | None = None,
        oracle: Oracle | None = None) -> HDMResult:
    r"""Run HDM from ``x0`` until ‖∇f(x_k)‖∞ ≤ ``tol`` or ``max_iter`` iterations; ``f`` is a
    differentiable scalar function of a 1-D tensor (its gradient by ``torch.func``), or give
    ``oracle(x) -> (f(x), ∇f(x))`` (e.g. a closed-form gradient; then ``f`` is not called).
    A non-finite f(x_k) or x_k stops the run: ``result.diverged_at`` = k and a
    :class:`~hgtoolkit.divergence.DivergenceWarning` (:mod:`hgtoolkit.divergence`).

    >>> import torch
    >>> A = torch.tensor([1.0, 10.0], dtype=torch.float64)
    >>> r = run(lambda x: 0.5 * (A * x * x).sum(), torch.ones(2, dtype=torch.float64), HDMConfig(L=10.0))
    >>> r.solved
    True
    """
    if not callable(f):
        raise TypeError("f must be callable as f(x) -> scalar tensor")
    if oracle is not None and not callable(oracle):
        raise TypeError("oracle must be None or callable as oracle(x) -> (f(x), ∇f(x))")
    if not isinstance(config, HDMConfig):
        raise TypeError(f"config must be an HDMConfig, got {type(config).__name__}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int ≥ 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    oracle = _oracle(f) if oracle is None else oracle
    start = time.perf_counter()
    st = init(config, x0, oracle)
    fs, ginf, nge = [float(st.fx)], [float(st.gx.abs().max())], [st.n_grad]
    lrs, momentums, acc, fb, times = [], [], [], [], []
    solved_at = nge[0] if ginf[0] <= tol else math.nan
    diverged_at, divergence = None, None
    for k in range(max_iter):
        if math.isfinite(solved_at):
            break
        lrs.append(st.P.mean())  # tensors, read once at the end: one sync per iteration
        momentums.append(st.momentum)
        st = step(config, st, oracle, max_iter)
        acc.append(int(st.accepted))
        fb.append(st.feedback)
        fx, gi, x_ok = torch.stack([st.fx, st.gx.abs().max(), torch.isfinite(st.x).all().to(st.fx.dtype)]).tolist()
        fs.append(fx)
        ginf.append(gi)
        nge.append(st.n_grad)
        times.append(time.perf_counter() - start)
        if not (math.isfinite(fx) and x_ok):
            bad = (_divergence.Divergence(k, "objective f(x_k)", fx) if not math.isfinite(fx)
                   else _divergence.Divergence(k, "iterate x_k", None, "is not finite"))
            diverged_at, divergence = k, bad.message
            bad.warn("HDM stopped: ", f" (result.diverged_at={k})")
            break
        if gi <= tol:
            solved_at = nge[-1]
    lrs, momentums, fb = (torch.stack(v).tolist() if v else [] for v in (lrs, momentums, fb))
    arr = lambda v, dt=np.float64: np.asarray(v, dtype=dt)
    cfg = {"method": label or ("hdm-hb" if config.momentum else "hdm"), **records.to_jsonable(config.__dict__),
           "max_iter": max_iter, "tol": tol}
    return HDMResult(config=cfg, lrs=arr(lrs), momentums=arr(momentums), val_losses=arr(fs),
                     eval_steps=np.arange(len(fs)), grad_inf=arr(ginf), grad_evals=arr(nge, np.int64),
                     accepted=arr(acc, np.int8), feedback=arr(fb), train_losses=arr(fs[:-1]),
                     step_times=arr(times), solved_at=float(solved_at), total_grad_evals=float(st.n_grad),
                     total_f_evals=float(st.n_f), diverged_at=diverged_at, divergence=divergence,
                     wall_time=time.perf_counter() - start, final_params=st.x.detach().clone())
