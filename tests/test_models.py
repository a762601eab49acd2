"""from_module: any torch.nn.Module as a Problem, its buffers part of the training state and its
randomness a pure function of (seed, t) (docs/models.md)."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from hgtoolkit import batched, exact, online, problems, towers, trajectory

F64 = torch.float64
CE = nn.functional.cross_entropy


def rel(a, b):
    return float((a - b).norm() / b.norm())


def cnn(dropout=0.3, seed=0):
    """Conv → BatchNorm2d → ReLU → Dropout → Linear → BatchNorm1d(momentum=None) → Tanh → Linear."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    layers += [nn.Flatten(), nn.Linear(18, 4), nn.BatchNorm1d(4, momentum=None), nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).to(F64)


def data(n_train=24, n_val=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_train + n_val, 1, 5, 5, generator=g, dtype=F64)
    Y = torch.randint(3, (n_train + n_val,), generator=g)
    return (X[:n_train], Y[:n_train]), (X[n_train:], Y[n_train:])


LRS = torch.tensor([0.3, 0.2, 0.25, 0.15, 0.3, 0.2, 0.1, 0.2], dtype=F64)  # T = 8, 3 minibatches per epoch


@pytest.fixture(scope="module")
def bn_dropout():
    model = cnn()
    before = copy.deepcopy(model.state_dict())
    train_data, val_data = data()
    problem = problems.from_module(model, CE, train_data, val_data, batch_size=8, seed=3)
    return model, before, problem, train_data, val_data


def test_bn_dropout_cnn_every_mode_agrees(bn_dropout):
    model, before, problem, train_data, val_data = bn_dropout
    assert problem.stateful and problem.info["random"]
    assert sorted(problem.buffers0) == ["1.num_batches_tracked", "1.running_mean", "1.running_var",
                                        "6.num_batches_tracked", "6.running_mean", "6.running_var"]
    rev = exact.hypergradient(problem, LRS, "momentum")
    again = exact.hypergradient(problem, LRS, "momentum")
    assert torch.equal(rev.grad, again.grad) and torch.equal(rev.value, again.value)
    for kw in ({"checkpoint": 3}, {"checkpoint": "binomial", "snapshots": 2}):
        r = exact.hypergradient(problem, LRS, "momentum", **kw)
        assert r.recomputed_steps > 0
        assert rel(r.grad, rev.grad) < 1e-10, kw
    for mode in ("forward", "autograd"):
        r = exact.hypergradient(problem, LRS, "momentum", mode=mode)
        assert rel(r.grad, rev.grad) < 1e-10, mode
        assert abs(float(r.value - rev.value)) < 1e-12
    fd = exact.finite_difference(problem, LRS, "momentum")
    assert rel(fd, rev.grad) < 1e-6
    v = torch.linspace(-1, 1, len(LRS), dtype=F64)
    _, dd = exact.directional_derivative(problem, LRS, v, "momentum")
    assert abs(float(dd - rev.grad @ v)) < 1e-10 * float(rev.grad.norm())
    # the user's module: parameters and buffers untouched, in its own mode
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.training
    # the running statistics really are differentiated: detached, the hypergradient moves
    detached = problems.from_module(model, CE, train_data, val_data, batch_size=8, seed=3,
                                    differentiate_buffers=False)
    d = exact.hypergradient(detached, LRS, "momentum")
    assert torch.equal(d.value, rev.value)
    assert rel(d.grad, rev.grad) > 1e-3
    assert rel(exact.hypergradient(detached, LRS, "momentum", mode="autograd").grad, d.grad) < 1e-10


def test_result_buffers_record_and_lrsopt(bn_dropout, tmp_path):
    """β_T comes with the hypergradient (and its record); LRS-OPT reads the metrics with it."""
    import hgtoolkit
    _, _, problem, _, _ = bn_dropout
    r = exact.hypergradient(problem, LRS, "momentum", checkpoint=3)
    ref = trajectory.train(problem, LRS, "momentum").state[trajectory.BUFFERS]
    assert all(torch.equal(r.buffers[k], ref[k]) for k in ref)
    back = hgtoolkit.load(r.save(tmp_path / "r"))
    assert all(torch.equal(back.buffers[k], ref[k]) for k in ref)
    s = hgtoolkit.optimize_schedule(problem, LRS, optimizer="momentum", outer_steps=2)
    assert s.status == "completed" and s.metrics[0]["val_loss"] == float(r.value)


def test_train_carries_buffers_and_leaves_the_rng_alone(bn_dropout):
    _, _, problem, _, _ = bn_dropout
    rng = torch.random.get_rng_state()
    r = trajectory.train(problem, LRS, "momentum")
    assert torch.equal(torch.random.get_rng_state(), rng)
    b = r.state[trajectory.BUFFERS]
    assert b["1.num_batches_tracked"].dtype == torch.int64 and int(b["1.num_batches_tracked"]) == len(LRS)
    assert not torch.equal(b["1.running_mean"], problem.buffers0["1.running_mean"])
    assert torch.equal(r.value, exact.hypergradient(problem, LRS, "momentum").value)
    m = problem.metrics(r.params, b)
    assert m["val_loss"] == float(r.value)
    assert problem.initial_metrics()["val_loss"] == float(problem.val_loss(problem.params0, problem.buffers0))


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_full_batch_value_is_a_plain_torch_loop(optimizer):
    """No dropout, full batches: f(η) = E(w_T) of torch's own loop on a copy of the module (train
    mode, torch's BatchNorm kernel updating the running statistics, validation in eval mode)."""
    model = cnn(dropout=0)
    train_data, val_data = data()
    problem = problems.from_module(model, CE, train_data, val_data, batch_size=24)
    value = exact.hypergradient(problem, LRS, optimizer).value
    twin = copy.deepcopy(model).train()
    opt = torch.optim.SGD(twin.parameters(), lr=1.0, momentum=0.9 if optimizer == "momentum" else 0)
    for lr in LRS:
        opt.param_groups[0]["lr"] = float(lr)
        opt.zero_grad()
        CE(twin(train_data[0]), train_data[1]).backward()
        opt.step()
    twin.eval()
    with torch.no_grad():
        ref = CE(twin(val_data[0]), val_data[1])
    assert abs(float(value - ref)) < 1e-10 * abs(float(ref))
    r = trajectory.train(problem, LRS, optimizer)
    for k, buf in twin.named_buffers():
        got = r.state[trajectory.BUFFERS][k]
        assert torch.equal(got, buf) if not buf.is_floating_point() else torch.allclose(got, buf, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layer,shape", [
    (nn.BatchNorm1d(3), (6, 3)), (nn.BatchNorm1d(3, momentum=None), (6, 3, 4)),
    (nn.BatchNorm2d(3, affine=False), (5, 3, 2, 2)), (nn.BatchNorm3d(3, momentum=0.3), (4, 3, 2, 2, 2)),
    (nn.BatchNorm2d(3, track_running_stats=False), (5, 3, 2, 2)),
])
def test_batchnorm_family_matches_torch(layer, shape):
    """Three training steps of one layer: the loss, its gradient and the running statistics are
    torch's (to rounding), and eval mode reads the statistics carried."""
    layer = layer.to(F64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=F64) * 2 + 1
    target = torch.randn(*shape, generator=g, dtype=F64)
    mse = nn.functional.mse_loss
    model = nn.Sequential(nn.Identity(), layer) if layer.affine else nn.Sequential(nn.Linear(shape[-1], shape[-1]).to(F64), layer)
    problem = problems.from_module(model, mse, (x, target), (x, target), batch_size=shape[0])
    assert problem.stateful == layer.track_running_stats
    lrs = torch.tensor([0.1, 0.2, 0.05], dtype=F64)
    r = trajectory.train(problem, lrs)
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for lr in lrs:
        opt.param_groups[0]["lr"] = float(lr)
        opt.zero_grad()
        mse(twin(x), target).backward()
        opt.step()
    for k, p in twin.named_parameters():
        assert torch.allclose(r.params[k], p, rtol=1e-12, atol=1e-14), k
    if problem.stateful:
        for k, buf in twin.named_buffers():
            got = r.state[trajectory.BUFFERS][k]
            assert torch.allclose(got.to(F64), buf.to(F64), rtol=1e-12, atol=1e-14), k
    with torch.no_grad():
        ref = mse(twin.eval()(x), target)
    assert abs(float(r.value - ref)) < 1e-12 * max(1.0, abs(float(ref)))


@pytest.mark.parametrize("p", [0.0, 0.4, 1.0])
def test_functional_dropout_is_torchs_on_the_cpu(p):
    """from_module's copy draws nn.Dropout's mask with bernoulli_ (the same in and outside vmap,
    on every device): on the CPU that is torch's own layer, output, gradient and RNG use, bit for
    bit; in eval mode the identity."""
    from hgtoolkit._module import FunctionalDropout, _functional_copy
    layer = nn.Dropout(p)
    twin, _ = _functional_copy(nn.Sequential(nn.Linear(3, 3), layer, nn.Dropout2d(0.5)), torch.device("cpu"))
    assert type(twin[1]) is FunctionalDropout and type(twin[2]) is nn.Dropout2d
    x = torch.randn(6, 5, 4, dtype=F64)
    out = []
    for f in (layer, twin[1]):
        xr = x.clone().requires_grad_()
        torch.manual_seed(7)
        y = f(xr)
        out.append((y, torch.autograd.grad((y * x).sum(), xr)[0], torch.random.get_rng_state()))
    assert all(torch.equal(a, b) for a, b in zip(*out))
    assert torch.equal(twin[1].eval()(x), x)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class Reassign(nn.Linear):
    def __init__(self):
        super().__init__(3, 2)
        self.register_buffer("last", torch.zeros(3))

    def forward(self, x):
        self.last = x.mean(0).detach()
        return super().forward(x)


@pytest.mark.parametrize("layer,name", [(Counter(), "calls"), (Reassign(), "last")])
def test_buffer_written_in_forward_is_refused(layer, name):
    model = nn.Sequential(nn.Linear(3, 3), layer)
    x, y = torch.randn(8, 3), torch.randint(2, (8,))
    with pytest.raises(ValueError, match=rf"layer '1' \({type(layer).__name__}\) writes its buffer '{name}'"):
        problems.from_module(model, CE, (x, y), (x, y), batch_size=4)


def test_constant_buffers_and_datasets():
    """A buffer never written is a constant (the problem stays plain, batched-ready); a map-style
    dataset gives the problem of its tensors."""
    class Shift(nn.Linear):
        def __init__(self):
            super().__init__(3, 2)
            self.register_buffer("offset", torch.ones(3))

        def forward(self, x):
            return super().forward(x - self.offset)

    torch.manual_seed(0)
    model = nn.Sequential(Shift()).to(F64)
    x, y = torch.randn(12, 3, dtype=F64), torch.randint(2, (12,))
    p = problems.from_module(model, CE, (x, y), (x, y), batch_size=4)
    ds = torch.utils.data.TensorDataset(x, y)
    q = problems.from_module(model, CE, ds, ds, batch_size=4)
    assert not p.stateful and p.batch is not None
    lrs = torch.full((5,), 0.1, dtype=F64)
    assert torch.equal(exact.hypergradient(p, lrs).grad, exact.hypergradient(q, lrs).grad)


def test_train_loss_of_a_model_that_draws_under_vmap():
    """Every row of a vmap over one problem's train_loss draws the masks of (seed, t): allowed with
    randomness="same", refused (ValueError naming the way out) where rows would draw apart."""
    tr, va = data()
    p = problems.from_module(dropout_mlp(), CE, tr, va, batch_size=8, seed=3)
    W = {k: torch.stack([v, v]) for k, v in p.params0.items()}
    same = torch.func.vmap(lambda w: p.train_loss(w, 2), randomness="same")(W)
    assert torch.equal(same, p.train_loss(p.params0, 2).expand(2))
    with pytest.raises(ValueError, match="randomness='same'.*rng_seed"):
        torch.func.vmap(lambda w: p.train_loss(w, 2), randomness="different")(W)


def test_dropout_only_model_replays_its_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).to(F64)
    x, y = torch.randn(16, 4, dtype=F64), torch.randint(2, (16,))
    p = problems.from_module(model, CE, (x, y), (x, y), batch_size=4, seed=5)
    assert not p.stateful and p.info["random"] and p.batch is not None and p.val_batch is None
    assert p.rng_seed(2) == p.rng_seed(2) != p.resample(6).rng_seed(2) and p.rng_seed(2) != p.rng_seed(3)
    lrs = torch.full((9,), 0.3, dtype=F64)
    ref = exact.hypergradient(p, lrs).grad
    assert rel(exact.hypergradient(p, lrs, checkpoint=2).grad, ref) < 1e-12
    assert rel(exact.hypergradient(p, lrs, mode="forward").grad, ref) < 1e-10
    assert rel(exact.finite_difference(p, lrs), ref) < 1e-6
    assert not torch.equal(p.train_loss(p.params0, 0), p.train_loss(p.params0, 3 * 4))  # epochs differ
    assert torch.equal(p.train_loss(p.params0, 2), p.train_loss(p.params0, 2))


def test_online_methods_and_towers_carry_the_buffers(bn_dropout):
    """HD/RTHO/MARTHE and a tower with hypergradient LR 0 are the training run with buffers and
    masks of :func:`trajectory.train`, value for value; learning, they stay finite."""
    model, before, problem, _, _ = bn_dropout
    lrs = torch.full((8,), 0.2, dtype=F64)
    ref = trajectory.train(problem, lrs, "momentum")
    for method in ("hd", "rtho", "marthe"):
        r = online.run(problem, method, "momentum", steps=8, lr=0.2, hypergrad_lr=0.0)
        assert r.final_val_loss == float(ref.value), method
        assert np.array_equal(r.train_losses, ref.train_losses.numpy()), method
        learnt = online.run(problem, method, "momentum", steps=8, lr=0.2, hypergrad_lr=1e-3)
        assert np.isfinite(learnt.final_val_loss) and not np.all(learnt.lrs == 0.2)
    cells = [{"method": "marthe", "lr": 0.2, "hypergrad_lr": 0.0, "steps": 8, "optimizer": "momentum"}]
    (b,) = batched.run_online_batch(problem.resample, cells)  # seed 0: run one by one
    assert b.final_val_loss == online.run(problem.resample(0), **cells[0]).final_val_loss
    sgd = trajectory.train(problem, lrs)
    assert towers.run(problem, "sgd(lr=0.2) / sgd(lr=0)", steps=8).value == float(sgd.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _same_online(a, b, tol=1e-12):
    assert a.steps_run == b.steps_run and a.diverged_at == b.diverged_at
    for key in ("lrs", "hypergrads", "train_losses", "val_losses"):
        x, y = getattr(a, key), getattr(b, key)
        assert np.allclose(x, y, rtol=tol, atol=tol * np.nanmax(np.abs(y)), equal_nan=True), key


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_rtho_is_the_exact_derivative_through_the_running_statistics(bn_dropout, optimizer):
    """β = 0 freezes η: RTHO's tangent z_t = (z_w, z_b) is d(w_t, b_t)/dη for the constant
    schedule, so h_t = dE(w_t, b_t)/dη, the exact forward-mode directional derivative along 1
    (= the sum of the exact hypergradient), the path through the running statistics included;
    with the statistics detached it is the detached problem's, which differs."""
    model, _, problem, train_data, val_data = bn_dropout
    lr, T = 0.2, 8
    for method, extra in (("rtho", {}), ("marthe", {"mu": 1.0})):
        r = online.run(problem, method, optimizer, lr=lr, hypergrad_lr=0.0, steps=T, **extra)
        for t in (1, 2, 5, T):
            _, dd = exact.directional_derivative(problem, torch.full((t,), lr, dtype=F64),
                                                 torch.ones(t, dtype=F64), optimizer)
            assert abs(r.hypergrads[t - 1] - float(dd)) <= 1e-10 * abs(float(dd)), (method, t)
    full = exact.hypergradient(problem, torch.full((T,), lr, dtype=F64), optimizer)
    assert abs(r.hypergrads[-1] - float(full.grad.sum())) <= 1e-10 * float(full.grad.abs().sum())
    detached = problems.from_module(model, CE, train_data, val_data, batch_size=8, seed=3,
                                    differentiate_buffers=False)
    d = online.run(detached, "rtho", optimizer, lr=lr, hypergrad_lr=0.0, steps=T)
    ref = exact.hypergradient(detached, torch.full((T,), lr, dtype=F64), optimizer).grad.sum()
    assert abs(d.hypergrads[-1] - float(ref)) <= 1e-10 * abs(float(ref))
    assert abs(d.hypergrads[-1] - r.hypergrads[-1]) > 1e-3 * abs(r.hypergrads[-1])


def test_marthe_mu0_is_hd_and_mu1_is_rtho_on_a_stateful_problem(bn_dropout):
    _, _, problem, _, _ = bn_dropout
    kw = dict(optimizer="momentum", lr=0.2, hypergrad_lr=1e-2, steps=8)
    hd, rtho = online.run(problem, "hd", **kw), online.run(problem, "rtho", **kw)
    assert not np.allclose(hd.hypergrads, rtho.hypergrads)
    _same_online(online.run(problem, "marthe", mu=0.0, **kw), hd)
    _same_online(online.run(problem, "marthe", mu=1.0, **kw), rtho)
    # the μ-rule path: the tangent (z_b included) computed and scaled by the rule's μ
    _same_online(online.run(problem, "marthe", mu_rule=lambda mu, c, s: (0.0, c), **kw), hd)
    _same_online(online.run(problem, "marthe", mu_rule=lambda mu, c, s: (1.0, c), **kw), rtho)


def test_analysis_of_online_estimates_on_a_stateful_problem(bn_dropout):
    """analyse_online replays the run with the buffers and their tangent: RTHO's h is the exact
    constant-LR reference d⁽ᶜ⁾ (for any β), HD's (objective "val") the one-step d⁽¹⁾, and the
    references meet the exact hypergradient where they must (d⁽¹⁾_{T−1} = g_{T−1},
    d⁽ᶜ⁾_{T−1} = Σ g)."""
    from hgtoolkit import analysis
    _, _, problem, _, _ = bn_dropout
    kw = dict(optimizer="momentum", lr=0.2, hypergrad_lr=1e-2, steps=8)
    rtho = online.run(problem, "rtho", **kw)
    rep = analysis.analyse_online(rtho, problem)
    assert rel(torch.as_tensor(rep.estimates), torch.as_tensor(rep.constant_lr)) < 1e-10
    g = exact.hypergradient(problem, torch.as_tensor(rtho.lrs), "momentum").grad.numpy()
    assert np.allclose(rep.full_horizon, g, rtol=1e-12, atol=0)
    assert abs(rep.one_step[-1] - g[-1]) <= 1e-10 * abs(g[-1])
    assert abs(rep.constant_lr[-1] - g.sum()) <= 1e-10 * np.abs(g).sum()
    hd = analysis.analyse_online(online.run(problem, "hd", **kw), problem)
    assert rel(torch.as_tensor(hd.estimates), torch.as_tensor(hd.one_step)) < 1e-10
    assert rep.summary["full_horizon"]["n_steps"] == 8


@pytest.mark.parametrize("stateful", [True, False], ids=["batchnorm+dropout", "dropout"])
def test_truncated_horizons_on_a_stateful_problem(bn_dropout, stateful):
    """d⁽ᴷ⁾_t = ∂E(w_{t+K}, b_{t+K})/∂η_t: the exact hypergradient of the run cut after t + K
    steps, the running statistics included; K = 1 is d⁽¹⁾ and K = T the hypergradient. Without
    buffers the columns are one vmap (randomness="same") of train_loss, every column drawing the
    run's masks of (seed, t)."""
    from hgtoolkit import analysis, horizons
    _, _, problem, tr, va = bn_dropout
    if not stateful:
        problem = problems.from_module(dropout_mlp(), CE, tr, va, batch_size=8, seed=3)
    lad = horizons.truncated_ladder(problem, LRS, [1, 3, len(LRS)], "momentum")
    assert torch.equal(lad[len(LRS)], exact.hypergradient(problem, LRS, "momentum").grad)
    refs = analysis.exact_references(problem, LRS, "momentum")
    assert rel(lad[1], refs.one_step) < 1e-12
    for t in (0, 2, 4):
        cut = exact.hypergradient(problem, LRS[:t + 3], "momentum").grad[t]
        assert abs(float(lad[3][t] - cut)) <= 1e-10 * abs(float(cut)), t


def test_baselines_carry_the_buffers(bn_dropout):
    """A schedule peer is hgtoolkit.train with its buffers; a torch.optim peer carries them too."""
    from hgtoolkit import baselines
    _, _, problem, _, _ = bn_dropout
    r = baselines.run_peer(problem, "constant", 8, lr=0.2, optimizer="momentum", eval_every=4)
    ref = trajectory.train(problem, torch.full((8,), 0.2, dtype=F64), "momentum")
    assert r.val_losses[-1] == float(ref.value)
    assert np.array_equal(r.train_losses, ref.train_losses.numpy())
    pytest.importorskip("dadaptation")
    q = baselines.run_peer(problem, "dadapt_sgd", 8, eval_every=8)  # momentum 0: SGD at its LRs
    ref = trajectory.train(problem, torch.as_tensor(q.lrs), "sgd")
    assert abs(q.val_losses[-1] - float(ref.value)) < 1e-12
    assert np.allclose(q.train_losses, ref.train_losses.numpy(), rtol=1e-12, atol=0)


def dropout_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(25, 6), nn.Tanh(), nn.Dropout(0.4), nn.Linear(6, 3)).to(F64)


@pytest.mark.parametrize("model,val_mode,diverging", [
    (lambda: cnn(dropout=0), "eval", dict(lr=0.2, hypergrad_lr=30.0)),
    (cnn, "eval", dict(lr=2.0, hypergrad_lr=30.0)),
    (dropout_mlp, "train", dict(lr=0.2, hypergrad_lr=300.0)),
], ids=["batchnorm", "batchnorm+dropout", "dropout,val-train"])
def test_batched_stateful_and_random_runs_equal_single_runs(monkeypatch, model, val_mode, diverging):
    """A BatchNorm model has batch/batch_loss(w, x, b), a model with dropout rng_seed(t) too: the
    cells run as one vmapped step (b and z_b per row; the rows of a seed drawing its masks in one
    call, randomness="same"), equal to online.run per cell (seeds 0, 1, 2 in one batch,
    HD/RTHO/MARTHE, the train objective, a run that diverges and leaves the batch); with
    val_mode="train" E draws its own masks inside the vmap."""
    tr, va = data()
    p = problems.from_module(model(), CE, tr, va, batch_size=8, seed=3, val_mode=val_mode)
    assert p.batch is not None and p.val_batch is None
    assert (p.rng_seed is not None) == p.info.get("random", False)
    kw = dict(lr=0.2, steps=8, optimizer="momentum")
    cells = [dict(method="hd", hypergrad_lr=1e-2, seed=1, **kw), dict(method="rtho", hypergrad_lr=1e-2, seed=0, **kw),
             dict(method="rtho", seed=1, **{**kw, **diverging}), dict(method="marthe", hypergrad_lr=1e-2, seed=2, **kw),
             dict(method="marthe", mu=0.5, hypergrad_lr=1e-2, seed=0, **kw),
             dict(method="rtho", hypergrad_lr=1e-2, objective="train", **kw)]
    with pytest.warns(online.DivergenceWarning):
        single = [online.run(p.resample(c.get("seed", 0)), **c) for c in cells]
    assert 1 < single[2].diverged_at < 8 and all(r.diverged_at is None for r in single[:2])
    monkeypatch.setattr(online, "run", lambda *a, **k: pytest.fail("a cell ran one by one"))
    with pytest.warns(online.DivergenceWarning):
        res = batched.run_online_batch(p.resample, cells, batch=True)
    for r, s in zip(res, single):
        _same_online(r, s)


def test_batched_random_runs_fall_back_when_the_draws_differ():
    """Problems whose draws the shared vmapped step cannot give (here E's masks: val_mode="train"
    with each problem's own seed) run one by one, with a warning that says so, exactly."""
    tr, va = data()
    cells = [dict(problem=problems.from_module(dropout_mlp(), CE, tr, va, batch_size=8, seed=s, val_mode="train"),
                  method="rtho", lr=0.2, hypergrad_lr=1e-2, steps=4, seed=0) for s in (0, 1)]
    with pytest.warns(RuntimeWarning, match="draws random numbers.*one by one"):
        res = batched.run_online_batch(None, cells, batch=True)
    for r, c in zip(res, cells):
        _same_online(r, online.run(**c), tol=0)


def test_val_mode_train_reads_no_running_statistics():
    """val_mode="train": E uses the validation batch's statistics (and dropout from its own fixed
    seed), so the hypergradient has no path through the running statistics."""
    model = cnn()
    tr, va = data()
    kw = dict(batch_size=8, seed=3, val_mode="train")
    p = problems.from_module(model, CE, tr, va, **kw)
    q = problems.from_module(model, CE, tr, va, differentiate_buffers=False, **kw)
    lrs = LRS[:5]
    a, b = exact.hypergradient(p, lrs, "momentum"), exact.hypergradient(q, lrs, "momentum")
    assert torch.equal(a.value, b.value) and rel(a.grad, b.grad) < 1e-14
    assert torch.equal(p.val_loss(p.params0, p.buffers0), p.val_loss(p.params0, p.buffers0))
    assert rel(exact.hypergradient(p, lrs, "momentum", mode="forward").grad, a.grad) < 1e-10


_XS = torch.randn(12, 3, generator=torch.Generator().manual_seed(0), dtype=F64).abs() + 0.5


def _ema_problem(val_at=None):
    """A stateful problem whose *training* loss reads its buffer (unlike BatchNorm's training
    pass): L_t = Σ x_t (w − m)² + Σ sin w with m' = 0.7 m + 0.3 w ⊙ x_t; E(w, m) = ‖w − ½‖² + ‖m‖²,
    or (``val_at=t``) step t's training loss, whose derivative is then objective="train"'s h_t.
    ``batch``/``batch_loss``: for batched runs."""
    def batch_loss(w, batch, b):
        x, m = batch[0], b["m"]
        return (x * (w["w"] - m) ** 2).sum() + torch.sin(w["w"]).sum(), {"m": 0.7 * m + 0.3 * w["w"] * x}

    def val(w, b):
        if val_at is not None:
            return batch_loss(w, (_XS[val_at % 12],), b)[0]
        return ((w["w"] - 0.5) ** 2).sum() + (b["m"] ** 2).sum()
    p = problems.Problem({"w": torch.tensor([0.3, -0.2, 0.8], dtype=F64)},
                         lambda w, t, b: batch_loss(w, (_XS[t % 12],), b), val,
                         buffers0={"m": torch.tensor([0.1, 0.0, -0.1], dtype=F64)})
    p.batch, p.batch_loss = (lambda t: (_XS[t % 12],)), batch_loss
    return p


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_train_objective_includes_the_buffers_share(optimizer):
    """objective="train" with a training loss that reads its buffers: RTHO's h_t (β = 0) is
    dL_t(w_t, b_t)/dη for the constant schedule, ⟨∂L_t/∂b_t, z_{t,b}⟩ included — the exact
    directional derivative of the problem whose E is step t's training loss."""
    lr, T = 0.05, 6
    r = online.run(_ema_problem(), "rtho", optimizer, lr=lr, hypergrad_lr=0.0, steps=T, objective="train")
    for t in (1, 2, 4, T):
        _, dd = exact.directional_derivative(_ema_problem(val_at=t), torch.full((t,), lr, dtype=F64),
                                             torch.ones(t, dtype=F64), optimizer)
        assert abs(r.hypergrads[t - 1] - float(dd)) <= 1e-12 * abs(float(dd)), t
    kw = dict(optimizer=optimizer, lr=lr, hypergrad_lr=1e-3, steps=T, objective="train")
    hd, rtho = online.run(_ema_problem(), "hd", **kw), online.run(_ema_problem(), "rtho", **kw)
    _same_online(online.run(_ema_problem(), "marthe", mu=0.0, **kw), hd)
    _same_online(online.run(_ema_problem(), "marthe", mu=1.0, **kw), rtho)


def test_batched_train_objective_with_the_buffers_share_equals_single_runs(monkeypatch):
    cells = [dict(method=m, lr=0.05, hypergrad_lr=h, steps=6, objective="train", optimizer="momentum")
             for m, h in (("rtho", 0.0), ("marthe", 1e-3), ("hd", 1e-3))]
    single = [online.run(_ema_problem(), **c) for c in cells]
    monkeypatch.setattr(online, "run", lambda *a, **k: pytest.fail("a cell ran one by one"))
    res = batched.run_online_batch(lambda seed: _ema_problem(), cells, batch=True)
    for a, b in zip(res, single):
        _same_online(a, b)
