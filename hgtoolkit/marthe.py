r"""MARTHE's own rules (Donini et al. 2020): adaptive μ, adaptive β, and the β search wrapper.

MARTHE is the online recursion of :mod:`hgtoolkit.online` with the discount μ and the
hyper-learning rate β adapted during the run. The rules here are plain functions of floats,
called by the engine after every LR update with a :class:`HyperStats` record of iteration t:

    η_{t+1} = max(η_t − β_t h_{t+1}, 0)        (already done when the rules run)
    μ_{t+1}, c_{t+1} = mu_rule(μ_t, c_t, stats)
    β_{t+1}          = beta_rule(β_t, κ, stats)

Any callable with the signature of :func:`adaptive_mu` can replace the μ rule
(``online.run(..., mu_rule=my_rule)``).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

__all__ = ["HyperStats", "adaptive_mu", "beta_rule_hh", "beta_rule_h_eta", "BETA_RULES",
           "find_beta"]


class HyperStats(NamedTuple):
    """What the rules may use after the LR update of iteration t.

    ``lr`` = η_{t+1} (after clipping), ``prev_lr`` = η_t, ``hypergrad`` = h_{t+1},
    ``prev_hypergrad`` = h_t (h_0 = 0), ``grad_dot`` = v_{t+1}·g_t: the objective's gradient
    at w_{t+1} (∇E, or the next training gradient for objective="train") times the training
    gradient g_t that step t used.
    """

    t: int
    lr: float
    prev_lr: float
    hypergrad: float
    prev_hypergrad: float
    grad_dot: float


def adaptive_mu(mu: float, counter: float, stats: HyperStats) -> tuple[float, float]:
    r"""The authors' heuristic for μ (MARTHE, Appendix A, as in their reference code):

        q = η_{t+1} / (∇E(w_{t+1})·g_t),   z = clip(q, 0, 1),
        c_{t+1} = c_t·sign(μ_t) + μ_t,      μ_{t+1} = z^{1/(c_{t+1} + 1)}.

    q > 0 says the step just taken still pointed downhill for E (an ex-post one-step descent
    check); q ≤ 0 (overshoot, or no information when ∇E·g_t = 0) gives z = 0, so μ = 0 and
    the counter c — the sum of the μ's since the last reset, an effective horizon — restarts.
    The longer the streak, the closer μ = z^{1/(c+1)} gets to 1. Starting from μ_0 = c_0 = 0
    the rule does not depend on the initial μ. Returns (μ_{t+1}, c_{t+1}).
    """
    q = stats.lr / stats.grad_dot if stats.grad_dot > 0 else 0.0
    z = min(max(q, 0.0), 1.0)
    counter = (counter if mu > 0 else 0.0) + mu  # c·sign(μ) + μ, μ ∈ [0, 1]
    return z ** (1.0 / (counter + 1.0)), counter


def beta_rule_hh(beta: float, kappa: float, stats: HyperStats) -> float:
    r"""β_{t+1} = max(β_t + κ·h_{t+1}·h_t, 0): one hypergradient step on β, treating
    dη_{t+1}/dβ ≈ −h_{t+1} (the same one-step reasoning as HD, one level up)."""
    return max(beta + kappa * stats.hypergrad * stats.prev_hypergrad, 0.0)


def beta_rule_h_eta(beta: float, kappa: float, stats: HyperStats) -> float:
    r"""β_{t+1} = max(β_t + κ·h_{t+1}·η_{t+1}, 0): the variant in the authors' public code."""
    return max(beta + kappa * stats.hypergrad * stats.lr, 0.0)


BETA_RULES = {"hh": beta_rule_hh, "h_eta": beta_rule_h_eta}


def find_beta(problem, start: float = 1.0, *, factor: float = 10.0, max_tries: int = 12,
              verbose: bool = False, **run_kwargs: Any):
    r"""The paper's wrapper: start from a large hyper-learning rate and divide it by ``factor``
    until the run does not diverge.

    The searched value is κ when ``beta="auto"`` (MARTHE's default) and β otherwise (so
    ``method="hd"``/``"rtho"``, or MARTHE with a fixed β: pass ``beta=<anything numeric>``).
    ``start`` is the first value tried. Other keyword arguments go to :func:`hgtoolkit.online.run` (``method``,
    ``lr0``, ``steps``, …). Returns the first run that did not diverge; its
    ``config["beta_search"]`` lists every value tried with the step it diverged at.
    Raises :class:`hgtoolkit.errors.DivergenceError` if all ``max_tries`` values diverge.

    >>> from hgtoolkit import marthe, problems
    >>> r = marthe.find_beta(problems.from_function("beale"), start=1.0, method="rtho",
    ...                      lr0=1e-3, steps=50)
    >>> r.diverged_at is None
    True
    """
    from . import online
    from .errors import DivergenceError, DivergenceWarning

    method = run_kwargs.get("method", "marthe")
    beta = run_kwargs.get("beta", "auto" if method == "marthe" else None)
    name = "kappa" if beta == "auto" else "beta"
    run_kwargs.pop(name, None)
    if name == "kappa":
        run_kwargs["beta"] = "auto"
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DivergenceWarning)
            result = online.run(problem, **{**run_kwargs, name: value})
        tried.append({name: value, "diverged_at": result.diverged_at})
        if verbose:
            print(f"find_beta: {name}={value:.3g} -> "
                  f"{'diverged at step %d' % result.diverged_at if result.diverged else 'ok'}")
        if not result.diverged:
            result.config["beta_search"] = tried
            return result
        value /= factor
    err = DivergenceError(result.diverged_at, "every value tried")
    err.args = (f"find_beta: all {max_tries} values of {name} from {start:g} down to "
                f"{value * factor:g} diverged",)
    raise err
