"""Time per move of the live explorer (``hgtoolkit.explore``) at T = 1000 on Beale and Bukin.

    python benchmarks/bench_explore.py [--quick]

For each function: open the explorer (every slider setting of the default grids run as one
batch, at T = 1000), then move each slider through its values (η₀, β, μ, κ, the analysed
method, the horizon T, each 3–4 times, alternating so that a move is a new setting) with the
sliders' own callbacks. A move = looking its four runs up + the exact hypergradient of the
analysed run over T (reverse mode) + the figure's update + its rendering to the PNG the
slider's image widget shows. Wall and process-CPU seconds per move (median and max, per
slider); the target (issue 25) is ≤ 0.5 s per move for T ≤ 1000 on 2 cores. The ratio rows
compare the median move with one ``online.run`` of the same function at T = 1000 (the cost of
re-running one method per move), timed in the same process. 1 torch thread; the load average
before and after is recorded (the machine may be shared).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import torch  # noqa: E402

import common  # noqa: E402

MOVES = {
    "lr": [3e-4, 1e-3, 3e-3, 1e-3],
    "beta": [1e-7, 1e-6, 1e-8, 1e-7],
    "mu": [0.99, "auto", 0.9],
    "kappa": [1e-7, 1e-8, 1e-6],
    "method": ["hd", "rtho", "adaptive_beta", "marthe"],
    "steps": [200, 1000, 500, 1000],
}


def measure(fn: str, quick: bool) -> dict:
    import hgtoolkit
    from hgtoolkit import divergence, online, problems
    w0, c0 = time.perf_counter(), time.process_time()
    e = hgtoolkit.explore(fn, lr=1e-3, beta=1e-7, mu=0.9, kappa=1e-7, method="marthe", steps=1000,
                          widgets=True)
    opened = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
              "runs": len(e._runs)}
    per: dict[str, list] = {}
    for name, values in MOVES.items():
        for v in values[:2] if quick else values:
            e.widgets[name].value = v
            per.setdefault(name, []).append(dict(e.last_move))
    P = problems.from_function(fn)
    single = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        with divergence.recorded():
            online.run(P, "marthe", lr=1e-3, beta=1e-7, mu=0.9, steps=1000)
        single.append(time.perf_counter() - t0)
    return {"open": opened, "moves": per, "online_run_T1000_s": statistics.median(single)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two moves per slider, one baseline run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    rows, raw = [], {}
    for fn in ("beale", "bukin_smooth"):
        m = measure(fn, args.quick)
        raw[fn] = m
        every = [x for moves in m["moves"].values() for x in moves]
        med_wall = statistics.median(x["wall_s"] for x in every)
        med_cpu = statistics.median(x["cpu_s"] for x in every)
        worst = max(x["wall_s"] for x in every)
        rows.append(common.row(f"{fn}: one move, T ≤ 1000 (median over {len(every)} moves, all sliders)",
                               med_wall, "s", "≤ 0.5", med_wall <= 0.5,
                               f"CPU {med_cpu:.3g} s; slowest move {worst:.3g} s wall"))
        for name, moves in m["moves"].items():
            w = statistics.median(x["wall_s"] for x in moves)
            rows.append(common.row(f"{fn}: move of {name}", w, "s", "≤ 0.5", w <= 0.5,
                                   f"CPU {statistics.median(x['cpu_s'] for x in moves):.3g} s; "
                                   f"max {max(x['wall_s'] for x in moves):.3g} s"))
        rows.append(common.row(f"{fn}: median move ÷ one online.run (MARTHE, T = 1000)",
                               med_wall / m["online_run_T1000_s"], "×", None, None,
                               f"online.run {m['online_run_T1000_s']:.3g} s"))
        rows.append(common.row(f"{fn}: opening the explorer ({m['open']['runs']} online runs, one batch, T = 1000)",
                               m["open"]["wall_s"], "s", None, None, f"CPU {m['open']['cpu_s']:.3g} s"))
    env = common.env_info(threads=1)
    env["loadavg_before"], env["loadavg_after"] = list(load_before), list(os.getloadavg())
    path = common.write_results("explore", {"rows": rows, "env": env, "raw": raw})
    print(common.format_table(rows))
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
