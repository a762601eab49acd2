"""plotting.layout_problems: texts and legends outside a figure's canvas are found (the test
suite turns plotting.CHECK_LAYOUT on in conftest.py, so every figure a test saves through
plotting.savefig — every experiment's, in its tiny setting — is checked with it)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hgtoolkit import plotting  # noqa: E402


def test_the_suite_checks_every_saved_figure():
    assert plotting.CHECK_LAYOUT  # conftest.py


def test_a_tidy_figure_has_no_problems_and_saves(tmp_path):
    fig, ax = plotting.figure()
    ax.plot([0, 1], [0, 1], label="a")
    ax.plot([0, 1], [1, 0], label="b")
    ax.legend()
    ax.set_title("short")
    assert plotting.layout_problems(fig) == []
    plotting.savefig(fig, tmp_path / "ok", caption="a caption " * 40, close=True)  # wrapped: fits
    assert (tmp_path / "ok.png").exists()


def test_a_legend_and_a_title_outside_the_canvas_are_named():
    fig, ax = plt.subplots(figsize=(3.0, 2.0))  # no constrained layout: nothing is moved in
    ax.plot([0, 1], [0, 1], label="the line")
    ax.legend(loc="upper left", bbox_to_anchor=(1.8, 1.0))
    ax.set_title("a title far too long for a three-inch figure, it runs over both of its edges")
    found = plotting.layout_problems(fig)
    assert any(p.startswith("legend ('the line'") and "right" in p for p in found), found
    assert any(p.startswith("text 'a title far too long") for p in found), found
    plt.close(fig)


def test_savefig_refuses_a_figure_with_layout_problems(tmp_path):
    fig, ax = plotting.figure(width=3.0, height=2.0)
    ax.text(1.5, 0.5, "outside", transform=ax.transAxes)
    with pytest.raises(ValueError, match="outside.*right"):
        plotting.savefig(fig, tmp_path / "bad", close=True)
    assert not (tmp_path / "bad.png").exists()


def test_legend_on_top_keeps_the_legend_inside_and_above_the_data():
    fig, ax = plotting.figure(width=4.0, height=3.0)
    x = np.linspace(0, 1, 50)
    for k in range(6):
        ax.plot(x, 0.5 + 0.5 * x ** (k + 1), label=f"curve {k}")
    legend = plotting.legend_on_top(ax, ncol=2)
    fig.draw_without_rendering()
    r = plotting.layout_renderer(fig)
    lb, box = legend.get_window_extent(r), ax.get_window_extent(r)
    assert box.y0 <= lb.y0 and lb.y1 <= box.y1 + 1 and box.x0 <= lb.x0 and lb.x1 <= box.x1
    top_of_data = ax.transData.transform((1.0, 1.0))[1]  # the highest point drawn
    assert top_of_data < lb.y0
    assert plotting.layout_problems(fig) == []
    plt.close(fig)


def test_mean_vs_hypergrad_lr_explains_only_the_markers_it_draws():
    curves = {"fine": np.array([[0.5, 0.6], [0.55, 0.65]])}
    fig, ax = plotting.figure()
    plotting.plot_mean_vs_hypergrad_lr([1e-3, 1e-2], curves, ax=ax)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert texts == ["fine"]
    plt.close(fig)
    partly = {"partly": np.array([[0.5, np.nan], [0.55, 0.65]]), "all": np.array([[np.nan, 0.6], [np.nan, 0.7]])}
    fig, ax = plotting.figure()
    plotting.plot_mean_vs_hypergrad_lr([1e-3, 1e-2], partly, ax=ax, legend_top=True)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "some seeds diverged (mean of the rest)" in texts and "all seeds diverged" in texts
    plt.close(fig)


def test_describe_source_limit():
    info = {"name": "p", "data": "x" * 100, "dtype": "torch.float32"}
    assert "…" in plotting.describe_source(info) and len(plotting.describe_source(info)) < 90
    assert plotting.describe_source(info, limit=None) == f"p · {'x' * 100} · float32"


def test_a_figure_without_pyplot_is_laid_out_by_agg_and_keeps_its_canvas():
    """layout_renderer: the canvas's own renderer (public API); a Figure() made without pyplot
    (FigureCanvasBase, no get_renderer) is checked with an Agg one, as savefig draws it, and finds
    the same problems as the pyplot figure; its canvas stays."""
    from matplotlib.figure import Figure
    found = []
    for fig in (plt.figure(figsize=(3.0, 2.0)), Figure(figsize=(3.0, 2.0))):
        canvas = fig.canvas
        ax = fig.add_subplot()
        ax.text(1.5, 0.5, "outside", transform=ax.transAxes)
        found.append(plotting.layout_problems(fig))
        assert fig.canvas is canvas
    assert found[0] == found[1] and any("outside" in p and "right" in p for p in found[0]), found
    plt.close("all")
