"""Sweep throughput: the local executor vs a 2-worker local Ray on the quick MNIST grid, and
the per-task overhead of Ray (``python benchmarks/bench_sweep.py``).

Measured, each into a fresh results directory:

- ``local``: ``sweep.run(grid, executor="local")``, in-process, one torch thread per cell;
- ``ray cold``: the first Ray sweep after ``ray.init(num_cpus=2)``: includes starting the
  worker processes and their first-cell warm-up (torch import, first torch.func call, data);
- ``ray warm``: the same sweep again into another directory, workers already up;
- per-task overhead: N trivial cells (1 step of gradient descent on Beale) run as N one-cell
  task, against the same cells in-process; and Ray's raw no-op task round trip.

Prints a table and writes ``benchmarks/results/sweep.json`` (with the load average: this
machine is shared, so absolute numbers are indicative).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def timed_sweep(grid, results_dir, **kw):
    from hgtoolkit import sweep
    t0 = time.perf_counter()
    report = sweep.run(grid, results_dir, progress=False, **kw)
    wall = time.perf_counter() - t0
    if not report.ok:
        raise RuntimeError(f"sweep failed: {report}")
    recs = sweep.load_results(results_dir, arrays=False)
    cell_times = [r["meta"]["wall_time"] for r in recs]
    return {"cells": len(report.computed), "wall_s": wall, "cells_per_s": len(report.computed) / wall,
            "mean_cell_s": statistics.mean(cell_times), "max_cell_s": max(cell_times),
            "pids": len({r["meta"]["pid"] for r in recs})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default=str(HERE / "grids" / "mnist_quick.yaml"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--overhead-cells", type=int, default=200)
    ap.add_argument("--json", default=str(HERE / "results" / "sweep.json"))
    args = ap.parse_args(argv)

    import ray
    from hgtoolkit import sweep

    grids = sweep.load_grids(args.grid)
    n_cells = len(sweep.unique_cells(grids))
    trivial = sweep.Grid("overhead", {"name": "beale"}, "train",
                         axes={"lr": [1e-5 * (1 + i) for i in range(args.overhead_cells)]},
                         fixed={"steps": 1})
    out: dict = {"grid": os.path.relpath(args.grid, HERE.parent), "cells": n_cells,
                 "workers": args.workers, "cpu_count": os.cpu_count(),
                 "loadavg_before": os.getloadavg(), "python": platform.python_version(),
                 "torch": torch.__version__, "ray": ray.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # in-process first: it also warms the OS file cache for the data
        out["local"] = timed_sweep(grids, tmp / "local")
        timed_sweep(trivial, tmp / "local_trivial_warmup")  # first use of Beale, file cache
        out["local_trivial"] = timed_sweep(trivial, tmp / "local_trivial")

        t0 = time.perf_counter()
        ray.init("local", num_cpus=args.workers, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
        out["ray_init_s"] = time.perf_counter() - t0
        try:
            out["ray_cold"] = timed_sweep(grids, tmp / "ray_cold", executor="ray")
            out["ray_warm"] = timed_sweep(grids, tmp / "ray_warm", executor="ray")
            out["ray_trivial_chunk1"] = timed_sweep(trivial, tmp / "ray_trivial1", executor="ray",
                                                    chunk_size=1)
            out["ray_trivial_one_chunk_per_worker"] = timed_sweep(
                trivial, tmp / "ray_trivial", executor="ray",
                chunk_size=-(-args.overhead_cells // args.workers))

            @ray.remote
            def noop():
                return None

            ray.get([noop.remote() for _ in range(20)])  # warm
            t0 = time.perf_counter()
            ray.get([noop.remote() for _ in range(500)])
            out["ray_noop_task_ms"] = (time.perf_counter() - t0) / 500 * 1e3
        finally:
            ray.shutdown()
        identical = all(sweep.records_equal(a, b) for a, b in
                        zip(sweep.load_results(tmp / "local"), sweep.load_results(tmp / "ray_warm")))
    out["records_identical_local_vs_ray"] = identical
    # N one-cell tasks vs W tasks of N/W cells, on W warm workers: the difference is N − W
    # task overheads spread over W workers
    n, w = args.overhead_cells, args.workers
    cell = out["local_trivial"]["wall_s"] / n
    extra = out["ray_trivial_chunk1"]["wall_s"] - out["ray_trivial_one_chunk_per_worker"]["wall_s"]
    out["per_task_overhead_ms"] = extra * w / (n - w) * 1e3
    out["trivial_cell_local_ms"] = cell * 1e3
    # per cell, beyond the cell's own compute: two fsync'd files + a log line + bookkeeping
    out["store_ms_per_cell"] = (cell - out["local_trivial"]["mean_cell_s"]) * 1e3
    # busy fraction: cells/s ÷ (W / mean cell time) — how much of the workers' time went into
    # cells (1 = no scheduling, store or start-up loss); and how much slower a cell ran in a
    # worker than in-process (CPU contention: W workers + driver + other load on the cores)
    for key in ("ray_cold", "ray_warm"):
        r = out[key]
        r["busy_fraction"] = r["cells_per_s"] * r["mean_cell_s"] / w
        r["cell_slowdown_vs_local"] = r["mean_cell_s"] / out["local"]["mean_cell_s"]
    out["speedup_warm"] = out["ray_warm"]["cells_per_s"] / out["local"]["cells_per_s"]
    out["speedup_cold"] = out["ray_cold"]["cells_per_s"] / out["local"]["cells_per_s"]
    out["loadavg_after"] = os.getloadavg()

    rows = [("local (in-process, 1 thread)", out["local"]),
            (f"ray {w} workers, cold (incl. worker start)", out["ray_cold"]),
            (f"ray {w} workers, warm", out["ray_warm"])]
    print(f"\nquick MNIST grid: {n_cells} cells ({out['grid']}); ray.init {out['ray_init_s']:.1f} s; "
          f"load average {out['loadavg_before'][0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| executor | wall (s) | cells/s | speed-up | mean cell (s) | workers busy | processes |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        busy = f"{r['busy_fraction']:.0%}" if "busy_fraction" in r else "–"
        print(f"| {name} | {r['wall_s']:.1f} | {r['cells_per_s']:.3f} | "
              f"{r['cells_per_s'] / out['local']['cells_per_s']:.2f}× | {r['mean_cell_s']:.2f} | "
              f"{busy} | {r['pids']} |")
    print(f"\nstore + bookkeeping per cell: {out['store_ms_per_cell']:.1f} ms (in-process, of "
          f"{cell * 1e3:.1f} ms per trivial cell)")
    print(f"per-task overhead (difference of two runs of {n} trivial cells; noise is a few ms): "
          f"{out['per_task_overhead_ms']:.1f} ms per task; one chunk per worker: "
          f"{out['ray_trivial_one_chunk_per_worker']['cells_per_s']:.1f} cells/s vs one cell per task: "
          f"{out['ray_trivial_chunk1']['cells_per_s']:.1f} cells/s vs local "
          f"{out['local_trivial']['cells_per_s']:.1f} cells/s; "
          f"Ray no-op task {out['ray_noop_task_ms']:.2f} ms")
    print(f"records identical (local vs ray): {identical}")
    from hgtoolkit import records
    sys.path.insert(0, str(HERE))
    import common  # noqa: E402  (benchmarks/common.py: the date and machine, as every benchmark records them)
    out["env"] = common.env_info(threads=1)
    records.atomic_write_json(args.json, out)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
