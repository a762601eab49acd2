r"""Many online runs (seeds × η_0 × β × κ × μ × method) as ONE computation: ``torch.func.vmap``
of :meth:`hgtoolkit.online.Engine.update` over a leading run axis.

R independent runs of the online recursion (:mod:`hgtoolkit.online`) on copies of one problem
that differ in their initial weights w_0 and minibatch order (the seed) and in every
hyper-setting (η_0, β fixed or adaptive, κ, μ fixed or adaptive — so HD, RTHO and MARTHE —,
``lr_floor``, ``lr_max``, …) are stacked along a new leading dimension r = 1 … R. Step t of all
runs is the single-run step, vmapped:

    (g^r_t, L^r_t, H^r_t z^r_w) = vmap(∇ℓ and its jvp along z_w)(w^r_t, z^r_w, x^r_t)
    v^r_t = ∇E(w^r_t) (vmap; objective "val")  or  g^r_t ("train")
    (state^r, aux^r) = vmap(Engine.update)(state^r, Oracle(g^r_t, L^r_t, H^r_t z^r_w, v^r_t), t)

where x^r_t = ``problem_r.batch(t)`` is run r's own minibatch, gathered outside vmap and stacked
(R, B, …), and ℓ = ``problem.batch_loss`` is shared, so that ℓ(w, x^r_t) = L^r_t(w)
(:class:`hgtoolkit.problems.Problem`); for a problem without ``batch_loss`` (the analytic test
functions, any deterministic problem) the loss ``train_loss(w, t)`` itself is shared and only
w is vmapped. The hyper-update (clipping, the μ and β rules, divergence) is part of the
vmapped step: nothing runs run by run. A stateful problem (``buffers0``) with
``batch_loss(w, x, b) -> (loss, b')`` carries its buffers b^r_t and their tangent per row
(:class:`_BufferedStack`, docs/models.md). A problem that draws random numbers (``rng_seed``:
dropout) has its rows grouped by the seed of step t's draws: each group's step is one vmapped
call with ``randomness="same"``, torch's generators seeded by ``rng_seed(t)`` outside the
``vmap`` (:meth:`_Stack.drawn`), so every row draws the masks of its own single run.

Divergence is per run: a run whose loss, h, η, β or parameters go bad is recorded as diverged
at the same step, with the same arrays, as :func:`online.run` would record, and is removed
from the stacked state before the next step (its NaNs never enter another run's computation;
the others continue and the batch shrinks).

Equality with single runs: result r equals ``online.run(problem_factory(s_r), **cell_r)`` up to
floating-point reassociation inside batched kernels (tested to 1e-12 in float64).
``wall_time`` and ``step_times`` of a batched run are the batch's divided by the number of runs
in it (the amortised cost).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.func import grad_and_value, vmap

from . import fastpaths
from . import marthe as _marthe
from . import online as _online
from . import settings
from .drive import BufferShare, Oracle, closing_update, drive
from ._module import seeded
from .carried import buffer_tangent
from .settings import OnlineSettings
from ._tree import flatten_fast, unflatten_fast, tree_clone, tree_dot, tree_flatten, tree_map, tree_unflatten
from .trajectory import float_leaves, rowwise_gradient_hvp

__all__ = ["run_online_batch", "default_max_batch"]

_MEMORY_BUDGET = 2 * 1024 ** 3  # bytes of stacked state a chunk may hold (default max_batch)


def default_max_batch(problem) -> int:
    """How many runs of ``problem`` one vmapped chunk holds by default: a ~2 GB budget for
    ~16 parameter-sized buffers per run (state, tangent, gradients, HVP, temporaries),
    at least 1 and at most 1024."""
    per_run = 16 * problem.num_params * torch.finfo(problem.dtype).bits // 8
    return int(max(1, min(1024, _MEMORY_BUDGET // max(per_run, 1))))


# ----------------------------------------------------------------------------- cells

def _cell_kwargs(cell: Any, i: int) -> tuple[dict, Any]:
    """``online.run`` keyword arguments of ``cells[i]`` (a mapping or an object with ``.params``,
    such as :class:`hgtoolkit.sweep.Cell`), with ``online.run``'s defaults and seed 0 when unset,
    and the cell's own problem (``"problem"``; None: the factory's)."""
    from .problems import Problem
    params, own = getattr(cell, "params", cell), None
    if isinstance(params, Mapping) and "problem" in params:
        own = params["problem"]
        if not isinstance(own, Problem):
            raise TypeError(f"cells[{i}]['problem'] must be a hgtoolkit Problem, got {type(own).__name__}")
        params = {k: v for k, v in params.items() if k != "problem"}
    if not isinstance(params, Mapping):
        raise TypeError(f"cells[{i}] must be a mapping of online.run arguments (or have a .params "
                        f"mapping), got {type(cell).__name__}")
    mu_rule = params.get("mu_rule")
    kw = {"seed": 0, **{k: v for k, v in params.items() if k != "mu_rule"}}
    bound = settings.bind(OnlineSettings, kw, f"cells[{i}]: online.run")
    return settings.Bound({**bound, "mu_rule": mu_rule}, bound.given), own


@dataclass
class _Run:
    """One run of a batch: its validated settings, the problem it runs on and what it records."""

    index: int
    kwargs: dict
    base: Any                # problem_factory(seed), as online.run receives it
    problem: Any             # base resampled for the seed
    cfg: Any
    config: dict
    auxes: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    state: Any = None        # its row of the stacked state once it left the batch (or at the end)
    final_params: Any = None


def _single(run: _Run, keep_params: bool) -> _online.OnlineResult:
    """``online.run`` of one cell alone: the settings the cell gave (as it gave them) and its μ rule."""
    return _online.run(run.base, **settings.given_only(run.kwargs), mu_rule=run.kwargs["mu_rule"],
                       keep_params=keep_params)


def _setup(problem_factory: Callable | None, kw: dict, own=None):
    if own is not None:
        base = own
    elif problem_factory is None:
        raise TypeError("problem_factory is None, so every cell must name its problem (\"problem\": a Problem)")
    else:
        base = problem_factory(0 if kw["seed"] is None else kw["seed"])
    given = settings.Bound({k: v for k, v in kw.items() if k != "mu_rule"}, settings.passed(kw))
    return (base, *_online.setup(base, given, kw["mu_rule"]))


def _group_key(problem, cfg, dyn, T, eval_every, val_bs) -> str:
    leaves, spec = tree_flatten(problem.params0)
    shapes = [(tuple(x.shape), str(x.dtype), str(x.device)) for x in leaves]
    rule = None
    if cfg.mu_rule is not None and cfg.mu_rule is not _marthe.adaptive_mu:
        rule = id(cfg.mu_rule)
    if problem.batch_loss is not None:
        shared = "data"
    elif _rowwise(problem):  # row-wise problems of different functions share a batch (_segments)
        shared = f"rows:{problem.val_is_train}"
    else:
        shared = f"fn:{problem.name}"
    buffers = None if problem.rng_seed is None else "draws"
    if problem.stateful:
        bl, bspec = tree_flatten(problem.buffers0)
        buffers = [buffers, str(bspec), [(tuple(x.shape), str(x.dtype)) for x in bl]]
    return json.dumps([dyn.config(), T, eval_every, val_bs, cfg.objective, cfg.hd_gradient, rule,
                       shared, str(spec), shapes, problem.metrics is not None, buffers], default=str)


# ----------------------------------------------------------------------------- the public entry

def run_online_batch(problem_factory: Callable[[int], Any], cells: Sequence[Any], *,
                     keep_params: bool = False, progress: bool = False,
                     max_batch: int | None = None, batch: bool | None = None) -> list[_online.OnlineResult]:
    r"""Run every cell as :func:`hgtoolkit.online.run` would, as vmapped batches.

    ``cells[i]`` is a mapping of ``online.run`` keyword arguments (``method``, ``lr``,
    ``steps``, ``hypergrad_lr``, ``mu``, ``kappa``, ``objective``, ``seed``, … — the settings of
    :class:`~hgtoolkit.settings.OnlineSettings`, and ``mu_rule``) or an
    object with such a ``.params`` mapping (a :class:`hgtoolkit.sweep.Cell`). Result i is that
    of ``online.run(problem_factory(s), **{"seed": 0, **cells[i]})`` with s the cell's seed (0
    when unset): ``problem_factory(seed)`` builds the problem of a seed (initial weights), and
    ``online.run`` then draws the minibatch order of that seed (``problem.resample``).

    A cell may also name its own problem (``"problem"``: a :class:`~hgtoolkit.problems.Problem`,
    used instead of ``problem_factory``, which may then be None). Row-wise problems of different
    functions (``Problem.rowwise``: the analytic test functions) share one batch, each
    function evaluated once per step on its rows — Fig. 1's three functions × methods × β as
    ONE computation::

        cells = [dict(problem=problems.get(fn), method=m, lr=1e-3, hypergrad_lr=b, steps=500)
                 for fn in ("beale", "bukin_smooth", "bukin_sharp") for m in ("hd", "rtho")
                 for b in (1e-7, 1e-6)]
        results = run_online_batch(None, cells)

    Cells share one vmapped computation when they share what must be shared — the dynamics,
    T, ``eval_every``, the objective, a custom ``mu_rule`` and the problem's structure — and
    each such group is cut into chunks of at most ``max_batch`` runs (default
    :func:`default_max_batch`). Within a group everything else may differ per run: the seed,
    η_0, β (fixed or adaptive), μ (fixed or adaptive), κ, the method (HD, RTHO and MARTHE
    together: an HD run then rides along with μ = 0), ``lr_floor``, ``lr_max``, ….
    Returns one :class:`~hgtoolkit.online.OnlineResult` per cell, in order; ``keep_params``
    keeps w_T in them (off by default: R copies of the model); ``progress`` shows a tqdm bar
    per chunk.

    A chunk whose problems do not share their loss functions (checked at w_0: every run's own
    E(w_0) and L_0(w_0) must equal the shared function's; a factory whose validation data
    depend on the seed fails this) runs run by run with :func:`online.run`.

    ``batch``: batch the runs (True) or run them one by one with :func:`online.run` (False).
    Default (None): batched where batching pays — a row-wise problem (the analytic test
    functions: one native computation for all runs, no vmap) or a GPU — and one by one for a
    model on the CPU, where ``online.run``'s in-place step beats the vmapped pure step
    (measurements: docs/performance.md). The numbers are the same either way (to rounding; tested).
    """
    if problem_factory is not None and not callable(problem_factory):
        raise TypeError(f"problem_factory must be callable as problem_factory(seed) (or None when "
                        f"every cell names its problem), got {type(problem_factory).__name__}")
    if isinstance(cells, (str, bytes, Mapping)) or not isinstance(cells, Sequence):
        raise TypeError(f"cells must be a sequence of cells, got {type(cells).__name__}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                  or max_batch < 1):
        raise ValueError(f"max_batch must be None or an int ≥ 1, got {max_batch!r}")
    groups: "OrderedDict[str, list]" = OrderedDict()
    for i, cell in enumerate(cells):
        kw, own = _cell_kwargs(cell, i)
        try:
            base, problem, cfg, dyn, T, eval_every, val_bs, config = _setup(problem_factory, kw, own)
        except (ValueError, TypeError) as exc:  # a bad setting: say which cell holds it
            if type(exc) not in (ValueError, TypeError):
                raise
            raise type(exc)(f"cells[{i}]: {exc}") from exc
        key = _group_key(problem, cfg, dyn, T, eval_every, val_bs)
        groups.setdefault(key, []).append((_Run(i, kw, base, problem, cfg, config), dyn, T, eval_every, val_bs))

    results: list = [None] * len(cells)
    if batch is None:
        batch = any(batching_pays(m[0][0].problem) for m in groups.values())
    if not batch:
        for members in groups.values():
            for run, *_ in members:
                results[run.index] = _single(run, keep_params)
        return results
    for members in groups.values():
        size = max_batch or default_max_batch(members[0][0].problem)
        for start in range(0, len(members), size):
            chunk = members[start:start + size]
            _, dyn, T, eval_every, val_bs = chunk[0]
            runs = [m[0] for m in chunk]
            for run, res in zip(runs, _run_batch(runs, dyn, T, eval_every, val_bs, keep_params, progress)):
                results[run.index] = res
    return results


def _rowwise(problem) -> bool:
    """Does a batch of ``problem`` run natively on a stack of parameter rows
    (``Problem.rowwise``, no data, one tensor of parameters)?"""
    return bool(problem.rowwise) and problem.batch_loss is None and isinstance(problem.params0, torch.Tensor)


def _segments(active: list) -> list[tuple[Any, int, int]]:
    """(problem, start, stop): the runs of a row-wise batch, consecutive runs that share their
    loss functions taken together (one call of the functions per segment)."""
    segs: list = []
    for i, run in enumerate(active):
        p = run.problem
        if segs and segs[-1][0].train_loss == p.train_loss and segs[-1][0].val_loss == p.val_loss:
            segs[-1][2] = i + 1
        else:
            segs.append([p, i, i + 1])
    return [tuple(s) for s in segs]


def _by_segments(segs: list, fn: Callable, *stacks):
    """``fn(problem, *rows)`` of every segment's rows of ``stacks`` (None passes through), the
    results concatenated along the run axis (a tuple of tensors or Nones, or one tensor)."""
    if len(segs) == 1:
        return fn(segs[0][0], *stacks)
    parts = [fn(p, *(None if x is None else x[a:b] for x in stacks)) for p, a, b in segs]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(None if parts[0][k] is None else torch.cat([q[k] for q in parts])
                 for k in range(len(parts[0])))


def batching_pays(problem) -> bool:
    """Does a vmapped (or native) batch beat a loop of single runs for this problem (measured:
    :func:`run_online_batch`)? A row-wise problem, or a model on a GPU that has ``batch_loss``
    (a stateful one too: its buffers b and their tangent are carried per row; one that draws
    random numbers as one vmapped call per seed)."""
    if problem.stateful and problem.batch_loss is None:
        return False
    return bool(problem.rowwise) or problem.device.type != "cpu"


# ----------------------------------------------------------------------------- stacked pytrees

def _stack(trees: list) -> Any:
    return tree_map(lambda *xs: torch.stack(xs), *trees)


def _take(tree: Any, idx: torch.Tensor) -> Any:
    return tree_map(lambda x: x.index_select(0, idx), tree)


def _row(tree: Any, i: int) -> Any:
    return tree_map(lambda x: x[i], tree)


def _rows(aux: dict) -> list[dict]:
    """Per-run dicts of floats from a dict of stacked 0-d tensors (one sync)."""
    keys = list(aux)
    table = torch.stack([aux[k].to(torch.float64) for k in keys], 1).tolist()
    return [dict(zip(keys, row)) for row in table]


def _same(single: list[float], shared: list[float], dtype: torch.dtype) -> bool:
    """Run r's own value vs the shared (vmapped) function's, up to rounding: same function."""
    tol = 1e3 * torch.finfo(dtype).eps
    return all(a == b or abs(a - b) <= tol * (1.0 + abs(a)) for a, b in zip(single, shared))


def _vmap_flat(fn, *args):
    """``vmap(fn)(*args)`` with the arguments and results passed to ``vmap`` as flat tuples of
    tensors (:func:`flatten_fast`): the same computation without torch's pytree walking the
    nested online state twice per call (as much time as the step itself for small problems)."""
    leaves, structure = flatten_fast(args)
    is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
    out_structure = []

    def flat_fn(*tensors):
        it = iter(tensors)
        ls = [next(it) if tt else x for x, tt in zip(leaves, is_tensor)]
        out_leaves, st = flatten_fast(fn(*unflatten_fast(ls, structure)))
        out_structure.append((st, [isinstance(x, torch.Tensor) for x in out_leaves]))
        return tuple(x for x in out_leaves if isinstance(x, torch.Tensor)), tuple(
            x for x in out_leaves if not isinstance(x, torch.Tensor))

    out, others = vmap(flat_fn, out_dims=(0, None))(*[x for x, tt in zip(leaves, is_tensor) if tt])
    st, kinds = out_structure[0]
    it_t, it_o = iter(out), iter(others)
    return unflatten_fast([next(it_t) if k else next(it_o) for k in kinds], st)


# ----------------------------------------------------------------------------- the engine, vmapped

class _Stack:
    """A chunk of runs as :func:`hgtoolkit.drive.drive` drives it: the state of the active runs
    stacked along a leading axis, the engine's step mapped over it (``step_map``: ``vmap``, or
    a plain call for row-wise problems), a run that diverged taken out of the stack at once."""

    def __init__(self, engine, runs, segs, keep_params, val_bs, minibatch, objective_grad,
                 evaluation, v_grad, v_grad_hvp, batch_map, step_map):
        self.engine, self.segs, self.keep_params, self.val_bs = engine, segs, keep_params, val_bs
        self.minibatch, self.objective_grad, self.evaluation = minibatch, objective_grad, evaluation
        self.v_grad, self.v_grad_hvp, self.batch_map, self.step_map = v_grad, v_grad_hvp, batch_map, step_map
        self.problem, self.data = runs[0].problem, runs[0].problem.batch_loss is not None
        self.active, self.R, self.times = list(runs), len(runs), []
        self.segs[:] = _segments(self.active)
        self.start = time.perf_counter()

    def clock(self) -> float:
        """Seconds since the start, divided by the number of runs (the amortised cost)."""
        return (time.perf_counter() - self.start) / self.R

    def gradient(self, W, Z, t):
        x = self.minibatch(t, self.active)
        if Z is None:
            return (*self.drawn(t, self.v_grad, W, x), None)
        return self.drawn(t, self.v_grad_hvp, W, Z, x)

    def drawn(self, t: int, fn: Callable, *rows):
        r"""``fn(*rows)`` (stacked rows of the active runs) with step t's random draws: for a
        problem with ``rng_seed``, the rows that share s = ``rng_seed(t)`` in one call of ``fn``
        (vmapped with ``randomness="same"``) with torch's generators seeded by s outside it, so
        each row draws what its single run draws; the results back in row order
        (:func:`_run_batch` sorts the runs by seed, so a seed's rows are consecutive). Else
        ``fn(*rows)``, untouched."""
        if self.problem.rng_seed is None:
            return fn(*rows)
        groups: "OrderedDict[int, list]" = OrderedDict()
        for i, run in enumerate(self.active):
            groups.setdefault(run.problem.rng_seed(t), []).append(i)
        device = self.problem.device
        if len(groups) == 1:
            with seeded(next(iter(groups)), device):
                return fn(*rows)
        parts, order = [], []
        for s, idx in groups.items():
            with seeded(s, device):
                parts.append(fn(*_take(rows, torch.tensor(idx, device=device))))
            order += idx
        back = torch.as_tensor(order, device=device).argsort()  # identity while a seed's rows are consecutive
        return tree_map(lambda *xs: torch.cat(xs).index_select(0, back), *parts)

    def objective(self, W, t, g, L):
        if self.engine.objective != "val":
            return None, None
        if self.problem.val_is_train and not self.data and g is not None:
            return g, L  # E = L_t: ∇E(w_t) is the gradient already computed
        if t > 0 or self.val_bs is None:
            return self.objective_grad(W, t, self.active)
        return None, None

    def evaluate(self, k, W, E):
        return self.evaluation(k, W, E, self.active)

    def update(self, S, oracle, t):
        engine, given = self.engine, [x is not None for x in oracle]

        def fn(state, *fields):  # a field that is None is a placeholder under vmap
            return engine.update(state, Oracle(*(x if ok else None for x, ok in zip(fields, given))), t)

        dummy = torch.zeros(len(self.active), dtype=oracle.loss.dtype, device=oracle.loss.device)
        return self.step_map(fn, S, *(dummy if x is None else x for x in oracle))

    def _keep(self, pending, mask) -> None:
        k, values, accs = pending
        for i, run in enumerate(self.active):
            if mask[i]:
                run.evals.append((k, values[i], accs[i]))

    def keep_rows(self, S, idx: torch.Tensor):
        """The stacked state of the runs ``idx`` (the others diverged)."""
        return _take(S, idx)

    def _leave(self, S, idx) -> None:
        for i in idx:
            self.active[i].state = _row(S, i)

    def record(self, t, S, aux, pending):
        self.times.append(self.clock())
        rows = _rows({**aux, "diverged_at": S.diverged_at})
        for run, row in zip(self.active, rows):
            run.auxes.append(row)
        fine = [row["diverged_at"] < 0 for row in rows]
        if pending is not None:
            self._keep(pending, fine)
        if not all(fine):  # drop the diverged runs from the stacked state
            self._leave(S, [i for i, ok in enumerate(fine) if not ok])
            alive = [i for i, ok in enumerate(fine) if ok]
            S = self.keep_rows(S, torch.tensor(alive, dtype=torch.long, device=self.problem.device))
            self.active = [self.active[i] for i in alive]
            self.segs[:] = _segments(self.active)
            if not self.active:
                return None
        return S

    def close(self, S, T):
        """The last hyper-update (h_T, η_T), and E(w_T)."""
        engine, batch_map = self.engine, self.batch_map
        W = engine.dynamics.params(S.opt)
        S, v, E = closing_update(engine, self, S, T, mapped=batch_map)
        before = S.diverged_at.tolist()
        S = batch_map(lambda s, vv: engine.finish(s, vv, T))(S, v)
        after = S.diverged_at.tolist()
        hs = S.h.tolist()
        for i, run in enumerate(self.active):
            if before[i] < 0:
                run.auxes.append({"h": hs[i]})
        self._keep(self.evaluate(T, W, E), [d < 0 for d in after])
        if self.keep_params:
            for i, run in enumerate(self.active):
                run.final_params = tree_clone(_row(W, i))
        self._leave(S, range(len(self.active)))
        return S


class _BufferedStack(_Stack):
    r"""A :class:`_Stack` of a stateful problem (``batch_loss(w, x, b) -> (loss, b')``): the
    buffers b^r_t and their tangent z^r_{t,b} per row, the step of :mod:`hgtoolkit.carried`
    under ``vmap``: (g, L, dg, b', db') = the jvp of (g_t, b_{t+1}) along (z_w, z_b) (forward
    over reverse), z_{t+1,b} = μ_t db' (:func:`hgtoolkit.carried.buffer_tangent`), h_t with
    ⟨∇_b E, z_b⟩ (a :class:`~hgtoolkit.drive.BufferShare`; for ``objective="train"`` ⟨∂L_t/∂b_t,
    z_b⟩, one more vmapped backward of step t's loss). Integer buffers (``num_batches_tracked``) ride
    along without a tangent. A model that draws random numbers (dropout) runs each step's
    forward pass per seed group (:meth:`_Stack.drawn`)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        P = self.problem
        leaves, self._bspec, fl = float_leaves(P.buffers0)
        self._fl = fl
        per_run = [tree_flatten(r.problem.buffers0)[0] for r in self.active]
        self.BF = [torch.stack([b[i] for b in per_run]) for i in fl]
        self.BI = [torch.stack([b[i] for b in per_run]) for i in range(len(leaves)) if i not in fl]
        self.ZB, self._next, self._dzb = None, None, None
        loss_fn, val_fn, metric_fn = P.batch_loss, P.val_loss, P.metric_tensors

        def split(b):
            ls = tree_flatten(b)[0]
            return [ls[i] for i in fl], [x for i, x in enumerate(ls) if i not in fl]

        def join(bf, bi):
            fi, ii = iter(bf), iter(bi)
            return tree_unflatten([next(fi) if i in fl else next(ii) for i in range(len(leaves))], self._bspec)

        def forward(w, x, bf, bi):  # (g, (L, b'_float, b'_int))
            def L(w_):
                value, new = loss_fn(w_, x, join(bf, bi))
                return value, (value, *split(new))
            return torch.func.grad(L, has_aux=True)(w)

        def tangent(w, z, x, bf, zb, bi):
            def F(w_, bf_):
                g, (value, nf, ni) = forward(w_, x, bf_, bi)
                return (g, nf), (value, ni)
            (g, nf), (dg, dnf), (value, ni) = torch.func.jvp(F, (w, bf), (z, zb), has_aux=True)
            return g, value, dg, nf, dnf, ni

        rv = _randomness(P)
        self.v_forward = vmap(lambda w, x, bf, bi: (lambda g, a: (g, *a))(*forward(w, x, bf, bi)), randomness=rv)
        self.v_tangent = vmap(tangent, randomness=rv)
        self.v_val_grad = vmap(grad_and_value(lambda w, bf, bi: val_fn(w, join(bf, bi)), argnums=(0, 1)),
                               randomness=rv)
        self.v_val = vmap(lambda w, bf, bi: val_fn(w, join(bf, bi)), randomness=rv)
        self.v_metrics = None if metric_fn is None else vmap(lambda w, bf, bi: metric_fn(w, join(bf, bi)),
                                                             randomness=rv)
        self.v_share = vmap(tree_dot)
        self.v_loss = vmap(lambda w, x, bf, bi: loss_fn(w, x, join(bf, bi))[0], randomness=rv)
        self.v_loss_b = vmap(torch.func.grad(lambda bf, w, x, bi: loss_fn(w, x, join(bf, bi))[0]), randomness=rv)

    def shares_functions(self, W) -> bool:
        """Every run's own E(w_0, b_0) and L_0(w_0, b_0) equal the shared functions' (as :func:`_run_batch`)."""
        with torch.no_grad():
            E0 = [float(r.problem.val_loss(r.problem.params0, r.problem.buffers0)) for r in self.active]
            L0 = [float(r.problem.train_loss(r.problem.params0, 0, r.problem.buffers0)[0]) for r in self.active]
            return (_same(E0, self.v_val(W, self.BF, self.BI).tolist(), self.problem.dtype)
                    and _same(L0, self.drawn(0, self.v_loss, W, self.minibatch(0, self.active), self.BF,
                                             self.BI).tolist(), self.problem.dtype))

    def gradient(self, W, Z, t):
        x = self.minibatch(t, self.active)
        if Z is None:
            g, value, nf, ni = self.drawn(t, self.v_forward, W, x, self.BF, self.BI)
            self._next = (nf, ni)
            return g, value, None
        zb = self.ZB if self.ZB is not None else [torch.zeros_like(b) for b in self.BF]
        g, value, dg, nf, dnf, ni = self.drawn(t, self.v_tangent, W, Z, x, self.BF, zb, self.BI)
        self._next, self._dzb = (nf, ni), dnf
        return g, value, dg

    def objective(self, W, t, g, L):
        if self.engine.objective != "val":  # "train": ⟨∂L_t/∂b_t, z_{t,b}⟩ with step t's draws (carried.py)
            if self.ZB is None:
                return None, None
            gb = self.drawn(t, self.v_loss_b, self.BF, W, self.minibatch(t, self.active), self.BI)
            return BufferShare(None, self.v_share(gb, self.ZB)), None
        (gw, gb), value = self.v_val_grad(W, self.BF, self.BI)
        if self.ZB is None:
            return gw, value
        return BufferShare(gw, self.v_share(gb, self.ZB)), value

    def evaluate(self, k, W, E):
        with torch.no_grad():
            values = (self.v_val(W, self.BF, self.BI) if E is None else E).tolist()
            acc = [math.nan] * len(self.active)
            if self.v_metrics is not None:
                a = self.v_metrics(W, self.BF, self.BI).get("val_accuracy")
                acc = acc if a is None else a.tolist()
        return k, values, acc

    def update(self, S, oracle, t):
        S, aux = super().update(S, oracle, t)
        if self._dzb is not None:
            self.ZB, self._dzb = buffer_tangent(self._dzb, S.mu, rows=True), None
        return S, aux

    def record(self, t, S, aux, pending):
        self.BF, self.BI = map(list, self._next)
        return super().record(t, S, aux, pending)

    def keep_rows(self, S, idx):
        pick = lambda xs: None if xs is None else [x.index_select(0, idx) for x in xs]
        self.BF, self.BI, self.ZB = pick(self.BF), pick(self.BI), pick(self.ZB)
        return super().keep_rows(S, idx)


def _run_batch(runs: list[_Run], dyn, T: int, eval_every: int, val_bs: int | None,
               keep_params: bool, progress: bool) -> list[_online.OnlineResult]:
    P = runs[0].problem
    cfgs = [r.cfg for r in runs]
    data = P.batch_loss is not None
    # a row-wise problem's batch runs natively (fastpaths.Plan(rows=True)), no vmap at all; its runs
    # may be on different functions (fig1: three of them), each segment of rows on its own
    rows = _rowwise(P)
    given = runs  # the results come back in this order
    if rows:
        runs = sorted(runs, key=lambda r: (hash(r.problem.train_loss), r.index))
    elif P.rng_seed is not None:  # a seed's rows consecutive (_Stack.drawn)
        runs = sorted(runs, key=lambda r: (r.problem.rng_seed(0), r.index))
    batch_map = (lambda f: f) if rows else vmap
    step_map = (lambda f, *args: f(*args)) if rows else _vmap_flat
    rules = {id(c.mu_rule): c.mu_rule for c in cfgs if c.mu_rule is not None}
    needs_hvp = any(c.needs_hvp for c in cfgs)
    engine = _online.Engine(dyn, cfgs[0].objective, needs_hvp,
                            next(iter(rules.values()), None), cfgs[0].hd_gradient == "regularised",
                            adaptive_beta=any(c.beta_adaptive for c in cfgs),
                            plan=fastpaths.Plan.choose(needs_hvp, rows=rows))
    loss = P.batch_loss if data else P.train_loss
    x_dim = 0 if data else None
    segs: list = []  # the row segments of the active runs (rows), kept up to date below
    if rows:  # one call of each function for all its rows (Problem.rowwise)
        v_grad = lambda W, x: _by_segments(segs, lambda p, W: rowwise_gradient_hvp(p.train_loss, W, None, x)[:2], W)
        v_grad_hvp = lambda W, Z, x: _by_segments(
            segs, lambda p, W, Z: rowwise_gradient_hvp(p.train_loss, W, Z, x), W, Z)
        v_grad_val = lambda W: _by_segments(segs, lambda p, W: rowwise_gradient_hvp(p.val_loss, W, None)[:2], W)
        v_val = lambda W: _by_segments(segs, lambda p, W: p.val_loss(W), W)
        v_loss = lambda W, x: _by_segments(segs, lambda p, W: p.train_loss(W, x), W)
    else:
        rv = _randomness(P)
        v_grad = vmap(grad_and_value(loss), in_dims=(0, x_dim), randomness=rv)
        v_grad_hvp = vmap(_online.gradient_and_hvp(loss), in_dims=(0, 0, x_dim), randomness=rv)
        v_grad_val = vmap(grad_and_value(P.val_loss), randomness=rv)
        v_val = vmap(P.val_loss, randomness=rv)
        v_loss = vmap(loss, in_dims=(0, x_dim), randomness=rv)
    v_grad_val_batch = vmap(grad_and_value(P.batch_loss)) if val_bs is not None else None
    v_metrics = vmap(P.metric_tensors, randomness=_randomness(P)) if P.metric_tensors is not None else None

    def minibatch(t: int, active: list[_Run]):
        return _stack([r.problem.batch(t) for r in active]) if data else t

    def objective_grad(W, t, active):
        if val_bs is not None:
            return v_grad_val_batch(W, _stack([r.problem.val_batch(t, val_bs) for r in active]))[0], None
        return v_grad_val(W)

    def accuracy(W, active):
        if P.metrics is None:
            return [math.nan] * len(active)
        if v_metrics is not None:
            acc = v_metrics(W).get("val_accuracy")
            return [math.nan] * len(active) if acc is None else acc.tolist()
        return [float(r.problem.metrics(_row(W, i)).get("val_accuracy", math.nan))
                for i, r in enumerate(active)]

    def evaluate(k, W, E, active):
        with torch.no_grad():
            values = (v_val(W) if E is None else E).tolist()
        return k, values, accuracy(W, active)

    R = len(runs)
    S = _stack([engine.init(r.problem.params0, r.cfg) for r in runs])
    if P.stateful:
        if not data:
            raise ValueError(f"problem {P.name!r} is stateful (buffers0 set) and has no batch/batch_loss "
                             "(batch_loss(w, x, b) -> (loss, b')): its runs cannot share one vmapped "
                             "step; give them, or run the cells with batch=False (one by one)")
        stack = _BufferedStack(engine, runs, segs, keep_params, val_bs, minibatch, None, None,
                               None, None, batch_map, step_map)
        if not stack.shares_functions(dyn.params(S.opt)):
            return _one_by_one(given, keep_params)
        return _results(given, stack, S, T, eval_every, progress, P, R)
    stack = _Stack(engine, runs, segs, keep_params, val_bs, minibatch, objective_grad, evaluate,
                   v_grad, v_grad_hvp, batch_map, step_map)

    # the shared functions must give every run its own E(w_0) and L_0(w_0)
    W = dyn.params(S.opt)
    with torch.no_grad():
        E0 = [float(r.problem.val_loss(r.problem.params0)) for r in runs]
        L0 = [float(r.problem.train_loss(r.problem.params0, 0)) for r in runs]
        if not (_same(E0, v_val(W).tolist(), P.dtype)
                and _same(L0, stack.drawn(0, v_loss, W, minibatch(0, runs)).tolist(), P.dtype)):
            # the runs' problems differ beyond what batch(t) carries (e.g. a seed-dependent
            # validation set): they cannot share one function, so each runs on its own
            return _one_by_one(given, keep_params)

    return _results(given, stack, S, T, eval_every, progress, P, R)


def _randomness(problem) -> str:
    """``vmap``'s ``randomness``: "same" for a problem that draws (``rng_seed``: every row of a
    call draws what one single run draws, the generators seeded outside), else "error"."""
    return "error" if problem.rng_seed is None else "same"


def _one_by_one(given: list, keep_params: bool) -> list:
    """The runs of a chunk whose problems do not share the vmapped functions, each with
    :func:`online.run` (exact); said with a warning for a problem that draws random numbers,
    whose cells were meant to be batched."""
    P = given[0].problem
    if P.rng_seed is not None:
        warnings.warn(f"run_online_batch: problem {P.name!r} draws random numbers and the vmapped step "
                      "does not give every run its own E(w_0) and L_0(w_0) (its draws under vmap are not "
                      "the single run's, e.g. a fused CUDA kernel, or the problems differ beyond their "
                      "minibatches): its cells run one by one with online.run (docs/models.md)",
                      RuntimeWarning, stacklevel=4)
    return [_single(r, keep_params) for r in given]


def _results(given: list, stack: "_Stack", S, T: int, eval_every: int, progress: bool, P, R: int) -> list:
    """Drive the stack through the T steps and build every run's record (in ``given``'s order)."""
    drive(stack.engine, stack, S, T, eval_every=eval_every, progress=progress,
          desc=f"online ×{R} (batched)", postfix=lambda aux, S: {"runs": len(stack.active)})
    wall = stack.clock()
    times = stack.times

    results = []
    for run in given:
        res = _online.build_result(run.config, run.auxes, times, run.evals, run.state, wall,
                                   P.metrics is not None, run.final_params)
        results.append(res)
        _online.report_divergence(_online.divergence_of(run.config, run.auxes, run.state), run.cfg.method,
                                  False, stacklevel=3)
    return results
