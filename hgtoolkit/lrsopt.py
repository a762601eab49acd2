r"""LRS-OPT: optimise a whole LR schedule η = (η_0 … η_{T−1}) by projected gradient descent on
f(η) = E(w_T), with the exact hypergradient ∇f(η) of :func:`hgtoolkit.exact.hypergradient`.

One outer step k (k = 1 … K) with outer step size α and outer update rule U:

    η^(k) = Π( U(η^(k−1), ∇f(η^(k−1))) ),   Π(η) = min(max(η, 0), η_max)   (element-wise)

- ``outer_optimizer="sgd"``:  U = η − α g.
- ``outer_optimizer="adam"``: m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;
  U = η − α m̂/(√v̂ + ε) with m̂ = m/(1−β1^k), v̂ = v/(1−β2^k) (Kingma & Ba), on the vector η.
- ``outer_optimizer="lbfgsb"``: ``scipy.optimize.minimize(method="L-BFGS-B")`` with the value
  and the exact gradient and bounds 0 ≤ η_t ≤ η_max, in the rescaled variable x = η/s with
  s = max_t η^(0)_t, so that L-BFGS-B's first trial step (length 1 in x) changes η by a
  fraction of its own size rather than by an absolute 1.

Every schedule in the history is evaluated: ``history[k]`` = f(η^(k)), k = 0 … K (K+1
hypergradient evaluations for K outer steps). With ``resample_batches=True`` (the MARTHE
paper's LRS-OPT) evaluation k trains on ``problem.resample(seed_k)``, a new minibatch order,
where seed_k is derived from (``seed``, k) alone, so that a resumed run sees the same orders.

Divergence (GD/Adam): when training with a proposed schedule diverges (NaN/inf,
:class:`hgtoolkit.DivergenceError`), the proposal is discarded, the outer step size is halved
*for the rest of the run* (``lr_scale`` in the result) and the step is retried from the last
good schedule; every halving is recorded in ``events``. After ``max_backtracks`` successive
halvings the run stops with a :class:`RuntimeWarning` and ``status`` saying so; the result (best
schedule so far) is returned. With L-BFGS-B a diverging trial point stops the run the same
way (its line search cannot recover from an infinite value).

Checkpoints (``checkpoint_path``): every ``checkpoint_interval`` outer steps, at the end, and
when the run is interrupted (KeyboardInterrupt), the whole outer state (schedule, gradient,
outer-optimizer moments, step counter, step-size scale, history) is written atomically.
``resume=True`` continues from it; GD/Adam then reproduce an uninterrupted run bit for bit.
L-BFGS-B checkpoints are best-effort: a resumed run restarts L-BFGS-B from the checkpointed
schedule with an empty curvature memory, so it does not reproduce an uninterrupted run.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpointing as _checkpointing
from . import dynamics as _dynamics
from . import records
from . import settings as _settings
from .divergence import DivergenceWarning
from .exact import hypergradient
from .errors import renamed
from .settings import LrsoptSettings
from .trajectory import check_lrs, check_problem, progress_bar

__all__ = ["ScheduleResult", "optimize_schedule", "OUTER_OPTIMIZERS", "adam_update", "sgd_update",
           "project"]

#: The outer optimizers (the choices of :class:`~hgtoolkit.settings.LrsoptSettings`' ``outer_optimizer``).
OUTER_OPTIMIZERS = _settings.specs(LrsoptSettings)["outer_optimizer"][1].choices
_OUTER_DEFAULTS = {"adam": {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}, "sgd": {}, "lbfgsb": {}}
_CHECKPOINT_FORMAT = "hgtoolkit.lrsopt/1"


# ----------------------------------------------------------------------------- update rules

def sgd_update(eta: torch.Tensor, g: torch.Tensor, state: dict, lr: float) -> tuple[torch.Tensor, dict]:
    """η − α g (no state): :class:`hgtoolkit.dynamics.SGD` applied to the schedule η."""
    return _dynamics.SGD().step({"w": eta}, g, lr, 0)["w"], state


def adam_update(eta: torch.Tensor, g: torch.Tensor, state: dict, lr: float, *, beta1: float = 0.9,
                beta2: float = 0.999, eps: float = 1e-8) -> tuple[torch.Tensor, dict]:
    """One Adam step on the vector η, :class:`hgtoolkit.dynamics.Adam` applied to the schedule:
    returns (η − α m̂/(√v̂ + ε), {m, v, n}); ``state`` is not modified."""
    n = state.get("n", 0)
    s = {"w": eta, "m": state.get("m", torch.zeros_like(eta)), "v": state.get("v", torch.zeros_like(eta))}
    new = _dynamics.Adam(beta1=beta1, beta2=beta2, eps=eps).step(s, g, lr, n)
    return new["w"], {"m": new["m"], "v": new["v"], "n": n + 1}


_UPDATES = {"sgd": sgd_update, "adam": adam_update}


def project(eta: torch.Tensor, lr_max: "float | torch.Tensor | None" = None) -> torch.Tensor:
    """Π(η) = min(max(η, 0), η_max) element-wise (η_max a number or one bound per entry)."""
    if isinstance(lr_max, torch.Tensor):
        return torch.minimum(eta.clamp(min=0.0), lr_max)
    return eta.clamp(min=0.0, max=lr_max)


# ----------------------------------------------------------------------------- the record

@dataclass
class ScheduleResult:
    """The outcome of :func:`optimize_schedule` (arrays are numpy; schedules have length T).

    ``history[k]`` = f(η^(k)) for k = 0 … ``outer_steps_done`` (index 0: the initial schedule),
    ``grad_norms[k]`` = ‖∇f(η^(k))‖, ``metrics[k]`` = ``problem.metrics(w_T)`` or None,
    ``batch_seeds[k]`` = the minibatch order of evaluation k (−1 without resampling).
    ``snapshots[i]`` = η^(``snapshot_steps[i]``). ``outer_state`` = the outer optimizer's state
    after the last step (Adam: m, v, n) and ``lr_scale`` (1 unless divergence halved it).
    ``events`` lists backtracking steps; ``status`` says why the run ended.
    ``evaluations[i]`` = (wall seconds since the run started, f) after hypergradient evaluation
    i (line-search trials and discarded proposals included, f = NaN where training diverged;
    a resumed run continues the clock of its checkpoint).
    """

    initial_lrs: np.ndarray
    final_lrs: np.ndarray
    best_lrs: np.ndarray
    best_value: float
    best_step: int
    history: np.ndarray
    grad_norms: np.ndarray
    snapshot_steps: np.ndarray
    snapshots: np.ndarray
    outer_state: dict
    n_evaluations: int
    outer_steps_done: int
    wall_time: float
    status: str
    config: dict
    problem: dict
    metrics: list = field(default_factory=list)
    batch_seeds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    events: list = field(default_factory=list)
    evaluations: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    _ARRAYS = ("initial_lrs", "final_lrs", "best_lrs", "history", "grad_norms", "snapshot_steps",
               "snapshots", "batch_seeds")

    def __repr__(self) -> str:
        return (f"ScheduleResult(T={len(self.final_lrs)}, outer_steps_done={self.outer_steps_done}, "
                f"f: {self.history[0]:.6g} -> final {self.history[-1]:.6g}, best {self.best_value:.6g} "
                f"(step {self.best_step}), status={self.status!r})")

    @property
    def initial_value(self) -> float:
        """f(η^(0))."""
        return float(self.history[0])

    @property
    def final_value(self) -> float:
        """f at the last accepted schedule."""
        return float(self.history[-1])

    @property
    def final_val_accuracy(self) -> float | None:
        """``metrics[-1]["val_accuracy"]`` (None when the problem reports none)."""
        last = self.metrics[-1] if self.metrics and isinstance(self.metrics[-1], dict) else {}
        return last.get("val_accuracy")

    def save(self, path: str | Path) -> Path:
        """:func:`hgtoolkit.save`: ``<path>.json`` (everything, readable) and ``<path>.npz`` (the
        arrays, exact), with their checksums. Returns the JSON path, as every record's ``save``."""
        return records.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "ScheduleResult":
        """:func:`hgtoolkit.records.load` of an ``lrsopt`` record (arrays bit-exact)."""
        return records.load(path, kind="lrsopt")

    @staticmethod
    def _migrate_v1(cls, d: dict) -> dict:
        """The fields of a record written before the codec (format ``hgtoolkit.ScheduleResult/1``,
        or an old sweep cell): arrays by name, the outer state as ``outer_state.<name>``."""
        outer = {k.split(".", 1)[1]: (v.item() if v.ndim == 0 else v)
                 for k, v in d.items() if k.startswith("outer_state.")}
        ev = [[math.nan if x is None else x for x in r] for r in d.get("evaluations", [])]  # NaN ↔ null
        kw = {k: d[k] for k in (*cls._ARRAYS, "best_value", "best_step", "n_evaluations",
                                "outer_steps_done", "wall_time", "status", "config", "problem",
                                "metrics", "events")}
        return dict(outer_state=outer, evaluations=np.asarray(ev, dtype=np.float64).reshape(-1, 2), **kw)


records.register(
    "lrsopt", version=2, timing=("wall_time", "evaluations"),
    derived=("initial_value", "final_value", "final_val_accuracy"),
    readable=("history", "grad_norms", "initial_lrs", "best_lrs", "final_lrs", "evaluations"),
    legacy_formats=("hgtoolkit.ScheduleResult/1",), migrations={1: ScheduleResult._migrate_v1},
    redo="rerun it: `python -m hgtoolkit lrsopt ...` or `lrsopt.optimize_schedule(...).save(path)`",
)(ScheduleResult)


# ----------------------------------------------------------------------------- the outer loop

def _batch_seed(seed: int, k: int) -> int:
    """Minibatch-order seed of evaluation k: a function of (seed, k) only (no RNG state to carry)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1)[0] & 0x7FFFFFFF)


class _Evaluator:
    """(η, k) ↦ (f(η), ∇f(η), metrics, minibatch seed) on the problem of evaluation k."""

    def __init__(self, problem, dyn, mode, reverse_kw, chunk_size, resample, seed, objective=None):
        self.problem, self.dyn, self.mode, self.objective = problem, dyn, mode, objective
        self.kw = {**reverse_kw, "chunk_size": chunk_size}
        self.resample, self.seed = resample, seed

    def __call__(self, eta: torch.Tensor, k: int):
        if self.objective is not None:  # a closed-form f(η) in place of a training run
            value, grad = self.objective(eta)
            if not (math.isfinite(float(value)) and bool(torch.isfinite(grad).all())):
                raise FloatingPointError(f"objective is not finite at this schedule (f = {float(value)})")
            return float(value), grad.detach(), None, -1
        bseed = _batch_seed(self.seed, k) if self.resample else -1
        prob = self.problem.resample(bseed) if self.resample else self.problem
        r = hypergradient(prob, eta, self.dyn, self.mode, **self.kw)
        buffers = () if r.buffers is None else (r.buffers,)  # b_T of a stateful problem
        metrics = prob.metrics(r.params, *buffers) if prob.metrics is not None else None
        return float(r.value), r.grad, metrics, bseed


def _validate(problem, lrs, outer_optimizer, outer_lr, resample_batches, lr_max, outer_options,
              checkpoint_path, resume, callback):
    """The rules that tie the settings together (each setting is checked by its declaration,
    :class:`~hgtoolkit.settings.LrsoptSettings`), the schedule and the run control."""
    check_problem(problem)
    if outer_optimizer == "sgd" and outer_lr is None:
        raise TypeError("outer_lr is required for outer_optimizer='sgd' (a number > 0: its step "
                        "scale depends on the problem)")
    if resample_batches and problem.resample is None:
        raise ValueError("resample_batches=True needs a problem with a resample(seed) method; "
                         f"problem {problem.name!r} has none")
    if resample_batches and outer_optimizer == "lbfgsb":
        raise ValueError("resample_batches=True is not supported with outer_optimizer='lbfgsb': "
                         "L-BFGS-B needs the same objective at every evaluation")
    if isinstance(lrs, torch.Tensor) and lrs.is_floating_point() and problem.dtype.is_floating_point \
            and torch.finfo(lrs.dtype).bits > torch.finfo(problem.dtype).bits:
        warnings.warn(f"lrs is {lrs.dtype} but the problem is {problem.dtype}: the schedule is cast to "
                      f"{problem.dtype} (each η_t rounded to its precision) and optimised there; pass lrs "
                      f"as {problem.dtype} to make the cast yours", UserWarning, stacklevel=3)
    eta0 = check_lrs(lrs, problem, argname="lrs")
    if isinstance(lr_max, torch.Tensor):
        if lr_max.shape != eta0.shape or not bool((lr_max > 0).all()):
            raise ValueError(f"lr_max as a tensor must have the shape of lrs {tuple(eta0.shape)} and "
                             f"entries > 0, got shape {tuple(lr_max.shape)}")
    opts = dict(outer_options or {})
    if outer_optimizer != "lbfgsb":
        unknown = set(opts) - set(_OUTER_DEFAULTS[outer_optimizer])
        if unknown:
            raise ValueError(f"outer_options has unknown key(s) {sorted(unknown)} for outer_optimizer="
                             f"{outer_optimizer!r}; known: {sorted(_OUTER_DEFAULTS[outer_optimizer])}")
        opts = {**_OUTER_DEFAULTS[outer_optimizer], **opts}
    if resume is not None and not isinstance(resume, bool):
        raise TypeError(f"resume must be True, False or None, got {resume!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_path")
    if checkpoint_path is not None:
        if not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"checkpoint_path must be a path (str or os.PathLike), got {type(checkpoint_path).__name__}")
        ckpt = Path(checkpoint_path)
        if ckpt.is_dir():
            raise ValueError(f"checkpoint_path {str(ckpt)!r} is a directory; expected a file path, "
                             f"e.g. {str(ckpt / 'lrsopt.ckpt.pt')!r}")
        if ckpt.exists() and resume is None:
            raise ValueError(f"checkpoint_path {str(ckpt)!r} exists: pass resume=True to continue that run, "
                             "or resume=False to start afresh and replace it (or another checkpoint_path)")
    if callback is not None and not callable(callback):
        raise TypeError("callback must be callable as callback(step, lrs, value, grad)")
    if lr_max is not None and bool((eta0 > lr_max).any()):
        raise ValueError(f"lrs exceeds lr_max={lr_max} (max {float(eta0.max())})")
    return opts, eta0


def _config_mismatch(saved: dict, current: dict) -> list[str]:
    a, b = records.to_jsonable(saved), records.to_jsonable(current)
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _load_checkpoint(path: Path, config: dict, eta0: torch.Tensor, device) -> dict | None:
    """The run state of the checkpoint at ``path`` (None: no file), verified first: a file whose
    bytes do not match its checksum, or that is not a torch file, is corrupted
    (:class:`hgtoolkit.records.CorruptedFileError`) and nothing of it is used."""
    if not path.exists():
        return None
    ckpt = records.load_torch(path, f"checkpoint_path {str(path)!r}", "delete it, or pass resume=False "
                              "(CLI: --overwrite) to start afresh (it is replaced)", map_location=device)
    if (not isinstance(ckpt, dict) or ckpt.get("format") != _CHECKPOINT_FORMAT
            or not all(k in ckpt for k in ("config", "lrs0", "state"))):
        raise ValueError(f"checkpoint_path {str(path)!r} is not an LRS-OPT checkpoint")
    diff = _config_mismatch(ckpt["config"], config)
    if not torch.equal(ckpt["lrs0"], eta0):
        diff.insert(0, "lrs")
    if diff:
        first = diff[0]
        detail = ("" if first == "lrs" else
                  f" (checkpoint: {ckpt['config'].get(first)!r}, this call: {config.get(first)!r})")
        raise ValueError(f"checkpoint {str(path)!r} was written with different arguments: "
                         f"{', '.join(diff)} differ{detail}; pass the same arguments, resume=False "
                         "to start afresh, or another checkpoint_path")
    return ckpt["state"]


class _Logged:
    """``evaluate`` that appends (wall seconds of the run, f) to ``log`` after every call."""

    def __init__(self, evaluate, started: float):
        self.evaluate, self.started, self.offset, self.log = evaluate, started, 0.0, []

    def __call__(self, eta: torch.Tensor, k: int):
        try:
            out = self.evaluate(eta, k)
        except FloatingPointError:
            self.log.append((self.offset + time.perf_counter() - self.started, math.nan))
            raise
        self.log.append((self.offset + time.perf_counter() - self.started, out[0]))
        return out


class _Run:
    """The mutable bookkeeping of one LRS-OPT run (everything a checkpoint holds)."""

    def __init__(self, state: dict):
        self.s = state

    @classmethod
    def fresh(cls, eta0, value, grad, metrics, bseed) -> "_Run":
        return cls({"k": 0, "eta": eta0, "value": value, "grad": grad, "opt": {}, "lr_scale": 1.0,
                    "history": [value], "grad_norms": [float(grad.norm())], "metrics": [metrics],
                    "batch_seeds": [bseed], "snapshot_steps": [0], "snapshots": [eta0],
                    "best": {"value": value, "step": 0, "eta": eta0}, "events": [],
                    "n_evaluations": 1, "wall_time": 0.0, "status": "running"})

    def accept(self, k, eta, value, grad, metrics, bseed, opt, lr_scale, snapshot_every):
        s = self.s
        s.update(k=k, eta=eta, value=value, grad=grad, opt=opt, lr_scale=lr_scale)
        s["history"].append(value)
        s["grad_norms"].append(float(grad.norm()))
        s["metrics"].append(metrics)
        s["batch_seeds"].append(bseed)
        if snapshot_every is not None and k % snapshot_every == 0:
            s["snapshot_steps"].append(k)
            s["snapshots"].append(eta)
        if value < s["best"]["value"]:
            s["best"] = {"value": value, "step": k, "eta": eta}

    def save(self, path, config, eta0, started):
        state = dict(self.s, wall_time=self.s["wall_time"] + (time.perf_counter() - started))
        records.atomic_torch_save({"format": _CHECKPOINT_FORMAT, "config": records.to_jsonable(config),
                                   "lrs0": eta0, "state": state}, path)

    def result(self, eta0, config, problem, started) -> ScheduleResult:
        s = self.s
        np_ = lambda x: x.detach().cpu().numpy()
        if s["snapshot_steps"][-1] != s["k"]:  # always keep the final schedule among the snapshots
            s["snapshot_steps"].append(s["k"])
            s["snapshots"].append(s["eta"])
        outer = {k: (np_(v) if isinstance(v, torch.Tensor) else v) for k, v in s["opt"].items()}
        outer["lr_scale"] = s["lr_scale"]
        return ScheduleResult(
            initial_lrs=np_(eta0), final_lrs=np_(s["eta"]), best_lrs=np_(s["best"]["eta"]),
            best_value=s["best"]["value"], best_step=s["best"]["step"],
            history=np.asarray(s["history"], dtype=np.float64),
            grad_norms=np.asarray(s["grad_norms"], dtype=np.float64),
            snapshot_steps=np.asarray(s["snapshot_steps"], dtype=np.int64),
            snapshots=np.stack([np_(e) for e in s["snapshots"]]),
            outer_state=outer, n_evaluations=s["n_evaluations"], outer_steps_done=s["k"],
            wall_time=s["wall_time"] + (time.perf_counter() - started), status=s["status"],
            config=records.to_jsonable(config), problem=problem.describe(), metrics=s["metrics"],
            batch_seeds=np.asarray(s["batch_seeds"], dtype=np.int64), events=s["events"],
            evaluations=np.asarray(s.get("evaluations", []), dtype=np.float64).reshape(-1, 2))


@renamed(lrs0="lrs")
@_settings.takes(LrsoptSettings)
def optimize_schedule(problem, lrs: Any, outer_steps: int, outer_lr: float | None = None,
                      outer_optimizer: str = "adam", *,
                      checkpoint_path: str | Path | None = None, resume: bool | None = None,
                      progress: bool = True, callback: Callable[..., Any] | None = None,
                      objective: Callable[[torch.Tensor], tuple[Any, torch.Tensor]] | None = None,
                      **settings: Any) -> ScheduleResult:
    r"""LRS-OPT: K = ``outer_steps`` projected steps η^(k) = Π(U(η^(k−1), ∇f(η^(k−1)))) from η^(0) = ``lrs``.

    The settings are those of :class:`~hgtoolkit.settings.LrsoptSettings` (each checked by its
    declaration there; the rules that tie them together here).

    ``optimizer`` is the inner dynamics Φ_t (``"sgd"``, ``"adam"``, … or a Dynamics);
    ``mode``/``checkpoint``/``snapshots``/``memory``/``disk``/``chunk_size`` are passed to
    :func:`hgtoolkit.hypergradient`: ``memory="1GB"`` bounds every evaluation's reverse pass
    (docs/memory.md), so long horizons (T = 10⁴) run within a laptop's memory; ``disk=True``
    (``"tmp"``) or a directory puts the binomial snapshots that do not fit there (the schedule is
    the same bit for bit; not part of a checkpoint's arguments, so a run may resume without it).
    ``outer_lr`` = α (unused by ``"lbfgsb"``; required by ``"sgd"``, whose step scale depends on
    the problem; Adam's default: 0.1 × max η^(0), Adam's steps being ≈ α per entry);
    ``outer_options`` = Adam's ``beta1``, ``beta2``,
    ``eps``, or extra ``options`` for scipy's L-BFGS-B (e.g. ``{"ftol": 0, "gtol": 0}``).
    ``lr_max`` = η_max (None: no upper bound). ``snapshot_every=k`` keeps η^(k), η^(2k), …
    (η^(0) and the final schedule are always kept). ``lr_max`` may also be a tensor of the
    schedule's shape (one bound per entry).

    ``objective(η) -> (f(η), ∇f(η))`` replaces the training run by a closed-form objective
    (e.g. the exact expected loss of :func:`hgtoolkit.horizons.nqm_expected_loss`); ``problem``
    then only supplies device, dtype and ``describe()``, and ``optimizer``/``mode`` are unused.

    ``callback(step, lrs, value, grad)`` runs after every accepted outer step; returning True
    stops the run (``status="stopped by callback"``). ``checkpoint_path`` (a file; a directory is
    refused before any work): the run state every ``checkpoint_interval`` outer steps, with the
    sha256 of its bytes. ``resume=True``: continue a run from its checkpoint (a missing file
    starts afresh; a checkpoint written with other arguments raises ValueError naming them; one
    whose bytes do not match its checksum is refused as corrupted, nothing of it used;
    ``outer_steps`` may be raised to run longer). ``resume=False``: start afresh, replacing the
    file. ``resume=None`` (default) with an existing ``checkpoint_path``: ValueError, as the CLI
    (its ``--resume`` / ``--overwrite``).

    Dtype: the schedule is optimised in the problem's dtype; a ``lrs`` of a wider floating dtype
    (float64 on a float32 problem) is cast, with a ``UserWarning`` saying so.

    >>> import hgtoolkit, torch
    >>> p = hgtoolkit.problems.from_function("beale")
    >>> r = optimize_schedule(p, torch.full((20,), 1e-3), 5, 1e-4, progress=False)
    >>> bool(r.history[-1] < r.history[0]), r.outer_steps_done, len(r.history)
    (True, 5, 6)
    """
    table = _settings.specs(LrsoptSettings)
    _checkpointing.reject_removed({k: v for k, v in settings.items() if k not in table}, "optimize_schedule")
    if isinstance(outer_optimizer, str):
        outer_optimizer = outer_optimizer.lower()
    given = _settings.bind(LrsoptSettings, {
        "outer_steps": outer_steps, "outer_lr": outer_lr, "outer_optimizer": outer_optimizer, **settings},
        "optimize_schedule")
    disk = given["disk"]  # True/False/a path, as hypergradient takes them, in the schema's words
    _checkpointing.check_checkpoint("auto", None, disk)  # its type, in hypergradient's words
    given["disk"] = "tmp" if disk is True else None if disk is False else (
        os.fspath(disk) if isinstance(disk, os.PathLike) else disk)
    s = _settings.check(LrsoptSettings, given)
    (outer_steps, outer_lr, outer_optimizer, optimizer, mode, checkpoint, snapshots, memory, disk, chunk_size,
     resample_batches, seed, lr_max, outer_options, max_backtracks, snapshot_every,
     checkpoint_interval) = s.values()
    _checkpointing.check_checkpoint(checkpoint, snapshots, disk)
    opts, eta0 = _validate(problem, lrs, outer_optimizer, outer_lr, resample_batches, lr_max,
                           outer_options, checkpoint_path, resume, callback)
    if outer_lr is None and outer_optimizer == "adam":
        outer_lr = 0.1 * float(eta0.abs().max()) or 1e-3  # Adam's steps are ≈ α: 10 % of the largest η
    dyn = _dynamics.get(optimizer)
    config = {"T": len(eta0), "outer_optimizer": outer_optimizer, "outer_lr": outer_lr,
              "outer_options": opts, "optimizer": dyn.config(), "mode": mode,
              "resample_batches": bool(resample_batches), "seed": seed, "lr_max": lr_max,
              "max_backtracks": max_backtracks, "problem": problem.describe()}
    # only what was asked for: a mode without a reverse pass refuses checkpoint=/memory=
    reverse_kw = {"checkpoint": checkpoint} if checkpoint != "auto" else {}
    reverse_kw.update({k: v for k, v in (("snapshots", snapshots), ("memory", memory), ("disk", disk))
                       if v is not None})
    evaluate = _Evaluator(problem, dyn, mode, reverse_kw, chunk_size, resample_batches, seed,
                          objective)
    path = None if checkpoint_path is None else Path(checkpoint_path)
    started = time.perf_counter()

    saved = _load_checkpoint(path, config, eta0, problem.device) if resume else None
    evaluate = _Logged(evaluate, started)
    if saved is not None:
        run = _Run(saved)
        evaluate.offset = run.s["wall_time"]
        evaluate.log = run.s.setdefault("evaluations", [])
        if run.s["k"] > outer_steps:
            raise ValueError(f"outer_steps={outer_steps} but the checkpoint already holds "
                             f"{run.s['k']} outer steps; ask for at least that many")
    else:
        try:
            run = _Run.fresh(eta0, *evaluate(eta0, 0))
        except FloatingPointError as exc:
            raise FloatingPointError(f"LRS-OPT cannot start: training with lrs diverges ({exc}); "
                                     "start from smaller learning rates") from exc
        run.s["evaluations"] = evaluate.log
    run.s["status"] = "running"
    save = (lambda: run.save(path, config, eta0, started)) if path is not None else (lambda: None)

    try:
        if outer_optimizer == "lbfgsb":
            _run_lbfgsb(run, evaluate, outer_steps, opts, lr_max, snapshot_every, save,
                        checkpoint_interval, progress, callback, eta0)
        else:
            _run_gradient(run, evaluate, outer_steps, outer_lr, _UPDATES[outer_optimizer], opts, lr_max,
                          max_backtracks, snapshot_every, save, checkpoint_interval, progress, callback)
    except KeyboardInterrupt:
        save()  # the last accepted step: resume=True continues from here
        raise
    if run.s["status"] == "running":
        run.s["status"] = "completed"
    save()
    return run.result(eta0, config, problem, started)


def _notify(callback, run) -> bool:
    s = run.s
    return bool(callback is not None
                and callback(s["k"], s["eta"].clone(), s["value"], s["grad"].clone()))


def _run_gradient(run, evaluate, outer_steps, outer_lr, update, opts, lr_max, max_backtracks,
                  snapshot_every, save, checkpoint_interval, progress, callback):
    """Projected GD/Adam steps k = run.k+1 … outer_steps, halving α on divergence."""
    s = run.s
    bar = progress_bar(range(s["k"] + 1, outer_steps + 1), progress, desc="LRS-OPT",
                       initial=s["k"], total=outer_steps)
    for k in bar:
        lr_scale, events = s["lr_scale"], []  # committed only with the step (a resume redoes it)
        for _ in range(max_backtracks + 1):
            proposal, opt = update(s["eta"], s["grad"], s["opt"], outer_lr * lr_scale, **opts)
            proposal = project(proposal, lr_max)
            try:
                value, grad, metrics, bseed = evaluate(proposal, k)
                break
            except FloatingPointError as exc:
                lr_scale /= 2
                events.append({"step": k, "lr_scale": lr_scale, "error": str(exc)})
                failure = getattr(exc, "divergence", None)
        s["n_evaluations"] += len(events) + (len(events) <= max_backtracks)
        s["events"].extend(events)
        if len(events) > max_backtracks:
            s["status"] = (f"diverged: training diverged at outer step {k} even after {max_backtracks} "
                           f"halvings of the outer step size (scale {lr_scale:g}); the result holds "
                           "the schedules up to the last good step")
            warnings.warn(DivergenceWarning(f"LRS-OPT stopped: {s['status']}", failure), stacklevel=3)
            break
        run.accept(k, proposal, value, grad, metrics, bseed, opt, lr_scale, snapshot_every)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(f=f"{value:.4g}", best=f"{s['best']['value']:.4g}")
        if k % checkpoint_interval == 0:
            save()
        if _notify(callback, run):
            s["status"] = "stopped by callback"
            break
    if hasattr(bar, "close"):
        bar.close()


class _StopLBFGSB(Exception):
    pass


def _run_lbfgsb(run, evaluate, outer_steps, opts, lr_max, snapshot_every, save, checkpoint_interval,
                progress, callback, eta0):
    """L-BFGS-B in x = η/s (s = max η^(0)); each of its iterations is one outer step."""
    from scipy.optimize import minimize
    s = run.s
    scale = float(eta0.max()) or 1.0
    to_eta = lambda x: torch.as_tensor(x * scale, dtype=eta0.dtype, device=eta0.device)
    last: dict[bytes, tuple] = {}  # x -> evaluation, for the iteration callback

    def fun(x):
        key = x.tobytes()
        if key not in last:
            try:
                out = evaluate(to_eta(x), s["k"] + 1)
            except FloatingPointError as exc:
                s["n_evaluations"] += 1
                s["status"] = (f"diverged: an L-BFGS-B trial schedule diverged at outer step "
                               f"{s['k'] + 1} ({exc}); the result holds the schedules up to the last good step")
                raise _StopLBFGSB(getattr(exc, "divergence", None)) from exc
            s["n_evaluations"] += 1
            last.clear()
            last[key] = out
        value, grad = last[key][:2]
        return value, grad.detach().cpu().to(torch.float64).numpy() * scale

    bar = progress_bar(range(outer_steps), progress, desc="LRS-OPT (L-BFGS-B)", initial=s["k"],
                       total=outer_steps)

    def on_iteration(intermediate_result):
        x = intermediate_result.x
        fun(x)  # normally cached: L-BFGS-B's iterate is its last evaluated point
        value, grad, metrics, bseed = last[x.tobytes()]
        run.accept(s["k"] + 1, to_eta(x), value, grad, metrics, bseed, {}, 1.0, snapshot_every)
        if hasattr(bar, "update"):
            bar.update()
            bar.set_postfix(f=f"{value:.4g}")
        if s["k"] % checkpoint_interval == 0:
            save()
        if _notify(callback, run):
            s["status"] = "stopped by callback"
            raise StopIteration
        if s["k"] >= outer_steps:
            raise StopIteration

    if s["k"] < outer_steps:
        x0 = s["eta"].detach().cpu().to(torch.float64).numpy() / scale
        if isinstance(lr_max, torch.Tensor):
            bounds = [(0.0, b) for b in (lr_max.detach().cpu().double().numpy() / scale).tolist()]
        else:
            bounds = [(0.0, None if lr_max is None else lr_max / scale)] * len(x0)
        last[x0.tobytes()] = (s["value"], s["grad"], None, -1)  # already evaluated
        options = {"maxiter": outer_steps - s["k"], **opts}
        try:
            res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                           callback=on_iteration, options=options)
            if s["status"] == "running" and s["k"] < outer_steps:
                s["status"] = f"L-BFGS-B stopped after {s['k']} outer steps: {res.message}"
        except _StopLBFGSB as stop:
            warnings.warn(DivergenceWarning(f"LRS-OPT stopped: {s['status']}", stop.args[0]), stacklevel=3)
    if hasattr(bar, "close"):
        bar.close()
