"""hgtoolkit against its peers (docs/peers.md), in float64, to ≤ 1e-12 relative:

- exact hypergradients (``hgtoolkit.hypergradient``, modes reverse / forward / autograd) ==
  autograd through torchopt's (functional and MetaSGD / MetaAdam) and higher's differentiable
  unrolled SGD, momentum, Nesterov, Adam;
- towers (``towers.run`` and the drop-in ``tower.optimizer``) == gdtuo's stacks (Chandra et
  al.'s package): SGD/SGD and Adam/SGD of heights 2 and 3;
- HD (``online.run(method="hd")`` and the drop-ins ``SGDHD`` / ``AdamHD``) == Baydin et al.'s
  SGD-HD / SGDN-HD / Adam-HD written out by hand (``peers.baydin_hd``).

The peer packages are test-only extras (pyproject.toml, ``dev``): a missing one makes its tests
fail with the install command (``peers.require``), never skip.
"""
import functools

import numpy as np
import pytest
import torch

import peers
from hgtoolkit import dynamics, hypergradient, online, optim, problems, towers
from torch.utils._pytree import tree_leaves, tree_unflatten

F64 = torch.float64
PROBLEMS = {"mlp": problems.synthetic_classification(dtype=F64), "beale": problems.from_function("beale")}


def _close(actual, expected, what: str, rtol: float = 1e-12):
    """|actual − expected| ≤ rtol·max|expected| elementwise, and expected is not all zero."""
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (actual, expected))
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    scale = float(b.abs().max())
    assert scale > 0, f"{what}: the reference is all zero (the comparison could not fail)"
    err = float((a - b).abs().max())
    assert err <= rtol * scale, f"{what}: max |difference| {err:.3g} = {err / scale:.3g} relative > {rtol:g}"


@pytest.fixture(scope="module", params=list(peers.PACKAGES))
def peer_package(request):
    return peers.require(request.param)


def test_the_peer_packages_import(peer_package):
    """Each peer imports (it is in the dev extra): a missing one fails here with the pip command."""
    assert peer_package is not None


# ----------------------------------------------------------------------------- exact == torchopt, higher

# name → (hgtoolkit dynamics, peer optimizer, its options, the peers that implement this update)
EXACT = {
    "sgd": (dynamics.sgd(), "sgd", {}, ("torchopt", "torchopt.Meta", "higher")),
    "momentum+wd": (dynamics.momentum(0.9, weight_decay=1e-2), "sgd",
                    dict(momentum=0.9, weight_decay=1e-2), ("torchopt", "torchopt.Meta", "higher")),
    "nesterov": (dynamics.nesterov(0.9), "sgd", dict(momentum=0.9, nesterov=True), ("torchopt", "torchopt.Meta", "higher")),
    # torch.optim's Adam, ε after the bias correction: torchopt's Adam is that update
    "adam": (dynamics.adam(), "adam", {}, ("torchopt", "torchopt.Meta")),
    # higher's Adam adds ε before the bias correction: the same update only for ε = 0
    "adam(eps=0)": (dynamics.adam(eps=0.0), "adam", dict(eps=0.0), ("torchopt", "torchopt.Meta", "higher")),
}
LR = {("mlp", "sgd"): 0.2, ("mlp", "adam"): 0.02, ("beale", "sgd"): 2e-3, ("beale", "adam"): 1e-2}
DRIVERS = {"torchopt": peers.torchopt_hypergradient, "higher": peers.higher_hypergradient,
           "torchopt.Meta": functools.partial(peers.torchopt_hypergradient, meta=True)}
EXACT_CASES = [(peer, opt) for opt, spec in EXACT.items() for peer in spec[3]]


def _schedule(problem: str, kind: str, T: int) -> torch.Tensor:
    return LR[problem, kind] * torch.linspace(1.0, 0.5, T, dtype=F64)  # a schedule, not a constant


@functools.lru_cache(maxsize=None)
def _exact(opt: str, problem: str, T: int) -> dict:
    """hgtoolkit's (f(η), ∇f(η)) in each mode, computed once for all the peers."""
    dyn, kind = EXACT[opt][:2]
    return {mode: hypergradient(PROBLEMS[problem], _schedule(problem, kind, T), dyn, mode=mode)
            for mode in ("reverse", "forward", "autograd")}


@pytest.mark.parametrize("T", [1, 4, 10])
@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("peer,opt", EXACT_CASES)
def test_exact_hypergradient_is_the_peers_unrolled_autograd(peer, opt, problem, T):
    _, kind, options, _ = EXACT[opt]
    value, grad = DRIVERS[peer](PROBLEMS[problem], _schedule(problem, kind, T), kind, **options)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().min()) > 0
    for mode, r in _exact(opt, problem, T).items():
        _close(r.value, value, f"f(η), mode={mode} vs {peer}")
        _close(r.grad, grad, f"∇f(η), mode={mode} vs {peer}")


def test_higher_adam_with_eps_is_not_torch_adam():
    """Why "adam" is compared with torchopt only: higher's ε sits before the bias correction,
    a difference far above the tolerance (and far below any practical effect)."""
    p, lrs = PROBLEMS["mlp"], torch.full((4,), LR["mlp", "adam"], dtype=F64)
    _, grad = peers.higher_hypergradient(p, lrs, "adam")
    ref = hypergradient(p, lrs, dynamics.adam()).grad
    rel = float((grad - ref).abs().max() / ref.abs().max())
    assert 1e-9 < rel < 1e-3


# ----------------------------------------------------------------------------- towers == gdtuo

# name → (problem, tower, steps); every learnt LR moves by ≥ 20 % of its start over the steps
TOWERS = {
    "sgd/sgd": ("mlp", "sgd(lr=0.05) / sgd(lr=0.02)", 30),
    "sgd/sgd/sgd": ("mlp", "sgd(lr=0.05) / sgd(lr=0.02) / sgd(lr=0.05)", 30),
    "sgd/sgd beale": ("beale", "sgd(lr=0.0001) / sgd(lr=1e-09)", 30),
    "sgd/sgd/sgd beale": ("beale", "sgd(lr=0.0001) / sgd(lr=1e-09) / sgd(lr=1e-18)", 30),
    # gdtuo.AdamBaydin: only the LR tuned (gdtuo.Adam learns β through tanh: no counterpart)
    "adam/sgd": ("mlp", "adam(lr=0.01, tune=lr) / sgd(lr=0.0001)", 30),
    "adam/sgd/sgd": ("mlp", "adam(lr=0.01, tune=lr) / sgd(lr=0.0001) / sgd(lr=1e-07)", 30),
}


def _record(runner, steps):
    """Run ``steps`` steps of a ``peers.GdtuoTower`` / ``peers.TowerDropIn``: (LR of every level
    at every step, w_T)."""
    lrs = []
    for t in range(steps):
        runner.step(t)
        lrs.append(runner.lrs())
    return np.array(lrs), runner.weights()


@pytest.mark.parametrize("api", ["run", "optimizer"])
@pytest.mark.parametrize("case", list(TOWERS))
def test_tower_is_gdtuo_stack(case, api):
    name, spec, steps = TOWERS[case]
    problem, tower = PROBLEMS[name], towers.parse(spec)
    lrs_ref, w_ref = _record(peers.GdtuoTower(problem, tower, adam_v0=0.0), steps)  # v from 0, as torch.optim
    if api == "run":
        res = towers.run(problem, tower, steps)
        lrs = np.stack([res.history.values(k)["lr"] for k in range(tower.height)], axis=1)
        w = tree_leaves(res.params)
    else:
        lrs, w = _record(peers.TowerDropIn(problem, tower), steps)
    for k in range(tower.height - 1):  # the learnt LRs moved, so the comparison can fail
        assert np.ptp(lrs_ref[:, k]) > 0.1 * abs(lrs_ref[0, k]), f"level {k}'s LR barely moved"
    for k in range(tower.height):
        _close(lrs[:, k], lrs_ref[:, k], f"level-{k} LR, {api} vs gdtuo")
    for i, (a, b) in enumerate(zip(w, w_ref)):
        _close(a, b, f"w_T leaf {i}, {api} vs gdtuo")


def test_gdtuo_stack_refuses_what_it_has_no_counterpart_for():
    with pytest.raises(ValueError, match="no counterpart"):
        peers.gdtuo_stack(towers.parse("sgd(lr=0.1, momentum=0.9) / sgd(lr=0.01)"))


# ----------------------------------------------------------------------------- HD == Baydin et al.

HD_LR = {("mlp", "sgd"): 0.2, ("mlp", "nesterov"): 0.05, ("mlp", "adam"): 0.02,
         ("beale", "sgd"): 2e-3, ("beale", "nesterov"): 2e-4, ("beale", "adam"): 1e-2}
HD_BETA = {("mlp", "sgd"): 1e-2, ("mlp", "nesterov"): 1e-3, ("mlp", "adam"): 1e-4,
           ("beale", "sgd"): 1e-7, ("beale", "nesterov"): 1e-7, ("beale", "adam"): 1e-4}
HD_CASES = [("mlp", opt, wd) for opt in ("sgd", "nesterov", "adam") for wd in (0.0, 0.05)] + \
           [("beale", opt, 0.0) for opt in ("sgd", "nesterov", "adam")]


def _dropin(problem, opt, lr, beta, wd, T):
    """SGDHD / AdamHD in a plain loop over the problem's minibatches: (η_t, w_T)."""
    leaves, spec = peers.leaf_copies(problem)
    if opt == "adam":
        o = optim.AdamHD(leaves, lr=lr, hypergrad_lr=beta, weight_decay=wd)
    else:
        nesterov = opt == "nesterov"
        o = optim.SGDHD(leaves, lr=lr, hypergrad_lr=beta, weight_decay=wd, momentum=0.9 if nesterov else 0.0,
                        nesterov=nesterov)
    lrs = []
    for t in range(T):
        o.zero_grad()
        problem.train_loss(tree_unflatten(leaves, spec), t).backward()
        o.step()
        lrs.append(o.param_groups[0]["effective_lr"])
    return np.array(lrs), [x.detach() for x in leaves]


@pytest.mark.parametrize("api", ["online.run", "drop-in"])
@pytest.mark.parametrize("name,opt,wd", HD_CASES)
def test_hd_is_baydin(name, opt, wd, api):
    T, p = 12, PROBLEMS[name]
    lr, beta = HD_LR[name, opt], HD_BETA[name, opt]
    alphas, _, theta = peers.baydin_hd(p, opt, lr, beta, T, wd=wd)
    assert np.ptp(alphas) > 1e-3 * lr  # the LR did move
    if api == "online.run":
        dyn = {"sgd": dynamics.sgd(weight_decay=wd), "nesterov": dynamics.nesterov(0.9, weight_decay=wd),
               "adam": dynamics.adam(weight_decay=wd)}[opt]
        r = online.run(p, "hd", dyn, lr=lr, hypergrad_lr=beta, steps=T, objective="train", lr_floor=None)
        lrs, w = r.lrs, tree_leaves(r.final_params)
    else:
        lrs, w = _dropin(p, opt, lr, beta, wd, T)
    _close(lrs, alphas, f"η_t, {api} vs Baydin")
    for i, (a, b) in enumerate(zip(w, tree_leaves(theta))):
        _close(a, b, f"w_T leaf {i}, {api} vs Baydin")
