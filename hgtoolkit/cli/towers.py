"""``python -m hgtoolkit towers``: run a hyperoptimizer tower on a problem, record every
hyperparameter at every level, write ``<out>/<name>.json`` and ``<out>/<name>.png``.

    python -m hgtoolkit towers --problem mnist_mlp \\
        --tower "sgd(lr=0.01, momentum=0.5) / adam(lr=1e-3) / sgd(lr=1e-4)" --steps 500
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

DEFAULT_TOWER = "sgd(lr=0.01) / sgd(lr=1e-4)"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "towers", help="run a hyperoptimizer tower and plot every learnt hyperparameter",
        description="Hyperoptimizer towers (Chandra et al.): each level learns the hyperparameters "
                    "of the level below by one-step hypergradients. Writes JSON + PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--problem", default="mnist_mlp",
                   help="problem name: a test function (beale, bukin_smooth, rosenbrock, ...), "
                        "mnist_mlp or synthetic_mlp")
    p.add_argument("--tower", default=DEFAULT_TOWER,
                   help="levels from the base up, e.g. 'sgd(lr=0.01, momentum=0.9) / adam(lr=1e-3) / "
                        "sgd(lr=1e-4)'; optimizers sgd, adam, adagrad, rmsprop; tune=lr+momentum "
                        "restricts what the next level learns")
    p.add_argument("--steps", type=int, default=500, help="training steps T")
    p.add_argument("--seed", type=int, default=0, help="initial weights / minibatch order (MLP problems)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=None,
                   help="default: float64 for test functions, float32 for mnist_mlp")
    p.add_argument("--out", default="results/towers", help="output folder")
    p.add_argument("--name", default=None, help="file stem (default: towers_<problem>_h<height>)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="progress bars (--no-progress turns them off)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .. import plotting, problems, towers
    from ..errors import DivergenceWarning

    tower = towers.parse(args.tower)
    if args.steps < 1:
        raise ValueError(f"--steps must be ≥ 1, got {args.steps}")
    kwargs = {}
    if args.dtype is not None:
        kwargs["dtype"] = getattr(torch, args.dtype)
    if args.problem in ("mnist_mlp", "synthetic_mlp"):
        kwargs["seed"] = args.seed
    problem = problems.get(args.problem, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)  # reported below, and in the record
        result = towers.run(problem, tower, args.steps, progress=args.progress)
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
    if result.divergence is not None:
        print(f"warning: {result.divergence} (flagged in {json_path})", file=sys.stderr)
        return 1
    return 0
