"""``python -m hgtoolkit towers``: run a hyperoptimizer tower on a problem, record every
hyperparameter at every level, write ``<out>/<name>.json`` and ``<out>/<name>.png``.

    python -m hgtoolkit towers --problem mnist_mlp \\
        --tower "sgd(lr=0.01, momentum=0.5) / adam(lr=1e-3) / sgd(lr=1e-4)" --steps 500
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .. import divergence
from ..settings import TowerSettings, add_arguments
from . import args as cli_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "towers", help="run a hyperoptimizer tower and plot every learnt hyperparameter",
        description="Hyperoptimizer towers (Chandra et al.): each level learns the hyperparameters "
                    "of the level below by one-step hypergradients. Writes JSON + PNG.")
    cli_args.add_problem(p, "mnist_mlp", problem_args=False, device=False,
                         dtype_help="default: float64 for test functions, float32 for mnist_mlp")
    add_arguments(p, TowerSettings)
    p.add_argument("--seed", type=int, default=0,
                   help="initial weights / minibatch order, for problems that take a seed (default 0)")
    cli_args.add_out(p, "towers")
    p.add_argument("--name", default=None, help="file stem (default: towers_<problem>_h<height>)")
    cli_args.add_progress(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import plotting, problems, towers

    tower = towers.parse(args.tower)
    takes_seed = "seed" in problems.parameters(args.problem)
    problem = cli_args.make_problem(args, **({"seed": args.seed} if takes_seed else {}))
    with divergence.recorded() as seen:  # reported below, and in the record
        result = towers.run(problem, tower, args.steps, progress=args.progress,
                            divergence_factor=args.divergence_factor)
    name = args.name or f"towers_{re.sub(r'[^A-Za-z0-9_.-]', '_', args.problem)}_h{tower.height}"
    out = Path(args.out)
    json_path = result.save(out / f"{name}.json")
    axes = plotting.plot_tower_history(result)
    fig = axes[0].figure
    fig.tight_layout()
    png_path = out / f"{name}.png"
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    lrs = result.history.lrs
    print(f"{tower}: {args.steps} steps on {problem.name}; base lr {lrs[0]:.4g} → {lrs[-1]:.4g}; "
          f"final validation loss {result.value:.6g}"
          + (f", metrics {result.metrics}" if result.metrics else ""))
    print(f"wrote {json_path} and {png_path}")
    if seen:
        print(f"warning: tower {tower}: {seen[0].message} (flagged in {json_path})", file=sys.stderr)
        return 1
    return 0
