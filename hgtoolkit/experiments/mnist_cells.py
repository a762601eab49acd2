"""The MNIST experiment's settings, sweep cells and records (:mod:`hgtoolkit.experiments.mnist`).

:class:`Config`, the method and peer specifications, the sweep grids of its runs (:func:`grids`),
the cell kinds ``mnist.online``, ``mnist.lrsopt``, ``mnist.peer`` and ``mnist.analysis``
(registered when this module is imported), and :func:`load_records`, which reads every result
back from the store. The summary, the tables and the figures drawn from these records are in
:mod:`hgtoolkit.experiments.mnist`.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import divergence, records
from . import common

__all__ = ["Config", "PAPER", "LRSOPT_LABEL", "AUTO_LABEL", "method_specs", "peer_specs", "problem", "grids",
           "analysis_grids", "load_records", "method_summary", "seed_stats", "run_online_cells",
           "run_online_cell", "run_lrsopt_cell", "run_peer_cell", "run_analysis_cell"]

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
    (the split), ``steps`` = T. Online: ``lr`` = η_0, ``hypergrad_lrs`` (β grid of HD, RTHO and MARTHE
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
    lr: float = 0.1
    hypergrad_lrs: tuple[float, ...] = tuple(float(10.0 ** e) for e in np.arange(-4.0, 0.01, 0.5))
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
        seeds × 10 Adam steps (α = 0.02: the schedule moves as far as 20 steps of 0.01 did, at
        half the cost — each outer step is one exact hypergradient); all peers. What it takes
        with ``make demo``: docs/demo.md."""
        return cls(steps=100, n_seeds=2, hypergrad_lrs=(1e-3, 1e-2, 1e-1, 1.0), mus=(0.9,),
                   kappas=(1e-5, 1e-4, 1e-3), lrsopt_seeds=2, lrsopt_steps=10, lrsopt_optimizer="adam",
                   lrsopt_lr=0.02, eval_every=10, workers=common.default_workers())

    @classmethod
    def tiny(cls) -> "Config":
        """Seconds, for the tests: one hidden layer of 32, 800/200 examples, T = 20, 2 seeds,
        2 β, no fixed μ, 1 κ, LRS-OPT 2 Adam steps on 1 seed, two peers; the online objective on
        the whole validation set, so that HD's and RTHO's estimates ARE the exact one-step and
        constant-LR references (what the tests check the analysis against)."""
        return cls(hidden=(32,), n_train=800, n_val=200, steps=20, n_seeds=2, hypergrad_lrs=(1e-2, 1.0),
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
        if not self.lr >= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be ≥ 0, got {self.lr}")
        for name in ("hypergrad_lrs", "kappas"):
            if any(not (v > 0 and math.isfinite(v)) for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive and finite, got {getattr(self, name)}")
        if not self.hypergrad_lrs:
            raise ValueError("hypergrad_lrs must hold at least one β")
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
    """The online methods: ``{label, slug, method, mu, grid ("hypergrad_lr" | "kappa"), values}``."""
    specs = [{"label": "HD", "method": "hd", "mu": None},
             {"label": "RTHO", "method": "rtho", "mu": None}]
    specs += [{"label": f"MARTHE μ={m:g}", "method": "marthe", "mu": float(m)} for m in config.mus]
    if config.adaptive_mu:
        specs.append({"label": "MARTHE μ adaptive", "method": "marthe", "mu": "auto"})
    for s in specs:
        s.update(grid="hypergrad_lr", values=tuple(config.hypergrad_lrs))
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


def cell_params(config: Config, spec: dict, value: float, seed: int) -> dict:
    """``online.run`` arguments of one run of ``spec`` at grid value β (or κ) on ``seed``."""
    cell = {"method": spec["method"], "lr": config.lr, "steps": config.steps, "seed": seed,
            "eval_every": config.eval_every, "objective": "val", "val_batch_size": config.val_batch_size}
    if spec["method"] == "marthe":
        cell["mu"] = spec["mu"]
    if spec["grid"] == "kappa":
        cell.update(hypergrad_lr="auto", hypergrad_lr_init=0.0, kappa=value)
    else:
        cell["hypergrad_lr"] = value
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
    return "kappa" if spec["grid"] == "kappa" else "hypergrad_lr"


def grids(config: Config) -> dict:
    """The sweep grids of the runs (module docstring): ``{"online": {label: Grid}, "lrsopt":
    [Grid] (empty when LRS-OPT is off), "peers": {label: Grid}}``. An online grid is seeds ×
    its β (or κ) values; the cells of one seed form one batch group (one vmapped computation)."""
    from .. import sweep
    P = _problem_section(config)
    online = {}
    for spec in method_specs(config):
        key = _value_key(spec)
        fixed = {k: v for k, v in cell_params(config, spec, spec["values"][0], 0).items() if k not in ("seed", key)}
        if config.max_batch is not None:
            fixed["max_batch"] = config.max_batch
        online[spec["label"]] = sweep.Grid(f"mnist/online/{spec['slug']}", P, "mnist.online",
                                           axes={"seed": config.seeds, key: list(spec["values"])}, fixed=fixed)
    lrsopt = []
    if config.lrsopt_steps and config.lrsopt_seeds:
        lrsopt.append(sweep.Grid(
            "mnist/lrsopt", P, "mnist.lrsopt", axes={"seed": config.seeds[:config.lrsopt_seeds]},
            fixed={"lr": config.lrsopt_init, "steps": config.steps, "outer_steps": config.lrsopt_steps,
                   "outer_lr": config.lrsopt_lr, "outer_optimizer": config.lrsopt_optimizer,
                   "resample_batches": True, "lr_max": config.lrsopt_lr_max, "base_seed": config.seed,
                   "snapshot_every": max(1, config.lrsopt_steps // 10),
                   "checkpoint_interval": max(1, min(50, config.lrsopt_steps // 10 or 1))}))
    peers = {p["label"]: sweep.Grid(f"mnist/peer/{p['slug']}", P, "mnist.peer", axes={"seed": config.seeds},
                                    fixed={"name": p["name"], "lr": p["lr"], "steps": config.steps,
                                           "eval_every": config.eval_every})
             for p in peer_specs(config)}
    return {"online": online, "lrsopt": lrsopt, "peers": peers}


def analysis_grids(config: Config, methods: dict, online: dict) -> dict:
    """``{label: Grid}``: one cell per method, its best β/κ on the first seed; ``online_cell``
    names the stored online run it analyses (:func:`run_analysis_cell`), a cell of the
    ``online`` grids (:func:`grids`)."""
    from .. import sweep
    out = {}
    for spec in method_specs(config):
        value = methods[spec["label"]]["best_value"]
        if value is not None:
            params = cell_params(config, spec, value, config.seeds[0])
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
    if params.get("hypergrad_lr") == "auto":
        return AUTO_LABEL
    return "MARTHE μ adaptive" if params.get("mu") == "auto" else f"MARTHE μ={params['mu']:g}"


def run_online_cells(problem_factory, cells) -> list:
    """Kind ``mnist.online``'s ``run_batch``: the cells (one method, one seed, its β/κ values)
    as ONE :func:`hgtoolkit.batched.run_online_batch` call."""
    from .. import batched, sweep
    params = [dict(getattr(c, "params", c)) for c in cells]
    max_batch = params[0].pop("max_batch", None)
    for p in params[1:]:
        p.pop("max_batch", None)
    with divergence.recorded():  # expected here: each result records it (diverged_at, divergence)
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
    with divergence.recorded():  # expected here: a stopped run says so in its status
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
    with divergence.recorded():  # expected here: the record says it (diverged_at, divergence)
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
    params = dict(params)
    source = params.pop("online_cell", None)
    store = getattr(ctx, "store", None)
    if (source is not None and store is not None and store.has(source)
            and not batched.batching_pays(problem)):
        r, single = sweep.CELL_KINDS["mnist.online"].to_result(store.read(source)), False
    else:
        with divergence.recorded():  # expected here: the record says it (diverged_at, divergence)
            r, single = online.run(problem, **params, keep_params=False), True
    sym, value = ("κ", params["kappa"]) if params.get("hypergrad_lr") == "auto" else ("β", params["hypergrad_lr"])
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
        "mnist.online", run_online_cell, required=online.required, check=_online_check("max_batch"), cost=online.cost,
        summary=online.summary, to_result=online.to_result, run_batch=run_online_cells,
        batch_axes=("hypergrad_lr", "kappa"),
        params={**online.params, "max_batch": optional_int}))
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.lrsopt", run_lrsopt_cell, required=lrsopt.required + ("base_seed",), check=lrsopt.check,
        cost=lrsopt.cost, summary=lrsopt.summary, to_result=lrsopt.to_result,
        params={**lrsopt.params, "base_seed": sweep.SEED_SPEC}))
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.peer", run_peer_cell, required=("name", "steps", "eval_every"),
        cost=lambda p: float(p.get("steps", 1)), to_result=sweep.record_result("peer"),
        params={"name": lambda v: _peer_name(v), "lr": _number(0, open_lo=True, none=True),
                "steps": _number(1, integer=True), "eval_every": _number(1, integer=True), "seed": sweep.SEED_SPEC}))
    sweep.register_cell_kind(sweep.CellKind(
        "mnist.analysis", run_analysis_cell, required=online.required, check=_online_check("online_cell"),
        cost=lambda p: 10.0 * online.cost(p), to_result=sweep.record_result("approximation"),
        params={**online.params, "online_cell": _cell_id}))


def _online_check(own: str):
    """The ``online`` kind's cross-setting check of a cell, without this kind's own key ``own``
    (an analysis cell's settings are an online cell's plus the id of that stored cell; an online
    cell's may add ``max_batch``)."""
    from .. import sweep
    check = sweep.CELL_KINDS["online"].check
    return lambda params: check({k: v for k, v in params.items() if k != own})


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
        "hypergrad_lrs": np.stack([pad(r.hypergrad_lrs, T) for r in results]),
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
    methods = {spec["label"]: method_summary([online[spec["label"]][s][0] for s in config.seeds])
               for spec in method_specs(config)}
    bundle = {"config": config, "online": online, "lrsopt": lrsopt_runs, "peers": peer_runs,
              "methods": methods, "analysis": {}}
    if analysis and config.analyse:
        agrids = analysis_grids(config, methods, g["online"])
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


def seed_stats(values) -> dict:
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    ok = v[np.isfinite(v)]
    return {"mean": float(ok.mean()) if ok.size else None,
            "std": float(ok.std(ddof=1)) if ok.size > 1 else (0.0 if ok.size else None),
            "n": int(ok.size), "n_failed": int(v.size - ok.size)}


def method_summary(metas: list[dict]) -> dict:
    """One method's online records over the seeds. Per grid value: accuracy over seeds (mean ±
    std over the runs that did not diverge); the best value = highest mean accuracy among the
    values where no seed diverged (else among all)."""
    values, grid = list(metas[0]["values"]), metas[0]["grid"]
    per_value = []
    for i, v in enumerate(values):
        acc = seed_stats([m["final_val_accuracy"][i] for m in metas])
        loss = seed_stats([m["final_val_loss"][i] for m in metas])
        per_value.append({"value": v, "accuracy": acc, "val_loss": loss,
                          "diverged": int(sum(int(m["diverged_at"][i]) >= 0 for m in metas))})
    clean = [i for i, p in enumerate(per_value) if p["diverged"] == 0 and p["accuracy"]["mean"] is not None]
    pool = clean or [i for i, p in enumerate(per_value) if p["accuracy"]["mean"] is not None]
    best = max(pool, key=lambda i: per_value[i]["accuracy"]["mean"]) if pool else None
    return {"grid": grid, "per_value": per_value, "best_index": best,
            "best_value": None if best is None else values[best],
            "best": None if best is None else per_value[best],
            "wall_time_per_run": float(np.mean([m["wall_time"] / len(values) for m in metas]))}
