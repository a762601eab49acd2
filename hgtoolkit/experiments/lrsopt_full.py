r"""LRS-OPT at the MARTHE paper's scale (Sec. 5, Fig. 2 left): the whole schedule η ∈ R^T of
SGD on the 3×500 MNIST MLP optimised for f(η) = E(w_T) with the exact hypergradient.

Runs (one process, one after the other; sweep cells in ``data/sweep``, each checkpointed
there: a rerun computes only the missing runs and resumes an interrupted one):

- L-BFGS-B on FIXED minibatches (seed s's order; f is then one deterministic function), for
  each of ``lbfgsb_seeds`` seeds, at most ``lbfgsb_steps`` iterations;
- outer Adam (step ``adam_lr``) with ``resample_batches=True`` (a new minibatch order at every
  evaluation, the paper's stochastic setting) for ``adam_seeds`` seeds, ``adam_steps`` steps.

Both start from η_t = ``init`` with 0 ≤ η_t ≤ ``lr_max``. A run also stops once its best
f has improved by less than ``plateau_tol`` (relative) over its last ``plateau_steps`` accepted
steps (``plateau_steps=0``: never). Reported per run: the hypergradient evaluations (line-search
trials included) and wall time until the first evaluation within 1 % of the run's best f, the
final schedule's validation loss and accuracy replayed on the seed's own minibatch order, and
the schedules (figure ``schedules``: the paper's Fig. 2 left).

``python -m hgtoolkit reproduce lrsopt --setting full --out results_full`` (resumable: rerun
the same command after an interruption; finished runs are read back, not recomputed).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import divergence
from . import common

__all__ = ["Config", "run", "time_to_within"]


@dataclass(frozen=True)
class Config:
    """Problem: ``hidden``, ``n_train``/``n_val`` (MNIST or the labelled fallback),
    ``batch_size``, ``steps`` = T. Schedules start at η_t = ``init``, bounded by ``lr_max``.
    ``threads``: torch threads of this process; ``device``: where the MLP trains ("cpu", "cuda")."""

    seed: int = 0
    hidden: tuple = (500, 500, 500)
    n_train: int = 7000
    n_val: int = 700
    batch_size: int = 100
    steps: int = 500
    data_seed: int = 0
    init: float = 0.1
    lr_max: float = 2.0
    lbfgsb_seeds: int = 4
    lbfgsb_steps: int = 100
    adam_seeds: int = 1
    adam_steps: int = 150
    adam_lr: float = 0.01
    plateau_steps: int = 20
    plateau_tol: float = 1e-3
    memory: "int | str | None" = None  # reverse pass's memory budget (hgtoolkit.hypergradient)
    threads: int = 1
    device: str = "cpu"

    @classmethod
    def full(cls) -> "Config":
        """The paper's problem (T = 500); 4 L-BFGS-B seeds ≤ 100 iterations, 1 Adam seed ≤ 150 steps."""
        return cls()

    @classmethod
    def quick(cls) -> "Config":
        """The full MLP and data, T = 100, 2 L-BFGS-B seeds × 15 iterations, 1 Adam seed × 10 steps."""
        return cls(steps=100, lbfgsb_seeds=2, lbfgsb_steps=15, adam_steps=10, plateau_steps=0)

    @classmethod
    def tiny(cls) -> "Config":
        """Seconds: a 1×16 MLP on 300/100 digits, T = 12, 1 seed of each, 3 outer steps."""
        return cls(hidden=(16,), n_train=300, n_val=100, batch_size=50, steps=12, init=0.05,
                   lbfgsb_seeds=1, lbfgsb_steps=3, adam_seeds=1, adam_steps=3, plateau_steps=0)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "n_train", "n_val", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {v!r}")
        for name in ("lbfgsb_seeds", "lbfgsb_steps", "adam_seeds", "adam_steps", "plateau_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int ≥ 0, got {v!r}")
        if not (0 < self.init <= self.lr_max):
            raise ValueError(f"need 0 < init ≤ lr_max, got init={self.init}, lr_max={self.lr_max}")
        if not self.adam_lr > 0 or not self.plateau_tol >= 0:
            raise ValueError("adam_lr must be > 0 and plateau_tol ≥ 0")


def problem(config: Config, seed: int):
    """The Sec.-5 problem of ``seed`` (initial weights and minibatch order)."""
    from .. import problems
    from ..data import FallbackDataWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackDataWarning)  # recorded in problem.info
        return problems.mnist_mlp(n_train=config.n_train, n_val=config.n_val, batch_size=config.batch_size,
                                  hidden=tuple(config.hidden), seed=seed, data_seed=config.data_seed,
                                  device=config.device)


def time_to_within(evaluations: np.ndarray, rel: float = 0.01) -> dict:
    """First evaluation i (1-based count) with f_i ≤ f* + rel·|f*|, f* = min f, and its time."""
    ev = np.asarray(evaluations, dtype=np.float64).reshape(-1, 2)
    f = ev[:, 1]
    if not np.isfinite(f).any():
        return {"best": None, "evaluations": None, "seconds": None}
    best = float(np.nanmin(f))
    i = int(np.argmax(np.nan_to_num(f, nan=np.inf) <= best + rel * abs(best)))
    return {"best": best, "evaluations": i + 1, "seconds": float(ev[i, 0])}


class _Plateau:
    """LRS-OPT callback: stop when the best f improved by < tol (relative) over ``n`` steps."""

    def __init__(self, n: int, tol: float):
        self.n, self.tol, self.best = n, tol, []

    def __call__(self, step, lrs, value, grad) -> bool:
        self.best.append(min(value, self.best[-1]) if self.best else value)
        if self.n == 0 or len(self.best) <= self.n:
            return False
        old, new = self.best[-1 - self.n], self.best[-1]
        return old - new < self.tol * abs(old)


def run_schedule_cell(problem, params: dict, ctx):
    """Kind ``lrsopt_full.run``: LRS-OPT by ``outer`` ("lbfgsb": fixed minibatches; "adam":
    resampled) from η_t = ``init``, checkpointed in the store after every step (a killed run
    resumes), stopped on a plateau; then the final, best and initial schedules replayed on the
    seed's own minibatch order (``result["extra"]["replay"]``)."""
    from .. import lrsopt, sweep
    from ..trajectory import train
    kind, steps = params["outer"], params["outer_steps"]
    lrs = torch.full((params["steps"],), params["init"], dtype=problem.dtype, device=problem.device)
    kw = {}
    if ctx.checkpoint is not None:
        ctx.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        kw.update(checkpoint_path=ctx.checkpoint.with_suffix(".ckpt.pt"), checkpoint_interval=1, resume=True)
    with divergence.recorded():  # expected here: a stopped run says so in its status
        res = lrsopt.optimize_schedule(
            problem, lrs, steps, None if kind == "lbfgsb" else params["adam_lr"], kind,
            resample_batches=kind == "adam", seed=common.derive_seed(params["base_seed"], "lrsopt_full", params["seed"]),
            lr_max=params["lr_max"], memory=params.get("memory"),
            outer_options={"maxfun": 2 * steps + 10} if kind == "lbfgsb" else None,
            snapshot_every=max(1, steps // 10), progress=False,
            callback=_Plateau(params["plateau_steps"], params["plateau_tol"]), **kw)
    out = sweep.lrsopt_output(res)
    replay = {}
    for name, lrs in (("final", res.final_lrs), ("best", res.best_lrs), ("initial", res.initial_lrs)):
        m = problem.metrics(train(problem, torch.as_tensor(lrs, dtype=problem.dtype, device=problem.device)).params)
        replay[name] = {"val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"]}
    out.result["extra"] = {"replay": replay}  # beside the ScheduleResult
    return out


def _register_kinds() -> None:
    from .. import sweep
    _choice, _number = common.choice, common.number
    lrsopt = sweep.CELL_KINDS["lrsopt"]
    sweep.register_cell_kind(sweep.CellKind(
        "lrsopt_full.run", run_schedule_cell, to_result=lrsopt.to_result, summary=lrsopt.summary,
        required=("outer", "steps", "outer_steps", "init", "lr_max", "plateau_steps", "plateau_tol", "base_seed"),
        cost=lambda p: p.get("steps", 1) * p.get("outer_steps", 1),
        params={"outer": _choice(("lbfgsb", "adam")), "steps": _number(1, integer=True),
                "outer_steps": _number(0, integer=True), "init": _number(0, open_lo=True),
                "lr_max": _number(0, open_lo=True), "adam_lr": _number(0, open_lo=True),
                "plateau_steps": _number(0, integer=True), "plateau_tol": _number(0),
                "memory": lrsopt.params["memory"], "base_seed": sweep.SEED_SPEC,
                "seed": sweep.SEED_SPEC}))


_register_kinds()


def grids(config: Config) -> list:
    """The sweep grids: L-BFGS-B on ``lbfgsb_seeds`` seeds, then Adam on ``adam_seeds`` seeds."""
    from .. import sweep
    P = {"name": "mnist_mlp", "n_train": config.n_train, "n_val": config.n_val, "batch_size": config.batch_size,
         "hidden": list(config.hidden), "data_seed": config.data_seed, "device": config.device}
    base = {"steps": config.steps, "init": config.init, "lr_max": config.lr_max, "base_seed": config.seed,
            "plateau_steps": config.plateau_steps, "plateau_tol": config.plateau_tol,
            "memory": config.memory}
    out = []
    for kind, n, steps in (("lbfgsb", config.lbfgsb_seeds, config.lbfgsb_steps),
                           ("adam", config.adam_seeds, config.adam_steps)):
        if n:
            extra = {"adam_lr": config.adam_lr} if kind == "adam" else {}
            out.append(sweep.Grid(f"lrsopt/{kind}", P, "lrsopt_full.run",
                                  axes={"seed": list(range(config.seed, config.seed + n))},
                                  fixed={"outer": kind, "outer_steps": steps, **base, **extra}))
    return out


def _metas(out, config: Config) -> dict:
    """{"<outer>_seed<s>": meta} of the runs stored so far (in grid order)."""
    from .. import sweep
    gs = grids(config)
    recs = common.cell_records(out, gs)
    metas = {}
    for cell in (c for g in gs for c in g.cells()):
        rec = recs.get(cell.id)
        if rec is None:
            continue
        res = sweep.to_result(rec)
        kind, seed = cell.params["outer"], cell.params["seed"]
        metas[f"{kind}_seed{seed}"] = {
            "kind": kind, "seed": seed, "status": res.status, "outer_steps": res.outer_steps_done,
            "n_evaluations": res.n_evaluations, "f_initial": float(res.history[0]),
            "best_value": res.best_value, "wall_time": res.wall_time,
            "seconds_per_evaluation": res.wall_time / max(res.n_evaluations, 1),
            "within_1pct": time_to_within(res.evaluations), "replay": rec["result"]["extra"]["replay"],
            "final_lrs": res.final_lrs.tolist(), "data": rec["meta"].get("data")}
    return metas


def run(config: Config, out_dir, progress: bool = True) -> dict:
    """All runs as sweep cells (resumable: a re-run computes only the missing ones, and a
    killed run resumes from its checkpoint), the table and the schedules figure after each run
    (readable while the others go on); returns the summary."""
    out = common.as_output_dir(out_dir)
    common.note_old_layout(out, "runs")
    gs = grids(config)
    n_jobs = sum(len(g) for g in gs)
    started = time.perf_counter()

    def report(done: int = 0, total: int = 0) -> dict:
        return _report(config, out, _metas(out, config), n_jobs, time.perf_counter() - started)

    common.run_cells(out, gs, progress=progress, threads=config.threads, callback=report)
    return report()


def _report(config: Config, out, metas: dict, n_jobs: int, seconds: float) -> dict:
    """Table (summary.md/json) and schedules figure of the runs in ``metas``."""
    from .. import plotting
    rows = []
    for name, m in metas.items():
        w = m["within_1pct"]
        rows.append([m["kind"], m["seed"], m["outer_steps"], m["n_evaluations"], m["f_initial"], m["best_value"],
                     w["evaluations"], None if w["seconds"] is None else w["seconds"] / 60, m["wall_time"] / 60,
                     m["seconds_per_evaluation"], m["replay"]["initial"]["val_accuracy"],
                     m["replay"]["final"]["val_accuracy"], m["status"]])
    table = common.markdown_table(
        ["outer", "seed", "steps", "evals", "f(η⁰)", "best f", "evals to 1 %", "min to 1 %", "total min",
         "s / eval", "acc η⁰", "acc final", "status"], rows)

    fig, ax = plotting.figure()
    styles = {}
    scheds = {}
    for name, m in metas.items():
        label = f"{'L-BFGS-B' if m['kind'] == 'lbfgsb' else 'Adam (resampled)'}, seed {m['seed']}"
        scheds[label] = np.asarray(m["final_lrs"])
        styles[label] = {"ls": "-" if m["kind"] == "lbfgsb" else "--"}
    plotting.plot_schedules(scheds, ax=ax, styles=styles,
                            title=f"LRS-OPT schedules, 3×{config.hidden[0]} MLP, T = {config.steps}")
    plotting.savefig(fig, out.figure("schedules"), close=True)
    data = next(iter(metas.values()))["data"] if metas else None
    summary = {"runs": {k: {kk: v for kk, v in m.items() if kk not in ("final_lrs",)}
                        for k, m in metas.items()},
               "data": data, "threads": config.threads, "wall_time_this_call": seconds,
               "runs_done": len(metas), "runs_planned": n_jobs}
    done = "" if len(metas) == n_jobs else f" — {len(metas)} of {n_jobs} runs done (rerun to resume)"
    return common.write_summary(out, f"LRS-OPT at full scale (T = {config.steps}){done}",
                                [("Runs", table)], summary,
                                notes=[f"data: {data}", "evals to 1 %: hypergradient evaluations (line-search "
                                       "trials included) until the first f within 1 % of the run's best; "
                                       "accuracy: the schedule replayed on the seed's own minibatch order",
                                       f"device: {config.device}; torch threads: {config.threads}"])
