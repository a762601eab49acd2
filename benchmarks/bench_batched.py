"""Batched online sweeps (``hgtoolkit.batched.run_online_batch``) vs a Python loop of
``hgtoolkit.online.run`` calls, for the same cells (seeds × β).

Problems (same cells on each: MARTHE with the adaptive μ, objective = validation loss, SGD):

- ``tiny``: a float64 MLP 5-8-3 on 64/32 Gaussian points (batch 16): per-run work is tiny,
  so a loop pays Python/dispatch overhead per run and step, which vmap pays once;
- ``mlp100``: the MNIST MLP with 3×100 hidden units (float32, batch 100, 700 validation images);
- ``mnist``: the MARTHE Sec. 5 model, 3×500 MLP (float32): per-run work is large matrix
  products, already compute-bound in a single run.

For each: the 4 seeds × 4 β sweep (R = 16) timed both ways, round-robin (``common.interleaved``,
median of per-round ratios, 1 torch thread unless ``--threads``); the batched sweep at R = 160
(20 seeds × 8 β) measured directly on ``tiny`` and projected (per-run cost × 160) for the
others; and the largest difference between the two ways' numbers (η_t and E). The
hyper-update is part of the vmapped ``Engine.update`` (no per-run Python work).

    .venv/bin/python benchmarks/bench_batched.py [--quick] [--threads 1] [--steps 20]

Writes ``benchmarks/results/batched.json`` (rows + env) and prints a table.
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
from common import interleaved, report, row  # noqa: E402

from hgtoolkit import batched, online, problems  # noqa: E402
from hgtoolkit.errors import DivergenceWarning  # noqa: E402

BETAS = {"tiny": (1e-3, 3e-3, 1e-2, 3e-2), "mlp100": (1e-3, 3e-3, 1e-2, 3e-2),
         "mnist": (1e-3, 3e-3, 1e-2, 3e-2)}


def factory(name: str):
    """``problem_factory(seed)``: the data are loaded once and shared by every seed."""
    if name == "tiny":
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 5, generator=g, dtype=torch.float64)
        y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
        return lambda s: problems.classification_mlp(x[:64], y[:64], x[64:], y[64:], hidden=(8,),
                                                     batch_size=16, seed=s)
    from hgtoolkit import data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = data.mnist(n_train=7000, n_val=700, seed=0)
    hidden = (100, 100, 100) if name == "mlp100" else (500, 500, 500)
    return lambda s: problems.classification_mlp(ds.x_train, ds.y_train, ds.x_val, ds.y_val, hidden=hidden,
                                                 batch_size=100, seed=s, name="mnist_mlp",
                                                 info={"data": ds.source})


def cells(n_seeds: int, betas, steps: int) -> list[dict]:
    return [dict(method="marthe", mu="auto", lr=0.05, hypergrad_lr=b, steps=steps, seed=s, eval_every=10)
            for s in range(n_seeds) for b in betas]


def loop(fac, cs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        return [online.run(fac(c["seed"]), **c, keep_params=False) for c in cs]


def vmapped(fac, cs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        return batched.run_online_batch(fac, cs)


def max_difference(a, b) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        for k in ("lrs", "val_losses"):
            u, v = getattr(x, k), getattr(y, k)
            if u.shape != v.shape:
                return float("inf")
            d = np.abs(u - v)
            worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny + mlp100, 1 round, few steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20, help="T of the MNIST sweeps (tiny: 5×)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ("tiny", "mlp100") if args.quick else ("tiny", "mlp100", "mnist")
    repeats = 1 if args.quick else args.repeats
    load_before = os.getloadavg()
    rows, details = [], {}
    for name in names:
        fac = factory(name)
        T = (5 if name == "tiny" else 1) * (args.steps if not args.quick else 10)
        cs = cells(4, BETAS[name], T)
        reps = repeats if name != "mnist" else max(1, repeats - 1)
        res = interleaved(lambda: loop(fac, cs), {"batched": lambda: vmapped(fac, cs)}, reps, warmup=1)
        b, base = res["batched"], res["baseline"]
        diff = max_difference(loop(fac, cs), vmapped(fac, cs))
        d = {"T": T, "runs": len(cs), "loop_s": base["wall_s"], "batched_s": b["wall_s"],
             "speedup_wall": 1 / b["ratio_wall"], "speedup_cpu": 1 / b["ratio_cpu"],
             "max_abs_difference": diff,
             "loop_per_run_s": base["wall_s"] / len(cs), "batched_per_run_s": b["wall_s"] / len(cs)}
        if name == "tiny":  # 20 seeds × 8 β measured directly
            big = cells(20, np.geomspace(1e-3, 3e-2, 8).tolist(), T)
            t0 = time.perf_counter()
            vmapped(fac, big)
            d["batched_160_s"] = time.perf_counter() - t0
            d["batched_160_measured"] = True
        else:  # compute-bound: cost per run measured at R = 16
            d["batched_160_s"] = d["batched_per_run_s"] * 160
            d["batched_160_measured"] = False
        d["loop_160_s"] = d["loop_per_run_s"] * 160
        d["speedup_160"] = d["loop_160_s"] / d["batched_160_s"]
        details[name] = d
        label = {"tiny": "tiny MLP 5-8-3 float64", "mlp100": "MNIST MLP 3×100 float32",
                 "mnist": "MNIST MLP 3×500 float32 (MARTHE Sec. 5)"}[name]
        rows.append(row(f"speed-up batched vs loop, 4 seeds × 4 β, {label}, T={T} ({args.threads} thread)",
                        d["speedup_wall"], "×", note=f"loop {d['loop_s']:.2f} s, batched {d['batched_s']:.2f} s; "
                        f"CPU-time ratio {d['speedup_cpu']:.2f}×; largest difference in η_t, E: {diff:.1e}"))
        rows.append(row(f"20 seeds × 8 β (160 runs), {label}, T={T}", d["speedup_160"], "×",
                        note=(f"{'measured' if d['batched_160_measured'] else 'projected from R=16'}: "
                              f"batched {d['batched_160_s']:.1f} s vs loop {d['loop_160_s']:.1f} s "
                              "(loop projected from R=16)")))
        print(f"{name}: {d}", flush=True)
    return report("batched", rows, {"details": details}, load_before, args.threads)


if __name__ == "__main__":
    sys.exit(main())
