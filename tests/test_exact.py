"""Exact schedule hypergradients: reverse == forward == autograd == central finite differences."""
import math

import pytest
import torch

import hgtoolkit
from hgtoolkit import DivergenceError, dynamics, finite_difference, hypergradient, problems
from hgtoolkit import directional_derivative

OPTIMIZERS = {
    "sgd": dynamics.sgd(),
    "nesterov": dynamics.nesterov(0.9),
    "adam": dynamics.adam(),
}


def _schedule(T, base, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return base * (0.5 + torch.rand(T, generator=gen, dtype=dtype))


def _relerr(a, b):
    return float((a - b).norm() / b.norm())


def _problems():
    A = torch.tensor([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.3]], dtype=torch.float64)
    return {
        "beale": (problems.from_function("beale"), {"sgd": 2e-3, "nesterov": 2e-4, "adam": 1e-2}),
        "rosenbrock": (problems.from_function("rosenbrock"), {"sgd": 2e-4, "nesterov": 2e-5, "adam": 1e-2}),
        "quadratic": (problems.quadratic(A, [1.0, -2.0, 0.5], b=[0.1, 0.0, 0.3]),
                      {"sgd": 0.2, "nesterov": 0.05, "adam": 0.05}),
        "mlp": (problems.synthetic_classification(), {"sgd": 0.2, "nesterov": 0.05, "adam": 0.02}),
    }


PROBLEMS = _problems()


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_reverse_forward_autograd_fd_agree(name, opt):
    problem, base = PROBLEMS[name]
    lrs = _schedule(12, base[opt])
    dyn = OPTIMIZERS[opt]
    rev = hypergradient(problem, lrs, dyn, mode="reverse")
    fwd = hypergradient(problem, lrs, dyn, mode="forward", chunk_size=5)
    ag = hypergradient(problem, lrs, dyn, mode="autograd")
    fd = finite_difference(problem, lrs, dyn)
    assert rev.grad.shape == (12,)
    assert float(rev.grad.norm()) > 0
    assert _relerr(fwd.grad, rev.grad) <= 1e-9
    assert _relerr(ag.grad, rev.grad) <= 1e-9
    assert _relerr(fd, rev.grad) <= 1e-6
    assert math.isclose(float(rev.value), float(ag.value), rel_tol=1e-12)
    assert math.isclose(float(rev.value), float(hgtoolkit.train(problem, lrs, dyn).value), rel_tol=1e-12)


def test_quadratic_closed_form():
    """SGD on ½xᵀAx − bᵀx: x_T − x* = Π(I − η_t A)(x_0 − x*); ∂f/∂η_t = −∇f(x_T)ᵀ P_{>t} A (x_t − x*)."""
    A = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.1], dtype=torch.float64)
    x0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    problem = problems.quadratic(A, x0, b=b)
    lrs = _schedule(9, 0.3, seed=3)
    xs = torch.linalg.solve(A, b)
    I = torch.eye(2, dtype=torch.float64)
    iterates = [x0]
    for eta in lrs:
        iterates.append(xs + (I - eta * A) @ (iterates[-1] - xs))
    gE = A @ iterates[-1] - b
    expected = torch.empty_like(lrs)
    for t in range(len(lrs)):
        P = I.clone()
        for s in range(t + 1, len(lrs)):
            P = (I - lrs[s] * A) @ P
        expected[t] = -gE @ (P @ (A @ (iterates[t] - xs)))
    for mode in ("reverse", "forward", "autograd"):
        r = hypergradient(problem, lrs, "sgd", mode=mode)
        assert _relerr(r.grad, expected) <= 1e-12
        torch.testing.assert_close(r.params, iterates[-1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_checkpointed_reverse_equals_stored_exactly(opt):
    problem = problems.synthetic_classification()
    lrs = _schedule(17, 0.05)
    stored = hypergradient(problem, lrs, opt, mode="reverse")
    for k in (1, 4, 17, 100):
        ck = hypergradient(problem, lrs, opt, mode="reverse", checkpoint=k)
        assert torch.equal(ck.grad, stored.grad), k
        assert torch.equal(ck.value, stored.value)


def test_forward_chunking_does_not_change_result():
    problem = problems.from_function("beale")
    lrs = _schedule(20, 1e-3)
    full = hypergradient(problem, lrs, "nesterov", mode="forward")
    for c in (1, 3, 7):
        chunked = hypergradient(problem, lrs, "nesterov", mode="forward", chunk_size=c)
        assert _relerr(chunked.grad, full.grad) <= 1e-13


@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adam"])
def test_directional_derivative(opt):
    problem = problems.synthetic_classification(seed=1)
    lrs = _schedule(10, 0.02)
    v = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    value, dd = directional_derivative(problem, lrs, v, opt)
    rev = hypergradient(problem, lrs, opt)
    assert math.isclose(float(dd), float(rev.grad @ v), rel_tol=1e-10)
    assert math.isclose(float(value), float(rev.value), rel_tol=1e-12)


def test_float32_close_to_float64():
    p64 = problems.synthetic_classification(dtype=torch.float64)
    p32 = problems.synthetic_classification(dtype=torch.float32)
    lrs = _schedule(8, 0.1)
    g64 = hypergradient(p64, lrs).grad
    g32 = hypergradient(p32, lrs.float())
    assert g32.grad.dtype == torch.float32
    assert _relerr(g32.grad.double(), g64) < 1e-4


def test_pytree_params_and_custom_problem():
    """A user's own dict-of-tensors model wrapped as hgtoolkit.Problem."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.3
    params0 = {"w": torch.zeros(3, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}

    def loss(p, idx):
        return ((X[idx] @ p["w"] + p["b"] - y[idx]) ** 2).mean()

    problem = hgtoolkit.Problem(params0, lambda p, t: loss(p, slice(10 * (t % 3), 10 * (t % 3) + 10)),
                                lambda p: loss(p, slice(30, 40)))
    lrs = _schedule(9, 0.1)
    rev = hypergradient(problem, lrs, "momentum")
    fd = finite_difference(problem, lrs, "momentum")
    assert set(rev.params) == {"w", "b"}
    assert _relerr(fd, rev.grad) <= 1e-6


def test_long_schedule_checkpointing_runs():
    problem = problems.from_function("rosenbrock")
    lrs = torch.full((3000,), 1e-4, dtype=torch.float64)
    a = hypergradient(problem, lrs, checkpoint=50)
    b = hypergradient(problem, lrs, checkpoint=None)
    assert torch.equal(a.grad, b.grad)
    # more steps at this small LR lower the loss: the tail of ∂f/∂η is negative
    assert float(a.grad[-1]) < 0


# ----------------------------------------------------------------------------- bad input

@pytest.fixture
def beale():
    return problems.from_function("beale")


@pytest.mark.parametrize("lrs, exc, word", [
    (torch.tensor([], dtype=torch.float64), ValueError, "empty"),
    (torch.tensor([1e-3, -1e-3], dtype=torch.float64), ValueError, "≥ 0"),
    (torch.tensor([1e-3, float("nan")], dtype=torch.float64), ValueError, "NaN"),
    (torch.full((3, 2), 1e-3, dtype=torch.float64), ValueError, "1-D"),
    (0.001, TypeError, "lrs"),
    ("0.1", TypeError, "lrs"),
])
def test_bad_schedule(beale, lrs, exc, word):
    with pytest.raises(exc, match="lrs") as info:
        hypergradient(beale, lrs)
    assert word in str(info.value)


def test_bad_mode_optimizer_and_options(beale):
    lrs = torch.full((5,), 1e-3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mode"):
        hypergradient(beale, lrs, mode="sideways")
    with pytest.raises(ValueError, match="optimizer"):
        hypergradient(beale, lrs, optimizer="adamw2")
    with pytest.raises(TypeError, match="optimizer"):
        hypergradient(beale, lrs, optimizer=3)
    with pytest.raises(ValueError, match="checkpoint"):
        hypergradient(beale, lrs, checkpoint=0)
    with pytest.raises(TypeError, match="checkpoint="):
        hypergradient(beale, lrs, checkpoint_every=3)
    with pytest.raises(TypeError, match="chunk_size"):
        hypergradient(beale, lrs, mode="forward", chunk_size=2.5)
    with pytest.raises(ValueError, match="direction"):
        directional_derivative(beale, lrs, torch.ones(4, dtype=torch.float64))


def test_mismatched_devices(beale):
    meta = torch.full((5,), 1e-3, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="lrs"):
        hypergradient(beale, meta)


def test_list_and_numpy_schedules_accepted(beale):
    import numpy as np
    a = hypergradient(beale, [1e-3] * 5).grad
    b = hypergradient(beale, np.full(5, 1e-3)).grad
    assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["reverse", "forward", "autograd"])
def test_divergence_reported_with_step(mode):
    problem = problems.from_function("rosenbrock")
    lrs = torch.full((60,), 0.05, dtype=torch.float64)
    with pytest.raises(DivergenceError) as info:
        hypergradient(problem, lrs, mode=mode)
    assert 0 < info.value.step < 60
    assert "step" in str(info.value)
    # the step is where it happened: training up to it stays finite
    hgtoolkit.train(problem, lrs[: info.value.step - 1])


def test_checkpoint_choices_are_exact_and_bad_ones_named():
    problem = problems.synthetic_classification()
    lrs = _schedule(16, 0.05)
    stored = hypergradient(problem, lrs, "nesterov", checkpoint=None)
    for kw in ({}, {"checkpoint": 4}, {"checkpoint": "binomial", "snapshots": 3}, {"memory": "1GB"}):
        r = hypergradient(problem, lrs, "nesterov", **kw)
        assert torch.equal(r.grad, stored.grad) and torch.equal(r.value, stored.value), kw
    with pytest.raises(TypeError, match="checkpoint"):
        hypergradient(problem, lrs, checkpoint="sqrt")


def test_leaves_with_constant_gradient_have_zero_hessian():
    """L = c·a + ‖b‖⁴: ∇_a L is constant (no graph), so H's a-rows are 0; all modes still agree."""
    params0 = {"a": torch.tensor([0.3, -0.2], dtype=torch.float64),
               "b": torch.tensor([0.5, 1.0, -0.4], dtype=torch.float64)}
    c = torch.tensor([1.0, -2.0], dtype=torch.float64)
    train_loss = lambda p, t: (c * p["a"]).sum() + (p["b"] ** 2).sum() ** 2
    val_loss = lambda p: (p["a"] ** 2).sum() + (p["b"] ** 2).sum() ** 2
    problem = hgtoolkit.Problem(params0, train_loss, val_loss)
    lrs = _schedule(7, 0.05)
    rev = hypergradient(problem, lrs, "momentum")
    for mode in ("forward", "autograd"):
        assert _relerr(hypergradient(problem, lrs, "momentum", mode=mode).grad, rev.grad) <= 1e-12
    assert _relerr(finite_difference(problem, lrs, "momentum"), rev.grad) <= 1e-6


def test_rows_are_the_reverse_pass_of_each_schedule_to_1e12():
    """exact.hypergradient_rows (the explorer's reference): many (path, schedule, horizon) as the
    rows of one reverse pass equal hypergradient(mode="reverse") of each, to 1e-12; a
    non-finite row is None; the old explore.exact_rows names its new place."""
    from hgtoolkit import trajectory
    from hgtoolkit.errors import MovedError
    from hgtoolkit.exact import hypergradient_rows
    import hgtoolkit.explore  # noqa: F401  (hgtoolkit.explore is also the function)
    import sys
    P = problems.from_function("beale")
    scheds = [_schedule(12, 2e-3, seed=s).numpy() for s in range(3)]
    paths = []
    for s in scheds:  # gradient descent's iterates w_0 … w_12
        w = [P.params0]
        for t, lr in enumerate(s):
            w.append(w[-1] - lr * trajectory.autograd_gradient(P.train_loss, w[-1], t)[0])
        paths.append(torch.stack(w).numpy())
    horizons = [12, 7, 12]
    out = hypergradient_rows(P, paths, scheds, horizons)
    for (g, value), s, T in zip(out, scheds, horizons):
        ref = hypergradient(P, torch.as_tensor(s[:T]), mode="reverse")
        torch.testing.assert_close(torch.as_tensor(g), ref.grad, rtol=1e-12, atol=0)
        assert value == pytest.approx(float(ref.value), rel=1e-12)
    bad = paths[0].copy()
    bad[5] = float("nan")
    assert hypergradient_rows(P, [bad], scheds[:1], [12]) == [None]
    with pytest.raises(MovedError, match="hgtoolkit.exact.hypergradient_rows"):
        sys.modules["hgtoolkit.explore"].exact_rows(P, paths, scheds, horizons)
