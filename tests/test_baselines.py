"""Peers as baselines: schedule families vs torch.optim.lr_scheduler, the exact-engine replay,
learning-rate-free optimizers (schedulefree, prodigyopt, dadaptation), records, errors."""
import dataclasses
import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from torch.func import grad

import hgtoolkit
from hgtoolkit import baselines, problems
from hgtoolkit.errors import DivergenceError, DivergenceWarning
from hgtoolkit.baselines import PEERS, PeerResult, run_peer

LR_FREE = ["schedulefree_sgd", "prodigy", "dadapt_sgd", "dadapt_adam"]
SCHEDULES = ["constant", "exp_decay", "step_decay", "sgdr"]


def _needs(name):
    module = PEERS[name].module
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"optional package {module!r} for peer {name!r} is not installed (pip install hgtoolkit[peers])")


@pytest.fixture(scope="module")
def full_batch():
    # batch = whole training set: L_t is the full training loss, so "the loss went down" is exact
    return problems.synthetic_classification(batch_size=64)


@pytest.fixture(scope="module")
def minibatch():
    return problems.synthetic_classification()


# ----------------------------------------------------------------------------- schedule formulas

def _torch_lrs(make_scheduler, lr, T):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(T):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return torch.tensor(out, dtype=torch.float64)


S = torch.optim.lr_scheduler


@pytest.mark.parametrize("ours, theirs", [
    (lambda: baselines.exponential_decay(0.3, 0.93, 60), lambda o: S.ExponentialLR(o, gamma=0.93)),
    (lambda: baselines.step_decay(0.3, 0.5, 7, 60), lambda o: S.StepLR(o, step_size=7, gamma=0.5)),
    (lambda: baselines.cosine_warm_restarts(0.3, 60, 9),
     lambda o: S.CosineAnnealingWarmRestarts(o, T_0=9)),
    (lambda: baselines.cosine_warm_restarts(0.3, 60, 5, T_mult=2, eta_min=0.01),
     lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5, T_mult=2, eta_min=0.01)),
    (lambda: baselines.cosine_warm_restarts(0.3, 60, 4, T_mult=3, eta_min=0.02),
     lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=3, eta_min=0.02)),
    (lambda: baselines.constant(0.3, 60), lambda o: S.LambdaLR(o, lambda t: 1.0)),
], ids=["exponential", "step", "sgdr", "sgdr_tmult2", "sgdr_tmult3", "constant"])
def test_schedules_equal_torch_lr_schedulers_step_for_step(ours, theirs):
    lrs = ours()
    assert lrs.shape == (60,) and lrs.dtype == torch.float64
    torch.testing.assert_close(lrs, _torch_lrs(theirs, 0.3, 60), rtol=1e-12, atol=1e-15)


def test_sgdr_restarts_where_the_cycles_end():
    lrs = baselines.cosine_warm_restarts(1.0, 40, 4, T_mult=2, eta_min=0.1)
    restarts = [t for t in range(1, 40) if lrs[t] > lrs[t - 1]]
    assert restarts == [4, 12, 28]  # cycles of 4, 8, 16 steps
    assert float(lrs[0]) == 1.0 and float(lrs.min()) >= 0.1


@pytest.mark.parametrize("call, exc", [
    (lambda: baselines.constant(0.1, 0), ValueError),
    (lambda: baselines.constant(0.1, 2.5), TypeError),
    (lambda: baselines.constant(-0.1, 5), ValueError),
    (lambda: baselines.constant(float("nan"), 5), ValueError),
    (lambda: baselines.constant("0.1", 5), TypeError),
    (lambda: baselines.exponential_decay(0.1, 0.0, 5), ValueError),
    (lambda: baselines.step_decay(0.1, 0.5, 0, 5), ValueError),
    (lambda: baselines.step_decay(0.1, 0.5, True, 5), TypeError),
    (lambda: baselines.cosine_warm_restarts(0.1, 5, 0), ValueError),
    (lambda: baselines.cosine_warm_restarts(0.1, 5, 2, T_mult=0), ValueError),
    (lambda: baselines.cosine_warm_restarts(0.1, 5, 2, T_mult=1.5), TypeError),
    (lambda: baselines.cosine_warm_restarts(0.1, 5, 2, eta_min=-1.0), ValueError),
])
def test_schedule_bad_arguments(call, exc):
    with pytest.raises(exc):
        call()


# ----------------------------------------------------------------------------- schedule peers

@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_schedule_peer_is_the_exact_engines_replay(minibatch, optimizer):
    res = run_peer(minibatch, "exp_decay", 15, lr=0.2, gamma=0.9, eval_every=4, optimizer=optimizer)
    ref = hgtoolkit.train(minibatch, baselines.exponential_decay(0.2, 0.9, 15), optimizer)
    assert np.array_equal(res.train_losses, ref.train_losses.numpy())
    assert res.final_val_loss == float(ref.value)
    np.testing.assert_allclose(res.lrs, 0.2 * 0.9 ** np.arange(15), rtol=1e-14)
    assert res.eval_steps.tolist() == [0, 4, 8, 12, 15]
    assert res.diverged_at is None
    assert res.config["gamma"] == 0.9 and res.config["optimizer"]["name"] == optimizer
    assert 0.0 <= res.final_val_accuracy <= 1.0


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_peers_default_settings(full_batch, name):
    res = run_peer(full_batch, name, 20)
    assert res.lrs.shape == (20,) and res.lrs[0] == 0.1
    assert res.train_losses[-1] < res.train_losses[0]
    assert res.eval_steps.tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


def test_schedule_peer_default_hyperparameters_scale_with_T(minibatch):
    lrs, hyper = PEERS["exp_decay"].schedule(100)
    assert math.isclose(float(lrs[-1]) / float(lrs[0]), 0.01 ** (99 / 100), rel_tol=1e-12)
    _, hyper = PEERS["sgdr"].schedule(500)
    assert hyper == {"T0": 72, "T_mult": 2, "eta_min": 0.0}
    lrs, hyper = PEERS["step_decay"].schedule(9, lr=1.0)
    assert lrs.tolist() == pytest.approx([1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


# ----------------------------------------------------------------------------- learning-rate-free peers

@pytest.mark.parametrize("name", LR_FREE)
def test_lr_free_peer_lowers_the_training_loss(full_batch, name):
    _needs(name)
    res = run_peer(full_batch, name, 20, eval_every=5)
    assert res.diverged_at is None
    assert res.train_losses.shape == res.lrs.shape == (20,)
    assert res.train_losses[-1] < res.train_losses[0]
    assert res.val_losses[-1] < res.val_losses[0]
    assert np.all(np.isfinite(res.lrs)) and np.all(res.lrs > 0)
    assert res.eval_steps.tolist() == [0, 5, 10, 15, 20]
    assert np.all((res.val_accuracy >= 0) & (res.val_accuracy <= 1))
    assert res.config["kind"] == "lr_free" and res.config["lr"] == 1.0
    # final_params are what the last evaluation saw (Schedule-Free: the average x_T)
    assert float(full_batch.val_loss(res.final_params)) == res.final_val_loss


@pytest.mark.parametrize("name", ["prodigy", "dadapt_sgd", "dadapt_adam"])
def test_d_adapted_lr_grows_from_d0(full_batch, name):
    _needs(name)
    res = run_peer(full_batch, name, 20)
    assert res.lrs[0] < 1e-5 < res.lrs[-1]  # d starts at d0 = 1e-6 and is estimated upwards
    assert np.all(np.diff(res.lrs) >= 0)  # d_t is non-decreasing


def test_dadapt_sgd_recorded_lr_is_the_sgd_step(full_batch):
    """With momentum 0, D-Adapt SGD is SGD with η_t = d_t·lr/‖g_0‖: replaying the recorded LRs
    through the exact engine reproduces its losses (and kwargs reach the optimizer)."""
    _needs("dadapt_sgd")
    res = run_peer(full_batch, "dadapt_sgd", 20, d0=1e-3)
    assert res.config["optimizer"]["d0"] == 1e-3
    assert res.train_losses[-1] < 0.5 * res.train_losses[0]
    replay = hgtoolkit.train(full_batch, torch.as_tensor(res.lrs), "sgd")
    np.testing.assert_allclose(res.train_losses, replay.train_losses.numpy(), rtol=1e-10)
    assert math.isclose(res.final_val_loss, float(replay.value), rel_tol=1e-10)


def test_schedulefree_validates_the_averaged_iterate(minibatch):
    """Reference Schedule-Free SGD (constant γ, r = 0): y_t = (1−β) z_t + β x_t,
    z_{t+1} = z_t − γ ∇L_t(y_t), x_{t+1} = (1 − c) x_t + c z_{t+1}, c = 1/(t+1);
    validation must be of x_t, training losses of y_t."""
    _needs("schedulefree_sgd")
    T, gamma, beta = 12, 0.5, 0.9
    res = run_peer(minibatch, "schedulefree_sgd", T, lr=gamma, eval_every=4)
    p = minibatch
    g_fn = grad(p.train_loss)
    x = {k: v.clone() for k, v in p.params0.items()}
    z = {k: v.clone() for k, v in p.params0.items()}
    losses, vals = [], [float(p.val_loss(x))]
    for t in range(T):
        y = {k: (1 - beta) * z[k] + beta * x[k] for k in x}
        losses.append(float(p.train_loss(y, t)))
        g = g_fn(y, t)
        z = {k: z[k] - gamma * g[k] for k in z}
        c = 1.0 / (t + 1)
        x = {k: (1 - c) * x[k] + c * z[k] for k in x}
        if (t + 1) % 4 == 0:
            vals.append(float(p.val_loss(x)))
    np.testing.assert_allclose(res.train_losses, losses, rtol=1e-9)
    np.testing.assert_allclose(res.val_losses, vals, rtol=1e-9)
    assert np.all(res.lrs == gamma)


def test_schedulefree_warmup_is_recorded(minibatch):
    _needs("schedulefree_sgd")
    res = run_peer(minibatch, "schedulefree_sgd", 6, lr=0.8, warmup_steps=4)
    np.testing.assert_allclose(res.lrs, [0.2, 0.4, 0.6, 0.8, 0.8, 0.8], rtol=1e-14)


# ----------------------------------------------------------------------------- records, determinism

@pytest.mark.parametrize("name", ["sgdr", "prodigy"])
def test_same_seed_same_numbers_and_records_round_trip(minibatch, name, tmp_path):
    if name in LR_FREE:
        _needs(name)
    a = run_peer(minibatch, name, 12, seed=3, eval_every=5)
    b = run_peer(minibatch, name, 12, seed=3, eval_every=5)
    c = run_peer(minibatch, name, 12, seed=4, eval_every=5)
    for f in PeerResult.ARRAYS:
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert not np.array_equal(a.train_losses, c.train_losses)  # another minibatch order
    assert a.config["seed"] == 3 and a.config["problem"]["batch_seed"] == 3

    js = a.save(tmp_path / "run")
    assert js.name == "run.json"
    assert {p.name for p in tmp_path.iterdir()} == {"run.json", "run.npz", "run.params.pt"}
    back = PeerResult.load(tmp_path / "run.json")
    for f in dataclasses.fields(PeerResult):
        x, y = getattr(a, f.name), getattr(back, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), f.name
        elif f.name == "config":
            assert y == hgtoolkit.records.to_jsonable(x)
        elif f.name == "final_params":
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        else:
            assert x == y, f.name
    assert hgtoolkit.records.read_json(js)["final_val_loss"] == a.final_val_loss


def test_load_rejects_other_records(tmp_path):
    hgtoolkit.records.atomic_write_json(tmp_path / "x.json", {"format": "something else"})
    with pytest.raises(ValueError, match="PeerResult"):
        PeerResult.load(tmp_path / "x")


# ----------------------------------------------------------------------------- divergence

def _nan_at_step_3():
    def train_loss(w, t):
        return (w ** 2).sum() * (math.nan if t == 3 else 1.0)
    return hgtoolkit.Problem(torch.ones(3, dtype=torch.float64), train_loss, lambda w: (w ** 2).sum())


@pytest.mark.parametrize("name", ["constant", "dadapt_sgd"])
def test_divergence_stops_the_run_and_is_recorded(name):
    if name in LR_FREE:
        _needs(name)
    with pytest.warns(DivergenceWarning, match="diverged at step 3"):
        res = run_peer(_nan_at_step_3(), name, 10, eval_every=2)
    assert res.diverged and res.diverged_at == 3 and "training loss" in res.divergence
    assert len(res.train_losses) == len(res.lrs) == res.steps_run == 3
    assert res.eval_steps.tolist() == [0, 2]
    assert res.val_accuracy is None  # the problem has no metrics
    assert res.final_params is None  # w_T was never reached
    with pytest.raises(DivergenceError) as info:
        run_peer(_nan_at_step_3(), name, 10, raise_on_divergence=True)
    assert info.value.step == 3


@pytest.mark.parametrize("name", ["constant", "schedulefree_sgd"])
def test_nan_gradient_with_finite_loss_is_caught_at_its_step(name):
    if name in LR_FREE:
        _needs(name)

    def train_loss(w, t):  # at t = 2: value 0 + ‖w‖², gradient of √(|w| − w) at w > 0 is ∞·0 = NaN
        extra = torch.sqrt(torch.abs(w) - w).sum() if t == 2 else 0.0
        return (w ** 2).sum() + extra

    problem = hgtoolkit.Problem(torch.ones(3, dtype=torch.float64), train_loss, lambda w: (w ** 2).sum())
    with pytest.warns(DivergenceWarning, match="step 2"):
        res = run_peer(problem, name, 10, lr=0.1)
    assert res.diverged_at == 2 and len(res.train_losses) == 2


def test_blow_up_is_detected():
    with pytest.warns(DivergenceWarning, match="diverged"):
        res = run_peer(problems.from_function("rosenbrock"), "constant", 50, lr=1.0)
    assert res.diverged_at is not None and res.diverged_at < 50
    assert np.all(np.isfinite(res.train_losses))


# ----------------------------------------------------------------------------- errors

def test_registry_names():
    assert set(PEERS) == set(SCHEDULES) | set(LR_FREE)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(name="adamw_magic"), ValueError, r"'adamw_magic'.*prodigy"),
    (dict(name=3), TypeError, "name"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(eval_every=0), ValueError, "eval_every"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(gamma_typo=0.9), TypeError, "gamma_typo"),
    (dict(name="prodigy", betas_typo=1), TypeError, "betas_typo"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_bad_arguments(minibatch, kwargs, exc, match):
    if kwargs.get("name") == "prodigy":
        _needs("prodigy")
    args = {"name": "exp_decay", "steps": 5, **kwargs}
    with pytest.raises(exc, match=match):
        run_peer(minibatch, args.pop("name"), args.pop("steps"), **args)


def test_bad_problem_and_seed_of_a_deterministic_problem():
    with pytest.raises(TypeError, match="problem"):
        run_peer("mnist", "constant", 5)
    beale = problems.from_function("beale")  # no minibatches: the seed changes nothing
    a, b = run_peer(beale, "constant", 5, lr=1e-3, seed=1), run_peer(beale, "constant", 5, lr=1e-3)
    assert np.array_equal(a.train_losses, b.train_losses) and a.config["seed"] == 1


def test_missing_package_says_how_to_install(minibatch, monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes `import prodigyopt` fail
    with pytest.raises(ImportError, match=r"pip install hgtoolkit\[peers\]"):
        run_peer(minibatch, "prodigy", 5)
