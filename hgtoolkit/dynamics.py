r"""Optimizer dynamics as pure step functions ``state' = step(state, grad, lr, t)``.

Every optimizer of the toolkit is one frozen dataclass with two pure methods,
``init(params) -> state`` and ``step(state, grad, lr, t, **hyper) -> state``. The state is
a dict of pytrees (``"w"``: the parameters, plus the optimizer's moments), the learning
rate ``lr`` (η_t) is an explicit, differentiable input, and so is every other
hyperparameter when passed as a keyword (``momentum=``, ``beta1=``, …): this is what the
exact hypergradient (``torch.func.vjp``/``jvp`` of one step), the online methods and the
hyperoptimizer towers all differentiate. ``t`` is the 0-based step index (Adam's bias
correction uses it).

The formulas are those of ``torch.optim`` (weight decay added to the gradient).

Closed-form derivatives of one update D(s, g, η) (elementwise in s and g, affine in η):

- ``tangent(state, grad, lr, t, dstate, dgrad, dlr)`` = (D, ∂D/∂s·ds + ∂D/∂g·dg + ∂D/∂η·dη),
  the jvp, used by forward mode and the online engine (z_{t+1} = μ A_t z_t + B_t with
  A_t z = ∂D/∂s·z + ∂D/∂g·H_t z_w and B_t = ∂D/∂η);
- ``cotangent(state, grad, lr, t, bar)`` = (s̄, ḡ, η̄) = the vjp, used by reverse mode
  (λ_t = s̄ + H_t ḡ, ∂f/∂η_t = η̄).

Both are written out for every optimizer here (a few elementwise operations, no autograd), and
:class:`Dynamics` falls back to ``torch.func.jvp``/``vjp`` of ``step`` for a user's subclass
that has none (or when a hyperparameter other than η is passed as a tensor). A tangent or
cotangent given as ``None`` means zero and is never materialised.

Each update is written once, on the leaf lists of a :class:`Leaves` view of the state: this
module's methods are the reference (new tensors for every key). The same update written into
buffers, in place with tensor-list kernels, or for some keys only is
:mod:`hgtoolkit.fastpaths` (its :class:`~hgtoolkit.fastpaths.Buffers` view says where each
kernel writes); tested bit for bit against the reference.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_flatten

from ._tree import flatten, tree_dot, tree_map, tree_zeros_like, unflatten

__all__ = ["Dynamics", "SGD", "Adam", "AdaGrad", "RMSProp", "sgd", "momentum", "nesterov",
           "adam", "adagrad", "rmsprop", "get", "NAMES", "Leaves"]


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """√v with derivative 0 (not ∞·0 = NaN) where v == 0, e.g. gradients of dead ReLU units."""
    positive = v > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, v, torch.ones_like(v))),
                       torch.zeros_like(v))


def _sqrt_and_inverse_slope(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, ρ) with r = _safe_sqrt(v) and ρ = dr/dv = 1/(2r) where v > 0, 0 elsewhere."""
    positive = v > 0
    r = torch.sqrt(torch.where(positive, v, torch.ones_like(v)))
    return torch.where(positive, r, torch.zeros_like(v)), torch.where(positive, 0.5 / r, torch.zeros_like(v))


def _add(*terms):
    """Σ of the terms that are not None (None stands for an exact zero); None if all are."""
    out = None
    for x in terms:
        if x is not None:
            out = x if out is None else out + x
    return out


def _mul(a, x):
    """a·x with None (zero) propagated (also for a None coefficient)."""
    if x is None or a is None:
        return None
    return x if isinstance(a, (int, float)) and a == 1 else a * x


def _neg(x):
    return None if x is None else -x


class Leaves:
    """A state (dict of pytrees shaped like w) as per-key leaf lists, and back: the form every
    update below is written on, once. ``o(key)``/``do(key)`` name where the update writes the
    new state's and the tangent's leaves of ``key`` (the ``out=`` of its kernels): here nowhere
    (``[None…]``: new tensors), which is the reference; :class:`hgtoolkit.fastpaths.Buffers`
    names buffers instead (the same kernels, the same numbers). :meth:`descend` and
    :meth:`root_quotient` are the two parts of the updates that ``Buffers`` computes its own
    way (tensor-list kernels, in place, no autograd masks)."""

    def __init__(self, state: dict):
        self.keys = list(state)
        flat = {k: flatten(state[k]) for k in self.keys}
        self.spec = flat["w"][1]
        self.leaves = {k: flat[k][0] for k in self.keys}

    @staticmethod
    def dot(a: list, b: list) -> torch.Tensor:
        """⟨a, b⟩ over the leaf lists, the dot of every cotangent's η̄ (one number here;
        per run for :class:`hgtoolkit.fastpaths.Buffers` with ``rows``)."""
        return tree_dot(a, b)

    def o(self, key: str) -> list:
        """Where the new state's ``key`` leaves go ([None…]: new tensors)."""
        return [None] * len(self.leaves["w"])

    def do(self, key: str) -> list:
        """Where the tangent's ``key`` leaves go ([None…]: new tensors)."""
        return [None] * len(self.leaves["w"])

    def descend(self, lr: Any, d: list, dw: list | None, dd: list | None, dlr: Any,
                scale: Any) -> tuple[list, list]:
        """The last part of every update: w' = w − η d and its tangent dw' = scale·(dw − η dd)
        − dη d (``None`` tangents are zero, ``scale=None`` one), leaf by leaf into ``o("w")``
        and ``do("w")``: (new w leaves, tangent leaves)."""
        new = [_axpy(p, lr, x, o) for p, x, o in zip(self.leaves["w"], d, self.o("w"))]
        return new, _step_w_tangent(lr, d, dw, dd, dlr, scale, self.do("w"))

    def new_w(self, lr: Any, d: list) -> list:
        """w' = w − η d, leaf by leaf (one ``addcmul`` each) into ``o("w")``."""
        return [_axpy(p, lr, x, o) for p, x, o in zip(self.leaves["w"], d, self.o("w"))]

    def new_w_tangent(self, lr: Any, d: list, dw: list | None, dd: list | None, dlr: Any, scale: Any) -> list:
        """dw' = scale·(dw − η dd) − dη d, leaf by leaf into ``do("w")``."""
        return _step_w_tangent(lr, d, dw, dd, dlr, scale, self.do("w"))

    def roots(self, acc: list, slopes: bool) -> list:
        """(√a, d√a/da) leaf by leaf (the slope only with ``slopes``, else None), both 0 where
        a = 0: the safe square root, whose derivative there is 0 (not ∞·0 = NaN) for autograd."""
        return [_sqrt_and_inverse_slope(a) if slopes else (_safe_sqrt(a), None) for a in acc]

    def root_quotient(self, num: list, acc: list, k: Any, c: Any, slopes: bool = False,
                      out: list | None = None) -> tuple[list, list | None, list | None]:
        r"""(u, D, ρ) leaf by leaf: u = num/D with D = k·√acc + c, and (with ``slopes``) D and
        ρ = d√acc/dacc for the tangent (else None, None). Adam: u = m'/(k√v' + c1ε); AdaGrad,
        RMSProp: u = g/(√a' + ε) (k = 1). ``out``: where u may go (the tangent of w's buffers
        when that tangent is −u). Here new tensors and :meth:`roots`' safe square root."""
        roots = self.roots(acc, slopes)
        den = [_mul(k, r) + c for r, _ in roots]
        u = [torch.div(nn, dd, out=o) for nn, dd, o in zip(num, den, out or [None] * len(num))]
        return (u, den, [rho for _, rho in roots]) if slopes else (u, None, None)

    def of(self, tree: Any) -> list | None:
        return None if tree is None else flatten(tree)[0]

    def of_state(self, tree: dict | None) -> dict:
        if tree is None:
            return {k: None for k in self.keys}
        return {k: (None if tree.get(k) is None else flatten(tree[k])[0]) for k in self.keys}

    def build(self, per_key: dict, keys: Any = None) -> dict:
        """Leaf lists -> state pytree, for ``keys`` (default all); None entries are zeros."""
        out = {}
        for k in (per_key if keys is None else keys):
            leaves = per_key[k] if per_key[k] is not None else [None] * len(self.leaves[k])
            out[k] = unflatten([torch.zeros_like(self.leaves[k][i]) if x is None else x
                                for i, x in enumerate(leaves)], self.spec)
        return out


def _column(leaves: list | None, i: int):
    return None if leaves is None else leaves[i]


@dataclass(frozen=True)
class Dynamics:
    """Base class: a pure optimizer step with its hyperparameters as dataclass fields.

    ``hyperparameters`` names the fields (besides the LR) that may be passed to ``step`` as
    tensors to make them differentiable; ``constraints`` says which range keeps each valid.

    A subclass either overrides :meth:`step` (and then its derivatives come from
    ``torch.func``), or writes its update once as ``_update`` on leaf lists, which gives
    :meth:`step`, the closed-form :meth:`tangent` and :meth:`cotangent` (module docstring).
    """

    hyperparameters: ClassVar[tuple[str, ...]] = ()
    name: ClassVar[str] = "dynamics"
    #: The intermediates of the update that the closed-form :meth:`hyper_vjp` reads back from
    #: ``kept=`` when the update left them (:func:`hgtoolkit.fastpaths.update` with ``keep=``).
    kept: ClassVar[tuple[str, ...]] = ()

    def init(self, params: Any) -> dict:
        raise NotImplementedError

    def step(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        if not self.closed_form:
            raise NotImplementedError(f"{type(self).__name__} must define step() or _update()")
        L = Leaves(state)
        new, _ = self._update(L, self._g_tilde(L, grad), lr, t, self._hyper(hyper))
        return L.build(new)

    @staticmethod
    def params(state: dict) -> Any:
        """The parameters w inside an optimizer state."""
        return state["w"]

    def _hyper(self, hyper: dict) -> dict:
        if not hyper:  # the fields (every step of a reverse pass: no set arithmetic)
            return {k: getattr(self, k) for k in self.hyperparameters}
        unknown = set(hyper) - set(self.hyperparameters)
        if unknown:
            raise TypeError(f"{type(self).__name__}.step got unknown hyperparameter(s) "
                            f"{sorted(unknown)}; tunable: {list(self.hyperparameters)}")
        return {k: hyper.get(k, getattr(self, k)) for k in self.hyperparameters}

    def _g_tilde(self, L: "Leaves", grad: Any) -> list:
        """Leaves of g̃ = g + wd·w (the gradient the update uses), as torch.optim adds weight
        decay (``grad.add(w, alpha=wd)``: one rounding), so the numbers are torch.optim's."""
        g = L.of(grad)
        wd = getattr(self, "weight_decay", 0.0)
        return g if wd == 0 else [torch.add(gg, w, alpha=wd) for gg, w in zip(g, L.leaves["w"])]

    # -- derivatives of one update ----------------------------------------------------------
    @property
    def closed_form(self) -> bool:
        """True when the update is written on leaf lists (``_update``): closed-form tangent and
        cotangent, and the buffered variants of :mod:`hgtoolkit.fastpaths`; False for a subclass
        that only has :meth:`step` (``torch.func`` derivatives)."""
        return type(self)._update is not Dynamics._update

    def tangent(self, state: dict, grad: Any, lr: Any, t: int, dstate: dict | None = None,
                dgrad: Any = None, dlr: Any = 1.0, scale: Any = None, **hyper: Any) -> tuple[dict, dict]:
        r"""(D(s, g, η), scale·(∂D/∂s·ds + ∂D/∂g·dg) + ∂D/∂η·dη): the jvp of :meth:`step` along
        (scale·``dstate``, scale·``dgrad``, ``dlr``), tensor hyperparameters held fixed; ``None``
        tangents are zero, ``scale=None`` is one. The online recursion z_{t+1} = μ A_t z_t + B_t
        (A_t z = ∂D/∂s·z + ∂D/∂g·H_t z_w, B_t = ∂D/∂η) is ``tangent(s, g, η, t, z, H z_w, 1,
        scale=μ)``; B_t alone is ``tangent(s, g, η, t)``. Closed form (no autograd) unless the
        subclass only has ``step``. This is the reference: new tensors for every key; the
        engine's variants (buffers, only some keys) are in :mod:`hgtoolkit.fastpaths`."""
        if not self.closed_form:
            if scale is not None:
                dstate = None if dstate is None else tree_map(lambda x: scale * x, dstate)
                dgrad = None if dgrad is None else tree_map(lambda x: scale * x, dgrad)
            return self._jvp_fallback(state, grad, lr, t, dstate, dgrad, dlr, **hyper)
        L = Leaves(state)
        new, dnew = self.tangent_leaves(L, grad, lr, t, dstate, dgrad, dlr, scale, hyper)
        return L.build(new), L.build(dnew)

    def tangent_leaves(self, L: Leaves, grad: Any, lr: Any, t: int, dstate: dict | None,
                       dgrad: Any, dlr: Any, scale: Any, hyper: dict) -> tuple[dict, dict]:
        """:meth:`tangent` on the leaf view ``L`` (written where ``L`` says): (new leaves per
        key, tangent leaves per key), before :meth:`Leaves.build`."""
        g = self._g_tilde(L, grad)
        ds, dg = L.of_state(dstate), L.of(dgrad)
        wd = getattr(self, "weight_decay", 0.0)
        if wd and ds["w"] is not None:  # dg̃ = dg + wd·dw
            dg = [_add(_column(dg, i), wd * dw) for i, dw in enumerate(ds["w"])]
        return self._update(L, g, lr, t, self._hyper(hyper), ds, dg, dlr, scale)

    def cotangent(self, state: dict, grad: Any, lr: Any, t: int, bar: dict,
                  **hyper: Any) -> tuple[dict, Any, torch.Tensor]:
        r"""(s̄, ḡ, η̄): the vjp of :meth:`step` applied to the cotangent ``bar`` of the new
        state (missing keys or ``None`` are zero), tensor hyperparameters held fixed. Closed
        form (no autograd) unless the subclass only has ``step``."""
        if not self.closed_form_adjoint:
            return self._vjp_fallback(state, grad, lr, t, bar, **hyper)
        return self.cotangent_leaves(Leaves(state), grad, lr, t, bar, hyper)

    @property
    def closed_form_adjoint(self) -> bool:
        """True when the vjp of the update is written on leaf lists (:meth:`cotangent` in closed
        form, and :func:`hgtoolkit.fastpaths.cotangent`'s rows); False: ``torch.func``."""
        return type(self)._adjoint is not Dynamics._adjoint

    def cotangent_leaves(self, L: Leaves, grad: Any, lr: Any, t: int, bar: dict,
                         hyper: dict) -> tuple[dict, Any, torch.Tensor]:
        """:meth:`cotangent` (closed form) on the leaf view ``L``, η̄ by ``L.dot``."""
        g = self._g_tilde(L, grad)
        sbar, gbar, lrbar = self._adjoint(L, g, lr, t, self._hyper(hyper), L.of_state(bar))
        wd = getattr(self, "weight_decay", 0.0)
        if wd:  # through g̃ = g + wd·w
            sbar["w"] = [_add(_column(sbar["w"], i), _mul(wd, gb)) for i, gb in enumerate(gbar)]
        grad_bar = unflatten([torch.zeros_like(x) if b is None else b
                                   for x, b in zip(L.leaves["w"], gbar)], L.spec)
        return L.build(sbar), grad_bar, lrbar

    def update(self, state: dict, grad: Any, lr: Any, t: int, **hyper: Any) -> dict:
        """:meth:`step` for a caller that never differentiates it: the same numbers (here the
        reference, :meth:`step` itself; without autograd masks, in place, and leaving the update's
        intermediates for :meth:`hyper_vjp`: :func:`hgtoolkit.fastpaths.update`)."""
        if "keep" in hyper:
            raise TypeError("Dynamics.update(keep=) moved to hgtoolkit.fastpaths.update(dyn, state, "
                            "grad, lr, t, keep=...)")
        return self.step(state, grad, lr, t, **hyper)

    def update_leaves(self, L: Leaves, grad: Any, lr: Any, t: int, hyper: dict) -> dict:
        """:meth:`update` on the leaf view ``L`` (written where ``L`` says): new leaves per key."""
        return self._update(L, self._g_tilde(L, grad), lr, t, self._hyper(hyper))[0]

    def hyper_vjp(self, state: dict, grad: Any, lr: Any, t: int, bar_w: Any,
                  names: tuple[str, ...], kept: dict | None = None, **hyper: Any) -> dict[str, torch.Tensor]:
        r"""⟨w̄, ∂w'/∂θ⟩ for each θ in ``names`` (``"lr"`` = η, or one of :attr:`hyperparameters`)
        of the update w' = ``step(state, grad, η, t, **hyper)["w"]``: what a hyper-optimizer needs
        (the towers' G¹; for η alone it is HD's hypergradient −⟨w̄, d⟩). Closed form for SGD
        (η, momentum) and Adam (η, β1, β2); ``torch.func.vjp`` of :meth:`step` otherwise.
        ``kept``: what :func:`hgtoolkit.fastpaths.update` left of this very update (``keep=``),
        reused."""
        h = self._hyper(hyper)
        L = Leaves(state)
        if type(self)._hyper_adjoint is not Dynamics._hyper_adjoint:
            out = self._hyper_adjoint(L, self._g_tilde(L, grad), lr, t, h, L.of(bar_w), tuple(names), kept)
            if out is not None:
                return out
        tensors = {n: (lr if n == "lr" else h[n]) for n in names}
        tensors = {n: x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
                   for n, x in tensors.items()}

        def w_of(vals):
            hp = {**hyper, **{n: x for n, x in vals.items() if n != "lr"}}
            return self.step(state, grad, vals.get("lr", lr), t, **hp)["w"]

        _, pullback = torch.func.vjp(w_of, tensors)
        return pullback(bar_w)[0]

    def _hyper_adjoint(self, L: "Leaves", g: list, lr: Any, t: int, h: dict, bar: list,
                       names: tuple, kept: dict | None = None) -> dict | None:
        """Closed-form :meth:`hyper_vjp` on leaf lists (``kept``: the update's intermediates, or
        None), or None (then ``torch.func``)."""
        return None

    def _update(self, L: "Leaves", g: list, lr: Any, t: int, h: dict, ds: dict | None = None,
                dg: list | None = None, dlr: Any = None, scale: Any = None) -> tuple[dict, dict]:
        """The update on leaf lists, and its jvp: (new leaves per key, tangent leaves per key)
        = scale·(∂D/∂s ds + ∂D/∂g dg) + ∂D/∂η dlr. ``g`` includes weight decay and ``dg`` its
        tangent; ``None`` tangents (and scale) are zero (one)."""
        raise NotImplementedError

    def _adjoint(self, L: "Leaves", g: list, lr: Any, t: int, h: dict, bar: dict):
        """The vjp on leaf lists: (state bars per key, bar of g̃, η̄)."""
        raise NotImplementedError

    def _jvp_fallback(self, state, grad, lr, t, dstate, dgrad, dlr, **hyper):
        w0 = tree_flatten(state["w"])[0][0]
        lr = torch.as_tensor(lr, dtype=w0.dtype, device=w0.device)
        dlr = torch.zeros_like(lr) if dlr is None else torch.as_tensor(dlr, dtype=lr.dtype, device=lr.device).expand_as(lr)
        ds = {k: (tree_zeros_like(state[k]) if dstate is None or dstate.get(k) is None else dstate[k])
              for k in state}
        dg = tree_zeros_like(grad) if dgrad is None else dgrad
        return torch.func.jvp(lambda s, g_, lr_: self.step(s, g_, lr_, t, **hyper),
                              (state, grad, lr), (ds, dg, dlr))

    def _vjp_fallback(self, state, grad, lr, t, bar, **hyper):
        w0 = tree_flatten(state["w"])[0][0]
        lr = torch.as_tensor(lr, dtype=w0.dtype, device=w0.device)
        new, pullback = torch.func.vjp(lambda s, g_, lr_: self.step(s, g_, lr_, t, **hyper),
                                       state, grad, lr)
        cot = {k: (tree_zeros_like(new[k]) if bar.get(k) is None else bar[k]) for k in new}
        return pullback(cot)

    def config(self) -> dict:
        """JSON-serialisable description, e.g. for result records."""
        return {"name": self.name, **dataclasses.asdict(self)}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and (value != value or value < 0):
                raise ValueError(f"{type(self).__name__}: {field.name} must be ≥ 0, got {value}")


def _is_one(a: Any) -> bool:
    return not isinstance(a, torch.Tensor) and a == 1


def _axpy(y: torch.Tensor, a: Any, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y − a·x in one fused pass (``addcmul``), for a number or a 0-d tensor a (η, also under
    jvp/vmap): the same kernel, hence the same rounding, whichever form η comes in (a = 1:
    ``sub``, bit-identical). ``out`` may be y itself."""
    if _is_one(a):
        return torch.sub(y, x, out=out)
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=x.dtype, device=x.device)
    return torch.addcmul(y, a, x, value=-1, out=out)


def _axpby(y: torch.Tensor, a: Any, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """y + a·x (``addcmul``; a a number or a 0-d tensor), into ``out`` when given."""
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=x.dtype, device=x.device)
    return torch.addcmul(y, a, x, out=out)


def _decay_add(b: torch.Tensor, m: Any, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """m·b + g in torch.optim.SGD's order (``buf.mul_(m).add_(g)``: the product rounded, then the
    sum; ``addcmul`` fuses them and rounds once), so that SGD with momentum is torch.optim.SGD
    bit for bit; into ``out`` when given (``out`` may be b)."""
    if out is None:
        return torch.mul(b, m) + g
    return torch.add(torch.mul(b, m, out=out), g, out=out)


def _scale_into(a: Any, x: torch.Tensor | None, out: torch.Tensor | None = None):
    """a·x (None: one) into ``out`` when given; None for a zero x."""
    if x is None:
        return None
    if a is None or _is_one(a):
        return x
    return torch.mul(x, a, out=out)


def _step_w_tangent(lr: Any, d: list, dw: list | None, dd: list | None, dlr: Any, scale: Any, dout: list) -> list:
    """dw' = scale·(dw − η dd) − dη d, leaf by leaf (three passes at most: the scale is applied to
    dw − η dd, not to the incoming tangents), into ``dout`` (None entries: new tensors)."""
    tan = []
    for i in range(len(d)):
        ddi, dwi, o = _column(dd, i), _column(dw, i), dout[i]
        inner = None
        if ddi is not None:
            inner = _axpy(dwi, lr, ddi, o) if dwi is not None else torch.mul(ddi, -lr, out=o)
        inner = _scale_into(scale, dwi if inner is None else inner, o)
        if dlr is not None:
            if inner is not None:
                inner = _axpy(inner, dlr, d[i], o)
            else:
                if _is_one(dlr):
                    inner = torch.neg(d[i], out=o)
                elif _is_one(-dlr) and o is None:
                    inner = d[i]  # B_t for dη = −1 is d itself: no copy
                else:
                    inner = torch.mul(d[i], -dlr, out=o)
        tan.append(inner)
    return tan


def _step_w_adjoint(wbar: list | None, lr: Any, d: list, dot=tree_dot):
    """Adjoint of w' = w − η d: (d̄ = −η w̄', η̄ = −⟨w̄', d⟩ by ``dot``, :meth:`Leaves.dot`)."""
    live = [] if wbar is None else [i for i, x in enumerate(wbar) if x is not None]
    if not live:
        return [None] * len(d), torch.zeros((), dtype=d[0].dtype, device=d[0].device)
    dbar = [None if x is None else -lr * x for x in wbar]
    if len(live) == len(wbar) == len(d):  # every leaf (the usual case): the lists as they are
        return dbar, -dot(wbar, d)
    return dbar, -dot([wbar[i] for i in live], [d[i] for i in live])


@dataclass(frozen=True)
class SGD(Dynamics):
    r"""SGD with optional (Nesterov) momentum, as ``torch.optim.SGD`` (dampening 0).

    b_{t+1} = m·b_t + g_t;  d_t = g_t + m·b_{t+1} (Nesterov) or b_{t+1} (heavy ball; g_t if m = 0);
    w_{t+1} = w_t − η_t d_t.  Tangent: db' = m·db + dg, dd = dg + m·db' (or db'),
    dw' = dw − η dd − dη d.
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("momentum",)

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.momentum == 0 and not self.nesterov:
            return "sgd"
        return "nesterov" if self.nesterov else "momentum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.momentum >= 1:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")

    def init(self, params: Any) -> dict:
        if self.momentum == 0 and not self.nesterov:
            return {"w": params}
        return {"w": params, "b": tree_zeros_like(params)}

    def _update(self, L, g, lr, t, h, ds=None, dg=None, dlr=None, scale=None):
        ds = ds or {}
        w, dw = L.leaves["w"], ds.get("w")
        if "b" not in L.leaves:
            new_w, dnew_w = L.descend(lr, g, dw, dg, dlr, scale)
            return {"w": new_w}, {"w": dnew_w}
        m, db = h["momentum"], ds.get("b")
        b = [_decay_add(bb, m, gg, o) for bb, gg, o in zip(L.leaves["b"], g, L.o("b"))]
        dbn = []
        for i, o in enumerate(L.do("b")):
            dbi, dgi = _column(db, i), _column(dg, i)
            dbn.append(_axpby(dgi, m, dbi, o) if dbi is not None and dgi is not None else
                       _add(_scale_into(m, dbi, o), dgi))
        if self.nesterov:
            d = [_axpby(gg, m, bb) for gg, bb in zip(g, b)]
            dd = [_add(_column(dg, i), _mul(m, dbn[i])) for i in range(len(b))]
        else:
            d, dd = b, dbn
        new_w, dnew_w = L.descend(lr, d, dw, dd, dlr, scale)
        return {"w": new_w, "b": b}, {"w": dnew_w, "b": [_scale_into(scale, x, o) for x, o in zip(dbn, L.do("b"))]}

    def _hyper_adjoint(self, L, g, lr, t, h, bar, names, kept=None):
        """⟨w̄, ∂w'/∂η⟩ = −⟨w̄, d⟩; ⟨w̄, ∂w'/∂m⟩ = −η⟨w̄, ∂d/∂m⟩, ∂d/∂m = b (heavy ball) or
        b' + m·b (Nesterov)."""
        m = h.get("momentum", 0.0)
        b = L.leaves.get("b")
        b_new = None if b is None else [_decay_add(bb, m, gg) for bb, gg in zip(b, g)]
        d = g if b is None else ([_axpby(gg, m, bb) for gg, bb in zip(g, b_new)] if self.nesterov else b_new)
        out = {}
        for name in names:
            if name == "lr":
                out[name] = -tree_dot(bar, d)
            elif name == "momentum":
                dd = b if not self.nesterov else [_axpby(bn, m, bb) for bn, bb in zip(b_new, b)]
                out[name] = -lr * tree_dot(bar, dd)
            else:
                return None
        return out

    def _adjoint(self, L, g, lr, t, h, bar):
        w = L.leaves["w"]
        if "b" not in L.leaves:
            gbar, lrbar = _step_w_adjoint(bar["w"], lr, g, L.dot)
            return {"w": bar["w"]}, gbar, lrbar
        m = h["momentum"]
        b = [m * bb + gg for bb, gg in zip(L.leaves["b"], g)]
        d = [gg + m * bb for gg, bb in zip(g, b)] if self.nesterov else b
        dbar, lrbar = _step_w_adjoint(bar["w"], lr, d, L.dot)
        bb_bar = [_add(_column(bar["b"], i), _mul(m, dbar[i]) if self.nesterov else dbar[i])
                  for i in range(len(w))]
        gbar = [_add(bb_bar[i], dbar[i] if self.nesterov else None) for i in range(len(w))]
        return {"w": bar["w"], "b": [_mul(m, x) for x in bb_bar]}, gbar, lrbar


@dataclass(frozen=True)
class Adam(Dynamics):
    r"""Adam with bias correction, as ``torch.optim.Adam``.

    m_{t+1} = β1 m_t + (1−β1) g_t;  v_{t+1} = β2 v_t + (1−β2) g_t²;
    u = (m_{t+1}/c1)/(√(v_{t+1}/c2) + ε), c_k = 1−β_k^{t+1};  w_{t+1} = w_t − η_t u.
    Tangent: du = dm'/(c1(r+ε)) − u·dv'/(2 c2 r (r+ε)) with r = √(v'/c2) (the second term is 0
    where v' = 0, as the derivative of the safe square root).
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("beta1", "beta2")
    name: ClassVar[str] = "adam"
    kept: ClassVar[tuple[str, ...]] = ("u", "den", "root")  # of Leaves.root_quotient

    def __post_init__(self) -> None:
        super().__post_init__()
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(self, k) < 1:
                raise ValueError(f"Adam: {k} must be in [0, 1), got {getattr(self, k)}")

    def init(self, params: Any) -> dict:
        return {"w": params, "m": tree_zeros_like(params), "v": tree_zeros_like(params)}

    def _parts(self, L, g, t, h, slopes: bool = True, u_out=None):
        r"""m', v', u and (when ``slopes``) ∂u/∂m', ∂u/∂v' elementwise, in the form

            u = m' / D,  D = k·√v' + c1·ε,  k = c1/√c2   (= (m'/c1)/(√(v'/c2) + ε)),
            ∂u/∂m' = 1/D,  ∂u/∂v' = −u·k·ρ/D,  ρ = 1/(2√v') (0 where v' = 0),

        with m', v' written where ``L`` puts the new state's leaves and u into ``u_out``
        (:meth:`Leaves.root_quotient`)."""
        m, v = self._moments(L, g, h)
        k, c1 = self._k(h, t)
        u, den, rho = L.root_quotient(m, v, k, c1 * self.eps, slopes, u_out)
        if not slopes:
            return m, v, u, None, None
        du_dm = [1.0 / dd for dd in den]
        du_dv = [-uu * r * k / dd for uu, r, dd in zip(u, rho, den)]
        return m, v, u, du_dm, du_dv

    @staticmethod
    def _moments(L, g, h) -> tuple[list, list]:
        """(m', v') = (β1 m + (1−β1) g, β2 v + (1−β2) g²), where ``L`` puts the new state's leaves."""
        b1, b2 = h["beta1"], h["beta2"]
        # the same kernels for numbers and (differentiable) tensor hyperparameters: same bits
        m = [torch.lerp(mm, gg, 1 - b1, out=o) for mm, gg, o in zip(L.leaves["m"], g, L.o("m"))]
        if isinstance(b2, torch.Tensor):
            v = [torch.addcmul(vv * b2, (1 - b2) * gg, gg) for vv, gg in zip(L.leaves["v"], g)]
        else:
            v = [torch.mul(vv, b2, out=o).addcmul_(gg, gg, value=1 - b2)
                 for vv, gg, o in zip(L.leaves["v"], g, L.o("v"))]
        return m, v

    @staticmethod
    def _k(h: dict, t: int) -> tuple[Any, Any]:
        """(k = c1/√c2, c1) with c_i = 1 − β_i^{t+1}."""
        c1, c2 = 1 - h["beta1"] ** (t + 1), 1 - h["beta2"] ** (t + 1)
        return c1 / (c2.sqrt() if isinstance(c2, torch.Tensor) else math.sqrt(c2)), c1

    def _update(self, L, g, lr, t, h, ds=None, dg=None, dlr=None, scale=None):
        ds = ds or {}
        b1, b2 = h["beta1"], h["beta2"]
        slopes = dg is not None or ds.get("m") is not None or ds.get("v") is not None
        # the tangent of w is −u alone: u may be formed where it goes (L.do("w"): the seam)
        u_in_z = not slopes and ds.get("w") is None and dlr is not None and _is_one(dlr)
        m, v, u, du_dm, du_dv = self._parts(L, g, t, h, slopes, u_out=L.do("w") if u_in_z else None)
        n = len(m)
        dm = dv = du = [None] * n  # no tangent reaches m', v' or u (the update alone, or B_t)
        if slopes:
            dm = [_add(_mul(b1, _column(ds.get("m"), i)), _mul(1 - b1, _column(dg, i))) for i in range(n)]
            dv = [_add(_mul(b2, _column(ds.get("v"), i)), _mul(2 * (1 - b2) * g[i], _column(dg, i)))
                  for i in range(n)]
            du = [_add(_mul(du_dm[i], dm[i]), _mul(du_dv[i], dv[i])) for i in range(n)]
        new_w, dnew_w = L.descend(lr, u, ds.get("w"), du, dlr, scale)
        return {"w": new_w, "m": m, "v": v}, {"w": dnew_w, "m": [_scale_into(scale, x, o) for x, o in zip(dm, L.do("m"))],
                                              "v": [_scale_into(scale, x, o) for x, o in zip(dv, L.do("v"))]}

    def _hyper_adjoint(self, L, g, lr, t, h, bar, names, kept=None):
        r"""With u = m'/D, D = k r + c1ε, r = √v', k = c1/√c2, c_i' = dc_i/dβ_i = −(t+1)β_i^t and
        b = w̄/D:  ⟨w̄, ∂w'/∂η⟩ = −⟨w̄, u⟩;  ⟨w̄, ∂w'/∂β1⟩ = −η(⟨b, m − g⟩ − (c1'/c1)⟨w̄, u⟩);
        ⟨w̄, ∂w'/∂β2⟩ = η(−½(c2'/c2)(⟨w̄, u⟩ − c1ε⟨b, u⟩) + ½k⟨b·u, (v − g²)/r⟩) (0 where r = 0:
        there v = g = 0). About 18 passes over the model for all three, no autograd."""
        b1, b2 = h["beta1"], h["beta2"]
        if any(n not in ("lr", "beta1", "beta2") for n in names):
            return None
        k, c1 = self._k(h, t)
        c2 = 1 - b2 ** (t + 1)
        if kept is None or any(kept.get(x) is None for x in self.kept):
            m, v = self._moments(L, g, h)  # not left by the update: its intermediates again
            r = [torch.sqrt(vv) for vv in v]
            den = [rr * k + c1 * self.eps for rr in r]
            kept = {"u": [mm / dd for mm, dd in zip(m, den)], "den": den, "root": r}
        u, den, r = kept["u"], kept["den"], kept["root"]
        bar_u = tree_dot(bar, u)
        b = [bb / dd for bb, dd in zip(bar, den)] if ("beta1" in names or "beta2" in names) else None
        out = {}
        for name in names:
            if name == "lr":
                out[name] = -bar_u
            elif name == "beta1":
                dc1 = -(t + 1) * b1 ** t
                out[name] = -lr * (tree_dot(b, L.leaves["m"]) - tree_dot(b, g) - (dc1 / c1) * bar_u)
            else:
                dc2 = -(t + 1) * b2 ** t
                # ⟨b·u, (v − g²)/r⟩ as ⟨b, u·(v − g²)/r⟩: one temporary, written in place
                # 0 where r = 0, also where (1 − β2)·g² underflowed to v' = 0 while g² did not
                ratio_u = [torch.addcmul(vv, gg, gg, value=-1).div_(rr)
                           .nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).mul_(uu)
                           for vv, gg, rr, uu in zip(L.leaves["v"], g, r, u)]
                out[name] = lr * (-0.5 * (dc2 / c2) * (bar_u - c1 * self.eps * tree_dot(b, u))
                                  + 0.5 * k * tree_dot(b, ratio_u))
        return out

    def _adjoint(self, L, g, lr, t, h, bar):
        b1, b2 = h["beta1"], h["beta2"]
        m, v, u, du_dm, du_dv = self._parts(L, g, t, h)
        ubar, lrbar = _step_w_adjoint(bar["w"], lr, u, L.dot)
        n = len(m)
        mbar = [_add(_column(bar["m"], i), _mul(du_dm[i], ubar[i])) for i in range(n)]
        vbar = [_add(_column(bar["v"], i), _mul(du_dv[i], ubar[i])) for i in range(n)]
        gbar = [_add(_mul(1 - b1, mbar[i]), _mul(2 * (1 - b2) * g[i], vbar[i])) for i in range(n)]
        return {"w": bar["w"], "m": [_mul(b1, x) for x in mbar],
                "v": [_mul(b2, x) for x in vbar]}, gbar, lrbar


class _RootScaled(Dynamics):
    r"""Shared form of AdaGrad and RMSProp: a = ρ·a + c·g² (the accumulator, key ``acc``),
    u = g/(√a' + ε), w' = w − η u."""

    acc: ClassVar[str] = "acc"

    def _decay(self, h: dict) -> tuple[Any, Any]:
        """(ρ, c) of a' = ρ a + c g²."""
        raise NotImplementedError

    def _parts(self, L, g, h, slopes: bool = True):
        """ρ, c, a', u and (when ``slopes``) ∂u/∂g, ∂u/∂a' (:meth:`Leaves.root_quotient`)."""
        rho, c = self._decay(h)
        # (AdaGrad: ρ = c = 1, multiplications by one skipped: the same numbers)
        a = [_mul(rho, aa) + _mul(c, gg) * gg for aa, gg in zip(L.leaves[self.acc], g)]
        u, den, slope = L.root_quotient(g, a, 1, self.eps, slopes)
        if not slopes:
            return rho, c, a, u, None, None
        du_dg = [1.0 / dd for dd in den]
        du_da = [-uu * s / dd for uu, s, dd in zip(u, slope, den)]
        return rho, c, a, u, du_dg, du_da

    def _update(self, L, g, lr, t, h, ds=None, dg=None, dlr=None, scale=None):
        ds = ds or {}
        slopes = dg is not None or ds.get(self.acc) is not None
        rho, c, a, u, du_dg, du_da = self._parts(L, g, h, slopes)
        n = len(a)
        da = du = [None] * n  # no tangent reaches a' or u (the update alone, or B_t)
        if slopes:
            da = [_add(_mul(rho, _column(ds.get(self.acc), i)), _mul(2 * c * g[i], _column(dg, i)))
                  for i in range(n)]
            du = [_add(_mul(du_dg[i], _column(dg, i)), _mul(du_da[i], da[i])) for i in range(n)]
        new_w, dnew_w = L.descend(lr, u, ds.get("w"), du, dlr, scale)
        return {"w": new_w, self.acc: a}, {"w": dnew_w, self.acc: [_scale_into(scale, x, o) for x, o
                                                                   in zip(da, L.do(self.acc))]}

    def _adjoint(self, L, g, lr, t, h, bar):
        rho, c, a, u, du_dg, du_da = self._parts(L, g, h)
        ubar, lrbar = _step_w_adjoint(bar["w"], lr, u, L.dot)
        n = len(a)
        abar = [_add(_column(bar[self.acc], i), _mul(du_da[i], ubar[i])) for i in range(n)]
        gbar = [_add(_mul(du_dg[i], ubar[i]), _mul(2 * c * g[i], abar[i])) for i in range(n)]
        return {"w": bar["w"], self.acc: [_mul(rho, x) for x in abar]}, gbar, lrbar


@dataclass(frozen=True)
class AdaGrad(_RootScaled):
    r"""AdaGrad: G_{t+1} = G_t + g_t²;  w_{t+1} = w_t − η_t g_t/(√G_{t+1} + ε)."""

    eps: float = 1e-10
    initial_accumulator_value: float = 0.0
    weight_decay: float = 0.0
    name: ClassVar[str] = "adagrad"
    acc: ClassVar[str] = "G"

    def init(self, params: Any) -> dict:
        return {"w": params, "G": tree_map(lambda p: torch.full_like(p, self.initial_accumulator_value), params)}

    def _decay(self, h):
        return 1.0, 1.0


@dataclass(frozen=True)
class RMSProp(_RootScaled):
    r"""RMSProp: v_{t+1} = α v_t + (1−α) g_t²;  w_{t+1} = w_t − η_t g_t/(√v_{t+1} + ε)."""

    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    hyperparameters: ClassVar[tuple[str, ...]] = ("alpha",)
    name: ClassVar[str] = "rmsprop"
    acc: ClassVar[str] = "v"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha < 1:
            raise ValueError(f"RMSProp: alpha must be in [0, 1), got {self.alpha}")

    def init(self, params: Any) -> dict:
        return {"w": params, "v": tree_zeros_like(params)}

    def _decay(self, h):
        return h["alpha"], 1 - h["alpha"]


def sgd(momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> SGD:
    """Plain SGD, or heavy-ball / Nesterov momentum when ``momentum`` > 0."""
    return SGD(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def momentum(momentum: float = 0.9, weight_decay: float = 0.0) -> SGD:
    return SGD(momentum=momentum, weight_decay=weight_decay)


def nesterov(momentum: float = 0.9, weight_decay: float = 0.0) -> SGD:
    return SGD(momentum=momentum, nesterov=True, weight_decay=weight_decay)


def adam(betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> Adam:
    return Adam(beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay)


def adagrad(eps: float = 1e-10, weight_decay: float = 0.0) -> AdaGrad:
    return AdaGrad(eps=eps, weight_decay=weight_decay)


def rmsprop(alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0) -> RMSProp:
    return RMSProp(alpha=alpha, eps=eps, weight_decay=weight_decay)


NAMES = {"sgd": sgd, "momentum": momentum, "nesterov": nesterov, "adam": adam,
         "adagrad": adagrad, "rmsprop": rmsprop}


def get(optimizer: "str | Dynamics", argname: str = "optimizer") -> Dynamics:
    """Resolve ``"sgd" | "momentum" | "nesterov" | "adam" | "adagrad" | "rmsprop"`` or a Dynamics."""
    if isinstance(optimizer, Dynamics):
        return optimizer
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in NAMES:
            raise ValueError(f"unknown {argname} {optimizer!r}; choose one of {sorted(NAMES)} "
                             "or pass a hgtoolkit.dynamics object")
        return NAMES[key]()
    raise TypeError(f"{argname} must be a name or a hgtoolkit.dynamics.Dynamics, "
                    f"got {type(optimizer).__name__}")


def from_config(config: dict) -> Dynamics:
    """Rebuild a Dynamics from its :meth:`Dynamics.config` dict (as stored in result records)."""
    if not isinstance(config, dict) or "name" not in config:
        raise TypeError(f"config must be a dict from Dynamics.config() with a 'name', got {config!r}")
    base = get(config["name"], argname="config['name']")
    names = {f.name for f in dataclasses.fields(base)}
    return dataclasses.replace(base, **{k: v for k, v in config.items() if k in names})
