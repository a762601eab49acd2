"""hgtoolkit: learning-rate schedules through hypergradients.

Exact hypergradients of a whole schedule (reverse and forward mode), LRS-OPT, online
approximations (HD, RTHO, MARTHE), hyperoptimizer towers, and the analysis of how far the
online estimates are from the exact ones.
"""
from . import dynamics, problems
from .errors import DivergenceError
from .exact import HypergradResult, directional_derivative, finite_difference, hypergradient
from .problems import Problem
from .trajectory import train

__version__ = "0.1.0"

__all__ = ["Problem", "hypergradient", "directional_derivative", "finite_difference", "train",
           "HypergradResult", "DivergenceError", "dynamics", "problems"]
