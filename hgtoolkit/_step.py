"""One step of the exact reverse pass: step t's gradient with its graph kept, and the memory it
holds (shared by :mod:`hgtoolkit.exact` and :mod:`hgtoolkit.reversible`)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import checkpointing as _ckpt
from ._tree import tree_map
from .trajectory import (BUFFERS, autograd_gradient, closed_form, float_leaves, initial_state, opt_part, scalar_loss,
                         stateful_loss, with_buffers)

__all__ = ["Step", "add_w", "objective", "probe", "BUFFERS", "initial_state", "opt_part", "with_buffers",
           "float_leaves"]

class Step:
    """Step t's gradient g_t = ∇L_t(w_t) built with plain autograd, its graph kept (or not).

    ``hvp(v)`` = H_t v = ∇_w⟨g_t, v⟩, a backward through the kept graph (``retain`` keeps it
    for another product). ``grad`` is g_t detached, as the pytree the dynamics take. A loss
    with closed-form derivatives (:func:`hgtoolkit.trajectory.closed_form`) keeps
    the Hessian ∇²L_t(w_t) instead of a graph and gives g_t and H_t v by its formulas.

    A stateful problem (``problem.buffers0`` set): (L_t, b_{t+1}) = ``train_loss(w_t, t, b_t)``;
    ``buffers`` is b_{t+1} detached, ``state`` the optimizer's part of s_t, and the graph is
    that of (g_t, b_{t+1}) over (w_t, b_t): :meth:`pullback` and :meth:`pushforward` are its
    vjp and jvp (``hvp`` is for stateless problems). With ``loss_b`` (stateful problems)
    ``loss_b`` is also ∂L_t/∂b_t over the float leaves of b (the same backward pass; else None):
    the training objective's share through the buffers.
    """

    __slots__ = ("state", "loss", "grad", "buffers", "loss_b", "_w", "_g", "_spec", "_nw")

    def __init__(self, problem, dyn, state: dict, t: int, graph: bool, loss_b: bool = False):
        self.buffers = self.loss_b = None
        if BUFFERS in state:
            self._stateful(problem, dyn, state, t, graph, loss_b)
            return
        w = dyn.params(state)
        fn = closed_form(problem.train_loss, w)
        if fn is not None:  # _w holds the Hessian (when an HVP will be asked for)
            if graph:
                self.loss, self.grad, hessian = fn.value_grad_hessian(w.detach())
                self._w, self._g = hessian, fn
            else:
                (self.loss, self.grad), self._w, self._g = fn.value_and_grad(w.detach()), None, None
            self.state, self._spec = state, None
            return
        leaves, spec = tree_flatten(w)
        with torch.enable_grad():
            w = [x.detach().requires_grad_(True) for x in leaves]
            loss = scalar_loss(problem.train_loss, "train_loss")(tree_unflatten(w, spec), t)
            g = torch.autograd.grad(loss, w, create_graph=graph, allow_unused=True,
                                    materialize_grads=True)
        self.state, self.loss, self._spec = state, loss.detach(), spec
        self.grad = tree_unflatten([x.detach() for x in g], spec)
        self._w, self._g = (w, g) if graph else (None, None)

    def _stateful(self, problem, dyn, state: dict, t: int, graph: bool, loss_b: bool) -> None:
        w, spec = tree_flatten(dyn.params(state))
        b, bspec, fl = float_leaves(state[BUFFERS])
        with torch.enable_grad():
            w = [x.detach().requires_grad_(True) for x in w]
            b = [x.detach().requires_grad_(graph or loss_b) if i in fl else x for i, x in enumerate(b)]
            loss, new = stateful_loss(problem.train_loss)(tree_unflatten(w, spec), t, tree_unflatten(b, bspec))
            outs = torch.autograd.grad(loss, w + ([b[i] for i in fl] if loss_b else []), create_graph=graph,
                                       allow_unused=True, materialize_grads=True)
        g = outs[:len(w)]
        if loss_b:
            self.loss_b = [x.detach() for x in outs[len(w):]]
        new = tree_flatten(new)[0]
        self.state, self.loss, self._spec, self._nw = opt_part(state), loss.detach(), spec, len(w)
        self.grad = tree_unflatten([x.detach() for x in g], spec)
        self.buffers = tree_unflatten([x.detach() for x in new], bspec)
        self._w = self._g = None
        if graph:  # inputs (w, float b) and outputs (g, float b')
            self._w = w + [b[i] for i in fl]
            self._g = list(g) + [new[i] for i in fl]

    def pullback(self, gbar: Any, bbar: list | None, retain: bool = False) -> tuple[Any, list]:
        r"""(w̄, b̄) = the vjp of (g_t, b_{t+1}) at (ḡ, b̄_{t+1}): H_t ḡ + (∂b'/∂w)ᵀb̄' and
        (∂g/∂b)ᵀḡ + (∂b'/∂b)ᵀb̄' (b̄ lists over the float leaves; None: zero)."""
        cots = tree_flatten(gbar)[0] + (list(bbar) if bbar is not None else [None] * (len(self._g) - self._nw))
        out = self._product(cots, retain)
        return tree_unflatten(out[:self._nw], self._spec), out[self._nw:]

    def pushforward(self, z_w: Any, z_b: list | None, retain: bool = False) -> tuple[Any, list]:
        r"""(dg, db') = the jvp of (g_t, b_{t+1}) along (z_w, z_b): H_t z_w + (∂g/∂b) z_b and
        (∂b'/∂w) z_w + (∂b'/∂b) z_b, as the vjp of the vjp (the kept graph, twice backwards)."""
        tans = tree_flatten(z_w)[0] if z_w is not None else [None] * self._nw
        tans = tans + (list(z_b) if z_b is not None else [None] * (len(self._w) - self._nw))
        live = [i for i, g in enumerate(self._g) if g.requires_grad]
        with torch.enable_grad():
            u = [torch.zeros_like(self._g[i]).requires_grad_(True) for i in live]
            vj = torch.autograd.grad([self._g[i] for i in live], self._w, u, create_graph=True,
                                     allow_unused=True, materialize_grads=True)
            pairs = [(v, z) for v, z in zip(vj, tans) if z is not None and v.requires_grad]
            jz = torch.autograd.grad([v for v, _ in pairs], u, [z for _, z in pairs], retain_graph=retain,
                                     allow_unused=True, materialize_grads=True) if pairs else [None] * len(u)
        out = [torch.zeros_like(g) for g in self._g]
        for i, x in zip(live, jz):
            if x is not None:
                out[i] = x
        if not retain:
            self._w = self._g = None
        return tree_unflatten(out[:self._nw], self._spec), out[self._nw:]

    def _product(self, cots: list, retain: bool) -> list:
        """The backward of the kept outputs with cotangents ``cots`` (None: zero) to the inputs;
        an output that does not require grad (a loss linear in some leaves has a constant
        gradient there: H = 0) contributes nothing."""
        live = [i for i, (g, c) in enumerate(zip(self._g, cots)) if g.requires_grad and c is not None]
        if live:
            out = torch.autograd.grad([self._g[i] for i in live], self._w, [cots[i] for i in live],
                                      retain_graph=retain, allow_unused=True, materialize_grads=True)
        else:
            out = [torch.zeros_like(x) for x in self._w]
        if not retain:
            self._w = self._g = None
        return list(out)

    def advance(self, dyn, lr: torch.Tensor, t: int) -> dict:
        """s_{t+1} = D(s_t, g_t, η_t) (no graph), b_{t+1} carried for a stateful problem."""
        with torch.no_grad():
            return with_buffers(dyn.step(self.state, self.grad, lr, t), self.buffers)

    def hvp(self, v: Any, retain: bool = False) -> Any:
        """H_t v for a parameter-shaped ``v`` (None: zero)."""
        if v is None:
            return None
        if self._spec is None:  # closed form: H_t v from the Hessian kept
            out = self._g.hvp(self._w, v)
            if not retain:
                self._w = self._g = None
            return out
        return tree_unflatten(self._product(tree_flatten(v)[0], retain), self._spec)


def add_w(state_tree: dict, hv: Any) -> dict:
    """``state_tree`` with hv added to its "w" entry."""
    if hv is None:
        return state_tree
    out = dict(state_tree)
    w = state_tree["w"]
    # one tensor (a test function's rows, a one-tensor model): no pytree walk per reverse step
    out["w"] = torch.add(w, hv) if type(w) is torch.Tensor and type(hv) is torch.Tensor else tree_map(torch.add, w, hv)
    return out


def objective(problem, dyn, state):
    """(∇_s E(params(s)) as a state-shaped cotangent with only "w", E): λ_T and the value; for
    a stateful problem E = ``val_loss(w, b)`` and λ_T also holds ∇_b E (float leaves)."""
    if BUFFERS not in state:
        g, value = autograd_gradient(scalar_loss(problem.val_loss, "val_loss"), dyn.params(state))
        return {"w": g}, value
    w, spec = tree_flatten(dyn.params(state))
    b, bspec, fl = float_leaves(state[BUFFERS])
    with torch.enable_grad():
        w = [x.detach().requires_grad_(True) for x in w]
        b = [x.detach().requires_grad_(True) if i in fl else x for i, x in enumerate(b)]
        value = scalar_loss(problem.val_loss, "val_loss")(tree_unflatten(w, spec), tree_unflatten(b, bspec))
        gs = torch.autograd.grad(value, w + [b[i] for i in fl], allow_unused=True, materialize_grads=True)
    return {"w": tree_unflatten(list(gs[:len(w)]), spec), BUFFERS: list(gs[len(w):])}, value.detach()


def state_bytes(state: dict) -> int:
    return sum(x.numel() * x.element_size() for x in tree_flatten(state)[0] if isinstance(x, torch.Tensor))


def probe(problem, dyn, s0: dict) -> tuple["Step", _ckpt.Footprint]:
    """Step 0 with its graph, and the :class:`~hgtoolkit.checkpointing.Footprint` measured on
    it: the bytes of the tensors autograd saves for the double backward (each storage once,
    the state's own excluded) plus g_t; a closed-form loss keeps its Hessian instead."""
    own = {x.untyped_storage().data_ptr() for x in tree_flatten(s0)[0] if isinstance(x, torch.Tensor)}
    seen: dict[int, int] = {}

    def pack(x):
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage()
            if st.data_ptr() not in own:
                seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        step = Step(problem, dyn, s0, 0, graph=True)
    if step._spec is None:  # closed form: the Hessian
        graph = 0 if step._w is None else step._w.numel() * step._w.element_size()
    else:
        graph = sum(seen.values()) + sum(g.numel() * g.element_size() for g in step._g)
    return step, _ckpt.Footprint(state_bytes(s0), graph)
