r"""LRS-OPT at the MARTHE paper's scale (Sec. 5, Fig. 2 left): the whole schedule η ∈ R^T of
SGD on the 3×500 MNIST MLP optimised for f(η) = E(w_T) with the exact hypergradient.

Runs (one process, one after the other, each checkpointed and resumed on a rerun):

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
from pathlib import Path

import numpy as np
import torch

from .. import records
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
    checkpoint_every: "int | str | None" = None
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


def _run_one(config: Config, kind: str, seed: int, root: Path, progress: bool) -> dict:
    from .. import lrsopt
    from ..trajectory import train
    stem = root / f"{kind}_seed{seed}"
    meta_path = stem.with_name(stem.name + ".summary.json")
    cfg = {k: v for k, v in common.config_dict(config).items() if k != "device"}  # rounding only
    job = {"config": cfg, "kind": kind, "seed": seed, "version": 1}
    if meta_path.exists():
        meta = records.read_json(meta_path)
        if meta.get("job") == records.to_jsonable(job):
            return meta
    p = problem(config, seed)
    lrs0 = torch.full((config.steps,), config.init, dtype=p.dtype, device=p.device)
    steps = config.lbfgsb_steps if kind == "lbfgsb" else config.adam_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a stopped run says so in .status
        res = lrsopt.optimize_schedule(
            p, lrs0, steps, None if kind == "lbfgsb" else config.adam_lr, kind,
            resample_batches=kind == "adam", seed=common.derive_seed(config.seed, "lrsopt_full", seed),
            lr_max=config.lr_max, checkpoint_every=config.checkpoint_every,
            outer_options={"maxfun": 2 * steps + 10} if kind == "lbfgsb" else None,
            snapshot_every=max(1, steps // 10), checkpoint_path=stem.with_name(stem.name + ".ckpt.pt"),
            checkpoint_interval=1, resume=True, progress=progress,
            callback=_Plateau(config.plateau_steps, config.plateau_tol))
    res.save(stem)
    replay = {}
    for name, lrs in (("final", res.final_lrs), ("best", res.best_lrs), ("initial", res.initial_lrs)):
        m = p.metrics(train(p, torch.as_tensor(lrs, dtype=p.dtype, device=p.device)).params)  # own order
        replay[name] = {"val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"]}
    within = time_to_within(res.evaluations)
    meta = {"job": records.to_jsonable(job), "kind": kind, "seed": seed, "status": res.status,
            "outer_steps": res.outer_steps_done, "n_evaluations": res.n_evaluations,
            "f_initial": float(res.history[0]), "best_value": res.best_value, "wall_time": res.wall_time,
            "seconds_per_evaluation": res.wall_time / max(res.n_evaluations, 1),
            "within_1pct": within, "replay": replay, "final_lrs": res.final_lrs.tolist(),
            "data": p.info.get("data")}
    records.atomic_write_json(meta_path, meta)
    return meta


def run(config: Config, out_dir, progress: bool = True) -> dict:
    """All runs (resumable), the table and the schedules figure; returns the summary."""
    out = common.as_output_dir(out_dir)
    torch.set_num_threads(config.threads)
    root = out.data_dir / "runs"
    root.mkdir(parents=True, exist_ok=True)
    jobs = ([("lbfgsb", s) for s in range(config.seed, config.seed + config.lbfgsb_seeds)]
            + [("adam", s) for s in range(config.seed, config.seed + config.adam_seeds)])
    started = time.perf_counter()
    metas, summary = {}, {}
    for kind, seed in jobs:
        if progress:
            print(f"[lrsopt] {kind} seed {seed} …", flush=True)
        metas[f"{kind}_seed{seed}"] = m = _run_one(config, kind, seed, root, progress)
        if progress:
            print(f"[lrsopt] {kind} seed {seed}: f {m['f_initial']:.4f} → {m['best_value']:.4f}, "
                  f"{m['n_evaluations']} evaluations, {m['wall_time']:.0f} s ({m['status']})", flush=True)
        # the report so far: readable while the remaining runs go on
        summary = _report(config, out, metas, len(jobs), time.perf_counter() - started)
    return summary


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
    summary = {"runs": {k: {kk: v for kk, v in m.items() if kk not in ("final_lrs", "job")}
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
