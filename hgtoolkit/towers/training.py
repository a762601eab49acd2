"""Tower runs (:mod:`hgtoolkit.towers`): :func:`run` trains a problem with a tower and records every
hyperparameter (:class:`History`, :class:`TowerResult`); :func:`analyse` compares its online LR
hypergradients with the exact ones along the learnt schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import divergence as _divergence
from .. import dynamics as _dynamics
from .. import records
from .. import settings as _settings
from ..divergence import VALIDATION_LOSS, check_finite
from ..drive import drive
from ..settings import TowerSettings
from ..trajectory import check_problem, loss_gradient
from .core import state_divergence
from .levels import History, Level, Scheduled, TowerMethod, TowerState, check_real, parse

__all__ = ["History", "TowerResult", "run", "analyse"]


@records.register("towers", version=2, params="params", readable=("history", "train_losses"),
                  migrations={1: lambda cls, d: {**d, "params": None}},  # old files: JSON only, no params
                  redo="rerun it: `python -m hgtoolkit towers ...` or `towers.run(...).save(path)`")
@dataclass
class TowerResult:
    """A tower run (:func:`run`): the record of every hyperparameter, per-step training losses,
    final validation loss E(w_T), validation metrics and final parameters; ``diverged_at``: the
    step at which the run stopped because it diverged (None when it completed)."""

    tower: Level
    history: History
    train_losses: np.ndarray
    value: float
    params: Any = None
    metrics: dict | None = None
    problem: dict = field(default_factory=dict)
    diverged_at: int | None = None
    divergence: str | None = None

    @property
    def blew_up(self):
        raise AttributeError("TowerResult.blew_up was renamed .diverged (one divergence field: "
                             "diverged / diverged_at / divergence, docs/glossary.md)")

    @property
    def diverged(self) -> bool:
        """True when the run stopped because it diverged (``divergence`` says how, ``diverged_at`` when)."""
        return self.diverged_at is not None

    @property
    def lrs(self) -> torch.Tensor:
        """The learnt base LR schedule η_0 … η_{T−1} (float64)."""
        return torch.as_tensor(self.history.lrs, dtype=torch.float64)

    def replay(self) -> _dynamics.Dynamics:
        """The base optimizer with every learnt non-LR hyperparameter replayed as a fixed schedule;
        ``trajectory.train(problem, result.lrs, result.replay())`` reproduces the run, and
        ``exact.hypergradient(problem, result.lrs, result.replay())`` gives the exact
        full-horizon hypergradient of the learnt LR schedule."""
        base_level = self.tower.levels[0]
        vals = self.history.values(0)
        sched = {n: torch.as_tensor(vals[n], dtype=torch.float64) for n in base_level.tuned if n != "lr"}
        return Scheduled(base_level.base, sched) if sched else base_level.base

    def _record_fields(self) -> dict:
        """The record codec's fields: the tower's settings, the history's arrays (its spec string
        parses back to the tower), the parameters."""
        return {"tower": self.tower.config(), "history": self.history.to_dict(), "train_losses": self.train_losses,
                "value": self.value, "params": self.params, "metrics": self.metrics, "problem": self.problem,
                "diverged_at": self.diverged_at, "divergence": self.divergence}

    @classmethod
    def _from_record_fields(cls, d: dict) -> "TowerResult":
        hist = History.from_dict(d["history"])
        losses = np.array([np.nan if v is None else v for v in d["train_losses"]], dtype=np.float64)
        return cls(hist.tower, hist, losses, d["value"], d.get("params"), d.get("metrics"), d.get("problem", {}),
                   d.get("diverged_at"), d.get("divergence"))

    def to_dict(self) -> dict:
        return records.to_dict(self)

    def save(self, path: str | Path) -> Path:
        """:func:`hgtoolkit.records.save` (JSON, npz, and the parameters when kept)."""
        return records.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "TowerResult":
        return records.load(path, kind="towers")

    def __repr__(self) -> str:
        return (f"TowerResult({str(self.tower)!r}, steps={len(self.history)}, value={self.value:.6g}, "
                f"final lr={self.history.lrs[-1] if len(self.history) else float('nan'):.4g})")


@_settings.takes(TowerSettings)
def run(problem, tower: "Level | str", steps: int, *, progress: bool = False,
        raise_on_divergence: bool = False, **settings: Any) -> TowerResult:
    """Train ``problem`` for ``steps`` steps with ``tower``, recording every hyperparameter at
    every level: :func:`hgtoolkit.drive.drive` of :class:`~hgtoolkit.towers.TowerMethod` (g_t
    and L_t from :func:`hgtoolkit.trajectory.loss_gradient`, the tower's update at every step).

    The settings are those of :class:`~hgtoolkit.settings.TowerSettings`. Divergence, with
    the criterion of :class:`hgtoolkit.online.Engine`: the minibatch loss L_t
    not finite or above ``divergence_factor`` × L_0 (None: off), a non-finite hyperparameter,
    hypergradient or parameter after step t. The run stops before applying step t, warns
    (:class:`DivergenceWarning`, naming t) and returns the record of steps 0 … t−1 with
    ``result.diverged_at = t``; ``raise_on_divergence=True`` raises :class:`DivergenceError`.

    >>> from hgtoolkit import problems, towers
    >>> r = towers.run(problems.from_function("beale"), "sgd(lr=1e-4) / sgd(lr=1e-9)", steps=20)
    >>> len(r.history.lrs)
    20
    """
    check_problem(problem)
    divergence_factor = _settings.bind(TowerSettings, {"tower": tower, "steps": steps, **settings},
                                       "towers.run")["divergence_factor"]
    tower = parse(tower)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if divergence_factor is not None and not (check_real("towers.run", "divergence_factor", divergence_factor) > 1):
        raise ValueError(f"divergence_factor must be > 1 (or None), got {divergence_factor}")
    method = TowerMethod(tower)
    runs = _TowerRun(problem, method, divergence_factor, raise_on_divergence)
    with torch.no_grad():
        drive(method, runs, runs.state, steps, progress=progress, desc=f"tower h={tower.height}")
        params = method.dynamics.params(runs.state.opt)
        buffers = () if runs.buffers is None else (runs.buffers,)
        value = problem.val_loss(params, *buffers)
    check_finite(value, max(len(runs.losses) - 1, 0), params, VALIDATION_LOSS)
    metrics = problem.metrics(params, *buffers) if problem.metrics is not None else None
    losses = torch.stack(runs.losses).detach().cpu().double().numpy() if runs.losses else np.zeros(0)
    return TowerResult(tower, runs.history, losses, float(value), params, metrics, problem.describe(),
                       runs.diverged_at, runs.divergence)


class _TowerRun:
    """One tower run as :func:`hgtoolkit.drive.drive` drives it (its :class:`~hgtoolkit.drive.Runs`):
    g_t and L_t of the problem's training loss (b_t carried for a stateful problem), the
    :class:`TowerMethod` step with the base LR as specified (c_t = 1), then the divergence rules
    of :func:`run` — the loss L_t against L_0 and :func:`~hgtoolkit.towers.core.state_divergence`
    of the new state — before step t is kept; every kept step's hyperparameters recorded
    (:class:`History`). ``state``: the last kept state (s_0 before any step)."""

    def __init__(self, problem, method: TowerMethod, divergence_factor: float | None,
                 raise_on_divergence: bool) -> None:
        self.method, self.divergence_factor, self.raise_on_divergence = method, divergence_factor, raise_on_divergence
        self.gradient_of = loss_gradient(problem)
        self.buffers, self.next_buffers = getattr(problem, "buffers0", None), None  # b_t (docs/models.md)
        self.one = torch.ones((), dtype=problem.dtype, device=problem.device)
        self.state = method.init(problem.params0)
        self.history, self.losses, self.ref = History(method.tower), [], math.nan
        self.diverged_at, self.divergence = None, None

    def gradient(self, w: Any, z_w: Any, t: int) -> tuple[Any, Any, None]:
        g, loss, self.next_buffers = self.gradient_of(w, t, self.buffers)
        return g, loss, None

    def objective(self, w: Any, t: int, g: Any, loss: Any) -> tuple[None, None]:
        return None, None

    def evaluate(self, t: int, w: Any, value: Any) -> None:
        return None

    def update(self, state: TowerState, oracle: Any, t: int) -> tuple[TowerState, dict]:
        return self.method.update(state, oracle, t, lr_scale=self.one)

    def record(self, t: int, state: TowerState, aux: dict, pending: Any) -> "TowerState | None":
        tower, loss = self.method.tower, aux["loss"]
        value = float(loss)
        self.ref = value if t == 0 else self.ref
        bad = (_divergence.check_loss(t, value, self.ref, self.divergence_factor)
               or state_divergence(tower, state.opt, t))
        if bad:
            if self.raise_on_divergence:
                raise bad.error(prefix=f"tower {tower}: ")
            bad.warn(f"tower {tower}: ", f"; the run stopped there (result.diverged_at = {t})")
            self.diverged_at, self.divergence = t, f"tower {tower}: {bad.message}"
            return None
        self.state, self.buffers = state, self.next_buffers
        self.history.append(state.opt)
        self.losses.append(loss)
        return state

    def close(self, state: TowerState, steps: int) -> TowerState:
        return state


def analyse(result: TowerResult, problem, **kwargs: Any):
    """Compare the tower's online LR hypergradients G¹_t (the HD-like one-step estimates it used)
    with the exact references along the learnt schedule (:func:`hgtoolkit.analysis.analyse`,
    ``alignment="before_step"``: G¹_t is formed before step t). Returns an ApproximationReport."""
    from .. import analysis
    if "lr" not in result.history.learnt(0):
        raise ValueError("analyse: the tower does not learn the base LR (no hypergradient to compare)")
    kwargs.setdefault("label", f"tower {result.tower}")
    kwargs.setdefault("alignment", "before_step")
    info = {"tower": result.tower.config(), **kwargs.pop("info", {})}
    return analysis.analyse(problem, result.lrs, result.history.hypergrads(0)["lr"],
                            result.replay(), info=info, **kwargs)
