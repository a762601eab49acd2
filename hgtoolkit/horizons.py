r"""Horizons: short-horizon bias on the noisy quadratic model, and truncated-horizon references.

Wu, Ren, Liao, Grosse (ICLR 2018), docs/methods.md, "Horizons". Notation: schedule η = (η_0 … η_{T−1})
(Wu et al.'s α_t), momentum schedule μ_t, curvatures h_i, gradient-noise variances c_i
(``testfunctions.NoisyQuadratic``; Wu et al.'s σ_i² = c_i/h_i² is the variance of the
per-step optimum c_i in *parameter* space).

Noisy quadratic model, exactly (Wu et al. Thm 1)
------------------------------------------------
SGD with momentum in Wu et al.'s form, v_{t+1} = μ_t v_t − η_t g_t, w_{t+1} = w_t + v_{t+1},
g_t = h⊙w_t + √c⊙ξ_t (for a constant η this is ``torch.optim.SGD``'s heavy ball with
b = −v/η). Per coordinate, with Σ_t = Cov(w_t, v_t):

    E v'  = μ E v − ηh E w ;                    E w' = E w + E v'
    V v'  = μ² V v + (ηh)² V w − 2μηh Σ + η² c
    V w'  = (1 − 2ηh) V w + V v' + 2μ Σ
    Σ'    = μ Σ − ηh V w + V v'                  (w_0 = nqm.w0 deterministic, v_0 = 0)

and E L(w_T) = ½ Σ_i h_i (E[w_i]² + V[w_i]) (the noise-free loss; Wu et al.'s irreducible
½Σh_iσ_i² is left out, as in their reported numbers). μ = 0 gives plain SGD,
A_{t+1} = (1 − η_t h)² A_t + η_t² c with A = E[w²]. Pure torch: differentiable in η and μ.

Greedy schedule (Thm 2): minimise E L(w_{t+1}) over (η_t, μ_t) given the moments at t; with
A_w = E[w]² + V w, A_v = E[v]² + V v, m = E[w v] = E w E v + Σ, S_v = Σ h A_v:

    η* = [Σh²A_w · S_v − (Σh m)(Σh² m)] / [Σ(h³A_w + h c) · S_v − (Σh² m)²]
    μ* = −Σ h (1 − η* h) m / S_v

(S_v = 0, i.e. v = 0 at t = 0 or without momentum: μ* = 0, η* = Σh²A_w / Σ(h³A_w + h c).)

Truncated-horizon references (any problem)
------------------------------------------
d⁽ᴷ⁾_t = ∂E(w_{min(t+K, T)})/∂η_t = ∇E(w_{t+K})ᵀ A_{t+K−1} ⋯ A_{t+1} B_t: K = 1 is the one-step
reference of :func:`hgtoolkit.analysis.exact_references`, K ≥ T the full hypergradient
g_t = ∂E(w_T)/∂η_t. :func:`truncated_ladder` computes a whole ladder of K's from one reverse
pass and one forward pass (not T unrolls):

- g (every K ≥ T, and the tail t ≥ T − K of every K, where min(t+K, T) = T) is ONE reverse-mode
  hypergradient (:func:`hgtoolkit.exact.hypergradient`, O(T) steps);
- the head t < T − K of the K < T rungs: W = max{K < T} tangent columns in a ring buffer (slot
  j holds z⁽ᵗ⁾ = ∂s/∂η_t for the column t ≡ j mod W started at step t), all advanced by one
  ``vmap``-ed jvp of Φ_t per step (column t is restarted at step t with LR tangent 1, giving
  B_t); d⁽ᴷ⁾_t = ∇E(w_{t+K})·z⁽ᵗ⁾ is read when column t is K steps old.

Cost: T jvps of width W plus ≤ T gradients of E plus one reverse pass, memory W states —
O(T·W) work in T sequential calls, against T(T+1)/2 steps for T separate unrolls; a ladder
(1, 10, T) costs width 10, not T.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from . import dynamics as _dynamics
from ._tree import tree_dot, tree_map
from .exact import hypergradient
from .lrsopt import ScheduleResult, optimize_schedule
from .problems import Problem
from .divergence import VALIDATION_LOSS, check_finite
from .errors import renamed
from ._step import Step, objective as step_objective
from .carried import advance_columns, state_dot
from .trajectory import check_lrs, initial_state, make_step, progress_bar, tangent_step

__all__ = ["NQMMoments", "GreedySchedule", "nqm_moments", "nqm_expected_loss", "nqm_value_and_grad",
           "greedy_schedule",
           "optimal_schedule", "truncated", "truncated_ladder", "nqm_spectrum"]


class NQMMoments(NamedTuple):
    """Per-coordinate moments of (w_t, v_t): E w, E v, V w, V v, Σ = Cov(w, v)."""

    mean_w: torch.Tensor
    mean_v: torch.Tensor
    var_w: torch.Tensor
    var_v: torch.Tensor
    cov: torch.Tensor

    def expected_loss(self, h: torch.Tensor) -> torch.Tensor:
        """E L(w) = ½ Σ h (E[w]² + V w)."""
        return 0.5 * (h * (self.mean_w ** 2 + self.var_w)).sum()


class GreedySchedule(NamedTuple):
    """Greedy (one-step optimal) schedule: ``lrs`` η_t, ``momentum`` μ_t (None without),
    ``losses[t]`` = E L(w_t) for t = 0 … T."""

    lrs: torch.Tensor
    momentum: torch.Tensor | None
    losses: torch.Tensor


def _check_nqm(nqm: Any) -> None:
    if not all(hasattr(nqm, a) for a in ("h", "c", "w0")):
        raise TypeError(f"nqm must be a testfunctions.NoisyQuadratic, got {type(nqm).__name__}")


def _as_schedule(x: Any, T: int | None, nqm, argname: str) -> torch.Tensor:
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{argname} must be a number or a 1-D schedule, got {type(x).__name__}")
    try:
        t = torch.as_tensor(x, dtype=nqm.dtype, device=nqm.device) if not isinstance(x, torch.Tensor) \
            else x.to(dtype=nqm.dtype, device=nqm.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{argname} must contain numbers: {exc}") from None
    if t.ndim == 0 and T is not None:
        t = t.expand(T)
    if t.ndim != 1 or (T is not None and len(t) != T):
        raise ValueError(f"{argname} must be a number or a 1-D schedule of length {T}, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{argname} contains NaN or inf")
    return t


def _moment_step(m: NQMMoments, h, c, eta, mu) -> NQMMoments:
    """One step of Wu et al.'s Thm 1 recursion (see the module docstring)."""
    eh = eta * h
    mean_v = mu * m.mean_v - eh * m.mean_w
    var_v = mu * mu * m.var_v + eh * eh * m.var_w - 2 * mu * eh * m.cov + eta * eta * c
    var_w = (1 - 2 * eh) * m.var_w + var_v + 2 * mu * m.cov
    cov = mu * m.cov - eh * m.var_w + var_v
    return NQMMoments(m.mean_w + mean_v, mean_v, var_w, var_v, cov)


def _initial(nqm) -> NQMMoments:
    z = torch.zeros_like(nqm.w0)
    return NQMMoments(nqm.w0, z, z, z, z)


def nqm_moments(nqm, lrs: Any, momentum: Any = None, *, history: bool = False):
    """Exact moments of (w_T, v_T) after T = len(lrs) steps (Thm 1); ``history=True`` returns
    the list of moments at t = 0 … T. ``momentum``: None (plain SGD), a number or a schedule."""
    _check_nqm(nqm)
    eta = _as_schedule(lrs, None, nqm, "lrs")
    mu = torch.zeros_like(eta) if momentum is None else _as_schedule(momentum, len(eta), nqm, "momentum")
    m, out = _initial(nqm), []
    for t in range(len(eta)):
        out.append(m)
        m = _moment_step(m, nqm.h, nqm.c, eta[t], mu[t])
    out.append(m)
    return out if history else m


def nqm_expected_loss(nqm, lrs: Any, momentum: Any = None) -> torch.Tensor:
    r"""E L(w_T) = ½ Σ_i h_i (E[w_{T,i}]² + V[w_{T,i}]) of SGD (``momentum=None``) or SGD with
    momentum (a number or a schedule μ_t) with schedule ``lrs`` on ``nqm`` — exact, by the
    recursions of the module docstring, and differentiable in ``lrs`` and ``momentum``.

    >>> import torch; from testfunctions import NoisyQuadratic
    >>> nqm = NoisyQuadratic(torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), 1.0)
    >>> float(nqm_expected_loss(nqm, [0.5]))   # ½·(1 − 0.5)²
    0.125
    """
    return nqm_moments(nqm, lrs, momentum).expected_loss(nqm.h)


def nqm_value_and_grad(nqm, lrs: Any, momentum: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    r"""(E L(w_T), ∂E L/∂η, ∂E L/∂μ) — the value of :func:`nqm_expected_loss` with its gradient
    by a hand-written adjoint of the module docstring's recursion (no autograd graph; what
    LRS-OPT calls; its speed: docs/performance.md). With a = η_t h, b = 1 − a,
    μ = μ_t, per coordinate::

        means       (E w, E v)' = M_t (E w, E v),                M_t = [[b, μ], [−a, μ]]
        covariances (V w, V v, Σ)' = C_t (V w, V v, Σ) + η_t² c·(1, 1, 1),
                    C_t = [[b², μ², 2μb], [a², μ², −2μa], [−ab, μ², μ(b−a)]]

    (the docstring's V w' = (1 − 2a)V w + V v' + 2μΣ and Σ' = μΣ − aV w + V v' expanded), and
    E L = ½ Σ h (E w_T² + V w_T). Adjoints ν_T = (h E w_T, 0), ν_t = M_tᵀ ν_{t+1};
    λ_T = (h/2, 0, 0), λ_t = C_tᵀ λ_{t+1}; then

        ∂E L/∂η_t = Σ_i h ν_{t+1}ᵀ ∂M/∂a (E w, E v)_t + h λ_{t+1}ᵀ ∂C/∂a (V w, V v, Σ)_t
                    + 2η_t c (λ_{t+1}·(1, 1, 1)),       and likewise ∂/∂μ_t with ∂M/∂μ, ∂C/∂μ.

    The means are propagated without squaring, so a deterministic NQM (c = 0, where the
    covariance part is skipped) keeps full relative precision down to tiny losses.
    ``momentum=None``: plain SGD; the third return value is then None. Computed in float64
    numpy on the CPU; returned as tensors of the NQM's dtype and device."""
    _check_nqm(nqm)
    eta_t = _as_schedule(lrs, None, nqm, "lrs")
    T = len(eta_t)
    mu_t = None if momentum is None else _as_schedule(momentum, T, nqm, "momentum")
    np_ = lambda x: x.detach().cpu().to(torch.float64).numpy()
    h, c, eta = np_(nqm.h), np_(nqm.c), np_(eta_t)
    mu = np.zeros(T) if mu_t is None else np_(mu_t)
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging schedule gives inf: LRS-OPT reports it
        a = eta[:, None] * h
        b = 1.0 - a
        mu_ = mu[:, None]
        new = lambda: np.zeros((T + 1, len(h)))
        # means: forward, then adjoint ν
        Ew, Ev, nw, nv = new(), new(), new(), new()
        Ew[0] = np_(nqm.w0.expand_as(nqm.h))
        for t in range(T):
            Ev[t + 1] = mu[t] * Ev[t] - a[t] * Ew[t]
            Ew[t + 1] = Ew[t] + Ev[t + 1]
        nw[T] = h * Ew[T]
        for t in range(T - 1, -1, -1):
            nw[t] = b[t] * nw[t + 1] - a[t] * nv[t + 1]
            nv[t] = mu[t] * (nw[t + 1] + nv[t + 1])
        Ns = nw[1:] + nv[1:]
        g_eta = -(h * Ns * Ew[:-1]).sum(1)
        g_mu = (Ns * Ev[:-1]).sum(1)
        value = 0.5 * float((h * Ew[T] ** 2).sum())
        if bool((c != 0).any()):  # covariances: forward, then adjoint λ
            m2 = mu * mu
            B2, A2, AB, P, Q, R = b * b, a * a, a * b, 2 * mu_ * b, 2 * mu_ * a, mu_ * (b - a)
            N = (eta * eta)[:, None] * c
            Vw, Vv, S, lw, lv, lm = new(), new(), new(), new(), new(), new()
            for t in range(T):
                x = m2[t] * Vv[t] + N[t]
                Vw[t + 1] = B2[t] * Vw[t] + P[t] * S[t] + x
                Vv[t + 1] = A2[t] * Vw[t] - Q[t] * S[t] + x
                S[t + 1] = R[t] * S[t] - AB[t] * Vw[t] + x
            lw[T] = 0.5 * h
            for t in range(T - 1, -1, -1):
                lw[t] = B2[t] * lw[t + 1] + A2[t] * lv[t + 1] - AB[t] * lm[t + 1]
                lv[t] = m2[t] * (lw[t + 1] + lv[t + 1] + lm[t + 1])
                lm[t] = P[t] * lw[t + 1] - Q[t] * lv[t + 1] + R[t] * lm[t + 1]
            Lw, Lv, Lm = lw[1:], lv[1:], lm[1:]
            Ls = Lw + Lv + Lm
            Sw, Sv, Ss = Vw[:-1], Vv[:-1], S[:-1]
            da = Sw * (-2 * b * Lw + 2 * a * Lv + (2 * a - 1) * Lm) - 2 * mu_ * Ss * Ls  # λᵀ ∂C/∂a s
            g_eta = g_eta + (da * h).sum(1) + 2 * eta * (Ls * c).sum(1)
            g_mu = g_mu + (2 * mu_ * Sv * Ls + Ss * (2 * b * Lw - 2 * a * Lv + (b - a) * Lm)).sum(1)
            value += 0.5 * float((h * Vw[T]).sum())
    tt = lambda x: torch.as_tensor(x, dtype=nqm.dtype, device=nqm.device)
    return tt(value), tt(g_eta), None if mu_t is None else tt(g_mu)

def _greedy_step(m: NQMMoments, h, c, momentum: bool):
    Aw = m.mean_w ** 2 + m.var_w
    Av = m.mean_v ** 2 + m.var_v
    mm = m.mean_w * m.mean_v + m.cov
    Sv = (h * Av).sum()
    num0, den0 = (h * h * Aw).sum(), (h ** 3 * Aw + h * c).sum()
    if not momentum or float(Sv) == 0.0:
        return num0 / den0, torch.zeros_like(Sv)
    s1, s2 = (h * mm).sum(), (h * h * mm).sum()
    eta = (num0 * Sv - s1 * s2) / (den0 * Sv - s2 * s2)
    mu = -(h * (1 - eta * h) * mm).sum() / Sv
    return eta, mu


def greedy_schedule(nqm, T: int, momentum: bool = False) -> GreedySchedule:
    r"""Wu et al.'s Thm 2: at every step the (η_t, μ_t) that minimise E L(w_{t+1}) given the
    exact moments at t (closed form in the module docstring; ``momentum=False``: η_t only,
    η*_t = Σh²A_t / Σ(h³A_t + h c)). In 1-D this is η*_t = A_0/(h((t+1)A_0 + σ²)) and gives
    A_T = A_0σ²/(T A_0 + σ²), σ² = c/h²; with c = 0 and momentum it is conjugate gradient."""
    _check_nqm(nqm)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int ≥ 1, got {T!r}")
    if not isinstance(momentum, bool):
        raise TypeError(f"momentum must be True or False, got {momentum!r}")
    m = _initial(nqm)
    lrs, mus, losses = [], [], [m.expected_loss(nqm.h)]
    for _ in range(T):
        eta, mu = _greedy_step(m, nqm.h, nqm.c, momentum)
        m = _moment_step(m, nqm.h, nqm.c, eta, mu)
        lrs.append(eta)
        mus.append(mu)
        losses.append(m.expected_loss(nqm.h))
    return GreedySchedule(torch.stack(lrs), torch.stack(mus) if momentum else None, torch.stack(losses))


def nqm_spectrum(d: int = 1000, kappa: float = 1000.0, kind: str = "chebyshev", *,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""Curvatures h_1 ≥ … ≥ h_d in [1/κ, 1]. ``"chebyshev"``: the Chebyshev points of the
    interval, h_i = (1+1/κ)/2 + (1−1/κ)/2·cos(π(i−½)/d), clustered at both ends (a stand-in for
    the Li (2005) worst case for CG that Wu et al. use; their exact formula is UNVERIFIED);
    ``"geometric"``: log-uniformly spaced."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int ≥ 1, got {d!r}")
    if not kappa >= 1:
        raise ValueError(f"kappa must be ≥ 1, got {kappa!r}")
    i = torch.arange(1, d + 1, dtype=dtype)
    lo = 1.0 / kappa
    if kind == "chebyshev":
        return (1 + lo) / 2 + (1 - lo) / 2 * torch.cos(torch.pi * (i - 0.5) / d)
    if kind == "geometric":
        return torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), d, dtype=dtype)
    raise ValueError(f"unknown kind={kind!r}; choose 'chebyshev' or 'geometric'")


def _nqm_problem(nqm) -> Problem:
    """The NQM as a :class:`Problem` (device, dtype and ``describe`` for LRS-OPT's record)."""
    return Problem(nqm.w0.clone(), lambda w, t: nqm.sample_loss(w, t, 0), nqm.loss, name="noisy_quadratic",
                   info={"d": nqm.dim, "objective": "exact expected loss (Wu et al. Thm 1)"})


@renamed(lrs0="lrs")
def optimal_schedule(nqm, T: int, momentum: bool = False, *, lrs: Any = None, momentum0: Any = 0.9,
                     outer_steps: int = 500, outer_lr: float | None = None,
                     outer_optimizer: str = "lbfgsb", lr_max: float | None = None,
                     momentum_max: float = 1.0, outer_options: dict | None = None,
                     progress: bool = False) -> ScheduleResult:
    r"""LRS-OPT on the exact expected loss: minimise f(η, μ) = E L(w_T) (:func:`nqm_expected_loss`)
    over the LR schedule (and, with ``momentum=True``, the momentum schedule) by
    :func:`hgtoolkit.lrsopt.optimize_schedule` with the exact gradient (the adjoint of the
    moment recursion, :func:`nqm_value_and_grad`), 0 ≤ η_t ≤ ``lr_max``, 0 ≤ μ_t ≤ ``momentum_max``.

    With momentum the optimised vector is the concatenation (η_0 … η_{T−1}, μ_0 … μ_{T−1}):
    ``result.best_lrs[:T]`` is the LR schedule, ``result.best_lrs[T:]`` the momentum schedule.
    ``lrs`` defaults to the constant 1/max(h) (halved with momentum); ``lr_max`` caps η (Wu
    et al. cap it so that no coordinate's loss blows up; 2/max(h) keeps plain SGD stable);
    ``momentum_max`` may be ``math.inf``. ``outer_options``: extra L-BFGS-B options, e.g.
    ``{"ftol": 0, "gtol": 0}`` when the loss is tiny (σ = 0), where scipy's absolute
    tolerances would stop at once.
    """
    _check_nqm(nqm)
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int ≥ 1, got {T!r}")
    if not isinstance(momentum, bool):
        raise TypeError(f"momentum must be True or False, got {momentum!r}")
    hmax = float(nqm.h.max())
    eta0 = _as_schedule((0.5 if momentum else 1.0) / hmax if lrs is None else lrs, T, nqm, "lrs")
    if momentum:
        x0 = torch.cat([eta0, _as_schedule(momentum0, T, nqm, "momentum0")])
        inf = float("inf") if lr_max is None else float(lr_max)
        bound = torch.cat([torch.full((T,), inf, dtype=nqm.dtype), torch.full((T,), float(momentum_max), dtype=nqm.dtype)])

        def objective(x):
            value, g_eta, g_mu = nqm_value_and_grad(nqm, x[:T], x[T:])
            return value, torch.cat([g_eta, g_mu])
    else:
        x0, bound = eta0, lr_max

        def objective(x):
            return nqm_value_and_grad(nqm, x)[:2]

    return optimize_schedule(_nqm_problem(nqm), x0, outer_steps, outer_lr, outer_optimizer,
                             lr_max=bound, outer_options=outer_options, progress=progress, objective=objective)


# ----------------------------------------------------------------------------- truncated horizons

def _check_K(K: Any, argname: str = "K") -> int:
    if isinstance(K, bool) or not isinstance(K, int):
        raise TypeError(f"{argname} must be an int ≥ 1, got {K!r}")
    if K < 1:
        raise ValueError(f"{argname} must be ≥ 1, got {K}")
    return K


def truncated_ladder(problem, lrs: Any, Ks: Sequence[int], optimizer: "str | _dynamics.Dynamics" = "sgd", *,
                     memory: "int | str | None" = None, progress: bool = False) -> dict[int, torch.Tensor]:
    r"""{K: d⁽ᴷ⁾} for every K in ``Ks``, d⁽ᴷ⁾_t = ∂E(w_{min(t+K, T)})/∂η_t: one reverse pass for
    g (K ≥ T and every tail t ≥ T − K) and one forward pass with W = max{K < T} tangent columns
    in a ring buffer for the heads (module docstring). ``memory``: the reverse pass's budget
    (:func:`hgtoolkit.hypergradient`: it checkpoints long T to fit; the ring buffer adds W
    training states)."""
    if isinstance(Ks, (int, str, bytes)) or not hasattr(Ks, "__iter__"):
        raise TypeError(f"Ks must be a sequence of ints, got {Ks!r}")
    Ks = [_check_K(k, "Ks") for k in Ks]
    if not Ks:
        raise ValueError("Ks is empty")
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)
    T = len(lrs)
    g = hypergradient(problem, lrs, dyn, mode="reverse", memory=memory).grad
    out = {k: g.clone() for k in Ks}  # the tail t ≥ T − K (all of it for K ≥ T) is g
    short = [k for k in Ks if k < T]
    if short and problem.stateful:
        _stateful_heads(problem, dyn, lrs, short, out, progress)
    elif short:
        W = max(short)  # ring-buffer width
        step = make_step(problem, dyn)
        grad_E = grad_and_value(problem.val_loss)
        state = dyn.init(problem.params0)
        Z = tree_map(lambda x: x.new_zeros((W, *x.shape)), state)
        slots = torch.arange(W, device=lrs.device)
        for s in progress_bar(range(T - 1), progress, desc="truncated horizons", leave=False):
            j = s % W  # column s starts here; the slot held column s − W, finished at w_s
            keep = (slots != j).to(lrs.dtype)
            Z = tree_map(lambda z: z * keep.view(W, *([1] * (z.dim() - 1))), Z)
            dlr = (slots == j).to(lrs.dtype)
            fn = lambda z, d, t=s, st=state: tangent_step(step, st, lrs[t], t, z, d)
            state, Z, loss = vmap(fn, in_dims=(0, 0), out_dims=(None, 0, None), randomness="same")(Z, dlr)
            check_finite(loss, s)
            ends = [k for k in short if k <= s + 1]  # column s + 1 − k is k steps old
            if not ends:
                continue
            gE, E = grad_E(dyn.params(state))
            check_finite(E, s, dyn.params(state), VALIDATION_LOSS)
            band = vmap(lambda z: tree_dot(gE, dyn.params(z)))(Z)  # ∂E(w_{s+1})/∂η_t, t ≡ slot
            for k in ends:
                out[k][s + 1 - k] = band[(s + 1 - k) % W]
    for k, v in out.items():
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(f"truncated hypergradient K={k} has non-finite entries")
    return {k: v.detach() for k, v in out.items()}


def _stateful_heads(problem, dyn, lrs: torch.Tensor, short: list, out: dict, progress: bool) -> None:
    r"""The heads t < T − K of the K < T rungs for a stateful problem: the same ring buffer of
    W = max(short) columns, each a tangent (z_opt, z_b) of the state with its buffers, advanced
    column by column by the exact forward mode's step (:func:`hgtoolkit.carried.advance_columns`:
    the jvp of (g_t, b_{t+1}), no ``vmap``), and d⁽ᴷ⁾_t = ⟨∇_w E, z_w⟩ + ⟨∇_b E, z_b⟩."""
    W, T = max(short), len(lrs)
    state, Z = initial_state(problem, dyn), [None] * W
    for s in progress_bar(range(T - 1), progress, desc="truncated horizons", leave=False):
        j = s % W  # column s starts here; the slot held column s − W, finished at w_s
        Z[j] = None
        st = Step(problem, dyn, state, s, graph=any(z is not None for z in Z))
        check_finite(st.loss, s)
        state, Z = advance_columns(st, dyn, lrs[s], s, Z, [1.0 if i == j else None for i in range(W)])
        ends = [k for k in short if k <= s + 1]  # column s + 1 − k is k steps old
        if ends:
            lam, E = step_objective(problem, dyn, state)
            check_finite(E, s, dyn.params(state), VALIDATION_LOSS)
            for k in ends:
                out[k][s + 1 - k] = state_dot(lam, Z[(s + 1 - k) % W])


def truncated(problem, lrs: Any, K: int, optimizer: "str | _dynamics.Dynamics" = "sgd", *,
              memory: "int | str | None" = None, progress: bool = False) -> torch.Tensor:
    r"""d⁽ᴷ⁾_t = ∂E(w_{min(t+K, T)})/∂η_t for t = 0 … T−1 (the hypergradient seen through a
    horizon of K steps; K = 1: one-step reference, K ≥ T: ``hypergradient(...).grad``), by
    :func:`truncated_ladder` (one reverse pass plus, for K < T, T − 1 jvps of width K)."""
    K = _check_K(K)
    return truncated_ladder(problem, lrs, [K], optimizer, memory=memory, progress=progress)[K]
