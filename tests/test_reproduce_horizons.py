"""``reproduce horizons`` and ``reproduce hdm`` in their tiny settings: outputs exist, the σ = 0
greedy == optimal check, the horizon ladder's best K per method, the HDM table's rows."""
from __future__ import annotations

import json
import math

import pytest

from hgtoolkit.experiments import run_experiment

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _figures(root, stems):
    for stem in stems:
        assert (root / "figures" / f"{stem}.png").stat().st_size > 10_000, stem
        assert (root / "figures" / f"{stem}.pdf").exists(), stem


def _tiny(tmp_path_factory, name):
    root = tmp_path_factory.mktemp(name)
    return root / name, run_experiment(name, setting="tiny", out=root, progress=False)


@pytest.fixture(scope="module")
def horizons_tiny(tmp_path_factory):
    return _tiny(tmp_path_factory, "horizons")


def test_horizons_tiny_outputs(horizons_tiny):
    root, summary = horizons_tiny
    _figures(root, ["nqm_schedules", "horizon_ladder"])
    assert (root / "data" / "nqm.json").exists() and (root / "data" / "ladder.json").exists()
    assert json.loads((root / "summary.json").read_text())["nqm"] == json.loads(json.dumps(summary["nqm"]))
    assert set(summary["nqm"]) == {"noisy_momentum", "noisy_sgd", "sigma0_momentum", "sigma0_sgd"}
    for case in summary["nqm"].values():
        assert {"initial", "greedy", "fixed", "optimal", "optimal_from", "greedy_stationarity"} <= set(case)
        assert 0 < case["optimal"] <= min(case["optimal_from"].values()) * (1 + 1e-12)
        assert case["optimal"] < case["initial"] and case["greedy"] < case["initial"]
    md = (root / "summary.md").read_text()
    assert "| sigma0_momentum |" in md and "best K" in md


def test_horizons_tiny_sigma0_greedy_is_optimal_with_momentum_only(horizons_tiny):
    _, summary = horizons_tiny
    s0, s0_sgd = summary["nqm"]["sigma0_momentum"], summary["nqm"]["sigma0_sgd"]
    assert summary["checks"]["sigma0_momentum_greedy_equals_optimal"] is True
    assert s0["greedy"] == pytest.approx(s0["optimal"], rel=1e-6)
    assert s0["greedy_stationarity"] < 1e-8  # greedy = CG is a stationary point of the horizon-T loss
    assert s0["caps"]["lr_max"] is None  # no cap for σ = 0
    assert s0_sgd["optimal"] < s0_sgd["greedy"] * (1 - 1e-3)  # steepest descent is not optimal
    assert summary["nqm"]["noisy_momentum"]["caps"]["lr_max"] is not None


def test_horizons_tiny_ladder_best_K_per_method(horizons_tiny):
    from hgtoolkit.experiments import horizons
    _, summary = horizons_tiny
    cfg = horizons.Config.tiny()
    ladder = {r["method"]: r for r in summary["ladder"]}
    assert set(ladder) == {m for m, _ in cfg.hypergrad_lrs}
    for r in ladder.values():
        assert r["Ks"] == list(cfg.Ks) + [cfg.mnist_T]
        cos = {int(k): v["cosine"] for k, v in r["rows"].items()}
        assert r["best"] == max(cos, key=cos.get) and all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in cos.values())
    # HD's estimate is exactly the one-step reference along its own schedule
    assert ladder["hd"]["best"] == 1 and ladder["hd"]["rows"]["1"]["cosine"] == pytest.approx(1.0, abs=1e-10)


@pytest.fixture(scope="module")
def hdm_tiny(tmp_path_factory):
    return _tiny(tmp_path_factory, "hdm")


def test_hdm_tiny_table_rows_and_figure(hdm_tiny):
    from hgtoolkit.experiments import hdm_bench
    root, summary = hdm_tiny
    _figures(root, ["hdm_stepsize"])
    cfg = hdm_bench.Config.tiny()
    methods = ["HDM", "HDM-Best", "HD (Baydin)", "GD 1/L", "heavy ball", "Adam", "AdaGrad", "BFGS",
               "L-BFGS m=5", "L-BFGS m=10"]
    table = summary["grad_evals"]
    assert len(table) == len(cfg.problems) and any(p.startswith("SVM") for p in table)
    for name, row in table.items():
        assert list(row) == methods, name
        for m, v in row.items():  # gradient evaluations within the budget, or not solved (null)
            assert v is None or 1 <= v <= 2 * cfg.max_iter + 2, (name, m, v)
        assert any(v is not None for v in row.values()), name  # some method solves each
    md = (root / "summary.md").read_text()
    for m in methods:
        assert f"| {m} |" in md
    hyper = summary["hypergradients"]
    # HDM's raw feedback −∇f(x_{k+1})·∇f(x_k) is the exact one-step hypergradient d⁽¹⁾
    assert hyper["cos_signal_one_step"] == pytest.approx(1.0, abs=1e-10)
    assert math.isfinite(hyper["cos_one_step_full"]) and hyper["median_lr_over_alpha_star"] > 0


def test_hdm_bench_closed_form_gradients_match_autograd():
    import torch
    from hgtoolkit.experiments import hdm_bench
    probs = hdm_bench.make_problems(hdm_bench.Config(quad_dim=5, separable=True))
    assert len(probs) == 7
    for name, p in probs.items():
        x = p.x0 + 0.3
        value, g = p.oracle(x)
        assert float(value) == pytest.approx(float(p.f(x)), rel=1e-12), name
        assert torch.allclose(g, torch.func.grad(p.f)(x), rtol=1e-10, atol=1e-10), name


def test_hdm_momentum_names():
    """HDMState.momentum (was beta) and hdm_bench.first_order(momentum=) (was beta=): the old
    names raise, naming the new ones (docs/glossary.md)."""
    import torch
    from hgtoolkit import hdm
    from hgtoolkit.experiments import hdm_bench
    f = lambda x: ((x ** 2).sum(), 2 * x)
    st = hdm.init(hdm.HDMConfig(L=2.0), torch.ones(3, dtype=torch.float64), f)
    assert float(st.momentum) == float(st.theta[-1]) and "momentum" in hdm.HDMState._fields and "beta" not in hdm.HDMState._fields
    with pytest.raises(AttributeError, match="HDMState.beta was renamed HDMState.momentum"):
        st.beta
    with pytest.raises(TypeError, match="HDMState\\(\\): 'beta' was renamed 'momentum'"):
        hdm.HDMState(*st[:8], beta=st.momentum, **{k: getattr(st, k) for k in st._fields[9:]})
    x0 = torch.ones(3, dtype=torch.float64)
    kw = dict(tol=1e-8, max_iter=200)
    assert hdm_bench.first_order(f, x0, "heavy_ball", 0.25, momentum=0.5, **kw) < 200
    with pytest.raises(TypeError, match="'beta' was renamed 'momentum'"):
        hdm_bench.first_order(f, x0, "heavy_ball", 0.25, beta=0.5, **kw)
    q = lambda x: (x ** 2).sum()
    assert float(hdm.surrogate(q, x0, 0.1, momentum=0.5, x_prev=0.5 * x0)) == float(hdm.surrogate(q, x0, 0.1, 0.5, 0.5 * x0))
    with pytest.raises(TypeError, match="surrogate\\(\\): 'beta' was renamed 'momentum'"):
        hdm.surrogate(q, x0, 0.1, beta=0.5)
