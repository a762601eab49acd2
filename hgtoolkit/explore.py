r"""A live explorer for Jupyter: online LR schedules on a 2-D test function, against the exact
hypergradient, redrawn as you move the sliders.

    import hgtoolkit
    hgtoolkit.explore(problem="beale")          # in JupyterLab: sliders + figure

Sliders: η₀ (``lr``), the hyper-learning rate β, MARTHE's μ (a number or "auto"), the step
size κ of the adaptive β, the method whose hypergradient is analysed, and the horizon T. Four
online runs (:func:`hgtoolkit.online.run` settings, objective E = f, plain gradient descent)
are drawn at every setting:

- HD (μ = 0) and RTHO (μ = 1) with β;
- MARTHE with μ and β;
- MARTHE with μ and the adaptive β (β_0 = 0, step size κ).

Panels: (a) the paths w_0 … w_T over the contours of f, (b) the schedules η_t, (c) the selected
run's online estimates h_{t+1} against the exact hypergradient g_t = ∂f(w_T)/∂η_t of its own
schedule over the horizon T (reverse mode, as :func:`hgtoolkit.exact.hypergradient`), (d) their
relative error |h_{t+1} − g_t| / |g_t| (:func:`hgtoolkit.analysis.relative_error`), with the
cosine and the sign agreement. A selected run that diverged at t_d ≤ T: (c) draws its estimates
up to t_d and a dotted line "diverged at t = t_d"; for t_d < T there is no exact g (w_T is never
reached): the legend and (d) say so, and (d) shows an empty fixed range (every panel is rescaled
to what it draws at each move).

How a move stays fast: the online runs of every slider setting (η₀ × β × μ × κ × method, at
the largest horizon) are ONE batched computation (:func:`hgtoolkit.batched.run_online_batch`:
the rows of a row-wise test function side by side) when the explorer opens, and their paths
one row-wise replay; the runs at horizon T < T_max are the first T steps of those (the online
recursion is causal: the arrays are the same numbers as ``online.run(..., steps=T)``). The
exact reference of every run at every horizon of the grid is one row-wise reverse pass along
those paths (:func:`hgtoolkit.exact.hypergradient_rows`: the reverse pass of
:func:`hgtoolkit.exact.hypergradient` on rows, λ_T = ∇f(w_T), g_t = −λ_{t+1}·∇f(w_t),
λ_t = λ_{t+1} − η_t ∇²f(w_t) λ_{t+1}, one row per run and horizon).
A move then only looks its four runs and the reference up and redraws the figure on a canvas
kept between moves (the text layouts it caches are reused). A setting off the sliders' grids
(``update(hypergrad_lr=3.3e-7)``, ``update(steps=45)``) is computed on demand, as one batch of its four
runs and their references. ``benchmarks/bench_explore.py`` measures the time per move.

Without ipywidgets (``pip install "hgtoolkit[notebooks]"``) the explorer shows the figure of
its current setting, static; :meth:`Explorer.update` redraws it.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import accepts_deprecated, check_renamed, moved, renamed

__all__ = ["explore", "Explorer", "RUNS", "GRIDS", "exact_rows"]

#: The four runs drawn at every setting: key → (label, colour).
RUNS = {"hd": ("HD", "tab:blue"), "rtho": ("RTHO", "tab:red"), "marthe": ("MARTHE", "tab:green"),
        "adaptive_hypergrad_lr": ("MARTHE, adaptive β", "tab:olive")}

#: The sliders' default values: η₀ (``lr``), β (``hypergrad_lr``), μ, κ and the horizons T.
GRIDS = {
    "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "hypergrad_lr": tuple(float(10.0 ** e) for e in np.arange(-10.0, -3.9, 0.5)),
    "mu": (0.5, 0.9, 0.99, 0.999, "auto"),
    "kappa": tuple(float(10.0 ** e) for e in range(-10, -3)),
    "steps": (100, 200, 500, 1000),
}

_SETTINGS = ("lr", "hypergrad_lr", "mu", "kappa", "method", "steps")
_G_LABEL = "exact g(t) = ∂f(w_T)/∂η_t"
_DPI = 90  # a screen figure: fewer pixels to draw and encode per move than the saved figures' 150


@accepts_deprecated
def explore(problem: str = "beale", *, lr: float = 1e-3, hypergrad_lr: float = 1e-6, mu: Any = 0.9,
            kappa: float = 1e-6, method: str = "marthe", steps: int = 500,
            grids: Mapping[str, Sequence] | None = None, precompute: bool = True,
            widgets: bool | None = None) -> "Explorer":
    """Open the explorer on the 2-D test function ``problem`` (a :mod:`testfunctions` name:
    "beale", "bukin_smooth", "bukin_sharp", "bukin6", "rosenbrock") at the given setting
    (module docstring). ``grids`` replaces slider grids of :data:`GRIDS` (keys "lr", "hypergrad_lr",
    "mu", "kappa", "steps"); ``precompute``: run every grid setting when it opens (else each
    setting when first shown); ``widgets``: None — sliders where ipywidgets is installed, False
    — the static figure. In Jupyter the returned :class:`Explorer` displays itself."""
    return Explorer(problem, lr=lr, hypergrad_lr=hypergrad_lr, mu=mu, kappa=kappa, method=method, steps=steps,
                    grids=grids, precompute=precompute, widgets=widgets)


def _check_setting(name: str, value: Any, max_steps: int) -> Any:
    if name == "method":
        if value == "adaptive_beta":  # its name before 0.2 (docs/glossary.md)
            raise ValueError("method 'adaptive_beta' was renamed 'adaptive_hypergrad_lr' (docs/glossary.md)")
        if value not in RUNS:
            raise ValueError(f"method must be one of {list(RUNS)}, got {value!r}")
        return value
    if name == "mu":
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"mu must be a number in [0, 1] or 'auto', got {value!r}")
        return float(value)
    if name == "steps":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= max_steps:
            raise ValueError(f"steps must be an int in [1, {max_steps}] (the largest horizon of the "
                             f"grid), got {value!r}")
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (name in ("lr", "kappa") and value == 0):
        raise ValueError(f"{name} must be {'> 0' if name in ('lr', 'kappa') else '≥ 0'}, got {value!r}")
    return float(value)


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else f"{v:.0e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e3) else f"{v:g}"


class Explorer:
    """The explorer's state, its figure and (where ipywidgets is installed) its sliders.

    ``settings``: the current ``{lr, hypergrad_lr, mu, kappa, method, steps}``; :meth:`update` changes
    some of them and redraws (what every slider calls); :meth:`runs` gives the four
    :class:`~hgtoolkit.online.OnlineResult` at the current setting (over the largest horizon;
    the first ``steps`` steps are drawn); :attr:`figure` is the matplotlib figure, :attr:`widgets`
    ``{name: widget}`` (None without ipywidgets). ``last_move``: wall and CPU seconds of the
    last :meth:`update`: the computation, the figure's update and (with widgets) its rendering
    to the PNG the image widget shows.
    """

    @accepts_deprecated
    def __init__(self, problem: str = "beale", *, lr: float = 1e-3, hypergrad_lr: float = 1e-6, mu: Any = 0.9,
                 kappa: float = 1e-6, method: str = "marthe", steps: int = 500,
                 grids: Mapping[str, Sequence] | None = None, precompute: bool = True,
                 widgets: bool | None = None):
        import testfunctions
        from . import problems
        if not isinstance(problem, str) or problem not in testfunctions.FUNCTIONS:
            raise ValueError(f"problem must name a 2-D test function, one of {sorted(testfunctions.FUNCTIONS)}, "
                             f"got {problem!r}")
        grids = check_renamed("Explorer", grids, takes=GRIDS) if grids else grids
        unknown = sorted(set(grids or {}) - set(GRIDS))
        if unknown:
            raise ValueError(f"grids has unknown key(s) {unknown}; choose from {list(GRIDS)}")
        self.grids = {k: tuple((grids or {}).get(k, v)) for k, v in GRIDS.items()}
        for k, values in self.grids.items():
            if not values:
                raise ValueError(f"grids[{k!r}] must hold at least one value")
        self.max_steps = max(int(v) for v in self.grids["steps"])
        for k in ("lr", "hypergrad_lr", "mu", "kappa", "steps"):
            for v in self.grids[k]:
                _check_setting(k, v, self.max_steps)
        self.fn = testfunctions.get(problem)
        self.problem = problems.from_function(problem)
        self.settings: dict[str, Any] = {}
        for name, value in zip(_SETTINGS, (lr, hypergrad_lr, mu, kappa, method, steps)):
            self.settings[name] = _check_setting(name, value, self.max_steps)
        self._syncing = False
        self._runs: dict[tuple, tuple] = {}    # cell key → (OnlineResult over max_steps, path)
        self._refs: dict[tuple, Any] = {}      # (cell key, T) → (g_0 … g_{T−1}, f(w_T)) or None
        self._exact: dict[tuple, Any] = {}     # (cell key, T) → HypergradResult (exact())
        self.open_seconds = None
        self.last_move = None
        self._background = None  # ((size, dpi), the static part's pixels): render()
        start = time.perf_counter()
        if precompute:
            self._ensure([c for c in self._grid_cells()])
        self._ensure(list(self._cells().values()), horizons=(self.settings["steps"],))
        self.open_seconds = time.perf_counter() - start
        self.figure = self._build_figure()
        self._draw()
        # lay the figure out once (constrained layout) and keep that layout: a move then only
        # redraws (half the time of a draw that lays out again)
        self.figure.get_layout_engine().set(rect=(0.0, 0.0, 1.0, 0.96))  # the top strip: the setting
        self.figure.draw_without_rendering()
        self.figure.set_layout_engine("none")
        self.widgets = self._build_widgets() if widgets is not False else None
        if widgets and self.widgets is None:
            raise ImportError("widgets=True needs ipywidgets: pip install 'hgtoolkit[notebooks]'")

    # ------------------------------------------------------------------ the runs

    def _cell(self, key: str, s: Mapping[str, Any]) -> dict:
        """``online.run`` arguments of run ``key`` at setting ``s`` (over the largest horizon)."""
        cell = {"method": "marthe" if key in ("marthe", "adaptive_hypergrad_lr") else key, "lr": s["lr"],
                "steps": self.max_steps}
        if key == "adaptive_hypergrad_lr":
            cell.update(hypergrad_lr="auto", mu=s["mu"], kappa=s["kappa"])
        else:
            cell["hypergrad_lr"] = s["hypergrad_lr"]
            if key == "marthe":
                cell["mu"] = s["mu"]
        return cell

    def _cells(self, settings: Mapping[str, Any] | None = None) -> dict[str, dict]:
        s = self.settings if settings is None else settings
        return {key: self._cell(key, s) for key in RUNS}

    def _grid_cells(self):
        g = self.grids
        for lr in g["lr"]:
            for mu in g["mu"]:
                for beta in g["hypergrad_lr"]:
                    for key in (("hd", "rtho", "marthe") if mu == g["mu"][0] else ("marthe",)):
                        yield self._cell(key, {"lr": lr, "hypergrad_lr": beta, "mu": mu})
                for kappa in g["kappa"]:
                    yield self._cell("adaptive_hypergrad_lr", {"lr": lr, "mu": mu, "kappa": kappa})

    @staticmethod
    def _key(cell: Mapping[str, Any]) -> tuple:
        return tuple(sorted(cell.items()))

    def _ensure(self, cells: list[dict], horizons: Sequence[int] = ()) -> None:
        """Compute the cells not yet cached: one batch (:func:`batched.run_online_batch`) and
        one row-wise replay of their schedules (the paths); then the exact references of the
        cells at the ``horizons`` (and the grid's, for new cells) not yet cached: one
        :func:`hgtoolkit.exact.hypergradient_rows` pass."""
        from . import batched
        from .divergence import recorded
        from .exact import hypergradient_rows
        todo, seen = [], set()
        for c in cells:
            k = self._key(c)
            if k not in self._runs and k not in seen:
                seen.add(k)
                todo.append(c)
        if todo:
            with recorded():  # a diverged run is drawn up to where it stopped, and says so
                results = batched.run_online_batch(None, [dict(c, problem=self.problem) for c in todo])
            paths = _replay_rows(self.problem, [r.lrs for r in results])
            for c, r, p in zip(todo, results, paths):
                self._runs[self._key(c)] = (r, p)
        pairs = [(c, T) for c in cells for T in horizons] + [(c, T) for c in todo for T in self.grids["steps"]]
        wanted = [k for k in dict.fromkeys((self._key(c), int(T)) for c, T in pairs) if k not in self._refs]
        computable = [k for k in wanted if self._runs[k[0]][0].steps_run >= k[1]]
        for k in wanted:  # a run that diverged before T has no reference
            self._refs[k] = None
        if computable:
            refs = hypergradient_rows(self.problem, [self._runs[k][1] for k, _ in computable],
                                      [self._runs[k][0].lrs for k, _ in computable], [T for _, T in computable])
            self._refs.update(zip(computable, refs))

    def runs(self) -> dict[str, Any]:
        """``{run key: OnlineResult}`` at the current setting (over the largest horizon)."""
        return {key: self._runs[self._key(c)][0] for key, c in self._cells().items()}

    def reference(self) -> "tuple[np.ndarray, float] | None":
        """(g_0 … g_{T−1}, f(w_T)): the exact hypergradient drawn for the selected run over the
        current horizon T (:func:`hgtoolkit.exact.hypergradient_rows`, cached), or None when
        that run diverged before T (or its hypergradient is not finite)."""
        cell = self._cells()[self.settings["method"]]
        return self._refs.get((self._key(cell), self.settings["steps"]))

    def exact(self):
        """The exact hypergradient (:class:`~hgtoolkit.exact.HypergradResult`) of the selected
        run's schedule η_0 … η_{T−1} from :func:`hgtoolkit.exact.hypergradient` (reverse mode;
        cached; the numbers of :meth:`reference`, which the figure draws), or None when that
        run diverged before T."""
        from .exact import hypergradient
        cell = self._cells()[self.settings["method"]]
        T = self.settings["steps"]
        r = self._runs[self._key(cell)][0]
        if r.steps_run < T:
            return None
        key = (self._key(cell), T)
        if key not in self._exact:
            lrs = torch.as_tensor(r.lrs[:T], dtype=self.problem.dtype)
            self._exact[key] = hypergradient(self.problem, lrs, mode="reverse")
        return self._exact[key]

    # ------------------------------------------------------------------ moves

    @renamed(lr0="lr")
    def update(self, **changes: Any) -> None:
        """Change some of the settings (``lr``, ``hypergrad_lr``, ``mu``, ``kappa``, ``method``,
        ``steps``) and redraw: what each slider calls. ValueError/TypeError for a bad value;
        nothing changes then."""
        changes = check_renamed("Explorer.update", changes, takes=_SETTINGS)
        unknown = sorted(set(changes) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"unknown setting(s) {unknown}; the explorer's settings are {list(_SETTINGS)}")
        new = dict(self.settings)
        for name, value in changes.items():
            new[name] = _check_setting(name, value, self.max_steps)
        w0, c0 = time.perf_counter(), time.process_time()
        self._ensure(list(self._cells(new).values()), horizons=(new["steps"],))
        self.settings = new
        self._draw()
        self._show()
        self.last_move = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
        self._sync_widgets()

    def _sync_widgets(self) -> None:
        """Sliders follow a programmatic :meth:`update` (where the value is one of theirs)."""
        if self.widgets is None:
            return
        self._syncing = True
        try:
            for name, widget in self.widgets.items():
                value = self.settings[name]
                if widget.value != value and any(v == value for _, v in widget.options):
                    widget.value = value
        finally:
            self._syncing = False

    def _on_change(self, name: str, value: Any) -> None:
        if not self._syncing:
            self.update(**{name: value})

    # ------------------------------------------------------------------ the figure

    def _build_figure(self):
        import matplotlib.pyplot as plt
        from matplotlib import ticker
        from . import plotting
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        fig, axes = plotting.figure(ncols=2, nrows=2, width=5.2, height=3.7)
        plt.close(fig)  # shown by the explorer (Output widget / display), not by pyplot
        FigureCanvasAgg(fig)  # its own canvas, kept: each move reuses its renderer and the text layouts it cached
        fig.set_dpi(_DPI)
        self._axes = ax_path, ax_lr, ax_h, ax_err = list(np.ravel(axes))
        # a fixed window around the start, the minimiser and the paths of the grid's runs
        pts = [np.asarray(self.fn.default_start), np.asarray(self.fn.minimiser)]
        for r, p in self._runs.values():
            if not r.diverged:
                pts.append(p)
        window = plotting.contour_window(pts, self.fn.bounds)
        plotting.plot_contour_paths(self.fn, {}, ax=ax_path, window=window, resolution=160, legend=False,
                                    title="(a) paths $w_0 \\ldots w_T$ over $f$")
        with plotting.style():
            self._lines = {}
            for key, (label, colour) in RUNS.items():
                line, = ax_path.plot([], [], color=colour, lw=1.0, label=label)
                end, = ax_path.plot([], [], "o", ms=3.5, color=colour)
                lr, = ax_lr.plot([], [], color=colour, lw=1.2, label=label)
                self._lines[key] = (line, end, lr)
            ax_path.legend(loc="best", fontsize=6.5)
            ax_lr.set_yscale("log", nonpositive="mask")
            ax_lr.set_xlabel(plotting.STEP_LABEL)
            ax_lr.set_ylabel(plotting.LR_LABEL)
            ax_lr.set_title(r"(b) schedules $\eta_t$ (log; $\eta_t = 0$ not drawn)")
            self._lr_legend = ax_lr.legend(loc="best", fontsize=6.5)
            self._h_line, = ax_h.plot([], [], "k--", lw=1.0, label="online estimate h(t+1)")
            self._g_line, = ax_h.plot([], [], color="tab:purple", lw=1.2, label=_G_LABEL)
            ax_h.axhline(0.0, color="0.5", lw=0.8)
            # where the selected run diverged: a vertical line (x in steps, y across the axes)
            self._div_line, = ax_h.plot([], [], color="tab:red", ls=":", lw=1.2,
                                        transform=ax_h.get_xaxis_transform())
            self._div_text = ax_h.annotate("", (0.0, 0.97), (3.0, 0.0), xycoords=ax_h.get_xaxis_transform(),
                                           textcoords="offset points", rotation=90, va="top", fontsize=7,
                                           color="tab:red")
            ax_h.set_xlabel(plotting.STEP_LABEL)
            ax_h.set_ylabel("hypergradient")
            self._h_legend = ax_h.legend(loc="best", fontsize=6.5)
            self._err_line, = ax_err.plot([], [], color="tab:purple", lw=1.0)
            ax_err.set_yscale("log", nonpositive="mask")
            ax_err.set_xlabel(plotting.STEP_LABEL)
            ax_err.set_ylabel("|h(t+1) − g(t)| / |g(t)|")
            self._plain = plain = ticker.FuncFormatter(lambda v, _: f"{v:.0e}" if v and (abs(v) < 1e-2 or abs(v) >= 1e3)
                                         else f"{v:g}")  # no mathtext: new tick values cost no parsing
            self._no_ticks = ticker.NullLocator()
            for ax in (ax_lr, ax_h, ax_err):
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_locator(ticker.NullLocator())  # fewer ticks to draw per move
            self._err_text = ax_err.text(0.02, 0.97, "", transform=ax_err.transAxes, va="top", fontsize=7,
                                         bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.85})
        return fig

    def _draw(self) -> None:
        """Put the current setting's data into the figure (no rendering), in the plotting style."""
        from . import plotting
        with plotting.style():
            self._draw_data()

    def _draw_data(self) -> None:
        from . import analysis
        s, T = self.settings, self.settings["steps"]
        selected = s["method"]
        labels = []
        for key, c in self._cells().items():
            r, path = self._runs[self._key(c)]
            n = min(T, r.steps_run)
            line, end, lr = self._lines[key]
            p = path[:n + 1]
            p = p[np.all(np.isfinite(p), axis=1)]
            line.set_data(p[:, 0], p[:, 1])
            end.set_data(p[-1:, 0], p[-1:, 1])
            lr.set_data(np.arange(n), r.lrs[:n])
            width = 2.2 if key == selected else 1.0
            line.set_linewidth(width)
            lr.set_linewidth(width)
            label = RUNS[key][0] + (f" (diverged at t = {r.diverged_at})" if r.diverged_at is not None
                                    and r.diverged_at <= T else "")
            labels.append(label)
        for text, label in zip(self._lr_legend.get_texts(), labels):
            text.set_text(label)
        ax_path, ax_lr, ax_h, ax_err = self._axes
        ax_lr.relim()
        ax_lr.autoscale_view()
        ax_lr.set_xlim(0, T)

        r = self.runs()[selected]
        ref = self.reference()
        label = RUNS[selected][0]
        n = min(T, r.steps_run)  # the steps the selected run made within the horizon
        h = r.hypergrads[:n]
        t = np.arange(n)
        self._h_line.set_data(t, np.where(np.isfinite(h), h, np.nan))
        shown = [h]
        d = r.diverged_at if r.diverged_at is not None and r.diverged_at <= T else None
        self._div_line.set_data([d, d] if d is not None else [], [0.0, 1.0] if d is not None else [])
        self._div_text.set_text("" if d is None else f"diverged at t = {d}")
        if d is not None:  # beside the line, on the side with room
            room = d < 0.8 * T
            self._div_text.xy = (d, 0.97)
            self._div_text.set(ha="left" if room else "right", position=(3.0 if room else -3.0, 0.0))
        g_label = self._h_legend.get_texts()[1]
        if ref is None:
            self._g_line.set_data([], [])
            self._err_line.set_data([], [])
            why = (f"diverged at t = {r.diverged_at} < T = {T}" if r.steps_run < T else
                   "has a non-finite exact hypergradient")
            self._err_text.set_text(f"{label} {why}:\nno exact reference")
            g_label.set_text("exact g(t): none, w_T not reached" if r.steps_run < T else "exact g(t): not finite")
        else:
            g, value = ref
            self._g_line.set_data(t, g)
            shown.append(g)
            err = analysis.relative_error(h, g)
            self._err_line.set_data(t, np.where(np.isfinite(err) & (err > 0), err, np.nan))
            agree = float(np.mean(analysis.sign_agreement(h, g)))
            self._err_text.set_text(f"{label}: cos(h, g) = {analysis.cosine_similarity(h, g):.3f}, "
                                    f"sign agreement {100 * agree:.0f} %\n"
                                    f"f(w_T) = {value:.4g}")
            g_label.set_text(_G_LABEL)
        finite = np.abs(np.concatenate(shown))
        finite = finite[np.isfinite(finite)]
        peak = float(finite.max()) if finite.size else 0.0
        ax_h.set_yscale("symlog", linthresh=max(1e-3 * peak, 1e-300) if peak > 0 else 1.0)
        ax_h.yaxis.set_major_formatter(self._plain)  # set_yscale put the default ones back
        ax_h.yaxis.set_minor_locator(self._no_ticks)
        ax_h.set_title(f"(c) {label}: online h(t+1) vs exact g(t), horizon T = {T}")
        ax_err.set_title(f"(d) {label}: relative error of h(t+1) against g(t)")
        for ax, empty in ((ax_h, (-1.0, 1.0)), (ax_err, (1e-3, 1.0))):
            _rescale(ax, T, empty)
        mu = s["mu"]
        self._title = self.figure.suptitle(f"{self.fn.name}: gradient descent from {tuple(self.fn.default_start)}, "
                             f"η₀ = {_fmt(s['lr'])}, β = {_fmt(s['hypergrad_lr'])}, μ = {_fmt(mu)}, "
                             f"κ = {_fmt(s['kappa'])}, T = {T}", fontsize=9, y=0.995, va="top")

    # ------------------------------------------------------------------ widgets and display

    def _build_widgets(self):
        try:
            import ipywidgets as w
        except ImportError:
            return None
        s = self.settings

        def slider(name, description, values):
            options = [(_fmt(v), v) for v in values]
            if s[name] not in values:
                options.append((_fmt(s[name]), s[name]))
            return w.SelectionSlider(options=options, value=s[name], description=description,
                                     continuous_update=False, layout=w.Layout(width="320px"))

        widgets = {
            "lr": slider("lr", "η₀", self.grids["lr"]),
            "hypergrad_lr": slider("hypergrad_lr", "β", self.grids["hypergrad_lr"]),
            "mu": slider("mu", "μ", self.grids["mu"]),
            "kappa": slider("kappa", "κ", self.grids["kappa"]),
            "steps": slider("steps", "T", self.grids["steps"]),
            "method": w.ToggleButtons(options=[(label, key) for key, (label, _) in RUNS.items()],
                                      value=s["method"], description="analyse"),
        }
        for name, widget in widgets.items():
            widget.observe(lambda change, name=name: self._on_change(name, change["new"]), names="value")
        self._image = w.Image(format="png", value=self.png())
        self._box = w.VBox([w.HBox([widgets["lr"], widgets["hypergrad_lr"], widgets["steps"]]),
                            w.HBox([widgets["mu"], widgets["kappa"]]), widgets["method"], self._image])
        return widgets

    def _dynamic_artists(self) -> list:
        """What a move changes, in the order a full draw paints it: panel (a) from its first
        run line on (the lines, the spines, the titles, the legend over them), panels (b)–(d)
        and the figure's title. The rest (the contours, panel (a)'s axes, the colour bar) is
        the same at every setting."""
        ax_path = self._axes[0]
        order = sorted((a for a in ax_path.get_children() if a is not ax_path.patch), key=lambda a: a.get_zorder())
        first = min(order.index(line) for line, _, _ in self._lines.values())
        return order[first:] + self._axes[1:] + [self._title]

    def render(self) -> np.ndarray:
        """Paint the current setting on the figure's own Agg canvas and return its pixels
        (height × width × RGBA, a view of the canvas): the static part of the figure is drawn
        once and kept as pixels (its layout is fixed when the explorer opens), a move restores
        it and paints only :meth:`_dynamic_artists` over it — the same pixels as a full
        ``canvas.draw()``, with a third less to draw."""
        canvas = self.figure.canvas
        dynamic = self._dynamic_artists()
        key = (canvas.get_width_height(), self.figure.dpi)
        if self._background is None or self._background[0] != key:
            for a in dynamic:
                a.set_animated(True)  # Figure.draw and Axes.draw skip animated artists
            try:
                canvas.draw()
            finally:
                for a in dynamic:
                    a.set_animated(False)
            self._background = (key, canvas.copy_from_bbox(self.figure.bbox))
        else:
            canvas.restore_region(self._background[1])
        renderer = canvas.get_renderer()
        for a in dynamic:
            a.draw(renderer)
        return np.asarray(canvas.buffer_rgba())

    def png(self) -> bytes:
        """The figure as PNG bytes, as the sliders show it (:meth:`render`), encoded with zlib
        level 1 (a few % larger than the default level, a fraction of its time)."""
        import io
        from matplotlib import image
        buf = io.BytesIO()
        image.imsave(buf, self.render(), format="png", pil_kwargs={"compress_level": 1})
        return buf.getvalue()

    def _show(self) -> None:
        """Put the redrawn figure into the image widget (without widgets: nothing to do)."""
        if self.widgets is not None:
            self._image.value = self.png()

    def _ipython_display_(self):
        from IPython.display import display
        if self.widgets is None:
            print("ipywidgets is not installed (pip install 'hgtoolkit[notebooks]'): a static figure; "
                  "Explorer.update(hypergrad_lr=...) redraws it")
            display(self.figure)
            return
        display(self._box)


#: Moved: the row-wise reverse pass is :func:`hgtoolkit.exact.hypergradient_rows` (the reverse
#: pass of :func:`hgtoolkit.exact.hypergradient`, its one adjoint step, on rows).
exact_rows = moved("hgtoolkit.explore.exact_rows", "hgtoolkit.exact.hypergradient_rows")


def _rescale(ax, T: int, empty: tuple[float, float]) -> None:
    """Fit ``ax``'s y-range to the data it draws now (x: 0 … T); with no finite data, the
    range ``empty`` (``autoscale_view`` would keep the previous selection's limits)."""
    ax.relim()
    if np.all(np.isfinite(ax.dataLim.intervaly)):
        ax.autoscale_view(scalex=False)
    else:
        ax.set_ylim(*empty, auto=True)  # (autoscaling stays on for the next move)
    ax.set_xlim(0, T)


def _replay_rows(problem, schedules: Sequence[np.ndarray]) -> list[np.ndarray]:
    r"""The iterates w_0 … w_n of gradient descent w_{t+1} = w_t − η_t ∇f(w_t) for each schedule
    (its length n), all schedules as the rows of one row-wise computation (``Problem.rowwise``);
    a list of (n + 1, 2) arrays, NaN from the first non-finite iterate on."""
    from .trajectory import rowwise_gradient_hvp
    R = len(schedules)
    n = np.array([len(s) for s in schedules])
    T = int(n.max()) if R else 0
    lrs = np.zeros((R, T))
    for i, s in enumerate(schedules):
        lrs[i, :len(s)] = s
    eta = torch.as_tensor(lrs, dtype=problem.dtype, device=problem.device)
    W = problem.params0.expand(R, *problem.params0.shape).clone()
    out = torch.empty((T + 1, R, 2), dtype=problem.dtype)
    out[0] = W
    for t in range(T):
        G = rowwise_gradient_hvp(problem.train_loss, W, None, t)[0]
        W = torch.addcmul(W, eta[:, t:t + 1], G, value=-1)
        out[t + 1] = W
    paths = out.numpy(force=True).transpose(1, 0, 2)
    result = []
    for i in range(R):
        p = paths[i, :n[i] + 1].copy()
        bad = ~np.all(np.isfinite(p), axis=1)
        if bad.any():
            p[np.argmax(bad):] = np.nan
        result.append(p)
    return result
