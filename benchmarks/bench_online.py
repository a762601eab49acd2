"""Cost of the online LR methods relative to plain training, measured as ratios in one run.

Issue targets (3×500 MNIST MLP, float32, one thread, ÷ a plain SGD loop of the same T):
HD ≤ 1.1× (functional ``online.run`` and drop-in ``optim.SGDHD`` vs ``torch.optim.SGD``),
RTHO and MARTHE (train objective) ≤ 2.5×, MARTHE with ``val_batch_size=100`` ≤ 3×; Beale,
500 steps, RTHO ÷ a hand-written autograd GD loop ≤ 4×; the 90 Fig.-1 runs (3 functions ×
HD/RTHO/MARTHE × β) as one batch vs a loop of single runs ≥ 20× faster.

Baselines are hand-written loops (what a user would write): ``plain_sgd`` = autograd gradient
+ in-place ``w − η g`` per step (the strict baseline: its RTHO/MARTHE targets lie below the
floor of one gradient + one HVP, the ``floor`` rows); ``functional_sgd`` = the plain SGD loop of
the project's yardstick ``../shared/checks/online_speed.py`` (``torch.func.grad`` + ``tree_map``),
timed at that script's setting too; the drop-ins are compared with the same loop over an ``nn.Module``-style
parameter dict and ``torch.optim.SGD``. Ratios are medians of per-round ratios of interleaved
runs (``common.interleaved``), so machine load hits both sides alike.
"""
from __future__ import annotations

import argparse
import sys
import statistics
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hgtoolkit import batched, online, optim, problems  # noqa: E402


def plain_sgd(problem, lr, steps):
    """The hand-written baseline: autograd gradient and w ← w − η g."""
    params = {k: v.clone().requires_grad_(True) for k, v in problem.params0.items()} \
        if isinstance(problem.params0, dict) else problem.params0.clone().requires_grad_(True)
    leaves = list(params.values()) if isinstance(params, dict) else [params]
    for t in range(steps):
        grads = torch.autograd.grad(problem.train_loss(params, t), leaves)
        with torch.no_grad():
            for p, g in zip(leaves, grads):
                p.sub_(lr * g)


def functional_sgd(problem, lr, steps):
    """The yardstick's plain SGD loop (``../shared/checks/online_speed.py``): ``torch.func.grad``
    of the training loss and w ← w − η g by ``tree_map``, out of place."""
    from torch.func import grad
    from torch.utils._pytree import tree_map
    g = grad(problem.train_loss)
    p = problem.params0
    for t in range(steps):
        p = tree_map(lambda a, b: a - lr * b, p, g(p, t))
    return p


def hvp_floor(problem, lr, steps, val_batch_size=None):
    """What RTHO/MARTHE cannot do without: the plain SGD loop with the gradient replaced by the
    gradient + one Hessian-vector product (double backward) per step — and, with
    ``val_batch_size``, one validation-minibatch gradient too. Their ratio to the SGD loop is the
    floor of those methods' ratios (the engine's own cost is what lies above it)."""
    from hgtoolkit.trajectory import autograd_gradient, autograd_gradient_hvp
    w = {k: v.clone() for k, v in problem.params0.items()}
    z = {k: torch.zeros_like(v) for k, v in w.items()}
    for t in range(steps):
        g, _, hz = autograd_gradient_hvp(problem.train_loss, w, z, t)
        if val_batch_size is not None:
            autograd_gradient(problem.batch_loss, w, problem.val_batch(t, val_batch_size))
        with torch.no_grad():
            for k in w:
                w[k].sub_(lr * g[k])
                z[k].sub_(g[k]).add_(hz[k], alpha=-lr)


def module_loop(problem, make_opt, steps, closure=False):
    """An ordinary PyTorch loop over the problem's minibatches with a torch.optim optimizer."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in problem.params0.items()}
    opt = make_opt(list(params.values()))
    for t in range(steps):
        if closure:
            opt.step(lambda: problem.train_loss(params, t))
        else:
            opt.zero_grad()
            problem.train_loss(params, t).backward()
            opt.step()


def fig1_cells(steps):
    betas = [10.0 ** e for e in range(-10, -4)]  # 6 β × (HD, RTHO, MARTHE μ=0.99, μ auto, μ=0.9) = 30
    cells = []
    for method, mu in (("hd", None), ("rtho", None), ("marthe", 0.99), ("marthe", "auto"), ("marthe", 0.9)):
        for b in betas:
            c = dict(method=method, lr=1e-3, hypergrad_lr=b, steps=steps, lr_max=0.1)
            if mu is not None:
                c["mu"] = mu
            cells.append(c)
    return cells


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: small MLP, few steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    hidden = (64,) if args.quick else (500, 500, 500)
    steps = 5 if args.quick else args.steps
    p = problems.mnist_mlp(hidden=hidden)
    lr = 0.05
    run = lambda **kw: (lambda: online.run(p, lr=lr, steps=steps, keep_params=False, **kw))
    rows = []

    def add(results, base, targets, label):
        for name, r in results.items():
            if name == "baseline":
                continue
            tgt = targets.get(name)
            rows.append(common.row(f"{name} ÷ {base}, {label}", r["ratio_wall"], "×",
                                   f"≤ {tgt}" if tgt else None,
                                   None if tgt is None else bool(r["ratio_wall"] <= tgt),
                                   f"CPU-time ratio {r['ratio_cpu']:.2f}"))

    label = f"T={steps}, {'×'.join(map(str, hidden))} MLP, float32"
    engine = common.interleaved(lambda: plain_sgd(p, lr, steps), {
        "HD (objective=train)": run(method="hd", hypergrad_lr=1e-4, objective="train", lr_floor=None),
        "RTHO (objective=train)": run(method="rtho", hypergrad_lr=1e-4, objective="train"),
        "MARTHE μ auto (objective=train)": run(method="marthe", mu="auto", hypergrad_lr=1e-4, objective="train"),
        "MARTHE μ, β auto (val_batch_size=100)": run(method="marthe", mu="auto", hypergrad_lr="auto",
                                                     kappa=1e-6, val_batch_size=100),
        "MARTHE μ, β auto (full validation set)": run(method="marthe", mu="auto", hypergrad_lr="auto", kappa=1e-6),
        "floor: gradient + HVP loop (no hyper-update)": lambda: hvp_floor(p, lr, steps),
        "floor: gradient + HVP + validation-minibatch gradient loop": lambda: hvp_floor(p, lr, steps, 100),
    }, repeats=args.repeats)
    add(engine, "plain SGD loop", {"HD (objective=train)": 1.1, "RTHO (objective=train)": 2.5,
                                   "MARTHE μ auto (objective=train)": 2.5,
                                   "MARTHE μ, β auto (val_batch_size=100)": 3.0}, label)
    # the same ratios at the yardstick's settings and baseline (../shared/checks/online_speed.py:
    # 1000/200 examples, T = 20, the functional SGD loop)
    if not args.quick:
        y = problems.mnist_mlp(n_train=1000, n_val=200, batch_size=100, seed=0)
        yrun = lambda **kw: (lambda: online.run(y, lr=lr, steps=20, keep_params=False, **kw))
        yard = common.interleaved(lambda: functional_sgd(y, lr, 20), {
            "HD (objective=train)": yrun(method="hd", hypergrad_lr=1e-4, objective="train", lr_floor=None),
            "RTHO (objective=train)": yrun(method="rtho", hypergrad_lr=1e-4, objective="train"),
            "MARTHE μ auto (objective=train)": yrun(method="marthe", mu="auto", hypergrad_lr=1e-4, objective="train"),
            "MARTHE μ, β auto (val_batch_size=100)": yrun(method="marthe", mu="auto", hypergrad_lr="auto",
                                                          kappa=1e-6, val_batch_size=100),
        }, repeats=args.repeats)
        add(yard, "the yardstick's plain SGD loop (torch.func.grad + tree_map)",
            {"HD (objective=train)": 1.1, "RTHO (objective=train)": 2.5,
             "MARTHE μ auto (objective=train)": 2.5, "MARTHE μ, β auto (val_batch_size=100)": 3.0},
            "T=20, 1000/200 examples, 500×500×500 MLP, float32 (online_speed.py's setting)")
    dropin = common.interleaved(lambda: module_loop(p, lambda ps: torch.optim.SGD(ps, lr=lr), steps), {
        "optim.SGDHD": lambda: module_loop(p, lambda ps: optim.SGDHD(ps, lr=lr, hypergrad_lr=1e-4), steps),
        "optim.MARTHE (objective=train)": lambda: module_loop(
            p, lambda ps: optim.MARTHE(ps, lr=lr, hypergrad_lr=1e-4, mu="auto", objective="train"), steps, closure=True),
    }, repeats=args.repeats)
    add(dropin, "torch.optim.SGD loop", {"optim.SGDHD": 1.1, "optim.MARTHE (objective=train)": 2.5}, label)

    # Beale, 500 steps: RTHO vs a hand-written autograd GD loop
    beale = problems.from_function("beale")
    T = 100 if args.quick else 500
    b = common.interleaved(lambda: plain_sgd(beale, 1e-3, T), {
        "RTHO on Beale": lambda: online.run(beale, "rtho", lr=1e-3, hypergrad_lr=1e-7, steps=T, keep_params=False),
        "HD on Beale": lambda: online.run(beale, "hd", lr=1e-3, hypergrad_lr=1e-7, steps=T, keep_params=False),
    }, repeats=args.repeats)
    add(b, "hand-written GD loop", {"RTHO on Beale": 4.0}, f"T={T}, float64")

    # the Fig. 1 grid: ONE batch (the three functions' rows side by side) vs a loop of single runs
    T1 = 100 if args.quick else 500
    cells = fig1_cells(T1)
    fns = ("beale", "bukin_smooth", "bukin_sharp")
    probs = {fn: problems.from_function(fn) for fn in fns}
    t_batches = []  # the median of three: one batch takes about a second on a shared machine
    for _ in range(3):
        t0 = time.perf_counter()
        batched.run_online_batch(None, [dict(c, problem=probs[fn]) for fn in fns for c in cells])
        t_batches.append(time.perf_counter() - t0)
    t_batch = statistics.median(t_batches)
    sample = cells[::5]  # a loop over every 5th cell, scaled to all of them
    t0 = time.perf_counter()
    for fn in fns:
        for c in sample:
            online.run(probs[fn], **c, keep_params=False)
    t_loop = (time.perf_counter() - t0) * len(cells) / len(sample)
    speedup = t_loop / t_batch
    rows.append(common.row(f"Fig. 1 grid, {len(fns) * len(cells)} runs × T={T1}: loop of online.run ÷ "
                           f"one batch", speedup, "× faster", "≥ 20", bool(speedup >= 20),
                           f"batch {t_batch:.1f} s (median of 3), loop {t_loop:.1f} s (projected from every 5th run)"))

    payload = {"rows": rows, "env": common.env_info(args.threads), "data": p.info.get("data"),
               "steps": steps, "hidden": list(hidden)}
    path = common.write_results("online", payload)
    print(common.format_table(rows))
    print(f"data: {p.info.get('data')}\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
