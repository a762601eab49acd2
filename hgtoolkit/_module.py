r"""A :class:`~hgtoolkit.problems.Problem` from any ``torch.nn.Module``: :func:`from_module`.

The module is a template for ``torch.func.functional_call`` (a private copy on the meta device;
the user's module is never touched). What the forward pass of minibatch t changes is part of
the training state s_t = (w_t, b_t):

- **buffers**: BatchNorm's running statistics b are computed out of place by
  :class:`FunctionalBatchNorm` (torch's own kernel updates them in place, outside autograd), so
  (L_t, b_{t+1}) = ``train_loss(w_t, t, b_t)`` with b_{t+1} a differentiable function of
  (w_t, b_t). Any other buffer written in a forward pass is refused up front.
- **randomness**: every torch random draw of the forward pass of step t (dropout, …) comes from
  the generator seeded by (seed, t) and the caller's RNG state is restored afterwards, so every
  replay of step t draws the same masks; ``nn.Dropout`` runs as :class:`FunctionalDropout`
  (its mask by ``bernoulli_``: the same draw in and outside ``vmap``, on every device), and
  ``rng_seed(t)`` lets a batched run seed the rows of each seed outside ``vmap``.

The semantics are written out in docs/models.md.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ._problem import BatchOrder, Problem, resolve_device

__all__ = ["from_module", "FunctionalBatchNorm", "FunctionalDropout"]

#: where FunctionalBatchNorm leaves the running statistics it computed (the innermost dict)
_COLLECT: list[dict] = []

_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,), nn.SyncBatchNorm: None}


class FunctionalBatchNorm(nn.Module):
    r"""torch's BatchNorm{1,2,3}d with the running statistics updated out of place.

    Training mode: y = (x − μ_B)/√(σ²_B + ε)·γ + β with the batch mean μ_B and biased variance
    σ²_B over every dimension but 1; with ``track_running_stats``, n_{t+1} = n_t + 1 and
    r_μ' = (1 − m) r_μ + m μ_B, r_σ' = (1 − m) r_σ + m σ²_B·N/(N − 1) (the unbiased variance,
    N values per channel), m = ``momentum`` or 1/n_{t+1} for ``momentum=None`` (the cumulative
    average). The new statistics are handed to :func:`from_module`'s ``train_loss`` (never
    written into a tensor). Eval mode with running statistics: y = (x − r_μ)/√(r_σ + ε)·γ + β,
    differentiable in r_μ and r_σ (γ, β: the layer's weight and bias). Same parameter and
    buffer names as the layer it replaces."""

    def __init__(self, bn: nn.Module, prefix: str):
        super().__init__()
        self.kind, self._dims, self.prefix = type(bn).__name__, _DIMS.get(type(bn)), prefix
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))
        self.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dims is not None and x.dim() not in self._dims:
            raise ValueError(f"{self.kind} layer {self.prefix[:-1] or '(root)'}: expected a "
                             f"{' or '.join(f'{d}D' for d in self._dims)} input, got {x.dim()}D")
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training or self.running_mean is None:
            mean = x.mean(dims)
            xc = x - mean.reshape(shape)
            ss = (xc * xc).sum(dims)
            n = x.numel() // x.shape[1]
            out = xc * torch.rsqrt(ss / n + self.eps).reshape(shape)
            if self.training and self.running_mean is not None:
                count = self.num_batches_tracked + 1
                m = 1.0 / count.to(x.dtype) if self.momentum is None else self.momentum
                new = {"running_mean": (1 - m) * self.running_mean + m * mean,
                       "running_var": (1 - m) * self.running_var + m * (ss / max(n - 1, 1)),
                       "num_batches_tracked": count}
                if _COLLECT:
                    _COLLECT[-1].update({self.prefix + k: v for k, v in new.items()})
        else:
            out = (x - self.running_mean.reshape(shape)) * torch.rsqrt(self.running_var + self.eps).reshape(shape)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


class FunctionalDropout(nn.Module):
    r"""``nn.Dropout`` with its mask drawn by ``bernoulli_`` on every device.

    Training mode: y = x ⊙ m/(1 − p), m_i ~ Bernoulli(1 − p) drawn as
    ``empty_like(x).bernoulli_(1 − p)``; y = x in eval mode or for p = 0 (no draw), 0·x for
    p = 1. That is torch's own dropout on the CPU, number for number; on CUDA torch's layer is a
    fused kernel whose draw ``vmap`` (``randomness="same"``) makes differently, while this one
    draws the same mask in and outside ``vmap``, so batched runs see the single run's masks
    there too (docs/models.md)."""

    def __init__(self, layer: nn.Dropout):
        super().__init__()
        self.p = layer.p
        self.train(layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.numel() == 0:
            return x
        if self.p == 1:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        return x * torch.empty_like(x).bernoulli_(1 - self.p).div_(1 - self.p)


def _functional_copy(model: nn.Module, device: torch.device) -> tuple[nn.Module, list[str]]:
    """A deep copy of ``model`` on ``device`` with every BatchNorm layer replaced by a
    :class:`FunctionalBatchNorm` and every ``nn.Dropout`` by a :class:`FunctionalDropout`, and
    the names of the buffers the BatchNorm layers update."""
    twin = copy.deepcopy(model).to(device)
    stateful: list[str] = []
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
            raise ValueError(f"from_module: layer {name or '(root)'!r} ({type(mod).__name__}) is "
                             "lazy and not initialised yet; run one forward pass of the model first")
        if type(mod) is nn.Dropout:
            new = FunctionalDropout(mod)
        elif type(mod) in _DIMS:
            prefix = f"{name}." if name else ""
            new = FunctionalBatchNorm(mod, prefix)
            if mod.track_running_stats:
                stateful += [prefix + k for k in ("running_mean", "running_var", "num_batches_tracked")]
        else:
            continue
        if not name:
            twin = new
        else:
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, new)
    return twin, stateful


def _rng_states(device: torch.device) -> list:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """torch's default generators (CPU, and ``device``'s) seeded by ``seed`` inside, the
    caller's states restored after; nothing for None. What a :class:`~hgtoolkit.problems.Problem`
    with ``rng_seed`` runs its ``batch_loss`` under (``rng_seed(t)``: the draws of step t)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _step_seed(seed: int, t: int) -> int:
    """The generator seed of step t (t = −1: the validation pass), a pure function of (seed, t)."""
    words = [seed, 1, t] if t >= 0 else [seed, 2]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _vmap_draws_differ() -> bool:
    """Inside a ``vmap`` whose rows would not all draw the same numbers (``randomness`` other
    than "same", at any level)?"""
    C = torch._C._functorch
    return any(i.key() == C.TransformType.Vmap and C.CVmapInterpreterPtr(i).randomness() != C.RandomnessType.Same
               for i in C.get_interpreter_stack() or [])


def _inspect(twin: nn.Module, sample: tuple, device: torch.device) -> bool:
    """Run the copy once in training and in eval mode on ``sample``: ValueError naming the layer
    and the buffer if a forward pass writes a buffer (in place or by assignment); returns whether
    it draws random numbers."""
    random = False
    for training in (True, False):
        twin.train(training)
        before = {k: (b, b._version) for k, b in twin.named_buffers()}
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            rng = _rng_states(device)
            _COLLECT.append({})
            try:
                twin(*sample)
            finally:
                _COLLECT.pop()
            random = random or not all(torch.equal(a, b) for a, b in zip(rng, _rng_states(device)))
        after = dict(twin.named_buffers())
        for k in sorted(set(before) | set(after)):
            if k in before and k in after and after[k] is before[k][0] and after[k]._version == before[k][1]:
                continue
            layer, _, buf = k.rpartition(".")
            kind = type(twin.get_submodule(layer)).__name__
            raise ValueError(
                f"from_module: layer {layer or '(root)'!r} ({kind}) writes its buffer {buf!r} in its "
                f"forward pass ({'training' if training else 'eval'} mode); only the BatchNorm family's "
                "running statistics are carried as training state. Make the buffer a constant, or "
                "build the Problem yourself with buffers0 and train_loss(w, t, buffers) -> (loss, "
                "new_buffers)")
    return random


def _as_data(data: Any, argname: str, dtype: torch.dtype, device: torch.device) -> tuple:
    """``data`` as a tuple (inputs…, target) of tensors with one row per example: given as
    tensors, or as a map-style dataset (``len`` and ``[i]``, collated)."""
    if isinstance(data, (tuple, list)) and data and all(isinstance(x, torch.Tensor) for x in data):
        out = tuple(data)
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (torch.Tensor, str)):
        if len(data) == 0:
            raise ValueError(f"{argname} is an empty dataset")
        out = torch.utils.data.default_collate([data[i] for i in range(len(data))])
        out = tuple(out) if isinstance(out, (tuple, list)) else None
        if out is None or not all(isinstance(x, torch.Tensor) for x in out):
            raise TypeError(f"{argname}: a dataset's items must be tuples (inputs…, target) of tensors")
    else:
        raise TypeError(f"{argname} must be a tuple (inputs…, target) of tensors or a map-style "
                        f"dataset, got {type(data).__name__}")
    if len(out) < 2:
        raise ValueError(f"{argname} must hold inputs and a target: (x, y), got {len(out)} tensor(s)")
    n = len(out[0])
    if any(x.dim() == 0 or len(x) != n for x in out):
        raise ValueError(f"{argname}: every tensor must have the same number of examples (dim 0), got "
                         f"{[tuple(x.shape) for x in out]}")
    return tuple(x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device) for x in out)


def from_module(model: nn.Module, loss_fn: Callable, train_data: Any, val_data: Any, *,
                batch_size: int, seed: int = 0, val_mode: str = "eval", device: Any = None,
                metrics: Callable | None = None, differentiate_buffers: bool = True,
                name: str = "module", info: dict | None = None):
    r"""A :class:`~hgtoolkit.problems.Problem` from ``model`` (any ``torch.nn.Module``).

    w_0 = the module's parameters; L_t(w) = ``loss_fn(model(*x_t), y_t)`` on minibatch t
    (``batch_size`` examples of ``train_data``, the order shuffled by ``seed``, a new
    permutation every epoch); E(w) = ``loss_fn`` on the whole ``val_data`` with the model in
    ``val_mode`` (``"eval"``: running statistics, no dropout; ``"train"``). Data: a tuple
    (inputs…, target) of tensors, or a map-style dataset (collated once). ``metrics(output,
    target) -> dict`` of 0-d tensors adds validation metrics (``val_loss`` is always there).

    State: a module with BatchNorm layers that track running statistics gives a *stateful*
    problem (``buffers0`` = the running statistics; (L_t, b_{t+1}) = ``train_loss(w, t, b_t)``,
    E = ``val_loss(w, b)``): the statistics are part of the training state, differentiated
    (``differentiate_buffers=False`` detaches them, for comparison) and identical in every
    mode. Other buffers must be constants (one written in a forward pass is refused). Random
    draws in the forward pass (dropout) are a pure function of (seed, t). A module without
    running statistics and randomness gives a plain problem with ``batch``/``batch_loss``/
    ``val_batch`` (batched runs); a stateful one has ``batch`` and ``batch_loss(w, x, b) ->
    (loss, b')`` (batched runs carry b per row); a model that draws has ``rng_seed(t)`` too
    (its ``batch_loss`` run under ``seeded(rng_seed(t))`` is ``train_loss``) and no
    ``val_batch``. The module itself is never modified
    (docs/models.md)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable as loss_fn(output, target) -> scalar tensor")
    if metrics is not None and not callable(metrics):
        raise TypeError("metrics must be None or callable as metrics(output, target) -> dict of 0-d tensors")
    if val_mode not in ("eval", "train"):
        raise ValueError(f"val_mode must be 'eval' or 'train', got {val_mode!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int ≥ 0, got {seed!r}")
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("model has no parameters: nothing to train")
    first = next(iter(named.values()))
    device = first.device if device is None else resolve_device(device)
    dtype = first.dtype
    train_data = _as_data(train_data, "train_data", dtype, device)
    val_data = _as_data(val_data, "val_data", dtype, device)
    n_train = len(train_data[0])
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or not 1 <= batch_size <= n_train:
        raise ValueError(f"batch_size must be an int in [1, {n_train}], got {batch_size!r}")

    twin, state_names = _functional_copy(model, device)
    params0 = {k: v.detach().clone().to(device) for k, v in named.items()}
    twin_buffers = dict(twin.named_buffers())
    buffers0 = {k: twin_buffers[k].detach().clone() for k in state_names} or None
    consts = {k: v.detach() for k, v in twin_buffers.items() if k not in state_names}
    first_batch = BatchOrder(n_train, batch_size, int(seed), device)(0)
    random = _inspect(twin, tuple(x[first_batch] for x in train_data[:-1]), device)
    train_t = twin.to("meta").train()
    eval_t = copy.deepcopy(train_t).train(val_mode == "train")

    def call(template, params, buffers, xs):
        if not consts and buffers is None:
            return functional_call(template, params, xs)
        return functional_call(template, tuple(d for d in (params, consts, buffers) if d), xs)

    missing = object()

    def refuse(what):
        raise ValueError(
            f"problem {name!r} is stateful (running statistics {sorted(buffers0)[:3]}…): {what} needs "
            "the buffers, and this caller passes none. hgtoolkit.hypergradient (every mode but "
            "'reversible'), directional_derivative, finite_difference, train, optimize_schedule, "
            "online.run and towers.run carry them (docs/models.md)")

    def val_forward(params, buffers):
        with seeded(_step_seed(seed, -1) if random and val_mode == "train" else None, device):
            return call(eval_t, params, buffers, val_data[:-1])

    def val_loss(params, buffers=missing):
        if buffers is missing and buffers0 is not None:
            refuse("val_loss(w)")
        return loss_fn(val_forward(params, None if buffers is missing else buffers), val_data[-1])

    def metric_tensors(params, buffers=missing):
        if buffers is missing and buffers0 is not None:
            refuse("metrics(w)")
        with torch.no_grad():
            out = val_forward(params, None if buffers is missing else buffers)
            return {"val_loss": loss_fn(out, val_data[-1]), **(metrics(out, val_data[-1]) if metrics else {})}

    def metric_values(*args) -> dict:
        return {k: float(v) for k, v in metric_tensors(*args).items()}

    def batch_loss(params, batch):
        return loss_fn(call(train_t, params, None, batch[:-1]), batch[-1])

    def stateful_batch_loss(params, batch, buffers):
        """(loss, b'): the forward pass on ``batch`` from the buffers b, in training mode."""
        new: dict = {}
        _COLLECT.append(new)
        try:
            out = call(train_t, params, buffers, batch[:-1])
        finally:
            _COLLECT.pop()
        if not differentiate_buffers:
            new = {k: v.detach() for k, v in new.items()}
        return loss_fn(out, batch[-1]), {k: new.get(k, v) for k, v in buffers.items()}

    def make(bseed: int):
        order = BatchOrder(n_train, batch_size, bseed, device)
        val_orders: dict[int, BatchOrder] = {}
        n_val = len(val_data[0])

        def batch(t):
            idx = order(t)
            return tuple(x[idx] for x in train_data)

        def val_batch(t, size):
            """Validation minibatch t of ``size`` examples (its own order, fixed by the seed)."""
            if size not in val_orders:
                if not 1 <= size <= n_val:
                    raise ValueError(f"val_batch_size must be in [1, {n_val}], got {size}")
                val_orders[size] = BatchOrder(n_val, size, bseed + 7919, device)
            idx = val_orders[size](t)
            return tuple(x[idx] for x in val_data)

        def check_draws(t):
            if _vmap_draws_differ():
                raise ValueError(f"problem {name!r} draws random numbers in its forward pass (e.g. "
                                 "dropout): its train_loss(w, t) draws the masks of (seed, t), the "
                                 "same for every row, so vmap it with randomness='same' (rows of one "
                                 "run); runs of different seeds: vmap batch_loss(w, batch(t)) under "
                                 "seeded(rng_seed(t)), rows grouped by seed, as hgtoolkit.batched does")
            return _step_seed(bseed, t)

        if buffers0 is None and not random:
            def train_loss(params, t):
                return batch_loss(params, batch(t))
        elif buffers0 is None:
            def train_loss(params, t):
                with seeded(check_draws(t), device):
                    return batch_loss(params, batch(t))
        else:
            def train_loss(params, t, buffers=missing):
                """(L_t, b_{t+1}): the forward pass of minibatch t from the buffers b_t."""
                if buffers is missing:
                    refuse("train_loss(w, t)")
                with seeded(check_draws(t) if random else None, device):
                    return stateful_batch_loss(params, batch(t), buffers)

        plain = buffers0 is None and not random
        extra = {} if plain else {"buffers": sorted(buffers0 or {}), "random": random, "val_mode": val_mode}
        return Problem({k: v.clone() for k, v in params0.items()}, train_loss, val_loss, name=name,
                       metrics=metric_values, resample=make,
                       info={**(info or {}), "batch_size": batch_size, "batch_seed": bseed,
                             "steps_per_epoch": order.per_epoch, **extra},
                       batch=batch, batch_loss=stateful_batch_loss if buffers0 is not None else batch_loss,
                       rng_seed=(lambda t: _step_seed(bseed, t)) if random else None,
                       metric_tensors=metric_tensors, val_batch=val_batch if plain else None,
                       buffers0=None if buffers0 is None else {k: v.clone() for k, v in buffers0.items()})

    return make(int(seed))
