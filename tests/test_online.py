"""The online engine (HD / RTHO / MARTHE as one recursion): exactness, equivalences, records,
divergence handling and the MARTHE paper's Fig. 1 observations."""
import math
import warnings

import numpy as np
import pytest
import torch

import peers
from hgtoolkit._tree import tree_leaves
from hgtoolkit import DivergenceError, directional_derivative, dynamics, marthe, online, problems
from hgtoolkit.errors import DivergenceWarning
from hgtoolkit.online import OnlineResult
from hgtoolkit.trajectory import make_step, tangent_step

OPTIMIZERS = {"sgd": dynamics.sgd(), "nesterov": dynamics.nesterov(0.9), "adam": dynamics.adam()}
# LRs that keep each optimizer stable on the tiny float64 MLP and on Beale.
MLP_LR = {"sgd": 0.2, "nesterov": 0.05, "adam": 0.02}
BEALE_LR = {"sgd": 2e-3, "nesterov": 2e-4, "adam": 1e-2}
MLP = problems.synthetic_classification()
BEALE = problems.from_function("beale")


def _same_run(a: OnlineResult, b: OnlineResult, tol=1e-12):
    assert a.steps_run == b.steps_run and a.diverged_at == b.diverged_at
    for key in ("lrs", "hypergrads", "train_losses", "val_losses"):
        x, y = getattr(a, key), getattr(b, key)
        assert np.allclose(x, y, rtol=tol, atol=tol * np.abs(y).max()), key
    for x, y in zip(tree_leaves(a.final_params), tree_leaves(b.final_params)):
        assert torch.allclose(x, y, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- the step

@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_split_step_equals_one_jvp_of_the_whole_step(opt):
    """The engine's split step — gradient_and_hvp, then the closed-form tangent of the update
    with (μz, μ·Hz_w, 1) — == one torch.func.jvp of the whole step Φ_t with tangent (μz, 1)."""
    dyn, problem = OPTIMIZERS[opt], MLP
    gen = torch.Generator().manual_seed(1)
    state = dyn.init(problem.params0)
    for t in range(3):  # some non-trivial moments
        state, _ = make_step(problem, dyn)(state, torch.tensor(MLP_LR[opt], dtype=torch.float64), t)
    z = {k: [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in v.values()]
         for k, v in state.items()}
    z = {k: dict(zip(state[k].keys(), v)) for k, v in z.items()}
    lr, mu, t = torch.tensor(MLP_LR[opt], dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64), 3
    g, loss, hz = online.gradient_and_hvp(problem)(state["w"], z["w"], t)
    s1, z1 = dyn.tangent(state, g, lr, t, {k: {n: mu * x for n, x in v.items()} for k, v in z.items()},
                         {n: mu * x for n, x in hz.items()}, 1.0)
    s2, z2, loss2 = tangent_step(make_step(problem, dyn), state, lr, t,
                                 {k: {n: mu * x for n, x in v.items()} for k, v in z.items()},
                                 torch.ones((), dtype=torch.float64))
    assert float(loss) == float(loss2)
    for k in s1:
        for n in s1[k]:
            assert torch.allclose(s1[k][n], s2[k][n], rtol=1e-13, atol=1e-15)
            assert torch.allclose(z1[k][n], z2[k][n], rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------- HD = Baydin et al.

# HD == Baydin et al.'s SGD-HD / SGDN-HD / Adam-HD written out (peers.baydin_hd): tests/test_peers.py;
# here, the regularised gradient in h.

@pytest.mark.parametrize("opt", ["sgd", "nesterov", "adam"])
def test_hd_with_weight_decay_uses_the_regularised_gradient_as_baydin(opt):
    """objective="train" differentiates what the optimizer minimises, L_t + wd/2·‖w‖² (Baydin
    et al.'s code); hd_gradient="raw" (the plain minibatch gradient in h) is measurably different."""
    T, wd, beta = 10, 0.05, {"sgd": 1e-2, "nesterov": 1e-3, "adam": 1e-4}[opt]
    alphas, _, theta = peers.baydin_hd(MLP, opt, MLP_LR[opt], beta, T, wd=wd)
    dyn = {"sgd": dynamics.sgd(weight_decay=wd), "nesterov": dynamics.nesterov(0.9, weight_decay=wd),
           "adam": dynamics.adam(weight_decay=wd)}[opt]
    kw = dict(lr=MLP_LR[opt], hypergrad_lr=beta, steps=T, objective="train", lr_floor=None)
    r = online.run(MLP, "hd", dyn, **kw)
    assert np.allclose(r.lrs, alphas, rtol=1e-12, atol=0)
    for k in theta:
        assert torch.allclose(r.final_params[k], theta[k], rtol=1e-12, atol=1e-14)
    raw = online.run(MLP, "hd", dyn, hd_gradient="raw", **kw)
    assert raw.config["hd_gradient"] == "raw" and not np.allclose(raw.lrs, alphas, rtol=1e-6, atol=0)


def test_train_mode_evaluates_one_gradient_per_step():
    calls = {"train": 0, "val": 0}

    def counted(fn, key):
        def wrapped(*args):
            calls[key] += 1
            return fn(*args)
        return wrapped

    p = problems.Problem(MLP.params0, counted(MLP.train_loss, "train"), counted(MLP.val_loss, "val"))
    T = 10
    online.run(p, "hd", lr=0.1, hypergrad_lr=1e-3, steps=T, objective="train", eval_every=T)
    assert calls["train"] == T + 1  # one per step + the final h_T of the record
    calls.update(train=0, val=0)
    online.run(p, "rtho", lr=0.1, hypergrad_lr=1e-3, steps=T, objective="val", eval_every=T)
    assert calls["train"] == T and calls["val"] == T + 1  # ∇E(w_1) … ∇E(w_T), E(w_0)


# ----------------------------------------------------------------------------- MARTHE ⊃ HD, RTHO

@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_marthe_mu0_is_hd_and_mu1_is_rtho(opt):
    kw = dict(optimizer=OPTIMIZERS[opt], lr=MLP_LR[opt], hypergrad_lr=1e-3, steps=6)
    hd, rtho = online.run(MLP, "hd", **kw), online.run(MLP, "rtho", **kw)
    assert not np.allclose(hd.hypergrads, rtho.hypergrads)  # the comparison can fail
    _same_run(online.run(MLP, "marthe", mu=0.0, **kw), hd)
    _same_run(online.run(MLP, "marthe", mu=1.0, **kw), rtho)
    # through the μ-rule code path (HVP computed, μ applied by the rule)
    _same_run(online.run(MLP, "marthe", mu_rule=lambda mu, c, s: (0.0, c), **kw), hd)
    _same_run(online.run(MLP, "marthe", mu_rule=lambda mu, c, s: (1.0, c), **kw), rtho)


# ----------------------------------------------------------------------------- RTHO is exact

@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", ["beale", "mlp"])
def test_rtho_hypergradient_is_the_exact_constant_lr_derivative(name, opt):
    """β = 0 freezes η, so z_t = dw_t/dη for the constant schedule and h_t = dE(w_t)/dη."""
    problem, lr = (BEALE, BEALE_LR[opt]) if name == "beale" else (MLP, MLP_LR[opt])
    T = 10
    for method, extra in (("rtho", {}), ("marthe", {"mu": 1.0})):
        r = online.run(problem, method, OPTIMIZERS[opt], lr=lr, hypergrad_lr=0.0, steps=T, **extra)
        assert np.all(r.lrs == lr)
        for t in (1, 5, T):
            _, exact = directional_derivative(problem, torch.full((t,), lr, dtype=torch.float64),
                                              torch.ones(t, dtype=torch.float64), OPTIMIZERS[opt])
            assert abs(r.hypergrads[t - 1] - float(exact)) <= 1e-9 * abs(float(exact)), (method, t)


def test_val_and_train_objectives_agree_when_train_is_val():
    kw = dict(lr=1e-3, hypergrad_lr=1e-6, steps=30, eval_every=1)
    _same_run(online.run(BEALE, "rtho", objective="val", **kw),
              online.run(BEALE, "rtho", objective="train", **kw), tol=1e-13)


# ----------------------------------------------------------------------------- Fig. 1 of MARTHE

def test_beale_rtho_beats_hd_where_neither_diverges():
    """MARTHE paper, Fig. 1 (left): Beale, 500 GD steps from a fixed point. Measured grid
    (lr = 1e-3, β = 1e-9 … 3e-6): RTHO's best value is ~10× lower than HD's at every β
    where neither diverges; both diverge from β = 1e-5."""
    for beta in (1e-8, 1e-6):
        best = {}
        for method in ("hd", "rtho"):
            r = online.run(BEALE, method, lr=1e-3, hypergrad_lr=beta, steps=500, objective="train",
                           eval_every=1, keep_params=False)
            assert r.diverged_at is None
            best[method] = r.best_val_loss
        assert best["rtho"] < 0.5 * best["hd"], (beta, best)
    with pytest.warns(DivergenceWarning):
        assert online.run(BEALE, "rtho", lr=1e-3, hypergrad_lr=1e-5, steps=500).diverged_at is not None


def _sharp_bukin(eps=1e-4):
    """Bukin N.6 with its √|u| valley smoothed as (u² + ε)^{1/4} (u = y − 0.01x²), so the
    valley stays sharp. The project's ``bukin_smooth`` squares u instead; on it HD and RTHO
    end up within a few % of each other (see the online report), so Fig. 1's Bukin panel is
    checked on this sharper stand-in."""
    def f(w):
        x, y = w[..., 0], w[..., 1]
        u = y - 0.01 * x * x
        return 100 * (u * u + eps) ** 0.25 + 0.01 * torch.sqrt((x + 10) ** 2 + eps)
    return problems.from_function(f, x0=[-7.0, 2.0], name="sharp_bukin")


def test_sharp_bukin_hd_beats_rtho_and_rtho_lr_collapses():
    """Fig. 1 (right): RTHO's LR first grows, then collapses to 0 once the trajectory reaches
    the valley (its accumulated tangent is stale), while HD keeps a positive LR and gets
    closer to the minimum. Measured for β = 1e-9 … 1e-7: RTHO's η peaks within ~20 steps at
    2.7–16× η_0 and is 0 for 86–90 % of the steps; HD's is 0 for ≤ 4 %, and HD's optimality
    gap is 0.03–0.15 against RTHO's 4.1–5.1. (Not at every β: at β = 1e-6 and 1e-5 RTHO
    ends closer, gap 1.2 and 0.1 against HD's 2.9 and 2.3; from 1e-4 on HD is ahead again.)"""
    p = _sharp_bukin()
    kw = dict(lr=1e-3, hypergrad_lr=1e-8, steps=500, objective="train", eval_every=1, keep_params=False)
    hd, rtho = online.run(p, "hd", **kw), online.run(p, "rtho", **kw)
    assert hd.diverged_at is None and rtho.diverged_at is None
    floor = 100 * 1e-4 ** 0.25  # f at the minimiser (-10, 1) is 10 + 1e-4
    assert hd.best_val_loss - floor < 0.2 * (rtho.best_val_loss - floor)
    # the early peak and the collapse (late steps are chaotic: after ~400 steps at η = 0 the
    # stale tangent can flip h's sign, and when depends on rounding)
    peak = int(np.argmax(rtho.lrs[:100]))
    assert peak < 50 and rtho.lrs[peak] > 2 * rtho.lrs[0] and rtho.lrs[peak + 1:peak + 300].max() < rtho.lrs[peak]
    assert (rtho.lrs[peak:peak + 300] == 0.0).mean() > 0.8
    assert np.mean(rtho.lrs == 0) > 0.5 and np.mean(hd.lrs == 0) < 0.1


# ----------------------------------------------------------------------------- MARTHE's rules

def _stats(lr=0.1, h=1.0, h_prev=2.0, grad_dot=0.5):
    return marthe.HyperStats(t=3, lr=lr, prev_lr=0.1, hypergrad=h, prev_hypergrad=h_prev,
                             grad_dot=grad_dot)


def test_adaptive_mu_rule():
    # q = η/(∇E·g) = 0.1/0.5 = 0.2; from μ = c = 0: c stays 0 and μ = 0.2
    mu, c = marthe.adaptive_mu(0.0, 0.0, _stats())
    assert (mu, c) == pytest.approx((0.2, 0.0))
    mu2, c2 = marthe.adaptive_mu(mu, c, _stats())  # c ← c + μ, μ ← z^{1/(c+1)}
    assert c2 == pytest.approx(0.2) and mu2 == pytest.approx(0.2 ** (1 / 1.2))
    mu3, c3 = marthe.adaptive_mu(mu2, c2, _stats())
    assert c3 == pytest.approx(0.2 + mu2) and mu3 > mu2  # a streak lengthens the horizon
    assert marthe.adaptive_mu(mu3, c3, _stats(grad_dot=-1.0)) == (0.0, pytest.approx(c3 + mu3))
    assert marthe.adaptive_mu(0.0, 5.0, _stats(lr=10.0)) == (1.0, 0.0)  # μ = 0 reset the counter


def test_beta_rules():
    s = _stats(lr=0.3, h=2.0, h_prev=-1.5)
    assert marthe.beta_rule_hh(1.0, 0.1, s) == pytest.approx(1.0 + 0.1 * 2.0 * -1.5)
    assert marthe.beta_rule_hh(0.1, 0.1, s) == 0.0  # clipped at 0
    assert marthe.beta_rule_h_eta(1.0, 0.1, s) == pytest.approx(1.0 + 0.1 * 2.0 * 0.3)


def test_marthe_adaptive_run_records_its_mu_and_beta():
    r = online.run(MLP, "marthe", lr=0.05, hypergrad_lr="auto", hypergrad_lr_init=1e-3, kappa=1e-3, mu="auto", steps=20)
    assert r.config["mu"] == "auto" and r.config["hypergrad_lr"] == "auto" and r.config["kappa"] == 1e-3
    assert r.mus[0] == 0.0 and np.all((r.mus >= 0) & (r.mus <= 1)) and np.ptp(r.mus) > 0
    assert r.hypergrad_lrs[0] == 1e-3 and np.all(r.hypergrad_lrs >= 0) and np.ptp(r.hypergrad_lrs) > 0
    # η_{t+1} = max(η_t − β_t h_{t+1}, 0)
    expected = np.maximum(r.lrs[:-1] - r.hypergrad_lrs[:-1] * r.hypergrads[:-1], 0)
    assert np.allclose(r.lrs[1:], expected, rtol=1e-14, atol=0)


# ----------------------------------------------------------------------------- divergence

def test_divergence_is_detected_recorded_and_warned():
    with pytest.warns(DivergenceWarning, match="diverged_at"):
        r = online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-3, steps=500)
    assert r.diverged and 0 < r.diverged_at < 20
    assert r.steps_run == r.diverged_at == len(r.hypergrads) == len(r.train_losses)
    assert np.all(np.isfinite(r.lrs)) and r.final_params is None and "step" in r.divergence
    with pytest.raises(DivergenceError) as exc:
        online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-3, steps=500, raise_on_divergence=True)
    assert exc.value.step == r.diverged_at


def test_exploding_lr_counts_as_divergence():
    with pytest.warns(DivergenceWarning, match="lr_max"):
        r = online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-6, steps=200, lr_max=2e-3)
    assert r.diverged and np.all(r.lrs <= 2e-3)
    assert r.lrs[-1] - r.hypergrad_lrs[-1] * r.hypergrads[-1] > 2e-3  # the recorded h pushed η over


def test_find_hypergrad_lr_divides_until_the_run_does_not_diverge():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)  # find_hypergrad_lr must not leak warnings
        r = online.find_hypergrad_lr(BEALE, start=1e-2, method="rtho", lr=1e-3, steps=100)
    tried = r.config["hypergrad_lr_search"]
    assert [t["hypergrad_lr"] for t in tried] == pytest.approx([1e-2, 1e-3, 1e-4, 1e-5, 1e-6][:len(tried)])
    assert all(t["diverged_at"] is not None for t in tried[:-1]) and tried[-1]["diverged_at"] is None
    assert len(tried) >= 2 and not r.diverged and r.config["hypergrad_lr"] == tried[-1]["hypergrad_lr"]
    # with hypergrad_lr="auto" it searches κ
    r = online.find_hypergrad_lr(BEALE, start=1e-6, lr=1e-3, steps=50)
    assert "kappa" in r.config["hypergrad_lr_search"][0] and r.config["kappa"] == r.config["hypergrad_lr_search"][-1]["kappa"]
    with pytest.raises(DivergenceError, match="find_hypergrad_lr: all 2 values of hypergrad_lr .* diverged; the last: training"):
        online.find_hypergrad_lr(BEALE, start=1.0, max_tries=2, method="hd", lr=1e-3, steps=100)
    with pytest.raises(AttributeError, match="moved to hgtoolkit.online.find_hypergrad_lr"):
        marthe.find_beta(BEALE, start=1.0)


# ----------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs,match", [
    (dict(method="adam-hd"), "method"),
    (dict(hypergrad_lr=-1e-3), "hypergrad_lr"),
    (dict(method="marthe", mu=1.5), "mu"),
    (dict(method="marthe", mu=-0.1), "mu"),
    (dict(method="marthe", mu="often"), "mu"),
    (dict(method="hd", mu=0.5), "mu"),
    (dict(method="hd", hypergrad_lr=None), "hypergrad_lr"),
    (dict(method="hd", hypergrad_lr="auto"), "hypergrad_lr"),
    (dict(method="marthe", hypergrad_lr="auto", kappa=-1.0), "kappa"),
    (dict(method="marthe", hypergrad_lr="auto", hypergrad_lr_rule="hx"), "hypergrad_lr_rule"),
    (dict(objective="test"), "objective"),
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr_floor=-1.0), "lr_floor"),
    (dict(steps=0), "steps"),
    (dict(eval_every=0), "eval_every"),
    (dict(optimizer="lion"), "optimizer"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    args = dict(method="rtho", lr=1e-3, hypergrad_lr=1e-3, steps=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        online.run(BEALE, **args)


# ----------------------------------------------------------------------------- the record

def test_record_fields_and_save_load_round_trip(tmp_path):
    r = online.run(MLP, "marthe", lr=0.05, hypergrad_lr=1e-3, mu="auto", steps=9, eval_every=4, seed=3)
    assert r.lrs.shape == r.hypergrad_lrs.shape == r.mus.shape == r.hypergrads.shape == (9,)
    assert r.train_losses.shape == r.step_times.shape == (9,) and np.all(np.diff(r.step_times) >= 0)
    assert list(r.eval_steps) == [0, 4, 8, 9] and r.val_accuracy.shape == (4,)
    assert r.final_val_loss == r.val_losses[-1] and r.best_val_loss == r.val_losses.min()
    assert r.config["problem"]["batch_seed"] == 3 and r.config["optimizer"]["name"] == "sgd"
    assert r.wall_time > 0 and math.isfinite(r.final_lr)
    path = r.save(tmp_path / "run.json")
    assert path.exists() and (tmp_path / "run.npz").exists()
    back = OnlineResult.load(tmp_path / "run")
    assert back.config == r.config and back.diverged_at is None and back.final_lr == r.final_lr
    for key in ("lrs", "hypergrad_lrs", "mus", "hypergrads", "train_losses", "eval_steps", "val_losses",
                "val_accuracy", "step_times"):
        assert np.array_equal(getattr(back, key), getattr(r, key)), key
    for k in r.final_params:
        assert torch.equal(back.final_params[k], r.final_params[k])
    # a diverged run (no params, NaN final LR) round-trips too
    with pytest.warns(DivergenceWarning):
        d = online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-3, steps=50)
    back = OnlineResult.load(d.save(tmp_path / "div"))
    assert back.diverged_at == d.diverged_at and back.final_params is None and math.isnan(back.final_lr)
    assert back.val_accuracy is None and back.divergence == d.divergence


def test_seed_resamples_the_minibatch_order():
    kw = dict(lr=0.1, hypergrad_lr=1e-3, steps=6)
    a, b = online.run(MLP, "hd", seed=1, **kw), online.run(MLP, "hd", seed=1, **kw)
    c = online.run(MLP, "hd", seed=2, **kw)
    assert np.array_equal(a.train_losses, b.train_losses)
    assert not np.array_equal(a.train_losses, c.train_losses)
    assert np.array_equal(online.run(BEALE, "hd", seed=5, lr=1e-3, hypergrad_lr=1e-6, steps=5).lrs,
                          online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-6, steps=5).lrs)


def test_float32_problem_runs_in_float32():
    p = problems.synthetic_classification(dtype=torch.float32)
    r = online.run(p, "marthe", "adam", lr=0.01, hypergrad_lr=1e-4, steps=5)
    assert not r.diverged and r.final_params["0.weight"].dtype == torch.float32


def test_cli_online_writes_record_and_figure(tmp_path, capsys):
    from hgtoolkit.cli import main
    rc = main(["online", "--problem", "beale", "--method", "marthe", "--hypergrad-lr", "1e-7", "--mu", "auto",
               "--steps", "20", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    r = OnlineResult.load(tmp_path / "online_beale_marthe.json")
    assert r.steps_run == 20 and r.config["mu"] == "auto" and r.config["hypergrad_lr"] == 1e-7
    assert (tmp_path / "online_beale_marthe.png").stat().st_size > 0
    # divergence: the record is written and the exit status says so
    rc = main(["online", "--problem", "beale", "--method", "hd", "--hypergrad-lr", "1e-3", "--steps", "50",
               "--out", str(tmp_path), "--name", "div", "--no-progress"])
    assert rc == 1 and OnlineResult.load(tmp_path / "div").diverged
    # --find-hypergrad-lr searches κ for MARTHE's adaptive β
    rc = main(["online", "--problem", "beale", "--method", "marthe", "--hypergrad-lr", "auto", "--kappa", "1e-8",
               "--find-hypergrad-lr", "--steps", "20", "--out", str(tmp_path), "--name", "fb", "--no-progress"])
    assert rc == 0 and OnlineResult.load(tmp_path / "fb").config["hypergrad_lr_search"][0]["kappa"] == 1e-8
    assert main(["online", "--method", "hd", "--steps", "5", "--out", str(tmp_path)]) == 2  # β missing
    assert "hypergrad_lr" in capsys.readouterr().err


# ----------------------------------------------------------------------------- no silent blow-ups

def _small_mnist():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return problems.mnist_mlp(n_train=500, n_val=100, batch_size=50, hidden=(32,))


def test_loss_above_divergence_factor_is_divergence_and_adaptive_beta_is_bounded():
    """MNIST MLP, MARTHE with μ and β adaptive and a large κ: without the β bound β explodes
    (the old ~1e35), with it every update stays within hypergrad_lr_bound·max(η, η_0)/|h|; a run whose
    loss climbs above divergence_factor × its start is stopped and says so."""
    p = _small_mnist()
    kw = dict(method="marthe", lr=0.05, hypergrad_lr="auto", hypergrad_lr_init=1e-3, kappa=10.0, mu="auto", steps=40,
              objective="train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        free = online.run(p, hypergrad_lr_bound=None, divergence_factor=None, **kw)
        bounded = online.run(p, divergence_factor=None, **kw)
    assert np.nanmax(free.hypergrad_lrs) > 1e3 * np.nanmax(bounded.hypergrad_lrs) or free.diverged
    assert bounded.hypergrad_lr_capped > 0 and bounded.config["hypergrad_lr_bound"] == 1.0
    n = bounded.steps_run - 1
    # β_{t+1}·|h_{t+1}| ≤ hypergrad_lr_bound·max(η_{t+1}, η_0): hypergrads[t] = h_{t+1}, lrs/betas[t+1]
    h, lrs, betas = bounded.hypergrads[:n], bounded.lrs[1:n + 1], bounded.hypergrad_lrs[1:n + 1]
    assert np.all(betas * np.abs(h) <= np.maximum(lrs, 0.05) * (1 + 1e-12))
    # a run pushed up the loss surface: stopped at the first step above 2× the initial loss
    with pytest.warns(DivergenceWarning, match="divergence_factor"):
        r = online.run(p, "hd", lr=3.0, hypergrad_lr=0.0, steps=30, objective="train")
    assert r.diverged and "divergence_factor" in r.divergence
    t = r.diverged_at
    loss_t = online.run(p, "hd", lr=3.0, hypergrad_lr=0.0, steps=t + 1, objective="train",
                        divergence_factor=None).train_losses
    assert loss_t[t] > 2 * loss_t[0] and np.all(loss_t[:t] <= 2 * loss_t[0])


def test_val_batch_size_draws_a_fresh_validation_minibatch_each_step():
    p = _small_mnist()
    kw = dict(method="marthe", lr=0.05, hypergrad_lr=1e-3, mu=0.5, steps=6)
    r = online.run(p, val_batch_size=20, **kw)
    assert r.config["val_batch_size"] == 20 and list(r.eval_steps) == [0, 6]
    # by hand: h_t = ∇E_{B_t}(w_t)·z_t with B_t = problem.val_batch(t, 20)
    full = online.run(p, **kw)
    assert not np.allclose(r.hypergrads, full.hypergrads)
    with pytest.raises(ValueError, match="val_batch_size"):
        online.run(p, val_batch_size=20, objective="train", **{**kw, "method": "hd", "mu": None})
    with pytest.raises(ValueError, match="val_batch"):
        online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-6, steps=3, val_batch_size=2)


def test_mu_rule_must_be_a_tensor_function():
    def python_rule(mu, c, stats):
        return (1.0 if float(stats.grad_dot) > 0 else 0.0), c
    with pytest.raises(TypeError, match="tensor function"):
        online.run(MLP, "marthe", lr=0.05, hypergrad_lr=1e-3, mu_rule=python_rule, steps=3)
    tensor_rule = lambda mu, c, stats: (torch.where(stats.grad_dot > 0, 1.0, 0.0), c)
    r = online.run(MLP, "marthe", lr=0.05, hypergrad_lr=1e-3, mu_rule=tensor_rule, steps=5)
    assert set(np.unique(r.mus)) <= {0.0, 1.0}


def test_val_is_train_reuses_the_training_gradient_bit_for_bit():
    """For a deterministic problem (E = L_t, ``Problem.val_is_train``) the engine takes ∇E(w_t)
    to be the gradient it already has: the same numbers as computing ∇E separately."""
    assert BEALE.val_is_train
    twin = problems.Problem(BEALE.params0, BEALE.train_loss, BEALE.val_loss, name="beale")
    assert not twin.val_is_train
    for method in ("hd", "rtho", "marthe"):
        a = online.run(BEALE, method, lr=1e-3, hypergrad_lr=1e-7, steps=60)
        b = online.run(twin, method, lr=1e-3, hypergrad_lr=1e-7, steps=60)
        for key in ("lrs", "hypergrads", "val_losses", "mus"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=f"{method} {key}")


@pytest.mark.parametrize("name", ["beale", "bukin_sharp", "rosenbrock"])
def test_closed_form_derivatives_equal_autograd(name):
    """A test function's loss gives g, L and H z by its formulas (problems.ClosedFormLoss): the
    numbers of autograd through the formula, for one point and for a stack of rows."""
    from hgtoolkit.trajectory import autograd_gradient, autograd_gradient_hvp, closed_form, rowwise_gradient_hvp
    p = problems.from_function(name)
    assert closed_form(p.train_loss, p.params0) is p.train_loss
    plain = lambda w, t: p.train_loss.f(w)  # the same formula, differentiated by autograd
    assert closed_form(plain, p.params0) is None
    gen = torch.Generator().manual_seed(0)
    W = p.params0 + 0.3 * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    Z = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for got, ref in zip(rowwise_gradient_hvp(p.train_loss, W, Z, 0), rowwise_gradient_hvp(plain, W, Z, 0)):
        close(got, ref)
    for got, ref in zip(autograd_gradient_hvp(p.train_loss, W[1], Z[1], 0),
                        autograd_gradient_hvp(plain, W[1], Z[1], 0)):
        close(got, ref)
    for got, ref in zip(autograd_gradient(p.train_loss, W[2], 0), autograd_gradient(plain, W[2], 0)):
        close(got, ref)
    # the online run agrees with one on the same function without the closed form
    twin = problems.Problem(p.params0, plain, p.train_loss.f, name=name, val_is_train=True)
    a = online.run(p, "rtho", lr=1e-4, hypergrad_lr=1e-9, steps=30)
    b = online.run(twin, "rtho", lr=1e-4, hypergrad_lr=1e-9, steps=30)
    np.testing.assert_allclose(a.hypergrads, b.hypergrads, rtol=1e-10)
    np.testing.assert_allclose(a.lrs, b.lrs, rtol=1e-12)


def test_plot_online_run_draws_a_record(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from hgtoolkit import plotting
    r = online.run(BEALE, "marthe", lr=1e-3, hypergrad_lr=1e-7, steps=20)
    fig = plotting.plot_online_run(r, "beale")
    assert len(fig.axes) == 4  # η, losses, μ and its twin β axis
    paths = plotting.savefig(fig, tmp_path / "run", close=True)
    assert all(p.stat().st_size > 5_000 for p in paths)
    # written by forked writers: the same files once wait_for_figures returns; a failure is raised
    fig = plotting.plot_online_run(r, "beale")
    bg = plotting.savefig(fig, tmp_path / "bg" / "run", close=True, background=True)
    plotting.wait_for_figures()
    assert [p.name for p in bg] == ["run.png", "run.pdf"] and all(p.stat().st_size > 5_000 for p in bg)
    fig = plotting.plot_online_run(r, "beale")
    with pytest.raises((RuntimeError, ValueError)):  # forked: the writer's failure, named; else savefig's
        plotting.savefig(fig, tmp_path / "bad", formats=("no-such-format",), close=True, background=True)
        plotting.wait_for_figures()
    assert not plotting._WRITERS


def test_a_hand_driven_engine_gives_online_runs_numbers():
    """init(params, settings) / update(state, Oracle(...), t) driven by a user's loop (the
    README's) is online.run's recursion; Engine.step names its successor."""
    p = problems.get("beale")
    ref = online.run(p, "rtho", lr=1e-3, hypergrad_lr=1e-7, objective="train", steps=6)
    cfg = online.hyper_config("rtho", lr=1e-3, hypergrad_lr=1e-7, objective="train")
    engine = online.engine_for(cfg, dynamics.get("sgd"))
    state, lrs = engine.init(p.params0, cfg), []
    for t in range(6):
        g, loss, hz = online.gradient_and_hvp(p.train_loss)(state.opt["w"], state.z["w"], t)
        state, aux = engine.update(state, online.Oracle(g, loss, hz if t else None), t)
        lrs.append(float(aux["lr"]))
    np.testing.assert_allclose(lrs, ref.lrs, rtol=1e-12, atol=0)
    with pytest.raises(TypeError, match=r"Engine\.update\(state, Oracle"):
        engine.step(state, g, 6, loss=loss)
