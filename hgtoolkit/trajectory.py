r"""One training step Φ_t as a pure function, and the training run it unrolls into.

``make_step(problem, dynamics)`` returns ``step(s, η, t) -> (s', L_t)`` with
s' = Φ_t(s, η) = dynamics.step(s, ∇L_t(w), η, t) and L_t the minibatch loss at w (the aux
output). Every exact and online method differentiates this one function:

- ``torch.func.vjp`` of it gives (λ_t, ∂f/∂η_t) from λ_{t+1} (reverse mode);
- ``torch.func.jvp`` of it with tangent (z, ζ) gives A_t z + B_t ζ (forward mode, online).

A stateful problem (``Problem.buffers0``, e.g. BatchNorm's running statistics) carries its
buffers b in the state: s_t = (optimizer state, b_t), and
(L_t, b_{t+1}) = ``train_loss(w_t, t, b_t)`` is the forward pass of minibatch t, so
Φ_t(s_t, η_t) = (D(s_t, ∇_w L_t, η_t), b_{t+1}) with b_{t+1} a differentiable function of
(w_t, b_t); E = ``val_loss(w_T, b_T)`` (docs/models.md).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.func import grad, grad_and_value, jvp

from . import dynamics as _dynamics
from ._tree import tree_flatten, tree_unflatten
from .divergence import VALIDATION_LOSS, check_finite

__all__ = ["BUFFERS", "initial_state", "opt_part", "with_buffers", "float_leaves", "stateful_loss",
           "loss_gradient", "make_step", "tangent_step", "closed_form", "autograd_gradient", "autograd_gradient_hvp",
           "rowwise_gradient_hvp", "train", "TrainResult", "check_problem", "check_pure", "check_lrs", "check_finite",
           "progress_bar"]

StepFn = Callable[[dict, torch.Tensor, int], tuple[dict, torch.Tensor]]


def scalar_loss(fn: Callable, name: str) -> Callable:
    """``fn`` with its output checked to be a 0-d tensor, so that a vector loss is reported as
    ``problem.<name>`` rather than by torch.func deep inside a transform. (Problems may evaluate
    ``val_loss`` on a batch of points elsewhere, e.g. over an optimisation path; a gradient needs
    a scalar.)"""
    def checked(*args):
        out = fn(*args)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"problem.{name} must return a scalar (0-d) tensor, got {what}; "
                             "reduce it, e.g. with .mean()")
        return out
    return checked


#: The key of a stateful problem's buffers b (``Problem.buffers0``) in a training state: the
#: state is the optimizer's dict plus, for a stateful problem only, ``state[BUFFERS]`` = b_t.
#: The exact engine's tangents and cotangents of b are lists over its floating-point leaves
#: (integer leaves such as ``num_batches_tracked`` have none).
BUFFERS = "buffers"


def initial_state(problem, dyn) -> dict:
    """s_0: ``dyn.init(params0)``, with b_0 = ``problem.buffers0`` for a stateful problem."""
    s0 = dyn.init(problem.params0)
    if getattr(problem, "buffers0", None) is None:
        return s0
    return with_buffers(s0, problem.buffers0)


def opt_part(state: dict) -> dict:
    """The optimizer's part of a training state (``state`` itself when it holds no buffers)."""
    if BUFFERS not in state:
        return state
    return {k: v for k, v in state.items() if k != BUFFERS}


def with_buffers(state: dict, buffers: Any) -> dict:
    """``state`` with b = ``buffers`` (``state`` itself for None)."""
    if buffers is None:
        return state
    return {**state, BUFFERS: buffers}


def float_leaves(buffers: Any) -> tuple[list, Any, list]:
    """(leaves, spec, indices of the floating-point leaves) of a buffers pytree."""
    leaves, spec = tree_flatten(buffers)
    return leaves, spec, [i for i, x in enumerate(leaves) if x.is_floating_point()]


def stateful_loss(fn: Callable) -> Callable:
    """A stateful problem's ``train_loss(w, t, b) -> (L_t, b')`` with its output checked."""
    def checked(w, t, buffers):
        out = fn(w, t, buffers)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("problem.train_loss of a stateful problem (buffers0 set) must return "
                             f"(loss, new_buffers), got {type(out).__name__}")
        scalar_loss(lambda: out[0], "train_loss")()
        return out
    return checked


def explain_in_place(exc: RuntimeError) -> Exception:
    """torch.func's refusal of an in-place write to a captured tensor, said in the problem's terms
    (the usual cause: a BatchNorm module's running statistics); ``exc`` itself otherwise."""
    if "mutate a captured Tensor" not in str(exc):
        return exc
    return ValueError("problem.train_loss writes in place to a tensor it does not take as an argument "
                      "(torch.func refuses it), typically a BatchNorm layer's running statistics when a "
                      "module is called through torch.func.functional_call in training mode: its buffers "
                      "would change behind the training state. Build the problem with "
                      "hgtoolkit.problems.from_module(model, loss_fn, train_data, val_data, batch_size=...), "
                      "which carries the buffers as training state (docs/models.md), or give the Problem "
                      "buffers0 and train_loss(w, t, buffers) -> (loss, new_buffers)")


def loss_gradient(problem) -> Callable:
    """∇L_t as ``gradient(w, t, b) -> (g_t, L_t, b_{t+1})``: g_t = ∇_w L_t(w, b) (in closed
    form for a :func:`closed_form` loss), L_t the minibatch loss, and b_{t+1} the buffers the
    forward pass leaves for a stateful problem (``b`` and b_{t+1} None for a stateless one)."""
    if getattr(problem, "buffers0", None) is not None:
        loss_fn = stateful_loss(problem.train_loss)
        grad_loss = grad(lambda w, t, b: (lambda out: (out[0], out))(loss_fn(w, t, b)), has_aux=True)

        def stateful_gradient(w: Any, t: int, buffers: Any) -> tuple[Any, torch.Tensor, Any]:
            g, (loss, new_buffers) = grad_loss(w, t, buffers)
            return g, loss, new_buffers

        return stateful_gradient
    if closed_form(problem.train_loss, problem.params0) is not None:
        grad_loss = lambda w, t: problem.train_loss.value_and_grad(w)[::-1]
    else:
        grad_loss = grad_and_value(scalar_loss(problem.train_loss, "train_loss"))

    def gradient(w: Any, t: int, buffers: Any = None) -> tuple[Any, torch.Tensor, None]:
        try:
            g, loss = grad_loss(w, t)
        except RuntimeError as exc:
            raise explain_in_place(exc) from exc
        return g, loss, None

    return gradient


def make_step(problem, dynamics: _dynamics.Dynamics) -> StepFn:
    """Φ_t as ``step(state, lr, t) -> (state', train_loss_t)``, the gradient of
    :func:`loss_gradient` (a closed-form loss's formulas are torch functions too, so
    ``torch.func.jvp`` of the step differentiates them); b_{t+1} carried in the state of a
    stateful problem."""
    params = dynamics.params
    gradient = loss_gradient(problem)
    if getattr(problem, "buffers0", None) is not None:
        def stateful_step(state: dict, lr: torch.Tensor, t: int) -> tuple[dict, torch.Tensor]:
            if BUFFERS not in state:
                raise ValueError(f"problem {problem.name!r} is stateful (buffers0 set) but the state "
                                 "given to its step holds no buffers: start from "
                                 "trajectory.initial_state(problem, dynamics); this caller does not "
                                 "carry buffers yet (docs/models.md)")
            g, loss, buffers = gradient(params(state), t, state[BUFFERS])
            return with_buffers(dynamics.step(opt_part(state), g, lr, t), buffers), loss

        return stateful_step

    def step(state: dict, lr: torch.Tensor, t: int) -> tuple[dict, torch.Tensor]:
        g, loss, _ = gradient(params(state), t)
        return dynamics.step(state, g, lr, t), loss

    return step


def tangent_step(step: StepFn, state: dict, lr: torch.Tensor, t: int, z: Any, dlr: Any):
    r"""One ``torch.func.jvp`` of Φ_t: returns (s_{t+1}, A_t z + B_t·dlr, L_t).

    ``z`` is a state-shaped tangent and ``dlr`` the tangent of η_t (a 0-d tensor).
    """
    return jvp(lambda s, lr_: step(s, lr_, t), (state, lr), (z, dlr), has_aux=True)


def closed_form(fn: Callable, w: Any):
    """``fn`` when it gives its derivatives in closed form
    (:class:`hgtoolkit.problems.ClosedFormLoss`: ``value_and_grad``, ``value_grad_hessian``,
    ``hvp``) and ``w`` is one tensor; else None (differentiate with autograd)."""
    return fn if isinstance(w, torch.Tensor) and hasattr(fn, "value_and_grad") else None


def autograd_gradient(fn: Callable, w: Any, *args: Any) -> tuple[Any, torch.Tensor]:
    """(∇_w ``fn(w, *args)``, ``fn(w, *args)``) with plain autograd: the numbers of torch.func's
    ``grad_and_value``, cheaper per call in a single run (no functional transforms); in
    closed form for a :func:`closed_form` loss."""
    if closed_form(fn, w) is not None:
        value, g = fn.value_and_grad(w.detach())
        return g, value
    leaves, spec = tree_flatten(w)
    leaves = [x.detach().requires_grad_(True) for x in leaves]
    with torch.enable_grad():
        value = fn(tree_unflatten(leaves, spec), *args)
        gs = torch.autograd.grad(value, leaves, allow_unused=True)
    gs = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, gs)]
    return tree_unflatten(gs, spec), value.detach()


def autograd_gradient_hvp(fn: Callable, w: Any, z_w: Any, *args: Any):
    """(∇fn, fn, H z_w) with plain autograd (single runs): the gradient kept with
    ``create_graph`` and one more backward through it, ∇(∇fn·z_w) (what
    :func:`hgtoolkit.online.gradient_and_hvp` computes with torch.func); in closed form for a
    :func:`closed_form` loss."""
    if closed_form(fn, w) is not None:
        value, g, hessian = fn.value_grad_hessian(w.detach())
        return g, value, fn.hvp(hessian, z_w)
    leaves, spec = tree_flatten(w)
    leaves = [x.detach().requires_grad_(True) for x in leaves]
    with torch.enable_grad():
        value = fn(tree_unflatten(leaves, spec), *args)
        gs = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        pairs = [(g, z) for g, z in zip(gs, tree_flatten(z_w)[0]) if g is not None and g.requires_grad]
        hz = [None] * len(leaves)
        if pairs:  # ∇(∇fn·z_w): the backward of the gradient with z_w as its cotangent
            hz = torch.autograd.grad([g for g, _ in pairs], leaves, grad_outputs=[z for _, z in pairs],
                                     allow_unused=True)
    gs = [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, gs)]
    hz = [torch.zeros_like(x) if h is None else h for x, h in zip(leaves, hz)]
    return tree_unflatten(gs, spec), value.detach(), tree_unflatten(hz, spec)


def rowwise_gradient_hvp(fn: Callable, W: torch.Tensor, Z: torch.Tensor | None, *args: Any):
    """(G, L, HZ) of a row-wise ``fn`` (``Problem.rowwise``) for a stack W of parameter rows at
    once: L = ``fn(W, *args)`` (one value per row), G = ∇ΣL and HZ = ∇(G·Z) (None without Z) — row
    r's gradient and Hessian-vector product, as the rows do not interact; the kernels of a single
    run (:func:`autograd_gradient_hvp`), on R rows; in closed form for a :func:`closed_form`
    loss."""
    if closed_form(fn, W) is not None:  # the formulas take a stack of rows as they take one
        return (*autograd_gradient(fn, W), None) if Z is None else autograd_gradient_hvp(fn, W, Z)
    with torch.enable_grad():
        Wr = W.detach().requires_grad_(True)
        L = fn(Wr, *args)
        (G,) = torch.autograd.grad(L.sum(), Wr, create_graph=Z is not None)
        HZ = torch.autograd.grad((G * Z).sum(), Wr)[0] if Z is not None else None
    return G.detach(), L.detach(), HZ


def progress_bar(iterable, enabled: bool, **kwargs):
    """tqdm over ``iterable`` when ``enabled`` (it writes to stderr), else the iterable."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, **kwargs)


def check_problem(problem) -> None:
    """``TypeError`` unless ``problem`` is a Problem (params0, train_loss, val_loss)."""
    if not all(hasattr(problem, k) for k in ("params0", "train_loss", "val_loss")):
        raise TypeError(f"problem must be a hgtoolkit.Problem (e.g. problems.get({problem!r}) for a name, "
                        f"problems.from_function or problems.from_module), got {type(problem).__name__}"
                        if isinstance(problem, str) else
                        f"problem must be a hgtoolkit.Problem (problems.get, from_function, from_module), "
                        f"got {type(problem).__name__}")


_PURE: set = set()  # ids of the problems check_pure found pure (an id leaves with its problem)


def _same(a: Any, b: Any) -> bool:
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return a.shape == b.shape and bool((a.eq(b) | (a.isnan() & b.isnan())).all())


def _shown(x: Any) -> str:
    """A loss (a number, or the sum of a vector of them) as a message shows it."""
    return f"{float(torch.as_tensor(x).sum()):.10g}"


def check_pure(problem) -> None:
    """``ValueError`` unless a stateless problem's losses are pure functions of (w, t), as every
    exact mode assumes (a replayed step — reverse mode's recomputation, checkpointing, finite
    differences — must see the same loss): probed once per problem object at (w_0, t = 0) with
    E(w_0), L_0(w_0), L_0(w_0), E(w_0). Refused: two training losses that differ (train_loss draws
    random numbers anew at every call: dropout), or E(w_0) changed by a train_loss call (train_loss
    writes state that val_loss reads: a BatchNorm module's running statistics in training mode).
    A problem built by :func:`~hgtoolkit.problems.from_module` passes (its buffers are training
    state, its draws a function of (seed, t)); a stateful problem (``buffers0``) is not probed.
    A loss that raises is left to the run, which reports it with its step."""
    key = id(problem)
    if key in _PURE or getattr(problem, "buffers0", None) is not None:
        return
    w = problem.params0
    try:
        with torch.no_grad():
            e0, l0, l1, e1 = (problem.val_loss(w), problem.train_loss(w, 0), problem.train_loss(w, 0),
                              problem.val_loss(w))
    except Exception:  # noqa: BLE001 - the run itself reports it, with its step and quantity
        return
    fix = ("build the problem with hgtoolkit.problems.from_module(model, loss_fn, train_data, val_data, "
           "batch_size=...), which carries buffers as training state and draws dropout masks as a function "
           "of (seed, t) (docs/models.md)")
    if not _same(l0, l1):
        raise ValueError(f"problem.train_loss is not a pure function of (w, t): two calls at (w_0, t=0) gave "
                         f"{_shown(l0)} and {_shown(l1)}. It "
                         "draws random numbers anew at every call (dropout?), so a replayed step would see other "
                         "draws and the hypergradient would be wrong. Draw them as a function of t (a "
                         "torch.Generator seeded with seed + t inside train_loss), or " + fix)
    if not _same(e0, e1):
        raise ValueError(f"problem.val_loss changed after a call of problem.train_loss (E(w_0) = "
                         f"{_shown(e0)}, then {_shown(e1)}): "
                         "train_loss writes state that val_loss reads — typically a BatchNorm layer's running "
                         "statistics when a module runs in training mode — which no mode of the toolkit sees, so "
                         "the hypergradient would be wrong and drift from call to call. Give the Problem "
                         "buffers0 and train_loss(w, t, buffers) -> (loss, new_buffers), or " + fix)
    try:
        weakref.finalize(problem, _PURE.discard, key)
    except TypeError:  # not weakly referenceable: probed at every call instead
        return
    _PURE.add(key)


def check_lrs(lrs: Any, problem, argname: str = "lrs", allow_negative: bool = False) -> torch.Tensor:
    """Validate a schedule and return it as a 1-D tensor on the problem's device and dtype."""
    check_problem(problem)
    if isinstance(lrs, torch.Tensor):
        if lrs.device != problem.device:
            raise ValueError(f"{argname} is on {lrs.device} but the problem's parameters are on "
                             f"{problem.device}; move one of them")
        if lrs.is_complex() or not (lrs.is_floating_point() or lrs.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{argname} must be real numbers, got dtype {lrs.dtype}")
        out = lrs.detach().to(problem.dtype)
    elif isinstance(lrs, (str, bytes)) or not hasattr(lrs, "__len__"):
        raise TypeError(f"{argname} must be a 1-D tensor, array or sequence of learning rates, "
                        f"got {type(lrs).__name__}")
    else:
        try:
            out = torch.as_tensor(lrs, dtype=problem.dtype, device=problem.device)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{argname} must contain numbers: {exc}") from None
    if out.dim() != 1:
        raise ValueError(f"{argname} must be 1-D (one learning rate per step), got shape {tuple(out.shape)}")
    if out.numel() == 0:
        raise ValueError(f"{argname} is empty: the schedule needs at least one step")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{argname} contains NaN or inf at steps "
                         f"{torch.nonzero(~torch.isfinite(out)).flatten().tolist()[:10]}")
    if not allow_negative and bool((out < 0).any()):
        raise ValueError(f"{argname} must be ≥ 0; negative at steps "
                         f"{torch.nonzero(out < 0).flatten().tolist()[:10]}")
    return out


def _buffers_of(state: dict) -> tuple:
    """(b,) of a stateful training state, () otherwise: ``val_loss``'s extra argument."""
    return (state[BUFFERS],) if BUFFERS in state else ()


@dataclass
class TrainResult:
    """A training run: final state (b_T in ``state["buffers"]`` for a stateful problem) and
    parameters, per-step minibatch losses, final value E(w_T)."""

    state: dict
    params: Any
    train_losses: torch.Tensor
    value: torch.Tensor


def train(problem, lrs: Any, optimizer: "str | _dynamics.Dynamics" = "sgd", *,
          progress: bool = False, validate: bool = True) -> TrainResult:
    """Run T = len(lrs) steps s_{t+1} = Φ_t(s_t, η_t) from ``problem.params0``; no graph kept."""
    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem) if validate else lrs
    step = make_step(problem, dyn)
    state = initial_state(problem, dyn)
    losses = []
    with torch.no_grad():
        for t in progress_bar(range(len(lrs)), progress, desc="train", leave=False):
            state, loss = step(state, lrs[t], t)
            check_finite(loss, t)
            losses.append(loss)
        value = scalar_loss(problem.val_loss, "val_loss")(dyn.params(state), *_buffers_of(state))
    check_finite(value, len(lrs) - 1, dyn.params(state), VALIDATION_LOSS)
    return TrainResult(state, dyn.params(state), torch.stack(losses), value)
