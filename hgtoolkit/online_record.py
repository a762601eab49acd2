r"""The record of one online run (:func:`hgtoolkit.online.run`, the batched runs, the sweep's
``online`` cells): :class:`OnlineResult`, saved and loaded by the one codec (:mod:`hgtoolkit.records`).
Importable as ``hgtoolkit.online.OnlineResult`` and ``hgtoolkit.OnlineResult``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import records

__all__ = ["OnlineResult"]

_ARRAYS = ("lrs", "hypergrad_lrs", "mus", "hypergrads", "train_losses", "step_times", "eval_steps",
           "val_losses", "val_accuracy")


@records.register_run(redo="rerun it: `python -m hgtoolkit online ...` or `online.run(...).save(path)`")
@dataclass(repr=False)
class OnlineResult(records.RunRecord):
    r"""One online run. Per-step arrays have one entry per step t = 0 … n−1 that ran
    (n = ``steps_run`` = T, or ``diverged_at`` when the run stopped early):

    - ``lrs[t]`` = η_t, the learning rate step t used;
    - ``mus[t]`` = μ_t, the discount in z_{t+1} = μ_t A_t z_t + B_t;
    - ``hypergrads[t]`` = h_{t+1} = v_{t+1}·z_{t+1}, the estimate formed after step t (the one
      that sets η_{t+1}; ``analysis`` calls this alignment "after_step"); NaN if it could not
      be formed because the run diverged;
    - ``hypergrad_lrs[t]`` = β_t, the hyper-LR in η_{t+1} = max(η_t − β_t h_{t+1}, floor);
    - ``train_losses[t]`` = L_t(w_t), the minibatch loss of step t;
    - ``step_times[t]``: seconds since the start of the run when step t had finished.

    Evaluations: ``val_losses[i]`` = E(w_k) for k = ``eval_steps[i]`` (steps taken: 0 is the
    initial point, the last is n), every ``eval_every`` steps; ``val_accuracy`` likewise when
    the problem has ``metrics`` giving "val_accuracy" (else None).

    ``final_lr`` = η_n (after the last update); ``diverged_at`` (None if the run completed):
    the first step that could not be run properly — t when L_t, E(w_t) or w_{t+1} is bad (not
    finite, or the loss above ``divergence_factor`` × its initial value), t+1 when h_{t+1},
    η_{t+1} (|η| > ``lr_max``) or β_{t+1} is bad (then ``hypergrads[t]`` holds the offending h;
    T means only the final update η_T failed); so n = ``diverged_at``; ``divergence``: what
    diverged; ``hypergrad_lr_capped``: how many updates the adaptive-β bound
    (``hypergrad_lr_bound``) clipped; ``wall_time``:
    seconds for the whole run; ``final_params``: w_n (a detached pytree) or None; ``config``:
    everything needed to rerun it (method, optimizer, lr, hypergrad_lr, mu, kappa, …, ``problem`` =
    ``problem.describe()``).
    """

    config: dict
    lrs: np.ndarray
    hypergrad_lrs: np.ndarray
    mus: np.ndarray
    hypergrads: np.ndarray
    train_losses: np.ndarray
    eval_steps: np.ndarray
    val_losses: np.ndarray
    val_accuracy: np.ndarray | None = None
    step_times: np.ndarray | None = None
    final_lr: float = math.nan
    diverged_at: int | None = None
    divergence: str | None = None
    wall_time: float = 0.0
    final_params: Any = None
    hypergrad_lr_capped: int = 0

    KIND = "online"
    ARRAYS = _ARRAYS
    SCALARS = ("final_lr", "hypergrad_lr_capped")
    #: fields of the records written before 0.2 (docs/glossary.md), renamed on load
    RENAMED_FIELDS = {"betas": "hypergrad_lrs", "beta_capped": "hypergrad_lr_capped"}

    def __repr__(self) -> str:
        div = f", diverged_at={self.diverged_at}" if self.diverged else ""
        return (f"OnlineResult(method={self.method!r}, steps={self.steps_run}{div}, "
                f"final_lr={self.final_lr:.4g}, final_val_loss={self.final_val_loss:.6g}, "
                f"best_val_loss={self.best_val_loss:.6g})")
