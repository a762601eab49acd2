"""Tests for the ``testfunctions`` package: 2-D analytic functions and the noisy quadratic model."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.func import grad as func_grad
from torch.func import hessian as func_hessian
from torch.func import jvp, vjp, vmap

import testfunctions as tf
from testfunctions import FUNCTIONS, NoisyQuadratic, TestFunction, get

# torch's forward-mode AD (used by jvp / torch.func.hessian) scripts its decompositions on
# first use and triggers torch's own `torch.jit.script` deprecation warning; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

F64 = torch.float64
ALL = sorted(FUNCTIONS)
SMOOTH = ["beale", "bukin_smooth", "bukin_sharp", "rosenbrock"]
BATCH_SHAPES = [(), (5,), (2, 3)]


def random_points(f: TestFunction, batch_shape, seed: int = 0, avoid_valley: bool = False) -> torch.Tensor:
    """Uniform points inside ``f.bounds`` with shape ``batch_shape + (2,)``.

    For Bukin N.6, ``avoid_valley`` redraws points closer than 1e-2 to the
    non-differentiable set ``y = 0.01 x^2`` or ``x = -10``.
    """
    gen = torch.Generator().manual_seed(seed)
    (x0, x1), (y0, y1) = f.bounds
    lo = torch.tensor([x0, y0], dtype=F64)
    hi = torch.tensor([x1, y1], dtype=F64)
    pts = lo + (hi - lo) * torch.rand(*batch_shape, 2, generator=gen, dtype=F64)
    if avoid_valley:
        while True:
            x, y = pts[..., 0], pts[..., 1]
            bad = ((y - 0.01 * x**2).abs() < 1e-2) | ((x + 10).abs() < 1e-2)
            if not bad.any():
                break
            fresh = lo + (hi - lo) * torch.rand(*batch_shape, 2, generator=gen, dtype=F64)
            pts = torch.where(bad.unsqueeze(-1), fresh, pts)
    return pts


def autograd_grad_and_hessian(f: TestFunction, xy: torch.Tensor):
    """Reference derivatives from torch.func, vectorised over the batch dimensions."""
    flat = xy.reshape(-1, 2)
    g = vmap(func_grad(f))(flat).reshape(xy.shape)
    h = vmap(func_hessian(f))(flat).reshape(*xy.shape, 2)
    return g, h


def gradient_descent(f: TestFunction, start, lr: float, steps: int) -> list[float]:
    """Values of plain gradient descent with the analytic gradient (float64)."""
    w = torch.tensor(start, dtype=F64)
    values = [f(w).item()]
    for _ in range(steps):
        w = w - lr * f.grad(w)
        values.append(f(w).item())
    return values


# ---------------------------------------------------------------------------
# Registry and metadata
# ---------------------------------------------------------------------------


def test_package_exports():
    expected = {"TestFunction", "beale", "bukin6", "bukin_smooth", "bukin_sharp", "rosenbrock", "FUNCTIONS",
                "get", "NoisyQuadratic"}
    assert expected <= set(tf.__all__)
    for name in expected:
        assert hasattr(tf, name)


def test_registry_names_and_lookup():
    assert set(FUNCTIONS) == {"beale", "bukin6", "bukin_smooth", "bukin_sharp", "rosenbrock"}
    for name, f in FUNCTIONS.items():
        assert isinstance(f, TestFunction)
        assert f.name == name
        assert get(name) is f
        assert getattr(tf, name) is f


def test_get_unknown_name_raises_with_valid_names():
    with pytest.raises(ValueError) as excinfo:
        get("nope")
    msg = str(excinfo.value)
    assert "name" in msg and "'nope'" in msg
    for valid in FUNCTIONS:
        assert valid in msg


@pytest.mark.parametrize("name", ALL)
def test_metadata_is_consistent(name):
    f = get(name)
    (x0, x1), (y0, y1) = f.bounds
    assert x0 < x1 and y0 < y1
    for px, py in (f.minimiser, f.default_start):
        assert x0 <= px <= x1 and y0 <= py <= y1
    assert f.default_start != f.minimiser
    assert isinstance(f.log_contours, bool)
    doc = type(f).__doc__
    assert doc and "f(x, y) =" in doc


@pytest.mark.parametrize("name", ALL)
def test_functions_are_frozen(name):
    f = get(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.minimum = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Values, minimisers and shapes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_value_at_minimiser_equals_minimum(name):
    f = get(name)
    value = f(torch.tensor(f.minimiser, dtype=F64))
    assert value.shape == ()
    assert value.item() == pytest.approx(f.minimum, abs=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_minimum_is_below_random_points(name):
    f = get(name)
    pts = random_points(f, (2000,), seed=1)
    assert (f(pts) >= f.minimum).all()
    # And points right next to the minimiser are (weakly) higher too.
    near = torch.tensor(f.minimiser, dtype=F64) + 1e-3 * torch.randn(200, 2, dtype=F64,
                                                                       generator=torch.Generator().manual_seed(2))
    assert (f(near) >= f.minimum).all()


@pytest.mark.parametrize("name", SMOOTH)
def test_gradient_vanishes_and_hessian_psd_at_minimiser(name):
    f = get(name)
    xstar = torch.tensor(f.minimiser, dtype=F64)
    assert f.grad(xstar).abs().max().item() < 1e-12
    assert torch.linalg.eigvalsh(f.hessian(xstar)).min().item() > 0


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_output_shapes(name, batch_shape):
    f = get(name)
    xy = random_points(f, batch_shape, avoid_valley=True)
    assert f(xy).shape == batch_shape
    assert f.grad(xy).shape == (*batch_shape, 2)
    assert f.hessian(xy).shape == (*batch_shape, 2, 2)


@pytest.mark.parametrize("bad_shape", [(3,), (4, 3), (2, 3, 1), ()])
@pytest.mark.parametrize("name", ALL)
def test_wrong_last_dimension_raises(name, bad_shape):
    f = get(name)
    bad = torch.ones(bad_shape, dtype=F64)
    for method in (f, f.grad, f.hessian):
        with pytest.raises(ValueError, match="xy"):
            method(bad)


@pytest.mark.parametrize("name", ALL)
def test_float32_matches_float64(name):
    f = get(name)
    xy64 = random_points(f, (7,), seed=3, avoid_valley=True)
    xy32 = xy64.float()
    for method in (f, f.grad, f.hessian):
        out32 = method(xy32)
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), method(xy64), rtol=1e-4, atol=1e-4)


def test_batched_evaluation_equals_pointwise():
    f = get("beale")
    xy = random_points(f, (2, 3), seed=4)
    batched = f(xy)
    for i in range(2):
        for j in range(3):
            assert batched[i, j].item() == f(xy[i, j]).item()


# ---------------------------------------------------------------------------
# Analytic derivatives against autograd
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_shape", BATCH_SHAPES)
@pytest.mark.parametrize("name", ALL)
def test_analytic_grad_and_hessian_match_autograd(name, batch_shape):
    f = get(name)
    for seed in range(3):
        xy = random_points(f, batch_shape, seed=10 + seed, avoid_valley=(name == "bukin6"))
        g_ref, h_ref = autograd_grad_and_hessian(f, xy)
        torch.testing.assert_close(f.grad(xy), g_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f.hessian(xy), h_ref, rtol=1e-10, atol=1e-10)


def test_hessian_is_symmetric_and_not_trivially_zero():
    # Guards against a formula that returns, e.g., zeros for the mixed term.
    for name in ALL:
        f = get(name)
        H = f.hessian(random_points(f, (10,), seed=5, avoid_valley=True))
        torch.testing.assert_close(H, H.transpose(-1, -2), rtol=0, atol=0)
        assert (H[..., 0, 1].abs() > 0).all()


@pytest.mark.parametrize("name", ALL)
def test_jvp_and_vjp_agree_with_analytic_grad(name):
    f = get(name)
    xy = random_points(f, (4,), seed=6, avoid_valley=True)
    v = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(7))
    _, tangent = jvp(f, (xy,), (v,))
    torch.testing.assert_close(tangent, (f.grad(xy) * v).sum(-1), rtol=1e-10, atol=1e-10)
    _, pullback = vjp(f, xy)
    (cot,) = pullback(torch.ones(4, dtype=F64))
    torch.testing.assert_close(cot, f.grad(xy), rtol=1e-10, atol=1e-10)


def test_bukin6_derivatives_are_non_finite_on_the_valley():
    # Documented behaviour: the square root has infinite slope where y = 0.01 x^2.
    f = get("bukin6")
    # Points where y - 0.01 x^2 is exactly zero in floating point (incl. the minimiser).
    on_valley = torch.tensor([[-10.0, 1.0], [-20.0, 4.0], [0.0, 0.0]], dtype=F64)
    assert (on_valley[:, 1] - 0.01 * on_valley[:, 0] ** 2 == 0).all()
    assert torch.isfinite(f(on_valley)).all()
    assert not torch.isfinite(f.grad(on_valley)).all(dim=-1).any()
    assert not torch.isfinite(f.hessian(on_valley)).all(dim=(-1, -2)).any()


# ---------------------------------------------------------------------------
# Default starts are usable by plain gradient descent
# ---------------------------------------------------------------------------


def test_beale_y_equals_one_is_flat_in_x():
    # The flat valley the default start avoids: f is constant along y = 1.
    f = get("beale")
    line = torch.stack([torch.linspace(-4, 4, 9, dtype=F64), torch.ones(9, dtype=F64)], dim=-1)
    expected = 1.5**2 + 2.25**2 + 2.625**2
    torch.testing.assert_close(f(line), torch.full((9,), expected, dtype=F64))
    torch.testing.assert_close(f.grad(line)[:, 0], torch.zeros(9, dtype=F64))


@pytest.mark.parametrize("lr", [1e-3, 3e-3, 1e-2])
def test_beale_default_start_gradient_descent_makes_progress(lr):
    f = get("beale")
    values = gradient_descent(f, f.default_start, lr, 500)
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] / 30  # 41.25 -> at most ~1.4; observed 0.29 at lr=1e-3
    assert all(b <= a for a, b in zip(values, values[1:]))  # monotone descent


def test_beale_rejected_start_stalls():
    # Why (-1.0, 1.5) is not the default: gradient descent ends higher than it started.
    f = get("beale")
    values = gradient_descent(f, (-1.0, 1.5), 1e-2, 500)
    assert values[-1] > values[0]


@pytest.mark.parametrize(("name", "lr", "factor"), [
    ("rosenbrock", 1e-3, 5.0),
    ("bukin_smooth", 5e-3, 1000.0),
])
def test_smooth_default_starts_gradient_descent_makes_progress(name, lr, factor):
    f = get(name)
    values = gradient_descent(f, f.default_start, lr, 500)
    assert all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] / factor


def test_bukin_smooth_diverges_above_stability_limit():
    # Documented: the stiff valley-normal curvature (~200) caps the stable step near 2/208.
    f = get("bukin_smooth")
    assert gradient_descent(f, f.default_start, 9e-3, 200)[-1] < 1.0
    diverged = gradient_descent(f, f.default_start, 1.1e-2, 200)[-1]
    assert not math.isfinite(diverged) or diverged > 1e3


def test_bukin_sharp_is_bukin6_shifted_away_from_the_valley():
    # (u² + ε)^{1/4} ≈ √|u| and √((x+10)² + ε) ≈ |x + 10| once |u|, |x + 10| ≫ √ε = 0.01,
    # minus the constant 100 ε^{1/4} + 0.01 √ε that puts the minimum at 0.
    sharp, b6 = get("bukin_sharp"), get("bukin6")
    pts = random_points(sharp, (200,), seed=8)
    x, y = pts[..., 0], pts[..., 1]
    far = ((y - 0.01 * x**2).abs() > 0.5) & ((x + 10).abs() > 0.5)
    shift = 100 * 1e-4**0.25 + 0.01 * 1e-2
    torch.testing.assert_close(sharp(pts[far]), b6(pts[far]) - shift, rtol=0, atol=1e-2)  # error ε/(4|u|^{3/2})·100
    # The valley stays sharp: the documented Hessian at the minimiser (largest eigenvalue ~5.2e4,
    # against ~208 for bukin_smooth).
    H = sharp.hessian(torch.tensor(sharp.minimiser, dtype=F64))
    torch.testing.assert_close(H, torch.tensor([[2001.0, 1e4], [1e4, 5e4]], dtype=F64))


def test_bukin_sharp_gradient_descent_bounces_in_the_valley():
    # Documented: lr = 1e-4 reaches the valley (f ~ 0.03) but cannot settle in it (lr > 2/5.2e4).
    f = get("bukin_sharp")
    values = gradient_descent(f, f.default_start, 1e-4, 500)
    assert all(math.isfinite(v) for v in values)
    assert min(values) < 0.1 and values[-1] > 10 * min(values)
    slow = gradient_descent(f, f.default_start, 4e-5, 500)
    assert 30 < slow[-1] < slow[0]


# ---------------------------------------------------------------------------
# Noisy quadratic model
# ---------------------------------------------------------------------------


def small_nqm() -> NoisyQuadratic:
    h = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    c = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    return NoisyQuadratic(h, c, torch.tensor([1.0, -2.0, 3.0], dtype=F64))


def decaying_schedule(T: int = 30) -> torch.Tensor:
    return 0.6 / (1.0 + 0.1 * torch.arange(T, dtype=F64))


def test_nqm_loss():
    q = small_nqm()
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(q.loss(w), torch.tensor([0.5 * (1 + 2 + 0.9), 0.0], dtype=F64))


def test_nqm_sample_loss_gradient_equals_stochastic_grad():
    q = small_nqm()
    w = torch.tensor([0.3, -1.2, 2.5], dtype=F64, requires_grad=True)
    for t, seed in [(0, 0), (7, 3), (123, 99)]:
        (g,) = torch.autograd.grad(q.sample_loss(w, t, seed), w)
        sg = q.stochastic_grad(w.detach(), t, seed)
        torch.testing.assert_close(g, sg, rtol=1e-14, atol=1e-14)
        # The noise is really there: the stochastic gradient is not the true one.
        assert (sg - q.h * w.detach()).abs().min() > 1e-6


def test_nqm_noise_is_deterministic_in_seed_and_step():
    q = small_nqm()
    w = q.w0
    torch.manual_seed(0)
    a = q.stochastic_grad(w, 5, 42)
    torch.manual_seed(12345)  # global RNG state must not matter
    torch.randn(100)
    b = q.stochastic_grad(w, 5, 42)
    assert torch.equal(a, b)
    assert not torch.equal(a, q.stochastic_grad(w, 6, 42))
    assert not torch.equal(a, q.stochastic_grad(w, 5, 43))
    # Same schedule and seed -> identical trajectory; other seed -> different one.
    lrs = decaying_schedule(20)
    assert torch.equal(q.simulate_sgd(lrs, seed=1), q.simulate_sgd(lrs, seed=1))
    assert not torch.equal(q.simulate_sgd(lrs, seed=1), q.simulate_sgd(lrs, seed=2))


def test_nqm_noise_same_across_dtypes():
    q64 = small_nqm()
    q32 = NoisyQuadratic(q64.h.float(), q64.c.float(), q64.w0.float())
    assert q32.noise(3, 7).dtype == torch.float32
    torch.testing.assert_close(q32.noise(3, 7), q64.noise(3, 7).float(), rtol=0, atol=0)


def test_nqm_simulate_sgd_follows_update_rule():
    q = small_nqm()
    lrs = decaying_schedule(5)
    traj = q.simulate_sgd(lrs, seed=11)
    assert traj.shape == (6, 3)
    torch.testing.assert_close(traj[0], q.w0)
    for t in range(5):
        expected = traj[t] - lrs[t] * q.stochastic_grad(traj[t], t, 11)
        torch.testing.assert_close(traj[t + 1], expected, rtol=1e-15, atol=1e-15)


def test_nqm_expected_loss_without_noise_equals_gradient_descent():
    q = small_nqm()
    q0 = NoisyQuadratic(q.h, torch.zeros(3, dtype=F64), q.w0)
    lrs = decaying_schedule(25)
    final = q0.simulate_sgd(lrs, seed=0)[-1]
    torch.testing.assert_close(q0.expected_loss_sgd(lrs), q0.loss(final), rtol=1e-13, atol=1e-15)
    m, s = q0.expected_moments_sgd(lrs)
    torch.testing.assert_close(m, final, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(s, final**2, rtol=1e-13, atol=1e-15)


def test_nqm_expected_loss_matches_monte_carlo():
    q = small_nqm()
    lrs = decaying_schedule(30)
    n_runs = 2000
    finals = torch.stack([q.simulate_sgd(lrs, seed=s)[-1] for s in range(n_runs)])
    losses = q.loss(finals)

    def within(sample: torch.Tensor, target: torch.Tensor, z: float = 4.0) -> torch.Tensor:
        sem = sample.std(dim=0) / math.sqrt(sample.shape[0])
        return (sample.mean(dim=0) - target).abs() <= z * sem

    expected = q.expected_loss_sgd(lrs)
    m, s = q.expected_moments_sgd(lrs)
    assert within(losses, expected).all()
    assert within(finals, m).all()
    assert within(finals**2, s).all()

    # The comparison has power: dropping the eta^2 c noise term is rejected.
    q_noise_free = NoisyQuadratic(q.h, torch.zeros(3, dtype=F64), q.w0)
    assert not within(losses, q_noise_free.expected_loss_sgd(lrs))


def test_nqm_expected_loss_gradient_matches_finite_differences():
    q = small_nqm()
    lrs = (decaying_schedule(20) * (1 + 0.2 * torch.rand(20, dtype=F64, generator=torch.Generator().manual_seed(0))))
    lrs.requires_grad_(True)
    (g,) = torch.autograd.grad(q.expected_loss_sgd(lrs), lrs)
    eps = 1e-6
    fd = torch.empty_like(g)
    with torch.no_grad():
        for i in range(lrs.shape[0]):
            e = torch.zeros_like(lrs)
            e[i] = eps
            fd[i] = (q.expected_loss_sgd(lrs + e) - q.expected_loss_sgd(lrs - e)) / (2 * eps)
    assert g.abs().max() > 1e-3  # a meaningful, non-zero hypergradient
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-9)


def test_nqm_expected_loss_grad_wrt_start_moments():
    q = small_nqm()
    lrs = decaying_schedule(10)
    s0 = (q.w0**2 + 0.5).requires_grad_(True)
    (g,) = torch.autograd.grad(q.expected_loss_sgd(lrs, s0=s0), s0)
    # E[L] is linear in s0 with coefficient 1/2 h prod_t (1 - eta_t h)^2.
    decay = torch.prod((1 - lrs[:, None] * q.h) ** 2, dim=0)
    torch.testing.assert_close(g, 0.5 * q.h * decay, rtol=1e-13, atol=1e-15)


def test_nqm_validation_errors():
    h = torch.ones(3, dtype=F64)
    with pytest.raises(ValueError, match="c"):
        NoisyQuadratic(h, -torch.ones(3, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="c"):
        NoisyQuadratic(h, torch.ones(4, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="w0"):
        NoisyQuadratic(h, h, torch.ones(2, dtype=F64))
    with pytest.raises(ValueError, match="h"):
        NoisyQuadratic(torch.ones(2, 2, dtype=F64), torch.ones(2, 2, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="lrs"):
        NoisyQuadratic(h, h, 1.0).expected_loss_sgd(torch.ones(2, 2, dtype=F64))


def test_nqm_power_law_spectrum():
    q = NoisyQuadratic.power_law(5, noise_scale=0.1)
    torch.testing.assert_close(q.h, 1.0 / torch.arange(1, 6, dtype=F64))
    torch.testing.assert_close(q.c, 0.1 * q.h)
    assert q.dim == 5 and q.dtype == F64
    torch.testing.assert_close(q.w0, torch.ones(5, dtype=F64))


@pytest.mark.parametrize("name", ALL)
def test_derivatives_in_one_go_equal_the_separate_formulas(name):
    """``derivatives`` (shared subexpressions) gives the numbers of __call__/grad/hessian bit for
    bit, on one point and on a stack (a run may take its gradient from either)."""
    f = get(name)
    for shape in ((), (7,)):
        xy = random_points(f, shape, seed=3, avoid_valley=(name == "bukin6"))
        value, g, h = f.derivatives(xy)
        assert torch.equal(value, f(xy)) and torch.equal(g, f.grad(xy)) and torch.equal(h, f.hessian(xy))
