"""The :class:`Problem` record and the pieces every problem constructor shares (the minibatch order,
the device check); :mod:`hgtoolkit.problems` holds the constructors and re-exports :class:`Problem`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ._tree import tree_leaves, tree_numel

__all__ = ["Problem", "BatchOrder", "resolve_device"]


@dataclass
class Problem:
    """w_0 = ``params0``; L_t = ``train_loss(w, t)``; E = ``val_loss(w)``.

    ``metrics(w) -> dict`` (optional) adds validation metrics such as accuracy to records;
    ``resample(seed) -> Problem`` (optional) returns the same problem with another minibatch
    order (LRS-OPT in the MARTHE paper draws a new order at every outer iteration);
    ``info`` says where the data came from and is copied into every result.

    Optional, for running many independent copies of a data-driven problem as one vectorised
    computation (:mod:`hgtoolkit.batched`, ``torch.func.vmap`` over runs):
    ``batch(t)`` returns minibatch t's data (a tuple of tensors) and ``batch_loss(w, batch)``
    the loss on given data, with ``train_loss(w, t) == batch_loss(w, batch(t))``; so each run
    can bring its own minibatch while the loss function is shared. ``metric_tensors(w)``
    returns the values of ``metrics(w)`` as 0-d tensors (vmap-able); ``val_batch(t, size)``
    returns validation minibatch t of ``size`` examples (for ``batch_loss``; online runs with
    ``val_batch_size``). All are set by :func:`~hgtoolkit.problems.classification_mlp`, None elsewhere.

    ``val_is_train``: E(w) == L_t(w) for every t (deterministic problems such as the test
    functions); the online engine then takes ∇E(w_t) to be the training gradient it already has.
    ``rowwise``: ``params0`` is one tensor and ``train_loss``/``val_loss`` map a stack W of
    parameter rows (shape ``(R, *params0.shape)``) to the R losses, row r from W[r] alone (the
    analytic test functions); a batch of runs is then differentiated in one autograd call
    instead of a ``vmap``.

    ``buffers0`` (optional): the model's buffers b_0 (a pytree of tensors, e.g. BatchNorm's
    running statistics), part of the training state. A problem with buffers is *stateful*:
    ``train_loss(w, t, b) -> (L_t, b')`` is the forward pass of minibatch t, returning the
    buffers it updated (a differentiable function of w and b), and ``val_loss(w, b)``,
    ``metrics(w, b)`` read them; the exact modes, :func:`hgtoolkit.train` and
    :func:`hgtoolkit.finite_difference` carry b through the trajectory (docs/models.md). Its
    ``batch_loss`` (optional, for batched online runs) is ``batch_loss(w, batch, b) -> (loss,
    b')`` with ``train_loss(w, t, b) == batch_loss(w, batch(t), b)``, and its ``metric_tensors``
    take b too; it has no ``val_batch``.
    :func:`~hgtoolkit.problems.from_module` builds one from a ``torch.nn.Module``. A stateless
    problem whose losses call a BatchNorm module in training mode (``functional_call``) writes its
    running statistics in place, outside the training state: ``train`` and ``finite_difference``
    refuse that with a ValueError, and the exact modes refuse a problem whose validation loss such
    a write changes, or whose training loss draws anew at every call (dropout), after probing it
    once (:func:`hgtoolkit.trajectory.check_pure`; docs/reliability.md); build such a model with
    ``from_module``.

    ``rng_seed(t)`` (optional, with ``batch_loss``): the seed of step t's random draws (a model
    with dropout): ``train_loss(w, t)`` is ``batch_loss(w, batch(t))`` run with torch's default
    generators seeded by ``rng_seed(t)``, a pure function of (seed, t); a batched run seeds them
    so, outside ``vmap``, for the rows that share a seed (docs/models.md).

    A loss may bring its derivatives in closed form: a callable with ``value_and_grad(w)``,
    ``value_grad_hessian(w)`` and ``hvp(hessian, v)`` (:class:`~hgtoolkit.problems.ClosedFormLoss`, what
    :func:`~hgtoolkit.problems.from_function` gives the test functions) is differentiated by those instead of
    autograd wherever the library needs g or H z, for a one-tensor ``params0``.
    """

    params0: Any
    train_loss: Callable[[Any, int], torch.Tensor]
    val_loss: Callable[[Any], torch.Tensor]
    name: str = "problem"
    metrics: Callable[[Any], dict] | None = None
    resample: Callable[[int], "Problem"] | None = None
    info: dict = field(default_factory=dict)
    batch: Callable[[int], Any] | None = None
    batch_loss: Callable[[Any, Any], torch.Tensor] | None = None
    metric_tensors: Callable[[Any], dict] | None = None
    val_batch: Callable[[int, int], Any] | None = None
    val_is_train: bool = False
    rowwise: bool = False
    buffers0: Any = None
    rng_seed: Callable[[int], int] | None = None
    _initial: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not callable(self.train_loss):
            raise TypeError("train_loss must be callable as train_loss(params, t)")
        if not callable(self.val_loss):
            raise TypeError("val_loss must be callable as val_loss(params)")
        if (self.batch is None) != (self.batch_loss is None):
            raise TypeError("batch and batch_loss go together: give both (train_loss(w, t) == "
                            "batch_loss(w, batch(t))) or neither")
        if self.rng_seed is not None and self.batch_loss is None:
            raise TypeError("rng_seed goes with batch/batch_loss: train_loss(w, t) == batch_loss(w, "
                            "batch(t)) with torch's generators seeded by rng_seed(t)")
        for name in ("batch", "batch_loss", "metric_tensors", "val_batch", "rng_seed"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable or None")
        leaves = tree_leaves(self.params0)
        if not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
            raise TypeError("params0 must be a tensor or a pytree (dict/list/tuple) of tensors")
        if not all(x.is_floating_point() for x in leaves):
            raise TypeError("params0 must hold floating-point tensors")
        devices = {x.device for x in leaves}
        dtypes = {x.dtype for x in leaves}
        if len(devices) > 1 or len(dtypes) > 1:
            raise ValueError(f"params0 leaves must share one device and dtype, got {devices}, {dtypes}")
        self.params0 = torch.utils._pytree.tree_map(lambda x: x.detach(), self.params0)
        if self.buffers0 is not None:
            bufs = tree_leaves(self.buffers0)
            if not bufs or not all(isinstance(x, torch.Tensor) for x in bufs):
                raise TypeError("buffers0 must be None or a non-empty pytree (dict/list/tuple) of tensors")
            if {x.device for x in bufs} != devices:
                raise ValueError(f"buffers0 must be on the parameters' device {devices.pop()}")
            if any(x.is_floating_point() and x.dtype not in dtypes for x in bufs):
                raise ValueError(f"buffers0's floating-point tensors must have the parameters' dtype {dtypes.pop()}")
            if self.rowwise or self.val_is_train or self.val_batch is not None:
                raise ValueError("a stateful problem (buffers0 set) cannot be rowwise, val_is_train "
                                 "or carry val_batch: those take no buffers")
            self.buffers0 = torch.utils._pytree.tree_map(lambda x: x.detach(), self.buffers0)

    @property
    def stateful(self) -> bool:
        """True when the problem carries buffers (``buffers0``): see the class docstring."""
        return self.buffers0 is not None
    @property
    def device(self) -> torch.device:
        return tree_leaves(self.params0)[0].device

    @property
    def dtype(self) -> torch.dtype:
        return tree_leaves(self.params0)[0].dtype

    @property
    def num_params(self) -> int:
        return tree_numel(self.params0)

    def initial_metrics(self) -> dict:
        """``metrics(params0)`` (with ``val_loss`` = E(w_0) added when the metrics lack it),
        computed once: every run of a grid starts from w_0, and E(w_0) on the whole validation
        set costs a few gradients. Recomputed if ``params0`` is changed in place."""
        leaves = tree_leaves(self.params0) + (tree_leaves(self.buffers0) if self.stateful else [])
        key = tuple((id(x), x._version) for x in leaves)
        if self._initial.get("key") != key:
            args = (self.params0, self.buffers0) if self.stateful else (self.params0,)
            out = dict(self.metrics(*args)) if self.metrics is not None else {}
            if "val_loss" not in out:
                with torch.no_grad():
                    out["val_loss"] = float(self.val_loss(*args))
            self._initial.clear()
            self._initial.update(key=key, metrics=out)
        return dict(self._initial["metrics"])

    def describe(self) -> dict:
        """JSON-serialisable summary for result records."""
        return {"name": self.name, "num_params": self.num_params, "dtype": str(self.dtype),
                "device": str(self.device), **self.info}


def resolve_device(device: Any) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    return device


class BatchOrder:
    """Minibatch t = slice t mod (n/B) of epoch ⌊t/(n/B)⌋'s permutation, fixed by ``seed``."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.per_epoch = max(n // batch_size, 1)
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, t: int) -> torch.Tensor:
        # Cached as numpy: a tensor first created inside a torch.func transform must not escape it.
        epoch, k = divmod(int(t), self.per_epoch)
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return torch.as_tensor(perm[k * self.batch_size:(k + 1) * self.batch_size], device=self.device)
