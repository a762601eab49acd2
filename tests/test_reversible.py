"""mode="reversible": heavy-ball training run backwards exactly in fixed point; equal to stored
reverse mode of the float trajectory to 1e-12 in float64; the other optimizers refused."""
import math

import pytest
import torch

from hgtoolkit import dynamics, hypergradient, problems
from hgtoolkit.checkpointing import MemoryBudgetError
from hgtoolkit.reversible import FixedPointState, ratio


def _schedule(T, base, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return base * (0.5 + torch.rand(T, generator=gen, dtype=dtype))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# γ = 0.99: b grows to g/(1 − γ), 6.6 bits of the int64 range: 1e-11 (reversible.py docstring)
CASES = [
    ("classification, γ = 0.9", problems.synthetic_classification, 100, 0.05, dynamics.momentum(), 1e-12),
    ("classification, γ = 0.5, weight decay", problems.synthetic_classification, 40, 0.05,
     dynamics.momentum(0.5, weight_decay=1e-3), 1e-12),
    ("beale, γ = 0.9", lambda: problems.from_function("beale"), 100, 1e-3, "momentum", 1e-12),
    ("rosenbrock, γ = 0.9", lambda: problems.from_function("rosenbrock"), 100, 1e-4, "momentum", 1e-12),
    ("beale, γ = 0.99", lambda: problems.from_function("beale"), 100, 1e-3, dynamics.momentum(0.99), 1e-11),
]


@pytest.mark.parametrize("name, make, T, lr, opt, tol", CASES, ids=[c[0] for c in CASES])
def test_reversible_equals_stored_reverse(name, make, T, lr, opt, tol):
    problem = make()
    lrs = _schedule(T, lr)
    stored = hypergradient(problem, lrs, opt, checkpoint=None)
    rev = hypergradient(problem, lrs, opt, mode="reversible")
    assert _rel(rev.grad, stored.grad) <= tol
    assert math.isclose(float(rev.value), float(stored.value), rel_tol=tol)
    assert rev.schedule == "reversible" and rev.snapshots == 0 and rev.recomputed_steps == 0
    assert rev.buffer_bytes > 0


@pytest.mark.parametrize("opt, why", [("sgd", "γ = 0"), ("nesterov", "Nesterov"), ("adam", "Adam"),
                                      ("rmsprop", "RMSProp"), ("adagrad", "AdaGrad")])
def test_other_optimizers_are_refused_with_the_reason(opt, why):
    problem = problems.from_function("beale")
    with pytest.raises(ValueError, match=why):
        hypergradient(problem, _schedule(5, 1e-3), opt, mode="reversible")


def _run_buffer(fx, T, gen):
    grads = [[torch.randn(x.numel(), generator=gen, dtype=torch.float64) for x in fx.w] for _ in range(T)]
    w0 = [x.clone() for x in fx.w]
    for t in range(T):
        fx.forward(grads[t], 0.01, t)
    bits = 8 * fx.words_bytes
    for t in reversed(range(T)):
        fx.reverse_w(0.01)
        fx.reverse_b(grads[t])
    return bits, all(torch.equal(a, b) for a, b in zip(fx.w, w0)) and fx.back_at_start()


def test_the_buffer_inverts_the_steps_and_stores_log2_1_over_gamma_bits():
    n, d = ratio(0.9)
    assert (n, d) == (9, 10)
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(20000, generator=gen, dtype=torch.float64)]
    T = 300
    bits, back = _run_buffer(FixedPointState(w, [50], [40], n, d), T, gen)
    assert back
    ideal = T * 20000 * math.log2(d / n)
    assert ideal - 16 * 20000 <= bits <= ideal + 16 * 20000  # arithmetic coding: not a byte per step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_kernels_give_the_torch_kernels_bits(dtype):
    """The C kernels (hgtoolkit._fixedpoint) and the torch kernels: the same integers, coder
    states, words and floats, forward and back; the fused reverse step (reverse_adjoint with g)
    walks back through the same integers and w floats."""
    from hgtoolkit import _fixedpoint
    if _fixedpoint.library() is None:
        pytest.skip("no C compiler: only the torch kernels run here")
    gen = torch.Generator().manual_seed(2)
    w = [torch.randn(5000, generator=gen, dtype=dtype), torch.randn(7, 3, generator=gen, dtype=dtype)]
    g = [[torch.randn(x.shape, generator=gen, dtype=dtype) for x in w] for _ in range(40)]
    lr = [0.05 + 0.001 * t for t in range(40)]
    runs, walks = [], []
    for native in (True, False, "fused"):
        fx = FixedPointState(w, [50, 52], [44, 45], 9, 10, native=bool(native))
        assert (fx.lib is not None) == bool(native)
        ws = [fx.forward(g[t], lr[t], t) for t in range(40)]
        mid = [x.clone() for x in fx.w + fx.b + fx.s] + [fx.chunks[0][:fx.words_bytes // 2].clone()]
        back, walk = [], []
        if native == "fused":
            lw = [torch.randn(x.numel(), generator=gen, dtype=dtype) for x in w]
            u = [torch.zeros_like(x) for x in lw]
            wf, _ = fx.reverse_adjoint(lr[39], lw, [torch.zeros_like(x) for x in lw], u, 0.0, 0.9)
            for t in reversed(range(40)):
                walk += wf + [x.clone() for x in fx.w + fx.b + fx.s]
                if t:
                    wf, _ = fx.reverse_adjoint(lr[t - 1], lw, lw, u, 0.0, 0.9, g=g[t])
                else:
                    fx.reverse_b(g[0], floats=False)
        else:
            for t in reversed(range(40)):
                back += fx.reverse_w(lr[t])
                walk += back[-2:] + [x.clone() for x in fx.w + fx.b + fx.s]
                back += fx.reverse_b(g[t])
        assert fx.back_at_start()
        if native != "fused":
            runs.append([x for step in ws for x in step] + mid + back)
        walks.append(walk)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert len(walks[0]) == len(walks[2]) and all(torch.equal(a, b) for a, b in zip(walks[0], walks[2]))


@pytest.mark.parametrize("dtype, wd, tol", [(torch.float64, 0.0, 1e-13), (torch.float64, 1e-3, 1e-13),
                                            (torch.float32, 0.0, 1e-5)])
def test_fused_adjoint_equals_the_reference(monkeypatch, dtype, wd, tol):
    """The C kernels' fused heavy-ball adjoint (FixedPointState.reverse_adjoint) against the
    reference, SGD.cotangent on the torch kernels' states: one hypergradient to rounding."""
    from hgtoolkit import _fixedpoint
    if _fixedpoint.library() is None:
        pytest.skip("no C compiler: only the reference path runs here")
    problem = problems.synthetic_classification(dtype=dtype)
    lrs = _schedule(40, 0.05, dtype=dtype)
    opt = dynamics.momentum(0.9, weight_decay=wd)
    fused = hypergradient(problem, lrs, opt, mode="reversible")
    monkeypatch.setattr(_fixedpoint, "library", lambda: None)
    ref = hypergradient(problem, lrs, opt, mode="reversible")
    assert _rel(fused.grad, ref.grad) <= tol
    assert 0 < _rel(fused.grad, ref.grad) or dtype == torch.float64  # two computations, not one twice


def test_float32_reversible_is_close_to_stored():
    problem = problems.synthetic_classification(dtype=torch.float32)
    lrs = _schedule(30, 0.05, dtype=torch.float32)
    stored = hypergradient(problem, lrs, "momentum", checkpoint=None)
    rev = hypergradient(problem, lrs, "momentum", mode="reversible")
    assert rev.grad.dtype == torch.float32
    assert _rel(rev.grad, stored.grad) <= 1e-4  # float32 training's own rounding


def test_reversible_respects_the_memory_budget():
    problem = problems.synthetic_classification()
    with pytest.raises(MemoryBudgetError, match="reversible"):
        hypergradient(problem, _schedule(30, 0.05), "momentum", mode="reversible", memory=1000)
