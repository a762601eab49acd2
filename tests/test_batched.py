"""hgtoolkit.batched: R online runs as one vmapped computation == R separate online.run calls."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from hgtoolkit import batched, online, problems
from hgtoolkit.errors import DivergenceWarning

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: extra torch threads only add synchronisation (and stall on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ARRAYS = ("lrs", "hypergrad_lrs", "mus", "hypergrads", "train_losses", "eval_steps", "val_losses", "val_accuracy")


def _data(n=96, dim=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    return x[:64], y[:64], x[64:], y[64:]


X_TR, Y_TR, X_VAL, Y_VAL = _data()


def factory(seed):
    """Same data for every seed; the seed sets w_0 (and the minibatch order)."""
    return problems.classification_mlp(X_TR, Y_TR, X_VAL, Y_VAL, hidden=(8,), batch_size=16, seed=seed)


def single(cell, keep_params=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        return online.run(factory(cell.get("seed", 0)), **{"seed": 0, **cell}, keep_params=keep_params)


def batch(cells, **kw):
    """The vmapped batch itself (on the CPU run_online_batch would loop over online.run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        return batched.run_online_batch(factory, cells, **{"batch": True, **kw})


def assert_same_run(a, b, atol):
    assert a.config == b.config
    assert a.diverged_at == b.diverged_at and a.divergence == b.divergence
    for k in ARRAYS:
        x, y = getattr(a, k), getattr(b, k)
        if x is None or y is None:
            assert x is None and y is None, k
            continue
        assert x.shape == y.shape, k
        np.testing.assert_allclose(x, y, rtol=atol, atol=atol, equal_nan=True, err_msg=k)
    assert (math.isnan(a.final_lr) and math.isnan(b.final_lr)) or abs(a.final_lr - b.final_lr) <= atol


def test_problem_batch_loss_is_the_training_loss():
    p = factory(3).resample(5)
    w = p.params0
    for t in (0, 3, 11):
        assert torch.equal(p.train_loss(w, t), p.batch_loss(w, p.batch(t)))
    assert p.metrics(w) == {k: float(v) for k, v in p.metric_tensors(w).items()}
    with pytest.raises(TypeError, match="batch and batch_loss go together"):
        problems.Problem(w, p.train_loss, p.val_loss, batch=p.batch)


def test_batched_runs_equal_separate_runs_float64():
    # seeds × β × methods (RTHO, MARTHE fixed μ, MARTHE adaptive μ and β, HD), both objectives
    cells = [dict(method=m, lr=0.05, hypergrad_lr=b, steps=20, seed=s, **kw)
             for m, kw in (("rtho", {}), ("marthe", {"mu": 0.7}), ("hd", {}))
             for b in (1e-3, 3e-2) for s in (0, 1)]
    cells += [dict(method="marthe", lr=0.05, hypergrad_lr="auto", kappa=1e-3, steps=20, seed=2, eval_every=3),
              dict(method="marthe", lr=0.02, hypergrad_lr=1e-2, mu="auto", steps=20, seed=1),
              dict(method="hd", lr=0.05, hypergrad_lr=1e-2, steps=20, seed=1, objective="train", lr_floor=None),
              dict(method="hd", lr=0.05, hypergrad_lr=3e-2, steps=20, seed=3, objective="train", lr_floor=None)]
    results = batch(cells)
    assert len(results) == len(cells)
    for cell, r in zip(cells, results):
        assert not r.diverged
        assert_same_run(r, single(cell), atol=1e-12)
    # the β grid does make a difference (the test would be vacuous otherwise)
    assert abs(results[0].lrs[-1] - results[2].lrs[-1]) > 1e-3


def test_a_diverging_run_is_recorded_alone_and_the_others_continue():
    cells = [dict(method="rtho", lr=0.05, hypergrad_lr=b, steps=25, seed=s)
             for b, s in ((1e-3, 0), (1e4, 0), (1e-2, 1), (1e8, 1))]
    cells.append(dict(method="rtho", lr=0.05, hypergrad_lr=1e-3, steps=25, seed=0, lr_max=0.0501))
    with pytest.warns(DivergenceWarning, match="online rtho run stopped"):
        results = batched.run_online_batch(factory, cells, batch=True)
    assert [r.diverged for r in results] == [False, True, False, True, True]
    for cell, r in zip(cells, results):
        ref = single(cell)
        assert_same_run(r, ref, atol=1e-12)
        if not r.diverged:  # no NaN leaked from the diverged runs into the others
            assert np.isfinite(r.val_losses).all() and np.isfinite(r.lrs).all()
            assert r.steps_run == 25 and r.eval_steps[-1] == 25
        else:
            assert r.steps_run == r.diverged_at < 25 and math.isnan(r.final_lr)
    assert "learning rate" in results[4].divergence  # |η| > lr_max, per run


def test_test_functions_are_batched_bit_for_bit():
    beale = problems.get("beale")
    cells = [dict(method=m, lr=1e-3, hypergrad_lr=b, steps=60, **kw)
             for m, kw in (("hd", {}), ("rtho", {}), ("marthe", {"mu": "auto"}))
             for b in (1e-7, 1e-5, 1e-3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        results = batched.run_online_batch(lambda seed: beale, cells)
        for cell, r in zip(cells, results):
            ref = online.run(beale, **{"seed": 0, **cell}, keep_params=False)
            assert_same_run(r, ref, atol=0.0)
    assert sum(r.diverged for r in results) >= 3 and sum(not r.diverged for r in results) >= 3


def test_chunks_keep_params_and_cell_objects():
    cells = [dict(method="marthe", lr=0.05, hypergrad_lr=1e-2, mu=0.5, steps=8, seed=s) for s in range(5)]
    whole = batch(cells)
    chunked = batch(cells, max_batch=2, keep_params=True)
    for a, b, cell in zip(whole, chunked, cells):
        assert_same_run(a, b, atol=1e-12)
        assert a.final_params is None
        ref = single(cell, keep_params=True)
        for k in ref.final_params:
            torch.testing.assert_close(b.final_params[k], ref.final_params[k], rtol=0, atol=1e-12)

    class Cell:  # what hgtoolkit.sweep hands over: an object with .params
        def __init__(self, params):
            self.params = params

    via_objects = batch([Cell(c) for c in cells[:2]])
    assert_same_run(via_objects[1], whole[1], atol=1e-12)


def test_problems_with_seed_dependent_data_run_one_by_one():
    # synthetic_classification draws its data from the seed: no shared validation set
    fac = lambda seed: problems.synthetic_classification(seed=seed, hidden=(4,))
    cells = [dict(method="rtho", lr=0.05, hypergrad_lr=1e-3, steps=5, seed=s) for s in (0, 1)]
    results = batched.run_online_batch(fac, cells, batch=True)
    for cell, r in zip(cells, results):
        ref = online.run(fac(cell["seed"]), **cell, keep_params=False)
        assert_same_run(r, ref, atol=0.0)


@pytest.mark.parametrize("cells, exc, match", [
    ([{"method": "hd", "lr": 0.1, "steps": 3, "hypergrad_lr": 1e-3, "momentum": 0.9}], TypeError,
     r"cells\[0\]: online.run\(\) got an unexpected keyword argument 'momentum'"),
    ([{"method": "hd", "steps": 3, "hypergrad_lr": 1e-3}], TypeError, "missing required keyword argument 'lr'"),
    ([{"method": "hd", "lr": 0.1, "steps": 3, "hypergrad_lr": -1.0}], ValueError, "hypergrad_lr must be a number ≥ 0"),
    ([["not", "a", "cell"]], TypeError, r"cells\[0\] must be a mapping"),
    ({"method": "hd"}, TypeError, "cells must be a sequence"),
])
def test_bad_input_is_rejected_with_the_argument_named(cells, exc, match):
    with pytest.raises(exc, match=match):
        batched.run_online_batch(factory, cells)


def test_bad_factory_and_max_batch():
    with pytest.raises(TypeError, match="problem_factory"):
        batched.run_online_batch("mnist", [])
    with pytest.raises(ValueError, match="max_batch"):
        batched.run_online_batch(factory, [], max_batch=0)
    assert batched.run_online_batch(factory, []) == []


def test_on_the_cpu_a_model_batch_is_a_loop_of_single_runs_by_default():
    """batch=None picks the faster path: for a model on the CPU, online.run run by run (the same
    results as the vmapped batch, to rounding); row-wise problems stay batched natively."""
    cells = [dict(method=m, lr=0.05, hypergrad_lr=1e-3, steps=6, seed=s) for m in ("hd", "rtho") for s in (0, 1)]
    auto, forced = batched.run_online_batch(factory, cells), batch(cells)
    for cell, a, b in zip(cells, auto, forced):
        assert_same_run(a, single(cell), atol=0.0)
        assert_same_run(a, b, atol=1e-12)
    assert batched.batching_pays(problems.get("beale")) and not batched.batching_pays(factory(0))


def test_functions_side_by_side_in_one_batch_equal_single_runs():
    """Cells that name their own row-wise problem (three test functions) run as ONE batch, each
    function once per step on its rows: every run equals its single run bit for bit, runs that
    diverge at different steps included, and results come back in the cells' order."""
    fns = ("bukin_sharp", "beale", "bukin_smooth")
    probs = {fn: problems.get(fn) for fn in fns}
    cells = [dict(problem=probs[fn], method=m, lr=1e-3, hypergrad_lr=b, steps=40, lr_max=0.1, **kw)
             for b in (1e-6, 1e-3) for fn in fns  # interleaved: the batch sorts its rows by function
             for m, kw in (("hd", {}), ("rtho", {}), ("marthe", {"mu": "auto"}))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        results = batched.run_online_batch(None, cells)
        for cell, r in zip(cells, results):
            ref = online.run(cell["problem"], **{k: v for k, v in cell.items() if k != "problem"},
                             seed=0, keep_params=False)
            assert_same_run(r, ref, atol=0.0)
    steps = {r.diverged_at for r in results if r.diverged}
    assert len(steps) >= 2 and sum(not r.diverged for r in results) >= 3
    with pytest.raises(TypeError, match="problem"):
        batched.run_online_batch(None, [dict(method="hd", lr=1e-3, steps=3)])
    with pytest.raises(TypeError, match=r"cells\[0\]\['problem'\]"):
        batched.run_online_batch(None, [dict(problem="beale", method="hd", lr=1e-3, steps=3)])
