"""The built-in cell kinds: ``online``, ``lrsopt``, ``train`` and ``hypergrad``."""
from __future__ import annotations

import math

import numpy as np
import torch

from .grid import CellContext, CellKind, CellOutput, _NONNEG, _OUTPUT_CONVERTERS, _SEED, _STEPS, _choice, _flag, _mapping, _number, _optimizer, register_cell_kind


# ============================================================================ the cell kinds

def _online_module():
    from .. import online
    return online


def _online_batch(problem_factory, cells) -> list:
    from ..batched import run_online_batch
    return run_online_batch(problem_factory, cells)


def _online_check(params: dict) -> None:
    online = _online_module()
    kw = {k: params[k] for k in ("beta", "mu", "kappa", "beta0", "beta_rule", "objective",
                                  "lr_floor", "lr_max") if k in params}
    online.hyper_config(params.get("method", "marthe"), lr0=params["lr0"], **kw)


def run_online_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """``online.run(problem, **params)`` (no progress bar, w_T not kept)."""
    online = _online_module()
    params = {"seed": 0, **params}
    return online_output(online.run(problem, progress=False, keep_params=False, **params))


def online_output(r) -> CellOutput:
    """The :class:`CellOutput` of an ``OnlineResult`` (what the online kind stores; for kinds
    of one's own whose runner calls ``online.run`` or ``batched.run_online_batch``)."""
    arrays = {k: getattr(r, k) for k in ("lrs", "betas", "mus", "hypergrads", "train_losses",
                                         "eval_steps", "val_losses", "val_accuracy")}
    result = {"config": r.config, "final_lr": r.final_lr, "diverged_at": r.diverged_at,
              "divergence": r.divergence, "steps_run": r.steps_run,
              "best_val_loss": r.best_val_loss, "final_val_loss": r.final_val_loss,
              "final_val_accuracy": r.final_val_accuracy}
    timing = {"wall_time": r.wall_time}
    if getattr(r, "step_times", None) is not None:
        timing["step_times"] = r.step_times
    return CellOutput(result, {k: v for k, v in arrays.items() if v is not None},
                      "diverged" if r.diverged else "ok", timing)


def _online_result(record: dict):
    online = _online_module()
    res, arr, timing = record["result"], record["arrays"], record["meta"].get("timing", {})
    nan = lambda v: math.nan if v is None else float(v)
    return online.OnlineResult(config=res["config"], **{k: arr.get(k) for k in (
        "lrs", "betas", "mus", "hypergrads", "train_losses", "eval_steps", "val_losses", "val_accuracy")},
        step_times=timing.get("step_times"), final_lr=nan(res["final_lr"]),
        diverged_at=res["diverged_at"], divergence=res.get("divergence"),
        wall_time=float(timing.get("wall_time", 0.0)))


def _online_cost(params: dict) -> float:
    hvp = params.get("method", "marthe") != "hd"
    return params.get("steps", 1) * (3.0 if hvp else 1.0)


def _lrsopt_check(params: dict) -> None:
    from .. import lrsopt
    outer = params.get("outer_optimizer", "adam")
    if outer not in lrsopt.OUTER_OPTIMIZERS:
        raise ValueError(f"outer_optimizer must be one of {lrsopt.OUTER_OPTIMIZERS}, got {outer!r}")
    if outer != "lbfgsb" and "outer_lr" not in params:
        raise ValueError(f"outer_lr is required for outer_optimizer={outer!r}")


def run_lrsopt_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """LRS-OPT from η_t = lr0 (t < steps), checkpointed in the store and resumed after a crash."""
    from .. import lrsopt
    p = dict(params)
    lrs0 = torch.full((p.pop("steps"),), p.pop("lr0"), dtype=problem.dtype, device=problem.device)
    kw = {"seed": 0, **p}
    if ctx.checkpoint is not None:
        ctx.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        kw.update(checkpoint_path=ctx.checkpoint.with_suffix(".pt"), resume=True)
    r = lrsopt.optimize_schedule(problem, lrs0, kw.pop("outer_steps"), kw.pop("outer_lr", None),
                                 kw.pop("outer_optimizer", "adam"), progress=False, **kw)
    return lrsopt_output(r)


def lrsopt_output(r) -> CellOutput:
    """The :class:`CellOutput` of a ``ScheduleResult`` (what the lrsopt kind stores; its
    ``to_result`` reads it back), for kinds of one's own whose runner calls
    ``lrsopt.optimize_schedule``."""
    arrays = {k: getattr(r, k) for k in r._ARRAYS}
    arrays.update({f"outer_state.{k}": np.asarray(v) for k, v in r.outer_state.items()})
    last = r.metrics[-1] if r.metrics and isinstance(r.metrics[-1], dict) else {}
    result = {k: getattr(r, k) for k in ("best_value", "best_step", "n_evaluations",
                                         "outer_steps_done", "status", "config", "problem",
                                         "metrics", "events")}
    result.update(final_value=float(r.history[-1]), initial_value=float(r.history[0]),
                  final_val_accuracy=last.get("val_accuracy"))
    return CellOutput(result, arrays, "ok", {"wall_time": r.wall_time,
                                             "evaluations": np.asarray(r.evaluations, np.float64)})


def _lrsopt_result(record: dict):
    from .. import lrsopt
    res, arr = record["result"], record["arrays"]
    outer = {k.split(".", 1)[1]: (v.item() if v.ndim == 0 else v)
             for k, v in arr.items() if k.startswith("outer_state.")}
    timing = record["meta"].get("timing", {})
    extra = {"evaluations": np.asarray(timing["evaluations"])} if "evaluations" in timing else {}
    return lrsopt.ScheduleResult(
        outer_state=outer, wall_time=float(timing.get("wall_time", 0.0)), **extra,
        **{k: arr[k] for k in lrsopt.ScheduleResult._ARRAYS},
        **{k: res[k] for k in ("best_value", "best_step", "n_evaluations", "outer_steps_done",
                               "status", "config", "problem", "metrics", "events")})


def _schedule(problem, params: dict) -> torch.Tensor:
    return torch.full((params["steps"],), params["lr"], dtype=problem.dtype, device=problem.device)


def _metrics(problem, w) -> dict:
    return dict(problem.metrics(w)) if problem.metrics is not None else {}


def run_train_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """Constant-LR training η_t = lr for ``steps`` steps: E(w_T), L_{T−1}, validation metrics."""
    from ..trajectory import train
    r = train(problem, _schedule(problem, params), params.get("optimizer", "sgd"))
    result = {"value": float(r.value), "final_train_loss": float(r.train_losses[-1]),
              **_metrics(problem, r.params)}
    return CellOutput(result, {"train_losses": r.train_losses.numpy(force=True)})


def run_hypergrad_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """The exact hypergradient ∇f(η) of the constant schedule η_t = lr."""
    from ..exact import hypergradient
    r = hypergradient(problem, _schedule(problem, params), params.get("optimizer", "sgd"),
                      params.get("mode", "reverse"))
    result = {"value": float(r.value), "grad_norm": float(r.grad.norm()), **_metrics(problem, r.params)}
    return CellOutput(result, {"grad": r.grad.numpy(force=True),
                               "train_losses": r.train_losses.numpy(force=True)})


def _exact_modes():
    from ..exact import MODES
    return MODES


def _online_methods():
    return _online_module().METHODS


def _online_objectives():
    return _online_module().OBJECTIVES


register_cell_kind(CellKind(
    "online", run_online_cell, required=("lr0", "steps"), check=_online_check, cost=_online_cost,
    summary=("final_val_loss", "best_val_loss", "final_val_accuracy", "final_lr"),
    to_result=_online_result, run_batch=_online_batch,
    params={"method": _choice(_online_methods), "optimizer": _optimizer, "lr0": _NONNEG,
            "steps": _STEPS, "beta": _number(0, words=("auto",), none=True),
            "mu": _number(0, 1, words=("auto",), none=True), "kappa": _NONNEG, "beta0": _NONNEG,
            "beta_rule": _choice(("hh", "h_eta")), "objective": _choice(_online_objectives),
            "lr_floor": _number(0, none=True), "lr_max": _number(0, open_lo=True, none=True),
            "eval_every": _STEPS, "seed": _SEED}))

register_cell_kind(CellKind(
    "lrsopt", run_lrsopt_cell, required=("lr0", "steps", "outer_steps"), check=_lrsopt_check,
    cost=lambda p: 30.0 * p.get("steps", 1) * p.get("outer_steps", 1),
    summary=("initial_value", "best_value", "final_value", "final_val_accuracy"),
    to_result=_lrsopt_result,
    params={"lr0": _NONNEG, "steps": _STEPS, "outer_steps": _STEPS,
            "outer_lr": _number(0, open_lo=True), "outer_optimizer": _choice(("adam", "sgd", "lbfgsb")),
            "optimizer": _optimizer, "mode": _choice(_exact_modes),
            "checkpoint_every": _number(1, integer=True, none=True),
            "chunk_size": _number(1, integer=True, none=True), "resample_batches": _flag,
            "lr_max": _number(0, open_lo=True, none=True), "outer_options": _mapping,
            "max_backtracks": _number(0, integer=True),
            "snapshot_every": _number(1, integer=True, none=True),
            "checkpoint_interval": _STEPS, "seed": _SEED}))

register_cell_kind(CellKind(
    "train", run_train_cell, required=("lr", "steps"), cost=lambda p: float(p.get("steps", 1)),
    summary=("value", "final_train_loss", "val_accuracy"),
    params={"lr": _NONNEG, "steps": _STEPS, "optimizer": _optimizer, "seed": _SEED}))

register_cell_kind(CellKind(
    "hypergrad", run_hypergrad_cell, required=("lr", "steps"),
    cost=lambda p: 3.0 * p.get("steps", 1), summary=("value", "grad_norm"),
    params={"lr": _NONNEG, "steps": _STEPS, "optimizer": _optimizer,
            "mode": _choice(_exact_modes), "seed": _SEED}))

_OUTPUT_CONVERTERS["online"] = online_output
