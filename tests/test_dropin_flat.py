"""The drop-ins' flat-buffer fast path (hgtoolkit._flat) against the reference per-tensor step:
bit for bit where it is elementwise (β = 0, constant μ: the same η every step), ≤ 1e-12 in
float64 where the dots h = v·z and ∇L_t·∇L_{t−1} are one sum over the concatenation; a state
dict round trip through the flat buffers; the path is picked where it pays."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hgtoolkit import optim

T = 5


def _net(layers=8, dtype=torch.float64):
    torch.manual_seed(0)
    mods = [nn.Linear(4, 6), nn.Tanh()]
    for _ in range(layers - 2):
        mods += [nn.Linear(6, 6), nn.Tanh()]
    return nn.Sequential(*mods, nn.Linear(6, 3)).to(dtype)


def _data(t):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(3, (16,), generator=gen)


def _run(make, flat, steps=range(T), net=None, opt=None, val=False, clip=None):
    """``clip``: the user's loop (backward, clip_grad_norm_, step(closure)); else the closure's."""
    net = net or _net()
    opt = opt or make(list(net.parameters()))
    opt._flat_buffers = flat
    xv, yv = _data(99)
    for t in steps:
        x, y = _data(t)
        kw = {"val_closure": lambda: F.cross_entropy(net(xv), yv)} if val else {}
        if clip is not None:
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step(lambda: F.cross_entropy(net(x), y), **kw)
    return net, opt


OPTIMIZERS = {"sgd": "sgd", "nesterov": "nesterov", "adam": "adam"}


@pytest.mark.parametrize("clip", [None, 0.1], ids=["closure's gradient", "user's clipped gradient"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_flat_path_is_the_reference_bit_for_bit_for_the_same_lr(name, clip):
    make = lambda ps: optim.MARTHE(ps, lr=0.05, hypergrad_lr=0.0, mu=0.5, objective="train", optimizer=name)
    n_ref, o_ref = _run(make, False, clip=clip)
    n_flat, o_flat = _run(make, True, clip=clip)
    assert o_flat._flat_groups and not o_ref.__dict__.get("_flat_groups")
    for a, b in zip(n_ref.parameters(), n_flat.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(n_ref.parameters(), n_flat.parameters()):
        for k, x in o_ref.state[a].items():
            y = o_flat.state[b][k]
            assert (x == y) if k == "n_updates" else torch.equal(x, y), k


@pytest.mark.parametrize("case", ["mu auto train", "mu auto val adam"])
def test_flat_path_agrees_with_the_reference_to_1e12_when_the_lr_learns(case):
    val = "val" in case
    adam = "adam" in case
    make = lambda ps: optim.MARTHE(ps, lr=0.01 if adam else 0.05, hypergrad_lr=1e-4 if adam else 1e-2, mu="auto",
                                   objective="val" if val else "train", optimizer="adam" if adam else "sgd")
    n_ref, o_ref = _run(make, False, val=val)
    n_flat, o_flat = _run(make, True, val=val)
    g_ref, g_flat = o_ref.param_groups[0], o_flat.param_groups[0]
    assert g_ref["diverged_at"] is None and g_ref["effective_lr"] != g_ref["lr"] and g_ref["hypergrad"] != 0
    for k in ("effective_lr", "hypergrad", "mu_t"):
        assert g_flat[k] == pytest.approx(g_ref[k], rel=1e-12, abs=1e-300), k
    for a, b in zip(n_ref.parameters(), n_flat.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_state_dict_round_trip_through_the_flat_buffers():
    make = lambda ps: optim.MARTHE(ps, lr=0.05, hypergrad_lr=1e-2, mu="auto", objective="train", optimizer="nesterov")
    net, opt = _run(make, True)
    buf = io.BytesIO()
    torch.save({"net": net.state_dict(), "opt": opt.state_dict()}, buf)
    _run(make, True, range(T, 2 * T), net, opt)
    for flat, atol in ((True, 0.0), (False, 1e-14)):  # the reference path reads the views as tensors
        buf.seek(0)
        ck = torch.load(buf, weights_only=True)
        net2 = _net()
        net2.load_state_dict(ck["net"])
        opt2 = make(list(net2.parameters()))
        opt2.load_state_dict(ck["opt"])
        _run(make, flat, range(T, 2 * T), net2, opt2)
        for a, b in zip(net.parameters(), net2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-12 if atol else 0.0, atol=atol)


def test_the_fast_path_is_picked_where_it_pays():
    make = lambda ps: optim.MARTHE(ps, lr=0.05, hypergrad_lr=1e-3, mu=0.5, objective="train")
    _, many = _run(make, None, range(2), net=_net(layers=10))  # 22 tensors
    _, few = _run(make, None, range(2), net=_net(layers=2))  # 6 tensors
    assert many.__dict__.get("_flat_groups") and not few.__dict__.get("_flat_groups")
