"""Small pytree helpers over ``torch.utils._pytree`` (states are dicts of tensors or pytrees)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = [
    "tree_map", "tree_flatten", "tree_unflatten", "flatten", "unflatten", "flatten_fast", "unflatten_fast", "tree_leaves", "tree_dot", "tree_axpy",
    "tree_scale", "tree_zeros_like", "tree_all_finite", "tree_detach", "tree_clone",
    "tree_numel", "tree_to",
]


def flatten(tree: Any) -> tuple[list, Any]:
    """(leaves, spec) like ``tree_flatten``, without the pytree machinery for the two shapes a
    step sees thousands of times (a tensor, a list or a dict of tensors); ``unflatten`` inverts it."""
    t = type(tree)
    if t is torch.Tensor or t is torch.nn.Parameter:
        return [tree], torch.Tensor
    if t is list and all(isinstance(x, torch.Tensor) for x in tree):
        return tree, list
    if t is dict and all(isinstance(x, torch.Tensor) for x in tree.values()):
        return list(tree.values()), tuple(tree)
    return tree_flatten(tree)


def unflatten(leaves: list, spec: Any) -> Any:
    """The tree of ``leaves`` with the structure ``spec`` from :func:`flatten`."""
    if spec is torch.Tensor:
        return leaves[0]
    if spec is list:
        return list(leaves)
    if type(spec) is tuple:
        return dict(zip(spec, leaves))
    return tree_unflatten(leaves, spec)


def flatten_fast(tree: Any) -> tuple[list, Any]:
    """(leaves, structure) of a nest of dicts, lists, tuples and NamedTuples of tensors (None
    and other non-containers are leaves too): the same leaves and order as ``tree_flatten``
    without its registry lookups, for the large state a batched step passes through ``vmap``
    at every step. :func:`unflatten_fast` inverts it."""
    out: list = []
    return out, _flat_into(tree, out)


def _flat_into(x: Any, out: list) -> Any:
    t = type(x)
    if t is dict:
        return (dict, tuple(x), tuple(_flat_into(v, out) for v in x.values()))
    if t is list or t is tuple or (isinstance(x, tuple) and hasattr(t, "_fields")):
        return (t, None, tuple(_flat_into(v, out) for v in x))
    out.append(x)
    return None


def unflatten_fast(leaves: Any, structure: Any) -> Any:
    """The nest of :func:`flatten_fast`'s ``structure`` with ``leaves`` (a sequence) in it."""
    return _unflat(iter(leaves), structure)


def _unflat(it, st):
    if st is None:
        return next(it)
    t, keys, children = st
    vals = [_unflat(it, c) for c in children]
    if t is dict:
        return dict(zip(keys, vals))
    if t is list:
        return vals
    return t(*vals) if t is not tuple else tuple(vals)


def tree_leaves(tree: Any) -> list[torch.Tensor]:
    return flatten(tree)[0]


def tree_dot(a: Any, b: Any) -> torch.Tensor:
    """Σ_leaves ⟨a, b⟩ as a 0-d tensor (works under vmap/jvp)."""
    la, lb = tree_leaves(a), tree_leaves(b)
    if len(la) != len(lb):
        raise ValueError("tree_dot: trees have different structures")
    if len(la) == 1:
        return _vdot(la[0], lb[0])
    return torch.stack([_vdot(x, y) for x, y in zip(la, lb)]).sum()  # one sum, not a chain of adds


def _vdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ without a temporary (a BLAS dot); elementwise product and sum where dot does not apply."""
    if x.dtype == y.dtype and not x.is_complex():
        if x.dim() == 1 and y.dim() == 1:
            return torch.dot(x, y)
        return torch.dot(x.reshape(-1), y.reshape(-1))
    return (x * y).sum()


def tree_axpy(alpha: Any, x: Any, y: Any) -> Any:
    """alpha·x + y leaf-wise."""
    return tree_map(lambda u, v: alpha * u + v, x, y)


def tree_scale(alpha: Any, x: Any) -> Any:
    return tree_map(lambda u: alpha * u, x)


def tree_zeros_like(x: Any) -> Any:
    return tree_map(torch.zeros_like, x)


def tree_detach(x: Any) -> Any:
    return tree_map(lambda u: u.detach(), x)


def tree_clone(x: Any) -> Any:
    return tree_map(lambda u: u.detach().clone(), x)


def tree_to(x: Any, device=None, dtype=None) -> Any:
    return tree_map(lambda u: u.to(device=device, dtype=dtype if u.is_floating_point() else None), x)


def tree_numel(x: Any) -> int:
    return sum(u.numel() for u in tree_leaves(x))


def tree_all_finite(x: Any) -> bool:
    """True when every entry of every leaf is finite (one device sync)."""
    leaves = tree_leaves(x)
    if not leaves:
        return True
    flags = torch.stack([torch.isfinite(u).all() for u in leaves])
    return bool(flags.all())


