r"""The fast paths of the online engine and the drop-ins, apart from the maths.

The maths is written once, in :mod:`hgtoolkit.dynamics` (the reference: ``step(state, grad,
lr, t)``, ``tangent(state, grad, lr, t, z, H z_w, 1, scale=μ)`` = (s_{t+1}, μ A_t z + B_t), new
tensors for every key) and in :class:`hgtoolkit.online.Engine` (h_t = v_t·z_t, the η, β, μ
updates). This module holds the ways of computing the same numbers with fewer memory passes or
fewer kernel launches, and :class:`Plan`, the record that says which of them a given engine
takes. Each path is tested against the reference in ``tests/test_fastpaths.py``: bit for bit
where it is elementwise, to a stated tolerance where it reassociates a sum.

- **buffers** (:func:`tangent` with ``out_state``/``out_tangent``, :func:`update`): the leaves
  of s_{t+1} and z_{t+1} are written into given buffers (the ``out=`` of the same kernels; in
  place, one tensor-list kernel for all leaves) instead of new tensors: bit for bit.
- **in place, no masks** (:meth:`Buffers.root_quotient`): Adam's, AdaGrad's and RMSProp's
  u = num/(k√acc + c) with the plain square root (never differentiated here), D formed in
  place on it, Adam's u in z's buffer when z_{t+1} = −u, and (``keep=``) u, D, √v' left for
  ``hyper_vjp``: bit for bit.
- **only the carried keys** (``keys``): the tangent of the keys the engine carries (HD: of w
  alone) instead of every key: bit for bit.
- **donation** (``Plan.donate``): those buffers are the state and the tangent themselves, for a
  single run that never reads an old state again: bit for bit.
- **direction as z** (``Plan.direction_as_z``): HD (z_{t+1} = B_t = −d_t) keeps the direction
  d_t by reference, no copy or negation, and h_t = −v_t·d_{t−1}: bit for bit (a negation is
  exact).
- **rows** (``Plan.rows``): R runs of a row-wise problem along a leading axis, η and μ per row,
  each run's dot one sum over its flattened row instead of a sum of per-leaf dots: ≤ 1e-12
  relative in float64 (the sum reassociated). The same for the reverse pass
  (:func:`cotangent` with ``rows``: η̄ per run; :func:`hgtoolkit.exact.hypergradient_rows`).
- **the reverse step in place** (:func:`adjoint_in_place`): SGD's (heavy ball or plain)
  adjoint step of the exact reverse pass on the cotangent λ_{t+1} it owns — three in-place
  kernels and per-leaf dots instead of a new tensor per intermediate (b_{t+1} is never formed:
  η̄ = −(γ⟨λ_w, b_t⟩ + ⟨λ_w, g̃_t⟩)): ≤ 1e-12 relative in float64 (the sums reassociated,
  −η·λ_w fused into one rounding).
- **flat buffers** (:class:`FlatGroup`): a drop-in's param group of many small tensors as one
  flat leaf per state key: elementwise bit for bit, the dots ≤ 1e-12 relative in float64;
  chosen per group and step by :meth:`Plan.flat_group`.

Measurements of what each path saves: docs/performance.md ("Fast paths").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import dynamics as _dynamics
from ._tree import flatten, tree_clone, tree_dot, tree_leaves, tree_map, unflatten

__all__ = ["Plan", "Buffers", "tangent", "cotangent", "adjoint_in_place", "update", "FlatGroup", "flat_pays"]


# ----------------------------------------------------------------------------- buffers

class Buffers(_dynamics.Leaves):
    """The leaf view of a state whose update writes into buffers: ``out`` (for the new state)
    and ``dout`` (for its tangent), pytrees shaped like the state; they may be the state and
    its tangent themselves (donated). Keys without a buffer get new tensors. An update on this
    view is never differentiated by autograd (the closed-form tangent, the update alone), so
    it works in place on its own temporaries; ``keep``: a dict where it leaves the update's
    intermediates that the dynamics' ``hyper_vjp`` reads back (:attr:`Dynamics.kept`)."""

    def __init__(self, state: dict, out: dict | None = None, dout: dict | None = None,
                 keep: dict | None = None, rows: bool = False):
        _dynamics.Leaves.__init__(self, state)
        self.keep, self.rows = keep, rows
        self.out = {} if out is None else {k: flatten(v)[0] for k, v in out.items()}
        self.dout = {} if dout is None else {k: flatten(v)[0] for k, v in dout.items()}

    def dot(self, a: list, b: list) -> torch.Tensor:
        """⟨a, b⟩; with ``rows`` one per run, a sum over its flattened row (:meth:`Plan.dot`)."""
        if not self.rows:
            return tree_dot(a, b)
        out = _row_sum(a[0] * b[0])
        for x, y in zip(a[1:], b[1:]):
            out = out + _row_sum(x * y)
        return out

    def o(self, key: str) -> list:
        return self.out.get(key) or [None] * len(self.leaves["w"])

    def do(self, key: str) -> list:
        return self.dout.get(key) or [None] * len(self.leaves["w"])

    def descend(self, lr: Any, d: list, dw: list | None, dd: list | None, dlr: Any,
                scale: Any) -> tuple[list, list]:
        """w' = w − η d and dw' = scale·(dw − η dd) − dη d (:meth:`Leaves.descend`); in place
        where the buffers are w (and dw) themselves and the leaves are several of one dtype and
        device: one tensor-list kernel for all leaves instead of one kernel per leaf (w'), three
        for the tangent (μ A_t z + B_t of a single run), the per-leaf kernels' numbers; for
        dη = −1 alone (HD's direction kept as z) the tangent is d itself."""
        w = self.leaves["w"]
        if len(w) < 2:  # one leaf: one kernel each way already
            return _dynamics.Leaves.descend(self, lr, d, dw, dd, dlr, scale)
        w_here = _one_kind(w) and all(o is p for o, p in zip(self.o("w"), w))
        new = _subtract_in_place(w, lr, d) if w_here else self.new_w(lr, d)
        if dw is None and dd is None and dlr is not None and _is_one(-dlr) and not self.dout.get("w"):
            return new, list(d)  # HD's direction as z: −B_t = d itself, no copy, no per-leaf loop
        z_here = (dw is not None and dd is not None and dlr is not None and _one_kind(dw)
                  and all(x is not None and o is x for o, x in zip(self.do("w"), dw))
                  and all(x is not None for x in dd))
        if not z_here:
            return new, self.new_w_tangent(lr, d, dw, dd, dlr, scale)
        _subtract_in_place(dw, lr, dd)
        if scale is not None and not _is_one(scale):
            torch._foreach_mul_(dw, scale)
        return new, _subtract_in_place(dw, dlr, d)

    def root_quotient(self, num: list, acc: list, k: Any, c: Any, slopes: bool = False,
                      out: list | None = None) -> tuple[list, list | None, list | None]:
        """:meth:`Leaves.root_quotient` (u = num/D, D = k·√acc + c) with the same kernels leaf by
        leaf, for an update that autograd never differentiates: without slopes the plain square
        root (no masks: √0 = 0 already), and D formed in place on √acc; u into ``out`` (then √acc
        and D too, u's own buffer, unless they are kept: ``keep`` gets u, D and √acc)."""
        n = len(num)
        if slopes:
            roots = self.roots(acc, True)
            den = _shifted([r for r, _ in roots], k, c)
            return [torch.div(x, d) for x, d in zip(num, den)], den, [rho for _, rho in roots]
        out = out or [None] * n
        keeping = self.keep is not None
        roots = [torch.sqrt(a, out=None if keeping else o) for a, o in zip(acc, out)]
        # √acc kept: D in one new tensor, else in place on √acc
        den = [torch.mul(r, k).add_(c) for r in roots] if keeping else _shifted(roots, k, c)
        u = [torch.div(x, d, out=o) for x, d, o in zip(num, den, out)]
        if keeping:
            self.keep.update(u=u, den=den, root=roots)
        return u, None, None

    def build_into(self, per_key: dict, into: dict, keys: Any = None) -> dict:
        """:meth:`Leaves.build`, every leaf of a key with buffers ending up in its buffer
        (written there by the update already, else copied or zeroed)."""
        if not into:
            return self.build(per_key, keys)
        out = {}
        for k in (per_key if keys is None else keys):
            bufs = into.get(k)
            if not bufs:
                out.update(self.build(per_key, keys=(k,)))
                continue
            leaves = per_key[k] if per_key[k] is not None else [None] * len(bufs)
            for x, buf in zip(leaves, bufs):
                if x is None:
                    buf.zero_()
                elif x is not buf:
                    buf.copy_(x)
            out[k] = unflatten(bufs, self.spec)
        return out


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over each run's row of ``x`` (runs along axis 0): the flattened row's sum (a (runs, n)
    stack is its own flattening: no view to make)."""
    return x.sum(1) if x.dim() == 2 else x.flatten(1).sum(1)


def _is_one(a: Any) -> bool:
    return not isinstance(a, torch.Tensor) and a == 1


def _shifted(rs: list, k: Any, c: Any) -> list:
    """r ← k·r + c in place for every r (two roundings, as k·r + c; k = 1 skipped: the same
    numbers)."""
    return [r.add_(c) for r in rs] if _is_one(k) else [r.mul_(k).add_(c) for r in rs]


def _one_kind(xs: list) -> bool:
    """Several leaves of one dtype and device (what one tensor-list kernel takes)."""
    return len(xs) > 1 and all(x.dtype == xs[0].dtype and x.device == xs[0].device for x in xs)


def _subtract_in_place(ys: list, a: Any, xs: list) -> list:
    """y_i ← y_i − a·x_i for every leaf with one ``torch._foreach_*`` call: the per-leaf
    ``sub`` (a = 1) or ``addcmul(y, a, x, value=−1)`` of the reference, so the same numbers,
    without a Python call per leaf."""
    if _is_one(a):
        torch._foreach_sub_(ys, xs)
    else:
        if not isinstance(a, torch.Tensor):
            a = torch.tensor(a, dtype=xs[0].dtype, device=xs[0].device)
        torch._foreach_addcmul_(ys, [a] * len(ys), xs, value=-1)
    return ys


def tangent(dyn: _dynamics.Dynamics, state: dict, grad: Any, lr: Any, t: int, dstate: dict | None = None,
            dgrad: Any = None, dlr: Any = 1.0, scale: Any = None, *, keys: Any = None,
            out_state: dict | None = None, out_tangent: dict | None = None, **hyper: Any) -> tuple[dict, dict]:
    """``dyn.tangent(state, grad, lr, t, dstate, dgrad, dlr, scale)`` (the reference), with the
    tangent of ``keys`` only (default all) and the results written into ``out_state`` /
    ``out_tangent`` (pytrees shaped like the state / tangent; they may be ``state`` and
    ``dstate`` themselves: donated) instead of new tensors. The same numbers."""
    if not dyn.closed_form:  # torch.func's jvp of step: new tensors, copied into the buffers
        new, dnew = dyn.tangent(state, grad, lr, t, dstate, dgrad, dlr, scale, **hyper)
        if keys is not None:
            dnew = {k: dnew[k] for k in keys}
        for src, buf in ((new, out_state), (dnew, out_tangent)):
            if buf is not None:
                tree_map(lambda b, x: b.copy_(x), {k: buf[k] for k in src}, src)
        return (new if out_state is None else out_state,
                dnew if out_tangent is None else {k: out_tangent[k] for k in dnew})
    L = Buffers(state, out_state, out_tangent)
    new, dnew = dyn.tangent_leaves(L, grad, lr, t, dstate, dgrad, dlr, scale, hyper)
    return L.build_into(new, L.out), L.build_into(dnew, L.dout, keys)


def cotangent(dyn: _dynamics.Dynamics, state: dict, grad: Any, lr: Any, t: int, bar: dict, *,
              rows: bool = False, **hyper: Any) -> tuple[dict, Any, torch.Tensor]:
    """``dyn.cotangent(state, grad, lr, t, bar)`` (the reference: (s̄, ḡ, η̄), the vjp of one
    update); ``rows``: the state holds runs along a leading axis (``Plan.rows``), η shaped
    against them, and η̄ is one number per run (its dot a sum over its row: ≤ 1e-12 relative)."""
    if not rows:
        return dyn.cotangent(state, grad, lr, t, bar, **hyper)
    if not dyn.closed_form_adjoint:
        raise TypeError(f"fastpaths.cotangent(rows=True) needs a closed-form cotangent; "
                        f"{type(dyn).__name__} has only step()")
    return dyn.cotangent_leaves(Buffers(state, rows=True), grad, lr, t, bar, hyper)


def adjoint_in_place(dyn: _dynamics.Dynamics, state: dict, grad: Any, lr: Any, lam: dict,
                     hvp: Any) -> tuple[dict, torch.Tensor] | None:
    r"""One step of the exact reverse pass for SGD (heavy ball, or plain), in place on ``lam`` =
    λ_{t+1} (a cotangent the caller owns and never reads again): (λ_t, η̄_t) = the reference's
    ``(s̄ + H_t ḡ, η̄)`` of ``dyn.cotangent(state, grad, lr, t, lam)`` with ``hvp(v)`` = H_t v.
    With g̃ = g + wd·w and u = ḡ_t = λ_b − η_t λ_w (λ_b = 0 for plain SGD):

        η̄_t = −⟨λ_w, b_{t+1}⟩ = −(γ⟨λ_w, b_t⟩ + ⟨λ_w, g̃_t⟩),   λ_w ← λ_w + H_t u + wd·u,   λ_b ← γ·u.

    None (take the reference) for other dynamics, Nesterov, or a state or cotangent with other
    keys."""
    if (type(dyn) is not _dynamics.SGD or dyn.nesterov or not set(state) <= {"w", "b"}
            or not set(lam) <= {"w", "b"} or ("b" in state) != bool(dyn.momentum)):
        return None
    lw, spec = flatten(lam["w"])
    if any(x is None for x in lw):
        return None
    m, wd, g, w = float(dyn.momentum), float(dyn.weight_decay), tree_leaves(grad), tree_leaves(state["w"])
    dot = tree_dot(lw, g)
    if wd:
        dot = dot + wd * tree_dot(lw, w)
    lb = tree_leaves(lam["b"]) if lam.get("b") is not None else None
    if "b" in state:
        dot = dot + m * tree_dot(lw, tree_leaves(state["b"]))
    lr = torch.as_tensor(lr, dtype=lw[0].dtype, device=lw[0].device)
    if lb is None or any(x is None for x in lb):
        u = [torch.mul(x, -lr) for x in lw]
    else:
        u = [torch.addcmul(y, lr, x, value=-1, out=y) for x, y in zip(lw, lb)]
    hv = tree_leaves(hvp(unflatten(u, spec)))
    torch._foreach_add_(lw, hv)
    if wd:
        torch._foreach_add_(lw, u, alpha=wd)
    out = {"w": unflatten(lw, spec)}
    if "b" in state:
        torch._foreach_mul_(u, m)
        out["b"] = unflatten(u, spec)
    return out, -dot


def update(dyn: _dynamics.Dynamics, state: dict, grad: Any, lr: Any, t: int, *, out_state: dict | None = None,
           keep: dict | None = None, **hyper: Any) -> dict:
    """``dyn.update(state, grad, lr, t)`` (the reference) written into ``out_state`` (a pytree of
    some of the state's keys, e.g. ``{"w": buffers}``; the others, or all with None, get new
    tensors), in place on its temporaries (:meth:`Buffers.root_quotient`); ``keep``: a dict where
    it leaves the intermediates :meth:`~hgtoolkit.dynamics.Dynamics.hyper_vjp` of the same update
    reads back (``kept=``; :attr:`~hgtoolkit.dynamics.Dynamics.kept`, none for most dynamics)."""
    if not dyn.closed_form:
        if out_state is None:
            return dyn.step(state, grad, lr, t, **hyper)
        return tangent(dyn, state, grad, lr, t, dlr=None, keys=(), out_state=out_state, **hyper)[0]
    L = Buffers(state, out_state, keep=keep if dyn.kept else None)
    return L.build_into(dyn.update_leaves(L, grad, lr, t, hyper), L.out)


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Plan:
    """Which fast paths an :class:`hgtoolkit.online.Engine` takes (module docstring); all False:
    the reference. Build it with :meth:`choose` from what the caller knows of its runs; a
    drop-in asks :meth:`flat_group` at each group's step whether it takes the flat buffers.

    ``donate``: s_{t+1}, z_{t+1} are written into the buffers of s_t, z_t, and the engine's
    ``init`` copies the parameters once (never under ``vmap``, nor where an old state is kept).
    ``direction_as_z``: without a Hessian-vector product (HD) the state's z holds
    d_t = −z_{t+1}, the update direction itself. ``rows``: the state holds R runs along a
    leading axis (a batch of a ``Problem.rowwise`` problem, whose parameters are one tensor:
    η and μ are shaped against it), dots per run, η and μ per run."""

    donate: bool = False
    direction_as_z: bool = False
    rows: bool = False

    @classmethod
    def choose(cls, needs_hvp: bool, *, single_run: bool = False, owns_grad: bool = True,
               rows: bool = False) -> "Plan":
        """The paths that apply: donation for a ``single_run`` (one run that never reads an old
        state again: :func:`hgtoolkit.online.run`, the drop-ins); the direction as z for HD
        when the engine ``owns_grad`` (the gradients it is given are not a user's ``p.grad``,
        which may be zeroed in place while z still refers to it); ``rows`` as given."""
        return cls(donate=single_run, direction_as_z=owns_grad and not needs_hvp, rows=rows)

    def flat_group(self, needs_hvp: bool, params: list, *, same_count: bool = True, force: bool | None = None,
                   built: "FlatGroup | None" = None) -> "FlatGroup | None":
        """The drop-ins' flat-buffer path for one param group's step: the :class:`FlatGroup` to
        run it on, or None for the reference path. It applies with a tangent of the whole state
        (``needs_hvp``, so never with ``direction_as_z``) when every parameter is at the same
        update count (``same_count``); then ``built`` (the group's earlier one) is reused when it
        is over the same ``params`` (it paid, or was forced, when it was built); otherwise a new
        one is built when it pays (:func:`flat_pays`), or wherever the tensors share a dtype and
        device with ``force=True``. ``force=False``: never."""
        if force is False or not needs_hvp or self.direction_as_z or not same_count:
            return None
        if built is not None and built.matches(params):
            return built
        p0 = params[0]
        if (not (force or flat_pays(params))
                or any(p.dtype != p0.dtype or p.device != p0.device for p in params)):
            return None
        return FlatGroup(params)

    def dot(self, a: Any, b: Any) -> torch.Tensor:
        """⟨a, b⟩ (per run with ``rows``: shape (R,))."""
        if not self.rows:
            return tree_dot(a, b)
        la, lb = tree_leaves(a), tree_leaves(b)
        out = (la[0] * lb[0]).flatten(1).sum(1)
        for x, y in zip(la[1:], lb[1:]):
            out = out + (x * y).flatten(1).sum(1)
        return out

    def per_row(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-run number (shape () or (R,)) shaped to broadcast against the run's tensors."""
        return x.view(-1, *[1] * (like.dim() - 1)) if self.rows else x

    def hypergradient(self, v: Any, z_w: Any, dtype: torch.dtype, share: Any = None) -> torch.Tensor:
        """h = v·z_w in ``dtype`` (+ ``share``, a stateful model's buffers part, in the same
        convention) for the z the state holds: negated with ``direction_as_z`` (z = d = −z_{t+1})."""
        h = (self.dot(v, z_w) if self.rows else tree_dot(v, z_w)).to(dtype)
        if share is not None:
            h = h + share.to(h.dtype)
        return -h if self.direction_as_z else h

    def start(self, dyn: _dynamics.Dynamics, params: Any) -> dict:
        """s_0 = dyn.init(params), on a copy of the parameters when they will be donated."""
        return dyn.init(tree_clone(params) if self.donate else params)

    def step(self, dyn: _dynamics.Dynamics, opt: dict, grad: Any, lr: Any, t: int, z: dict,
             hvp: Any = None, scale: Any = None) -> tuple[dict, dict]:
        """(s_{t+1}, z_{t+1}) = ``dyn.tangent(opt, grad, lr, t, z, hvp, 1, scale=scale)`` restricted
        to the keys of ``z`` (``hvp=None``: z_{t+1} = B_t), by this plan's paths."""
        outs = {"out_state": opt, "out_tangent": z} if self.donate else {}
        if self.direction_as_z:  # −B_t = d_t by reference
            return tangent(dyn, opt, grad, lr, t, dlr=-1.0, keys=("w",), out_state=outs.get("out_state"))
        if hvp is None:
            return tangent(dyn, opt, grad, lr, t, keys=tuple(z), **outs)
        return tangent(dyn, opt, grad, lr, t, z, hvp, 1.0, scale, keys=tuple(z), **outs)


# ----------------------------------------------------------------------------- flat buffers

MIN_TENSORS = 16  # below this the per-tensor loops cost less than the gathers
MAX_MEAN_NUMEL = 1 << 16  # above this the gathers' memory passes cost more than the loops


def flat_pays(params: list) -> bool:
    """:class:`FlatGroup` is worth its gathers (many small tensors) and applies (one dtype and
    device, dense tensors)."""
    if len(params) < MIN_TENSORS:
        return False
    p0 = params[0]
    if any(p.dtype != p0.dtype or p.device != p0.device or p.layout != torch.strided for p in params):
        return False
    return sum(p.numel() for p in params) <= MAX_MEAN_NUMEL * len(params)


class FlatGroup:
    """A drop-in's param group of many parameter tensors as one flat leaf per state key.

    The reference step (:meth:`hgtoolkit.optim.OnlineOptimizer._group_step`) runs the engine on
    per-parameter leaf lists, whose cost grows with the number of tensors (each dot h = v·z a sum
    of per-tensor dots, each tensor-list kernel a loop). This runs the same engine functions on
    one flat leaf per key: the group's moments, tangents and g_{t−1} live in flat buffers and
    each parameter's ``optimizer.state[p][key]`` is a view into them (so ``state_dict`` and the
    reference path see ordinary per-parameter tensors); w, g and H z are gathered into flat
    buffers (one tensor-list copy each) and w is written back after the update. The step reads
    the buffers, never the views, so views replaced from outside (a loaded state dict) are
    adopted (copied in) at the next step. Against the reference: w, the moments and z bit for
    bit for the same η, μ, β; the dots (h_t, ∇L_t·∇L_{t−1}) are one sum over the concatenation
    (≤ 1e-12 relative in float64; tests/test_dropin_flat.py).

    ``buffer(key)`` is one 1-D tensor holding every parameter's ``key`` entry, ``views[key][i]``
    parameter i's piece of it, shaped like it: keys of the optimizer state ("m", "v", "z_w", …)
    and of the step's inputs, which the caller names apart from them ("in:w", "in:g", …)."""

    def __init__(self, params: list):
        self.params = list(params)
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[str, list] = {}

    def matches(self, params: list) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def buffer(self, key: str) -> torch.Tensor:
        buf = self.buffers.get(key)
        if buf is None:
            p0 = self.params[0]
            buf = self.buffers[key] = torch.zeros(self.numel, dtype=p0.dtype, device=p0.device)
            pieces = torch.split(buf, self.sizes)
            self.views[key] = [x.view_as(p) for x, p in zip(pieces, self.params)]
        return buf

    def adopt(self, states: list, keys: list) -> None:
        """Make ``states[i][key]`` parameter i's view of the flat buffer of ``key``, copying in a
        value held elsewhere (the reference path's tensors, a loaded state dict; zero if none)."""
        for key in keys:
            self.buffer(key)
            views = self.views[key]
            for st, view in zip(states, views):
                x = st.get(key)
                if x is view:
                    continue
                if x is None:
                    view.zero_()
                else:
                    view.copy_(x)
                st[key] = view

    def gather(self, key: str, tensors: list) -> torch.Tensor:
        """The flat buffer of ``key`` holding ``tensors`` (one tensor-list copy)."""
        buf = self.buffer(key)
        torch._foreach_copy_(self.views[key], tensors)
        return buf

    def scatter(self, key: str, tensors: list) -> None:
        """``tensors[i]`` ← parameter i's piece of the flat buffer of ``key``."""
        torch._foreach_copy_(tensors, self.views[key])

    def leaves(self, states: list, grads: list, keys: list, zkeys: list, g_prev: bool) -> tuple:
        """The engine state's leaves as one flat leaf per key: (opt, z, g_prev, grads) for
        :class:`hgtoolkit.online.OnlineState` and the step, the parameters' state entries made
        views of the buffers (``keys``: the optimizer's moments, ``zkeys``: the tangent's keys)."""
        self.adopt(states, [*keys, *("z_" + k for k in zkeys), *(["g_prev"] if g_prev else [])])
        opt = {"w": [self.gather("in:w", self.params)], **{k: [self.buffer(k)] for k in keys}}
        z = {k: [self.buffer("z_" + k)] for k in zkeys}
        return opt, z, [self.buffer("g_prev")] if g_prev else None, [self.gather("in:g", grads)]

    def write_back(self, grad: torch.Tensor | None) -> None:
        """After the engine's in-place update of the flat w: the parameters ← their pieces; and
        g_{t−1} ← ``grad`` (the flat gradient of this step) for the μ rule, when given."""
        self.scatter("in:w", self.params)
        if grad is not None:
            self.buffer("g_prev").copy_(grad)
