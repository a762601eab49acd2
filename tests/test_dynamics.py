"""The pure step functions reproduce torch.optim exactly, and validate their hyperparameters."""
from dataclasses import dataclass

import pytest
import torch

from hgtoolkit import dynamics

CASES = [
    (dynamics.sgd(), lambda p: torch.optim.SGD(p, lr=0.1)),
    (dynamics.sgd(weight_decay=0.01), lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01)),
    (dynamics.momentum(0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (dynamics.nesterov(0.8), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True)),
    (dynamics.adam((0.8, 0.99), eps=1e-6), lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.99), eps=1e-6)),
    (dynamics.adagrad(), lambda p: torch.optim.Adagrad(p, lr=0.1)),
    (dynamics.rmsprop(0.9), lambda p: torch.optim.RMSprop(p, lr=0.1, alpha=0.9)),
]


@pytest.mark.parametrize("dyn, make", CASES, ids=lambda c: getattr(c, "name", ""))
def test_matches_torch_optim(dyn, make):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(32, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(32, generator=gen, dtype=torch.float64)
    w0 = {"a": torch.randn(4, generator=gen, dtype=torch.float64), "c": torch.zeros((), dtype=torch.float64)}
    loss = lambda p, i: ((torch.tanh(X[i] @ p["a"]) + p["c"] - y[i]) ** 2).mean()
    mods = {k: torch.nn.Parameter(v.clone()) for k, v in w0.items()}
    opt = make(list(mods.values()))
    state = dyn.init(w0)
    for t in range(6):
        idx = slice(4 * t, 4 * t + 8)
        opt.zero_grad()
        loss(mods, idx).backward()
        opt.step()
        g = torch.func.grad(loss)(dyn.params(state), idx)
        state = dyn.step(state, g, torch.tensor(0.1, dtype=torch.float64), t)
        for k in w0:
            torch.testing.assert_close(state["w"][k], mods[k].detach(), rtol=1e-12, atol=1e-14)


def test_hyperparameters_are_differentiable_inputs():
    dyn = dynamics.adam()
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    g = torch.tensor([0.3, 0.1], dtype=torch.float64)
    state = dyn.init(w)
    state = dyn.step(state, g, 0.1, 0)

    def final_w(beta1):
        return dyn.step(state, g, 0.1, 1, beta1=beta1)["w"].sum()

    b1 = torch.tensor(0.9, dtype=torch.float64)
    d = torch.func.grad(final_w)(b1)
    fd = (final_w(b1 + 1e-6) - final_w(b1 - 1e-6)) / 2e-6
    assert abs(float(d - fd)) < 1e-7 and float(d) != 0
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        dyn.step(state, g, 0.1, 1, momentum=0.5)


def test_zero_gradient_entries_do_not_produce_nan_tangents():
    """Dead units give g = 0 exactly; √v there must not poison jvp/vjp with ∞·0."""
    dyn = dynamics.adam()
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    state = dyn.init(w)
    g = torch.tensor([0.0, 0.5], dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda lr: dyn.step(state, g, lr, 0)["w"], (torch.tensor(0.1, dtype=torch.float64),),
                                (torch.tensor(1.0, dtype=torch.float64),))
    assert torch.isfinite(tangent).all()
    assert float(tangent[0]) == 0.0


@pytest.mark.parametrize("factory, kwargs, word", [
    (dynamics.sgd, {"momentum": 1.0}, "momentum"),
    (dynamics.sgd, {"momentum": -0.1}, "momentum"),
    (dynamics.sgd, {"nesterov": True}, "nesterov"),
    (dynamics.adam, {"betas": (1.0, 0.9)}, "beta1"),
    (dynamics.adam, {"eps": -1.0}, "eps"),
    (dynamics.rmsprop, {"alpha": 1.5}, "alpha"),
])
def test_invalid_hyperparameters(factory, kwargs, word):
    with pytest.raises(ValueError, match=word):
        factory(**kwargs)


def test_get_by_name():
    assert dynamics.get("nesterov") == dynamics.nesterov()
    assert dynamics.get("SGD").name == "sgd"
    with pytest.raises(ValueError, match="optimizer"):
        dynamics.get("lion")


# ---------------------------------------------------------------- closed-form tangents

TANGENT_CASES = [dynamics.sgd(), dynamics.sgd(weight_decay=0.03), dynamics.momentum(0.9),
                 dynamics.nesterov(0.8, weight_decay=0.01), dynamics.adam((0.8, 0.99), eps=1e-6),
                 dynamics.adam(weight_decay=0.02), dynamics.adagrad(weight_decay=0.01),
                 dynamics.rmsprop(0.9)]


def _random_state(dyn, gen, steps=3):
    w = {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64),
         "c": torch.randn(2, generator=gen, dtype=torch.float64)}
    state = dyn.init(w)
    for t in range(steps):  # non-trivial moments
        g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in w.items()}
        g["a"][0, 0] = 0.0  # a dead entry: √v = 0 there
        state = dyn.step(state, g, 0.05, t)
    if "v" in state:
        state["v"]["a"][0, 0] = 0.0
    g = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in w.items()}
    if dyn.name == "adam" or "v" in state:
        g["a"][0, 0] = 0.0
    return state, g


def _rand_like(tree, gen):
    return torch.utils._pytree.tree_map(
        lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype), tree)


@pytest.mark.parametrize("dyn", TANGENT_CASES, ids=lambda d: f"{d.name}-wd{d.weight_decay}")
def test_closed_form_tangent_and_cotangent_equal_autodiff(dyn):
    """The jvp (forward mode, online engine) and vjp (reverse mode) written out by hand equal
    torch.func's, to 1e-12 in float64, including weight decay and √v = 0 entries."""
    gen = torch.Generator().manual_seed(1)
    state, g = _random_state(dyn, gen)
    lr = torch.tensor(0.07, dtype=torch.float64)
    t = 3
    ds, dg, bar = _rand_like(state, gen), _rand_like(g, gen), _rand_like(state, gen)
    dlr = torch.tensor(0.3, dtype=torch.float64)
    ref_new, ref_tan = torch.func.jvp(lambda s, gg, e: dyn.step(s, gg, e, t), (state, g, lr), (ds, dg, dlr))
    new, tan = dyn.tangent(state, g, lr, t, ds, dg, dlr)
    _, pullback = torch.func.vjp(lambda s, gg, e: dyn.step(s, gg, e, t), state, g, lr)
    ref_bars = pullback(bar)
    bars = dyn.cotangent(state, g, lr, t, bar)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.utils._pytree.tree_map(close, new, ref_new)
    torch.utils._pytree.tree_map(close, tan, ref_tan)
    torch.utils._pytree.tree_map(close, list(bars), list(ref_bars))
    # None tangents are zeros; B_t alone is the η-column
    _, b_only = dyn.tangent(state, g, lr, t)
    _, ref_b = torch.func.jvp(lambda e: dyn.step(state, g, e, t), (lr,), (torch.ones_like(lr),))
    torch.utils._pytree.tree_map(close, b_only, ref_b)


@dataclass(frozen=True)
class Signed(dynamics.Dynamics):
    """A user's dynamics with only step(): its derivatives come from torch.func."""
    name = "signed"

    def init(self, params):
        return {"w": params}

    def step(self, state, grad, lr, t, **hyper):
        return {"w": state["w"] - lr * torch.tanh(10 * grad)}


def test_user_dynamics_without_closed_form_falls_back_to_autodiff():
    dyn = Signed()
    w, g = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.1, 0.02], dtype=torch.float64)
    lr = torch.tensor(0.1, dtype=torch.float64)
    new, tan = dyn.tangent({"w": w}, g, lr, 0, {"w": torch.ones(2, dtype=torch.float64)}, None, 1.0)
    assert torch.allclose(tan["w"], 1 - torch.tanh(10 * g))
    sbar, gbar, lrbar = dyn.cotangent({"w": w}, g, lr, 0, {"w": torch.ones(2, dtype=torch.float64)})
    assert torch.allclose(lrbar, -torch.tanh(10 * g).sum())


@pytest.mark.parametrize("dyn", TANGENT_CASES, ids=lambda d: f"{d.name}-wd{d.weight_decay}")
def test_scaled_tangent_is_mu_times_the_state_part_plus_the_lr_column(dyn):
    """tangent(..., scale=μ) == jvp along (μ ds, μ dg, dη): the engine's μ A_t z_t + B_t."""
    gen = torch.Generator().manual_seed(2)
    state, g = _random_state(dyn, gen)
    lr, mu, dlr = (torch.tensor(x, dtype=torch.float64) for x in (0.07, 0.6, 1.0))
    ds, dg = _rand_like(state, gen), _rand_like(g, gen)
    scaled = lambda tree: torch.utils._pytree.tree_map(lambda x: mu * x, tree)
    _, ref = torch.func.jvp(lambda s, gg, e: dyn.step(s, gg, e, 4), (state, g, lr), (scaled(ds), scaled(dg), dlr))
    _, tan = dyn.tangent(state, g, lr, 4, ds, dg, 1.0, scale=mu)
    torch.utils._pytree.tree_map(lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14), tan, ref)


@pytest.mark.parametrize("dyn", TANGENT_CASES, ids=lambda d: f"{d.name}-wd{d.weight_decay}")
def test_closed_form_hyperparameter_adjoint_equals_autodiff(dyn):
    """⟨w̄, ∂w'/∂θ⟩ for η and every tunable hyperparameter (the towers' G¹) written out by hand
    equals torch.func's vjp of the step, to 1e-12 in float64 (weight decay, √v = 0 entries)."""
    gen = torch.Generator().manual_seed(2)
    state, g = _random_state(dyn, gen)
    t, lr = 3, torch.tensor(0.07, dtype=torch.float64)
    bar = _rand_like(state["w"], gen)
    names = ("lr", *[n for n in dyn.hyperparameters if getattr(dyn, n) > 0])
    hyper = {n: torch.tensor(float(getattr(dyn, n)), dtype=torch.float64) for n in names if n != "lr"}
    got = dyn.hyper_vjp(state, g, lr, t, bar, names, **hyper)

    def w_of(vals):
        return dyn.step(state, g, vals["lr"], t, **{n: vals[n] for n in names if n != "lr"})["w"]

    _, pullback = torch.func.vjp(w_of, {"lr": lr, **hyper})
    ref = pullback(bar)[0]
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)


def test_update_with_keep_names_its_new_place():
    """update(keep=) moved with the in-place update to hgtoolkit.fastpaths.update."""
    dyn = dynamics.adam()
    state = dyn.init(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="fastpaths.update"):
        dyn.update(state, torch.ones(3, dtype=torch.float64), 0.1, 0, keep={})


def test_adam_beta2_adjoint_is_finite_where_the_second_moment_underflows():
    """float32, first step, g so small that (1 − β2)·g² underflows to v' = 0 while g² does not:
    the β2 term takes the safe square root's 0 there (as at v' = 0 exactly) instead of ±inf, and
    the result equals the same update with those entries' g set to 0."""
    dyn = dynamics.adam()
    g = torch.tensor([1e-22, -3e-22, 0.5, -0.25], dtype=torch.float32)
    assert float((1 - dyn.beta2) * g[0] ** 2) == 0.0 and float(g[0] ** 2) > 0
    state = dyn.init(torch.zeros(4))
    bar = torch.tensor([1.0, -2.0, 0.5, 3.0])
    names = ("lr", "beta1", "beta2")
    got = dyn.hyper_vjp(state, g, torch.tensor(0.01), 0, bar, names)
    assert all(torch.isfinite(got[n]) for n in names)
    tiny_zeroed = dyn.hyper_vjp(state, torch.where(g.abs() < 1e-20, 0.0, g), torch.tensor(0.01), 0, bar, names)
    torch.testing.assert_close(got["beta2"], tiny_zeroed["beta2"], rtol=1e-5, atol=1e-6)
