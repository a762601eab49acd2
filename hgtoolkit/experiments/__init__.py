r"""Named experiments that reproduce the papers: ``python -m hgtoolkit reproduce <name>``.

Each experiment lives in its own module ``hgtoolkit.experiments.<module>`` that defines

- ``Config``: a dataclass with a ``seed`` field and constructors ``Config.tiny()`` (seconds;
  used by the tests), ``Config.quick()`` (minutes on 2 CPU cores; ``make demo``) and
  ``Config.full()`` (the papers' scale);
- ``run(config, out_dir, progress=True) -> dict``: runs it, writes figures (PNG + PDF), raw
  records (JSON/npz) and ``summary.md``/``summary.json`` under ``out_dir`` (an
  :class:`~hgtoolkit.experiments.common.OutputDir`, ``<out>/<name>/``), returns the summary.

Modules are imported lazily (only the experiment you run is loaded).

    >>> from hgtoolkit.experiments import EXPERIMENTS, run_experiment
    >>> sorted(EXPERIMENTS)
    ['demo', 'fig1', 'hd', 'hdm', 'horizons', 'lrsopt', 'mnist', 'towers']
    >>> summary = run_experiment("fig1", setting="tiny", out="/tmp/results", progress=False)  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import records
from .common import SETTINGS, check_setting, make_config, output_dir, save_config, seed_everything

__all__ = ["Experiment", "EXPERIMENTS", "run_experiment", "get", "available", "SETTINGS"]


@dataclass(frozen=True)
class Experiment:
    """A registry entry: ``module`` (under :mod:`hgtoolkit.experiments`) holds ``Config`` and
    ``run``; ``parts`` (for a composite entry such as ``demo``) lists other entries, run side by
    side (:func:`_run_parts`)."""

    name: str
    description: str
    module: str | None = None
    parts: tuple[str, ...] = ()

    def load(self):
        """Import the experiment's module."""
        if self.module is None:
            raise ValueError(f"experiment {self.name!r} is composite ({', '.join(self.parts)}); it has no module")
        return importlib.import_module(f"{__name__}.{self.module}")


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("fig1", "MARTHE Fig. 1: HD vs RTHO vs MARTHE on Beale and smoothed Bukin — best "
                       "objective vs β, LR schedules (with LRS-OPT's), trajectories over the contours",
               module="fig1"),
    Experiment("mnist", "MARTHE Sec. 5: 3×500 MLP on MNIST, SGD — LRS-OPT vs HD/RTHO/MARTHE "
                        "schedules and validation accuracy vs β", module="mnist"),
    Experiment("hd", "Baydin et al.: α_0 × β sensitivity grid of SGD-HD, SGDN-HD, Adam-HD vs plain "
                     "SGD/SGDN/Adam on MNIST (loss curves, heat maps)", module="hd_grid"),
    Experiment("towers", "Chandra et al.: hyperoptimizer towers — learnt hyperparameters over time "
                         "at each level, and sensitivity to the initial LR vs tower height",
               module="towers_demo"),
    Experiment("horizons", "Wu et al.: short-horizon bias on the noisy quadratic (greedy / fixed / "
                           "optimal schedules, exact) and the horizon K each online rule matches on MNIST",
               module="horizons"),
    Experiment("hdm", "Chu et al.: HDM / HDM-Best vs HD, GD, heavy ball, Adam, AdaGrad, BFGS, L-BFGS — "
                      "gradient evaluations to ‖∇f‖∞ ≤ 1e-4 on deterministic convex problems", module="hdm_bench"),
    Experiment("lrsopt", "MARTHE Sec. 5 / Fig. 2 left at full scale: LRS-OPT of the whole SGD schedule "
                         "(T = 500, 3×500 MLP) by L-BFGS-B on fixed minibatches (4 seeds) and Adam "
                         "on resampled ones; resumable", module="lrsopt_full"),
    Experiment("demo", "`make demo`: fig1 and mnist in their quick settings", parts=("fig1", "mnist")),
)}


def available() -> list[str]:
    """Names of the experiments (all registered ones have their module)."""
    return list(EXPERIMENTS)


def get(name: str) -> Experiment:
    """The registry entry; ValueError listing the names for an unknown one."""
    if not isinstance(name, str) or name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment name={name!r}; choose one of: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def run_experiment(name: str, setting: str = "quick", out: str | Path = "results", seed: int = 0,
                   progress: bool = True, **overrides: Any) -> dict:
    """Run experiment ``name`` at ``setting`` ("tiny" | "quick" | "full") with ``seed``; write
    under ``<out>/<name>/``; return its summary dict (also in ``summary.json``).

    ``overrides`` replace fields of the config (e.g. ``steps=100``). A composite entry
    (``demo``) runs its parts — in ``demo`` always at ``setting`` — and returns
    ``{"parts": {part: summary}}``.
    """
    exp = get(name)
    check_setting(setting)
    if exp.parts:
        if overrides:
            raise ValueError(f"experiment {name!r} is composite; config overrides {sorted(overrides)} "
                             "apply to single experiments only")
        return {"experiment": name, "setting": setting, "seed": seed,
                "parts": _run_parts(exp.parts, setting, out, seed, progress)}

    module = exp.load()
    config = make_config(module.Config, setting, seed, **overrides)
    out_dir = output_dir(out, name)
    save_config(out_dir, config, setting=setting, seed=seed)
    seed_everything(seed)
    start = time.perf_counter()
    summary = module.run(config, out_dir, progress=progress)
    summary = dict(summary)
    summary.setdefault("experiment", name)
    summary.setdefault("setting", setting)
    summary.setdefault("seed", seed)
    summary.setdefault("wall_time", time.perf_counter() - start)
    records.atomic_write_json(out_dir.summary_json, summary)
    return summary


def _run_parts(parts: tuple[str, ...], setting: str, out: str | Path, seed: int, progress: bool) -> dict:
    """A composite's parts (independent experiments) side by side: every part but the last in a
    process of its own (``python -m hgtoolkit reproduce PART``, its output in
    ``<out>/PART/run.log``), the last one here — on 2 cores ``make demo``'s fig1 (a few
    single-core batches and serial figure drawing) then fills the gaps of mnist's pool. The
    numbers are those of running the parts one after the other. Returns ``{part: summary}``."""
    import json
    import subprocess
    import sys

    background = []
    for part in parts[:-1]:
        log = output_dir(out, part).root / "run.log"
        cmd = [sys.executable, "-m", "hgtoolkit", "reproduce", part, f"--{setting}", "--out", str(out),
               "--seed", str(seed), "--no-progress"]
        with open(log, "w") as fh:
            background.append((part, log, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)))
        if progress:
            print(f"{part}: running beside {parts[-1]} in a process of its own (output in {log})",
                  file=sys.stderr, flush=True)
    try:
        done = {parts[-1]: run_experiment(parts[-1], setting, out, seed, progress)}
    finally:
        codes = {part: proc.wait() for part, _, proc in background}
    for part, log, _ in background:
        if codes[part] != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
            raise RuntimeError(f"experiment {part!r} failed (exit code {codes[part]}); its output is "
                               f"in {log}, ending:\n{tail}")
        done[part] = json.loads(output_dir(out, part).summary_json.read_text())
    return {part: done[part] for part in parts}
