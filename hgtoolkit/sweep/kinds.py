"""The built-in cell kinds: ``online``, ``lrsopt``, ``train`` and ``hypergrad``."""
from __future__ import annotations

import torch

from .. import records, settings
from .grid import CellContext, CellKind, CellOutput, OUTPUT_CONVERTERS, SEED_SPEC, register_cell_kind


# ============================================================================ the cell kinds

def _online_module():
    from .. import online
    return online


def _online_batch(problem_factory, cells) -> list:
    from ..batched import run_online_batch
    return run_online_batch(problem_factory, cells)


def _online_check(params: dict) -> None:
    """The cross-setting rules of a cell's settings (each setting is checked by its Spec)."""
    _online_module().hyper_config(**params)


def run_online_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """``online.run(problem, **params)`` (no progress bar, w_T not kept)."""
    online = _online_module()
    params = {"seed": 0, **params}
    return online_output(online.run(problem, progress=False, keep_params=False, **params))


def record_output(r, status: str = "ok") -> CellOutput:
    """A record object as a cell's output through the record codec: its JSON values as the
    result, its arrays as the cell's arrays, its ``timing`` fields apart, no parameters."""
    spec = records.spec(r)
    d = records.to_dict(r)
    if spec.params:
        d.pop(spec.params)
    timing = {k: v for k in spec.timing if (v := d.pop(k)) is not None}
    result, arrays = records.split_arrays(d)
    return CellOutput(result, arrays, status, timing)


def record_result(kind: str):
    """``to_result`` of a cell kind whose result is the record ``kind`` (cells written before
    the codec load through its migration). A kind of one's own may store values of its own beside
    the record (:func:`record_output`): ``result["extra"]`` and arrays named ``extra.*``, which
    this ignores."""
    def to_result(record: dict):
        result = {k: v for k, v in record["result"].items() if k != "extra"}
        arrays = {k: v for k, v in record["arrays"].items() if not k.startswith("extra.")}
        d = records.join_arrays(result, arrays)
        timing = records.spec(kind).timing  # the runner adds wall_time to every cell's timing
        d.update({k: v for k, v in record["meta"].get("timing", {}).items() if k in timing})
        return records.from_dict(d, kind, source=f"cell {record.get('id')} of the sweep", untagged=True,
                                 redo="delete the cell's record (cells/<id>.json) and rerun the sweep to recompute it")
    return to_result


def online_output(r) -> CellOutput:
    """The :class:`CellOutput` of an ``OnlineResult`` (what the online kind stores; for kinds
    of one's own whose runner calls ``online.run`` or ``batched.run_online_batch``)."""
    return record_output(r, "diverged" if r.diverged else "ok")


def lrsopt_output(r) -> CellOutput:
    """The :class:`CellOutput` of a ``ScheduleResult`` (what the lrsopt kind stores; its
    ``to_result`` reads it back), for kinds of one's own whose runner calls
    ``lrsopt.optimize_schedule``."""
    return record_output(r)


def _online_cost(params: dict) -> float:
    hvp = params.get("method", "marthe") != "hd"
    return params.get("steps", 1) * (3.0 if hvp else 1.0)


def _lrsopt_check(params: dict) -> None:
    """A grid's cross-setting rule (each setting is checked by its Spec): outer_lr given."""
    outer = params.get("outer_optimizer", settings.defaults(settings.LrsoptSettings)["outer_optimizer"])
    if outer != "lbfgsb" and "outer_lr" not in params:
        raise ValueError(f"outer_lr is required for outer_optimizer={outer!r}")


def run_lrsopt_cell(problem, params: dict, ctx: CellContext) -> CellOutput:
    """LRS-OPT from η_t = lr (t < steps), checkpointed in the store and resumed after a crash."""
    from .. import lrsopt
    p = dict(params)
    lrs = torch.full((p.pop("steps"),), p.pop("lr"), dtype=problem.dtype, device=problem.device)
    kw = {"seed": 0, **p}
    if ctx.checkpoint is not None:
        ctx.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        kw.update(checkpoint_path=ctx.checkpoint.with_suffix(".pt"), resume=True)
    r = lrsopt.optimize_schedule(problem, lrs, progress=False, **kw)
    return lrsopt_output(r)


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
    from ..exact import for_mode, hypergradient
    r = hypergradient(problem, _schedule(problem, params), **for_mode(params))
    result = {"value": float(r.value), "grad_norm": float(r.grad.norm()), **_metrics(problem, r.params)}
    return CellOutput(result, {"grad": r.grad.numpy(force=True),
                               "train_losses": r.train_losses.numpy(force=True)})


# a cell's settings are those of hgtoolkit.settings; a cell's seed is always a number (default 0)
_SCHEDULE = settings.specs(settings.TrainSettings)

register_cell_kind(CellKind(
    "online", run_online_cell, required=settings.required(settings.OnlineSettings), check=_online_check, cost=_online_cost,
    summary=("final_val_loss", "best_val_loss", "final_val_accuracy", "final_lr"),
    to_result=record_result("online"), run_batch=_online_batch,
    params=settings.validators(settings.OnlineSettings, seed=SEED_SPEC)))

register_cell_kind(CellKind(
    "lrsopt", run_lrsopt_cell, required=("lr", "steps", "outer_steps"), check=_lrsopt_check,
    cost=lambda p: 30.0 * p.get("steps", 1) * p.get("outer_steps", 1),
    summary=("initial_value", "best_value", "final_value", "final_val_accuracy"),
    to_result=record_result("lrsopt"),
    params={"lr": _SCHEDULE["lr"][1].check, "steps": _SCHEDULE["steps"][1].check,
            **settings.validators(settings.LrsoptSettings)}))

register_cell_kind(CellKind(
    "train", run_train_cell, required=("lr", "steps"), cost=lambda p: float(p.get("steps", 1)),
    summary=("value", "final_train_loss", "val_accuracy"),
    params=settings.validators(settings.TrainSettings)))

register_cell_kind(CellKind(
    "hypergrad", run_hypergrad_cell, required=("lr", "steps"),
    cost=lambda p: 3.0 * p.get("steps", 1), summary=("value", "grad_norm"),
    params=settings.validators(settings.HypergradSettings)))

OUTPUT_CONVERTERS["online"] = online_output
