"""Each fast path of hgtoolkit.fastpaths against the reference (Dynamics.tangent / step into new
tensors, Engine with the default Plan()): bit for bit where the path is elementwise (buffers,
donation, only the carried keys, HD's direction kept as z, one flat leaf), ≤ 1e-12 relative in
float64 where it reassociates a sum (runs as rows: the per-run dots; one flat leaf: h)."""
import dataclasses

import pytest
import torch
from torch.utils._pytree import tree_map

from hgtoolkit import dynamics, fastpaths, online
from hgtoolkit.drive import Oracle
from hgtoolkit.settings import OnlineSettings
from test_dynamics import Signed

CASES = [dynamics.sgd(), dynamics.sgd(weight_decay=0.03), dynamics.momentum(0.9),
         dynamics.nesterov(0.8, weight_decay=0.01), dynamics.adam((0.8, 0.99), eps=1e-6),
         dynamics.adam(weight_decay=0.02), dynamics.adagrad(weight_decay=0.01), dynamics.rmsprop(0.9)]
IDS = [f"{d.name}-wd{d.weight_decay}" for d in CASES]
F64 = dict(dtype=torch.float64)
# the β keyword under whichever name the settings use (beta / hypergrad_lr)
BETA = "hypergrad_lr" if "hypergrad_lr" in {f.name for f in dataclasses.fields(OnlineSettings)} else "beta"


def _clone(tree):
    return tree_map(lambda x: x.clone(), tree)


def _equal(a, b):
    tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True), a, b)


def _close(a, b, rtol=1e-12):
    tree_map(lambda x, y: torch.testing.assert_close(x, y, rtol=rtol, atol=1e-300, equal_nan=True), a, b)


def _state(dyn, gen, steps=3):
    """A state with non-trivial moments (a dead entry: √v = 0 there) and a gradient."""
    w = {"a": torch.randn(3, 4, generator=gen, **F64), "c": torch.randn(2, generator=gen, **F64)}
    state = dyn.init(w)
    for t in range(steps):
        g = tree_map(lambda x: torch.randn(x.shape, generator=gen, **F64), w)
        g["a"][0, 0] = 0.0
        state = dyn.step(state, g, 0.05, t)
    g = tree_map(lambda x: torch.randn(x.shape, generator=gen, **F64), w)
    g["a"][0, 0] = 0.0
    return state, g


@pytest.mark.parametrize("dyn", CASES, ids=IDS)
def test_tangent_into_buffers_and_of_some_keys_is_the_reference_bit_for_bit(dyn):
    """fastpaths.tangent written into (donated) buffers, and of the w key alone: the same bits as
    Dynamics.tangent into new tensors, for B_t alone and for μ A_t z + B_t."""
    gen = torch.Generator().manual_seed(4)
    state, g = _state(dyn, gen)
    lr, mu = torch.tensor(0.07, **F64), torch.tensor(0.6, **F64)
    z = tree_map(lambda x: torch.randn(x.shape, generator=gen, **F64), state)
    hz = tree_map(lambda x: torch.randn(x.shape, generator=gen, **F64), g)
    for args, kw in (((), {}), ((z, hz, 1.0), {"scale": mu})):
        ref_s, ref_z = dyn.tangent(_clone(state), g, lr, 4, *[_clone(a) for a in args[:2]], *args[2:], **kw)
        s_buf, z_buf = _clone(state), _clone(z)
        got = fastpaths.tangent(dyn, s_buf, g, lr, 4, *([z_buf, _clone(hz), 1.0] if args else []), **kw,
                                out_state=s_buf, out_tangent=z_buf if args else _clone(z))
        _equal(got, (ref_s, ref_z))
        assert all(x is y for x, y in zip(torch.utils._pytree.tree_leaves(got[0]),
                                          torch.utils._pytree.tree_leaves(s_buf)))  # donated
        s_w, z_w = fastpaths.tangent(dyn, _clone(state), g, lr, 4, *[_clone(a) for a in args[:2]], *args[2:],
                                     keys=("w",), **kw)
        assert set(z_w) == {"w"}
        _equal((s_w, z_w["w"]), (ref_s, ref_z["w"]))


@pytest.mark.parametrize("dyn", CASES, ids=IDS)
def test_update_into_buffers_is_step_bit_for_bit(dyn):
    """fastpaths.update (the in-place, non-differentiable update written into w's buffers) and
    Dynamics.update equal the differentiable reference Dynamics.step."""
    state, g = _state(dyn, torch.Generator().manual_seed(5))
    lr = torch.tensor(0.07, **F64)
    ref = dyn.step(_clone(state), g, lr, 2)
    _equal(dyn.update(_clone(state), g, lr, 2), ref)
    s = _clone(state)
    got = fastpaths.update(dyn, s, g, lr, 2, out_state={"w": s["w"]})
    _equal(got, ref)
    assert got["w"]["a"] is s["w"]["a"]


ADAMS = [dynamics.adam((0.8, 0.99), eps=1e-6), dynamics.adam(weight_decay=0.02)]


def _same(a, b):
    """torch.equal leaf by leaf (NaN where NaN)."""
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())


@pytest.mark.parametrize("dyn", ADAMS, ids=lambda d: f"adam-wd{d.weight_decay}")
def test_adam_in_place_update_and_its_kept_intermediates_are_the_reference_bit_for_bit(dyn):
    """Buffers.root_quotient (√v' and D in place, u into z's buffer, u/D/√v' kept for hyper_vjp)
    against Leaves.root_quotient and Dynamics.step/tangent/hyper_vjp: torch.equal, a dead
    entry (v' = 0) included."""
    state, g = _state(dyn, torch.Generator().manual_seed(7))
    lr, t = torch.tensor(0.07, **F64), 3
    # the part itself, with and without slopes, u into a given buffer
    m, v = [x.clone() for x in torch.utils._pytree.tree_leaves(state["m"])], \
        [x.clone().abs() for x in torch.utils._pytree.tree_leaves(state["v"])]
    v[0][0, 0] = 0.0
    k, c = 1.7, 3e-7
    ref = dynamics.Leaves(state).root_quotient(m, v, k, c, slopes=True)
    _same(fastpaths.Buffers(_clone(state)).root_quotient(m, [x.clone() for x in v], k, c, slopes=True), ref)
    ref_u = dynamics.Leaves(state).root_quotient(m, v, k, c)[0]
    bufs = [torch.full_like(x, 9.0) for x in m]
    got = fastpaths.Buffers(_clone(state)).root_quotient(m, [x.clone() for x in v], k, c, out=bufs)[0]
    _same(got, ref_u)
    assert all(x is b for x, b in zip(got, bufs))
    # the update, its intermediates kept, and the hyperparameter adjoint reusing them
    keep = {}
    new = fastpaths.update(dyn, _clone(state), g, lr, t, keep=keep)
    _same(new, dyn.step(state, g, lr, t))
    assert set(keep) == set(dyn.kept) == {"u", "den", "root"}
    names = ("lr", "beta1", "beta2")
    fresh = dyn.hyper_vjp(state, g, lr, t, _clone(g), names)
    reused = dyn.hyper_vjp(state, g, lr, t, _clone(g), names, kept=keep)
    for n in names:
        assert torch.equal(fresh[n], reused[n])
    # B_t alone with u computed in z's buffer (z_{t+1} = −u there)
    z = tree_map(lambda x: torch.full_like(x, 5.0), state)
    _same(fastpaths.tangent(dyn, _clone(state), g, lr, t, keys=("w",), out_tangent=z),
          (lambda r: (r[0], {"w": r[1]["w"]}))(dyn.tangent(state, g, lr, t)))


def test_keep_is_left_alone_by_dynamics_whose_adjoint_reads_nothing_back():
    """fastpaths.update(keep=) with RMSProp (no Dynamics.kept): nothing kept, the same numbers."""
    dyn = dynamics.rmsprop(0.9)
    state, g = _state(dyn, torch.Generator().manual_seed(8))
    keep = {}
    _same(fastpaths.update(dyn, _clone(state), g, 0.05, 2, keep=keep), dyn.step(state, g, 0.05, 2))
    assert keep == {}


def test_a_dynamics_without_closed_form_takes_the_same_paths():
    """A user's dynamics with only step(): the buffered variants copy torch.func's tangent."""
    dyn, lr = Signed(), torch.tensor(0.1, **F64)
    s, g, z = {"w": torch.tensor([0.5, -1.0], **F64)}, torch.tensor([0.1, 0.02], **F64), {"w": torch.ones(2, **F64)}
    ref = dyn.tangent(_clone(s), g, lr, 0, _clone(z), g, 1.0, 0.5)
    s_buf, z_buf = _clone(s), _clone(z)
    got = fastpaths.tangent(dyn, s_buf, g, lr, 0, z_buf, g, 1.0, 0.5, out_state=s_buf, out_tangent=z_buf)
    _equal(got, ref)
    assert got[0]["w"] is s_buf["w"] and got[1]["w"] is z_buf["w"]
    _equal(fastpaths.update(dyn, _clone(s), g, lr, 0, out_state=_clone(s)), dyn.step(s, g, lr, 0))


# ------------------------------------------------------------------------- the engine's plans

def _quadratic(gen, shapes, T):
    """L_t(w) = ½ Σ a_t (w − c_t)²: g = a_t (w − c_t), H_t z = a_t z (a_t > 0, per leaf)."""
    a = [[torch.rand(s, generator=gen, **F64) + 0.5 for s in shapes] for _ in range(T + 1)]
    c = [[torch.randn(s, generator=gen, **F64) for s in shapes] for _ in range(T + 1)]

    def oracle(w, z_w, t):
        g = [ai * (wi - ci) for ai, wi, ci in zip(a[t], w, c[t])]
        loss = sum(0.5 * (ai * (wi - ci) ** 2).sum() for ai, wi, ci in zip(a[t], w, c[t]))
        hz = None if z_w is None else [ai * zi for ai, zi in zip(a[t], z_w)]
        return g, loss, hz
    return oracle


def _drive(engine, cfg, w0, oracle, T, sign=1.0):
    """T steps of the engine on the quadratic (train objective); the per-step (η, h), the final
    state. ``sign``: how the state holds z (−1 for HD's direction kept as z)."""
    state = engine.init(w0, cfg)
    trail = []
    for t in range(T):
        w = engine.dynamics.params(state.opt)
        z_w = None if not engine.needs_hvp or t == 0 else [sign * x for x in state.z["w"]]
        g, loss, hz = oracle(w, z_w, t)
        state, aux = engine.update(state, Oracle(g, loss, hz, None, None), t)
        trail.append((aux["lr"].clone(), aux["h"].clone()))
    return trail, state


METHODS = [("hd", {}), ("rtho", {}), ("marthe", {"mu": "auto"}), ("marthe", {"mu": 0.5})]


@pytest.mark.parametrize("dyn", [dynamics.sgd(), dynamics.nesterov(0.8, weight_decay=0.01), dynamics.adam()],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("method, kw", METHODS, ids=[f"{m}{kw.get('mu', '')}" for m, kw in METHODS])
def test_single_run_plan_is_the_reference_engine_bit_for_bit(dyn, method, kw):
    """Plan.choose(single_run=True) (donation; for HD also the direction kept as z) gives the same
    η_t, h_t, parameters and tangent (up to its sign) as the reference Plan()."""
    T, shapes = 6, [(3, 4), (5,)]
    gen = torch.Generator().manual_seed(7)
    oracle = _quadratic(gen, shapes, T)
    w0 = [torch.randn(s, generator=gen, **F64) for s in shapes]
    cfg = online.hyper_config(method, lr=0.05, objective="train", **{BETA: 1e-3}, **kw)
    ref = online.engine_for(cfg, dyn)
    ref = dataclasses.replace(ref, plan=fastpaths.Plan())
    fast = online.engine_for(cfg, dyn, single_run=True)
    assert fast.plan.donate and fast.plan.direction_as_z == (method == "hd")
    sign = -1.0 if fast.plan.direction_as_z else 1.0
    kept = _clone(w0)
    ref_trail, ref_state = _drive(ref, cfg, w0, oracle, T)
    trail, state = _drive(fast, cfg, w0, oracle, T, sign)
    _equal(w0, kept)  # init copied the parameters it donates
    _equal(trail, ref_trail)
    _equal(state.opt, ref_state.opt)
    _equal(tree_map(lambda x: sign * x, state.z), ref_state.z)


@pytest.mark.parametrize("dyn", [dynamics.sgd(), dynamics.momentum(0.9), dynamics.adam()], ids=lambda d: d.name)
@pytest.mark.parametrize("method, kw", [("hd", {}), ("marthe", {"mu": "auto"})], ids=["hd", "marthe"])
def test_runs_as_rows_equal_the_single_runs_to_1e12(dyn, method, kw):
    """Plan(rows=True): R runs (different η_0) along a leading axis equal R reference runs, to
    1e-12 relative in float64 (each run's dot is one sum over its row: reassociated). The
    parameters are one tensor, as those of a ``Problem.rowwise`` problem."""
    T, R, shapes = 6, 3, [(3, 4)]
    gen = torch.Generator().manual_seed(8)
    oracles = [_quadratic(gen, shapes, T) for _ in range(R)]
    w0s = [[torch.randn(s, generator=gen, **F64) for s in shapes] for _ in range(R)]
    cfgs = [online.hyper_config(method, lr=lr, objective="train", **{BETA: 1e-3}, **kw) for lr in (0.02, 0.05, 0.08)]
    ref = online.Engine(dyn, "train", method != "hd", cfgs[0].mu_rule, plan=fastpaths.Plan())
    rows = dataclasses.replace(ref, plan=fastpaths.Plan(rows=True))
    singles = [_drive(ref, c, w, o, T) for c, w, o in zip(cfgs, w0s, oracles)]

    def stacked_oracle(W, Z, t):
        outs = [o([x[r] for x in W], None if Z is None else [x[r] for x in Z], t) for r, o in enumerate(oracles)]
        g = [torch.stack([out[0][i] for out in outs]) for i in range(len(shapes))]
        hz = None if Z is None else [torch.stack([out[2][i] for out in outs]) for i in range(len(shapes))]
        return g, torch.stack([out[1] for out in outs]), hz

    state = tree_map(lambda *xs: torch.stack(xs), *[rows.init(w, c) for w, c in zip(w0s, cfgs)])
    trail = []
    for t in range(T):
        W = state.opt["w"]
        g, loss, hz = stacked_oracle(W, None if not rows.needs_hvp or t == 0 else state.z["w"], t)
        state, aux = rows.update(state, Oracle(g, loss, hz, None, None), t)
        trail.append((aux["lr"].clone(), aux["h"].clone()))
    for r, (ref_trail, ref_state) in enumerate(singles):
        _close([(lr[r], h[r]) for lr, h in trail[1:]], ref_trail[1:])
        _close(tree_map(lambda x: x[r], state.opt), ref_state.opt)
        _close(tree_map(lambda x: x[r], state.z), ref_state.z)


@pytest.mark.parametrize("dyn", [dynamics.sgd(), dynamics.nesterov(0.9), dynamics.adam()], ids=lambda d: d.name)
def test_cotangent_of_rows_equals_the_single_runs_to_1e12(dyn):
    """fastpaths.cotangent(rows=True): the vjp of R runs' updates along a leading axis, η per
    row, equals dyn.cotangent of each run (s̄, ḡ bit for bit, η̄ one per row to 1e-12)."""
    R, gen = 3, torch.Generator().manual_seed(10)
    W, G = (torch.randn(R, 4, generator=gen, **F64) for _ in range(2))
    singles = [dyn.init(W[r]) for r in range(R)]
    if "b" in singles[0]:
        singles = [dict(s, b=torch.randn(4, generator=gen, **F64)) for s in singles]
    bars = [{k: torch.randn(4, generator=gen, **F64) for k in s} for s in singles]
    lrs = torch.tensor([0.01, 0.02, 0.05], **F64)
    stack = lambda xs: {k: torch.stack([x[k] for x in xs]) for k in xs[0]}
    sbar, gbar, lrbar = fastpaths.cotangent(dyn, stack(singles), G, lrs[:, None], 3, stack(bars), rows=True)
    assert lrbar.shape == (R,)
    for r in range(R):
        s_r, g_r, l_r = dyn.cotangent(singles[r], G[r], lrs[r], 3, bars[r])
        _equal(tree_map(lambda x: x[r], sbar), s_r)
        _equal(gbar[r], g_r)
        torch.testing.assert_close(lrbar[r], l_r, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match="closed-form cotangent"):
        fastpaths.cotangent(Signed(), {"w": W}, G, lrs[:, None], 0, {"w": G}, rows=True)


@pytest.mark.parametrize("dyn", [dynamics.nesterov(0.8), dynamics.adam()], ids=lambda d: d.name)
def test_one_flat_leaf_is_the_leaf_list_bit_for_bit_and_h_to_1e12(dyn):
    """The flat-buffer path's core (FlatGroup hands the engine one flat leaf per key): one step
    of the engine on the concatenation gives the pieces' numbers bit for bit for the same η
    (β = 0), and h (one dot instead of a sum of per-leaf dots) to 1e-12."""
    gen = torch.Generator().manual_seed(9)
    sizes = [6, 10, 3, 7]
    cfg = online.hyper_config("rtho", lr=0.05, objective="train", **{BETA: 0.0})
    engine = online.engine_for(cfg, dyn, single_run=True)
    leaves = [torch.randn(n, generator=gen, **F64) for n in sizes]
    g1, g2, hz = ([torch.randn(n, generator=gen, **F64) for n in sizes] for _ in range(3))
    loss = torch.tensor(1.0, **F64)
    results = []
    for flat in (False, True):
        pack = (lambda xs: [torch.cat(xs)]) if flat else (lambda xs: [x.clone() for x in xs])
        state = engine.init(pack(leaves), cfg)
        state, _ = engine.update(state, Oracle(pack(g1), loss, None, None, None), 0)
        state, _ = engine.update(state, Oracle(pack(g2), loss, pack(hz), None, None), 1)
        state = engine.hyper_update(state, pack(g1), 2)
        results.append(({k: torch.cat(v) for k, v in state.opt.items()},
                        {k: torch.cat(v) for k, v in state.z.items()}, state.h))
    (ref_opt, ref_z, ref_h), (opt, z, h) = results
    _equal((opt, z), (ref_opt, ref_z))
    _close(h, ref_h)


def test_the_old_engine_flags_name_the_plan_and_bad_plans_are_refused():
    dyn = dynamics.sgd()
    for old in ({"donate": True}, {"owns_grad": False}, {"rows": True}):
        with pytest.raises(TypeError, match="plan=hgtoolkit.fastpaths.Plan"):
            online.Engine(dyn, **old)
    with pytest.raises(ValueError, match="direction_as_z"):
        online.Engine(dyn, needs_hvp=True, plan=fastpaths.Plan(direction_as_z=True))
    with pytest.raises(TypeError, match="plan"):
        online.Engine(dyn, plan="donate")
    assert fastpaths.Plan.choose(False) == fastpaths.Plan(direction_as_z=True)
    assert fastpaths.Plan.choose(True, single_run=True) == fastpaths.Plan(donate=True)
    assert fastpaths.Plan.choose(False, owns_grad=False, rows=True) == fastpaths.Plan(rows=True)


def test_the_plan_chooses_the_drop_ins_flat_buffers():
    """Plan.flat_group: none for HD (direction as z), mixed update counts, force=False, few or
    mixed-dtype tensors (unless forced, and then only one dtype); a built group over the same
    tensors is reused, another list of tensors gets a new one."""
    many = [torch.zeros(3) for _ in range(fastpaths.MIN_TENSORS)]
    few, plan = many[:2], fastpaths.Plan.choose(True, single_run=True)
    assert fastpaths.Plan.choose(False).flat_group(True, many) is None
    assert plan.flat_group(False, many) is None and plan.flat_group(True, many, same_count=False) is None
    assert plan.flat_group(True, many, force=False) is None and plan.flat_group(True, few) is None
    mixed = [*many[:-1], torch.zeros(3, dtype=torch.float64)]
    assert plan.flat_group(True, mixed) is None and plan.flat_group(True, mixed, force=True) is None
    fg = plan.flat_group(True, many)
    assert isinstance(fg, fastpaths.FlatGroup) and plan.flat_group(True, many, built=fg) is fg
    forced = plan.flat_group(True, few, force=True, built=fg)
    assert isinstance(forced, fastpaths.FlatGroup) and forced is not fg and forced.matches(few)


@pytest.mark.parametrize("dyn", CASES, ids=IDS)
@pytest.mark.parametrize("first", [True, False], ids=["lambda_T", "lambda_t"])
def test_the_reverse_step_in_place_is_the_reference_to_1e12(dyn, first):
    """fastpaths.adjoint_in_place (the exact reverse pass's SGD step, in place on λ_{t+1}):
    λ_t = s̄ + H ḡ and η̄ of dyn.cotangent to 1e-12 (the dots reassociated, −η λ_w fused), for
    heavy ball and plain SGD with and without weight decay, from λ_T (w only) and from a λ_t with
    its b part; None for every other dynamics (Nesterov, Adam, …), which keep the reference."""
    gen = torch.Generator().manual_seed(11)
    state, g = _state(dyn, gen)
    H = torch.randn(14, 14, generator=gen, **F64)
    H = H @ H.T  # H v on the flattened (a, c)

    def hvp(v):
        flat = torch.cat([v["a"].reshape(-1), v["c"]]) @ H
        return {"a": flat[:12].reshape(3, 4), "c": flat[12:]}
    lam = {k: tree_map(lambda x: torch.randn(x.shape, generator=gen, **F64), state["w"])
           for k in (("w",) if first else tuple(state))}
    lr = torch.tensor(0.07, **F64)
    fast = fastpaths.adjoint_in_place(dyn, state, g, lr, _clone(lam), hvp)
    if type(dyn) is not dynamics.SGD or dyn.nesterov:
        assert fast is None
        return
    sbar, gbar, lbar = dyn.cotangent(state, g, lr, 3, lam)
    ref = dict(sbar, w=tree_map(torch.add, sbar["w"], hvp(gbar)))
    _close(fast[0], {k: v for k, v in ref.items() if v is not None and k in fast[0]})
    torch.testing.assert_close(fast[1], lbar, rtol=1e-12, atol=0)
    assert set(fast[0]) == set(state)
