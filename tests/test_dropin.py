"""The drop-ins as torch.optim citizens (issue 14): with hypergradient LR 0 each is torch.optim,
step for step (SGD-based ones bit for bit in float64 and float32, Adam-based ones to 1e-12 in
float64), on a torch.nn model with a frozen layer, a branch that gets gradients
only every other step, an unused branch, two param groups with different options and weight
decay; state_dict round trips through torch.save/torch.load(weights_only=True); the scheduler
contract (effective LR = scheduler's LR × learnt multiplier) for five schedulers."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as S

from hgtoolkit import dynamics, optim, towers

F64 = torch.float64
T = 6


class Net(nn.Module):
    """a → frozen → b, plus ``side`` (used at even steps only) and ``unused`` (never used)."""

    def __init__(self, dtype=F64):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.frozen, self.side = nn.Linear(5, 8), nn.Linear(8, 8), nn.Linear(5, 8)
        self.b, self.unused = nn.Linear(8, 3), nn.Linear(8, 3)
        self.frozen.requires_grad_(False)
        self.to(dtype)

    def forward(self, x, t):
        x = x.to(self.a.weight.dtype)
        h = torch.tanh(self.frozen(torch.tanh(self.a(x))))
        if t % 2 == 0:
            h = h + torch.tanh(self.side(x))
        return self.b(h)


def _groups(net, opts):
    first = [*net.a.parameters(), *net.frozen.parameters()]
    second = [*net.side.parameters(), *net.b.parameters(), *net.unused.parameters()]
    return [{"params": first, **opts[0]}, {"params": second, **opts[1]}]


BATCHES = [(torch.randn(16, 5, generator=torch.Generator().manual_seed(t), dtype=F64),
            torch.randint(3, (16,), generator=torch.Generator().manual_seed(100 + t)))
           for t in range(2 * T)]


def _steps(net, opt, ts, closure=False, sched=None, after=None):
    for t in ts:
        x, y = BATCHES[t]
        loss = lambda: F.cross_entropy(net(x, t), y)
        if closure:
            opt.step(loss)
        else:
            opt.zero_grad()
            loss().backward()
            opt.step()
        if after is not None:
            after(t)
        if sched is not None:
            sched.step()


SGD_OPTS = ({"lr": 0.1, "weight_decay": 0.01}, {"lr": 0.05, "momentum": 0.5})
TOWER_OPTS = ({"weight_decay": 0.01}, {"lr": 0.05})
ADAM_OPTS = ({"lr": 0.01, "weight_decay": 0.01}, {"lr": 0.02})
# name: (drop-in with hypergradient LR 0, its torch.optim optimizer, group options of each, closure?)
CASES = {
    "SGDHD": (lambda g: optim.SGDHD(g, lr=0.1, momentum=0.9, hypergrad_lr=0.0), SGD_OPTS,
              lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), SGD_OPTS, False),
    "SGDN-HD": (lambda g: optim.SGDHD(g, lr=0.1, momentum=0.9, nesterov=True, hypergrad_lr=0.0), SGD_OPTS,
                lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True), SGD_OPTS, False),
    "AdamHD": (lambda g: optim.AdamHD(g, lr=0.01, hypergrad_lr=0.0), ADAM_OPTS,
               lambda g: torch.optim.Adam(g, lr=0.01), ADAM_OPTS, False),
    "MARTHE": (lambda g: optim.MARTHE(g, lr=0.1, hypergrad_lr=0.0, mu=0.5, objective="train"),
               ({"optimizer": dynamics.sgd(weight_decay=0.01).config()}, {"lr": 0.05}),
               lambda g: torch.optim.SGD(g, lr=0.1), ({"weight_decay": 0.01}, {"lr": 0.05}), True),
    "tower sgd": (lambda g: towers.parse("sgd(lr=0.1, momentum=0.9) / sgd(lr=0.0)").optimizer(g), TOWER_OPTS,
                  lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), SGD_OPTS[:1] + ({"lr": 0.05},), False),
    "tower adam": (lambda g: towers.parse("adam(lr=0.01) / sgd(lr=0.0)").optimizer(g),
                   ({"weight_decay": 0.01}, {"lr": 0.02}),
                   lambda g: torch.optim.Adam(g, lr=0.01), ADAM_OPTS, False),
}


# torch.optim.Adam rounds its bias correction and denominator in its own order (Python floats,
# addcdiv): the same equation, a few ulps apart; every SGD-based drop-in is torch.optim.SGD's ops
ADAM_ATOL = {"AdamHD": 1e-12, "tower adam": 1e-12}


def _pair(case, dtype=F64):
    make, opts, make_torch, torch_opts, closure = CASES[case]
    n1, n2 = Net(dtype), Net(dtype)
    return n1, make(_groups(n1, opts)), n2, make_torch(_groups(n2, torch_opts)), closure


def _assert_same(n1, n2, atol=0.0):
    for (name, a), b in zip(n1.named_parameters(), n2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_hypergradient_lr_zero_is_torch_optim_step_for_step(case):
    n1, o1, n2, o2, closure = _pair(case)
    frozen, unused = n1.frozen.weight.detach().clone(), n1.unused.weight.detach().clone()
    for t in range(T):
        _steps(n1, o1, [t], closure)
        _steps(n2, o2, [t])
        _assert_same(n1, n2, ADAM_ATOL.get(case, 0.0))
    assert torch.equal(n1.frozen.weight, frozen) and torch.equal(n1.unused.weight, unused)
    assert not torch.equal(n1.a.weight, Net().a.weight)  # it did train
    assert n1.unused.weight not in o1.state and n1.frozen.weight not in o1.state
    assert all("lr" in g for g in o1.param_groups)
    assert [g["effective_lr"] for g in o1.param_groups] == [g["lr"] for g in o2.param_groups]


@pytest.mark.parametrize("case", [c for c in CASES if c not in ADAM_ATOL])
def test_sgd_based_drop_ins_are_torch_optim_sgd_bit_for_bit_in_float32(case):
    """Momentum (b ← m·b + g, the product rounded first), Nesterov and weight decay
    (g + wd·w in one rounding) in torch.optim.SGD's own op order: the same bits."""
    n1, o1, n2, o2, closure = _pair(case, torch.float32)
    for t in range(T):
        _steps(n1, o1, [t], closure)
        _steps(n2, o2, [t])
        _assert_same(n1, n2)


# a learning drop-in of each kind, for the round trip and the scheduler contract
LEARNING = {
    "SGDHD": (lambda g: optim.SGDHD(g, lr=0.1, momentum=0.9, hypergrad_lr=1e-2), SGD_OPTS, False),
    "AdamHD": (lambda g: optim.AdamHD(g, lr=0.01, hypergrad_lr=1e-4), ADAM_OPTS, False),
    "MARTHE": (lambda g: optim.MARTHE(g, lr=0.1, hypergrad_lr=1e-2, mu="auto", objective="train"),
               ({}, {"lr": 0.05}), True),
    "tower": (lambda g: towers.parse("sgd(lr=0.1, momentum=0.5) / adam(lr=1e-3)").optimizer(g),
              TOWER_OPTS, False),
}


@pytest.mark.parametrize("case", list(LEARNING))
def test_state_dict_round_trip_through_weights_only_load(case):
    make, opts, closure = LEARNING[case]
    n1 = Net()
    o1 = make(_groups(n1, opts))
    _steps(n1, o1, range(T), closure)
    buf = io.BytesIO()
    torch.save({"model": n1.state_dict(), "opt": o1.state_dict()}, buf)
    _steps(n1, o1, range(T, 2 * T), closure)

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    n2 = Net()
    n2.load_state_dict(ck["model"])
    o2 = make(_groups(n2, opts))
    o2.load_state_dict(ck["opt"])
    _steps(n2, o2, range(T, 2 * T), closure)
    for a, b in zip(n1.parameters(), n2.parameters()):
        assert torch.equal(a, b)
    for g1, g2 in zip(o1.param_groups, o2.param_groups):
        assert g1["t"] == g2["t"] == 2 * T and g1["effective_lr"] == g2["effective_lr"]
    assert o1.param_groups[0]["lr_scale"] != 1.0  # the LR did move, so the comparison can fail


SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda k: 0.9 ** k),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=T),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=[0.2, 0.1], total_steps=T, cycle_momentum=False),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.5, total_iters=2),
                                                 S.ExponentialLR(o, gamma=0.9)], milestones=[2]),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("case", ["SGDHD", "AdamHD", "MARTHE", "tower sgd"])
def test_scheduler_with_hypergradient_lr_zero_is_torch_optim_with_it(case, sched):
    n1, o1, n2, o2, closure = _pair(case)
    s1, s2 = SCHEDULERS[sched](o1), SCHEDULERS[sched](o2)
    for t in range(T):
        _steps(n1, o1, [t], closure, s1)
        _steps(n2, o2, [t], False, s2)
        _assert_same(n1, n2, ADAM_ATOL.get(case, 0.0))
        assert [g["lr"] for g in o1.param_groups] == [g["lr"] for g in o2.param_groups]


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("case", list(LEARNING))
def test_scheduler_contract_effective_lr_is_base_times_learnt_multiplier(case, sched):
    """group["lr"] is exactly the scheduler's LR (the same schedule on a plain torch.optim.SGD),
    and the LR a step uses is that × the learnt multiplier group["lr_scale"]."""
    make, opts, closure = LEARNING[case]
    n1, ref_net = Net(), Net()
    o1 = make(_groups(n1, opts))
    ref = torch.optim.SGD(_groups(ref_net, [{"lr": g["lr"]} for g in o1.param_groups]), lr=0.1)
    s1, s_ref = SCHEDULERS[sched](o1), SCHEDULERS[sched](ref)
    scales = []

    def check(t):
        for g, r in zip(o1.param_groups, ref.param_groups):
            assert g["lr"] == r["lr"]
            assert g["effective_lr"] == pytest.approx(g["lr"] * g["lr_scale"], rel=1e-12)
        scales.append(o1.param_groups[0]["lr_scale"])
        ref.step()  # no gradients: nothing moves; torch.optim wants step() before the scheduler's
        s_ref.step()

    _steps(n1, o1, range(T), closure, s1, after=check)
    assert len(set(scales)) > 2  # the multiplier is learnt, on top of the schedule


def test_marthe_with_frozen_parameters_and_unused_branch():
    net = Net()
    opt = optim.MARTHE(net.parameters(), lr=0.1, hypergrad_lr=1e-2, mu="auto", objective="train")
    before = net.frozen.weight.detach().clone()
    _steps(net, opt, range(T), closure=True)
    assert torch.equal(net.frozen.weight, before)
    assert net.unused.weight.grad is None and opt.param_groups[0]["effective_lr"] != 0.1


def test_tower_group_settings_and_errors():
    net = Net()
    tower = towers.parse("sgd(lr=0.1, momentum=0.9) / sgd(lr=1e-3)")
    opt = tower.optimizer(_groups(net, ({"weight_decay": 0.01}, {"lr": 0.05, "momentum": 0.5})))
    g0, g1 = opt.param_groups
    assert g0["tower"].weight_decay == 0.01 and g0["tower"].lr == 0.1 and g0["lr"] == 0.1
    assert g1["tower"].lr == 0.05 and g1["tower"].momentum == 0.5 and g1["lr"] == 0.05
    assert str(g1["tower"]).startswith("sgd(lr=0.05, momentum=0.5)")
    with pytest.raises(TypeError, match="sparse"):
        p = nn.Parameter(torch.zeros(3))
        o = towers.SGD(lr=0.1).optimizer([p])
        p.grad = torch.zeros(3).to_sparse()
        o.step()


def test_tower_divergence_is_reported_with_the_step():
    from hgtoolkit import DivergenceError
    from hgtoolkit.errors import DivergenceWarning
    tower = towers.parse("sgd(lr=0.1) / sgd(lr=10.0)")
    net = Net()
    opt = tower.optimizer(net.parameters(), lr_max=0.1 + 1e-9, raise_on_divergence=True)
    _steps(net, opt, [0])
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(DivergenceError, match="step 1: learning rate exceeds lr_max"):
        _steps(net, opt, [1])
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())) and opt.param_groups[0]["t"] == 1
    # a closure's loss above divergence_factor × its first value: a warning, then the group stays put
    net = Net()
    opt = tower.optimizer(net.parameters())
    x, y = BATCHES[0]

    def closure(scale=[1.0]):
        opt.zero_grad()
        loss = F.cross_entropy(net(x, 0), y) * scale[0]
        loss.backward()
        scale[0] *= 3.0
        return loss
    opt.step(closure)
    with pytest.warns(DivergenceWarning, match="step 1: training loss above divergence_factor"):
        opt.step(closure)
    frozen = [p.detach().clone() for p in net.parameters()]
    opt.step(closure)
    assert opt.param_groups[0]["diverged_at"] == 1
    assert all(torch.equal(a, b) for a, b in zip(frozen, net.parameters()))


# -- g_t kept for the next step: by reference when p.grad is new memory at every step -----------

KEEPERS = {
    "SGDHD": lambda ps: optim.SGDHD(ps, lr=0.1, hypergrad_lr=1e-2),
    "tower": lambda ps: towers.parse("sgd(lr=0.1) / sgd(lr=1e-2)").optimizer(ps),
}


def _zeroing_run(make, zero):
    """T steps of the usual loop on a small net, zeroing the gradients with ``zero(net, opt, t)``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = make(list(net.parameters()))
    for t in range(T):
        x, y = BATCHES[t]
        zero(net, opt, t)
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net, opt


ZEROING = {  # how the loop zeroes: the mode the drop-in must pick
    "opt.zero_grad()": (lambda net, opt, t: opt.zero_grad(), "reference"),
    "net.zero_grad(set_to_none=False)": (lambda net, opt, t: net.zero_grad(set_to_none=False), "copy"),
    "opt.zero_grad(set_to_none=False)": (lambda net, opt, t: opt.zero_grad(set_to_none=False), "copy"),
    "None, then in place from step 3": (lambda net, opt, t: opt.zero_grad(set_to_none=t < 3), "reference"),
}


@pytest.mark.parametrize("case", list(KEEPERS))
def test_gradients_kept_by_reference_only_where_nothing_writes_them(case):
    ref_net, ref_opt = _zeroing_run(KEEPERS[case], ZEROING["opt.zero_grad()"][0])
    assert ref_opt.param_groups[0]["effective_lr"] != 0.1  # the LR did learn
    for name, (zero, mode) in ZEROING.items():
        net, opt = _zeroing_run(KEEPERS[case], zero)
        assert opt._grad_mode == mode, name
        for a, b in zip(net.parameters(), ref_net.parameters()):
            assert torch.equal(a, b), name
    # reference mode, then a zeroing in place the optimizer does not see: caught, not used
    zero = lambda net, opt, t: opt.zero_grad() if t < 3 else net.zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="changed in place since the last step"):
        _zeroing_run(KEEPERS[case], zero)


def test_constant_hyper_options_changed_mid_run_take_effect():
    for make in (lambda ps: optim.SGDHD(ps, lr=0.1, hypergrad_lr=1e-2),
                 lambda ps: optim.AdamHD(ps, lr=0.01, hypergrad_lr=1e-3)):
        lrs = []

        def zero(net, opt, t):
            opt.zero_grad()
            if t == 3:
                opt.param_groups[0]["hypergrad_lr"] = 0.0
            lrs.append(opt.param_groups[0]["effective_lr"])

        _zeroing_run(make, zero)
        assert lrs[1] != lrs[2] != lrs[3] and lrs[4] == lrs[5]  # β = 0 from step 3: η stays
    net = Net()
    opt = optim.MARTHE(net.parameters(), lr=0.1, hypergrad_lr=1e-2, mu=0.5, objective="train")
    _steps(net, opt, range(3), closure=True)
    opt.param_groups[0]["mu"] = 0.25
    _steps(net, opt, range(3, 5), closure=True)
    assert opt.param_groups[0]["mu_t"] == 0.25
