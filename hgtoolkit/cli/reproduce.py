"""Command ``reproduce``: run a named experiment of :mod:`hgtoolkit.experiments`.

    python -m hgtoolkit reproduce --list
    python -m hgtoolkit reproduce fig1              # quick setting (minutes on 2 CPU cores)
    python -m hgtoolkit reproduce fig1 --full       # the papers' scale
    python -m hgtoolkit reproduce demo              # what `make demo` runs: fig1 and mnist, quick

Each experiment writes ``<out>/<name>/``: ``figures/*.png|pdf``, ``data/*.json|npz``,
``summary.md``, ``summary.json`` and ``config.json``; the command prints where they are.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from . import args as cli_args

__all__ = ["register"]


def register(sub) -> None:
    from ..experiments import EXPERIMENTS

    names = ", ".join(EXPERIMENTS)
    p = sub.add_parser(
        "reproduce", help="reproduce a paper experiment (fig1, mnist, hd, towers, demo)",
        description="Run a named experiment reproducing the papers; writes figures (PNG + PDF), raw "
                    "records (JSON/npz) and summary.md under OUT/NAME/. Settings: --quick (default, "
                    "minutes on 2 CPU cores), --full (the papers' scale), --tiny (seconds; for tests). "
                    f"Experiments: {names}. --list describes them.",
    )
    p.add_argument("name", nargs="?", help=f"experiment name ({names})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="setting", action="store_const", const="quick",
                      help="quick setting (default): minutes on 2 CPU cores")
    size.add_argument("--full", dest="setting", action="store_const", const="full",
                      help="the papers' scale (tens of minutes or more)")
    size.add_argument("--tiny", dest="setting", action="store_const", const="tiny",
                      help="smallest setting, seconds (what the tests run)")
    p.add_argument("--out", default="results", help="output root (default results/)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    cli_args.add_progress(p)
    p.add_argument("--list", action="store_true", help="list the experiments and exit")
    p.set_defaults(func=run_reproduce, setting="quick")


def _list() -> str:
    from ..experiments import EXPERIMENTS
    lines = ["experiments (python -m hgtoolkit reproduce NAME [--quick|--full|--tiny]):"]
    for name, exp in EXPERIMENTS.items():
        lines.append(f"  {name:<8} " + textwrap.fill(exp.description, width=88,
                                                      subsequent_indent=" " * 11))
    return "\n".join(lines)


def _report(summary: dict, out: Path, name: str) -> list[str]:
    root = out / name
    lines = [f"{name}: results in {root}/"]
    figures = summary.get("figures") or []
    if figures:
        lines.append(f"  figures ({len(figures)} PNG, each with a PDF beside it):")
        lines += [f"    {f}" for f in figures]
    if summary.get("summary_md"):
        lines.append(f"  summary: {summary['summary_md']}")
    if summary.get("wall_time") is not None:
        lines.append(f"  ({summary['wall_time']:.0f} s, setting {summary.get('setting')}, seed {summary.get('seed')})")
    setting = summary.get("setting")
    if setting and setting != "full":
        from ..experiments import EXPERIMENTS, common
        cut = common.cuts(EXPERIMENTS[name].load().Config, setting)
        if cut:
            lines.append(f"  cut from the papers' scale (--full) in the {setting} setting:")
            lines += [f"    {c}" for c in cut]
    return lines


def run_reproduce(args) -> int:
    from ..experiments import EXPERIMENTS, run_experiment

    if args.list:
        print(_list())
        return 0
    if not args.name:
        raise ValueError("give an experiment name (or --list); choose one of: " + ", ".join(EXPERIMENTS))
    if args.seed < 0:
        raise ValueError(f"--seed must be ≥ 0, got {args.seed}")
    out = Path(args.out)
    summary = run_experiment(args.name, setting=args.setting, out=out, seed=args.seed,
                             progress=args.progress)
    lines = []
    if "parts" in summary:  # composite (demo)
        for part, s in summary["parts"].items():
            lines += _report(s, out, part)
    else:
        lines = _report(summary, out, args.name)
    print("\n".join(lines))
    return 0
