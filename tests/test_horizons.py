"""hgtoolkit.horizons: exact NQM moments, greedy/optimal schedules, truncated-horizon references."""
import math

import pytest
import torch

from hgtoolkit import analysis, dynamics, horizons, hypergradient, online, problems
from testfunctions import NoisyQuadratic

f64 = torch.float64


def _nqm(h, c, w0=1.0):
    return NoisyQuadratic(torch.as_tensor(h, dtype=f64), torch.as_tensor(c, dtype=f64), w0)


def test_one_dimensional_greedy_matches_closed_form_and_is_stationary():
    h, c, w0, T = 2.0, 0.3, 1.5, 40
    nqm = _nqm([h], [c], w0)
    g = horizons.greedy_schedule(nqm, T)
    sigma2, A0 = c / h ** 2, w0 ** 2
    A_T = float(2 * g.losses[-1] / h)  # E L = ½ h A
    assert A_T == pytest.approx(A0 * sigma2 / (T * A0 + sigma2), rel=1e-10, abs=0)
    t = torch.arange(T, dtype=f64)
    assert torch.allclose(g.lrs, A0 / (h * ((t + 1) * A0 + sigma2)), rtol=1e-12, atol=0)
    eta = g.lrs.clone().requires_grad_(True)
    loss = horizons.nqm_expected_loss(nqm, eta)
    (grad,) = torch.autograd.grad(loss, eta)
    # relative to the scale of the gradient at a perturbed schedule
    eta2 = (1.3 * g.lrs).requires_grad_(True)
    (grad2,) = torch.autograd.grad(horizons.nqm_expected_loss(nqm, eta2), eta2)
    assert float(grad.abs().max() / grad2.abs().max()) < 1e-10


def test_sigma0_with_momentum_greedy_is_optimal_without_momentum_not():
    nqm = _nqm(horizons.nqm_spectrum(10, 100.0), torch.zeros(10))
    T = 6
    gm = horizons.greedy_schedule(nqm, T, momentum=True)
    x = torch.cat([gm.lrs, gm.momentum]).requires_grad_(True)
    value = horizons.nqm_expected_loss(nqm, x[:T], x[T:])
    (grad,) = torch.autograd.grad(value, x)
    assert float(grad.abs().max() / value.detach()) < 1e-8  # greedy (= CG) is a stationary point
    opt = horizons.optimal_schedule(nqm, T, momentum=True, momentum_max=5.0)
    assert opt.best_value == pytest.approx(float(gm.losses[-1]), rel=1e-6)
    assert float(gm.losses[-1]) == pytest.approx(float(value.detach()), rel=1e-12)
    # without momentum: greedy LR is not a stationary point of the horizon-T loss
    g = horizons.greedy_schedule(nqm, T)
    eta = g.lrs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(horizons.nqm_expected_loss(nqm, eta), eta)
    assert float(grad.abs().max()) > 1e-4 * float(g.losses[-1])
    opt = horizons.optimal_schedule(nqm, T, lrs=g.lrs)
    assert opt.best_value < float(g.losses[-1]) * (1 - 1e-3)


def test_moments_match_monte_carlo_within_three_standard_errors():
    h = torch.tensor([1.0, 0.3, 0.05], dtype=f64)
    c = torch.tensor([0.5, 0.2, 0.01], dtype=f64)
    nqm = _nqm(h, c, torch.tensor([1.0, -2.0, 3.0], dtype=f64))
    T, n = 12, 20000
    lrs = torch.linspace(0.8, 0.3, T, dtype=f64)
    mus = torch.linspace(0.2, 0.7, T, dtype=f64)
    for momentum in (None, mus):
        mu = torch.zeros(T, dtype=f64) if momentum is None else momentum
        gen = torch.Generator().manual_seed(0)
        w = nqm.w0.expand(n, 3).clone()
        v = torch.zeros_like(w)
        for t in range(T):
            g = h * w + c.sqrt() * torch.randn(n, 3, generator=gen, dtype=f64)
            v = mu[t] * v - lrs[t] * g
            w = w + v
        m = horizons.nqm_moments(nqm, lrs, momentum)
        vw, vv = w.var(0), v.var(0)
        cov = ((w - w.mean(0)) * (v - v.mean(0))).sum(0) / (n - 1)
        assert ((w.mean(0) - m.mean_w).abs() <= 3 * (vw / n).sqrt()).all()
        assert ((vw - m.var_w).abs() <= 3 * vw * math.sqrt(2 / (n - 1))).all()
        if momentum is not None:
            assert ((v.mean(0) - m.mean_v).abs() <= 3 * (vv / n).sqrt()).all()
            assert ((vv - m.var_v).abs() <= 3 * vv * math.sqrt(2 / (n - 1))).all()
            assert ((cov - m.cov).abs() <= 3 * ((vw * vv + cov ** 2) / n).sqrt()).all()
    # plain SGD agrees with NoisyQuadratic's own recursion
    mean, second = nqm.expected_moments_sgd(lrs)
    m = horizons.nqm_moments(nqm, lrs)
    assert torch.allclose(m.mean_w, mean, rtol=1e-13) and torch.allclose(m.var_w + m.mean_w ** 2, second, rtol=1e-12)


def test_truncated_matches_full_hypergradient_and_one_step_reference():
    p = problems.synthetic_classification()
    lrs = torch.linspace(0.6, 0.2, 15, dtype=f64)
    ref = analysis.exact_references(p, lrs)
    assert torch.allclose(horizons.truncated(p, lrs, 1), ref.one_step, rtol=0, atol=1e-12)
    for K in (15, 40):
        assert torch.allclose(horizons.truncated(p, lrs, K), hypergradient(p, lrs).grad, rtol=0, atol=1e-12)
    # intermediate K against brute force (an unroll that stops at t + K), also with momentum
    dyn = dynamics.SGD(momentum=0.9)
    ladder = horizons.truncated_ladder(p, lrs, [1, 4, 15], dyn)
    assert torch.allclose(ladder[15], hypergradient(p, lrs, dyn).grad, rtol=0, atol=1e-12)
    for t in (0, 7, 11, 14):
        end = min(t + 4, 15)
        assert float(ladder[4][t]) == pytest.approx(float(hypergradient(p, lrs[:end], dyn).grad[t]), abs=1e-12)


def test_truncated_on_the_noisy_quadratic():
    p = problems.noisy_quadratic(torch.linspace(0.1, 1, 5), torch.full((5,), 0.1), 1.0)
    lrs = torch.full((10,), 0.3, dtype=f64)
    assert torch.allclose(horizons.truncated(p, lrs, 10), hypergradient(p, lrs).grad, atol=1e-12, rtol=0)


def test_optimal_schedule_beats_greedy_under_noise():
    nqm = _nqm(horizons.nqm_spectrum(20, 100.0), horizons.nqm_spectrum(20, 100.0) ** 0)  # c = 1
    g = horizons.greedy_schedule(nqm, 30)
    r = horizons.optimal_schedule(nqm, 30, lrs=g.lrs, outer_steps=100, lr_max=2.0)
    assert r.best_value < float(g.losses[-1])
    assert len(r.best_lrs) == 30 and (r.best_lrs >= 0).all() and (r.best_lrs <= 2.0).all()


def test_bad_inputs_name_the_argument():
    nqm = _nqm([1.0], [0.1])
    with pytest.raises(ValueError, match="T"):
        horizons.greedy_schedule(nqm, 0)
    with pytest.raises(TypeError, match="momentum"):
        horizons.greedy_schedule(nqm, 3, momentum="yes")
    with pytest.raises(TypeError, match="nqm"):
        horizons.nqm_expected_loss("nqm", [0.1])
    with pytest.raises(ValueError, match="momentum"):
        horizons.nqm_expected_loss(nqm, [0.1, 0.1], momentum=[0.5])
    with pytest.raises(TypeError, match="lrs"):
        horizons.nqm_expected_loss(nqm, "fast")
    p = problems.synthetic_classification()
    with pytest.raises(ValueError, match="K"):
        horizons.truncated(p, [0.1, 0.1], 0)
    with pytest.raises(TypeError, match="K"):
        horizons.truncated(p, [0.1, 0.1], 1.5)
    with pytest.raises(ValueError, match="lrs"):
        horizons.truncated(p, [-0.1, 0.1], 1)
    with pytest.raises(TypeError, match="Ks"):
        horizons.truncated_ladder(p, [0.1], 3)
    with pytest.raises(ValueError, match="kind"):
        horizons.nqm_spectrum(5, 10.0, "flat")


def test_horizon_ladder_finds_the_horizon_of_each_online_rule():
    p = problems.synthetic_classification()
    hd = online.run(p, "hd", lr=0.5, steps=20, hypergrad_lr=1e-3)
    lad = analysis.horizon_ladder_online(hd, p, Ks=(1, 5, None))
    assert lad["best"] == 1 and lad["rows"][1]["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert lad["rows"][1]["median_rel_err"] < 1e-10 and lad["Ks"] == [1, 5, 20]
    # an estimate equal to the full-horizon hypergradient is matched at K = T
    lrs = torch.full((12,), 0.4, dtype=f64)
    g = hypergradient(p, lrs).grad
    lad = analysis.horizon_ladder(p, lrs, g, Ks=(1, 3, 12))
    assert lad["best"] == 12 and lad["rows"][12]["sign_agreement"] == 1.0
    with pytest.raises(ValueError, match="estimates"):
        analysis.horizon_ladder(p, lrs, g[:5])


@pytest.mark.parametrize("noisy", [True, False])
def test_value_and_grad_adjoint_matches_autograd(noisy):
    h = horizons.nqm_spectrum(7, 50.0)
    nqm = _nqm(h, h if noisy else torch.zeros(7), torch.linspace(-1, 2, 7, dtype=f64))
    T = 9
    lrs = torch.linspace(0.9, 0.2, T, dtype=f64)
    mus = torch.linspace(0.3, 0.95, T, dtype=f64)
    for momentum in (None, mus):
        x = torch.cat([lrs, mus]).requires_grad_(True)
        value = horizons.nqm_expected_loss(nqm, x[:T], None if momentum is None else x[T:])
        (g,) = torch.autograd.grad(value, x)
        v, g_eta, g_mu = horizons.nqm_value_and_grad(nqm, lrs, momentum)
        assert float(v) == pytest.approx(float(value.detach()), rel=1e-13)
        assert torch.allclose(g_eta, g[:T], rtol=1e-11, atol=1e-14)
        if momentum is None:
            assert g_mu is None
        else:
            assert torch.allclose(g_mu, g[T:], rtol=1e-11, atol=1e-14)


def test_truncated_ladder_without_K1_and_with_K_beyond_T():
    p = problems.synthetic_classification()
    lrs = torch.linspace(0.6, 0.2, 12, dtype=f64)
    full = horizons.truncated_ladder(p, lrs, [1, 3, 5, 12, 30])
    part = horizons.truncated_ladder(p, lrs, [3, 5, 30])  # ring width 5, no K = 1 rung
    for k in (3, 5, 30):
        assert torch.allclose(part[k], full[k], rtol=0, atol=1e-13)
    assert torch.equal(full[12], full[30])
    for t in (0, 6, 8):  # t + 3 < T: an unroll that stops at t + 3
        assert float(part[3][t]) == pytest.approx(float(hypergradient(p, lrs[:t + 3]).grad[t]), abs=1e-12)
