"""LRS-OPT cost to the optimum: how many exact hypergradients (and how much wall time) outer
gradient descent (the MARTHE paper's choice), Adam and L-BFGS-B need to get within 1 % of the
best validation loss any of them found, on the quick MNIST setting; and the projected time of
the paper's full Section-5 setting on this CPU.

Setting (``hgtoolkit.experiments.mnist.Config.quick()``): 3×500 ReLU MLP, SGD, batch 100,
T = 100 steps, float32, seed 0, starting from the constant schedule η_t = 0.1, objective
f(η) = E(w_T) (validation loss). The minibatch order is kept FIXED here (no resampling), so f
is one deterministic function that every outer optimizer minimises (L-BFGS-B needs that).
Every exact hypergradient evaluation (``hgtoolkit.exact.hypergradient``, reverse mode) is
logged with its value and time, L-BFGS-B's line-search trials included. The target is
f* = the lowest value seen in any run, and a run "gets there" at its first evaluation with
f ≤ f* + 1 % |f*|.

Projection: the cost of one hypergradient evaluation is measured at T = 100 and T = 500 (the
paper's T); the full setting is 5000 outer steps × 4 seeds (LRS-OPT; the paper: > 2 h per run
on an M40 GPU) plus the online sweep (20 seeds × the β grid).

    .venv/bin/python benchmarks/bench_lrsopt.py [--quick] [--evals 25] [--threads 1]

Writes ``benchmarks/results/lrsopt.json`` and prints a table.

The full-scale study (T = 500, L-BFGS-B × 4 seeds on fixed minibatches, Adam on resampled
ones) is the resumable experiment ``python -m hgtoolkit reproduce lrsopt --full --out DIR``;
``--from-experiment DIR/lrsopt`` turns its ``summary.json`` into this benchmark's rows
(``benchmarks/results/lrsopt_full.json``) without recomputing anything.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import env_info, format_table, report, row, write_results  # noqa: E402

from hgtoolkit import exact, lrsopt, online  # noqa: E402
from hgtoolkit.experiments import mnist, mnist_cells  # noqa: E402


class EvaluationLog:
    """Wraps ``lrsopt.hypergradient`` to log (seconds since start, f) of every evaluation."""

    def __init__(self):
        self.calls: list[tuple[float, float]] = []
        self._original = lrsopt.hypergradient
        self.start = time.perf_counter()

    def __enter__(self):
        def logged(*a, **k):
            r = self._original(*a, **k)
            self.calls.append((time.perf_counter() - self.start, float(r.value)))
            return r
        lrsopt.hypergradient = logged
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        lrsopt.hypergradient = self._original


def run_outer(problem, T: int, init: float, name: str, optimizer: str, lr, evals: int) -> dict:
    """One LRS-OPT run with a budget of ``evals`` hypergradient evaluations."""
    with EvaluationLog() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = lrsopt.optimize_schedule(problem, torch.full((T,), init, dtype=problem.dtype), evals - 1, lr,
                                       optimizer, resample_batches=False, progress=False,
                                       outer_options={"maxfun": evals} if optimizer == "lbfgsb" else None)
    calls = log.calls[:evals]
    return {"name": name, "optimizer": optimizer, "outer_lr": lr, "times": [c[0] for c in calls],
            "values": [c[1] for c in calls], "status": res.status, "outer_steps": res.outer_steps_done,
            "n_evaluations": res.n_evaluations, "best_value": res.best_value, "final_lrs": res.final_lrs.tolist()}


def hypergradient_seconds(problem, T: int, repeats: int = 2) -> float:
    lrs = torch.full((T,), 0.1, dtype=problem.dtype)
    exact.hypergradient(problem, lrs[:5])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        exact.hypergradient(problem, lrs)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def online_seconds(problem, T: int) -> float:
    cell = mnist_cells.cell_params(mnist.Config.full(), mnist.method_specs(mnist.Config.full())[-1], 1e-3, 0)
    cell["steps"] = T
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        online.run(problem, **cell, keep_params=False)
    return time.perf_counter() - t0


def full_scale_rows(summary: dict) -> list:
    """Rows of the full-scale experiment's summary (per run: evaluations and minutes to within
    1 % of the run's best f, total, final accuracy)."""
    rows = []
    for name, m in summary["runs"].items():
        w = m["within_1pct"]
        outer = "L-BFGS-B, fixed minibatches" if m["kind"] == "lbfgsb" else "Adam, resampled minibatches"
        rows.append(row(f"LRS-OPT full scale, {outer}, seed {m['seed']}: evaluations to within 1 % of best f",
                        w["evaluations"], "evals",
                        note=f"{w['seconds'] / 60:.1f} min to 1 %; {m['n_evaluations']} evaluations, "
                             f"{m['wall_time'] / 60:.1f} min in all ({m['seconds_per_evaluation']:.1f} s each); "
                             f"f {m['f_initial']:.4f} → {m['best_value']:.4f}; val. accuracy "
                             f"{m['replay']['initial']['val_accuracy']:.3f} → {m['replay']['final']['val_accuracy']:.3f}; "
                             f"{m['status']}"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-experiment", default=None, metavar="DIR",
                    help="tabulate a finished `reproduce lrsopt` run (its output folder) and exit")
    ap.add_argument("--quick", action="store_true", help="smoke run: T = 20, 8 evaluations")
    ap.add_argument("--evals", type=int, default=25, help="hypergradient evaluations per run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.from_experiment:
        from hgtoolkit import records
        folder = Path(args.from_experiment)
        # the finished runs (summary.json appears only once all runs are done)
        summary = {"runs": {p.name.split(".")[0]: records.read_json(p)
                            for p in sorted((folder / "data" / "runs").glob("*.summary.json"))}}
        summary["threads"] = (records.read_json(folder / "config.json").get("config", {}).get("threads")
                              if (folder / "config.json").exists() else None)
        rows = full_scale_rows(summary)
        path = write_results("lrsopt_full", {"rows": rows, "summary": summary, "env": env_info(summary.get("threads"))})
        print(format_table(rows))
        print(f"\nwrote {path}")
        return 0
    torch.set_num_threads(args.threads)
    quick = mnist.Config.quick()
    T = 20 if args.quick else quick.steps
    evals = 8 if args.quick else args.evals
    problem = mnist.problem(quick, 0)
    load_before = os.getloadavg()

    # outer optimizers: GD (the paper's) and Adam at three step sizes, L-BFGS-B (no step size)
    configs = [("GD α=0.01", "sgd", 0.01), ("GD α=0.03", "sgd", 0.03), ("GD α=0.1", "sgd", 0.1),
               ("Adam α=0.003", "adam", 0.003), ("Adam α=0.01", "adam", 0.01), ("Adam α=0.03", "adam", 0.03),
               ("L-BFGS-B", "lbfgsb", None)]
    if args.quick:
        configs = [configs[1], configs[4], configs[6]]
    runs = []
    for name, opt, lr in configs:
        r = run_outer(problem, T, quick.lrsopt_init, name, opt, lr, evals)
        runs.append(r)
        print(f"{name}: f {r['values'][0]:.4f} → best {min(r['values']):.4f} in {len(r['values'])} evaluations, "
              f"{r['times'][-1]:.0f} s ({r['status']})", flush=True)
    best = min(min(r["values"]) for r in runs)
    target = best + 0.01 * abs(best)
    rows = []
    for r in runs:
        r["best_seen"] = min(r["values"])
        for pct in (1, 5, 10):
            hit = next((i for i, v in enumerate(r["values"]) if v <= best + pct / 100 * abs(best)), None)
            r[f"evaluations_to_{pct}pct"] = None if hit is None else hit + 1
            r[f"seconds_to_{pct}pct"] = None if hit is None else r["times"][hit]
        hit = r["evaluations_to_1pct"]
        within = ", ".join(f"{pct} %: {r[f'evaluations_to_{pct}pct'] or '—'}" for pct in (5, 10))
        rows.append(row(f"LRS-OPT {r['name']}: hypergradients to within 1 % of best f, quick MNIST T={T}",
                        hit, "evals",
                        note=(f"{r['seconds_to_1pct']:.0f} s" if hit is not None else
                              f"not reached in {len(r['values'])} evaluations") +
                             f"; to within {within}; best f {r['best_seen']:.4f} (f* = {best:.4f}, "
                             f"f(η⁰) = {r['values'][0]:.4f})"))

    # cost per hypergradient and the projection of the paper's full setting
    t_quick = float(np.median(np.diff([0.0] + runs[0]["times"])))
    t500 = hypergradient_seconds(problem, 500 if not args.quick else 40) * (1 if not args.quick else 500 / 40)
    full = mnist.Config.full()
    lrsopt_h = full.lrsopt_steps * t500 / 3600
    online_500 = online_seconds(problem, 500 if not args.quick else 20) * (1 if not args.quick else 25)
    n_online = full.n_seeds * sum(len(s["values"]) for s in mnist.method_specs(full))
    rows += [
        row(f"one exact hypergradient, T={T} (quick)", t_quick, "s", note="median over GD's evaluations"),
        row("one exact hypergradient, T=500 (paper)", t500, "s",
            note="measured" if not args.quick else "extrapolated from T=40"),
        row("projected LRS-OPT run, 5000 outer steps, T=500", lrsopt_h, "h",
            note=f"paper: > 2 h on one M40 GPU; here {args.threads} CPU thread; × {full.lrsopt_seeds} seeds "
                 f"= {lrsopt_h * full.lrsopt_seeds:.0f} h (÷ workers)"),
        row("one online MARTHE run, T=500", online_500, "s", note="paper: < 1 min on the GPU"),
        row(f"projected online sweep of the full setting ({n_online} runs)", n_online * online_500 / 3600, "h",
            note="batching does not reduce this for the 3×500 MLP (compute-bound; see bench_batched)"),
    ]
    payload = {"runs": runs, "best_value": best, "target": target, "T": T, "init": quick.lrsopt_init,
               "problem": problem.describe()}
    return report("lrsopt", rows, payload, load_before, args.threads)


if __name__ == "__main__":
    sys.exit(main())
