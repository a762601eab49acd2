"""The exact (reversible mode included), online and LRS-OPT paths on a CUDA device give the CPU's numbers (float64).

Skipped where no CUDA device is available (the only skip in this file)."""
import math

import numpy as np
import pytest
import torch

from hgtoolkit import directional_derivative, hypergradient, lrsopt, online, problems

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

T = 10


def _pair(opt_lr=0.1):
    cpu = problems.synthetic_classification(device="cpu")
    gpu = problems.synthetic_classification(device="cuda")
    lrs = opt_lr * (0.5 + torch.rand(T, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    return cpu, gpu, lrs


def _rel(a, b):
    return float((a.cpu() - b.cpu()).norm() / b.cpu().norm())


@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adam"])
def test_exact_modes_on_cuda_match_cpu(opt):
    cpu, gpu, lrs = _pair(0.02 if opt == "adam" else 0.1)
    ref = hypergradient(cpu, lrs, opt)
    lrs_g = lrs.cuda()
    for mode, kw in (("reverse", {}), ("reverse", {"checkpoint": "binomial", "snapshots": 3}), ("forward", {"chunk_size": 4}),
                     ("autograd", {})):
        r = hypergradient(gpu, lrs_g, opt, mode, **kw)
        assert r.grad.device.type == "cuda"
        assert _rel(r.grad, ref.grad) <= 1e-9, (mode, kw)
        assert math.isclose(float(r.value), float(ref.value), rel_tol=1e-10)
    stored = hypergradient(gpu, lrs_g, opt)
    assert torch.equal(hypergradient(gpu, lrs_g, opt, checkpoint=3).grad, stored.grad)
    v = torch.linspace(-1, 1, T, dtype=torch.float64)
    _, dd = directional_derivative(gpu, lrs_g, v.cuda(), opt)
    assert math.isclose(float(dd), float(ref.grad @ v), rel_tol=1e-9)


def test_reversible_on_cuda_matches_cpu():
    """mode="reversible" on CUDA runs the torch fixed-point kernels (the C kernels are CPU-only):
    the same integers as the CPU's torch kernels, so the CPU's hypergradient to rounding, and
    stored reverse on the GPU to the mode's 1e-12."""
    cpu, gpu, lrs = _pair()
    ref = hypergradient(cpu, lrs, "momentum", mode="reversible")
    r = hypergradient(gpu, lrs.cuda(), "momentum", mode="reversible")
    assert r.grad.device.type == "cuda" and r.schedule == "reversible" and r.buffer_bytes > 0
    assert _rel(r.grad, ref.grad) <= 1e-12
    assert _rel(r.grad, hypergradient(gpu, lrs.cuda(), "momentum").grad) <= 1e-12


def test_online_on_cuda_matches_cpu():
    cpu, gpu, _ = _pair()
    kw = dict(lr=0.1, hypergrad_lr=1e-3, steps=T, eval_every=T)
    a = online.run(cpu, "marthe", mu=0.5, **kw)
    b = online.run(gpu, "marthe", mu=0.5, **kw)
    np.testing.assert_allclose(np.asarray(b.lrs), np.asarray(a.lrs), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("outer", ["adam", "lbfgsb"])
def test_lrsopt_on_cuda_matches_cpu_and_resumes(outer, tmp_path):
    cpu, gpu, _ = _pair()
    lrs = torch.full((T,), 0.1, dtype=torch.float64)
    lr = None if outer == "lbfgsb" else 0.01
    a = lrsopt.optimize_schedule(cpu, lrs, 3, lr, outer, progress=False)
    b = lrsopt.optimize_schedule(gpu, lrs.cuda(), 3, lr, outer, progress=False,
                                 checkpoint_path=tmp_path / "ck.pt", checkpoint_interval=1)
    np.testing.assert_allclose(b.history, a.history, rtol=1e-9)
    np.testing.assert_allclose(b.final_lrs, a.final_lrs, rtol=1e-8, atol=1e-12)
    c = lrsopt.optimize_schedule(gpu, lrs.cuda(), 3, lr, outer, progress=False,
                                 checkpoint_path=tmp_path / "ck.pt", resume=True)
    assert c.outer_steps_done == 3 and np.array_equal(c.final_lrs, b.final_lrs)


def test_from_module_batchnorm_dropout_on_cuda():
    """A BatchNorm + dropout CNN on CUDA: every exact mode agrees, the caller's CUDA RNG state is
    untouched; without dropout the numbers are the CPU's."""
    from test_models import CE, LRS, cnn, data
    tr, va = data()
    for dropout in (0.3, 0.0):
        gpu = problems.from_module(cnn(dropout), CE, tr, va, batch_size=8, seed=3, device="cuda")
        state = torch.cuda.get_rng_state()
        ref = hypergradient(gpu, LRS.cuda(), "momentum")
        assert torch.equal(torch.cuda.get_rng_state(), state)
        for mode, kw in (("reverse", {"checkpoint": 3}), ("forward", {}), ("autograd", {})):
            assert _rel(hypergradient(gpu, LRS.cuda(), "momentum", mode, **kw).grad, ref.grad) < 1e-10, mode
    cpu = problems.from_module(cnn(0.0), CE, tr, va, batch_size=8, seed=3)
    assert _rel(ref.grad, hypergradient(cpu, LRS, "momentum").grad) < 1e-9


def test_batched_dropout_runs_on_cuda_equal_single_runs(monkeypatch):
    """nn.Dropout drawn by from_module's FunctionalDropout (bernoulli_): on CUDA too the vmapped
    step of a seed's rows draws the single run's masks, so the cells batch (no fallback) and
    equal online.run per cell."""
    import warnings
    from hgtoolkit import batched
    from test_models import CE, _same_online, cnn, data
    tr, va = data()
    p = problems.from_module(cnn(0.3), CE, tr, va, batch_size=8, seed=3, device="cuda")
    cells = [dict(method=m, lr=0.2, hypergrad_lr=1e-2, steps=6, seed=s, optimizer="momentum")
             for m, s in (("hd", 1), ("rtho", 0), ("marthe", 1))]
    single = [online.run(p.resample(c["seed"]), **c) for c in cells]
    monkeypatch.setattr(online, "run", lambda *a, **k: pytest.fail("a cell ran one by one"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = batched.run_online_batch(p.resample, cells, batch=True)
    for r, s in zip(res, single):
        _same_online(r, s)
