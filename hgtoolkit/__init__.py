"""hgtoolkit: learning-rate schedules through hypergradients.

- exact hypergradients of a whole schedule: :func:`hypergradient` (reverse / forward / autograd),
  :func:`directional_derivative`, :func:`finite_difference`; schedule optimisation in
  :mod:`hgtoolkit.lrsopt` (LRS-OPT);
- online approximations HD, RTHO and MARTHE: :mod:`hgtoolkit.online` (functional engine),
  :mod:`hgtoolkit.optim` (drop-in ``torch.optim`` optimizers), :mod:`hgtoolkit.marthe`;
- hyperoptimizer towers: :mod:`hgtoolkit.towers`;
- short-horizon bias (exact noisy-quadratic moments, greedy/optimal schedules, truncated-horizon
  references): :mod:`hgtoolkit.horizons`; HDM / HDM-HB (hypergradient descent as online
  learning, deterministic problems): :mod:`hgtoolkit.hdm`;
- how far an online estimate is from the exact one: :mod:`hgtoolkit.analysis`,
  :mod:`hgtoolkit.testing`;
- every result (``HypergradResult``, ``OnlineResult``, ``ScheduleResult``, ``TowerResult``, the
  peers', HDM's and the analyses' records) saves and loads with one codec: :func:`save`
  ``(result, path) -> Path`` (the JSON written) and :func:`load` ``(path)``, checksummed
  (:mod:`hgtoolkit.records`); divergence is one rule and one record: :mod:`hgtoolkit.divergence`;
- a live explorer for Jupyter (sliders for η₀, β, μ, κ, the method and the horizon):
  :func:`explore` (module :mod:`hgtoolkit.explore`).
"""
from . import analysis, baselines, dynamics, hdm, horizons, lrsopt, marthe, online, optim, problems, testing, towers
from . import divergence, records
from .divergence import DivergenceError, DivergenceWarning
from .explore import explore  # the function; the module stays importable as hgtoolkit.explore
from .exact import HypergradResult, directional_derivative, finite_difference, hypergradient
from .lrsopt import ScheduleResult, optimize_schedule
from .online import OnlineResult
from .problems import Problem
from .records import load, save
from .trajectory import train

__version__ = "0.1.0"

__all__ = ["Problem", "explore", "save", "load", "divergence", "records", "hypergradient", "directional_derivative", "finite_difference", "train",
           "HypergradResult", "OnlineResult", "ScheduleResult", "optimize_schedule", "DivergenceError", "DivergenceWarning", "analysis", "baselines",
           "dynamics", "hdm", "horizons", "lrsopt", "marthe", "online", "optim", "problems", "testing", "towers"]
