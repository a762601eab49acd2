r"""Shared plumbing of the named experiments (``python -m hgtoolkit reproduce <name>``).

An experiment is a config dataclass with ``tiny()`` / ``quick()`` / ``full()`` constructors
(and a ``seed`` field) plus ONE function ``run(config, out_dir, progress=True) -> summary``.
This module gives every experiment the same output layout, summary format and seeding::

    results/<name>/
        config.json          the config the run used (+ setting, seed, versions)
        summary.md           a short Markdown report: tables of the headline numbers
        summary.json         the same numbers, machine-readable (what ``run`` returns)
        data/                raw records: JSON + npz (plots are drawn from these only)
        data/sweep/          the sweep store of the experiment's cells (resume: a re-run
                             computes only the cells missing there; :func:`run_cells`)
        figures/             PNG + PDF of every figure

    out = output_dir("results", "fig1")          # creates the folders
    save_config(out, config, setting="quick")
    records.save_arrays(out.data("beale_grid.npz"), ...)
    plotting.savefig(fig, out.figure("beale_best_vs_hypergrad_lr"), close=True)
    table = markdown_table(["method", "best f"], [["HD", 1.2e-3], ["RTHO", 4e-5]])
    summary = write_summary(out, "Fig. 1 …", [("Beale", table)], {"best": {...}})

Settings: ``"tiny"`` (seconds; the tests), ``"quick"`` (minutes on 2 CPU cores; ``make demo``)
and ``"full"`` (the papers' scale).

The API here is shared by several experiment modules: keep it stable (add, don't change).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from .. import records
from ..trajectory import progress_bar

__all__ = ["SETTINGS", "OutputDir", "output_dir", "as_output_dir", "check_setting", "make_config", "config_dict",
           "save_config", "seed_everything", "derive_seed", "fmt", "markdown_table",
           "write_summary", "read_summary", "replay_iterates", "progress_bar", "Stopwatch",
           "default_workers", "limited_threads", "run_cells", "cell_records",
           "cells_summary", "note_old_layout", "number", "choice", "cuts", "results_root", "RESULTS_ENV_VAR"]

SETTINGS = ("tiny", "quick", "full")


# ----------------------------------------------------------------------------- output layout

@dataclass(frozen=True)
class OutputDir:
    """The folder of one experiment, ``<out>/<name>/`` (see the module docstring)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def summary_json(self) -> Path:
        return self.root / "summary.json"

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def store(self) -> Path:
        """``data/sweep/``: the sweep store of the experiment's cells (:func:`run_cells`)."""
        return self.data_dir / "sweep"

    def figure(self, stem: str) -> Path:
        """``figures/<stem>`` without extension (what :func:`hgtoolkit.plotting.savefig` takes)."""
        return self.figures / stem

    def data(self, filename: str) -> Path:
        """``data/<filename>`` (give the extension, or a stem for records that add their own)."""
        return self.data_dir / filename

    def figure_files(self, ext: str = "png") -> list[Path]:
        """Every figure written so far with this extension, sorted."""
        return sorted(self.figures.glob(f"*.{ext}")) if self.figures.exists() else []

    def data_files(self) -> list[Path]:
        return sorted(p for p in self.data_dir.glob("*") if p.is_file()) if self.data_dir.exists() else []


def output_dir(out: str | Path, name: str) -> OutputDir:
    """Create (if needed) and return ``<out>/<name>/`` with its ``data/`` and ``figures/``."""
    if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    o = OutputDir(Path(out) / name)
    o.figures.mkdir(parents=True, exist_ok=True)
    o.data_dir.mkdir(parents=True, exist_ok=True)
    return o


RESULTS_ENV_VAR = "HGTOOLKIT_RESULTS"


def results_root() -> Path:
    """The folder of ``reproduce``'s results that notebooks read (and write when it is missing).

    ``$HGTOOLKIT_RESULTS`` when set; else, when hgtoolkit is imported from a source checkout (an
    editable install: the package's parent folder holds ``pyproject.toml``), that checkout's
    ``results/``, where ``make demo`` writes; else ``results/`` in the working directory. Found
    through the imported package, so a notebook copied anywhere reads the same results.
    """
    env = os.environ.get(RESULTS_ENV_VAR)
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "hgtoolkit").is_dir():
        return checkout / "results"
    return Path.cwd() / "results"


def as_output_dir(out: OutputDir | str | Path) -> OutputDir:
    """Accept an :class:`OutputDir` or a path to ``<out>/<name>`` (folders created); what an
    experiment's ``run(config, out_dir)`` calls first."""
    if isinstance(out, OutputDir):
        o = out
    elif isinstance(out, (str, Path)):
        o = OutputDir(Path(out))
    else:
        raise TypeError(f"out_dir must be an OutputDir or a path, got {type(out).__name__}")
    o.figures.mkdir(parents=True, exist_ok=True)
    o.data_dir.mkdir(parents=True, exist_ok=True)
    return o


_as_output_dir = as_output_dir  # the name the first experiment modules used


# ----------------------------------------------------------------------------- configs and seeds

def check_setting(setting: str) -> str:
    if not isinstance(setting, str) or setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    return setting


def make_config(config_cls: type, setting: str = "quick", seed: int | None = None, **overrides: Any):
    """``config_cls.<setting>()`` with ``seed`` and any field in ``overrides`` replaced."""
    check_setting(setting)
    config = getattr(config_cls, setting)()
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int ≥ 0, got {seed!r}")
        overrides["seed"] = int(seed)
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown} for {config_cls.__name__}; fields: {sorted(names)}")
    return dataclasses.replace(config, **overrides)


def cuts(config_cls: type, setting: str) -> list[str]:
    """What ``setting`` cuts from the papers' scale: one line ``field: value (full: value)`` per
    field of ``config_cls.<setting>()`` that differs from ``config_cls.full()`` (``workers`` and
    ``seed`` left out); [] for "full". What ``reproduce`` prints under its report."""
    import dataclasses
    check_setting(setting)
    if setting == "full":
        return []
    ours, full = getattr(config_cls, setting)(), config_cls.full()

    def short(v: Any) -> str:
        if isinstance(v, (tuple, list)):
            items = [short(x) for x in v]
            return "(" + ", ".join(items if len(items) <= 6 else items[:3] + ["…"] + items[-2:]) + f"; {len(items)})"
        return fmt(v) if isinstance(v, float) else str(v)

    return [f"{f.name}: {short(getattr(ours, f.name))} (full: {short(getattr(full, f.name))})"
            for f in dataclasses.fields(config_cls) if f.name not in ("workers", "seed")
            and getattr(ours, f.name) != getattr(full, f.name)]


def config_dict(config: Any) -> dict:
    """A config dataclass (or mapping) as a JSON-able dict."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return records.to_jsonable(dataclasses.asdict(config))
    if isinstance(config, Mapping):
        return records.to_jsonable(dict(config))
    raise TypeError(f"config must be a dataclass instance or a mapping, got {type(config).__name__}")


def save_config(out: OutputDir | str | Path, config: Any, **extra: Any) -> Path:
    """Write ``config.json``: the config, ``extra`` (e.g. setting) and the software versions."""
    out = as_output_dir(out)
    meta = {"experiment": out.name, "config": config_dict(config), **records.to_jsonable(extra),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__}}
    return records.atomic_write_json(out.config_json, meta)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (experiments should still pass
    explicit seeds to every stochastic call; this only guards against stray global draws)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, *keys: Any) -> int:
    """A stable seed in [0, 2³¹) for the sub-task named by ``keys`` (e.g. ("sgd", 3)),
    independent of Python's hash randomisation: crc32 of the text of ``(seed, *keys)``."""
    return zlib.crc32(repr((int(seed),) + tuple(keys)).encode()) & 0x7FFFFFFF


class Stopwatch:
    """``with Stopwatch() as sw: …``; then ``sw.seconds``."""

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        self.seconds = math.nan
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


# ----------------------------------------------------------------------------- Markdown summary

def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: None/NaN → "—", ±inf → "∞", floats to ``digits`` significant digits
    (scientific notation outside [1e-3, 1e4)), bools/ints/strings as text."""
    if x is None:
        return "—"
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    if isinstance(x, (float, np.floating)) or (isinstance(x, torch.Tensor) and x.numel() == 1):
        x = float(x)
        if math.isnan(x):
            return "—"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x == 0:
            return "0"
        if 1e-3 <= abs(x) < 1e4:
            return f"{x:.{digits}g}"
        return f"{x:.{max(digits - 1, 0)}e}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *,
                   align: Sequence[str] | None = None, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table; cells go through :func:`fmt`.

    ``align``: one of "l", "r", "c" per column (default: "l" for the first, "r" for the rest).
    """
    headers = [str(h) for h in headers]
    rows = [list(r) for r in rows]
    n = len(headers)
    for i, r in enumerate(rows):
        if len(r) != n:
            raise ValueError(f"rows[{i}] has {len(r)} cells, expected {n} (one per header)")
    align = list(align) if align is not None else ["l"] + ["r"] * (n - 1)
    if len(align) != n or any(a not in ("l", "r", "c") for a in align):
        raise ValueError(f"align must give 'l', 'r' or 'c' for each of the {n} columns, got {align!r}")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(rule[a] for a in align) + " |"]
    lines += ["| " + " | ".join(fmt(c, digits) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(out: OutputDir | str | Path, title: str, sections: Sequence[tuple[str, str]],
                  summary: Mapping[str, Any] | None = None, *, notes: Sequence[str] = ()) -> dict:
    """Write ``summary.md`` and ``summary.json``; return the summary dict.

    ``summary.md``: ``# title``, then for each ``(heading, body)`` in ``sections`` a
    ``## heading`` and the body (a :func:`markdown_table` or text), then ``notes`` as a list,
    then the figures and data files present in the folder. ``summary.json``: ``summary``
    (JSON-able; NaN → null) plus ``title``, ``summary_md``, ``figures`` and ``data_files`` (paths).
    """
    out = as_output_dir(out)
    figures = [str(p) for p in out.figure_files("png")]
    data = [str(p) for p in out.data_files()]
    md = [f"# {title}", ""]
    for heading, body in sections:
        md += [f"## {heading}", "", body.rstrip(), ""]
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if figures:
        md += ["## Figures", ""] + [f"- `{Path(p).relative_to(out.root)}` (+ .pdf)" for p in figures] + [""]
    records.atomic_write_bytes(out.summary_md, "\n".join(md).encode())
    result = {"title": title, **records.to_jsonable(dict(summary or {})),
              "summary_md": str(out.summary_md), "figures": figures, "data_files": data,
              "notes": list(notes)}
    records.atomic_write_json(out.summary_json, result)
    return result


def read_summary(out: OutputDir | str | Path) -> dict:
    """The dict :func:`write_summary` saved in ``summary.json``."""
    root = out.root if isinstance(out, OutputDir) else Path(out)
    with open(root / "summary.json") as fh:
        return json.load(fh)


# ----------------------------------------------------------------------------- trajectories

def replay_iterates(problem, lrs: Any, optimizer: Any = "sgd") -> np.ndarray:
    r"""All iterates w_0 … w_T of training ``problem`` with the schedule ``lrs`` (length T):
    w_{t+1} = params(Φ_t(s_t, η_t)) (the same update as :func:`hgtoolkit.trajectory.make_step`). Returns a
    ``(T + 1, d)`` float64 array (parameters flattened). Meant for small problems (2-D test
    functions), to draw paths from a recorded schedule; stops at the first non-finite iterate
    (the array is then shorter; the rows present are finite).
    """
    from .. import dynamics as _dynamics
    from .._tree import tree_leaves
    from ..trajectory import autograd_gradient, check_lrs

    dyn = _dynamics.get(optimizer)
    lrs = check_lrs(lrs, problem)

    def step(state, lr, t):  # Φ_t with a plain-autograd gradient: no per-call transform overhead
        g, loss = autograd_gradient(problem.train_loss, dyn.params(state), t)
        return dyn.step(state, g, lr, t), loss

    def flat(state) -> np.ndarray:
        return np.concatenate([x.detach().reshape(-1).cpu().double().numpy()
                               for x in tree_leaves(dyn.params(state))])

    state = dyn.init(problem.params0)
    rows = [flat(state)]
    with torch.no_grad():
        for t in range(lrs.shape[0]):
            state, _ = step(state, lrs[t], t)
            w = flat(state)
            if not np.all(np.isfinite(w)):
                break
            rows.append(w)
    return np.stack(rows)


# ----------------------------------------------------------------------------- parallel jobs

def default_workers() -> int:
    """Worker processes for independent jobs: the CPU cores available to this process."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def limited_threads(threads: int = 1):
    """``with limited_threads(1): …`` — torch's intra-op threads and the BLAS pools (OpenBLAS,
    MKL; via threadpoolctl when installed) limited to ``threads`` inside the block, restored
    after. For many small operations (scipy's L-BFGS-B on a few hundred variables, small
    networks) idle BLAS threads spinning on a shared machine cost up to 30× the work itself."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int ≥ 1, got {threads!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: torch's threads are still limited
        threadpool_limits = contextlib.nullcontext
    try:
        with threadpool_limits(threads):
            yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- resumable work: sweep cells

def run_cells(out: OutputDir | str | Path, grids, *, workers: int = 1, progress: bool = True,
              threads: int = 1, callback=None, batch: bool | int = True):
    """Run the cells of ``grids`` (:class:`hgtoolkit.sweep.Grid`) that are not yet in the
    experiment's store ``<out>/data/sweep`` (:attr:`OutputDir.store`): an interrupted experiment
    computes only its missing cells on a re-run. ``workers`` > 1: a pool of that many processes
    (``executor="processes"``); the numbers do not depend on it: every cell runs with
    ``threads`` torch threads and its own seed. ``callback(done, total)`` is called after cells
    finish. ``batch``: the sweep's batch groups (at most this many cells; True: the sweep's
    default) for kinds with a batched runner. Returns the :class:`~hgtoolkit.sweep.SweepReport`; a cell that raised stops the
    experiment with a RuntimeError naming it (its traceback is in the store's ``errors/``; a
    re-run retries it)."""
    from .. import sweep
    out = as_output_dir(out)
    report = sweep.run(grids, out.store, executor="processes" if workers > 1 else "local",
                       num_cpus=max(int(workers), 1) if workers > 1 else None, progress=progress,
                       threads_per_cell=threads, callback=callback, batch=batch)
    if report.failed:
        cid, err = next(iter(report.failed.items()))
        last = err.strip().splitlines()[-1] if err.strip() else "unknown error"
        raise RuntimeError(f"{len(report.failed)} cell(s) of {out.name} failed, e.g. {cid}: {last} "
                           f"(tracebacks in {out.store / 'errors'}; a re-run retries them)")
    return report


def note_old_layout(out: OutputDir | str | Path, *folders: str) -> None:
    """Warn when ``data/<folder>`` of a version before the sweep store exists: those records are
    not read (the runs are recomputed into ``data/sweep``); delete them once the new run is done."""
    out = as_output_dir(out)
    old = [out.data_dir / f for f in folders if (out.data_dir / f).exists()]
    if old:
        import warnings
        warnings.warn(f"{', '.join(map(str, old))}: records of an hgtoolkit version before the sweep store; "
                      f"they are not read — the runs are recomputed into {out.store} (delete the old "
                      "folders afterwards)", UserWarning, stacklevel=3)


def number(lo: float | None = None, hi: float | None = None, *, integer: bool = False,
           none: bool = False, open_lo: bool = False):
    """The grid validator of a number setting of an experiment's own cell kind
    (:class:`hgtoolkit.settings.Spec`): in [``lo``, ``hi``], ``integer``, None allowed with ``none``."""
    from ..settings import Spec
    return Spec("", kind="int" if integer else "number", lo=lo, hi=hi, none=none, open_lo=open_lo).check


def choice(options: Sequence[str]):
    """The grid validator of a setting that is one of ``options``."""
    from ..settings import Spec
    return Spec("", kind="choice", choices=tuple(options)).check


def cell_records(out: OutputDir | str | Path, grids) -> dict:
    """``{cell id: record}`` of the stored cells of ``grids`` (:func:`hgtoolkit.sweep.load_results`);
    what the summaries, tables and figures read."""
    from .. import sweep
    return {r["id"]: r for r in sweep.load_results(as_output_dir(out).store, grid=grids)}


def cells_summary(report) -> dict:
    """What a :func:`run_cells` call did, for ``summary.json``: cells, how many were already
    stored and the ids computed by this run."""
    return {"cells": report.total, "existing": len(report.existing), "computed": list(report.computed)}
