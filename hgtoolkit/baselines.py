r"""Peers as baselines: fixed and hand-designed LR schedules, and learning-rate-free optimizers.

Two kinds of peer, run on the same :class:`hgtoolkit.Problem` (same initial weights w_0, same
minibatch order L_t, same step budget T) as the exact and online methods:

**Schedule families** — pure functions returning the schedule η = (η_0 … η_{T−1}) as a 1-D
tensor, so a schedule can also be given to :func:`hgtoolkit.train` or
:func:`hgtoolkit.hypergradient` (compare its exact hypergradient with the online estimates).
They equal ``torch.optim.lr_scheduler``'s values step for step (t = 0 … T−1):

- :func:`constant`:             η_t = η_0
- :func:`exponential_decay`:    η_t = η_0 γ^t                                    (ExponentialLR)
- :func:`step_decay`:           η_t = η_0 δ^⌊t/k⌋                                (StepLR)
- :func:`cosine_warm_restarts`: η_t = η_min + ½(η_0 − η_min)(1 + cos(π T_cur/T_i))
  (SGDR, Loshchilov & Hutter 2017; CosineAnnealingWarmRestarts): cycle i lasts
  T_i = T_0·T_mult^i steps, T_cur counts the steps since the last restart.

A schedule peer trains with ``hgtoolkit.trajectory.make_step`` (the step Φ_t that every exact
and online method differentiates), so its losses are bit-identical to :func:`hgtoolkit.train`
replaying the same schedule.

**Learning-rate-free optimizers** (installed with ``pip install hgtoolkit[peers]``), run as
``torch.optim`` optimizers on the leaves of ``problem.params0`` wrapped as ``nn.Parameter``:

- ``"schedulefree_sgd"``: ``schedulefree.SGDScheduleFree`` (Defazio et al. 2024). The gradient
  is taken at y_t = (1−β) z_t + β x_t; z_{t+1} = z_t − γ_t g_t; x_{t+1} = (1−c_{t+1}) x_t +
  c_{t+1} z_{t+1}. Training losses are those at y_t (train mode); validation metrics are those
  of the average x_t (``optimizer.eval()``), which is the point of schedule-free.
  Recorded LR: γ_t = lr·min(1, (t+1)/warmup_steps) (the package's ``scheduled_lr``).
- ``"prodigy"``: ``prodigyopt.Prodigy`` (Mishchenko & Defazio 2024), Adam with step size
  d_t·lr (× Adam's bias correction when ``use_bias_correction=True``), d_t estimated online.
  Recorded LR: d_t·lr·(bias correction), the value used at step t.
- ``"dadapt_sgd"``: ``dadaptation.DAdaptSGD`` (Defazio & Mishchenko 2023). With momentum 0 its
  step is exactly SGD, w_{t+1} = w_t − (d_t·lr/‖g_0‖) g_t. Recorded LR: d_t·lr/‖g_0‖ — the
  SGD-equivalent learning rate, directly comparable with η_t of the schedule peers.
- ``"dadapt_adam"``: ``dadaptation.DAdaptAdam``, Adam with step size d_t·lr (× bias
  correction if enabled). Recorded LR: d_t·lr·(bias correction).

Every run returns a :class:`PeerResult` whose field names (``lrs``, ``train_losses``,
``eval_steps``, ``val_losses``, ``val_accuracy``, ``diverged_at``, ``wall_time``, ``config``)
are those of the online methods' records, so plots and tables treat both alike.

Example::

    problem = hgtoolkit.problems.mnist_mlp()
    res = run_peer(problem, "prodigy", 500)
    res.save("results/peers/prodigy")
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import dynamics as _dynamics
from . import records
from ._tree import tree_clone, tree_flatten, tree_map, tree_unflatten
from .divergence import VALIDATION_LOSS, Divergence, DivergenceError, check_finite
from .problems import Problem
from .errors import renamed
from .trajectory import BUFFERS, check_lrs, initial_state, make_step, progress_bar, stateful_loss

__all__ = ["constant", "exponential_decay", "step_decay", "cosine_warm_restarts", "PeerResult",
           "run_peer", "PEERS", "SchedulePeer", "LRFreePeer"]



# ----------------------------------------------------------------------------- argument checks

def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)


def _check_float(value: Any, name: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '≥ 0'} and finite, got {value}")
    return value


# ----------------------------------------------------------------------------- schedule families

def constant(lr: float, T: int, *, dtype: torch.dtype = torch.float64, device: Any = "cpu") -> torch.Tensor:
    r"""η_t = η_0 for t = 0 … T−1 (``lr`` = η_0)."""
    lr, T = _check_float(lr, "lr"), _check_int(T, "T")
    return torch.full((T,), lr, dtype=dtype, device=device)


@renamed(lr0="lr")
def exponential_decay(lr: float, gamma: float, T: int, *, dtype: torch.dtype = torch.float64,
                      device: Any = "cpu") -> torch.Tensor:
    r"""η_t = η_0 γ^t for t = 0 … T−1 (``torch.optim.lr_scheduler.ExponentialLR``)."""
    lr, gamma, T = _check_float(lr, "lr"), _check_float(gamma, "gamma", positive=True), _check_int(T, "T")
    t = torch.arange(T, dtype=torch.float64)
    return (lr * gamma ** t).to(dtype=dtype, device=device)


@renamed(lr0="lr")
def step_decay(lr: float, drop: float, every: int, T: int, *, dtype: torch.dtype = torch.float64,
               device: Any = "cpu") -> torch.Tensor:
    r"""η_t = η_0 δ^⌊t/k⌋ for t = 0 … T−1, δ = ``drop``, k = ``every``
    (``torch.optim.lr_scheduler.StepLR(step_size=k, gamma=δ)``)."""
    lr, drop = _check_float(lr, "lr"), _check_float(drop, "drop", positive=True)
    every, T = _check_int(every, "every"), _check_int(T, "T")
    n_drops = torch.div(torch.arange(T), every, rounding_mode="floor").to(torch.float64)
    return (lr * drop ** n_drops).to(dtype=dtype, device=device)


@renamed(lr0="lr")
def cosine_warm_restarts(lr: float, T: int, T0: int, T_mult: int = 1, eta_min: float = 0.0, *,
                         dtype: torch.dtype = torch.float64, device: Any = "cpu") -> torch.Tensor:
    r"""SGDR (Loshchilov & Hutter 2017): η_t = η_min + ½(η_0 − η_min)(1 + cos(π T_cur/T_i)).

    Cycle i (i = 0, 1, …) lasts T_i = T_0·T_mult^i steps and T_cur = t − (start of the cycle);
    at a restart η jumps back to η_0. Equals
    ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` for
    t = 0 … T−1.
    """
    lr, T = _check_float(lr, "lr"), _check_int(T, "T")
    T0, T_mult = _check_int(T0, "T0"), _check_int(T_mult, "T_mult")
    eta_min = _check_float(eta_min, "eta_min")
    t_cur = torch.empty(T, dtype=torch.float64)
    t_i = torch.empty(T, dtype=torch.float64)
    start, length = 0, T0
    while start < T:  # one iteration per cycle
        stop = min(start + length, T)
        t_cur[start:stop] = torch.arange(stop - start, dtype=torch.float64)
        t_i[start:stop] = length
        start, length = start + length, length * T_mult
    lrs = eta_min + 0.5 * (lr - eta_min) * (1 + torch.cos(math.pi * t_cur / t_i))
    return lrs.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- the record

@records.register_run(redo="rerun it: `baselines.run_peer(...).save(path)` or `python -m hgtoolkit reproduce mnist`")
@dataclass(repr=False)
class PeerResult(records.RunRecord):
    """One peer's training run (field names as :class:`hgtoolkit.online.OnlineResult`).

    ``lrs[t]`` is the (effective) LR of step t and ``train_losses[t]`` = L_t(w_t), for the
    steps run; ``val_losses[i]`` = E(w_k) and ``val_accuracy[i]`` at k = ``eval_steps[i]``
    steps taken (0 and the last step included); ``val_accuracy`` is None when the problem has
    no ``metrics``. ``diverged_at``: the step t whose loss L_t or resulting parameters w_{t+1}
    were NaN/inf (the run stopped there; the arrays hold the steps before it), else None;
    ``divergence`` says what. ``final_params``: the parameters the last evaluation saw (for
    Schedule-Free the average x_T), or None. ``config``: which peer with which settings on which
    problem (``problem.describe()``); ``wall_time`` in seconds.
    """

    config: dict
    lrs: np.ndarray
    train_losses: np.ndarray
    eval_steps: np.ndarray
    val_losses: np.ndarray
    val_accuracy: np.ndarray | None = None
    diverged_at: int | None = None
    divergence: str | None = None
    wall_time: float = 0.0
    final_params: Any = None

    KIND = "peer"
    ARRAYS = ("lrs", "train_losses", "eval_steps", "val_losses", "val_accuracy")
    ARRAYS_IN_JSON = True  # readable without numpy

    def __repr__(self) -> str:
        div = f", diverged_at={self.diverged_at}" if self.diverged else ""
        return (f"PeerResult(method={self.method!r}, steps={self.steps_run}{div}, "
                f"final_val_loss={self.final_val_loss:.6g}, "
                f"final_val_accuracy={self.final_val_accuracy:.4g}, wall_time={self.wall_time:.1f}s)")


# ----------------------------------------------------------------------------- the training loop

def _run(problem: Problem, runner: Any, steps: int, eval_every: int, config: dict,
         progress: bool, raise_on_divergence: bool, keep_params: bool) -> PeerResult:
    """Step ``runner`` for ``steps`` steps, evaluating every ``eval_every`` steps and at the end.

    ``runner.step(t) -> (L_t, η_t)`` raises :class:`DivergenceError` when L_t or the parameters
    after the step are not finite; ``runner.evaluation()`` yields the parameters to validate,
    ``runner.buffers()`` the buffers b_k they are validated with ((b_k,) for a stateful problem,
    else ()).
    """
    lrs: list[float] = []
    losses: list[float] = []
    evals: list[tuple[int, float, float]] = []
    final_params = None

    def evaluate(done: int) -> None:
        nonlocal final_params
        with runner.evaluation() as params, torch.no_grad():
            args = (params, *runner.buffers())  # b_k of a stateful problem
            value = problem.val_loss(*args)
            check_finite(value, done - 1, params, VALIDATION_LOSS)  # E(w_k) non-finite: step k−1 made it so
            metrics = problem.metrics(*args) if problem.metrics is not None else {}
            if keep_params and done == steps:
                final_params = tree_clone(params)
        evals.append((done, float(value), float(metrics.get("val_accuracy", math.nan))))

    diverged: Divergence | None = None
    start = time.perf_counter()
    try:
        evaluate(0)
        for t in progress_bar(range(steps), progress, desc=config["method"], leave=False):
            loss, lr = runner.step(t)
            losses.append(loss)
            lrs.append(lr)
            if (t + 1) % eval_every == 0 or t + 1 == steps:
                evaluate(t + 1)
    except DivergenceError as err:  # a non-finite E(w_0) is reported at step 0
        diverged = dataclasses.replace(err.divergence, step=max(err.step, 0))
    wall_time = time.perf_counter() - start
    ev = np.asarray(evals, dtype=np.float64).reshape(-1, 3)
    result = PeerResult(
        config=config, lrs=np.asarray(lrs, dtype=np.float64), train_losses=np.asarray(losses, dtype=np.float64),
        eval_steps=ev[:, 0].astype(np.int64), val_losses=ev[:, 1],
        val_accuracy=ev[:, 2] if problem.metrics is not None else None,
        diverged_at=None if diverged is None else diverged.step,
        divergence=None if diverged is None else diverged.message, wall_time=wall_time,
        final_params=final_params)
    if diverged is not None:
        if raise_on_divergence:
            raise diverged.error()
        diverged.warn(f"peer {config['method']} run stopped: ", f" (result.diverged_at={diverged.step})",
                      stacklevel=3)
    return result


class _DynamicsRunner:
    """Φ_t of ``hgtoolkit.trajectory.make_step`` with the schedule ``lrs``: as :func:`hgtoolkit.train`
    (b_t carried in the state for a stateful problem)."""

    def __init__(self, problem: Problem, lrs: torch.Tensor, dyn: _dynamics.Dynamics):
        self.lrs, self.dyn = lrs, dyn
        self.step_fn = make_step(problem, dyn)
        self.state = initial_state(problem, dyn)

    def buffers(self) -> tuple:
        return (self.state[BUFFERS],) if BUFFERS in self.state else ()

    def step(self, t: int) -> tuple[float, float]:
        with torch.no_grad():
            state, loss = self.step_fn(self.state, self.lrs[t], t)
        check_finite(loss, t, self.dyn.params(state))
        self.state = state
        return float(loss), float(self.lrs[t])

    @contextmanager
    def evaluation(self) -> Iterator[Any]:
        yield self.dyn.params(self.state)


class _TorchRunner:
    """A ``torch.optim`` optimizer on the leaves of ``problem.params0`` as ``nn.Parameter``s; a
    stateful problem's buffers b_{t+1} of the forward pass of step t carried (detached: the
    optimizer differentiates nothing through them), the evaluations reading them."""

    def __init__(self, problem: Problem, peer: "LRFreePeer", optimizer_cls: type, lr: float, kw: dict):
        leaves, spec = tree_flatten(problem.params0)
        self.leaves = [nn.Parameter(x.detach().clone()) for x in leaves]
        self.params = tree_unflatten(self.leaves, spec)
        self.problem, self.peer, self.state_b = problem, peer, problem.buffers0
        self.optimizer = optimizer_cls(self.leaves, lr=lr, **kw)
        if peer.schedule_free:
            self.optimizer.train()

    def step(self, t: int) -> tuple[float, float]:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            if self.state_b is None:
                loss = self.problem.train_loss(self.params, t)
            else:
                loss, new = stateful_loss(self.problem.train_loss)(self.params, t, self.state_b)
                self.state_b = tree_map(torch.Tensor.detach, new)
        check_finite(loss.detach(), t)
        loss.backward()
        before = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        self.optimizer.step()
        check_finite(loss.detach(), t, self.leaves)  # a NaN/inf gradient with a finite loss
        return float(loss.detach()), float(self.peer.effective_lr(self.optimizer.param_groups[0], before))

    def buffers(self) -> tuple:
        return () if self.state_b is None else (self.state_b,)

    @contextmanager
    def evaluation(self) -> Iterator[Any]:
        if self.peer.schedule_free:
            self.optimizer.eval()  # parameters ← the average x_t
        try:
            yield self.params
        finally:
            if self.peer.schedule_free:
                self.optimizer.train()  # parameters ← y_t, where gradients are taken


def _common_args(problem: Any, steps: Any, eval_every: Any, seed: Any) -> tuple[Problem, int, int]:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a hgtoolkit.Problem, got {type(problem).__name__}")
    steps = _check_int(steps, "steps")
    eval_every = max(1, -(-steps // 10)) if eval_every is None else _check_int(eval_every, "eval_every")
    if seed is not None:
        seed = _check_int(seed, "seed", minimum=0)
        if problem.resample is not None:  # deterministic problems have nothing to reseed
            problem = problem.resample(seed)
    return problem, steps, eval_every


def _config(name: str, kind: str, problem: Problem, steps: int, eval_every: int, seed: Any,
            lr: float, **extra: Any) -> dict:
    return {"method": name, "kind": kind, "lr": lr, "steps": steps, "eval_every": eval_every,
            "seed": seed, **extra, "problem": problem.describe()}


# ----------------------------------------------------------------------------- peers

@dataclass(frozen=True)
class SchedulePeer:
    """A schedule family with plain (or momentum/Adam) dynamics from ``hgtoolkit.dynamics``.

    ``build(lr, T, **hyper) -> (schedule, resolved hyperparameters)``; hyperparameters left
    out get defaults that scale with T (see ``doc``).
    """

    name: str
    build: Callable[..., tuple[torch.Tensor, dict]]
    hyper: tuple[str, ...]
    doc: str
    default_lr: float = 0.1

    def schedule(self, steps: int, lr: float | None = None, **hyper: Any) -> tuple[torch.Tensor, dict]:
        """The float64 schedule this peer runs for ``steps`` steps, and its hyperparameters."""
        unknown = set(hyper) - set(self.hyper)
        if unknown:
            raise TypeError(f"peer {self.name!r} got unknown argument(s) {sorted(unknown)}; it takes "
                            f"{list(self.hyper) + ['optimizer']}")
        lr = self.default_lr if lr is None else _check_float(lr, "lr", positive=True)
        return self.build(lr, _check_int(steps, "steps"), **hyper)

    def __call__(self, problem: Problem, steps: int, *, lr: float | None = None, seed: int | None = None,
                 eval_every: int | None = None, progress: bool = False, raise_on_divergence: bool = False,
                 keep_params: bool = True, optimizer: "str | _dynamics.Dynamics" = "sgd",
                 **hyper: Any) -> PeerResult:
        problem, steps, eval_every = _common_args(problem, steps, eval_every, seed)
        lr = self.default_lr if lr is None else lr
        schedule, resolved = self.schedule(steps, lr, **hyper)
        dyn = _dynamics.get(optimizer)
        runner = _DynamicsRunner(problem, check_lrs(schedule, problem, argname="schedule"), dyn)
        config = _config(self.name, "schedule", problem, steps, eval_every, seed, float(lr),
                         **resolved, optimizer=dyn.config())
        return _run(problem, runner, steps, eval_every, config, progress, raise_on_divergence, keep_params)


def _constant(lr, T):
    return constant(lr, T), {}


def _exp_decay(lr, T, gamma=None):
    gamma = 0.01 ** (1 / T) if gamma is None else gamma
    return exponential_decay(lr, gamma, T), {"gamma": gamma}


def _step_decay(lr, T, drop=0.1, every=None):
    every = max(1, -(-T // 3)) if every is None else every
    return step_decay(lr, drop, every, T), {"drop": drop, "every": every}


def _sgdr(lr, T, T0=None, T_mult=2, eta_min=0.0):
    if T0 is None:  # T0 + 2T0 + 4T0 ≥ T: three cycles, the last one ending at (or just after) T
        T0 = max(1, -(-T // (1 + T_mult + T_mult ** 2))) if isinstance(T_mult, int) and T_mult >= 1 else 1
    return cosine_warm_restarts(lr, T, T0, T_mult, eta_min), {"T0": T0, "T_mult": T_mult, "eta_min": eta_min}


@dataclass(frozen=True)
class LRFreePeer:
    """A learning-rate-free ``torch.optim`` optimizer from an optional package.

    ``effective_lr(group_after, group_before)`` gives the step size used in the step just
    taken from the optimizer's first ``param_group`` before and after ``optimizer.step()``.
    """

    name: str
    module: str
    cls: str
    pip: str
    effective_lr: Callable[[dict, dict], float]
    doc: str
    default_lr: float = 1.0
    defaults: dict = field(default_factory=dict)
    schedule_free: bool = False

    def optimizer_class(self) -> type:
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise ImportError(f"peer {self.name!r} needs the package {self.pip!r}, which is not "
                              f"installed: pip install hgtoolkit[peers]  (or pip install {self.pip})") from exc
        return getattr(module, self.cls)

    def __call__(self, problem: Problem, steps: int, *, lr: float | None = None, seed: int | None = None,
                 eval_every: int | None = None, progress: bool = False, raise_on_divergence: bool = False,
                 keep_params: bool = True, **kw: Any) -> PeerResult:
        problem, steps, eval_every = _common_args(problem, steps, eval_every, seed)
        lr = self.default_lr if lr is None else _check_float(lr, "lr", positive=True)
        opt_cls = self.optimizer_class()
        accepted = [p for p in inspect.signature(opt_cls.__init__).parameters if p not in ("self", "params", "lr")]
        unknown = set(kw) - set(accepted)
        if unknown:
            raise TypeError(f"peer {self.name!r} ({self.module}.{self.cls}) got unknown argument(s) "
                            f"{sorted(unknown)}; it takes {accepted}")
        kw = {**self.defaults, **kw}
        runner = _TorchRunner(problem, self, opt_cls, lr, kw)
        version = getattr(importlib.import_module(self.module), "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as _version
                version = _version(self.pip)
            except Exception:  # noqa: BLE001 - the version is informative only
                version = "unknown"
        config = _config(self.name, "lr_free", problem, steps, eval_every, seed, lr,
                         optimizer={"class": f"{self.module}.{self.cls}", "version": version, **kw})
        return _run(problem, runner, steps, eval_every, config, progress, raise_on_divergence, keep_params)


def _bias_correction(group: dict) -> float:
    """Adam's √(1−β2^{k+1})/(1−β1^{k+1}) when the optimizer applies it to d·lr, else 1."""
    if not group.get("use_bias_correction", False):
        return 1.0
    beta1, beta2 = group["betas"]
    k = group["k"]
    return math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1))


def _scheduled_lr(after: dict, before: dict) -> float:
    return after["scheduled_lr"]


def _d_lr(after: dict, before: dict) -> float:
    return before["d"] * before["lr"] * _bias_correction(before)


def _d_lr_sgd(after: dict, before: dict) -> float:
    g0 = after.get("g0_norm", 0.0)
    return before["d"] * before["lr"] / g0 if g0 else math.nan


PEERS: dict[str, SchedulePeer | LRFreePeer] = {
    "constant": SchedulePeer("constant", _constant, (), "η_t = lr"),
    "exp_decay": SchedulePeer("exp_decay", _exp_decay, ("gamma",),
                              "η_t = lr·γ^t; default γ = 0.01^{1/T} (η falls 100× over the run)"),
    "step_decay": SchedulePeer("step_decay", _step_decay, ("drop", "every"),
                               "η_t = lr·drop^⌊t/every⌋; defaults drop = 0.1, every = ⌈T/3⌉"),
    "sgdr": SchedulePeer("sgdr", _sgdr, ("T0", "T_mult", "eta_min"),
                         "cosine with warm restarts; defaults T_mult = 2, T0 = ⌈T/7⌉ (3 cycles), eta_min = 0"),
    "schedulefree_sgd": LRFreePeer("schedulefree_sgd", "schedulefree", "SGDScheduleFree", "schedulefree",
                                   _scheduled_lr, "Schedule-Free SGD, lr = 1 and momentum 0.9 (package defaults)",
                                   schedule_free=True),
    "prodigy": LRFreePeer("prodigy", "prodigyopt", "Prodigy", "prodigyopt", _d_lr,
                          "Prodigy (Adam-type), lr = 1 (package default)"),
    "dadapt_sgd": LRFreePeer("dadapt_sgd", "dadaptation", "DAdaptSGD", "dadaptation", _d_lr_sgd,
                             "D-Adaptation SGD, lr = 1, momentum 0 (package defaults)"),
    "dadapt_adam": LRFreePeer("dadapt_adam", "dadaptation", "DAdaptAdam", "dadaptation", _d_lr,
                              "D-Adaptation Adam, lr = 1 (package default)"),
}


def run_peer(problem: Problem, name: str, steps: int, *, lr: float | None = None, seed: int | None = None,
             eval_every: int | None = None, progress: bool = False, raise_on_divergence: bool = False,
             keep_params: bool = True, **kw: Any) -> PeerResult:
    """Train ``problem`` for ``steps`` steps with the peer ``name`` (a key of :data:`PEERS`).

    ``lr``: η_0 of a schedule peer (default 0.1) or the LR multiplier of a learning-rate-free
    optimizer (default 1, as the packages recommend). ``seed``: for problems with ``resample``
    (stochastic minibatch order), train on ``problem.resample(seed)`` (same w_0); ignored by
    deterministic problems — as :func:`hgtoolkit.online.run`.
    ``eval_every``: validate every that many steps (default ⌈steps/10⌉), and always at 0 and T.
    ``**kw``: the schedule's hyperparameters (``gamma``; ``drop``, ``every``; ``T0``, ``T_mult``,
    ``eta_min``) and ``optimizer`` (a ``hgtoolkit.dynamics`` name or object, default ``"sgd"``)
    for schedule peers; the optimizer's constructor arguments (e.g. ``momentum``,
    ``warmup_steps``, ``d_coef``, ``weight_decay``) for learning-rate-free peers.

    A NaN/inf loss or parameter stops the run at that step, records it in
    ``result.diverged_at`` and warns (:class:`hgtoolkit.errors.DivergenceWarning`), or raises
    :class:`hgtoolkit.errors.DivergenceError` with ``raise_on_divergence=True``.
    ``keep_params``: keep the final parameters in ``result.final_params``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a peer name (str), got {type(name).__name__}")
    if name not in PEERS:
        raise ValueError(f"unknown peer name {name!r}; available: {sorted(PEERS)}")
    return PEERS[name](problem, steps, lr=lr, seed=seed, eval_every=eval_every, progress=progress,
                       raise_on_divergence=raise_on_divergence, keep_params=keep_params, **kw)
