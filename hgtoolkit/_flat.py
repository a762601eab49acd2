"""The drop-ins' flat-buffer fast path: one param group of many parameter tensors as one leaf.

The reference step (:meth:`hgtoolkit.optim.OnlineOptimizer._group_step`) runs the online engine
on per-parameter leaf lists. With many small tensors (a deep MLP has two per layer) its cost is
the number of tensors: every dot h = v·z is a sum of per-tensor dots, every tensor-list kernel a
loop over the tensors. :class:`FlatGroup` runs the very same engine functions on **one flat
leaf per state key**: the group's moments, tangents and g_{t−1} live in flat buffers, and each
parameter's ``optimizer.state[p][key]`` is a view into them (so ``state_dict``,
``load_state_dict`` and the reference path see ordinary per-parameter tensors); w, g and H z
are gathered into flat buffers (one tensor-list copy each) and w is written back after the
update. The step reads the buffers, never the views, so views replaced from outside (a loaded
state dict) are adopted (copied in) at the next step.

What it computes: elementwise the same kernels on the concatenation as the reference on its
pieces, so w, the moments and z come out bit for bit the same for the same η, μ, β; the dots
(h_t, and ∇L_t·∇L_{t−1} of the μ rule) are one dot over the concatenation instead of a sum of
per-tensor dots: the sum reassociated (≤ 1e-12 relative in float64, tested in
tests/test_dropin_flat.py). Measurements: docs/dropins.md.
"""
from __future__ import annotations

import torch

__all__ = ["FlatGroup", "pays"]

MIN_TENSORS = 16  # below this the per-tensor loops cost less than the gathers
MAX_MEAN_NUMEL = 1 << 16  # above this the gathers' memory passes cost more than the loops


def pays(params: list) -> bool:
    """The fast path is worth its gathers (many small tensors) and applies (one dtype and device,
    dense tensors)."""
    if len(params) < MIN_TENSORS:
        return False
    p0 = params[0]
    if any(p.dtype != p0.dtype or p.device != p0.device or p.layout != torch.strided for p in params):
        return False
    return sum(p.numel() for p in params) <= MAX_MEAN_NUMEL * len(params)


class FlatGroup:
    """Flat buffers for ``params`` (in this order): ``buffer(key)`` is one 1-D tensor holding every
    parameter's ``key`` entry, ``views[key][i]`` parameter i's piece of it, shaped like it. Keys
    of the optimizer state ("m", "v", "z_w", …) and of the step's inputs, which the caller names
    apart from them ("in:w", "in:g", …)."""

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
