"""Cost of the exact hypergradients on the MARTHE MLP (3×500 ReLU, MNIST, batch 100, SGD,
float32), relative to a hand-written SGD training loop of the same T (``torch.autograd.grad``
of the minibatch loss, then ``p -= η_t g`` under ``no_grad``), on ``--device`` (cpu or cuda).

Measured (``python benchmarks/bench_exact.py``; ``--quick`` for a smoke run):

- time ratios to that loop, T = 100: ``hypergradient(mode="reverse")`` (target ≤ 2.0),
  reverse with ``checkpoint=10`` (target ≤ 2.5) and ``"auto"`` (k ≈ √T),
  ``directional_derivative`` (target ≤ 2.5), and forward mode for the full gradient
  (``mode="forward"``, chunked) at a smaller T. Every candidate is timed right after a training
  run, round-robin, after a warm-up round; the ratio reported is the median over rounds of the
  per-round ratios (wall clock, and process CPU time);
- the alternatives the implementation was chosen from, timed in the same rounds: per-step
  ``torch.func.vjp`` closures (the previous implementation), forward-over-reverse HVPs
  (``torch.func.jvp`` of the gradient: stores states only and recomputes each step),
  ``checkpoint=1`` (states only, the step's graph rebuilt in the backward pass),
  ``mode="autograd"``, and for the directional derivative forward-over-reverse; plus the
  matmul-FLOP lower bound of "one training pass + one HVP per step" for this network, the
  share of the time spent in matrix products (``torch.profiler``) and the top operators;
- peak memory of reverse mode storing every step vs ``checkpoint=k`` at T = 2000, next to
  plain training: on CPU the peak RSS of a fresh subprocess per measurement, on CUDA
  ``torch.cuda.max_memory_allocated``. If storing every step would not fit, a smaller hidden
  size is used and the JSON says so (with the per-step cost measured at both sizes).

Writes ``benchmarks/results/exact.json`` (``exact_<device>.json`` for another device) and
prints a table. The machine may be shared: the load average is recorded before and after,
and absolute times are indicative only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import env_info, format_table, interleaved, row, write_results  # noqa: E402

LR = 0.05


def build_problem(hidden: int, n_layers: int = 3, device: str = "cpu"):
    import hgtoolkit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problem = hgtoolkit.problems.mnist_mlp(hidden=(hidden,) * n_layers, batch_size=100,
                                               dtype=torch.float32, device=device)
    return problem, [str(w.message).split("\n")[0] for w in caught]


def synced(fn, device: str):
    """``fn`` followed by a device synchronisation (CUDA runs asynchronously)."""
    if not str(device).startswith("cuda"):
        return fn
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


# ----------------------------------------------------------------------------- baseline and alternatives

def hand_sgd(problem, lrs):
    """The baseline: a hand-written SGD loop (what a user would write, no toolkit code)."""
    names = list(problem.params0)
    params = [problem.params0[k].clone().requires_grad_(True) for k in names]
    for t in range(len(lrs)):
        loss = problem.train_loss(dict(zip(names, params)), t)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lrs[t] * g
    return params


def reverse_func_vjp(problem, lrs):
    """Alternative (the previous implementation): one ``torch.func.vjp`` closure of the whole
    step Φ_t per step, kept from the forward pass and applied in the backward pass."""
    from torch.func import grad_and_value, vjp
    from hgtoolkit import dynamics
    from hgtoolkit.trajectory import make_step
    dyn = dynamics.sgd()
    step = make_step(problem, dyn)
    state, pullbacks = dyn.init(problem.params0), []
    for t in range(len(lrs)):
        state, pb, _ = vjp(lambda s, lr, t=t: step(s, lr, t), state, lrs[t], has_aux=True)
        pullbacks.append(pb)
    lam, _ = grad_and_value(lambda s: problem.val_loss(dyn.params(s)))(state)
    grads = torch.empty_like(lrs)
    for t in range(len(lrs) - 1, -1, -1):
        lam, grads[t] = pullbacks[t](lam)
        pullbacks[t] = None
    return grads


def reverse_fwd_over_rev(problem, lrs):
    """Alternative: store the states only; in the backward pass H_t ḡ by forward-over-reverse
    (``torch.func.jvp`` of ``torch.func.grad`` of L_t: recomputes the training step)."""
    from torch.func import grad, jvp
    from hgtoolkit import dynamics
    dyn = dynamics.sgd()
    gl = grad(problem.train_loss)
    state, saved = dyn.init(problem.params0), []
    with torch.no_grad():
        for t in range(len(lrs)):
            g = gl(dyn.params(state), t)
            saved.append((state, g))
            state = dyn.step(state, g, lrs[t], t)
    w = {k: v.detach().requires_grad_(True) for k, v in dyn.params(state).items()}
    lam = {"w": dict(zip(w, torch.autograd.grad(problem.val_loss(w), list(w.values()))))}
    grads = torch.empty_like(lrs)
    for t in range(len(lrs) - 1, -1, -1):
        s, g = saved[t]
        sbar, gbar, grads[t] = dyn.cotangent(s, g, lrs[t], t, lam)
        _, hv = jvp(lambda ww: gl(ww, t), (dyn.params(s),), (gbar,))
        lam = {"w": {k: sbar["w"][k] + hv[k] for k in hv}}
        saved[t] = None
    return grads


def directional_fwd_over_rev(problem, lrs, direction):
    """Alternative: (g_t, H_t z_w) in one ``torch.func.jvp`` of the gradient (no kept graph)."""
    from torch.func import grad, jvp
    from hgtoolkit import dynamics
    dyn = dynamics.sgd()
    gl = grad(problem.train_loss)
    state, z = dyn.init(problem.params0), None
    for t in range(len(lrs)):
        w = dyn.params(state)
        if z is None:
            g, hz = gl(w, t), None
        else:
            g, hz = jvp(lambda ww: gl(ww, t), (w,), (z["w"],))
        state, z = dyn.tangent(state, g, lrs[t], t, z, hz, direction[t])
    w = {k: v.detach().requires_grad_(True) for k, v in dyn.params(state).items()}
    ge = torch.autograd.grad(problem.val_loss(w), list(w.values()))
    return sum((a * z["w"][k]).sum() for a, k in zip(ge, w))


def matmul_bound(problem) -> dict:
    r"""Matmul FLOPs per step of an MLP (batch B, layers n_{l−1} → n_l): training = forward
    + weight gradient (+ input gradient from the second layer on) = (2 + [l>1])·B n_{l−1} n_l
    multiply-adds per layer; one HVP (reverse-over-reverse or forward-over-reverse alike) =
    (2 + 4·[l>1])·B n_{l−1} n_l. Returns the per-step counts and the ratio bounds."""
    sizes = [v.shape for k, v in problem.params0.items() if v.dim() == 2]  # (out, in) per layer
    train = sum((2 + (i > 0)) * o * n for i, (o, n) in enumerate(sizes))
    hvp = sum((2 + 4 * (i > 0)) * o * n for i, (o, n) in enumerate(sizes))
    return {"train_units": train, "hvp_units": hvp, "reverse_bound": (train + hvp) / train,
            "checkpointed_bound": (2 * train + hvp) / train, "directional_bound": (train + hvp) / train}


def matmul_share(fn) -> float:
    """Fraction of the profiled self CPU time spent in aten::mm/addmm/bmm during ``fn()``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1
    return sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / total


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
    from hgtoolkit import directional_derivative, hypergradient, train
    torch.set_num_threads(threads)
    dev = args.device
    problem, fallback = build_problem(args.hidden, device=dev)
    details.setdefault("data", problem.info.get("data"))
    details.setdefault("data_warnings", fallback)
    T, Tf = args.T, args.T_forward
    lrs, lrs_f = torch.full((T,), LR, device=dev), torch.full((Tf,), LR, device=dev)
    direction = torch.ones(T, device=dev)
    tag = f"{threads} thread{'s' if threads > 1 else ''}" if dev == "cpu" else dev
    S = lambda fn: synced(fn, dev)

    res = interleaved(S(lambda: hand_sgd(problem, lrs)), {
        "reverse": S(lambda: hypergradient(problem, lrs, mode="reverse")),
        "reverse_ckpt10": S(lambda: hypergradient(problem, lrs, mode="reverse", checkpoint=10)),
        "reverse_ckpt_auto": S(lambda: hypergradient(problem, lrs, mode="reverse", checkpoint=max(1, round(math.sqrt(T))))),
        "directional": S(lambda: directional_derivative(problem, lrs, direction)),
        "train_toolkit": S(lambda: train(problem, lrs)),
    }, repeats=args.repeats)
    res_f = interleaved(S(lambda: hand_sgd(problem, lrs_f)), {
        "forward_full": S(lambda: hypergradient(problem, lrs_f, mode="forward", chunk_size=args.chunk)),
    }, repeats=max(1, args.repeats // 2))
    bound = matmul_bound(problem)
    details[f"timing_{tag}"] = {"T": T, "T_forward": Tf, "chunk_size": args.chunk, "main": res,
                                "forward": res_f, "matmul_bound": bound}
    base = res["baseline"]["wall_s"]
    rows.append(row(f"hand-written SGD loop T={T} ({tag})", base, "s", note=f"{1e3 * base / T:.1f} ms/step, median"))
    k_auto = max(1, round(math.sqrt(T)))
    for key, label, target, lb in (
            ("reverse", "reverse / train", 2.0, bound["reverse_bound"]),
            ("reverse_ckpt10", "reverse, checkpoint=10 / train", 2.5, bound["checkpointed_bound"]),
            ("reverse_ckpt_auto", f"reverse, checkpoint={k_auto} (k = √T) / train", None,
             bound["checkpointed_bound"]),
            ("directional", "directional_derivative / train", 2.5, bound["directional_bound"]),
            ("train_toolkit", "hgtoolkit.train / train", None, 1.0)):
        r = res[key]
        rows.append(row(f"{label}, T={T} ({tag})", r["ratio_wall"], "×",
                        f"≤ {target}" if target else None,
                        None if target is None else r["ratio_wall"] <= target,
                        f"CPU-time ratio {r['ratio_cpu']:.2f}; {r['wall_s']:.2f} s; matmul-FLOP bound {lb:.2f}×"))
    r = res_f["forward_full"]
    rows.append(row(f"forward full (chunk {args.chunk}) / train, T={Tf} ({tag})", r["ratio_wall"], "×",
                    note=f"CPU-time ratio {r['ratio_cpu']:.2f}; {r['wall_s']:.2f} s; "
                         f"{Tf} columns, cost grows ~T²/2"))

    # the alternatives, timed in the same rounds as the baseline
    alt = interleaved(S(lambda: hand_sgd(problem, lrs)), {
        "reverse": S(lambda: hypergradient(problem, lrs)),
        "alt_func_vjp": S(lambda: reverse_func_vjp(problem, lrs)),
        "alt_fwd_over_rev": S(lambda: reverse_fwd_over_rev(problem, lrs)),
        "alt_states_recompute": S(lambda: hypergradient(problem, lrs, checkpoint=1)),
        "mode_autograd": S(lambda: hypergradient(problem, lrs, mode="autograd")),
        "directional": S(lambda: directional_derivative(problem, lrs, direction)),
        "alt_directional_fwd_over_rev": S(lambda: directional_fwd_over_rev(problem, lrs, direction)),
    }, repeats=max(1, args.repeats // 2))
    ref = hypergradient(problem, lrs).grad
    checks = {"alt_func_vjp": reverse_func_vjp(problem, lrs), "alt_fwd_over_rev": reverse_fwd_over_rev(problem, lrs),
              "mode_autograd": hypergradient(problem, lrs, mode="autograd").grad}
    rel = {k: float((v - ref).norm() / ref.norm()) for k, v in checks.items()}
    dd = float(directional_derivative(problem, lrs, direction)[1])
    rel["alt_directional_fwd_over_rev"] = abs(float(directional_fwd_over_rev(problem, lrs, direction)) - dd) / abs(dd)
    details[f"alternatives_{tag}"] = {"timing": alt, "rel_diff_to_default": rel}
    labels = {"reverse": "reverse (default: kept autograd graph, double-backward HVP)",
              "alt_func_vjp": "alt: torch.func.vjp closure per step (previous)",
              "alt_fwd_over_rev": "alt: states only + forward-over-reverse HVP",
              "alt_states_recompute": "alt: states only + rebuilt graph (checkpoint=1)",
              "mode_autograd": "mode='autograd' (unrolled loop, reference)",
              "directional": "directional_derivative (default: double-backward HVP)",
              "alt_directional_fwd_over_rev": "alt: directional, forward-over-reverse"}
    for key, label in labels.items():
        r = alt[key]
        note = f"CPU-time ratio {r['ratio_cpu']:.2f}"
        if key in rel:
            note += f"; rel. diff to default {rel[key]:.1e}"
        rows.append(row(f"[alternatives] {label} / train ({tag})", r["ratio_wall"], "×", note=note))
    if dev == "cpu" and args.profile:
        share = {"train": matmul_share(lambda: hand_sgd(problem, lrs)),
                 "reverse": matmul_share(lambda: hypergradient(problem, lrs)),
                 "directional": matmul_share(lambda: directional_derivative(problem, lrs, direction))}
        details[f"matmul_share_{tag}"] = share
        details[f"top_ops_{tag}"] = top_ops(problem, lrs)
        rows.append(row(f"share of time in matrix products: train / reverse / directional ({tag})",
                        share["reverse"], "", note=f"train {share['train']:.2f}, reverse {share['reverse']:.2f}, "
                                                  f"directional {share['directional']:.2f} (torch.profiler)"))


# ----------------------------------------------------------------------------- memory section

def memory_child(spec: str, T: int, hidden: int, threads: int, device: str = "cpu") -> None:
    """Run one measurement in this fresh process and print {"maxrss_mb", "wall_s"} as JSON
    (on CUDA, "peak_after_load_mb"/"rss_after_load_mb" are allocated device memory)."""
    import resource
    import hgtoolkit
    torch.set_num_threads(threads)
    problem, _ = build_problem(hidden, device=device)
    lrs = torch.full((T,), LR, device=device)
    # Loading the data has its own peak; reset the high-water mark (Linux: clear_refs "5") so
    # VmHWM measures the computation alone; ru_maxrss stays the whole process's peak.
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        reset = torch.cuda.memory_allocated() / 2 ** 20
    else:
        reset = _reset_peak_rss()
    t0 = time.perf_counter()
    if spec == "train":
        hgtoolkit.train(problem, lrs)
    elif spec == "stored":
        hgtoolkit.hypergradient(problem, lrs, checkpoint=None, memory="1TB")  # what it costs, even past the budget
    elif spec.startswith("ckpt"):
        hgtoolkit.hypergradient(problem, lrs, checkpoint=int(spec[4:]))
    else:
        raise ValueError(spec)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else (_status_mb("VmHWM") if reset else None)
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_after_load_mb": peak,
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


def run_child(spec: str, T: int, hidden: int, threads: int, device: str = "cpu") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", spec, "--T", str(T),
           "--hidden", str(hidden), "--threads", str(threads), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}",
                "returncode": out.returncode}
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_available_mb(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0] / 2 ** 20
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory(args, rows: list, details: dict) -> None:
    threads = args.threads[0]
    T = args.T_memory
    k = args.memory_checkpoint or max(1, round(math.sqrt(T)))
    dev = args.device
    budget = args.memory_fraction * mem_available_mb(dev)
    probes, hidden = {}, args.hidden
    # per-step cost of storing every step, from a short run; shrink the model until T fits
    n_probe = min(100, T)
    while True:
        a = run_child("stored", n_probe, hidden, threads, dev)
        if a.get("peak_after_load_mb") is not None:
            per_step = (a["peak_after_load_mb"] - a["rss_after_load_mb"]) / n_probe
            need = a["rss_after_load_mb"] + per_step * T
        else:  # no VmHWM reset: one more run and the difference of the two peaks
            b = run_child("stored", 2 * n_probe, hidden, threads, dev)
            per_step = (b["maxrss_mb"] - a["maxrss_mb"]) / n_probe
            need = a["maxrss_mb"] + per_step * (T - n_probe)
        probes[hidden] = {"probe_T": n_probe, "probe": a, "per_step_mb": per_step, "predicted_T_mb": need}
        if need <= budget or hidden <= 64:
            break
        hidden //= 2
    shrunk = hidden != args.hidden
    details["memory"] = {"T": T, "checkpoint": k, "hidden": hidden, "requested_hidden": args.hidden,
                         "hidden_reduced": shrunk, "budget_mb": budget, "probes": probes,
                         "note": (f"storing all {T} steps of the {args.hidden}-unit MLP was predicted to need "
                                  f"{probes[args.hidden]['predicted_T_mb']:.0f} MB > budget {budget:.0f} MB "
                                  f"({args.memory_fraction:.0%} of MemAvailable): measured with hidden={hidden}"
                                  if shrunk else f"full model (hidden={hidden})")}
    specs = ("train", "stored", "ckpt10", f"ckpt{k}") if k != 10 else ("train", "stored", "ckpt10")
    for spec in specs:
        details["memory"][spec] = run_child(spec, T, hidden, threads, dev)
    m = details["memory"]
    arch = f"3×{hidden}"
    extra = {}  # MB the computation adds to the process after loading the data
    what = "peak RSS" if dev == "cpu" else f"peak {dev} memory allocated"
    labels = {"train": "train", "stored": "reverse, all steps stored", "ckpt10": "reverse, checkpoint=10",
              f"ckpt{k}": f"reverse, checkpoint={k} (√T)"}
    for spec in specs:
        label = labels[spec]
        r = m[spec]
        if "error" in r:
            rows.append(row(f"{what} {label}, T={T} ({arch})", None, "MB", note=f"FAILED: {r['error']}"))
            continue
        if r.get("peak_after_load_mb") is not None:
            extra[spec] = r["peak_after_load_mb"] - r["rss_after_load_mb"]
            note = (f"+{extra[spec]:.0f} MB over the {r['rss_after_load_mb']:.0f} MB after loading "
                    f"(VmHWM reset after loading); {r['wall_s']:.1f} s")
        else:
            note = f"{r['wall_s']:.1f} s"
        rows.append(row(f"{what} {label}, T={T} ({arch})", r["maxrss_mb"] if dev == "cpu" else r["peak_after_load_mb"],
                        "MB", note=note))
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
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
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
        memory_child(args._child, args.T, args.hidden, args.threads[0], args.device)
        return 0
    if args.quick:
        args.repeats, args.T, args.T_forward, args.chunk, args.T_memory = 1, 10, 4, 2, 60
        args.hidden = 64
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.device.startswith("cuda"):
        args.threads = args.threads[:1]

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
    payload["device"] = args.device
    if args.device != "cpu":
        payload["env"]["device_name"] = torch.cuda.get_device_name(args.device)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(payload, indent=1, default=str))
        path = args.json
    else:
        name = "exact" if args.device == "cpu" else "exact_" + args.device.replace(":", "")
        path = write_results(name if not args.quick else name + "_quick", payload)
    where = f"CPU ({payload['env']['cpu']})" if args.device == "cpu" else payload["env"]["device_name"]
    print(f"\nexact hypergradients, {details.get('data', '')[:60]}; MLP 3×{args.hidden}, batch 100, "
          f"float32, {where}; load average {payload['env']['loadavg'][0]:.1f} → "
          f"{details['env_after_loadavg'][0]:.1f} on {os.cpu_count()} CPUs\n")
    print(format_table(rows))
    print(f"\nwrote {path} ({details['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
