r"""MARTHE's own rules (Donini et al. 2020): adaptive μ and adaptive β (the β search wrapper is
:func:`hgtoolkit.online.find_hypergrad_lr`).

MARTHE is the online recursion of :mod:`hgtoolkit.online` with the discount μ and the
hyper-learning rate β adapted during the run. The rules here are tensor functions (they run
under ``torch.func.vmap``, one entry per run), called by the engine after every LR update
with a :class:`HyperStats` record of iteration t:

    η_{t+1} = max(η_t − β_t h_{t+1}, 0)        (already done when the rules run)
    μ_{t+1}, c_{t+1} = mu_rule(μ_t, c_t, stats)
    β_{t+1}          = beta_rule(β_t, κ, stats)

Any callable with the signature of :func:`adaptive_mu` can replace the μ rule
(``online.run(..., mu_rule=my_rule)``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .errors import moved

__all__ = ["HyperStats", "adaptive_mu", "beta_rule_hh", "beta_rule_h_eta", "BETA_RULES",
           "check_mu_rule"]


class HyperStats(NamedTuple):
    """What the rules may use after the LR update of iteration t (0-d tensors; under
    ``torch.func.vmap`` one entry per run).

    ``lr`` = η_{t+1} (after clipping), ``prev_lr`` = η_t, ``hypergrad`` = h_{t+1},
    ``prev_hypergrad`` = h_t (h_0 = 0), ``grad_dot`` = v_{t+1}·g_t: the objective's gradient
    at w_{t+1} (∇E, or the next training gradient for objective="train") times the training
    gradient g_t that step t used.
    """

    t: Any
    lr: Any
    prev_lr: Any
    hypergrad: Any
    prev_hypergrad: Any
    grad_dot: Any


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.float64)


def adaptive_mu(mu: Any, counter: Any, stats: HyperStats) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The authors' heuristic for μ (MARTHE, Appendix A, as in their reference code):

        q = η_{t+1} / (∇E(w_{t+1})·g_t),   z = clip(q, 0, 1),
        c_{t+1} = c_t·sign(μ_t) + μ_t,      μ_{t+1} = z^{1/(c_{t+1} + 1)}.

    q > 0 says the step just taken still pointed downhill for E (an ex-post one-step descent
    check); q ≤ 0 (overshoot, or no information when ∇E·g_t = 0) gives z = 0, so μ = 0 and
    the counter c — the sum of the μ's since the last reset, an effective horizon — restarts.
    The longer the streak, the closer μ = z^{1/(c+1)} gets to 1. Starting from μ_0 = c_0 = 0
    the rule does not depend on the initial μ. Returns (μ_{t+1}, c_{t+1}) as tensors.

    A replacement rule (``online.run(..., mu_rule=...)``) has this signature and must be a
    *tensor function*: torch operations only (``torch.where`` instead of ``if``, no
    ``float()``), so that it runs under ``torch.func.vmap`` for batched runs.
    """
    mu, counter = _tensor(mu), _tensor(counter)
    lr, grad_dot = _tensor(stats.lr), _tensor(stats.grad_dot)
    positive = grad_dot > 0
    q = torch.where(positive, lr / torch.where(positive, grad_dot, torch.ones_like(grad_dot)),
                    torch.zeros_like(grad_dot))
    z = q.clamp(0.0, 1.0)
    counter = torch.where(mu > 0, counter, torch.zeros_like(counter)) + mu  # c·sign(μ) + μ
    return z ** (1.0 / (counter + 1.0)), counter


def beta_rule_hh(beta: Any, kappa: Any, stats: HyperStats) -> torch.Tensor:
    r"""β_{t+1} = max(β_t + κ·h_{t+1}·h_t, 0): one hypergradient step on β, treating
    dη_{t+1}/dβ ≈ −h_{t+1} (the same one-step reasoning as HD, one level up)."""
    return (_tensor(beta) + kappa * _tensor(stats.hypergrad) * _tensor(stats.prev_hypergrad)).clamp_min(0.0)


def beta_rule_h_eta(beta: Any, kappa: Any, stats: HyperStats) -> torch.Tensor:
    r"""β_{t+1} = max(β_t + κ·h_{t+1}·η_{t+1}, 0): the variant in the authors' public code."""
    return (_tensor(beta) + kappa * _tensor(stats.hypergrad) * _tensor(stats.lr)).clamp_min(0.0)


BETA_RULES = {"hh": beta_rule_hh, "h_eta": beta_rule_h_eta}


def check_mu_rule(rule: Any) -> None:
    """Raise ``TypeError`` unless ``rule(mu, counter, stats) -> (mu, counter)`` is a tensor
    function that runs under ``torch.func.vmap`` (probed on two dummy runs)."""
    if not callable(rule):
        raise TypeError(f"mu_rule must be callable as mu_rule(mu, counter, stats) -> (mu, counter), "
                        f"got {type(rule).__name__}")
    x = torch.tensor([0.5, 0.0], dtype=torch.float64)
    stats = HyperStats(*(x.clone() for _ in HyperStats._fields))

    def probe(mu, c, s):
        out = rule(mu, c, s)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"returned {type(out).__name__}, not a (mu, counter) pair")
        return tuple(torch.as_tensor(o, dtype=mu.dtype) + 0 * mu for o in out)

    try:
        torch.func.vmap(probe)(x, x.clone(), stats)
    except Exception as exc:  # noqa: BLE001 - any failure means the rule is not usable batched
        raise TypeError(f"mu_rule must be a tensor function (torch operations only: torch.where "
                        f"instead of if/else, no float()/math on tensors) returning (mu, counter); "
                        f"calling it under torch.func.vmap failed: {exc}") from None


find_beta = moved("hgtoolkit.marthe.find_beta", "hgtoolkit.online.find_hypergrad_lr")
