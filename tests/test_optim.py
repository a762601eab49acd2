"""Drop-in torch.optim optimizers (SGDHD, AdamHD, MARTHE) against the functional engine."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from hgtoolkit import DivergenceError, dynamics, online, optim, problems

MLP = problems.synthetic_classification()
T = 8


def _params():
    return {k: nn.Parameter(v.clone()) for k, v in MLP.params0.items()}


def _train(opt, params, steps, *, closure="none", val=False, t0=0):
    """An ordinary loop over the problem's minibatches; returns the LR after each step."""
    lrs = []
    for t in range(t0, t0 + steps):
        opt.zero_grad()
        kwargs = {"val_closure": lambda: MLP.val_loss(params)} if val else {}
        if closure == "none":
            MLP.train_loss(params, t).backward()
            opt.step(**kwargs)
        else:
            opt.step(lambda: MLP.train_loss(params, t), **kwargs)
        lrs.append(opt.param_groups[0]["effective_lr"])
    return np.array(lrs)


def _assert_matches_engine(lrs, params, run, tol=1e-12):
    assert np.allclose(lrs, run.lrs, rtol=tol, atol=0)
    for k, p in params.items():
        assert torch.allclose(p.detach(), run.final_params[k], rtol=tol, atol=1e-13), k


CASES = {
    "SGDHD": (lambda ps: optim.SGDHD(ps, lr=0.2, hypergrad_lr=1e-2), "none", False,
              dict(method="hd", optimizer="sgd", lr=0.2, hypergrad_lr=1e-2, objective="train", lr_floor=None)),
    "SGDN-HD+wd": (lambda ps: optim.SGDHD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                          hypergrad_lr=1e-3, lr_floor=0.0), "none", False,
                   dict(method="hd", optimizer=dynamics.nesterov(0.9, weight_decay=1e-2), lr=0.05,
                        hypergrad_lr=1e-3, objective="train")),
    "AdamHD": (lambda ps: optim.AdamHD(ps, lr=0.02, hypergrad_lr=1e-4), "none", False,
               dict(method="hd", optimizer="adam", lr=0.02, hypergrad_lr=1e-4, objective="train", lr_floor=None)),
    "RTHO-nesterov-val": (lambda ps: optim.MARTHE(ps, lr=0.05, method="rtho", hypergrad_lr=1e-2, optimizer="nesterov"),
                          "closure", True, dict(method="rtho", optimizer="nesterov", lr=0.05, hypergrad_lr=1e-2)),
    "MARTHE-auto-adam-val": (lambda ps: optim.MARTHE(ps, lr=0.02, hypergrad_lr="auto", hypergrad_lr_init=1e-4, kappa=1e-2,
                                                     optimizer="adam"),
                             "closure", True, dict(method="marthe", optimizer="adam", lr=0.02, hypergrad_lr="auto",
                                                   hypergrad_lr_init=1e-4, kappa=1e-2)),
    "MARTHE-mu-sgd-train": (lambda ps: optim.MARTHE(ps, lr=0.2, hypergrad_lr=1e-2, mu=0.7, objective="train"),
                            "closure", False, dict(method="marthe", lr=0.2, hypergrad_lr=1e-2, mu=0.7, objective="train")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_matches_the_functional_engine(case):
    factory, closure, val, run_kwargs = CASES[case]
    params = _params()
    lrs = _train(factory(list(params.values())), params, T, closure=closure, val=val)
    run = online.run(MLP, steps=T, **run_kwargs)
    assert np.ptp(run.lrs) > 0  # the LR moved, so the comparison can fail
    _assert_matches_engine(lrs, params, run)


@pytest.mark.parametrize("case", ["AdamHD", "MARTHE-auto-adam-val"])
def test_state_dict_round_trip_resumes_identically(case):
    factory, closure, val, _ = CASES[case]
    params = _params()
    opt = factory(list(params.values()))
    _train(opt, params, 4, closure=closure, val=val)
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_params = {k: p.detach().clone() for k, p in params.items()}
    straight = _train(opt, params, 4, closure=closure, val=val, t0=4)

    params2 = {k: nn.Parameter(v.clone()) for k, v in saved_params.items()}
    opt2 = factory(list(params2.values()))
    opt2.load_state_dict(saved_opt)
    resumed = _train(opt2, params2, 4, closure=closure, val=val, t0=4)
    assert np.array_equal(straight, resumed)
    for k in params:
        assert torch.equal(params[k].detach(), params2[k].detach())
    assert opt2.param_groups[0]["t"] == 8 and opt2.param_groups[0]["hypergrad"] == opt.param_groups[0]["hypergrad"]


def test_ordinary_nn_module_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    opt = optim.SGDHD(model.parameters(), lr=0.01, hypergrad_lr=1e-3)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert opt.param_groups[0]["effective_lr"] > 0.01  # HD raised the too-small LR
    assert opt.param_groups[0]["lr"] == 0.01  # the base LR is the user's (scheduler contract)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # MARTHE in the same loop, with closures
    xv, yv = torch.randn(32, 4), None
    yv = xv @ torch.tensor([[1.0], [-2.0], [0.5], [0.0]])
    opt = optim.MARTHE(model.parameters(), lr=0.01, hypergrad_lr="auto", kappa=1e-3, hypergrad_lr_init=1e-3)
    for _ in range(10):
        loss = opt.step(lambda: nn.functional.mse_loss(model(x), y),
                        val_closure=lambda: nn.functional.mse_loss(model(xv), yv))
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_param_groups_have_their_own_lr_and_settings():
    """Each param group is one online run: its own LR, hyper-LR and tangent over its own
    parameters. With β = 0 in both groups η stays put, and the groups' HD estimates add up to
    the single-group estimate (HD's z_t = B_{t−1} has no cross-group terms)."""
    params = _params()
    names = list(params)
    groups = [{"params": [params[k] for k in names[:2]]}, {"params": [params[k] for k in names[2:]]}]
    opt = optim.SGDHD(groups, lr=0.2, hypergrad_lr=0.0)
    run = online.run(MLP, "hd", lr=0.2, hypergrad_lr=0.0, steps=T + 1, objective="train", lr_floor=None)
    for t in range(T + 1):
        opt.zero_grad()
        MLP.train_loss(params, t).backward()
        opt.step()
        if t > 0:
            h = opt.param_groups[0]["hypergrad"] + opt.param_groups[1]["hypergrad"]
            assert h == pytest.approx(run.hypergrads[t - 1], rel=1e-10)
    # HD with different settings per group: each group's LR follows its own hypergradient
    params = _params()
    groups = [{"params": [params[k] for k in names[:2]], "hypergrad_lr": 1e-2},
              {"params": [params[k] for k in names[2:]], "lr": 0.05}]
    opt = optim.SGDHD(groups, lr=0.2, hypergrad_lr=0.0)
    _train(opt, params, 4)
    assert opt.param_groups[0]["effective_lr"] != 0.2 and opt.param_groups[1]["effective_lr"] == 0.05


def test_errors():
    params = _params()
    ps = list(params.values())
    with pytest.raises(ValueError, match="hypergrad_lr"):
        optim.SGDHD(ps, lr=0.1, hypergrad_lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        optim.AdamHD(ps, lr=-0.1)
    with pytest.raises(ValueError, match="mu"):
        optim.MARTHE(ps, lr=0.1, mu=2.0)
    with pytest.raises(ValueError, match="method"):
        optim.MARTHE(ps, lr=0.1, method="sgd")
    with pytest.raises(ValueError, match="objective"):
        optim.MARTHE(ps, lr=0.1, objective="test")
    with pytest.raises(ValueError, match="momentum"):
        optim.SGDHD(ps, lr=0.1, momentum=1.5)

    opt = optim.MARTHE(ps, lr=0.1, method="rtho", hypergrad_lr=1e-3)
    opt.step(lambda: MLP.train_loss(params, 0))  # step 0 needs neither HVP nor ∇E
    with pytest.raises(ValueError, match="val_closure"):
        opt.step(lambda: MLP.train_loss(params, 1))
    MLP.train_loss(params, 1).backward()  # accumulated into the gradient that step's closure wrote
    with pytest.raises(RuntimeError, match="changed in place since"):
        opt.step(lambda: MLP.train_loss(params, 1), val_closure=lambda: MLP.val_loss(params))
    with pytest.raises(ValueError, match="closure is required"):
        opt.step(val_closure=lambda: MLP.val_loss(params))
    opt.zero_grad()

    def backward_closure():
        loss = MLP.train_loss(params, 1)
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="must NOT call backward"):
        opt.step(backward_closure, val_closure=lambda: MLP.val_loss(params))

    # divergence: raised (when asked) before anything changes
    opt = optim.SGDHD(ps, lr=0.1, hypergrad_lr=1e-3, lr_max=0.1 + 1e-9, raise_on_divergence=True)
    _train(opt, params, 1)
    before = {k: p.detach().clone() for k, p in params.items()}
    MLP.train_loss(params, 1).backward()
    with pytest.raises(DivergenceError, match="lr_max"):
        opt.step()
    assert all(torch.equal(before[k], p.detach()) for k, p in params.items())
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["t"] == 1
