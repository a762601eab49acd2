r"""The peers hgtoolkit is checked against (docs/peers.md), as test code shared by the tests and
``benchmarks/bench_towers.py``.

- Packages from the registry, test-only extras in pyproject.toml's ``dev``: torchopt 0.7.3
  (functional and Meta* optimizers) and higher 0.2.1 (differentiable unrolled optimizers: f(η) = E(w_T) and ∇f(η) by autograd
  through their own update formulas), gradient-descent-the-ultimate-optimizer 1.0 (gdtuo,
  Chandra et al.'s hyperoptimizer stacks). :func:`require` imports one and fails, never skips,
  when it is missing.
- Baydin et al.'s SGD-HD / SGDN-HD / Adam-HD written out by hand (:func:`baydin_hd`).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import warnings

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

#: short name → (import name, pinned distribution of pyproject.toml's ``dev`` extra)
PACKAGES = {
    "torchopt": ("torchopt", "torchopt==0.7.3"),
    "higher": ("higher", "higher==0.2.1"),
    "gdtuo": ("gradient_descent_the_ultimate_optimizer.gdtuo", "gradient-descent-the-ultimate-optimizer==1.0"),
}


def require(name: str):
    """The peer package ``name`` (a key of :data:`PACKAGES`), imported; ImportError saying how to
    install it when it is missing (the equivalence tests fail then: they are not optional)."""
    module, dist = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"peer package {dist} is missing (import {module} failed: {exc}); it is a "
                          f"test-only extra of hgtoolkit: pip install -e '.[dev]' (or pip install "
                          f"'{dist}')") from exc


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set to ``dtype`` inside the block (restored after)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def leaf_copies(problem):
    """Fresh leaf copies of w_0 (``nn.Parameter``: a module can hold them) and the pytree spec
    to rebuild w."""
    leaves, spec = tree_flatten(problem.params0)
    return [torch.nn.Parameter(x.detach().clone()) for x in leaves], spec


# ----------------------------------------------------------------------------- exact: torchopt, higher

def _unrolled(problem, lrs: torch.Tensor, init, advance) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(η), ∇f(η)) with f(η) = E(w_T): T steps of a peer's differentiable optimizer, then one
    ``torch.autograd.grad`` of E(w_T) w.r.t. η. ``init(params, eta) -> opt`` builds the optimizer,
    ``advance(opt, params, loss, t) -> params`` takes step t (η_t = eta[t]) with a graph."""
    eta = lrs.detach().clone().requires_grad_(True)
    params, spec = leaf_copies(problem)
    opt = init(params, eta)
    for t in range(len(eta)):
        loss = problem.train_loss(tree_unflatten(list(params), spec), t)
        params = list(advance(opt, params, loss, t))
    value = problem.val_loss(tree_unflatten(params, spec))
    (grad,) = torch.autograd.grad(value, eta)
    return value.detach(), grad


def torchopt_hypergradient(problem, lrs: torch.Tensor, optimizer: str = "sgd", meta: bool = False,
                           **options):
    """(f(η), ∇f(η)) through torchopt, η as its schedule (η_t read at torchopt's own step count
    t); ``options``: momentum, nesterov, weight_decay, eps, ….

    ``meta=False``: the functional optimizer ``torchopt.sgd`` / ``torchopt.adam``,
    ``update(..., inplace=False)`` + ``apply_updates``; ``meta=True``: ``torchopt.MetaSGD`` /
    ``MetaAdam`` on a module holding w, ``step(loss)`` (torchopt's own differentiable loop).

    Run in the problem's dtype as torch's default: torchopt's Adam forms the bias correction
    1 − β^t as a tensor of the default dtype (float32 would cost ~1e-5 relative in float64)."""
    torchopt = require("torchopt")
    if meta:
        cls = {"sgd": torchopt.MetaSGD, "adam": torchopt.MetaAdam}[optimizer]

        def init(params, eta):
            module = torch.nn.Module()
            for i, x in enumerate(params):
                module.register_parameter(f"p{i}", x)
            return module, cls(module, lr=lambda count: eta[count], **options)

        def advance(box, params, loss, t):
            module, opt = box
            opt.step(loss)
            return [getattr(module, f"p{i}") for i in range(len(params))]
    else:
        make = {"sgd": torchopt.sgd, "adam": torchopt.adam}[optimizer]

        def init(params, eta):
            opt = make(lambda count: eta[count], **options)
            return [opt, opt.init(tuple(params))]

        def advance(box, params, loss, t):
            opt, state = box
            grads = torch.autograd.grad(loss, params, create_graph=True)
            updates, box[1] = opt.update(grads, state, params=tuple(params), inplace=False)
            return torchopt.apply_updates(tuple(params), updates, inplace=False)

    with default_dtype(problem.dtype):
        return _unrolled(problem, lrs, init, advance)


def higher_hypergradient(problem, lrs: torch.Tensor, optimizer: str = "sgd", **options):
    """(f(η), ∇f(η)) through higher's differentiable copy of ``torch.optim.SGD`` / ``Adam``
    (``higher.get_diff_optim``; ``options`` go to the torch.optim constructor), η_t passed at
    step t as ``diffopt.step(loss, params, override={"lr": [η_t]})``.

    higher's Adam adds ε before the bias correction (the old torch.optim form
    η·√c2/c1 · m/(√v + ε)): the same update as torch.optim's only for eps=0."""
    higher = require("higher")
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[optimizer]

    def init(params, eta):
        return higher.get_diff_optim(cls(params, lr=float(lrs[0]), **options), params), eta

    def advance(box, params, loss, t):
        diffopt, eta = box
        return diffopt.step(loss, params=params, override={"lr": [eta[t]]})

    return _unrolled(problem, lrs, init, advance)


# ----------------------------------------------------------------------------- towers: gdtuo

def gdtuo_stack(tower):
    """gdtuo's optimizer stack for a :mod:`hgtoolkit.towers` tower (level 0 at the bottom).

    sgd without momentum → ``gdtuo.SGD(alpha=lr)``; adam with lr, β1 and β2 tuned (or at the
    top) → ``gdtuo.Adam`` (β through tanh, v from 1e-8); adam with only lr tuned →
    ``gdtuo.AdamBaydin`` (β fixed). gdtuo has no counterpart for the rest (its SGD learns a
    raw momentum μ, not σ(x)): ValueError. Build it with torch's default dtype = the model's
    (gdtuo makes its hyperparameters with ``torch.tensor``)."""
    gdtuo = require("gdtuo")
    above = gdtuo.NoOpOptimizer()
    for k in reversed(range(tower.height)):
        lvl = tower.levels[k]
        if lvl.kind == "sgd" and lvl.momentum == 0 and lvl.weight_decay == 0:
            above = gdtuo.SGD(alpha=lvl.lr, optimizer=above)
        elif lvl.kind == "adam" and lvl.weight_decay == 0 and lvl.tuned in ((), ("lr",), ("lr", "beta1", "beta2")):
            cls = gdtuo.AdamBaydin if lvl.tuned == ("lr",) else gdtuo.Adam
            above = cls(alpha=lvl.lr, beta1=lvl.beta1, beta2=lvl.beta2, log_eps=math.log10(lvl.eps),
                        optimizer=above)
        else:
            raise ValueError(f"gdtuo has no counterpart of level {k} ({lvl.kind}, tuned "
                             f"{lvl.tuned}) of the tower {tower}")
    return above


class GdtuoTower:
    """gdtuo's stack for ``tower`` on ``problem`` (any pytree w_0), driven as its README says:
    ``begin``, ``zero_grad``, ``backward(create_graph=True)``, ``step`` at every step.

    ``adam_v0``: where gdtuo's base Adam starts v (None: gdtuo's own 1e-8 "fudge factor"; 0.0:
    torch.optim's start, which hgtoolkit's Adam has); set through gdtuo's per-parameter cache."""

    def __init__(self, problem, tower, adam_v0: float | None = None):
        gdtuo = require("gdtuo")
        self.problem = problem
        leaves, self._spec = tree_flatten(problem.params0)
        self._names = [f"p{i}" for i in range(len(leaves))]
        module = torch.nn.Module()  # gdtuo wraps a module; the loss reads its parameters by name
        for name, x in zip(self._names, leaves):
            module.register_parameter(name, torch.nn.Parameter(x.detach().clone()))
        with default_dtype(problem.dtype):
            stack = gdtuo_stack(tower)
        self.mw = gdtuo.ModuleWrapper(module, optimizer=stack)
        self.mw.initialize()
        if adam_v0 is not None and isinstance(stack, (gdtuo.Adam, gdtuo.AdamBaydin)):
            for name, x in zip(self._names, leaves):
                stack.cache[name] = {"m": torch.zeros_like(x), "v": torch.full_like(x, adam_v0)}

    def params(self):
        """w_t as the problem's pytree (gdtuo's tensors, with their graph to the LR above)."""
        return tree_unflatten([self.mw.parameters[n] for n in self._names], self._spec)

    def step(self, t: int) -> float:
        self.mw.begin()
        self.mw.zero_grad()
        loss = self.problem.train_loss(self.params(), t)
        with warnings.catch_warnings():  # torch's note on backward(create_graph=True): gdtuo's way
            warnings.filterwarnings("ignore", "Using backward\\(\\) with create_graph=True", UserWarning)
            loss.backward(create_graph=True)
        self.mw.step()
        return float(loss.detach())

    def lrs(self) -> list[float]:
        """The learning rate of every level (base first), as the last step used them."""
        out, opt = [], self.mw.optimizer
        while hasattr(opt, "parameters"):
            out.append(float(opt.parameters["alpha"].detach()))
            opt = opt.optimizer
        return out

    def weights(self) -> list[torch.Tensor]:
        return [self.mw.parameters[n].detach() for n in self._names]


class TowerDropIn:
    """The same interface for hgtoolkit's drop-in ``tower.optimizer(params)`` in a plain loop
    (``zero_grad``, ``backward``, ``step``)."""

    def __init__(self, problem, tower):
        self.problem = problem
        leaves, self._spec = leaf_copies(problem)
        self._leaves = leaves
        self.opt = tower.optimizer(leaves)

    def step(self, t: int) -> float:
        self.opt.zero_grad()
        loss = self.problem.train_loss(tree_unflatten(self._leaves, self._spec), t)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def lrs(self) -> list[float]:
        return [lv["lr"] for lv in self.opt.hyperparameters()]

    def weights(self) -> list[torch.Tensor]:
        return [x.detach() for x in self._leaves]


# ----------------------------------------------------------------------------- HD: Baydin et al.

def baydin_hd(problem, opt: str, alpha0: float, beta: float, T: int, momentum: float = 0.9,
              b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, wd: float = 0.0):
    """Baydin et al.'s SGD-HD / SGDN-HD / Adam-HD (``opt`` = "sgd", "nesterov", "adam") written
    out by hand with torch.autograd, independent of hgtoolkit:

        α_t = α_{t−1} − β h_t,  h_t = ∇L_t(θ_t)·∇_α u_{t−1}  (h_0 = 0),  θ_{t+1} = θ_t − α_t d_t

    (SGD: h_t = −∇L_t(θ_t)·∇L_{t−1}(θ_{t−1})); like their code, weight decay is added to the
    gradient first, so h uses the regularised gradient. Returns (α_t, h_t, θ_T) — α_t and h_t
    as arrays over t, θ_T with w_0's structure."""
    leaves, spec = tree_flatten(problem.params0)
    theta = [x.detach().clone() for x in leaves]
    buf = [torch.zeros_like(x) for x in theta]
    m = [torch.zeros_like(x) for x in theta]
    v = [torch.zeros_like(x) for x in theta]
    alpha, du, alphas, hgs = alpha0, None, [], []
    for t in range(T):
        w = [x.clone().requires_grad_(True) for x in theta]
        grads = torch.autograd.grad(problem.train_loss(tree_unflatten(w, spec), t), w)
        grads = [g + wd * x for g, x in zip(grads, theta)]
        h = 0.0 if du is None else sum(float((g * d).sum()) for g, d in zip(grads, du))
        alpha = alpha - beta * h
        alphas.append(alpha)
        hgs.append(h)
        if opt == "sgd":
            d = grads
        elif opt == "nesterov":
            buf = [momentum * b + g for b, g in zip(buf, grads)]
            d = [g + momentum * b for g, b in zip(grads, buf)]
        elif opt == "adam":
            m = [b1 * mm + (1 - b1) * g for mm, g in zip(m, grads)]
            v = [b2 * vv + (1 - b2) * g ** 2 for vv, g in zip(v, grads)]
            d = [(mm / (1 - b1 ** (t + 1))) / ((vv / (1 - b2 ** (t + 1))).sqrt() + eps)
                 for mm, vv in zip(m, v)]
        else:
            raise ValueError(f"opt must be 'sgd', 'nesterov' or 'adam', got {opt!r}")
        theta = [x - alpha * dd for x, dd in zip(theta, d)]
        du = [-dd for dd in d]  # ∇_α u_t
    return np.array(alphas), np.array(hgs), tree_unflatten(theta, spec)
