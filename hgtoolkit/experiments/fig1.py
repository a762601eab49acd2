r"""MARTHE paper, Fig. 1: HD vs RTHO vs MARTHE on 2-D test functions.

Donini et al. (2020), Sec. 3 / Fig. 1: 500 steps of gradient descent from a fixed point on the
Beale function and a smoothed Bukin N.6, with the LR adapted online by HD (μ = 0) and RTHO
(μ = 1); the best objective value reached, min_t f(w_t), is plotted against the hyper-learning
rate β on a log grid. Reported: on Beale RTHO beats HD for every β that does not diverge; on
smoothed Bukin RTHO's LR first grows exponentially and then collapses to 0 once the trajectory
reaches the valley, while HD stays close to the valley (HD wins).

What this experiment runs, for each function in ``config.functions`` (η_0 = ``lr``,
T = ``steps``, SGD, deterministic, so E = L_t = f and ``objective="val"``):

- every method on the β grid: HD, RTHO, MARTHE with fixed μ ∈ ``mus`` and MARTHE with the
  adaptive μ (``online.run(..., mu="auto")``);
- MARTHE fully adaptive (μ and β adaptive, ``hypergrad_lr="auto"``), its step size κ found by the
  paper's wrapper (:func:`hgtoolkit.online.find_hypergrad_lr`, run as one batch: start at ``kappa_start``, ÷10 until the
  run does not diverge);
- LRS-OPT (:func:`hgtoolkit.lrsopt.optimize_schedule`): the whole schedule η ∈ R^T optimised
  for f(w_T) from the constant schedule η_t = η_0, ``lrsopt_steps`` projected Adam steps;
- the iterates w_0 … w_T of the best-β run of HD, RTHO, MARTHE (adaptive μ) and of LRS-OPT's
  best schedule, replayed from the recorded schedules (:func:`common.replay_iterates`).

Functions: ``beale``; ``bukin_smooth``, the project's squared-valley stand-in for the paper's
smoothed Bukin (its exact formula was lost); ``bukin_sharp``, a smoothing that keeps Bukin
N.6's sharp √|u| valley. Which of HD/RTHO wins on the Bukin stand-ins is measured, not assumed
(see ``summary.md``).

Writes, under ``<out>/fig1/``:

- ``data/sweep/``: the constant search + LRS-OPT of each function as a sweep cell (kind
  ``fig1.lrsopt``, checkpointed), stored as it finishes: a re-run computes only the missing
  cells (the online runs, one batch for all functions, take seconds and are recomputed);
- ``data/<fn>_grid.npz`` / ``.json``: per (method, β): η_t, μ_t, f(w_t) (NaN after a
  divergence), best and final objective, the step it diverged at (−1: none);
- ``data/<fn>_marthe_auto.{json,npz}`` (:class:`~hgtoolkit.online.OnlineResult`),
  ``data/<fn>_lrsopt.{json,npz}`` (:class:`~hgtoolkit.lrsopt.ScheduleResult`),
  ``data/<fn>_paths.npz`` (iterates and f along them);
- ``figures/fig1_<fn>.png``/``.pdf``: (a) best objective vs β, (b) η_t of the best-β run of
  each method and LRS-OPT's schedule, (c) the trajectories over the contour plot (each method's
  line narrower than the one under it, markers staggered, so that every path stays visible where
  they coincide; a pair within 1 pt everywhere on the page is marked "≈" in the legend and named
  in the caption), (d) HD vs RTHO at one common β;
- ``summary.md``/``summary.json``: best objective per method (+ its β), the HD-vs-RTHO verdict
  per function next to the paper's statement.

Figures are drawn by :func:`make_figures` from the saved records only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import divergence, plotting, records
from . import common

__all__ = ["Config", "run", "make_figures", "method_specs", "PAPER"]

#: What the paper reports per function (the stand-ins are compared against the Bukin statement).
PAPER = {
    "beale": "RTHO beats HD for every β that does not diverge",
    "bukin_smooth": "HD beats RTHO: RTHO's η grows, then collapses to 0 in the valley; HD stays near the valley",
    "bukin_sharp": "HD beats RTHO: RTHO's η grows, then collapses to 0 in the valley; HD stays near the valley",
}

_TITLES = {"beale": "Beale", "bukin_smooth": "smoothed Bukin (squared valley, project stand-in)",
           "bukin_sharp": "smoothed Bukin (sharp valley, ε = 1e-4)", "bukin6": "Bukin N.6",
           "rosenbrock": "Rosenbrock"}

AUTO_LABEL = "MARTHE μ, β adaptive"
CONST_LABEL = "GD, best constant η"
LRSOPT_LABEL = "LRS-OPT"


@dataclass(frozen=True)
class Config:
    """Settings of the Fig. 1 experiment (see the module docstring).

    ``hypergrad_lrs``: the β grid; ``mus``: MARTHE's fixed μ values; ``adaptive_mu``: add MARTHE with
    the adaptive μ on the grid; ``auto_hypergrad_lr``: add MARTHE with μ and β adaptive (κ searched from
    ``kappa_start`` down by ÷10, at most ``kappa_tries`` values). An online run counts as
    diverged when f or w stops being finite or η_t exceeds ``lr_max_factor``·η_0 (on
    ``bukin_sharp`` the gradient is bounded, so f never overflows: without the η bound a run
    whose η reached 100 would count as "not diverged").
    ``constants``: plain GD with constant η on a log grid of this many values in
    [η_0, 100 η_0]; the best (smallest f(w_T)) is the baseline row and LRS-OPT's start.
    ``lrsopt_steps`` (0: skip): projected Adam steps on η, step size α = ``lrsopt_lr_rel``·η_c
    (η_c the best constant). ``workers``: kept for the command line; the three LRS-OPT cells run
    one after another in this process, each followed by its function's figure (written by a
    forked process beside the next cell), so that the first figure is on disk early.
    """

    functions: tuple[str, ...] = ("beale", "bukin_smooth", "bukin_sharp")
    steps: int = 500
    lr: float = 1e-3
    hypergrad_lrs: tuple[float, ...] = tuple(float(10.0 ** e) for e in np.arange(-11.0, -3.9, 0.5))
    mus: tuple[float, ...] = (0.9, 0.99, 0.999)
    adaptive_mu: bool = True
    auto_hypergrad_lr: bool = True
    kappa_start: float = 1e-6
    kappa_tries: int = 14
    lr_max_factor: float = 100.0
    constants: int = 11
    lrsopt_steps: int = 200
    lrsopt_lr_rel: float = 0.2
    workers: int = 1
    seed: int = 0

    @classmethod
    def full(cls) -> "Config":
        """The paper's scale: 500 steps, β from 1e-11 to 1e-4 in half decades, μ ∈ {0.9, 0.99,
        0.999} and adaptive, 200 LRS-OPT steps (~20 min on 2 idle cores)."""
        return cls(workers=common.default_workers())

    @classmethod
    def quick(cls) -> "Config":
        """500 steps, β ∈ {1e-10 … 1e-4} (decades), μ = 0.99 and adaptive, 20 LRS-OPT steps
        (about 2–3 min on 2 idle cores)."""
        return cls(hypergrad_lrs=tuple(float(10.0 ** e) for e in range(-10, -3)), mus=(0.99,),
                   lrsopt_steps=20, workers=common.default_workers())

    @classmethod
    def tiny(cls) -> "Config":
        """Seconds, for the tests: one function, 30 steps, two β, μ = 0.9 and adaptive."""
        return cls(functions=("bukin_sharp",), steps=30, hypergrad_lrs=(1e-8, 1e-6), mus=(0.9,),
                   kappa_start=1e-8, kappa_tries=3, constants=3, lrsopt_steps=2, workers=1)

    def __post_init__(self):
        import testfunctions
        for name in self.functions:
            testfunctions.get(name)  # ValueError naming the function
        if not self.functions:
            raise ValueError("functions must name at least one test function")
        if not self.hypergrad_lrs or any(not (b > 0 and math.isfinite(b)) for b in self.hypergrad_lrs):
            raise ValueError(f"hypergrad_lrs must be positive and finite, got {self.hypergrad_lrs}")
        if any(not 0 <= m <= 1 for m in self.mus):
            raise ValueError(f"mus must be in [0, 1], got {self.mus}")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"steps must be ≥ 1 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.lrsopt_steps < 0:
            raise ValueError(f"lrsopt_steps must be ≥ 0, got {self.lrsopt_steps}")
        if self.constants < 1 or not self.lr_max_factor > 1 or not self.lrsopt_lr_rel > 0:
            raise ValueError("constants must be ≥ 1, lr_max_factor > 1 and lrsopt_lr_rel > 0; got "
                             f"{self.constants}, {self.lr_max_factor}, {self.lrsopt_lr_rel}")

    @property
    def lr_max(self) -> float:
        """|η_t| above this counts as divergence (``lr_max_factor``·η_0)."""
        return self.lr_max_factor * self.lr


def method_specs(config: Config) -> list[tuple[str, str, Any]]:
    """The methods run on the β grid: ``(label, method, mu)`` for :func:`hgtoolkit.online.run`."""
    specs = [("HD", "hd", None), ("RTHO", "rtho", None)]
    specs += [(f"MARTHE μ={m:g}", "marthe", float(m)) for m in config.mus]
    if config.adaptive_mu:
        specs.append(("MARTHE μ adaptive", "marthe", "auto"))
    return specs


# ----------------------------------------------------------------------------- jobs (one process each)

def _problem(fn: str):
    from .. import problems
    return problems.from_function(fn)


def _grid_cells(config: Config, specs) -> list[dict]:
    """The β grid of every method as ``online.run`` cells (of every function: one batch)."""
    cells = []
    for _, method, mu in specs:
        for beta in config.hypergrad_lrs:
            cell = dict(method=method, lr=config.lr, steps=config.steps, hypergrad_lr=beta,
                        objective="val", lr_max=config.lr_max)
            if method == "marthe":
                cell["mu"] = mu
            cells.append(cell)
    return cells


def _auto_cells(config: Config) -> list[dict]:
    """MARTHE with μ and β adaptive at κ = kappa_start, kappa_start/10, … (the ÷10 wrapper)."""
    return [dict(method="marthe", hypergrad_lr="auto", mu="auto", lr=config.lr, steps=config.steps,
                 objective="val", lr_max=config.lr_max, kappa=config.kappa_start / 10.0 ** i)
            for i in range(config.kappa_tries if config.auto_hypergrad_lr else 0)]


def _online_runs(config: Config, specs, progress: bool) -> dict[str, tuple[list[dict], Any]]:
    """Every online run of every function — the β grid of each method and the κ search of the
    fully adaptive MARTHE — as ONE batch (:func:`hgtoolkit.batched.run_online_batch`: the
    functions' rows side by side). ``{fn: (the grid cells' arrays, the κ search's first
    non-diverging run — the result of ``online.find_hypergrad_lr``, which tries the same κ in the same
    order — or a message)}``."""
    from .. import batched
    grid, auto = _grid_cells(config, specs), _auto_cells(config)
    problems = {fn: _problem(fn) for fn in config.functions}
    cells = [dict(c, problem=problems[fn]) for fn in config.functions for c in grid + auto]
    with divergence.recorded():  # expected here: each result records it (diverged_at, divergence)
        results = batched.run_online_batch(None, cells, progress=progress)
    n = len(grid) + len(auto)
    return {fn: _one_function(grid, auto, results[i * n:(i + 1) * n])
            for i, fn in enumerate(config.functions)}


def _one_function(grid: list, auto: list, results: list) -> tuple[list[dict], Any]:
    """One function's results of :func:`_online_runs`: the grid cells' arrays, and the κ search."""
    cells = [{"lrs": r.lrs, "mus": r.mus, "values": r.val_losses, "best": r.best_val_loss,
              "final": r.final_val_loss if not r.diverged else math.nan,
              "diverged_at": -1 if r.diverged_at is None else int(r.diverged_at),
              "wall_time": r.wall_time} for r in results[:len(grid)]]
    tried, best = [], None
    for cell, r in zip(auto, results[len(grid):]):
        tried.append({"kappa": cell["kappa"], "diverged_at": r.diverged_at})
        if not r.diverged:
            best = r
            break
    if best is not None:
        best.config["hypergrad_lr_search"] = tried
    elif auto:
        best = (f"find_hypergrad_lr: all {len(auto)} values of kappa from {auto[0]['kappa']:g} down to "
                f"{auto[-1]['kappa']:g} diverged")
    return cells, best


def _constant_search(problem, lr: float, steps: int, n: int) -> dict:
    """Plain GD with η_t = c for c on a log grid in [η_0, 100 η_0]: f(w_T) and min_t f(w_t)
    per c (inf when the run diverged), and the c with the smallest f(w_T)."""
    from ..trajectory import train
    grid = np.geomspace(lr, 100 * lr, n) if n > 1 else np.array([lr])
    if problem.rowwise:  # all constants at once (the same numbers as the loop below)
        final, best = _constant_rows(problem, grid, steps)
    else:
        final, best = np.full(n, np.inf), np.full(n, np.inf)
        for i, c in enumerate(grid):
            try:
                r = train(problem, torch.full((steps,), float(c), dtype=problem.dtype))
            except FloatingPointError:
                continue
            final[i] = float(r.value)
            best[i] = min(float(r.train_losses.min()), final[i])
    k = int(np.argmin(final))
    return {"lrs": grid, "final": final, "best": best, "best_lr": float(grid[k]),
            "best_final": float(final[k]), "best_min_t": float(best[k])}


def _constant_rows(problem, grid: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The constant-η GD runs of :func:`_constant_search` as one row-wise batch
    (``Problem.rowwise``: row r of W is the run with η = grid[r]): w ← w − η ∇f(w), the kernels of
    ``trajectory.train``. (f(w_T), min_t f(w_t)) per η; inf for a run that met a non-finite loss
    or ended on non-finite parameters (``train`` raises there)."""
    from ..trajectory import rowwise_gradient_hvp
    W = problem.params0.expand(len(grid), *problem.params0.shape).clone()
    lrs = torch.tensor(grid, dtype=W.dtype, device=W.device).view(-1, *[1] * problem.params0.dim())
    alive = torch.ones(len(grid), dtype=torch.bool, device=W.device)
    low = torch.full((len(grid),), math.inf, dtype=W.dtype, device=W.device)
    for t in range(steps):
        G, L, _ = rowwise_gradient_hvp(problem.train_loss, W, None, t)
        alive &= torch.isfinite(L)
        low = torch.where(alive, torch.minimum(low, L), low)
        W = torch.addcmul(W, lrs, G, value=-1)
    with torch.no_grad():
        value = problem.val_loss(W)
    alive &= torch.isfinite(value) & torch.isfinite(W).flatten(1).all(1)
    final = torch.where(alive, value, math.inf)
    return final.numpy(force=True), torch.where(alive, torch.minimum(low, value), math.inf).numpy(force=True)


def run_lrsopt_cell(problem, params: dict, ctx):
    """Kind ``fig1.lrsopt``: the best constant η (GD, :func:`_constant_search`), then LRS-OPT from
    it (the sweep's ``lrsopt`` cell: projected Adam, α = ``lr_rel``·η_c, checkpointed in the
    store). The constants go beside the record (``result["extra"]``, arrays ``extra.constants.*``)."""
    from .. import sweep
    constants = _constant_search(problem, params["lr"], params["steps"], params["constants"])
    arrays = {f"extra.constants.{k}": v for k, v in constants.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in constants.items() if not isinstance(v, np.ndarray)}
    if not params["outer_steps"]:
        return sweep.CellOutput({"extra": {"constants": scalars}}, arrays)
    c = constants["best_lr"]
    with divergence.recorded():  # expected here: a stopped run says so in its status
        out = sweep.CELL_KINDS["lrsopt"].run(problem, {
            "lr": c, "steps": params["steps"], "outer_steps": params["outer_steps"],
            "outer_lr": params["lr_rel"] * c, "outer_optimizer": "adam"}, ctx)
    out.result["extra"] = {"constants": scalars}  # beside the ScheduleResult
    out.arrays.update(arrays)
    return out


def _register_kinds() -> None:
    from .. import sweep
    _number = common.number
    sweep.register_cell_kind(sweep.CellKind(
        "fig1.lrsopt", run_lrsopt_cell, required=("lr", "steps", "constants", "outer_steps", "lr_rel"),
        cost=lambda p: p.get("steps", 1) * (p.get("constants", 1) + 3.0 * p.get("outer_steps", 0)),
        summary=("final_value", "best_value"),
        params={"lr": _number(0, open_lo=True), "steps": _number(1, integer=True),
                "constants": _number(1, integer=True), "outer_steps": _number(0, integer=True),
                "lr_rel": _number(0, open_lo=True), "seed": sweep.SEED_SPEC}))


_register_kinds()


def lrsopt_grid(config: Config):
    """The sweep grid of the LRS-OPT cells: one per function (constant search + LRS-OPT)."""
    from .. import sweep
    return [sweep.Grid(f"fig1/lrsopt/{fn}", {"name": fn}, "fig1.lrsopt",
                       fixed={"lr": config.lr, "steps": config.steps, "constants": config.constants,
                              "outer_steps": config.lrsopt_steps, "lr_rel": config.lrsopt_lr_rel})
            for fn in config.functions]


def _lrsopt_records(out, config: Config, functions=None) -> dict:
    """{fn: (constants, ScheduleResult | None)} read from the store (``functions``: those only)."""
    from .. import sweep
    pairs = [(fn, g) for fn, g in zip(config.functions, lrsopt_grid(config)) if functions is None or fn in functions]
    recs = common.cell_records(out, [g for _, g in pairs])
    res = {}
    for fn, g in pairs:
        rec = recs[g.cells()[0].id]
        constants = {"lrs": None, "final": None, "best": None, **rec["result"]["extra"]["constants"],
                     **{k.split(".", 2)[2]: v for k, v in rec["arrays"].items() if k.startswith("extra.constants.")}}
        res[fn] = (constants, sweep.CELL_KINDS["lrsopt"].to_result(rec) if config.lrsopt_steps else None)
    return res


# ----------------------------------------------------------------------------- the experiment

def _pad(rows: list[np.ndarray], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _best_index(best: np.ndarray, diverged: np.ndarray) -> int | None:
    ok = np.where(~diverged & np.isfinite(best))[0]
    return None if not len(ok) else int(ok[np.argmin(best[ok])])


def run(config: Config, out_dir, progress: bool = True) -> dict:
    """Run the experiment (module docstring), write records, figures and the summary; return it."""
    out = common.as_output_dir(out_dir)
    specs = method_specs(config)
    T = config.steps

    # the online runs of every function first (one batch: seconds); then, function by function,
    # its LRS-OPT cell, its records and its figure, written by a forked process while the next
    # function's LRS-OPT runs: the first figure is on disk after one function's LRS-OPT
    by_job: dict = {}
    for fn, (cells, auto) in _online_runs(config, specs, progress).items():
        by_job[("auto", fn)] = auto if config.auto_hypergrad_lr else None
        for (_, method, mu), row in zip(specs, [cells[i:i + len(config.hypergrad_lrs)]
                                                for i in range(0, len(cells), len(config.hypergrad_lrs))]):
            for beta, cell in zip(config.hypergrad_lrs, row):
                by_job[("grid", (fn, method, mu, beta))] = cell

    summary: dict[str, Any] = {"functions": {}, "lr": config.lr, "steps": T,
                               "hypergrad_lrs": list(config.hypergrad_lrs),
                               "cells": {"cells": 0, "existing": 0, "computed": []}}
    figures = []
    for fn, lgrid in zip(config.functions, lrsopt_grid(config)):
        done = common.cells_summary(common.run_cells(out, [lgrid], progress=progress))
        for k in ("cells", "existing", "computed"):
            summary["cells"][k] += done[k]
        by_job[("lrsopt", fn)] = _lrsopt_records(out, config, [fn])[fn]
        problem = _problem(fn)
        cells = [[by_job[("grid", (fn, method, mu, beta))] for beta in config.hypergrad_lrs]
                 for _, method, mu in specs]
        grid = {
            "hypergrad_lrs": np.asarray(config.hypergrad_lrs),
            "lrs": np.stack([_pad([c["lrs"] for c in row], T) for row in cells]),
            "mus": np.stack([_pad([c["mus"] for c in row], T) for row in cells]),
            "values": np.stack([_pad([c["values"] for c in row], T + 1) for row in cells]),
            "best": np.array([[c["best"] for c in row] for row in cells]),
            "final": np.array([[c["final"] for c in row] for row in cells]),
            "diverged_at": np.array([[c["diverged_at"] for c in row] for row in cells], dtype=np.int64),
            "labels": np.array([s[0] for s in specs]),
        }
        records.save(records.DataRecord({
            "function": fn, "problem": problem.describe(), "lr": config.lr, "steps": T,
            "methods": [{"label": l, "method": m, "mu": mu} for l, m, mu in specs],
            "hypergrad_lrs": list(config.hypergrad_lrs), "best": grid["best"], "final": grid["final"],
            "diverged_at": grid["diverged_at"], "objective": "val (= f: deterministic)"}, grid),
            out.data(f"{fn}_grid"))

        # the best β per method, and the runs whose paths are drawn
        diverged = grid["diverged_at"] >= 0
        best_idx = {s[0]: _best_index(grid["best"][i], diverged[i]) for i, s in enumerate(specs)}
        schedules: dict[str, np.ndarray] = {}
        for i, (label, _, _) in enumerate(specs):
            j = best_idx[label]
            if j is not None:
                schedules[label] = grid["lrs"][i, j]

        auto = by_job.get(("auto", fn))
        auto_info: dict[str, Any] = {"ran": config.auto_hypergrad_lr}
        if auto is not None:
            if isinstance(auto, str):
                auto_info.update(error=auto)
            else:
                auto.save(out.data(f"{fn}_marthe_auto"))
                schedules[AUTO_LABEL] = auto.lrs
                auto_info.update(best=auto.best_val_loss, final=auto.final_val_loss,
                                 kappa=auto.config["kappa"], search=auto.config.get("hypergrad_lr_search"),
                                 mu_zero_fraction=float(np.mean(auto.mus == 0)),
                                 mu_mean=float(np.mean(auto.mus)))
        constants, lrs_res = by_job[("lrsopt", fn)]
        records.save(records.DataRecord({
            "function": fn, "steps": T, "what": "plain GD with a constant learning rate c",
            **constants}), out.data(f"{fn}_constant"))
        lrs_info: dict[str, Any] = {"ran": bool(config.lrsopt_steps), "start_lr": constants["best_lr"]}
        if lrs_res is not None:
            lrs_res.save(out.data(f"{fn}_lrsopt"))
            schedules[LRSOPT_LABEL] = lrs_res.best_lrs
            lrs_info.update(initial=float(lrs_res.history[0]), best_final_value=lrs_res.best_value,
                            best_step=lrs_res.best_step, outer_steps=lrs_res.outer_steps_done,
                            status=lrs_res.status, lr_scale=lrs_res.outer_state.get("lr_scale"))

        # iterates of the drawn runs (replayed from the recorded schedules)
        drawn = [l for l in ("HD", "RTHO", "MARTHE μ adaptive", LRSOPT_LABEL) if l in schedules]
        paths = {l: common.replay_iterates(problem, schedules[l]) for l in drawn}
        fvals = {l: problem.val_loss(torch.as_tensor(p)).numpy() for l, p in paths.items()}
        records.save(records.DataRecord({"function": fn}, {
            "labels": np.array(drawn), **{f"path_{k}": paths[l] for k, l in enumerate(drawn)},
            **{f"f_{k}": fvals[l] for k, l in enumerate(drawn)}}), out.data(f"{fn}_paths"))
        if LRSOPT_LABEL in fvals:
            lrs_info["best_min_t"] = float(np.min(fvals[LRSOPT_LABEL]))

        summary["functions"][fn] = _function_summary(fn, specs, grid, best_idx, auto_info, lrs_info,
                                                     constants, config)
        figures += make_figures(out, [fn], wait=False)
    plotting.wait_for_figures()
    sections, notes = _markdown(summary, config)
    summary["figure_files"] = [str(p) for p in figures]
    return common.write_summary(out, "MARTHE Fig. 1 — HD vs RTHO vs MARTHE on 2-D test functions",
                                sections, summary, notes=notes)


# ----------------------------------------------------------------------------- summary

def _rtho_collapse(lrs: np.ndarray, lr: float) -> dict:
    lrs = lrs[np.isfinite(lrs)]
    peak = int(np.argmax(lrs))
    return {"peak_lr_over_lr0": float(lrs[peak] / lr), "peak_step": peak,
            "zero_fraction": float(np.mean(lrs == 0)),
            "zero_after_peak_fraction": float(np.mean(lrs[peak:] == 0))}


def _function_summary(fn, specs, grid, best_idx, auto_info, lrs_info, constants, config) -> dict:
    hypergrad_lrs = np.asarray(config.hypergrad_lrs)
    diverged = grid["diverged_at"] >= 0
    methods = {}
    for i, (label, method, mu) in enumerate(specs):
        j = best_idx[label]
        entry = {"method": method, "mu": mu, "n_diverged": int(diverged[i].sum()),
                 "best": None if j is None else float(grid["best"][i, j]),
                 "hypergrad_lr": None if j is None else float(hypergrad_lrs[j]),
                 "final": None if j is None else float(grid["final"][i, j]),
                 "largest_stable_hypergrad_lr": (float(hypergrad_lrs[~diverged[i]].max()) if (~diverged[i]).any() else None)}
        zero = [float(np.mean(grid["lrs"][i, k][np.isfinite(grid["lrs"][i, k])] == 0))
                for k in range(len(hypergrad_lrs)) if not diverged[i, k]]
        entry["zero_fraction_range"] = [min(zero), max(zero)] if zero else None
        if j is not None:
            lrs = grid["lrs"][i, j]
            entry["lr_behaviour"] = _rtho_collapse(lrs, config.lr)
            if mu == "auto":
                mus = grid["mus"][i, j]
                mus = mus[np.isfinite(mus)]
                entry["mu_stats"] = {"mean": float(mus.mean()), "zero_fraction": float(np.mean(mus == 0)),
                                     "above_0.99_fraction": float(np.mean(mus > 0.99))}
        methods[label] = entry

    # HD vs RTHO: per β where neither diverged, and best against best
    hd, rt = [s[0] for s in specs].index("HD"), [s[0] for s in specs].index("RTHO")
    both = ~diverged[hd] & ~diverged[rt]
    rtho_wins = int(np.sum(grid["best"][rt][both] < grid["best"][hd][both]))
    hd_best, rt_best = methods["HD"]["best"], methods["RTHO"]["best"]
    if hd_best is None or rt_best is None:
        winner = "undecided (a method diverged at every β)"
    else:
        winner = "RTHO" if rt_best < hd_best else "HD"
    verdict = {"common_hypergrad_lrs": int(both.sum()), "rtho_better_at": rtho_wins,
               "hd_better_at": int(both.sum()) - rtho_wins, "best_hd": hd_best, "best_rtho": rt_best,
               "winner_best_vs_best": winner,
               "ratio_best_hd_over_rtho": (hd_best / rt_best if hd_best and rt_best else None)}
    constant = {"lr": constants["best_lr"], "final": constants["best_final"],
                "best": constants["best_min_t"]}
    return {"methods": methods, "hd_vs_rtho": verdict, "marthe_auto": auto_info, "lrsopt": lrs_info,
            "best_constant": constant, "paper": PAPER.get(fn)}


def _markdown(summary: dict, config: Config) -> tuple[list[tuple[str, str]], list[str]]:
    sections = []
    verdict_rows = []
    for fn, s in summary["functions"].items():
        rows = []
        for label, m in s["methods"].items():
            behaviour = m.get("lr_behaviour", {})
            extra = ""
            if "mu_stats" in m:
                extra = (f"μ: mean {m['mu_stats']['mean']:.2f}, = 0 for {100 * m['mu_stats']['zero_fraction']:.0f}%"
                         f" of steps, > 0.99 for {100 * m['mu_stats']['above_0.99_fraction']:.0f}%")
            rows.append([label, m["best"], m["hypergrad_lr"], m["final"],
                         behaviour.get("peak_lr_over_lr0"), behaviour.get("zero_fraction"),
                         f"{m['n_diverged']}/{len(config.hypergrad_lrs)}", extra])
        a = s["marthe_auto"]
        if "best" in a:
            rows.append([AUTO_LABEL, a["best"], f"κ={common.fmt(a['kappa'])}", a["final"], None, None,
                         f"{sum(t['diverged_at'] is not None for t in a['search'] or [])} κ tried diverged",
                         f"μ = 0 for {100 * a['mu_zero_fraction']:.0f}% of steps"])
        elif "error" in a:
            rows.append([AUTO_LABEL, None, None, None, None, None, "all diverged", a["error"]])
        c = s["best_constant"]
        rows.append([CONST_LABEL, c["best"], "—", c["final"], c["lr"] / config.lr, 0, "—",
                     f"η_t = {common.fmt(c['lr'])} for all t (best of {config.constants} constants by f(w_T))"])
        l = s["lrsopt"]
        if "best_final_value" in l:
            rows.append([LRSOPT_LABEL, l.get("best_min_t"), "—", l["best_final_value"], None, None, "—",
                         f"{l['outer_steps']} Adam steps on η from the best constant "
                         f"(f(w_T): {common.fmt(l['initial'])} → {common.fmt(l['best_final_value'])})"])
        table = common.markdown_table(
            ["method", "best min_t f(w_t)", "at β", "f(w_T) there", "max η_t / η_0", "share η_t = 0",
             "β diverged", "notes"], rows, align="lrrrrrrl")
        sections.append((f"{_TITLES.get(fn, fn)} (`{fn}`)", table))
        v = s["hd_vs_rtho"]
        measured = (f"{v['winner_best_vs_best']} (best {common.fmt(v['best_hd'])} HD vs "
                    f"{common.fmt(v['best_rtho'])} RTHO); RTHO better at {v['rtho_better_at']}"
                    f"/{v['common_hypergrad_lrs']} β where neither diverged")
        rt = s["methods"]["RTHO"].get("lr_behaviour")
        collapse = (f"RTHO η peaks at {rt['peak_lr_over_lr0']:.1f}·η_0 (step {rt['peak_step']}), "
                    f"= 0 for {100 * rt['zero_fraction']:.0f}% of steps" if rt else "—")
        ranges = {m: s["methods"][m]["zero_fraction_range"] for m in ("RTHO", "HD")}
        if all(ranges.values()) and max(r[1] for r in ranges.values()) > 0:
            collapse += "; η = 0 for " + ", ".join(
                f"{100 * r[0]:.0f}–{100 * r[1]:.0f}% ({m})" for m, r in ranges.items()) + \
                " of steps over the non-diverged β"
        verdict_rows.append([fn, s["paper"] or "—", measured, collapse])
    sections.insert(0, ("HD vs RTHO: paper vs measured", common.markdown_table(
        ["function", "paper (Donini et al. 2020, Fig. 1)", "measured (best over the β grid)",
         "RTHO's η at its best β"], verdict_rows, align="llll")))
    notes = [
        f"All runs: plain gradient descent, T = {config.steps} steps, η_0 = {config.lr:g}, from the "
        "function's default start; E = f (deterministic), hypergradient objective 'val'; η clipped at 0; "
        f"a run counts as diverged when f or w is not finite, η_t > {config.lr_max:g} "
        f"(= {config.lr_max_factor:g} η_0) or f(w_t) > 2 f(w_0) (the online engine's divergence_factor); "
        "with β adaptive, β is bounded so that one LR update moves η by at most max(η, η_0).",
        f"β grid: {', '.join(common.fmt(b, 2) for b in config.hypergrad_lrs)}. 'best' = min_t f(w_t) over the "
        "run, as in the paper's Fig. 1 (center); diverged runs are excluded from it and drawn as × in the figures.",
        "`bukin_smooth` squares the valley residual (100 u²): it is the project's stand-in for the paper's "
        "smoothed Bukin, whose formula was lost; `bukin_sharp` keeps the sharp √|u| valley ((u² + 1e-4)^{1/4}). "
        "Compare the paper's Bukin statement with both.",
        "LRS-OPT optimises f(w_T) (the final value), not min_t f(w_t); its table row gives min_t along "
        "its best schedule and f(w_T).",
    ]
    return sections, notes


# ----------------------------------------------------------------------------- figures (from records)

_PATH_ORDER = (LRSOPT_LABEL, "MARTHE μ adaptive", "RTHO", "HD")
_COLOURS = {"HD": "tab:blue", "RTHO": "tab:red", "MARTHE μ adaptive": "tab:green",
            AUTO_LABEL: "tab:olive", LRSOPT_LABEL: "k"}
_FIXED_MU_COLOURS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:cyan")


def _styles(labels) -> dict:
    out, k = {}, 0
    for label in labels:
        if label in _COLOURS:
            out[label] = {"color": _COLOURS[label]}
        else:
            out[label] = {"color": _FIXED_MU_COLOURS[k % len(_FIXED_MU_COLOURS)], "alpha": 0.8}
            k += 1
    out[LRSOPT_LABEL] = {"color": "k", "ls": "--"}
    out[AUTO_LABEL] = {**out.get(AUTO_LABEL, {}), "ls": "-."}
    return out


def _lr_axis(ax, lr: float, schedules) -> None:
    """η on a log axis; symlog (linear below η_0/10) when some η_t = 0, so that those stay
    visible just above the spine. A dotted line marks η_0."""
    if any(np.any(np.asarray(s) <= 0) for s in schedules):
        ax.set_yscale("symlog", linthresh=lr / 10)
        ax.set_ylim(bottom=-lr / 40)
        ax.set_ylabel(r"learning rate $\eta_t$ (symlog; linear below $\eta_0/10$)")
    else:
        ax.set_yscale("log")
        ax.set_ylabel(r"learning rate $\eta_t$")
        plotting.tidy_log_axis(ax)
    ax.axhline(lr, color="0.5", lw=0.7, ls=":")


_SAME_PT = 1.0  # two paths closer than this (points on the page) everywhere look like one line


def _path_styles(labels, styles) -> dict:
    """Panel (c)'s line styles, for paths drawn in the order of ``labels``: each method's line
    narrower than the one drawn before it, with its own markers (:func:`_stagger_markers`), so
    that paths that coincide stay visible as nested lines; LRS-OPT thin and faint, underneath."""
    methods = [l for l in labels if l != LRSOPT_LABEL]
    out = {}
    for k, label in enumerate(methods):
        lw = 0.9 * (len(methods) - k)
        out[label] = {**styles[label], "lw": lw, "alpha": 0.85, "marker": "osD^v"[k % 5], "ms": lw + 2.2,
                      "markevery": [0]}  # placed by _stagger_markers once the axes are laid out
    if LRSOPT_LABEL in labels:
        out[LRSOPT_LABEL] = {**styles[LRSOPT_LABEL], "lw": 0.6, "alpha": 0.35}
    return out


def _stagger_markers(ax, paths: dict, per_line: int = 7) -> None:
    """Put ``per_line`` markers on each method's path, evenly spaced along its length on the
    page, the k-th of n methods shifted by k/n of a spacing: on paths that coincide the
    markers of each stay apart."""
    methods = [l for l in paths if l != LRSOPT_LABEL]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for k, label in enumerate(methods):
        p = paths[label]
        p = ax.transData.transform(p[np.all(np.isfinite(p), axis=1)])
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(p, axis=0), axis=1))])
        if len(arc) < 2 or arc[-1] <= 0:
            continue
        at = (np.arange(per_line) + (k + 0.5) / len(methods)) / per_line * arc[-1]
        lines[label].set_markevery(sorted({int(i) for i in np.searchsorted(arc, at).clip(0, len(arc) - 1)}))


def _to_polyline(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    """The distance of each of ``points`` (n, 2) to the polyline through ``line`` (m, 2)."""
    if len(line) == 1:
        return np.linalg.norm(points - line[0], axis=1)
    a, d = line[:-1], np.diff(line, axis=0)
    length2 = np.einsum("ij,ij->i", d, d)
    u = np.einsum("kij,ij->ki", points[:, None] - a, d) / np.where(length2 > 0, length2, 1.0)
    nearest = a + np.clip(u, 0.0, 1.0)[..., None] * d
    return np.linalg.norm(points[:, None] - nearest, axis=2).min(axis=1)


def paths_apart_pt(ax, p: np.ndarray, q: np.ndarray) -> float:
    """How far apart the paths p and q (iterates, (n, 2)) are drawn on ``ax``, in points on
    the page: the Hausdorff distance of the two polylines, max(max_{a ∈ p} d(a, q), max_{b ∈ q}
    d(b, p)), in display coordinates as ``ax`` is laid out now (non-finite iterates left out)."""
    scale = 72.0 / ax.figure.dpi
    a, b = (ax.transData.transform(x[np.all(np.isfinite(x), axis=1)]) * scale for x in (p, q))
    if not len(a) or not len(b):
        return math.inf
    return float(max(_to_polyline(a, b).max(), _to_polyline(b, a).max()))


def _label_coinciding(ax, paths: dict) -> str:
    """Append "≈ X" to the legend label of each path that lies within :data:`_SAME_PT` of the
    path of X (drawn after it, on top; :func:`paths_apart_pt`); returns the pairs with their
    distances, for the caption ("" when none coincide)."""
    labels = [l for l in paths if l != LRSOPT_LABEL]
    lines = {line.get_label(): line for line in ax.get_lines()}
    pairs = []
    for i, lo in enumerate(labels):
        near = [(hi, paths_apart_pt(ax, paths[lo], paths[hi])) for hi in labels[i + 1:]]
        near = [(hi, d) for hi, d in near if d < _SAME_PT]
        if near:
            lines[lo].set_label(f"{lo} (≈ {', '.join(hi for hi, _ in near)})")
            pairs += [f"{lo} and {hi}: {d:.2g} pt" for hi, d in near]
    return "; ".join(pairs)


def _legend_below(ax, ncol: int = 2) -> None:
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=ncol,
              fontsize=6.5, frameon=False)


def make_figures(out_dir, functions, wait: bool = True) -> list:
    """Draw ``figures/fig1_<fn>`` for each function from the records in ``data/`` (no training);
    ``wait=False``: return while forked processes still write the files
    (:func:`plotting.wait_for_figures` waits for them)."""
    import testfunctions
    from ..lrsopt import ScheduleResult
    from ..online import OnlineResult

    out = common.as_output_dir(out_dir)
    written = []
    for fn in functions:
        f = testfunctions.get(fn)
        stored = records.load(out.data(f"{fn}_grid"), kind="data")
        grid, meta = stored.data, stored.meta
        constants = records.load(out.data(f"{fn}_constant"), kind="data").meta
        labels = [str(l) for l in grid["labels"]]
        styles = _styles(labels + [AUTO_LABEL, LRSOPT_LABEL])
        diverged = grid["diverged_at"] >= 0
        hypergrad_lrs = grid["hypergrad_lrs"]
        lr = float(meta["lr"])
        auto_path, lrsopt_path = out.data(f"{fn}_marthe_auto.json"), out.data(f"{fn}_lrsopt.json")
        auto = OnlineResult.load(auto_path) if auto_path.exists() else None
        lrs_res = ScheduleResult.load(lrsopt_path) if lrsopt_path.exists() else None

        fig, axes = plotting.figure(ncols=2, nrows=2, width=5.0, height=4.1)
        axes = list(np.ravel(axes))
        # (a) best objective vs β, with the β-free methods as horizontal lines
        refs = {}
        if auto is not None:
            refs[f"{AUTO_LABEL} (κ={auto.config['kappa']:.0e})"] = auto.best_val_loss
        refs[f"{CONST_LABEL} (η={constants['best_lr']:.2g})"] = constants["best_min_t"]
        plotting.plot_best_vs_hypergrad_lr(hypergrad_lrs, {l: grid["best"][i] for i, l in enumerate(labels)}, ax=axes[0],
                                   diverged={l: diverged[i] for i, l in enumerate(labels)},
                                   references=refs, styles={l: styles[l] for l in labels}, legend=False,
                                   title=r"(a) best $f$ within $T$ steps vs $\beta$")
        _legend_below(axes[0])

        # (b) schedules of the best-β runs (+ LRS-OPT), symlog so η = 0 stays visible
        schedules, sty = {}, {}
        if lrs_res is not None:  # drawn first, underneath: its schedule can be bang-bang
            key = f"{LRSOPT_LABEL} ({lrs_res.outer_steps_done} steps)"
            schedules[key] = lrs_res.best_lrs
            sty[key] = {**styles[LRSOPT_LABEL], "lw": 0.6, "alpha": 0.4, "zorder": 1}
        for i, label in enumerate(labels):
            ok = np.where(~diverged[i] & np.isfinite(grid["best"][i]))[0]
            if len(ok):
                j = int(ok[np.argmin(grid["best"][i][ok])])
                lrs = grid["lrs"][i, j]
                key = f"{label} (β={hypergrad_lrs[j]:.0e})"
                schedules[key] = lrs[np.isfinite(lrs)]
                sty[key] = styles[label]
        if auto is not None:
            schedules[AUTO_LABEL] = auto.lrs
            sty[AUTO_LABEL] = styles[AUTO_LABEL]
        ax = axes[1]
        plotting.plot_schedules(schedules, ax=ax, styles=sty,
                                title=r"(b) $\eta_t$ of each method's best-$\beta$ run")
        _lr_axis(ax, lr, schedules.values())
        _legend_below(ax)

        # (c) trajectories over the contour plot
        pz = records.load(out.data(f"{fn}_paths"), kind="data").data
        plabels = [str(x) for x in pz["labels"]]
        order = sorted(range(len(plabels)), key=lambda k: _PATH_ORDER.index(plabels[k])
                       if plabels[k] in _PATH_ORDER else -1)  # HD drawn last, on top
        paths = {plabels[k]: pz[f"path_{k}"] for k in order}
        pst = _path_styles(list(paths), styles)
        plotting.plot_contour_paths(f, paths, ax=axes[2], styles=pst, legend=False,
                                    title=r"(c) paths $w_0 \ldots w_T$ (best $\beta$) over $f$")
        _stagger_markers(axes[2], paths)
        same = _label_coinciding(axes[2], paths)
        _legend_below(axes[2])

        # (d) HD vs RTHO at one common β: the largest β at which neither diverged
        ax = axes[3]
        hd, rt = labels.index("HD"), labels.index("RTHO")
        common_ok = np.where(~diverged[hd] & ~diverged[rt])[0]
        if len(common_ok):
            j = int(common_ok[np.argmax(hypergrad_lrs[common_ok])])
            pair = []
            with plotting.style():
                for i in (hd, rt):
                    lrs = grid["lrs"][i, j]
                    lrs = lrs[np.isfinite(lrs)]
                    pair.append(lrs)
                    ax.plot(np.arange(len(lrs)), lrs, color=styles[labels[i]]["color"],
                            label=f"{labels[i]}: min$_t f$ = {grid['best'][i, j]:.3g}, "
                                  f"$f(w_T)$ = {grid['final'][i, j]:.3g}")
                ax.set_xlabel(plotting.STEP_LABEL)
                ax.set_title(f"(d) HD vs RTHO at one β = {hypergrad_lrs[j]:.0e}\n(the largest where neither diverged)")
            _lr_axis(ax, lr, pair)
            _legend_below(ax, ncol=1)
        else:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "(d) HD and RTHO never both converged on the β grid", ha="center",
                    transform=ax.transAxes)
        fig.suptitle(f"MARTHE Fig. 1 reproduction — {_TITLES.get(fn, fn)}: gradient descent, "
                     f"T = {meta['steps']}, η₀ = {lr:g}, start {tuple(f.default_start)}", fontsize=9)
        written += plotting.savefig(fig, out.figure(f"fig1_{fn}"), close=True, background=True,
                                    caption=f"data: analytic function `{fn}` (testfunctions), float64; "
                                            f"records in {out.data_dir.name}/{fn}_*"
                                            + (f". (c): paths drawn widest first, markers staggered; 'A (≈ B)': "
                                               f"the paths of A and B are everywhere within {_SAME_PT:g} pt of each "
                                               f"other on the page (Hausdorff distance; {same}), one line to the eye"
                                               if same else ""))
    if wait:
        plotting.wait_for_figures()
    return written
