"""Memory and time of the exact reverse modes (docs/memory.md) on the MARTHE MLP (3×500 ReLU,
MNIST, batch 100, heavy-ball momentum γ = 0.9, η = 0.05, float32, CPU).

Every measurement runs in a fresh subprocess (``--_child``): the data are loaded, the mode is
run once at T = 3 (warm-up, the build of the reversible mode's C kernels), the per-step cost of a
plain training step and of the *floor step* (the gradient with its graph + one HVP through it)
is timed on 20 steps each (so the ratios compare runs made under the same load), then the
process's high-water mark is reset (Linux ``clear_refs``; where that is refused, ``ru_maxrss``
minus the resident set before the run) and the mode runs once. Reported per mode and T:

- **peak memory growth** (MB, and as multiples of one training state S = w + velocity);
- **time ÷ floor**, floor = one training pass + one HVP per step = T·(t_train + t_floor_step);
  the checkpointed modes also ÷ their *predicted* time T·t_floor_step + recomputed·t_train
  (every reverse step rebuilds its graph; each recomputed forward step costs one training
  step; ``recomputed`` is the binomial count), = floor + (recomputed − T)·t_train, and, in
  the interleaved timing, ÷ stored reverse's time + recomputed·t_train (the prediction above
  leaves out the adjoint's own arithmetic, which stored reverse measures: docs/memory.md);
- the schedule, snapshots, steps recomputed and the memory estimate the budget used.

    python benchmarks/bench_memory.py           # T = 100 and 1000 (≈ 15 min on 2 busy cores)
    python benchmarks/bench_memory.py --long    # T = 10⁴ only: binomial (memory=800MB) and
                                                # reversible, tens of minutes; memory_long.json
    python benchmarks/bench_memory.py --plot    # docs/figures/memory_tradeoff.png from the JSONs
    python benchmarks/bench_memory.py --quick   # smoke run (small MLP, T = 20)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, env_info, format_table, interleaved, row, write_results  # noqa: E402

LR, GAMMA = 0.05, 0.9
FIGURE = HERE.parent / "docs" / "figures" / "memory_tradeoff.png"


def build(hidden: int, device: str = "cpu"):
    import hgtoolkit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hgtoolkit.problems.mnist_mlp(hidden=(hidden,) * 3, batch_size=100, dtype=torch.float32,
                                            device=device)


def hand_loop(problem, T: int, hvp: bool) -> None:
    """Heavy-ball SGD written by hand; ``hvp``: the gradient keeps its graph and one HVP goes
    through it (the floor step), else a plain training step."""
    names = list(problem.params0)
    w = [problem.params0[k].clone() for k in names]
    b = [torch.zeros_like(x) for x in w]
    v = [torch.ones_like(x) for x in w]
    for t in range(T):
        leaves = [x.requires_grad_(True) for x in w]
        loss = problem.train_loss(dict(zip(names, leaves)), t)
        g = torch.autograd.grad(loss, leaves, create_graph=hvp)
        if hvp:
            torch.autograd.grad(g, leaves, v)
        with torch.no_grad():
            b = [GAMMA * bb + gg.detach() for bb, gg in zip(b, g)]
            w = [x.detach() - LR * bb for x, bb in zip(leaves, b)]


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def child(spec: dict) -> dict:
    import hgtoolkit
    torch.set_num_threads(spec["threads"])
    problem = build(spec["hidden"])
    mode, T = spec["mode"], spec["T"]
    kw = dict(spec.get("kw") or {})

    def run(n):
        lrs = torch.full((n,), LR)
        if mode == "train":
            return hand_loop(problem, n, hvp=False)
        if mode == "floor":
            return hand_loop(problem, n, hvp=True)
        if mode == "stored":
            kw.setdefault("memory", "1TB")  # what storing costs, whatever the budget says
        return hgtoolkit.hypergradient(problem, lrs, "momentum", mode="reversible" if mode == "reversible" else "reverse",
                                       progress=n >= 1000, **kw)

    run(3)
    cal = {}
    for name, hvp in (("train", False), ("floor", True)):
        t0 = time.perf_counter()
        hand_loop(problem, spec["calibrate"], hvp)
        cal[name] = (time.perf_counter() - t0) / spec["calibrate"]
    state_bytes = 2 * sum(x.numel() * x.element_size() for x in problem.params0.values())
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    rss0 = _status_kb("VmRSS") or 0
    print(json.dumps({"rss0_mb": rss0 / 1024, "calibration": cal}), file=sys.stderr, flush=True)  # for long runs' logs
    t0 = time.perf_counter()
    r = run(T)
    wall = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"mode": mode, "T": T, "kw": spec.get("kw"), "wall_s": wall, "t_train": cal["train"],
           "t_floor_step": cal["floor"], "growth_mb": (peak_kb - rss0) / 1024, "rss0_mb": rss0 / 1024,
           "hwm_reset": reset, "state_mb": state_bytes / 2 ** 20}
    if r is not None:
        out.update({k: getattr(r, k) for k in ("schedule", "snapshots", "disk_snapshots", "recomputed_steps",
                                               "memory_estimate", "memory_budget", "peak_memory", "buffer_bytes")})
        out["grad_norm"] = float(r.grad.norm())
    return out


def run_child(spec: dict, log: Path) -> dict:
    """One measurement in a fresh process; its stderr (tqdm progress of long runs) goes to ``log``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", json.dumps(spec)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE.parent)
    if out.returncode != 0:
        lines = [x for x in log.read_text().replace("\r", "\n").splitlines() if x.strip()]
        return {**spec, "error": lines[-1] if lines else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def cases(T: int, long: bool) -> list[tuple[str, str, dict]]:
    """(label, mode, hypergradient keywords) measured at T."""
    k = max(1, round(T ** 0.5))
    if long:
        return [("binomial, memory=800MB", "binomial", {"memory": "800MB"}),
                ("reversible", "reversible", {})]
    out = [("train (plain training pass)", "train", {}), ("floor loop (gradient graph + HVP per step)", "floor", {})]
    if T <= 200:
        out.append(("stored (checkpoint=None)", "stored", {"checkpoint": None}))
    out += [(f"every k = {k}", "every", {"checkpoint": k}),
            (f"binomial, snapshots={k}", "binomial", {"checkpoint": "binomial", "snapshots": k}),
            ("memory=200MB", "budget", {"memory": "200MB"}),
            ("memory=60MB, disk='tmp'", "disk", {"memory": "60MB", "disk": "tmp"}),
            ("memory=200MB, disk='tmp'", "topup", {"memory": "200MB", "disk": "tmp"}),
            ("reversible (γ = 0.9)", "reversible", {})]
    return out


def _mb(m: dict) -> float:
    """Peak growth in MB (10⁶ bytes; the children report MiB)."""
    return m["growth_mb"] * 2 ** 20 / 1e6


def rows_of(results: list[dict]) -> list[dict]:
    rows = []
    for m in results:
        label, T = m["label"], m["T"]
        if "error" in m:
            rows.append(row(f"{label}, T={T}", None, note=f"FAILED: {m['error']}"))
            continue
        floor = T * (m["t_train"] + m["t_floor_step"])
        ratio = m["wall_s"] / floor
        S = m["state_mb"]
        note = (f"{m['wall_s']:.1f} s; floor {floor:.1f} s (train {1e3 * m['t_train']:.0f} ms + floor step "
                f"{1e3 * m['t_floor_step']:.0f} ms per step); peak growth {_mb(m):.0f} MB = "
                f"{m['growth_mb'] / S:.1f} S (S = {S:.1f} MB)")
        target, met = None, None
        if m.get("schedule"):
            note += (f"; schedule {m['schedule']}, snapshots {m['snapshots']}, recomputed {m['recomputed_steps']}, "
                     f"estimate {m['memory_estimate'] / 1e6:.0f} MB")
            if m.get("disk_snapshots"):
                note += f", {m['disk_snapshots']} snapshots on disk"
        if m["mode"] == "reversible":
            target, met = "≤ 1.25", ratio <= 1.25
            note += f"; buffer {m['buffer_bytes'] / 1e6:.1f} MB"
        rows.append(row(f"{label}, T={T}: time / floor", ratio, "×", target, met, note))
        if m.get("recomputed_steps") is not None and m["mode"] in ("binomial", "every", "budget", "disk", "topup"):
            # T steps with their graph + HVP, and the recomputed plain steps: no bar here (the
            # prediction leaves out the adjoint's own work; the bar is the interleaved timing's
            # ÷ (stored + its recomputation), measured in one process)
            predicted = T * m["t_floor_step"] + m["recomputed_steps"] * m["t_train"]
            r = m["wall_s"] / predicted
            rows.append(row(f"{label}, T={T}: time / (floor + recomputation)", r, "×", note=(
                f"predicted {predicted:.1f} s for {m['recomputed_steps']} recomputed steps; per-process "
                "calibration, and the prediction leaves out the adjoint's own work (see the interleaved timing)")))
        limit = {"budget": 260, "binomial": 1000 if T >= 10 ** 4 else None,
                 "reversible": 1000 if T >= 10 ** 4 else None}.get(m["mode"])
        if m["mode"] == "budget" and T != 1000:
            limit = None
        rows.append(row(f"{label}, T={T}: peak memory growth", _mb(m), "MB",
                        f"≤ {limit}" if limit else None, None if limit is None else _mb(m) <= limit,
                        f"{m['growth_mb'] / S:.1f} training states; sampled in-run peak "
                        f"{(m.get('peak_memory') or 0) / 1e6:.0f} MB"))
    return rows


def kernels_only(problem, T: int):
    """Reversible mode's exact arithmetic without the model: T forward steps of
    ``reversible.FixedPointState`` on the MLP's leaves (one fixed gradient), then T back with the
    adjoint fused in, as the mode runs them (the C kernels; else the torch kernels' two halves)."""
    from hgtoolkit.reversible import FixedPointState
    gen = torch.Generator().manual_seed(0)
    w = list(problem.params0.values())
    g = [0.01 * torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in w]
    lam = [0.01 * torch.randn(x.numel(), generator=gen, dtype=x.dtype) for x in w]

    def run():
        fx = FixedPointState(w, [50] * len(w), [44] * len(w), 9, 10)
        for t in range(T):
            fx.forward(g, LR, t)
        if fx.lib is None:
            for t in range(T):
                fx.reverse_w(LR)
                fx.reverse_b(g)
            return
        lw, u = [x.clone() for x in lam], [torch.zeros_like(x) for x in lam]
        fx.reverse_adjoint(LR, lw, [torch.zeros_like(x) for x in lam], u, 0.0, GAMMA)
        for t in range(T - 1):
            fx.reverse_adjoint(LR, lw, lam, u, 0.0, GAMMA, g=g)
        fx.reverse_b(g, floats=False)
    return run


def timing(T: int, hidden: int, threads: int, repeats: int) -> tuple[list[dict], dict]:
    """Time ratios in one process, round-robin (``common.interleaved``): every mode right after
    the floor loop (gradient graph + HVP per step) of the same T; the floor itself = that loop
    + a plain training pass, so ratio ÷ floor = (mode ÷ loop) / (1 + train ÷ loop)."""
    import hgtoolkit
    torch.set_num_threads(threads)
    problem = build(hidden)
    lrs = torch.full((T,), LR)
    k = max(1, round(T ** 0.5))
    hg = lambda **kw: (lambda: hgtoolkit.hypergradient(problem, lrs, "momentum", **kw))
    ram = hgtoolkit.hypergradient(problem, lrs, "momentum", checkpoint="binomial", snapshots=k)
    S = 2 * sum(x.numel() * x.element_size() for x in problem.params0.values())  # w and b
    half = int(hgtoolkit.checkpointing.ALLOCATOR_SLACK * (ram.memory_estimate - k * S + (k // 2 + 0.5) * S))
    disk = f"binomial c={k}, {k - k // 2} on disk"
    cands = {"train": lambda: hand_loop(problem, T, hvp=False),
             "stored": hg(checkpoint=None), f"every {k}": hg(checkpoint=k),
             f"binomial c={k}": hg(checkpoint="binomial", snapshots=k),
             disk: hg(checkpoint="binomial", snapshots=k, memory=half, disk=True),
             "reversible": hg(mode="reversible"), "reversible's integer kernels alone": kernels_only(problem, T)}
    res = interleaved(lambda: hand_loop(problem, T, hvp=True), cands, repeats=repeats)
    fp1 = hgtoolkit.checkpointing.Footprint(1, 1)
    plans = {f"every {k}": hgtoolkit.checkpointing.every_plan(T, k, fp1),
             f"binomial c={k}": hgtoolkit.checkpointing.binomial_plan(T, k, fp1),
             disk: hgtoolkit.checkpointing.binomial_plan(T, k, fp1)}
    tr = res["train"]["ratio_wall"]
    rows = [row(f"[timing T={T}] train pass / floor loop", tr, "×", note="floor loop = gradient graph + HVP per step")]
    for name in cands:
        if name == "train":
            continue
        r = res[name]["ratio_wall"] / (1 + tr)
        target, met, note = None, None, f"{res[name]['wall_s']:.1f} s; ÷ floor loop {res[name]['ratio_wall']:.2f}"
        if name == "reversible":
            target, met = "≤ 1.25", r <= 1.25
            kern = res["reversible's integer kernels alone"]["ratio_wall"] / (1 + tr)
            note += (f"; = its model work (the floor less the training pass's float update, which the kernels "
                     f"replace) + its integer kernels ({kern:.2f})")
        rows.append(row(f"[timing T={T}] {name} / floor (training pass + one HVP per step)", r, "×", target, met, note))
        if name in plans:
            rec = plans[name].recomputed / T * tr  # the recomputed plain steps, in floor-loop units
            pred = 1 + rec  # T graph+HVP steps + recomputed plain steps
            rr = res[name]["ratio_wall"] / pred
            disk_note = "; its disk snapshots written and read back with checksums" if name == disk else ""
            bar = ("≤ 1.1", rr <= 1.1) if name.startswith("binomial") and name != disk else (None, None)
            rows.append(row(f"[timing T={T}] {name} / (its floor + recomputation)", rr, "×", *bar, note=(
                f"{plans[name].recomputed} recomputed steps: T graph + HVP steps and the recomputed plain "
                f"training steps revolve predicts; the adjoint's own arithmetic is on top (stored ÷ floor "
                f"loop {res['stored']['ratio_wall']:.2f})" + disk_note)))
            # stored reverse = T graph+HVP steps + the adjoint's arithmetic, measured: + the recomputation
            rs = res[name]["ratio_wall"] / (res["stored"]["ratio_wall"] + rec)
            bar = (None, None) if name == disk else ("≤ 1.1", rs <= 1.1)
            rows.append(row(f"[timing T={T}] {name} / (stored + its recomputation)", rs, "×", *bar,
                            f"stored reverse's time + {plans[name].recomputed} plain training steps" + disk_note))
    return rows, res


def _saved() -> list[dict]:
    """The saved measurements, the newest of each (mode, T, label) (by the date of its file's run)."""
    newest = {}
    for path in sorted(RESULTS.glob("memory*.json")):
        if "quick" in path.name:
            continue
        data = json.loads(path.read_text())
        date = data.get("env", {}).get("date", "")
        for m in data.get("measurements") or []:
            key = (m["mode"], m["T"], m["label"])
            if "error" not in m and (key not in newest or newest[key][0] <= date):
                newest[key] = (date, m)
    return sorted((m for _, m in newest.values()), key=lambda m: (m["T"], m["mode"]))


def markdown() -> str:
    """The docs tables (docs/memory.md) from the saved measurements: memory per mode and T (the
    per-process times are too noisy on a shared machine for ratios: see the interleaved rows)."""
    lines = ["| T | mode | schedule (snapshots, recomputed) | peak growth | × S | estimate | wall |",
             "|--:|---|---|--:|--:|--:|--:|"]
    for m in _saved():
        sched = f"{m['schedule']} ({m['snapshots']}, {m['recomputed_steps']})" if m.get("schedule") else ""
        est = f"{m['memory_estimate'] / 1e6:.0f} MB" if m.get("memory_estimate") else ""
        lines.append(f"| {m['T']} | {m['label']} | {sched} | {_mb(m):.0f} MB | {m['growth_mb'] / m['state_mb']:.1f} | "
                     f"{est} | {m['wall_s']:.0f} s |")
    for path in sorted(RESULTS.glob("memory*.json")):
        rows = [r for r in json.loads(path.read_text()).get("rows", []) if r["metric"].startswith("[timing")]
        if rows and "quick" not in path.name:
            lines += ["", format_table(rows)]
    return "\n".join(lines)


def plot() -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = _saved()
    if not data:
        return None
    groups = {}
    for m in data:
        key = {"train": "training pass", "floor": "floor loop", "stored": "stored", "every": "every √T",
               "binomial": "binomial", "budget": "memory=200MB", "disk": "memory=60MB + disk", "topup": "memory=200MB + disk",
               "reversible": "reversible"}[m["mode"]]
        groups.setdefault(key, []).append(m)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.8))
    for key, ms in groups.items():
        ms = sorted(ms, key=lambda m: m["T"])
        Ts = [m["T"] for m in ms]
        a.plot(Ts, [m["wall_s"] / (m["T"] * (m["t_train"] + m["t_floor_step"])) for m in ms], "o-", label=key)
        b.plot(Ts, [max(_mb(m), 1) for m in ms], "o-", label=key)
    stored = groups.get("stored")
    if stored:  # storing every step grows linearly in T: the measured MB per step, extrapolated
        per_step = _mb(stored[0]) / stored[0]["T"]
        Ts = [stored[0]["T"], 10 ** 4]
        b.plot(Ts, [per_step * T for T in Ts], "--", color="0.4", lw=1, label="stored (extrapolated)")
    a.set(xscale="log", xlabel="T (steps)", ylabel="time / floor (training pass + one HVP per step)",
          title="time (one process per point; shared machine: noisy)")
    b.set(xscale="log", yscale="log", xlabel="T (steps)", ylabel="peak memory growth (MB)", title="memory")
    b.axhline(1000, color="0.6", ls=":", lw=1)
    handles, labels = b.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("exact hypergradients, MNIST MLP 3×500, float32, CPU, heavy-ball γ = 0.9", fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120)
    return FIGURE


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--long", action="store_true", help="T = 10⁴: binomial and reversible only")
    ap.add_argument("--only", nargs="+", default=None, help="modes to run (train floor stored every binomial budget disk topup "
                                                                "reversible)")
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calibrate", type=int, default=20)
    ap.add_argument("--T-time", dest="T_time", type=int, default=50, help="T of the interleaved timing (0: none)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plot", action="store_true", help="only print the docs table and draw the figure "
                                                        "from the saved results")
    ap.add_argument("--name", default=None, help="results file name (default memory / memory_long)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child(json.loads(args._child)), default=str))
        return 0
    if args.plot:
        print(markdown())
        print(f"wrote {plot()}")
        return 0
    if args.quick:
        args.T, args.hidden, args.calibrate = [20], 64, 3
    Ts = [10 ** 4] if args.long else args.T
    name = args.name or ("memory_long" if args.long else ("memory_quick" if args.quick else "memory"))
    env = env_info(args.threads)
    started = time.perf_counter()
    results = []
    for T in Ts:
        for label, mode, kw in cases(T, args.long):
            if args.only and mode not in args.only:
                continue
            spec = {"mode": mode, "T": T, "kw": kw, "hidden": args.hidden, "threads": args.threads,
                    "calibrate": args.calibrate}
            m = run_child(spec, RESULTS / f"{name}_{mode}_T{T}.log")
            m["label"] = label
            results.append(m)
            print(f"{label}, T={T}: " + (m.get("error") or f"{m['wall_s']:.1f} s, +{m['growth_mb']:.0f} MB"), flush=True)
            write_results(name, {"benchmark": name, "rows": rows_of(results), "env": env, "measurements": results,
                                 "settings": vars(args), "partial": True})
    rows = rows_of(results)
    timing_raw = None
    if args.T_time and not args.long:
        trows, timing_raw = timing(args.T_time if not args.quick else 10, args.hidden, args.threads,
                                   1 if args.quick else args.repeats)
        rows = trows + rows
    env["loadavg_after"] = list(os.getloadavg())
    path = write_results(name, {"benchmark": name, "rows": rows, "env": env, "measurements": results,
                                "timing": timing_raw, "settings": vars(args), "total_s": time.perf_counter() - started})
    print(format_table(rows))
    print(f"\nwrote {path}")
    if not args.quick:  # the docs figure is rebuilt only on request: partial JSONs would thin it out
        print("rebuild docs/figures/memory_tradeoff.png from results/memory*.json with --plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
