"""Cost of the exact hypergradients on the MARTHE MLP (3×500 ReLU, MNIST, batch 100, SGD,
CPU, float32), relative to just training the same T steps (``trajectory.train``).

Measured (``python benchmarks/bench_exact.py``; ``--quick`` for a smoke run):

- time ratios to training, T = 100: ``hypergradient(mode="reverse")`` (target ≤ 2.5),
  reverse with ``checkpoint_every=10``, ``directional_derivative`` (target ≤ 3), and forward
  mode for the full gradient (``mode="forward"``, chunked) at a smaller T. Every candidate is
  timed right after a training run, round-robin, after a warm-up round; the ratio reported is
  the median over rounds of the per-round ratios (wall clock, and process CPU time);
- where reverse mode spends its time: the forward phase (building each step's vjp) vs the
  backward phase (applying them), the ``mode="autograd"`` reference, a prototype that builds
  each step's graph with plain ``torch.autograd`` instead of ``torch.func.vjp`` (same numbers,
  checked), and the top operators from ``torch.profiler``;
- peak memory (peak RSS of a fresh subprocess per measurement, ``ru_maxrss``) of reverse mode
  storing every step vs ``checkpoint_every=k`` at T = 2000, next to plain training. If storing
  every step would not fit in the available memory, a smaller hidden size is used and the JSON
  says so (with the per-step cost measured at both sizes).

Writes ``benchmarks/results/exact.json`` and prints a table. The machine may be shared: the
load average is recorded before and after, and absolute times are indicative only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import env_info, format_table, interleaved, row, timed, write_results  # noqa: E402

LR = 0.05


def build_problem(hidden: int, n_layers: int = 3):
    import hgtoolkit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem = hgtoolkit.problems.mnist_mlp(hidden=(hidden,) * n_layers, batch_size=100,
                                               dtype=torch.float32, device="cpu")
    return problem, [str(w.message).split("\n")[0] for w in caught]


# ----------------------------------------------------------------------------- reverse-mode anatomy

def reverse_phases(problem, lrs):
    """Time exact._reverse's two phases separately (same code path: make_step + torch.func.vjp)."""
    from torch.func import grad_and_value, vjp
    from hgtoolkit import dynamics
    from hgtoolkit.trajectory import make_step
    dyn = dynamics.sgd()
    step = make_step(problem, dyn)
    T = len(lrs)
    t0 = time.perf_counter()
    state, pullbacks = dyn.init(problem.params0), []
    for t in range(T):
        state, pb, _ = vjp(lambda s, lr, t=t: step(s, lr, t), state, lrs[t], has_aux=True)
        pullbacks.append(pb)
    t1 = time.perf_counter()
    lam, _ = grad_and_value(lambda s: problem.val_loss(dyn.params(s)))(state)
    t2 = time.perf_counter()
    grads = torch.empty(T)
    for t in range(T - 1, -1, -1):
        lam, grads[t] = pullbacks[t](lam)
        pullbacks[t] = None
    t3 = time.perf_counter()
    return {"forward_s": t1 - t0, "objective_s": t2 - t1, "backward_s": t3 - t2}, grads


def reverse_autograd_steps(problem, lrs):
    """Prototype: reverse mode with one plain torch.autograd graph per step (create_graph=True)
    instead of torch.func.vjp; the backward phase calls torch.autograd.grad on each step's graph."""
    from torch.utils._pytree import tree_flatten, tree_unflatten
    from hgtoolkit import dynamics
    dyn = dynamics.sgd()
    T = len(lrs)
    t0 = time.perf_counter()
    state, saved = dyn.init(problem.params0), []
    for t in range(T):
        s_in = {k: torch.utils._pytree.tree_map(lambda x: x.detach().requires_grad_(True), v)
                for k, v in state.items()}
        lr = lrs[t].detach().requires_grad_(True)
        w_leaves, spec = tree_flatten(dyn.params(s_in))
        loss = problem.train_loss(dyn.params(s_in), t)
        g = torch.autograd.grad(loss, w_leaves, create_graph=True)
        s_out = dyn.step(s_in, tree_unflatten(list(g), spec), lr, t)
        saved.append((s_in, lr, s_out))
        state = torch.utils._pytree.tree_map(lambda x: x.detach(), s_out)
    t1 = time.perf_counter()
    s_T = torch.utils._pytree.tree_map(lambda x: x.detach().requires_grad_(True), state)
    leaves_T = tree_flatten(s_T)[0]
    lam = torch.autograd.grad(problem.val_loss(dyn.params(s_T)), leaves_T, allow_unused=True,
                              materialize_grads=True)
    t2 = time.perf_counter()
    grads = torch.empty(T)
    for t in range(T - 1, -1, -1):
        s_in, lr, s_out = saved[t]
        ins = tree_flatten(s_in)[0] + [lr]
        out = torch.autograd.grad(tree_flatten(s_out)[0], ins, grad_outputs=list(lam),
                                  allow_unused=True, materialize_grads=True)
        lam, grads[t] = out[:-1], out[-1]
        saved[t] = None
    t3 = time.perf_counter()
    return {"forward_s": t1 - t0, "objective_s": t2 - t1, "backward_s": t3 - t2}, grads


def directional_reverse_over_reverse(problem, lrs, direction):
    """Prototype: z_{t+1} = A_t z_t + B_t v_t with H_t z from a double backward (∇_w(g·z))
    instead of a forward-mode jvp through the gradient; the optimizer update itself (elementwise)
    is still differentiated with one torch.func.jvp of dynamics.step."""
    from torch.func import jvp
    from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
    from hgtoolkit import dynamics
    from hgtoolkit._tree import tree_zeros_like
    dyn = dynamics.sgd()
    state = dyn.init(problem.params0)
    z = tree_zeros_like(state)
    for t in range(len(lrs)):
        w = tree_map(lambda x: x.detach().requires_grad_(True), dyn.params(state))
        leaves, spec = tree_flatten(w)
        g = torch.autograd.grad(problem.train_loss(w, t), leaves, create_graph=True)
        hz = torch.autograd.grad(g, leaves, grad_outputs=tree_flatten(dyn.params(z))[0])
        g = tree_unflatten([x.detach() for x in g], spec)
        s_in = tree_map(lambda x: x.detach(), state)
        state, z = jvp(lambda s, gg, lr, t=t: dyn.step(s, gg, lr, t), (s_in, g, lrs[t]),
                       (z, tree_unflatten(list(hz), spec), direction[t]))
    w = tree_map(lambda x: x.detach().requires_grad_(True), dyn.params(state))
    leaves = tree_flatten(w)[0]
    value = problem.val_loss(w)
    ge = torch.autograd.grad(value, leaves)
    return value.detach(), sum((a * b).sum() for a, b in zip(ge, tree_flatten(dyn.params(z))[0]))


def top_ops(problem, lrs, n=10):
    """The operators with the largest self CPU time in one reverse-mode hypergradient."""
    from torch.profiler import ProfilerActivity, profile
    import hgtoolkit
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        hgtoolkit.hypergradient(problem, lrs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:n]]


# ----------------------------------------------------------------------------- timing section

def timing(threads: int, args, rows: list, details: dict) -> None:
    import hgtoolkit
    from hgtoolkit import directional_derivative, hypergradient, train
    torch.set_num_threads(threads)
    problem, fallback = build_problem(args.hidden)
    details.setdefault("data", problem.info.get("data"))
    details.setdefault("data_warnings", fallback)
    T, Tf = args.T, args.T_forward
    lrs, lrs_f = torch.full((T,), LR), torch.full((Tf,), LR)
    direction = torch.ones(T)
    tag = f"{threads} thread{'s' if threads > 1 else ''}"

    res = interleaved(lambda: train(problem, lrs), {
        "reverse": lambda: hypergradient(problem, lrs, mode="reverse"),
        "reverse_ckpt10": lambda: hypergradient(problem, lrs, mode="reverse", checkpoint_every=10),
        "directional": lambda: directional_derivative(problem, lrs, direction),
    }, repeats=args.repeats)
    res_f = interleaved(lambda: train(problem, lrs_f), {
        "forward_full": lambda: hypergradient(problem, lrs_f, mode="forward", chunk_size=args.chunk),
    }, repeats=max(1, args.repeats // 2))
    details[f"timing_{threads}t"] = {"T": T, "T_forward": Tf, "chunk_size": args.chunk, "main": res,
                                     "forward": res_f}
    base = res["baseline"]["wall_s"]
    rows.append(row(f"train T={T} ({tag})", base, "s", note=f"{1e3 * base / T:.1f} ms/step, median"))
    for key, label, target in (("reverse", "reverse / train", 2.5),
                               ("reverse_ckpt10", "reverse, checkpoint_every=10 / train", None),
                               ("directional", "directional_derivative / train", 3.0)):
        r = res[key]
        rows.append(row(f"{label}, T={T} ({tag})", r["ratio_wall"], "×",
                        f"≤ {target}" if target else None,
                        None if target is None else r["ratio_wall"] <= target,
                        f"CPU-time ratio {r['ratio_cpu']:.2f}; {r['wall_s']:.2f} s"))
    r = res_f["forward_full"]
    rows.append(row(f"forward full (chunk {args.chunk}) / train, T={Tf} ({tag})", r["ratio_wall"], "×",
                    note=f"CPU-time ratio {r['ratio_cpu']:.2f}; {r['wall_s']:.2f} s; "
                         f"{Tf} columns, cost grows ~T²/2"))

    # anatomy of reverse mode, and prototypes, all timed in the same rounds as a training run
    cands = {
        "reverse": lambda: hypergradient(problem, lrs),
        "phases": lambda: reverse_phases(problem, lrs),
        "prototype_autograd_steps": lambda: reverse_autograd_steps(problem, lrs),
        "mode_autograd": lambda: hypergradient(problem, lrs, mode="autograd"),
        "directional": lambda: directional_derivative(problem, lrs, direction),
        "prototype_directional_rr": lambda: directional_reverse_over_reverse(problem, lrs, direction),
    }
    rounds = []
    for _ in range(args.repeats):
        rnd = {"train_s": timed(lambda: train(problem, lrs))[0]}
        for name, fn in cands.items():
            t0 = time.perf_counter()
            out = fn()
            rnd[name + "_s"] = time.perf_counter() - t0
            if name in ("phases", "prototype_autograd_steps"):
                rnd.update({f"{name}.{k}": v for k, v in out[0].items()})
        rounds.append(rnd)
    med = lambda key: statistics.median(r[key] / r["train_s"] for r in rounds)
    _, g_ref = reverse_phases(problem, lrs)
    _, g_alt = reverse_autograd_steps(problem, lrs)
    dd_ref = directional_derivative(problem, lrs, direction)[1]
    dd_alt = directional_reverse_over_reverse(problem, lrs, direction)[1]
    same = bool(torch.equal(g_ref, g_alt))
    close = float((g_ref - g_alt).abs().max() / g_ref.abs().max())
    dd_rel = float((dd_ref - dd_alt).abs() / dd_ref.abs())
    anatomy = {
        "reverse_over_train": med("reverse_s"),
        "torch_func_vjp": {k: med(f"phases.{k}") for k in ("forward_s", "objective_s", "backward_s")},
        "autograd_per_step_prototype": {k: med(f"prototype_autograd_steps.{k}")
                                        for k in ("forward_s", "objective_s", "backward_s")},
        "autograd_per_step_prototype_total": med("prototype_autograd_steps_s"),
        "mode_autograd_over_train": med("mode_autograd_s"),
        "directional_over_train": med("directional_s"),
        "directional_rr_prototype_over_train": med("prototype_directional_rr_s"),
        "prototype_grad_bitwise_equal": same, "prototype_grad_max_rel_diff": close,
        "directional_rr_rel_diff": dd_rel, "rounds": rounds,
    }
    details[f"reverse_anatomy_{threads}t"] = anatomy
    f, b = anatomy["torch_func_vjp"], anatomy["autograd_per_step_prototype"]
    rows.append(row(f"[same rounds] reverse / train ({tag})", anatomy["reverse_over_train"], "×",
                    note=f"phases: forward (vjp build) {f['forward_s']:.2f}, objective "
                         f"{f['objective_s']:.3f}, backward {f['backward_s']:.2f}"))
    rows.append(row(f"[same rounds] prototype: per-step torch.autograd graphs / train ({tag})",
                    anatomy["autograd_per_step_prototype_total"], "×",
                    note=f"forward {b['forward_s']:.2f}, backward {b['backward_s']:.2f}; same grad "
                         f"{'bitwise' if same else f'to {close:.1e}'}"))
    rows.append(row(f"[same rounds] mode='autograd' / train ({tag})", anatomy["mode_autograd_over_train"], "×"))
    rows.append(row(f"[same rounds] directional_derivative / train ({tag})", anatomy["directional_over_train"], "×"))
    rows.append(row(f"[same rounds] prototype: directional, reverse-over-reverse HVP / train ({tag})",
                    anatomy["directional_rr_prototype_over_train"], "×",
                    note=f"same value to {dd_rel:.1e}"))
    if args.profile:
        details[f"top_ops_{threads}t"] = top_ops(problem, lrs)


# ----------------------------------------------------------------------------- memory section

def memory_child(spec: str, T: int, hidden: int, threads: int) -> None:
    """Run one measurement in this fresh process and print {"maxrss_mb", "wall_s"} as JSON."""
    import resource
    import hgtoolkit
    torch.set_num_threads(threads)
    problem, _ = build_problem(hidden)
    lrs = torch.full((T,), LR)
    # Loading the data has its own peak; reset the high-water mark (Linux: clear_refs "5") so
    # VmHWM measures the computation alone; ru_maxrss stays the whole process's peak.
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    if spec == "train":
        hgtoolkit.train(problem, lrs)
    elif spec == "stored":
        hgtoolkit.hypergradient(problem, lrs)
    elif spec.startswith("ckpt"):
        hgtoolkit.hypergradient(problem, lrs, checkpoint_every=int(spec[4:]))
    else:
        raise ValueError(spec)
    wall = time.perf_counter() - t0
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_after_load_mb": _status_mb("VmHWM") if reset else None,
                      "rss_after_load_mb": reset, "wall_s": wall}))


def _status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float | None:
    """Reset VmHWM to the current RSS; returns that RSS (MB), or None where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_mb("VmRSS")


def run_child(spec: str, T: int, hidden: int, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", spec, "--T", str(T),
           "--hidden", str(hidden), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(args, rows: list, details: dict) -> None:
    threads = args.threads[0]
    T = args.T_memory
    k = args.memory_checkpoint or max(1, round(math.sqrt(T)))
    budget = args.memory_fraction * mem_available_mb()
    probes, hidden = {}, args.hidden
    # per-step cost of storing every step, from a short run; shrink the model until T fits
    n_probe = min(100, T)
    while True:
        a = run_child("stored", n_probe, hidden, threads)
        if a.get("peak_after_load_mb") is not None:
            per_step = (a["peak_after_load_mb"] - a["rss_after_load_mb"]) / n_probe
            need = a["rss_after_load_mb"] + per_step * T
        else:  # no VmHWM reset: one more run and the difference of the two peaks
            b = run_child("stored", 2 * n_probe, hidden, threads)
            per_step = (b["maxrss_mb"] - a["maxrss_mb"]) / n_probe
            need = a["maxrss_mb"] + per_step * (T - n_probe)
        probes[hidden] = {"probe_T": n_probe, "probe": a, "per_step_mb": per_step, "predicted_T_mb": need}
        if need <= budget or hidden <= 64:
            break
        hidden //= 2
    shrunk = hidden != args.hidden
    details["memory"] = {"T": T, "checkpoint_every": k, "hidden": hidden, "requested_hidden": args.hidden,
                         "hidden_reduced": shrunk, "budget_mb": budget, "probes": probes,
                         "note": (f"storing all {T} steps of the {args.hidden}-unit MLP was predicted to need "
                                  f"{probes[args.hidden]['predicted_T_mb']:.0f} MB > budget {budget:.0f} MB "
                                  f"({args.memory_fraction:.0%} of MemAvailable): measured with hidden={hidden}"
                                  if shrunk else f"full model (hidden={hidden})")}
    for spec in ("train", "stored", f"ckpt{k}"):
        details["memory"][spec] = run_child(spec, T, hidden, threads)
    m = details["memory"]
    arch = f"3×{hidden}"
    extra = {}  # MB the computation adds to the process after loading the data
    for spec, label in (("train", "train"), ("stored", "reverse, all steps stored"),
                        (f"ckpt{k}", f"reverse, checkpoint_every={k}")):
        r = m[spec]
        if "error" in r:
            rows.append(row(f"peak RSS {label}, T={T} ({arch})", None, "MB", note=f"FAILED: {r['error']}"))
            continue
        if r.get("peak_after_load_mb") is not None:
            extra[spec] = r["peak_after_load_mb"] - r["rss_after_load_mb"]
            note = (f"+{extra[spec]:.0f} MB over the {r['rss_after_load_mb']:.0f} MB after loading "
                    f"(VmHWM reset after loading); {r['wall_s']:.1f} s")
        else:
            note = f"{r['wall_s']:.1f} s"
        rows.append(row(f"peak RSS {label}, T={T} ({arch})", r["maxrss_mb"], "MB", note=note))
    if "stored" in extra and f"ckpt{k}" in extra and extra[f"ckpt{k}"] > 1:
        rows.append(row(f"extra memory stored / checkpointed, T={T} ({arch})",
                        extra["stored"] / extra[f"ckpt{k}"], "×",
                        note=f"time checkpointed / stored {m[f'ckpt{k}']['wall_s'] / m['stored']['wall_s']:.2f}×"))
    if shrunk:
        p = probes[args.hidden]
        rows.append(row(f"predicted peak RSS stored, T={T} (3×{args.hidden})", p["predicted_T_mb"], "MB",
                        note=f"extrapolated: {p['per_step_mb']:.2f} MB/step measured at T={p['probe_T']}"))


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[min(2, os.cpu_count() or 1)],
                    help="torch threads; several values repeat the timing section for each")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--T-forward", dest="T_forward", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=500)
    ap.add_argument("--T-memory", dest="T_memory", type=int, default=2000)
    ap.add_argument("--memory-checkpoint", type=int, default=None, help="k for the memory run (default √T)")
    ap.add_argument("--memory-fraction", type=float, default=0.6,
                    help="use at most this fraction of MemAvailable for the stored run")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repeat")
    ap.add_argument("--json", default=None, help="output file (default benchmarks/results/exact.json)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        memory_child(args._child, args.T, args.hidden, args.threads[0])
        return 0
    if args.quick:
        args.repeats, args.T, args.T_forward, args.chunk, args.T_memory = 1, 10, 4, 2, 60
        args.hidden = 64

    started = time.perf_counter()
    details: dict = {"env_before": env_info(args.threads[0]), "settings": vars(args).copy(), "lr": LR}
    rows: list = []
    for threads in args.threads:
        timing(threads, args, rows, details)
    if not args.no_memory:
        memory(args, rows, details)
    details["env_after_loadavg"] = list(os.getloadavg())
    details["total_s"] = time.perf_counter() - started
    payload = {"benchmark": "exact", "rows": rows, "env": details.pop("env_before"), **details}
    payload["env"]["loadavg_after"] = details["env_after_loadavg"]
    name = "exact" if args.json is None else None
    if name is None:
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        path = args.json
    else:
        path = write_results(name if not args.quick else "exact_quick", payload)
    print(f"\nexact hypergradients, {details.get('data', '')[:60]}; MLP 3×{args.hidden}, batch 100, "
          f"float32, CPU ({payload['env']['cpu']}); load average {payload['env']['loadavg'][0]:.1f} → "
          f"{details['env_after_loadavg'][0]:.1f} on {os.cpu_count()} CPUs\n")
    print(format_table(rows))
    print(f"\nwrote {path} ({details['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
