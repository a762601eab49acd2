"""Optimisation test problems for learning-rate and hypergradient experiments.

* :mod:`testfunctions.analytic`: 2-D analytic functions (Beale, Bukin N.6, a
  smooth and a sharp-valley Bukin variant, Rosenbrock) with hand-derived gradients and Hessians,
  plus plotting metadata, in the registry :data:`FUNCTIONS` / :func:`get`.
* :mod:`testfunctions.noisy_quadratic`: the noisy quadratic model with
  reproducible stochastic gradients and the exact expected loss of SGD as a
  differentiable function of the learning-rate schedule.
"""

from .analytic import (FUNCTIONS, TestFunction, beale, bukin6, bukin_sharp, bukin_smooth, get,
                       rosenbrock)
from .noisy_quadratic import NoisyQuadratic

__all__ = [
    "TestFunction",
    "beale",
    "bukin6",
    "bukin_smooth",
    "bukin_sharp",
    "rosenbrock",
    "FUNCTIONS",
    "get",
    "NoisyQuadratic",
]
