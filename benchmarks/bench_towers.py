"""Per-step cost and memory of hyperoptimizer towers on the MNIST MLP (float32, CPU).

Side by side, on the same 3×500 MLP, initial weights and minibatches
(``hgtoolkit.problems.mnist_mlp()``, loss through ``problem.train_loss``):

- the plain base optimizer (``torch.optim.SGD`` / ``torch.optim.Adam``);
- ``hgtoolkit.towers`` drop-in optimizers of height 1, 2, 3;
- the PyPI package ``gradient-descent-the-ultimate-optimizer`` (Chandra et al.'s reference
  implementation, import ``gradient_descent_the_ultimate_optimizer``) with the same stacks,
  driven as its README says (``begin``, ``zero_grad``, ``backward(create_graph=True)``, ``step``)
  by ``tests/peers.py`` (``GdtuoTower``), the driver tests/test_peers.py checks it with.

Time: per-iteration wall time and CPU (process) time (zero_grad + forward + backward +
optimizer step), median over ``--steps`` steps after ``--warmup`` in each of ``--repeats``
rounds. All configurations advance together, one step each in turn, so that load changes on a
shared machine hit them alike. Memory: each configuration in a fresh subprocess: peak RSS over
the training steps (VmHWM reset after data loading) and, after N and 2N steps, RSS and the live
tensors reachable from Python (count and bytes; tensors saved inside an autograd graph are not
Python objects and show only in RSS) — growth with the number of steps shows up as a
difference between N and 2N. Numerics: the SGD towers of both implementations are compared
step by step (learnt LR trajectories, final weights), in float32 and in float64.

    .venv/bin/python benchmarks/bench_towers.py [--steps 30 --warmup 5 --repeats 3]

Writes ``benchmarks/results/towers.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))  # peers.py: the gdtuo driver the tests use

import peers  # noqa: E402
from hgtoolkit import problems, towers  # noqa: E402
from hgtoolkit.records import atomic_write_json  # noqa: E402

try:
    peers.require("gdtuo")
    HAVE_GDTUO = True
except ImportError:  # optional here: pip install gradient-descent-the-ultimate-optimizer (extra "dev")
    HAVE_GDTUO = False

# gdtuo's stacks are built from the same specs (peers.gdtuo_stack): SGD → gdtuo.SGD, Adam → gdtuo.Adam
FAMILIES = {
    "sgd": {"torch": lambda ps: torch.optim.SGD(ps, lr=0.05),
            "towers": ["sgd(lr=0.05)", "sgd(lr=0.05) / sgd(lr=0.01)",
                       "sgd(lr=0.05) / sgd(lr=0.01) / sgd(lr=0.0001)"]},
    "adam": {"torch": lambda ps: torch.optim.Adam(ps, lr=1e-3),
             "towers": ["adam(lr=0.001)", "adam(lr=0.001) / sgd(lr=1e-07)",
                        "adam(lr=0.001) / sgd(lr=1e-07) / sgd(lr=1e-12)"]},
}


def configs() -> list[tuple[str, str, str, int]]:
    """(key, family, implementation, height)."""
    out = []
    for fam, spec in FAMILIES.items():
        out.append((f"{fam}/torch.optim", fam, "torch.optim", 1))
        for h in (1, 2, 3):
            out.append((f"{fam}/hgtoolkit/h{h}", fam, "hgtoolkit", h))
        if HAVE_GDTUO:
            for h in (1, 2, 3):
                out.append((f"{fam}/gdtuo/h{h}", fam, "gdtuo", h))
    return out


class Runner:
    """One configuration: ``step(t)`` does one full training iteration on minibatch t (gdtuo and
    the hgtoolkit drop-in: the drivers of tests/peers.py)."""

    def __init__(self, problem, family: str, impl: str, height: int):
        self.problem, self.impl = problem, impl
        fam = FAMILIES[family]
        if impl == "torch.optim":
            self.params = {k: v.clone().requires_grad_() for k, v in problem.params0.items()}
            self.opt = fam["torch"](list(self.params.values()))
        else:
            tower = towers.parse(fam["towers"][height - 1])
            self.peer = peers.GdtuoTower(problem, tower) if impl == "gdtuo" else peers.TowerDropIn(problem, tower)

    def step(self, t: int) -> float:
        if self.impl != "torch.optim":
            return self.peer.step(t)
        self.opt.zero_grad()
        loss = self.problem.train_loss(self.params, t)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def lrs(self) -> list[float]:
        """Current learning rate of every level (base first)."""
        if self.impl == "torch.optim":
            return [self.opt.param_groups[0]["lr"]]
        return self.peer.lrs()

    def weights(self) -> list[torch.Tensor]:
        if self.impl == "torch.optim":
            return [p.detach() for p in self.params.values()]
        return self.peer.weights()


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0), so the peak excludes data loading."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _live_tensors() -> tuple[int, float]:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    seen, total = set(), 0
    for t in ts:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return len(ts), total / 2**20


def memory_probe(key: str, steps: int) -> dict:
    """Run in a fresh process: peak RSS over the steps and live tensors after N and 2N steps."""
    _, family, impl, height = next(c for c in configs() if c[0] == key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = problems.mnist_mlp()
    problem.train_loss(problem.params0, 0)  # load data, build caches
    gc.collect()
    reset = _reset_peak_rss()
    rss0 = _status_mb("VmRSS")
    r = Runner(problem, family, impl, height)
    out = {"rss_start_mb": rss0, "peak_reset": reset}
    t = 0
    for n in (steps, 2 * steps):
        while t < n:
            r.step(t)
            t += 1
        count, mb = _live_tensors()
        out[f"after_{n}"] = {"rss_mb": _status_mb("VmRSS"), "live_tensors": count, "live_tensor_mb": mb}
    out["peak_rss_above_start_mb"] = _status_mb("VmHWM") - rss0
    a, b = out[f"after_{steps}"], out[f"after_{2 * steps}"]
    out["tensor_growth_mb"] = b["live_tensor_mb"] - a["live_tensor_mb"]
    out["tensor_count_growth"] = b["live_tensors"] - a["live_tensors"]
    out["rss_growth_mb"] = b["rss_mb"] - a["rss_mb"]
    return out


def timing(problem, steps: int, warmup: int, repeats: int) -> dict:
    """Per-step wall and CPU (process) time. All configurations advance together, one step each
    in turn (order rotated every step), so load changes on a shared machine hit all alike."""
    cfgs = configs()
    wall: dict[str, list[float]] = {c[0]: [] for c in cfgs}
    cpu: dict[str, list[float]] = {c[0]: [] for c in cfgs}
    for rnd in range(repeats):
        runners = {key: Runner(problem, family, impl, height) for key, family, impl, height in cfgs}
        keys = list(runners)
        for t in range(warmup + steps):
            for key in keys[t % len(keys):] + keys[:t % len(keys)]:
                w0, c0 = time.perf_counter(), time.process_time()
                runners[key].step(t)
                if t >= warmup:
                    wall[key].append(time.perf_counter() - w0)
                    cpu[key].append(time.process_time() - c0)
        del runners
        gc.collect()
        print(f"  timing round {rnd + 1}/{repeats} done", file=sys.stderr)
    return {k: {"median_wall_ms": 1e3 * statistics.median(wall[k]),
                "median_cpu_ms": 1e3 * statistics.median(cpu[k]),
                "p25_p75_wall_ms": [1e3 * float(np.percentile(wall[k], q)) for q in (25, 75)]}
            for k in wall}


def numerics(problem, steps: int) -> dict:
    """SGD towers: hgtoolkit vs gdtuo, same MLP and minibatches, learnt LRs step by step (in the
    problem's dtype; tests/test_peers.py holds them to 1e-12 in float64 on small problems)."""
    if not HAVE_GDTUO:
        return {}
    out = {}
    for h in (2, 3):
        a, b = Runner(problem, "sgd", "hgtoolkit", h), Runner(problem, "sgd", "gdtuo", h)
        la, lb = [], []
        for t in range(steps):
            a.step(t)
            b.step(t)
            la.append(a.lrs())
            lb.append(b.lrs())
        la, lb = np.array(la), np.array(lb)
        rel = np.abs(la - lb) / np.abs(lb)
        wa, wb = a.weights(), b.weights()
        wrel = max(float((x - y).norm() / y.norm()) for x, y in zip(wa, wb))
        out[f"sgd_h{h}"] = {"max_rel_diff_per_level": rel.max(0).tolist(),
                            "final_lrs_hgtoolkit": la[-1].tolist(), "final_lrs_gdtuo": lb[-1].tolist(),
                            "max_rel_diff_final_weights": wrel}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=20, help="N of the N-vs-2N memory probe")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "towers.json"))
    ap.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.memory_steps)))
        return 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problem = problems.mnist_mlp()
    print(f"MNIST MLP: {problem.num_params} parameters, data: {problem.info.get('data')}", file=sys.stderr)
    if not HAVE_GDTUO:
        print("gradient-descent-the-ultimate-optimizer not installed: its rows are left out "
              "(pip install gradient-descent-the-ultimate-optimizer)", file=sys.stderr)

    load_start = os.getloadavg()
    times = timing(problem, args.steps, args.warmup, args.repeats)
    memory = {}
    for key, *_ in configs():
        cmd = [sys.executable, __file__, "--memory-probe", key, "--memory-steps", str(args.memory_steps),
               "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        memory[key] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  memory probe {key} done", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nums = {"float32": numerics(problem, args.steps),
                "float64": numerics(problems.mnist_mlp(dtype=torch.float64), args.steps)}

    rows = []
    N = args.memory_steps
    for key, family, impl, height in configs():
        base = times[f"{family}/torch.optim"]
        m, tm = memory[key], times[key]
        rows.append({"config": key, "family": family, "implementation": impl, "height": height,
                     "spec": (FAMILIES[family]["towers"][height - 1] if impl == "hgtoolkit" else None),
                     "wall_ms_per_step": tm["median_wall_ms"], "cpu_ms_per_step": tm["median_cpu_ms"],
                     "wall_p25_p75_ms": tm["p25_p75_wall_ms"],
                     "wall_relative_to_torch_optim": tm["median_wall_ms"] / base["median_wall_ms"],
                     "cpu_relative_to_torch_optim": tm["median_cpu_ms"] / base["median_cpu_ms"],
                     "peak_rss_above_start_mb": m["peak_rss_above_start_mb"],
                     "live_tensor_mb_N": m[f"after_{N}"]["live_tensor_mb"],
                     "live_tensor_mb_2N": m[f"after_{2 * N}"]["live_tensor_mb"],
                     "live_tensors_N": m[f"after_{N}"]["live_tensors"],
                     "live_tensors_2N": m[f"after_{2 * N}"]["live_tensors"],
                     "rss_growth_N_to_2N_mb": m["rss_growth_mb"], "memory": m})

    header = (f"{'config':<19}{'wall ms':>8}{'×':>6}{'cpu ms':>8}{'×':>6}{'peak RSS':>10}"
              f"{'tensor MB N→2N':>16}{'count N→2N':>12}{'RSS N→2N':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['config']:<19}{r['wall_ms_per_step']:>8.1f}{r['wall_relative_to_torch_optim']:>6.2f}"
                     f"{r['cpu_ms_per_step']:>8.1f}{r['cpu_relative_to_torch_optim']:>6.2f}"
                     f"{r['peak_rss_above_start_mb']:>8.0f}MB"
                     f"{r['live_tensor_mb_N']:>8.1f}→{r['live_tensor_mb_2N']:<7.1f}"
                     f"{r['live_tensors_N']:>6}→{r['live_tensors_2N']:<5}{r['rss_growth_N_to_2N_mb']:>+8.1f}MB")
    table = "\n".join(lines)
    print(f"per-step medians; × = relative to torch.optim of the same family; memory: N = {N} steps")
    print(table)
    for dt, res in nums.items():
        for k, v in res.items():
            print(f"{k} ({dt}): hgtoolkit vs gdtuo over {args.steps} steps, max relative difference "
                  f"of the learnt LR per level {['%.1e' % x for x in v['max_rel_diff_per_level']]}, "
                  f"of the final weights {v['max_rel_diff_final_weights']:.1e}")

    record = {
        "benchmark": "towers", "problem": problem.describe(),
        "settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                     "memory_steps_N": args.memory_steps, "threads": args.threads, "dtype": "float32",
                     "device": "cpu"},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
        "gdtuo_installed": HAVE_GDTUO,
        "families": {f: {"towers": v["towers"]} for f, v in FAMILIES.items()},
        "rows": rows, "numerics_vs_gdtuo": nums, "table": table,
    }
    path = atomic_write_json(args.out, record)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
