"""hgtoolkit.explore: the sliders' callbacks redraw the figure with the numbers of
online.run / exact.hypergradient / a replay at the same settings; without ipywidgets the
explorer falls back to a static figure."""
from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import hgtoolkit  # noqa: E402
from hgtoolkit import divergence, exact, online, plotting, problems  # noqa: E402
from hgtoolkit.experiments.common import replay_iterates  # noqa: E402
from hgtoolkit.explore import RUNS, Explorer  # noqa: E402

GRIDS = {"lr": (1e-3, 3e-3), "hypergrad_lr": (1e-7, 1e-6), "mu": (0.9, "auto"), "kappa": (1e-7, 1e-6),
         "steps": (30, 60)}


def _check_figure(e: Explorer) -> None:
    """Every run's schedule and path, and the selected run's h and exact g, as drawn, against
    online.run, a replay and exact.hypergradient at the explorer's setting."""
    s, T = e.settings, e.settings["steps"]
    P = problems.from_function(e.fn.name)
    for key in RUNS:
        cell = {**e._cell(key, s), "steps": T}
        with divergence.recorded():
            ref = online.run(P, **cell)
        path_line, _, lr_line = e._lines[key]
        n = ref.steps_run
        np.testing.assert_allclose(lr_line.get_ydata(), ref.lrs, rtol=1e-12, atol=0)
        assert len(lr_line.get_xdata()) == n
        replay = replay_iterates(P, ref.lrs)
        np.testing.assert_allclose(np.column_stack([path_line.get_xdata(), path_line.get_ydata()]),
                                   replay[:len(path_line.get_xdata())], rtol=1e-10, atol=1e-12)
        if key == s["method"]:
            np.testing.assert_allclose(e._h_line.get_ydata(), ref.hypergrads, rtol=1e-10, atol=1e-300)
            if ref.diverged:  # h up to the divergence, marked; no exact reference, and the panel says so
                assert len(e._g_line.get_ydata()) == 0 and "diverged" in e._err_text.get_text()
                assert list(e._div_line.get_xdata()) == [ref.diverged_at] * 2
                assert f"diverged at t = {ref.diverged_at}" in e._div_text.get_text()
                assert "exact g(t): none" in e._h_legend.get_texts()[1].get_text()
                assert e._axes[3].get_ylim() == pytest.approx((1e-3, 1.0))  # nothing to draw: not stale limits
            else:
                g = exact.hypergradient(P, torch.as_tensor(ref.lrs), mode="reverse").grad.numpy()
                np.testing.assert_allclose(e._g_line.get_ydata(), g, rtol=1e-12, atol=1e-300)
                assert len(e._div_line.get_xdata()) == 0 and e._div_text.get_text() == ""
    for ax in e._axes[2:]:
        _check_fits(ax)
    assert f"T = {T}" in e.figure.get_suptitle() and f"η₀ = " in e.figure.get_suptitle()
    assert plotting.layout_problems(e.figure) == []


def _check_fits(ax) -> None:
    """``ax``'s y-range is fitted to the data it draws now (autoscaled, not a previous move's)."""
    ys = [np.asarray(line.get_ydata(), float) for line in ax.get_lines()
          if line.get_transform().contains_branch_seperately(ax.transData)[1]]
    ys = np.concatenate(ys) if ys else np.array([])
    ys = ys[np.isfinite(ys) & ((ys > 0) if ax.get_yscale() == "log" else True)]
    if ys.size == 0:
        return
    scale = ax.yaxis.get_transform()
    lo, hi = scale.transform(np.array([ys.min(), ys.max()]))
    a, b = scale.transform(np.array(ax.get_ylim()))
    assert a <= lo + 1e-9 * abs(lo) and b >= hi - 1e-9 * abs(hi), ax.get_title()
    assert b - a <= 1.25 * (hi - lo) + 2.0, ax.get_title()  # the margins (and a decade or two on empty data)


def test_every_slider_redraws_with_the_numbers_of_online_run():
    e = hgtoolkit.explore("beale", lr=1e-3, hypergrad_lr=1e-7, mu=0.9, kappa=1e-7, method="marthe", steps=30,
                          grids=GRIDS, widgets=True)
    assert set(e.widgets) == {"lr", "hypergrad_lr", "mu", "kappa", "method", "steps"}
    n_cached = len(e._runs)
    assert n_cached == 2 * (2 * 3 + 2 + 2 * 2)  # lr × (β × (HD, RTHO, MARTHE μ=0.9), β × μ=auto, κ × μ)
    _check_figure(e)
    png = e._image.value
    moves = [("hypergrad_lr", 1e-6), ("mu", "auto"), ("kappa", 1e-6), ("method", "adaptive_hypergrad_lr"),
             ("lr", 3e-3), ("steps", 60), ("method", "hd"), ("method", "rtho")]
    for name, value in moves:
        e.widgets[name].value = value  # the slider's callback
        assert e.settings[name] == value
        assert e.last_move["wall_s"] >= 0 and e._image.value != png
        png = e._image.value
        _check_figure(e)
    assert len(e._runs) == n_cached  # every move was on the grid: looked up, not recomputed


def test_update_validates_and_computes_off_grid_settings():
    e = Explorer("bukin_smooth", steps=30, grids=GRIDS, precompute=False, widgets=False)
    before = dict(e.settings)
    for bad, exc in [({"hypergrad_lr": -1.0}, ValueError), ({"lr": 0.0}, ValueError), ({"mu": 2.0}, ValueError),
                     ({"steps": 61}, ValueError), ({"method": "adam"}, ValueError),
                     ({"eta": 1.0}, TypeError), ({"kappa": "x"}, TypeError)]:
        with pytest.raises(exc):
            e.update(**bad)
        assert e.settings == before
    with pytest.raises(ValueError, match="'adaptive_beta' was renamed 'adaptive_hypergrad_lr'"):
        e.update(method="adaptive_beta")
    with pytest.warns(FutureWarning, match="'beta' is now 'hypergrad_lr'"):
        e.update(beta=e.settings["hypergrad_lr"])
    e.update(hypergrad_lr=3.3e-7, steps=45)  # off the grid: computed on demand
    _check_figure(e)
    assert e.reference() is None and e.exact() is None  # MARTHE diverges there: no reference
    e.update(method="adaptive_hypergrad_lr")
    g, value = e.reference()  # what the figure draws: exact.hypergradient_rows, the numbers of exact.hypergradient
    np.testing.assert_allclose(g, e.exact().grad.numpy(), rtol=1e-12, atol=1e-300)
    assert value == pytest.approx(float(e.exact().value), rel=1e-12)
    with pytest.raises(ValueError, match="problem"):
        Explorer("no_such_function")
    with pytest.raises(ValueError, match="grids"):
        Explorer("beale", grids={"eta": (1.0,)})


def test_without_ipywidgets_the_figure_is_static(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets → ImportError
    e = hgtoolkit.explore("beale", steps=30, grids=GRIDS, precompute=False)
    assert e.widgets is None
    e._ipython_display_()
    assert "ipywidgets is not installed" in capsys.readouterr().out
    _check_figure(e)
    e.update(method="hd", steps=60)
    _check_figure(e)
    with pytest.raises(ImportError, match="ipywidgets"):
        Explorer("beale", steps=30, grids=GRIDS, precompute=False, widgets=True)


def test_a_move_paints_the_pixels_of_a_full_draw():
    """Explorer.render keeps the static part as pixels and repaints only what a move changes:
    the same image as drawing the whole figure."""
    e = hgtoolkit.explore("beale", steps=30, grids=GRIDS, widgets=False)
    # the adaptive β with μ = 0.9 diverges (at t = 18 and 17 < T): drawn up to there, marked
    for changes in ({}, {"method": "adaptive_hypergrad_lr"}, {"mu": "auto"}, {"steps": 60, "lr": 3e-3},
                    {"mu": 0.9}, {"method": "marthe"}):
        e.update(**changes)
        assert e.runs()["adaptive_hypergrad_lr"].diverged == (e.settings["mu"] == 0.9)
        fast = e.render().copy()
        e.figure.canvas.draw()
        np.testing.assert_array_equal(fast, np.asarray(e.figure.canvas.buffer_rgba()))
        _check_figure(e)
