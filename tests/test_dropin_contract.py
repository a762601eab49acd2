"""The drop-ins' contract with the user's loop (docs/dropins.md): the update uses what the user
left in p.grad (here clipped by clip_grad_norm_), under each drop-in, float32; a gradient changed
behind the optimizer's back raises; a BatchNorm + dropout model sees the optimizer's extra forward
pass neither in its running statistics nor in its dropout masks (module=); a torch.compile'd
loss under MARTHE is refused with the reason."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hgtoolkit import optim, towers

T = 5
MAX_NORM = 0.05  # below every gradient's norm here: clipping acts at every step


def _data(t, d_in=6):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(32, d_in, generator=gen), torch.randint(3, (32,), generator=gen)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


# name: (drop-in with hypergradient LR 0, torch.optim twin, closure passed to step?)
CLIPPED = {
    "SGDHD": (lambda ps: optim.SGDHD(ps, lr=0.1, momentum=0.9, hypergrad_lr=0.0),
              lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False, 0.0),
    "AdamHD": (lambda ps: optim.AdamHD(ps, lr=0.01, hypergrad_lr=0.0),
               lambda ps: torch.optim.Adam(ps, lr=0.01), False, 1e-6),
    "MARTHE": (lambda ps: optim.MARTHE(ps, lr=0.1, hypergrad_lr=0.0, mu=0.5, objective="train"),
               lambda ps: torch.optim.SGD(ps, lr=0.1), True, 0.0),
    "tower": (lambda ps: towers.parse("sgd(lr=0.1, momentum=0.9) / sgd(lr=0.0)").optimizer(ps),
              lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), False, 0.0),
}


def _clipped_loop(model, opt, closure, t):
    x, y = _data(t)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    if closure:
        opt.step(lambda: F.cross_entropy(model(x), y))
    else:
        opt.step()
    return float(norm)


@pytest.mark.parametrize("case", list(CLIPPED))
def test_the_update_uses_the_clipped_gradient_in_p_grad(case):
    """With hypergradient LR 0 each drop-in is its torch.optim twin in the same clipping loop
    (SGD-based: bit for bit; a drop-in that took the closure's unclipped gradient would not be)."""
    make, make_torch, closure, atol = CLIPPED[case]
    m1, m2 = _mlp(), _mlp()
    o1, o2 = make(list(m1.parameters())), make_torch(list(m2.parameters()))
    for t in range(T):
        norm = _clipped_loop(m1, o1, closure, t)
        _clipped_loop(m2, o2, False, t)
        assert norm > MAX_NORM  # the clipping did act
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("make", [lambda ps: optim.SGDHD(ps, lr=0.1, hypergrad_lr=1e-2),
                                  lambda ps: optim.MARTHE(ps, lr=0.1, hypergrad_lr=1e-2, mu=0.0, objective="train")],
                         ids=["SGDHD", "MARTHE-mu0"])
def test_the_hypergradient_uses_the_clipped_gradient(make):
    """HD's h_t = −g̃_t·g̃_{t−1} of the clipped gradients (the closure's are larger here)."""
    model = _mlp()
    opt = make(list(model.parameters()))
    marthe, prev = isinstance(opt, optim.MARTHE), None
    for t in range(T):
        x, y = _data(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        g = [p.grad.clone() for p in model.parameters()]
        opt.step(lambda: F.cross_entropy(model(x), y)) if marthe else opt.step()
        if prev is not None:
            h = -sum(torch.dot(a.flatten(), b.flatten()) for a, b in zip(g, prev)).item()
            assert opt.param_groups[0]["hypergrad"] == pytest.approx(h, rel=1e-5)
        prev = g


def test_a_gradient_changed_behind_the_optimizer_raises():
    model = _mlp()
    opt = optim.MARTHE(model.parameters(), lr=0.1, hypergrad_lr=1e-2, mu=0.5, objective="train")
    x, y = _data(0)
    closure = lambda: F.cross_entropy(model(x), y)
    opt.step(closure)  # no backward: the closure's gradient, written into p.grad
    opt.step(closure)  # that gradient, unchanged, is replaced by the closure's new one
    nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)  # clips what the optimizer wrote
    with pytest.raises(RuntimeError, match="changed in place since"):
        opt.step(closure)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()

    def backward_closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="must NOT call backward"):
        opt.step(backward_closure)
    hd = optim.SGDHD(model.parameters(), lr=0.1)  # the closure only gives the loss: not differentiated
    hd.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="the closure changed p.grad"):
        hd.step(backward_closure)


class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn, self.drop, self.b = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.bn(self.a(x)))))


def _bn_run(make, guarded):
    """The user's loop (zero_grad, forward, backward, step(closure)) on the BatchNorm + dropout
    net: (model, user's losses, the closure's losses, a random draw after each step)."""
    model = BNDropNet()
    opt = make(model, guarded)
    user, closure_losses, after = [], [], []
    torch.manual_seed(123)
    for t in range(T):
        x, y = _data(t)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if opt is None:
            closure_losses.append(loss.item())
        else:
            closure_losses.append(opt.step(lambda: F.cross_entropy(model(x), y)).item())
        user.append(loss.item())
        after.append(torch.rand(()).item())
    return model, user, closure_losses, after


def _marthe(model, guarded):
    return optim.MARTHE(model.parameters(), lr=0.1, hypergrad_lr=0.0, mu=0.5, objective="train",
                        module=model if guarded else None)


def test_batchnorm_and_dropout_see_the_extra_forward_neither_in_statistics_nor_masks():
    ref = BNDropNet()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.manual_seed(123)
    ref_after = []
    for t in range(T):
        x, y = _data(t)
        ref_opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_after.append(torch.rand(()).item())
    model, user, closure_losses, after = _bn_run(_marthe, guarded=True)
    assert closure_losses == user  # the closure replayed the user's dropout masks (and BN batch statistics)
    assert after == ref_after  # the user's random stream is not shifted by the extra forward
    assert int(model.bn.num_batches_tracked) == T
    assert torch.equal(model.bn.running_mean, ref.bn.running_mean)
    assert torch.equal(model.bn.running_var, ref.bn.running_var)
    for a, b in zip(model.parameters(), ref.parameters()):  # β = 0: torch.optim.SGD, bit for bit
        assert torch.equal(a, b)
    # without module= the extra forward draws new masks and updates the statistics again
    model, user, closure_losses, after = _bn_run(_marthe, guarded=False)
    assert closure_losses != user and after != ref_after
    assert int(model.bn.num_batches_tracked) == 2 * T


def test_val_closure_leaves_buffers_and_the_random_stream_alone():
    model = BNDropNet()
    opt = optim.MARTHE(model.parameters(), lr=0.1, hypergrad_lr=1e-3, mu=0.5, module=model)
    xv, yv = _data(99)
    for t in range(3):
        x, y = _data(t)
        torch.manual_seed(t)
        opt.step(lambda: F.cross_entropy(model(x), y), val_closure=lambda: F.cross_entropy(model(xv), yv))
        draw = torch.rand(())
        torch.manual_seed(t)
        F.cross_entropy(copy.deepcopy(model)(x), y)  # the step's one training forward draws as much
        assert torch.equal(draw, torch.rand(()))
    assert int(model.bn.num_batches_tracked) == 3  # the closure's forward only, not the validation's


def test_torch_compile_with_a_hessian_vector_product_is_refused_with_the_reason():
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = _data(0)
    opt = optim.MARTHE(model.parameters(), lr=0.1, hypergrad_lr=1e-2, mu=0.5, objective="train")
    with pytest.raises(RuntimeError, match="torch.compile.*second backward.*_orig_mod"):
        opt.step(lambda: F.cross_entropy(compiled(x), y))
    hd = optim.SGDHD(model.parameters(), lr=0.1, hypergrad_lr=1e-2)  # first derivatives: fine
    for _ in range(2):
        hd.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        hd.step()
    assert hd.param_groups[0]["t"] == 2


ZEROINGS = {"opt.zero_grad()": lambda model, opt: opt.zero_grad(),
            "opt.zero_grad(set_to_none=False)": lambda model, opt: opt.zero_grad(set_to_none=False),
            "model.zero_grad(set_to_none=False)": lambda model, opt: model.zero_grad(set_to_none=False),
            "none": lambda model, opt: None}


def test_a_closure_only_loop_may_zero_its_gradients_any_way():
    """Gradients the optimizer wrote and that were zeroed in place are no gradient: the closure's
    replaces them (the same run whatever the loop's zeroing)."""
    runs = []
    for zero in ZEROINGS.values():
        model = _mlp()
        opt = optim.MARTHE(model.parameters(), lr=0.1, hypergrad_lr=1e-2, mu=0.5, objective="train")
        for t in range(T):
            x, y = _data(t)
            zero(model, opt)
            opt.step(lambda: F.cross_entropy(model(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert opt.param_groups[0]["effective_lr"] != 0.1
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


def test_the_module_guard_goes_with_its_optimizer():
    import gc
    model = BNDropNet()
    opt = _marthe(model, guarded=True)
    twin = copy.deepcopy(model)  # keeps the hook, which ignores it
    for _ in range(40):
        twin(_data(0)[0])
        model(_data(0)[0])
    assert len(opt._guard.recorded) == 16  # bounded between two steps
    del opt
    gc.collect()
    assert not model._forward_pre_hooks  # removed with the optimizer
    twin(_data(0)[0])  # the copy's hook (a dead weak reference) does nothing
