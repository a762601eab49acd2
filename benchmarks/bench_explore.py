"""Time per move of the live explorer (``hgtoolkit.explore``) at T = 1000 on Beale and Bukin.

    python benchmarks/bench_explore.py [--quick] [--baseline REV]

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

``--baseline REV`` (e.g. ``main``): also open the explorer of ``git show REV:hgtoolkit/explore.py``
(loaded beside this checkout's, on this checkout's library: REV must be API-compatible with it)
and make every move on both, interleaved (candidate then baseline, then the other way round),
so that both see the same machine load; the rows then give the baseline's median and slowest
move and the median of the per-move ratios candidate ÷ baseline.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import torch  # noqa: E402

import common  # noqa: E402

MOVES = {
    "lr": [3e-4, 1e-3, 3e-3, 1e-3],
    "hypergrad_lr": [1e-7, 1e-6, 1e-8, 1e-7],
    "mu": [0.99, "auto", 0.9],
    "kappa": [1e-7, 1e-8, 1e-6],
    "method": ["hd", "rtho", "adaptive_hypergrad_lr", "marthe"],
    "steps": [200, 1000, 500, 1000],
}


ROOT = Path(__file__).resolve().parent.parent


def load_baseline(rev: str):
    """The module ``hgtoolkit/explore.py`` as of git revision ``rev``, loaded as the submodule
    ``hgtoolkit.explore_baseline`` (its relative imports: this checkout's package)."""
    source = subprocess.run(["git", "show", f"{rev}:hgtoolkit/explore.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="explore_baseline_")) / "explore_baseline.py"
    path.write_text(source)
    import hgtoolkit  # noqa: F401  (the parent package)
    spec = importlib.util.spec_from_file_location("hgtoolkit.explore_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _open(module, fn: str):
    w0, c0 = time.perf_counter(), time.process_time()
    e = module.explore(fn, lr=1e-3, hypergrad_lr=1e-7, mu=0.9, kappa=1e-7, method="marthe", steps=1000, widgets=True)
    return e, {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "runs": len(e._runs)}


def measure(fn: str, quick: bool, baseline=None) -> dict:
    import hgtoolkit.explore
    from hgtoolkit import divergence, online, problems
    explore_module = sys.modules["hgtoolkit.explore"]
    e, opened = _open(explore_module, fn)
    b, b_opened = _open(baseline, fn) if baseline is not None else (None, None)
    per: dict[str, list] = {}
    base: dict[str, list] = {}
    i = 0
    for name, values in MOVES.items():
        for v in values[:2] if quick else values:
            pair = [(e, per), (b, base)] if b is not None else [(e, per)]
            for explorer, out in pair[::-1] if i % 2 else pair:  # ABBA: neither always moves first
                explorer.widgets[name].value = v
                out.setdefault(name, []).append(dict(explorer.last_move))
            i += 1
    P = problems.from_function(fn)
    single = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        with divergence.recorded():
            online.run(P, "marthe", lr=1e-3, hypergrad_lr=1e-7, mu=0.9, steps=1000)
        single.append(time.perf_counter() - t0)
    out = {"open": opened, "moves": per, "online_run_T1000_s": statistics.median(single)}
    if b is not None:
        out.update(baseline_open=b_opened, baseline_moves=base)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two moves per slider, one baseline run")
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="also move the explorer of git revision REV, interleaved (A/B)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    baseline = load_baseline(args.baseline) if args.baseline else None
    load_before = os.getloadavg()
    rows, raw = [], {}
    for fn in ("beale", "bukin_smooth"):
        m = measure(fn, args.quick, baseline)
        raw[fn] = m
        every = [x for moves in m["moves"].values() for x in moves]
        med_wall = statistics.median(x["wall_s"] for x in every)
        med_cpu = statistics.median(x["cpu_s"] for x in every)
        worst = max(x["wall_s"] for x in every)
        rows.append(common.row(f"{fn}: one move, T ≤ 1000 (median over {len(every)} moves, all sliders)",
                               med_wall, "s", "≤ 0.5", med_wall <= 0.5,
                               f"CPU {med_cpu:.3g} s; slowest move {worst:.3g} s wall"))
        rows.append(common.row(f"{fn}: slowest of the {len(every)} moves", worst, "s", "≤ 0.5", worst <= 0.5,
                               "wall; every move ≤ 0.5 s is the target"))
        for name, moves in m["moves"].items():
            w = statistics.median(x["wall_s"] for x in moves)
            rows.append(common.row(f"{fn}: move of {name}", w, "s", "≤ 0.5", w <= 0.5,
                                   f"CPU {statistics.median(x['cpu_s'] for x in moves):.3g} s; "
                                   f"max {max(x['wall_s'] for x in moves):.3g} s"))
        if baseline is not None:
            other = [x for moves in m["baseline_moves"].values() for x in moves]
            b_med = statistics.median(x["wall_s"] for x in other)
            ratios = [x["wall_s"] / y["wall_s"] for x, y in zip(every, other)]
            rows.append(common.row(f"{fn}: one move of {args.baseline}'s explorer (interleaved, median over "
                                   f"{len(other)} moves)", b_med, "s", "≤ 0.5", b_med <= 0.5,
                                   f"CPU {statistics.median(x['cpu_s'] for x in other):.3g} s; slowest move "
                                   f"{max(x['wall_s'] for x in other):.3g} s wall"))
            rows.append(common.row(f"{fn}: move ÷ the same move of {args.baseline}'s explorer (median of "
                                   f"{len(ratios)} interleaved pairs)", statistics.median(ratios), "×", None, None,
                                   f"range {min(ratios):.2f}–{max(ratios):.2f}; μ slider "
                                   f"{statistics.median(x['wall_s'] for x in m['moves']['mu']):.3g} s vs "
                                   f"{statistics.median(x['wall_s'] for x in m['baseline_moves']['mu']):.3g} s"))
        rows.append(common.row(f"{fn}: median move ÷ one online.run (MARTHE, T = 1000)",
                               med_wall / m["online_run_T1000_s"], "×", None, None,
                               f"online.run {m['online_run_T1000_s']:.3g} s"))
        rows.append(common.row(f"{fn}: opening the explorer ({m['open']['runs']} online runs, one batch, T = 1000)",
                               m["open"]["wall_s"], "s", None, None, f"CPU {m['open']['cpu_s']:.3g} s"))
    env = common.env_info(threads=1)
    env["loadavg_before"], env["loadavg_after"] = list(load_before), list(os.getloadavg())
    path = common.write_results("explore", {"rows": rows, "env": env, "quick": args.quick,
                                            "baseline": args.baseline, "raw": raw})
    print(common.format_table(rows))
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
