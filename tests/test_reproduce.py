"""``python -m hgtoolkit reproduce``: the registry, the shared helpers and the fig1 / hd / towers
experiments in their tiny settings (outputs exist, numbers are sane, re-runs are identical)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hgtoolkit import online, problems, records, trajectory
from hgtoolkit.cli import main
from hgtoolkit.experiments import EXPERIMENTS, common, run_experiment

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _arrays_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_outputs(root, figures, data) -> dict:
    for stem in figures:
        png, pdf = root / "figures" / f"{stem}.png", root / "figures" / f"{stem}.pdf"
        assert png.stat().st_size > 20_000 and pdf.stat().st_size > 5_000, stem
    for name in data:
        assert (root / "data" / name).exists(), name
    summary = json.loads((root / "summary.json").read_text())
    md = (root / "summary.md").read_text()
    assert md.startswith("# ") and "| --" in md  # a title and at least one table
    assert json.loads((root / "config.json").read_text())["setting"] == "tiny"
    return summary


# ----------------------------------------------------------------------------- registry and helpers

def test_registry_lists_the_experiments_and_rejects_unknown_names():
    assert {"fig1", "mnist", "hd", "towers", "demo"} <= set(EXPERIMENTS)
    assert all(e.description for e in EXPERIMENTS.values())
    with pytest.raises(ValueError, match="fig1.*hd.*towers"):
        run_experiment("fig2")
    with pytest.raises(ValueError, match="setting"):
        run_experiment("fig1", setting="huge")
    with pytest.raises(ValueError, match="unknown config field"):
        run_experiment("fig1", setting="tiny", nonsense=1)


def test_every_registered_experiment_has_its_module():
    for exp in EXPERIMENTS.values():
        for part in (exp.parts or (exp.name,)):
            module = EXPERIMENTS[part].load()
            assert callable(module.run) and hasattr(module.Config, "tiny"), part


def test_cli_list_and_errors(capsys):
    assert main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in ("fig1", "hd", "towers", "demo"))
    assert main(["reproduce", "no_such_experiment", "--tiny"]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_markdown_table_and_cells():
    t = common.markdown_table(["method", "best"], [["HD", 1.234567e-5], ["RTHO", math.nan], ["x|y", 12.5]])
    assert t.splitlines() == ["| method | best |", "| :-- | --: |", "| HD | 1.23e-05 |", "| RTHO | — |",
                              "| x\\|y | 12.5 |"]
    with pytest.raises(ValueError, match="rows\\[0\\]"):
        common.markdown_table(["a", "b"], [[1]])
    assert common.fmt(None) == "—" and common.fmt(float("inf")) == "∞" and common.fmt(3) == "3"


def test_write_summary_and_config(tmp_path):
    out = common.output_dir(tmp_path, "exp")
    assert out.figures.is_dir() and out.data_dir.is_dir()
    s = common.write_summary(out, "Title", [("Part", "| a |\n| --: |\n| 1 |")], {"x": math.nan, "y": [1, 2]},
                             notes=["a note"])
    assert s["x"] is None and s["y"] == [1, 2] and common.read_summary(out)["title"] == "Title"
    md = out.summary_md.read_text()
    assert "## Part" in md and "- a note" in md
    with pytest.raises(ValueError, match="name"):
        common.output_dir(tmp_path, "../x")
    assert common.derive_seed(0, "a", 1) == common.derive_seed(0, "a", 1) != common.derive_seed(1, "a", 1)


def test_replay_iterates_reproduces_an_online_run():
    p = problems.from_function("beale")
    r = online.run(p, "rtho", lr=1e-3, hypergrad_lr=1e-7, steps=40)
    path = common.replay_iterates(p, r.lrs)
    assert path.shape == (41, 2)
    np.testing.assert_array_equal(path[0], np.asarray(p.params0))
    np.testing.assert_allclose(path[-1], r.final_params.numpy(), rtol=1e-13)
    f = p.val_loss(torch.as_tensor(path)).numpy()
    np.testing.assert_allclose(f, r.val_losses, rtol=1e-12)  # E(w_t) along the path, t = 0 … T


def test_run_cells_resumes_and_processes_give_the_same_records(tmp_path):
    """An experiment's resumable work: sweep cells in <out>/data/sweep; a re-run with more cells
    computes only the new ones; a pool of processes stores the same numbers as in-process."""
    from hgtoolkit import sweep
    out = common.output_dir(tmp_path, "exp")
    grid = lambda lrs: sweep.Grid("g", {"name": "beale"}, "train", axes={"lr": lrs}, fixed={"steps": 5})
    first = common.run_cells(out, grid([1e-3, 2e-3]), progress=False)
    assert len(first.computed) == 2 and out.store.is_dir()
    again = common.run_cells(out, grid([1e-3, 2e-3, 3e-3]), progress=False)
    assert again.computed == [grid([3e-3]).cells()[0].id] and len(again.existing) == 2
    assert not list(out.root.rglob("*.pkl"))
    pooled = common.output_dir(tmp_path, "pooled")
    report = common.run_cells(pooled, grid([1e-3, 2e-3, 3e-3]), workers=2, progress=False)
    assert report.executor == "processes" and len(report.computed) == 3
    a, b = common.cell_records(out, grid([1e-3, 2e-3, 3e-3])), common.cell_records(pooled, grid([1e-3, 2e-3, 3e-3]))
    assert a.keys() == b.keys() and all(sweep.records_equal(a[k], b[k]) for k in a)
    assert {r["meta"]["executor"] for r in b.values()} == {"processes"}


# ----------------------------------------------------------------------------- fig1

@pytest.fixture(scope="module")
def fig1_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fig1")
    assert main(["reproduce", "fig1", "--tiny", "--out", str(root), "--no-progress"]) == 0
    return root / "fig1"


def test_fig1_tiny_outputs_are_complete_and_sane(fig1_tiny):
    from hgtoolkit.experiments import fig1
    cfg = fig1.Config.tiny()
    (fn,) = cfg.functions
    s = _check_outputs(fig1_tiny, [f"fig1_{fn}"],
                       [f"{fn}_grid.npz", f"{fn}_grid.json", f"{fn}_paths.npz", f"{fn}_paths.json", f"{fn}_constant.json",
                        f"{fn}_lrsopt.json", f"{fn}_lrsopt.npz"])
    g = records.load(fig1_tiny / "data" / f"{fn}_grid.json").data
    M, B, T = len(fig1.method_specs(cfg)), len(cfg.hypergrad_lrs), cfg.steps
    assert g["lrs"].shape == (M, B, T) and g["values"].shape == (M, B, T + 1) and g["best"].shape == (M, B)
    ok = g["diverged_at"] < 0
    assert ok.any()
    assert np.all(np.isfinite(g["lrs"][ok])) and np.all(g["lrs"][ok] >= 0)   # schedules ≥ 0 (clipped)
    assert np.all(np.isfinite(g["best"][ok])) and np.all(g["best"][ok] >= 0)
    assert np.all(g["best"] <= g["values"][..., 0] + 1e-12)  # the best is never worse than the start
    # a grid cell is exactly an independent online run with the same settings
    label, method, mu = fig1.method_specs(cfg)[1]
    r = online.run(problems.from_function(fn), method, lr=cfg.lr, hypergrad_lr=cfg.hypergrad_lrs[0], steps=T,
                   lr_max=cfg.lr_max, keep_params=False)
    np.testing.assert_array_equal(g["lrs"][1, 0], r.lrs)
    assert g["best"][1, 0] == r.best_val_loss
    # the paths start at the default start and stay finite; the summary has the verdict
    pz = records.load(fig1_tiny / "data" / f"{fn}_paths.json").data
    assert "HD" in list(pz["labels"]) and pz["path_0"].shape == (T + 1, 2)
    assert np.all(np.isfinite(pz["path_0"]))
    v = s["functions"][fn]["hd_vs_rtho"]
    assert v["winner_best_vs_best"] in ("HD", "RTHO") and s["functions"][fn]["paper"]
    assert "HD vs RTHO" in (fig1_tiny / "summary.md").read_text()
    lrs = records.load_arrays(fig1_tiny / "data" / f"{fn}_lrsopt.npz")
    assert np.all(lrs["best_lrs"] >= 0) and lrs["best_lrs"].shape == (T,)


def test_fig1_figures_are_drawn_from_the_records_alone(fig1_tiny):
    from hgtoolkit.experiments import fig1
    png = fig1_tiny / "figures" / "fig1_bukin_sharp.png"
    png.unlink()
    fig1.make_figures(fig1_tiny, ["bukin_sharp"])
    assert png.stat().st_size > 20_000


def test_fig1_coinciding_paths_stay_visible_and_are_named():
    """Panel (c): paths drawn widest first with staggered markers; a pair within _SAME_PT on
    the page is named in the legend ("≈"), a pair further apart is not."""
    import matplotlib.pyplot as plt
    import testfunctions
    from hgtoolkit import plotting
    from hgtoolkit.experiments import fig1
    base = np.column_stack([np.linspace(1.0, 2.5, 60), np.full(60, 1.0)])
    paths = {"MARTHE μ adaptive": base, "RTHO": base + [0.0, 0.2], "HD": base + [0.0, 0.001]}
    styles = fig1._path_styles(list(paths), fig1._styles(list(paths)))
    assert [styles[k]["lw"] for k in paths] == sorted((styles[k]["lw"] for k in paths), reverse=True)
    fig, ax = plotting.figure()
    plotting.plot_contour_paths(testfunctions.get("beale"), paths, ax=ax, styles=styles, legend=False,
                                resolution=30, window=((0.5, 3.0), (0.0, 2.0)))
    y_pt = np.diff(ax.transData.transform([[0.0, 0.0], [0.0, 1.0]])[:, 1])[0] * 72.0 / fig.dpi
    assert fig1.paths_apart_pt(ax, base, base) == 0.0
    assert fig1.paths_apart_pt(ax, base, paths["RTHO"]) == pytest.approx(0.2 * y_pt, rel=1e-9)
    x_pt = np.diff(ax.transData.transform([[0.0, 0.0], [1.0, 0.0]])[:, 0])[0] * 72.0 / fig.dpi
    # both ways: base's far end is (2.5 − x_1) from the start of the path, which lies on base
    assert fig1.paths_apart_pt(ax, base[:2], base) == pytest.approx((2.5 - base[1, 0]) * x_pt, rel=1e-9)
    fig1._stagger_markers(ax, paths)
    same = fig1._label_coinciding(ax, paths)
    labels = {line.get_label() for line in ax.get_lines()}
    assert {"MARTHE μ adaptive (≈ HD)", "RTHO", "HD"} <= labels
    assert same.startswith("MARTHE μ adaptive and HD: ") and "RTHO" not in same
    marks = [tuple(line.get_markevery()) for line in ax.get_lines() if line.get_label().split(" (")[0] in paths]
    assert len(marks) == 3 and len(set(marks)) == 3 and all(len(m) == 7 for m in marks)
    plt.close(fig)


def _no_figures(monkeypatch, module):
    """A re-run compares data only: its figures (most of a tiny run's time) are not drawn again."""
    monkeypatch.setattr(module, "make_figures", lambda *args, **kwargs: [])


def test_fig1_rerun_with_the_same_seed_is_identical(fig1_tiny, tmp_path, monkeypatch):
    from hgtoolkit.experiments import fig1
    _no_figures(monkeypatch, fig1)
    run_experiment("fig1", setting="tiny", out=tmp_path, seed=0, progress=False)
    for name in ("bukin_sharp_grid.npz", "bukin_sharp_paths.npz", "bukin_sharp_lrsopt.npz"):
        _arrays_equal(records.load_arrays(fig1_tiny / "data" / name),
                      records.load_arrays(tmp_path / "fig1" / "data" / name))


def test_fig1_config_validation():
    from hgtoolkit.experiments import fig1
    with pytest.raises(ValueError, match="valid names"):
        fig1.Config(functions=("nope",))
    with pytest.raises(ValueError, match="mus"):
        fig1.Config(mus=(1.5,))


# ----------------------------------------------------------------------------- hd (Baydin et al.)

@pytest.fixture(scope="module")
def hd_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hd")
    summary = run_experiment("hd", setting="tiny", out=root, progress=False)
    return root / "hd", summary


def test_hd_tiny_outputs_shapes_and_baseline(hd_tiny):
    from hgtoolkit.experiments import hd_grid
    root, summary = hd_tiny
    cfg = hd_grid.Config.tiny()
    _check_outputs(root, ["hd_logreg_grid", "hd_logreg_curves"],
                   [f"logreg_{o}.{e}" for o in cfg.optimizers for e in ("npz", "json")])
    a = records.load(root / "data" / "logreg_sgd.json").data
    A, B = len(cfg.alpha0s), len(cfg.hypergrad_lr_grid("sgd"))
    T = a["lrs"].shape[-1]
    assert a["lrs"].shape == (A, B, T) and a["final_val_loss"].shape == (A, B) and B >= 2
    assert np.all(np.isfinite(a["final_val_loss"])) and np.all((a["final_val_accuracy"] >= 0)
                                                                 & (a["final_val_accuracy"] <= 1))
    assert a["hypergrad_lrs"][0] == 0.0 and np.all(a["lrs"][:, 0] == a["alpha0s"][:, None])  # β = 0: constant α_0
    assert np.all(a["lrs"][:, 1:, -1] != a["alpha0s"][:, None])                        # β > 0: α_t moves
    # the β = 0 column is the plain optimizer: plain SGD with the constant α_0 on the same minibatches
    problem = hd_grid._problem_for(cfg, "logreg")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = trajectory.train(problem, torch.full((T,), cfg.alpha0s[0], dtype=problem.dtype))
    assert a["final_val_loss"][0, 0] == pytest.approx(float(plain.value), rel=1e-5)
    s = summary["models"]["logreg"]["optimizers"]["sgd"]
    assert s["cells_compared"] == A * (B - 1) and s["best_baseline"]["val_loss"] > 0


def test_hd_rerun_with_the_same_seed_is_identical(hd_tiny, tmp_path, monkeypatch):
    from hgtoolkit.experiments import hd_grid
    _no_figures(monkeypatch, hd_grid)
    root, _ = hd_tiny
    run_experiment("hd", setting="tiny", out=tmp_path, seed=0, progress=False)
    for name in ("logreg_sgd.npz", "logreg_adam.npz"):
        _arrays_equal(records.load_arrays(root / "data" / name),
                      records.load_arrays(tmp_path / "hd" / "data" / name))


# ----------------------------------------------------------------------------- towers (Chandra et al.)

@pytest.fixture(scope="module")
def towers_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    summary = run_experiment("towers", setting="tiny", out=root, progress=False)
    return root / "towers", summary


def test_towers_tiny_outputs_and_height_one_is_the_plain_optimizer(towers_tiny):
    from hgtoolkit import towers
    from hgtoolkit.experiments import towers_demo
    root, summary = towers_tiny
    cfg = towers_demo.Config.tiny()
    fams = list(cfg.families)
    _check_outputs(root, ["towers_logreg_sensitivity"] + [f"towers_logreg_{f}_levels" for f in fams],
                   ["sensitivity_logreg.npz", "sensitivity_logreg.json"]
                   + [f"showcase_logreg_{f}.json" for f in fams])
    a = records.load(root / "data" / "sensitivity_logreg.json").data
    F, H, A = len(fams), len(cfg.heights), len(cfg.alpha0s)
    assert a["final_val_loss"].shape == (F, H, A) and np.all(np.isfinite(a["final_val_loss"]))
    assert np.all(a["lrs"] > 0)
    np.testing.assert_array_equal(a["lrs"][:, 0], np.broadcast_to(a["alpha0s"][None, :, None], a["lrs"][:, 0].shape))
    assert np.all(a["lrs"][:, 1, :, -1] != a["alpha0s"])  # height 2 learns the base LR
    # height 1 = plain SGD with the constant α_0, bit for bit
    problem = towers_demo._problem("logreg", cfg.n_train, cfg.n_val, cfg.batch_size, tuple(cfg.mlp_hidden), cfg.seed)
    T = a["lrs"].shape[-1]
    plain = trajectory.train(problem, torch.full((T,), cfg.alpha0s[0], dtype=problem.dtype))
    assert a["final_val_loss"][fams.index("sgd"), 0, 0] == float(plain.value)
    shown = towers.TowerResult.load(root / "data" / "showcase_logreg_adam.json")
    assert shown.history.height == max(cfg.heights) and len(shown.history) == T
    assert summary["models"]["logreg"]["spread"]["sgd"]["1"]["max_over_min"] >= 1


def test_towers_rerun_with_the_same_seed_is_identical(towers_tiny, tmp_path, monkeypatch):
    from hgtoolkit.experiments import towers_demo
    _no_figures(monkeypatch, towers_demo)
    root, _ = towers_tiny
    run_experiment("towers", setting="tiny", out=tmp_path, seed=0, progress=False)
    _arrays_equal(records.load_arrays(root / "data" / "sensitivity_logreg.npz"),
                  records.load_arrays(tmp_path / "towers" / "data" / "sensitivity_logreg.npz"))


def test_fig1_constant_search_as_rows_equals_the_loop_of_train_runs():
    """The row-wise batch of constant-η GD runs gives the numbers of trajectory.train run by run."""
    import dataclasses
    from hgtoolkit.experiments import fig1
    for fn, lr in (("bukin_sharp", 1e-3), ("beale", 5e-3)):
        rows = problems.from_function(fn)
        loop = dataclasses.replace(rows, rowwise=False)
        a, b = fig1._constant_search(rows, lr, 200, 5), fig1._constant_search(loop, lr, 200, 5)
        for key in ("final", "best"):
            np.testing.assert_array_equal(a[key], b[key])
        assert a["best_lr"] == b["best_lr"]
    assert np.isinf(a["final"]).any() and np.isfinite(a["final"]).any()  # on Beale some diverge


def test_composite_parts_run_side_by_side(tmp_path):
    """A composite's parts but the last run in processes of their own (output in PART/run.log),
    the last one here; the summaries come back by part, and a failed part is named with its log."""
    from hgtoolkit.experiments import _run_parts
    parts = _run_parts(("fig1", "hd"), "tiny", tmp_path, 0, False)
    assert list(parts) == ["fig1", "hd"]
    assert parts["fig1"]["experiment"] == "fig1" and parts["fig1"]["setting"] == "tiny"
    assert (tmp_path / "fig1" / "run.log").exists() and (tmp_path / "fig1" / "summary.md").exists()
    assert (tmp_path / "hd" / "summary.md").exists()
    with pytest.raises(RuntimeError, match=r"'nope' failed.*run\.log"):
        _run_parts(("nope", "fig1"), "tiny", tmp_path / "bad", 0, False)


def test_cuts_say_what_a_setting_leaves_out_and_reproduce_prints_them():
    from hgtoolkit.cli.reproduce import _report
    from hgtoolkit.experiments import mnist
    cut = common.cuts(mnist.Config, "quick")
    assert "lrsopt_steps: 10 (full: 5000)" in cut and "n_seeds: 2 (full: 20)" in cut
    assert not any(c.startswith(("workers", "seed")) for c in cut)
    assert common.cuts(mnist.Config, "full") == []
    lines = _report({"setting": "quick", "wall_time": 1.0, "seed": 0}, Path("/tmp/x"), "fig1")
    assert "  cut from the papers' scale (--full) in the quick setting:" in lines
    assert any(l.strip().startswith("lrsopt_steps: 20 (full: 200)") for l in lines)
    assert not any("cut from" in l for l in _report({"setting": "full"}, Path("/tmp/x"), "fig1"))


def test_fig1_draws_each_function_right_after_its_lrsopt_cell(tmp_path, monkeypatch):
    """The first figure does not wait for the other functions' LRS-OPT: cells and figures alternate."""
    from hgtoolkit.experiments import fig1
    calls = []
    real_cells, real_figures = common.run_cells, fig1.make_figures
    monkeypatch.setattr(common, "run_cells", lambda out, grids, **kw: (
        calls.append(("cells", [g.name for g in grids])), real_cells(out, grids, **kw))[1])
    monkeypatch.setattr(fig1, "make_figures", lambda out, fns, **kw: (
        calls.append(("figures", list(fns))), real_figures(out, fns, **kw))[1])
    run_experiment("fig1", setting="tiny", out=tmp_path, progress=False, functions=("bukin_sharp", "beale"),
                   steps=10, lrsopt_steps=1, kappa_tries=1)
    assert calls == [("cells", ["fig1/lrsopt/bukin_sharp"]), ("figures", ["bukin_sharp"]),
                     ("cells", ["fig1/lrsopt/beale"]), ("figures", ["beale"])]
    assert sorted(p.name for p in (tmp_path / "fig1" / "figures").glob("*.png")) == \
        ["fig1_beale.png", "fig1_bukin_sharp.png"]
