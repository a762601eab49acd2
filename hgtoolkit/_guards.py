"""What a drop-in optimizer's extra forward passes may not change, and the one model they cannot
differentiate twice (docs/dropins.md).

A drop-in given the user's gradient in ``p.grad`` still calls the closure, for the loss and the
Hessian-vector product H_t z: a second forward through the user's model, on top of the one the
user's ``backward()`` came from (``val_closure`` is one more). With the model passed as
``module=``, :class:`ModuleGuard` makes such a pass invisible to the model and to the user's
random stream:

- the module's buffers (BatchNorm running statistics, ``num_batches_tracked``) are restored after
  it, so they are updated once per step, by the user's forward (a train-mode forward never reads
  the running statistics, so restoring them afterwards is the same as holding them read-only);
- the random state of the user's forward is replayed: the guard records the RNG state (CPU, and
  each CUDA device the module lives on) when the module's forward starts, and the extra pass's
  k-th call of the module starts from the k-th state recorded since the last step, so dropout
  draws the user's masks (the first 16 forwards between two steps are recorded); afterwards the
  RNG is put back where the user's loop left it.

The guard's hook on the module holds it weakly: it goes with the optimizer.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch

__all__ = ["ModuleGuard", "extra_forward", "refuse_compiled", "explain_double_backward"]

MAX_RECORDED = 16  # RNG states kept between two steps (the closure replays the first ones)


def _devices(module: torch.nn.Module) -> list[int]:
    return sorted({x.device.index or 0 for x in [*module.parameters(), *module.buffers()]
                   if x.device.type == "cuda"})


def _rng_state(devices: list[int]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple, devices: list[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


class ModuleGuard:
    """Records the RNG state at the start of each forward of ``module`` (the user's), replays
    them in an :func:`extra_forward` pass, and restores the module's buffers after it."""

    def __init__(self, module: torch.nn.Module):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be the torch.nn.Module the closure evaluates, got "
                            f"{type(module).__name__}")
        self.module = module
        self.devices = _devices(module)
        self.recorded: list = []  # RNG states at the user's forwards since the last step
        self.active = False  # inside an extra pass
        self.replay = False
        self.calls = 0
        # the module holds the hook, the hook only a weak reference: the hook goes with the guard
        # (with the optimizer); a copy of the module (copy.deepcopy keeps its hooks) is ignored
        ref = weakref.ref(self)

        def hook(mod: torch.nn.Module, args: Any) -> None:
            guard = ref()
            if guard is not None and mod is guard.module:
                guard._pre_forward()

        weakref.finalize(self, module.register_forward_pre_hook(hook).remove)

    def _pre_forward(self) -> None:
        if not self.active:
            if len(self.recorded) < MAX_RECORDED:  # forwards without a step (evaluation) in between
                self.recorded.append(_rng_state(self.devices))
        elif self.replay and self.calls < len(self.recorded):
            _set_rng_state(self.recorded[self.calls], self.devices)
            self.calls += 1

    def step_done(self) -> None:
        self.recorded.clear()


@contextlib.contextmanager
def extra_forward(guard: ModuleGuard | None, replay: bool) -> Iterator[None]:
    """A pass through the guarded module that leaves no trace: its buffers restored and the RNG
    put back afterwards; with ``replay`` its forwards draw the random numbers of the user's."""
    if guard is None:
        yield
        return
    rng = _rng_state(guard.devices)
    buffers = [(b, b.clone()) for b in guard.module.buffers()]
    guard.active, guard.replay, guard.calls = True, replay, 0
    try:
        yield
    finally:
        guard.active = False
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        _set_rng_state(rng, guard.devices)


def _compile_message(opt: Any) -> str:
    return (f"{type(opt).__name__}: the closure's loss goes through torch.compile, and with μ ≠ 0 "
            f"(RTHO/MARTHE) the step needs H_t z, a second backward through the gradient, which "
            f"torch.compile's autograd does not support (aot_autograd has no double backward). "
            f"Evaluate the loss in the closure with the uncompiled module (torch.compile(model) "
            f"keeps it as ._orig_mod), or use method='hd' / SGDHD / AdamHD (first derivatives only)")


def refuse_compiled(opt: Any, loss: torch.Tensor, max_nodes: int = 100_000) -> None:
    """Raise the error above if the autograd graph of ``loss`` holds a torch.compile'd function
    (looked for once per optimizer: the model does not change between steps)."""
    if opt.__dict__.get("_compile_checked"):
        return
    opt._compile_checked = True
    seen, todo = set(), [loss.grad_fn]
    while todo and len(seen) < max_nodes:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunction" in type(node).__name__:
            raise RuntimeError(_compile_message(opt))
        todo.extend(n for n, _ in node.next_functions)


def explain_double_backward(opt: Any, exc: RuntimeError) -> None:
    """Re-raise torch's own double-backward failure of a compiled graph as the error above."""
    text = str(exc)
    if "double backward" in text or "donated buffer" in text:
        raise RuntimeError(_compile_message(opt)) from exc
