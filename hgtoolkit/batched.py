r"""Many online runs (seeds × β × μ × …) as ONE vectorised computation: ``torch.func.vmap`` over runs.

A sweep of R independent runs of the online recursion (METHODS.md, "Online methods: one
recursion"; :mod:`hgtoolkit.online`) on copies of one problem that differ in their initial
weights w_0 and minibatch order (the seed) and in their hyper-hyperparameters (η_0, β, μ, κ, …)
is computed with the runs stacked along a new leading dimension r = 1 … R. Step t of all runs:

    (g^r_t, L^r_t, H^r_t z^r_w) = vmap(one forward-over-reverse jvp of ∇ℓ)(w^r_t, z^r_w, x^r_t)
    v^r = ∇E(w^r_t) (vmap; objective "val")  or  g^r_t ("train")
    h^r_t = v^r · z^r_t,   d^r = v^r · g^r_{t−1}
    (η^r_t, β^r_t, μ^r_t) = online.hyper_update(run r's state, h^r_t, d^r)       for each r
    (s^r_{t+1}, z^r_{t+1}) = vmap(online.dynamics_tangent)(s^r_t, g^r_t, η^r_t, μ^r_t, z^r_t, H^r_t z^r_w)

where x^r_t = ``problem_r.batch(t)`` is run r's own minibatch, gathered outside vmap and stacked
(R, B, …), and ℓ = ``problem.batch_loss`` is shared, so that ℓ(w, x^r_t) = L^r_t(w)
(:class:`hgtoolkit.problems.Problem`). The math is that of :func:`hgtoolkit.online.run`: the same
building blocks (:func:`~hgtoolkit.online.gradient_and_hvp`,
:func:`~hgtoolkit.online.dynamics_tangent`, :func:`~hgtoolkit.online.hyper_update`), only
vmapped. The hyper-update is a handful of float operations per run; it is done run by run with
``online.hyper_update`` itself (R scalar updates per step, ~µs each, negligible next to the
vmapped model work — measured in ``benchmarks/bench_batched.py``), so every rule, including a
user's ``mu_rule``, behaves exactly as in a single run.

Divergence is per run: a run whose loss, h, η, β or parameters become non-finite (or |η| >
``lr_max``) is recorded as diverged at the same step and with the same arrays as
:func:`online.run` would record, and is removed from the stacked state before the next step
(its NaNs never enter another run's computation; the others continue and the batch shrinks).

Problems that cannot be vectorised this way fall back to :func:`online.run`, run by run: no
``batch_loss`` and not one shared deterministic problem (test functions are: every seed gives the
same object), data that differ between the runs (checked on w_0), groups of a single run.

Equality with single runs: result r equals ``online.run(problem_factory(s_r), **cell_r)`` up to
floating-point reassociation inside batched kernels (tested: float64, tiny MLP, 1e-10; analytic
test functions: bit for bit). ``wall_time`` and ``step_times`` of a batched run are the batch's
divided by the number of runs in it (the amortised cost).
"""
from __future__ import annotations

import inspect
import json
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.func import grad_and_value, vmap

from . import dynamics as _dynamics
from . import online as _online
from ._tree import tree_clone, tree_dot, tree_flatten, tree_leaves, tree_map, tree_zeros_like
from .errors import DivergenceError, DivergenceWarning
from .trajectory import progress_bar

__all__ = ["run_online_batch", "RUN_KEYS", "default_max_batch"]

#: The keyword arguments of :func:`hgtoolkit.online.run` a cell may set.
RUN_KEYS = ("method", "optimizer", "lr0", "steps", "beta", "mu", "kappa", "beta0", "beta_rule",
            "mu_rule", "objective", "lr_floor", "lr_max", "eval_every", "seed")

_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes of stacked state a chunk may hold (default max_batch)


def default_max_batch(problem) -> int:
    """How many runs of ``problem`` one vmapped chunk holds by default: a ~2 GB budget for
    ~16 parameter-sized buffers per run (state, tangent, gradients, HVP, jvp temporaries),
    at least 1 and at most 256."""
    per_run = 16 * problem.num_params * torch.finfo(problem.dtype).bits // 8
    return int(max(1, min(256, _MEMORY_BUDGET // max(per_run, 1))))


# ----------------------------------------------------------------------------- cells

_DEFAULTS = {k: p.default for k, p in inspect.signature(_online.run).parameters.items()
             if k in RUN_KEYS and p.default is not inspect.Parameter.empty}


def _cell_kwargs(cell: Any, i: int) -> dict:
    """``online.run`` keyword arguments of ``cells[i]`` (a mapping or an object with ``.params``,
    such as :class:`hgtoolkit.sweep.Cell`), with ``online.run``'s defaults and seed 0 when unset."""
    params = getattr(cell, "params", cell)
    if not isinstance(params, Mapping):
        raise TypeError(f"cells[{i}] must be a mapping of online.run arguments (or have a .params "
                        f"mapping), got {type(cell).__name__}")
    unknown = sorted(set(params) - set(RUN_KEYS))
    if unknown:
        raise TypeError(f"cells[{i}] has unknown key(s) {unknown}; a cell may set {list(RUN_KEYS)}")
    for key in ("lr0", "steps"):
        if key not in params:
            raise TypeError(f"cells[{i}] is missing {key!r} (required by online.run)")
    return {**_DEFAULTS, "seed": 0, **params}


def _hyper_kwargs(kw: dict) -> dict:
    return {k: kw[k] for k in ("lr0", "beta", "mu", "kappa", "beta0", "beta_rule", "mu_rule",
                               "objective", "lr_floor", "lr_max")}


@dataclass
class _Run:
    """One run of a batch: its validated settings and the lists :func:`online._result` reads."""

    index: int
    kwargs: dict
    base_problem: Any        # problem_factory(seed), as online.run receives it
    problem: Any = None      # after online._setup (resampled for the seed)
    cfg: Any = None
    hs: Any = None
    config: dict = field(default_factory=dict)
    rec: dict = field(default_factory=lambda: {k: [] for k in (
        "lrs", "betas", "mus", "hypergrads", "train_losses", "step_times", "eval_steps",
        "val_losses", "val_accuracy")})
    diverged: DivergenceError | None = None
    final_params: Any = None


# ----------------------------------------------------------------------------- the public entry

def run_online_batch(problem_factory: Callable[[int], Any], cells: Sequence[Any], *,
                     keep_params: bool = False, progress: bool = False,
                     max_batch: int | None = None) -> list[_online.OnlineResult]:
    r"""Run every cell as :func:`hgtoolkit.online.run` would, vectorising compatible cells.

    ``cells[i]`` is a mapping of ``online.run`` keyword arguments (``method``, ``lr0``,
    ``steps``, ``beta``, ``mu``, ``kappa``, ``objective``, ``seed``, … — :data:`RUN_KEYS`) or an
    object with such a ``.params`` mapping (a :class:`hgtoolkit.sweep.Cell`). Result i is that
    of ``online.run(problem_factory(s), **{"seed": 0, **cells[i]})`` with s the cell's seed (0
    when unset): ``problem_factory(seed)`` builds the problem of a seed (initial weights), and
    ``online.run`` then draws the minibatch order of that seed (``problem.resample``).

    Cells are grouped by what must be shared inside one vmapped computation — the dynamics,
    T, ``eval_every``, the objective, and whether a Hessian-vector product is needed (HD,
    μ ≡ 0, needs none, so HD runs are not slowed down by the others) — and each group is cut
    into chunks of at most ``max_batch`` runs (default :func:`default_max_batch`). Within a
    group η_0, β, μ (fixed or adaptive), κ, the β rule, ``lr_floor``, ``lr_max`` and the method
    (RTHO with MARTHE) may differ per run. Returns one :class:`~hgtoolkit.online.OnlineResult`
    per cell, in order; ``keep_params`` keeps w_T in them (off by default: R copies of the
    model); ``progress`` shows a tqdm bar per vmapped chunk.

    Runs one by one with ``online.run`` instead: a group of one, problems without
    ``batch_loss`` that are not one shared object, and chunks whose problems turn out not to
    share their data — checked on w_0: every run's own E(w_0) and L_0(w_0) must equal the
    shared function's (e.g. a factory whose data depend on the seed fails this).
    """
    if not callable(problem_factory):
        raise TypeError(f"problem_factory must be callable as problem_factory(seed), got "
                        f"{type(problem_factory).__name__}")
    if isinstance(cells, (str, bytes, Mapping)) or not isinstance(cells, Sequence):
        raise TypeError(f"cells must be a sequence of cells, got {type(cells).__name__}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                  or max_batch < 1):
        raise ValueError(f"max_batch must be None or an int ≥ 1, got {max_batch!r}")
    kwargs = [_cell_kwargs(c, i) for i, c in enumerate(cells)]

    groups: "OrderedDict[str, list[int]]" = OrderedDict()
    for i, kw in enumerate(kwargs):
        cfg, _ = _online.hyper_config(kw["method"], **_hyper_kwargs(kw))  # validates early
        dyn = _dynamics.get(kw["optimizer"])
        key = json.dumps([dyn.config(), kw["steps"], kw["eval_every"], cfg.objective,
                          cfg.needs_hvp], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)

    results: list = [None] * len(kwargs)
    for idxs in groups.values():
        start = 0
        while start < len(idxs):
            first = problem_factory(_factory_seed(kwargs[idxs[start]]))
            size = max_batch or default_max_batch(first)
            chunk = idxs[start:start + size]
            runs = [_Run(i, kwargs[i], first if j == 0 else problem_factory(_factory_seed(kwargs[i])))
                    for j, i in enumerate(chunk)]
            for sub in _compatible(runs):
                if len(sub) == 1 or not _batchable(sub):
                    for run in sub:
                        results[run.index] = _online.run(run.base_problem, **run.kwargs,
                                                         keep_params=keep_params)
                    continue
                outs = _run_batch(sub, keep_params, progress)
                for run, res in zip(sub, outs or [None] * len(sub)):
                    # None: the problems do not share their data (run one by one)
                    results[run.index] = res if res is not None else _online.run(
                        run.base_problem, **run.kwargs, keep_params=keep_params)
            start += len(chunk)
    return results


def _factory_seed(kw: dict) -> int:
    return 0 if kw["seed"] is None else kw["seed"]


def _signature(problem) -> tuple:
    leaves, spec = tree_flatten(problem.params0)
    shapes = tuple((tuple(x.shape), str(x.dtype), str(x.device)) for x in leaves)
    return (str(spec), shapes, problem.metrics is not None)


def _compatible(runs: list[_Run]) -> list[list[_Run]]:
    """Sub-groups that can share one vmapped computation: problems with ``batch_loss`` and the
    same parameter shapes; or, without it, the very same (deterministic) problem object."""
    subs: "OrderedDict[Any, list[_Run]]" = OrderedDict()
    for run in runs:
        p = run.base_problem
        key = ("data", _signature(p)) if p.batch_loss is not None else ("shared", id(p))
        subs.setdefault(key, []).append(run)
    return list(subs.values())


def _batchable(runs: list[_Run]) -> bool:
    p = runs[0].base_problem
    if p.batch_loss is not None:
        return True
    # a shared problem is vmapped over w only: the runs' seeds must not make it differ
    return p.resample is None or len({r.kwargs["seed"] for r in runs}) == 1


# ----------------------------------------------------------------------------- stacked pytrees

def _stack(trees: list) -> Any:
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def _take(tree: Any, idx: torch.Tensor) -> Any:
    return tree_map(lambda x: x.index_select(0, idx), tree)


def _row(tree: Any, i: int) -> Any:
    return tree_map(lambda x: x[i], tree)


def _finite_rows(tree: Any, n: int) -> list[bool]:
    """Per run: every entry of its slice of every leaf is finite."""
    flags = [torch.isfinite(x.reshape(n, -1)).all(1) for x in tree_leaves(tree)]
    return torch.stack(flags).all(0).tolist()


# ----------------------------------------------------------------------------- the engine

def _run_batch(runs: list[_Run], keep_params: bool, progress: bool) -> list[_online.OnlineResult]:
    """The vmapped loop over t for the runs of one compatible chunk (module docstring)."""
    for run in runs:
        kw = {k: v for k, v in run.kwargs.items() if k not in ("method", "optimizer")}
        (run.problem, run.cfg, run.hs, dyn, T, eval_every, run.config) = _online._setup(
            run.base_problem, run.kwargs["method"], run.kwargs["optimizer"], **kw)
    P = runs[0].problem
    objective, needs_hvp = runs[0].cfg.objective, runs[0].cfg.needs_hvp
    data = P.batch_loss is not None
    dtype, device = P.dtype, P.device

    # the shared loss ℓ(w, x): x is run r's minibatch (stacked, vmapped) or the step t (shared)
    loss = P.batch_loss if data else P.train_loss
    x_dim = 0 if data else None
    v_grad_train = vmap(grad_and_value(loss), in_dims=(0, x_dim))
    v_grad_hvp = vmap(_online.gradient_and_hvp(loss), in_dims=(0, 0, x_dim))
    v_grad_val = vmap(grad_and_value(P.val_loss))
    v_val = vmap(P.val_loss)
    v_dot = vmap(tree_dot)
    v_step = vmap(lambda s, g, lr, t: _online.dynamics_tangent(dyn, s, g, lr, t),
                  in_dims=(0, 0, 0, None))
    v_step_mu = vmap(lambda s, g, lr, t, mu, z, hz: _online.dynamics_tangent(dyn, s, g, lr, t, mu, z, hz),
                     in_dims=(0, 0, 0, None, 0, 0, 0))
    v_metrics = vmap(P.metric_tensors) if P.metric_tensors is not None else None

    def minibatch(t: int, active: list[_Run]):
        return _stack([r.problem.batch(t) for r in active]) if data else t

    def accuracy(W, active: list[_Run]) -> list[float]:
        if P.metrics is None:
            return [math.nan] * len(active)
        if v_metrics is not None:
            acc = v_metrics(W).get("val_accuracy")
            return [math.nan] * len(active) if acc is None else acc.tolist()
        return [float(r.problem.metrics(_row(W, i)).get("val_accuracy", math.nan))
                for i, r in enumerate(active)]

    def record_eval(run: _Run, k: int, value: float, acc: float) -> None:
        run.rec["eval_steps"].append(k)
        run.rec["val_losses"].append(value)
        if P.metrics is not None:
            run.rec["val_accuracy"].append(acc)

    R = len(runs)
    active = list(runs)
    start = time.perf_counter()
    clock = lambda: (time.perf_counter() - start) / R
    S = _stack([dyn.init(r.problem.params0) for r in runs])
    Z = tree_zeros_like(S)
    G_prev = None

    # step 0's evaluation run by run (as online.run); with data-driven problems it also checks
    # that the shared functions give every run its own E(w_0) and L_0(w_0)
    W = dyn.params(S)
    with torch.no_grad():
        E0 = [float(r.problem.val_loss(r.problem.params0)) for r in runs]
        if data:
            L0 = [float(r.problem.train_loss(r.problem.params0, 0)) for r in runs]
            if not (_same(E0, v_val(W).tolist(), dtype)
                    and _same(L0, vmap(loss)(W, minibatch(0, runs)).tolist(), dtype)):
                return None
    for run, value in zip(runs, E0):
        acc = (float(run.problem.metrics(run.problem.params0).get("val_accuracy", math.nan))
               if P.metrics is not None else math.nan)
        record_eval(run, 0, value, acc)

    def kill(run: _Run, err: DivergenceError) -> None:
        run.diverged = err

    def hyper_round(k: int, W, v, E, evaluating: bool) -> None:
        """Hyper-update of iteration k−1 for every live run (h_k, η_k, β_k, μ_k), E(w_k) when
        ``evaluating``; at k = T also the final parameters. Reads the current Z, G_prev, active."""
        h, d = v_dot(v, dyn.params(Z)).tolist(), v_dot(v, G_prev).tolist()
        if evaluating:
            if E is None:
                with torch.no_grad():
                    E = v_val(W)
            values, accs = E.tolist(), accuracy(W, active)
        for i, run in enumerate(active):
            if run.diverged is not None:
                continue
            run.rec["hypergrads"].append(h[i])
            try:
                run.hs = _online.hyper_update(run.hs, run.cfg, h[i], d[i], k - 1)
            except DivergenceError as err:
                kill(run, err)
                continue
            if evaluating:
                record_eval(run, k, values[i], accs[i])
            if k == T and keep_params:
                run.final_params = tree_clone(_row(W, i))

    bar = progress_bar(range(T), progress, desc=f"online ×{R} (batched)", leave=False)
    try:
        for t in bar:
            if not active:
                break
            n = len(active)
            W = dyn.params(S)
            x = minibatch(t, active)
            if needs_hvp and t > 0:
                g, L, hz = v_grad_hvp(W, dyn.params(Z), x)
            else:
                (g, L), hz = v_grad_train(W, x), None
            losses = L.tolist()
            for i, run in enumerate(active):
                if not math.isfinite(losses[i]):
                    kill(run, DivergenceError(t, "training loss", losses[i]))
            if t > 0:  # hyper-update of iteration t−1: h_t, η_t, β_t, μ_t
                v, E = (g, None) if objective == "train" else v_grad_val(W)
                hyper_round(t, W, v, E, t % eval_every == 0)
            for i, run in enumerate(active):
                run.rec["lrs"].append(run.hs.lr)
                run.rec["betas"].append(run.hs.beta)
                run.rec["mus"].append(run.hs.mu)
                run.rec["train_losses"].append(losses[i])

            # step t for every run: s_{t+1} = Φ_t(s_t, η_t), z_{t+1} = μ_t A_t z_t + B_t
            lr = torch.tensor([r.hs.lr for r in active], dtype=dtype, device=device)
            if hz is None:
                S, Z = v_step(S, g, lr, t)
            else:
                mu = torch.tensor([r.hs.mu for r in active], dtype=dtype, device=device)
                S, Z = v_step_mu(S, g, lr, t, mu, Z, hz)
            for i, ok in enumerate(_finite_rows(S, n)):
                if not ok and active[i].diverged is None:
                    kill(active[i], DivergenceError(t, "parameters after the step"))
            G_prev = g
            now = clock()
            for run in active:
                run.rec["step_times"].append(now)

            alive = [i for i, r in enumerate(active) if r.diverged is None]
            if len(alive) < n:  # drop the diverged runs from the stacked state
                keep = torch.tensor(alive, dtype=torch.long, device=device)
                S, Z, G_prev = _take(S, keep), _take(Z, keep), _take(G_prev, keep)
                active = [active[i] for i in alive]
            if progress and t % 10 == 0 and active:
                bar.set_postfix(runs=len(active), refresh=False)

        # the last hyper-update (h_T, η_T), and E(w_T)
        if active:
            W = dyn.params(S)
            if objective == "train":
                g_T, L_T = v_grad_train(W, minibatch(T, active))
                for run, value in zip(active, L_T.tolist()):
                    if not math.isfinite(value):
                        kill(run, DivergenceError(T, "training loss", value))
                v, E = g_T, None
            else:
                v, E = v_grad_val(W)
            hyper_round(T, W, v, E, True)
    finally:
        if hasattr(bar, "close"):
            bar.close()
    wall = clock()

    results = []
    for run in runs:
        results.append(_online._result(run.config, run.rec, run.hs, run.diverged, wall,
                                       P.metrics is not None, run.final_params))
        if run.diverged is not None:
            warnings.warn(f"online {run.cfg.method} run stopped: {run.diverged} (result.diverged_at="
                          f"{run.diverged.step})", DivergenceWarning, stacklevel=3)
    return results


def _same(single: list[float], shared: list[float], dtype: torch.dtype) -> bool:
    """Run r's own value vs the shared (vmapped) function's, up to rounding: same data, same model."""
    tol = 1e3 * torch.finfo(dtype).eps
    return all(a == b or abs(a - b) <= tol * (1.0 + abs(a)) for a, b in zip(single, shared))
