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
from ..settings import TowerSettings
from .core import state_divergence
from .levels import History, Level, Scheduled, check_real, parse

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
    """Train ``problem`` for ``steps`` steps with ``tower`` (through ``trajectory.make_step`` of
    ``tower.dynamics()``), recording every hyperparameter at every level.

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
    from ..trajectory import BUFFERS, check_problem, initial_state, make_step, opt_part, progress_bar
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
    dyn = tower.dynamics()
    one_step = make_step(problem, dyn)
    state = initial_state(problem, dyn)  # with b_0 for a stateful problem (docs/models.md)
    history = History(tower)
    one = torch.ones((), dtype=problem.dtype, device=problem.device)
    losses, diverged_at, divergence, ref = [], None, None, math.nan
    with torch.no_grad():
        for t in progress_bar(range(steps), progress, desc=f"tower h={tower.height}", leave=False):
            new, loss = one_step(state, one, t)
            value = float(loss)
            ref = value if t == 0 else ref
            bad = (_divergence.check_loss(t, value, ref, divergence_factor)
                   or state_divergence(tower, opt_part(new), t))
            if bad:
                if raise_on_divergence:
                    raise bad.error(prefix=f"tower {tower}: ")
                bad.warn(f"tower {tower}: ", f"; the run stopped there (result.diverged_at = {t})")
                diverged_at, divergence = t, f"tower {tower}: {bad.message}"
                break
            state = new
            history.append(opt_part(state))
            losses.append(loss)
        params = dyn.params(state)
        buffers = (state[BUFFERS],) if BUFFERS in state else ()
        value = problem.val_loss(params, *buffers)
    check_finite(value, max(len(losses) - 1, 0), params, VALIDATION_LOSS)
    metrics = problem.metrics(params, *buffers) if problem.metrics is not None else None
    losses = torch.stack(losses).detach().cpu().double().numpy() if losses else np.zeros(0)
    return TowerResult(tower, history, losses, float(value), params, metrics, problem.describe(),
                       diverged_at, divergence)


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
