"""hgtoolkit.hdm: surrogate and its gradient, exact evaluation counts, convergence, the record."""
import math

import numpy as np
import pytest
import torch

from hgtoolkit import hdm

f64 = torch.float64
A = torch.linspace(0.01, 1.0, 6, dtype=f64)
M = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=f64)


def quad(x):
    return 0.5 * (A * x * x).sum()


def logistic(x):  # smooth, non-quadratic
    return torch.nn.functional.softplus(M @ x).sum() + 0.05 * (x * x).sum()


@pytest.mark.parametrize("mode", hdm.MODES)
def test_surrogate_gradient_matches_finite_differences(mode):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, generator=gen, dtype=f64)
    x_prev = x + 0.1 * torch.randn(6, generator=gen, dtype=f64)
    P = (0.3 + 0.1 * torch.rand(6, generator=gen, dtype=f64)) if mode == "diag" else torch.tensor(0.3, dtype=f64)
    beta, tau_half = torch.tensor(0.5, dtype=f64), 0.7
    g = torch.func.grad(logistic)(x)
    d = x - x_prev
    D = (g * g).sum() + tau_half * (d * d).sum()
    g_trial = torch.func.grad(logistic)(x - P * g + beta * d)
    gP, gb = hdm.surrogate_grad(g_trial, g, d, D, mode)
    h = lambda P_, b_: hdm.surrogate(logistic, x, P_, b_, x_prev, tau_half)
    eps = 1e-6
    fd_b = (h(P, beta + eps) - h(P, beta - eps)) / (2 * eps)
    assert float(gb) == pytest.approx(float(fd_b), rel=1e-6)
    if mode == "scalar":
        fd_P = (h(P + eps, beta) - h(P - eps, beta)) / (2 * eps)
        assert float(gP) == pytest.approx(float(fd_P), rel=1e-6)
    else:
        for i in range(6):
            e = torch.zeros(6, dtype=f64)
            e[i] = eps
            fd = (h(P + e, beta) - h(P - e, beta)) / (2 * eps)
            assert float(gP[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-10)


def test_descent_lemma_feedback_at_one_over_L():
    L = float(A.max())
    for seed in range(5):
        x = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=f64)
        assert float(hdm.surrogate(quad, x, torch.tensor(1 / L, dtype=f64))) <= -1 / (2 * L) + 1e-15


@pytest.mark.parametrize("mode,momentum", [("diag", True), ("scalar", True), ("diag", False), ("scalar", False)])
def test_counts_gradient_evaluations_exactly_and_converges(mode, momentum):
    calls = []

    def f(x):
        calls.append(1)
        return quad(x)

    r = hdm.run(f, torch.ones(6, dtype=f64), hdm.HDMConfig(L=1.0, mode=mode, momentum=momentum), max_iter=1000)
    assert r.total_grad_evals == len(calls) == r.grad_evals[-1] == r.steps_run + 1
    assert r.solved and r.grad_inf[-1] <= 1e-4 and r.solved_at == r.total_grad_evals
    assert np.all(np.diff(r.val_losses) <= 0)  # null steps keep f monotone
    assert r.accepted[0] == 0  # P_0 = 0: the first trial is x itself
    if mode == "diag" and not momentum:  # diagonal P learns the Newton scaling 1/h on a diagonal quadratic
        assert r.steps_run < 60


def test_baydin_hd_is_the_unnormalised_constant_rate_special_case():
    beta_hd, lr = 0.01, 0.5
    cfg = hdm.HDMConfig(L=1.0, mode="scalar", momentum=False, eta_p=beta_hd, p0=lr, null_steps=False,
                        adagrad=False, normalise=False, schedule_hyper_lr=False)
    r = hdm.run(quad, torch.ones(6, dtype=f64), cfg, max_iter=20)
    x, alpha = torch.ones(6, dtype=f64), lr
    g = A * x
    for k in range(20):
        assert r.lrs[k] == pytest.approx(alpha, rel=1e-12)
        x_new = x - alpha * g
        g_new = A * x_new
        alpha = max(alpha + beta_hd * float(g_new @ g), 0.0)  # α ← α + β_hd ∇f(x_{k+1})·∇f(x_k)
        x, g = x_new, g_new
    assert r.val_losses[-1] == pytest.approx(float(quad(x)), rel=1e-10)


def test_record_round_trip(tmp_path):
    r = hdm.run(logistic, torch.zeros(6, dtype=f64), hdm.HDMConfig(L=10.0), max_iter=30)
    path = r.save(tmp_path / "hdm_run")
    back = hdm.HDMResult.load(path)
    assert np.array_equal(back.val_losses, r.val_losses) and np.array_equal(back.grad_evals, r.grad_evals)
    assert back.total_grad_evals == r.total_grad_evals and back.config["method"] == "hdm-hb"
    assert (math.isnan(back.solved_at) and math.isnan(r.solved_at)) or back.solved_at == r.solved_at


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="L"):
        hdm.HDMConfig(L=0.0)
    with pytest.raises(ValueError, match="mode"):
        hdm.HDMConfig(L=1.0, mode="full")
    with pytest.raises(ValueError, match="momentum_init"):
        hdm.HDMConfig(L=1.0, momentum_init=1.5)
    with pytest.raises(TypeError, match="config"):
        hdm.run(quad, torch.ones(6, dtype=f64), {"L": 1.0})
    with pytest.raises(ValueError, match="max_iter"):
        hdm.run(quad, torch.ones(6, dtype=f64), hdm.HDMConfig(L=1.0), max_iter=0)
    with pytest.raises(TypeError, match="x0"):
        hdm.run(quad, [1.0, 2.0], hdm.HDMConfig(L=1.0))
    with pytest.raises(TypeError, match="f"):
        hdm.run("quad", torch.ones(6, dtype=f64), hdm.HDMConfig(L=1.0))
