"""Approximation-error analysis: exact per-step references, comparison metrics, assertion helpers."""
import math

import matplotlib
import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

matplotlib.use("Agg")

from hgtoolkit import dynamics, hypergradient, problems  # noqa: E402
from hgtoolkit import analysis, online, plotting  # noqa: E402
from hgtoolkit.analysis import ApproximationReport, analyse, exact_references  # noqa: E402
from hgtoolkit.testing import assert_approximation, assert_hypergrad_close  # noqa: E402
from hgtoolkit.trajectory import make_step  # noqa: E402

CASES = {
    ("beale", "sgd"): 2e-3,
    ("beale", "adam"): 1e-2,
    ("mlp", "sgd"): 0.2,
    ("mlp", "adam"): 0.02,
}
_PROBLEMS = {"beale": problems.from_function("beale"), "mlp": problems.synthetic_classification()}


def _schedule(T, base, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return base * (0.5 + torch.rand(T, generator=gen, dtype=torch.float64))


@pytest.fixture(scope="module")
def refs():
    """Exact references for every (problem, optimizer) case, computed once."""
    out = {}
    for (name, opt), base in CASES.items():
        lrs = _schedule(14, base)
        out[name, opt] = (lrs, exact_references(_PROBLEMS[name], lrs, opt))
    return out


def _isclose(a, b, rtol=1e-10):
    return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-300)


@pytest.mark.parametrize("case", list(CASES))
def test_final_step_identities(refs, case):
    """d⁽ᶜ⁾_{T−1} = Σ_t g_t and d⁽¹⁾_{T−1} = g_{T−1}; E(w_T) agrees with the reverse pass."""
    _, r = refs[case]
    assert float(r.full_horizon.abs().min()) > 0
    assert _isclose(r.constant_lr[-1], r.full_horizon.sum())
    assert _isclose(r.one_step[-1], r.full_horizon[-1])
    assert _isclose(r.val_losses[-1], r.value, 1e-13)
    # the three references are genuinely different objects before the last step
    assert not _isclose(r.constant_lr[5], r.one_step[5], 1e-3)


@pytest.mark.parametrize("case", list(CASES))
def test_intermediate_step_against_truncated_schedule(refs, case):
    """At t < T−1 the references are hypergradients of the truncated schedule η_0 … η_t:
    d⁽¹⁾_t = ∂E(w_{t+1})/∂η_t and d⁽ᶜ⁾_t = Σ_{s≤t} ∂E(w_{t+1})/∂η_s."""
    lrs, r = refs[case]
    t = 6
    trunc = hypergradient(_PROBLEMS[case[0]], lrs[: t + 1], case[1]).grad
    assert _isclose(r.one_step[t], trunc[t])
    assert _isclose(r.constant_lr[t], trunc.sum())


def _autograd_one_step(problem, dyn, lrs, t):
    """∂E(w_{t+1})/∂η_t with plain torch.autograd, w_t (and moments) detached: what an online
    engine with μ = 0 computes, ∇E(w_{t+1})·B_t, built without torch.func."""
    step = make_step(problem, dyn)
    state = dyn.init(problem.params0)
    with torch.no_grad():
        for s in range(t):
            state, _ = step(state, lrs[s], s)
    w = tree_map(lambda x: x.detach().requires_grad_(True), dyn.params(state))
    leaves, spec = tree_flatten(w)
    grads = torch.autograd.grad(problem.train_loss(w, t), leaves)
    g = tree_unflatten([x.detach() for x in grads], spec)
    state = {**state, "w": tree_map(lambda x: x.detach(), w)}
    eta = lrs[t].clone().requires_grad_(True)
    E = problem.val_loss(dyn.params(dyn.step(state, g, eta, t)))
    (d,) = torch.autograd.grad(E, eta)
    return d


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_reference_equals_independent_autograd(refs, case):
    lrs, r = refs[case]
    problem, dyn = _PROBLEMS[case[0]], dynamics.get(case[1])
    for t in (0, 4, 9):
        assert _isclose(_autograd_one_step(problem, dyn, lrs, t), r.one_step[t]), t


# ----------------------------------------------------------------------------- metrics

def test_metrics_on_hand_made_arrays():
    a = np.array([1.0, -2.0, 3.0, 0.0])
    assert analysis.cosine_similarity(a, a) == pytest.approx(1.0, abs=1e-15)
    assert analysis.cosine_similarity(a, -a) == pytest.approx(-1.0, abs=1e-15)
    assert analysis.cosine_similarity([1.0, 0.0], [0.0, 5.0]) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(analysis.cosine_similarity(a, np.zeros(4)))

    h = np.array([1.0, -1.0, 2.0, 0.0, 0.0, 3.0])
    d = np.array([2.0, 1.0, 2.0, 0.0, 1.0, 0.0])
    assert analysis.sign_agreement(h, d).tolist() == [True, False, True, True, False, False]
    rel = analysis.relative_error(h, d)
    assert rel.tolist() == [0.5, 2.0, 0.0, 0.0, 1.0, math.inf]  # 0/0 → 0, x/0 → inf
    r = analysis.ratio(h, d)
    assert r[[0, 1, 2, 4]].tolist() == [0.5, -1.0, 1.0, 0.0]
    assert np.isnan(r[3]) and np.isnan(r[5])  # d = 0: undefined

    s = analysis.summarise(h, d)
    assert s["sign_agreement"] == pytest.approx(3 / 6)
    assert s["median_rel_err"] == pytest.approx(0.75)  # median of 0,0,0.5,1,2,inf
    assert s["n_steps"] == 6

    x = np.array([1.0, 2.0, 3.0, 4.0])
    assert analysis.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert analysis.pearson(x, -x) == pytest.approx(-1.0)
    assert analysis.spearman(x, x ** 3) == pytest.approx(1.0)   # monotone, not linear
    assert analysis.pearson(x, x ** 3) < 0.99
    assert analysis.spearman(x, [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert math.isnan(analysis.pearson(x, np.ones(4)))
    assert math.isnan(analysis.spearman(x, np.ones(4)))
    # average ranks with ties, as scipy's rankdata
    from scipy.stats import rankdata
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 40):
        ties = rng.integers(0, 4, n).astype(float)
        for v in (ties, rng.normal(size=n)):
            np.testing.assert_array_equal(analysis.average_ranks(v), rankdata(v))


@pytest.mark.parametrize("fn", [analysis.cosine_similarity, analysis.relative_error,
                                analysis.summarise])
def test_metric_bad_input(fn):
    with pytest.raises(ValueError, match="shape"):
        fn([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        fn([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="1-D"):
        fn(np.ones((2, 2)), np.ones((2, 2)))


# ----------------------------------------------------------------------------- assertion helpers

def test_assert_hypergrad_close_passes_and_fails():
    exact = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    assert_hypergrad_close(exact * (1 + 1e-9), exact)
    assert_hypergrad_close(exact.numpy() * 1.05, exact, rtol=0.1)
    assert_hypergrad_close(exact * 3, exact, rtol=None, cos_min=0.999, sign_min=1.0)

    with pytest.raises(AssertionError) as info:
        assert_hypergrad_close(exact + torch.tensor([0, 0, 0.5, 0.0], dtype=torch.float64), exact, rtol=1e-3)
    msg = str(info.value)
    assert "1/4 steps" in msg and "worst t = 2" in msg and "3.5" in msg

    flipped = exact * torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    with pytest.raises(AssertionError) as info:
        assert_hypergrad_close(flipped, exact, rtol=None, cos_min=0.5, sign_min=0.9)
    msg = str(info.value)
    assert "cosine similarity" in msg and "cos_min = 0.5" in msg
    assert "sign agreement 0.5" in msg and "t = 2, 3" in msg

    with pytest.raises(AssertionError, match="zero vector"):
        assert_hypergrad_close(torch.zeros(4, dtype=torch.float64), exact, rtol=None, cos_min=0.0)


def test_assert_hypergrad_close_bad_input():
    exact = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="estimate"):
        assert_hypergrad_close([1.0, 2.0], exact)
    with pytest.raises(ValueError, match="exact"):
        assert_hypergrad_close(exact, [1.0, math.inf, 3.0])
    with pytest.raises(ValueError, match="estimate"):
        assert_hypergrad_close([1.0, math.nan, 3.0], exact)
    with pytest.raises(ValueError, match="cos_min"):
        assert_hypergrad_close(exact, exact, cos_min=1.5)
    with pytest.raises(ValueError, match="criterion"):
        assert_hypergrad_close(exact, exact, rtol=None)
    with pytest.raises(TypeError, match="rtol"):
        assert_hypergrad_close(exact, exact, rtol="1e-3")


# ----------------------------------------------------------------------------- reports

@pytest.fixture(scope="module")
def hd_like_report():
    """A report for an HD-like estimate: exactly the one-step reference, a moving schedule."""
    problem = _PROBLEMS["beale"]
    lrs = _schedule(20, 2e-3, seed=1)
    h = exact_references(problem, lrs).one_step
    return lrs, h, analyse(problem, lrs, h, label="HD-like")


def test_report_summary_and_alignment(hd_like_report):
    lrs, h, rep = hd_like_report
    assert rep.summary["one_step"]["cosine"] == pytest.approx(1.0, abs=1e-14)
    assert rep.summary["one_step"]["median_rel_err"] == 0.0
    assert rep.summary["horizons"]["one_step"] == rep.summary["full_horizon"]
    np.testing.assert_array_equal(rep.per_step["one_step"]["rel_err"], 0.0)
    # the identity at the last step shows up per step as well
    assert rep.per_step["full_horizon"]["rel_err"][-1] < 1e-12
    assert rep.summary["lr_update"]["n_moved"] == 19
    assert -1 <= rep.summary["lr_update"]["cosine"] <= 1

    # the same estimates given as h_t (available before step t): shifted by one, last step missing
    pre = torch.cat([torch.tensor([math.nan], dtype=torch.float64), h])[:-1]
    rep_pre = analyse(_PROBLEMS["beale"], lrs, pre, alignment="before_step")
    np.testing.assert_array_equal(rep_pre.estimates[:-1], h.numpy()[:-1])
    assert np.isnan(rep_pre.estimates[-1]) and np.isnan(rep_pre.per_step["one_step"]["rel_err"][-1])
    assert rep_pre.summary["one_step"]["n_steps"] == 19
    assert rep_pre.summary["one_step"]["median_rel_err"] == 0.0

    assert_approximation(rep, "one_step", cos_min=0.999999, sign_min=1.0, median_rel_err_max=1e-12)
    with pytest.raises(AssertionError, match="HD-like vs constant_lr"):
        assert_approximation(rep, "constant_lr", median_rel_err_max=1e-3)
    with pytest.raises(ValueError, match="reference"):
        assert_approximation(rep, "two_step", cos_min=0.5)


def test_analyse_bad_input():
    problem = _PROBLEMS["beale"]
    lrs = torch.full((5,), 1e-3, dtype=torch.float64)
    with pytest.raises(ValueError, match="estimates.*shape"):
        analyse(problem, lrs, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="estimates.*NaN"):
        analyse(problem, lrs, torch.tensor([0.0, 1.0, math.nan, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="alignment"):
        analyse(problem, lrs, torch.zeros(5, dtype=torch.float64), alignment="sideways")
    with pytest.raises(ValueError, match="lrs"):
        analyse(problem, torch.tensor([1e-3, -1.0], dtype=torch.float64), [0.0, 0.0])
    # before_step: estimates[0] is never used, so it may be NaN
    rep = analyse(problem, lrs, [math.nan, 1.0, 2.0, 3.0, 4.0], alignment="before_step")
    assert rep.estimates[0] == 1.0


def test_report_save_load_table_plot(hd_like_report, tmp_path):
    _, _, rep = hd_like_report
    path = rep.save(tmp_path / "report")
    npz = path.with_suffix(".npz")
    assert path == tmp_path / "report.json" and npz == tmp_path / "report.npz" and npz.exists()
    back = ApproximationReport.load(path)
    for k in ("lrs", "estimates", "one_step", "constant_lr", "full_horizon", "val_losses"):
        np.testing.assert_array_equal(getattr(back, k), getattr(rep, k))
    np.testing.assert_array_equal(back.per_step["full_horizon"]["rel_err"],
                                  rep.per_step["full_horizon"]["rel_err"])
    assert back.summary["full_horizon"]["cosine"] == rep.summary["full_horizon"]["cosine"]
    assert back.info["label"] == "HD-like" and back.info["problem"]["name"] == "beale"
    # without the npz the JSON alone is enough (non-finite numbers come back as NaN)
    (tmp_path / "report.npz").unlink()
    np.testing.assert_array_equal(ApproximationReport.load(path).full_horizon, rep.full_horizon)
    with pytest.raises(ValueError, match="ApproximationReport"):
        (tmp_path / "other.json").write_text("{}")
        ApproximationReport.load(tmp_path / "other.json")

    table = rep.table()
    assert table.count("\n| ") == 6 and "full horizon g (LRS-OPT)" in table and "| 1 |" in table

    with pytest.raises(AttributeError, match="moved to hgtoolkit.plotting.plot_approximation"):
        analysis.plot_approximation(rep)
    fig = plotting.plot_approximation(rep)
    axes = fig.axes
    assert len(axes) == 3 and axes[0].get_yscale() == "symlog" and axes[1].get_yscale() == "log"
    assert all(ax.get_ylabel() for ax in axes) and axes[2].get_xlabel() == plotting.STEP_LABEL
    assert "beale" in fig._suptitle.get_text() and axes[0].get_legend() is not None
    assert len(axes[0].get_legend().get_texts()) == 4
    fig.savefig(tmp_path / "report.png")
    import matplotlib.pyplot as plt
    plt.close(fig)


# ----------------------------------------------------------------------------- online runs

ONLINE_CASES = [
    # (problem, optimizer, lr, method, beta)
    ("beale", "sgd", 1e-3, "hd", 0.0),
    ("beale", "sgd", 1e-3, "hd", 1e-6),
    ("beale", "sgd", 1e-3, "rtho", 0.0),
    ("beale", "sgd", 1e-3, "rtho", 1e-8),
    ("beale", "adam", 1e-2, "rtho", 1e-6),
    ("mlp", "sgd", 0.05, "hd", 1e-3),
    ("mlp", "adam", 0.01, "rtho", 1e-4),
    ("mlp", "nesterov", 0.02, "rtho", 1e-4),
]


@pytest.mark.parametrize("name, opt, lr, method, beta", ONLINE_CASES)
def test_online_estimate_equals_its_horizon_reference(name, opt, lr, method, beta):
    """HD (μ = 0, objective "val") estimates d⁽¹⁾ and RTHO (μ = 1) estimates d⁽ᶜ⁾ exactly, for any β:
    both recursions run along the run's own schedule. This pins down the alignment
    hypergrads[t] = h_{t+1} ↔ references[t]."""
    from hgtoolkit import online
    problem = _PROBLEMS[name]
    result = online.run(problem, method, opt, lr=lr, hypergrad_lr=beta, steps=15, seed=2)
    assert not result.diverged
    if beta > 0:
        assert np.ptp(result.lrs) > 0  # the schedule really moved
    rep = analysis.analyse_online(result, problem)
    ref = {"hd": "one_step", "rtho": "constant_lr"}[method]
    other = {"hd": "constant_lr", "rtho": "one_step"}[method]
    np.testing.assert_array_equal(rep.lrs, result.lrs)
    assert_hypergrad_close(rep.estimates, rep.references[ref], rtol=1e-9, atol=0.0)
    assert rep.summary[ref]["median_rel_err"] < 1e-9
    assert rep.summary[other]["median_rel_err"] > 1e-3  # …and not the other horizon
    assert rep.info["online"]["method"] == method and rep.info["steps_analysed"] == 15
    # a shifted alignment would not match: h_{t+1} is not the reference at t+1
    assert not np.allclose(rep.estimates[:-1], rep.references[ref][1:], rtol=1e-6)


def test_analyse_online_checks_problem_and_truncates_divergence():
    from hgtoolkit import online
    mlp = _PROBLEMS["mlp"]
    result = online.run(mlp, "hd", lr=0.05, hypergrad_lr=1e-3, steps=10)
    with pytest.raises(ValueError, match="beale"):
        analysis.analyse_online(result, _PROBLEMS["beale"])
    with pytest.raises(ValueError, match="replayed trajectory"):
        analysis.analyse_online(result, problems.synthetic_classification(seed=1))  # same name
    with pytest.raises(TypeError, match="OnlineResult"):
        analysis.analyse_online({"lrs": [0.1]}, mlp)

    # a run that diverges: analysed up to its last finite estimate
    beale = _PROBLEMS["beale"]
    with pytest.warns(online.DivergenceWarning):
        bad = online.run(beale, "rtho", lr=1e-3, hypergrad_lr=1e-3, steps=60)
    assert bad.diverged
    rep = analysis.analyse_online(bad, beale)
    n = rep.info["steps_analysed"]
    assert 0 < n <= bad.steps_run and np.isfinite(rep.estimates).all()
    assert_hypergrad_close(rep.estimates, rep.constant_lr, rtol=1e-9)


def test_analyse_command_writes_reports(tmp_path):
    import argparse
    import json

    from hgtoolkit.cli.analyse import register_analyse
    parser = argparse.ArgumentParser()
    register_analyse(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["analyse", "--problem", "beale", "--method", "hd", "rtho",
                              "--hypergrad-lr", "1e-6", "1e-8", "--steps", "20", "--out", str(tmp_path),
                              "--no-progress"])
    assert args.func(args) == 0
    for tag in ("hd", "rtho"):
        for ext in ("json", "npz", "png"):
            assert (tmp_path / f"analyse_{tag}.{ext}").exists()
        assert (tmp_path / f"online_{tag}.json").exists()
    summary = json.loads((tmp_path / "analyse.json").read_text())["runs"]
    assert summary["hd"]["summary"]["one_step"]["median_rel_err"] < 1e-9
    assert summary["rtho"]["summary"]["constant_lr"]["median_rel_err"] < 1e-9
    assert (tmp_path / "analyse.md").read_text().count("| estimate vs") == 6

    # a saved run analysed again from its record gives the same summary
    args = parser.parse_args(["analyse", "--run", str(tmp_path / "online_rtho.json"),
                              "--out", str(tmp_path / "again"), "--no-progress"])
    assert args.func(args) == 0
    again = json.loads((tmp_path / "again" / "analyse.json").read_text())["runs"]["rtho"]["summary"]
    assert again["full_horizon"] == summary["rtho"]["summary"]["full_horizon"]


def test_replayed_trajectory_is_the_online_run_bit_for_bit_in_float32():
    """The exact references replay an online run through the same engine step (gradients,
    HVPs, closed-form update), so check_trajectory holds for long float32 runs too (it used to
    fail by 3e-4 relative at step 78 of an MNIST run)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = problems.mnist_mlp(n_train=200, n_val=50, batch_size=20, hidden=(8,))
    assert p.dtype == torch.float32
    for method in ("hd", "rtho"):
        r = online.run(p, method, lr=0.1, hypergrad_lr=1e-3, steps=90, keep_params=False)
        report = analysis.analyse_online(r, p, check_trajectory=True)
        np.testing.assert_array_equal(report.train_losses, r.train_losses)
