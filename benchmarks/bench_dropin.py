"""Per-step cost of the drop-in optimizers against the ``torch.optim`` optimizer they extend.

Issue 14's targets (full step = zero_grad + forward + backward + ``step``, float32, one thread,
÷ the same loop with the ``torch.optim`` counterpart, ratios in one run):

- 3×500 MLP (784-500-500-500-10, batch 100): ``optim.SGDHD`` ≤ 1.1× SGD, ``optim.AdamHD``
  ≤ 1.15× Adam, ``optim.MARTHE`` (train objective, closure) ≤ 2.5× SGD, tower
  sgd/sgd ≤ 1.3× SGD, tower adam/sgd ≤ 2× Adam;
- 64-128-10 MLP (batch 100, overhead-bound): SGDHD ≤ 2× SGD, MARTHE ≤ 4× SGD.

A third network, 50 hidden layers of 32 (102 parameter tensors), shows the cost per parameter
tensor (no target).

Two *floor* rows time the cheapest code for the same computation in the same rounds: a minimal
SGD-HD (one dot pass and torch.optim.SGD's update, nothing else) and torch.optim.SGD with the
gradient + one Hessian-vector product that MARTHE/RTHO need (``MinimalSGDHD``,
``GradientPlusHVP``): no drop-in written with PyTorch ops can be cheaper.

Every optimizer trains its own copy of one ``torch.nn.Sequential`` (same initial weights, same
random minibatches) in an ordinary loop. Ratios are medians of per-round ratios of interleaved
runs (``common.interleaved``: the baseline is timed right before each candidate), so the load
of a shared machine hits both sides alike. ``--profile NAME`` prints a cProfile of one
candidate instead.

    python benchmarks/bench_dropin.py [--steps 20 --repeats 7 --threads 1]

Writes ``benchmarks/results/dropin.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import cProfile
import copy
import pstats
import sys
import warnings
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from hgtoolkit import optim, towers  # noqa: E402

SIZES = {"3×500": (784, (500, 500, 500), 10), "64-128-10": (64, (128,), 10),
         "50×32": (32, (32,) * 50, 10)}  # 102 small tensors: the cost per parameter tensor
BATCH = 100

# name: (baseline, factory, uses a closure, target per size)
CANDIDATES = {
    "optim.SGDHD": ("SGD", lambda ps: optim.SGDHD(ps, lr=0.05, hypergrad_lr=1e-4), False,
                    {"3×500": 1.1, "64-128-10": 2.0}),
    "optim.AdamHD": ("Adam", lambda ps: optim.AdamHD(ps, lr=1e-3, hypergrad_lr=1e-8), False,
                     {"3×500": 1.15}),
    "optim.MARTHE (objective=train)": (
        "SGD", lambda ps: optim.MARTHE(ps, lr=0.05, hypergrad_lr=1e-4, mu="auto", objective="train"), True,
        {"3×500": 2.5, "64-128-10": 4.0}),
    "tower sgd/sgd": ("SGD", lambda ps: towers.parse("sgd(lr=0.05) / sgd(lr=1e-4)").optimizer(ps),
                      False, {"3×500": 1.3}),
    "tower adam/sgd": ("Adam", lambda ps: towers.parse("adam(lr=1e-3) / sgd(lr=1e-5)").optimizer(ps),
                       False, {"3×500": 2.0}),
}


class MinimalSGDHD(torch.optim.Optimizer):
    """Floor of SGD-HD written with torch ops: h = Σ ⟨g_t, g_{t−1}⟩ (one dot pass), η += β h as a
    Python float, p −= η g (torch.optim.SGD's kernel), g_t kept by reference — no checks, no
    state tensors, no divergence detection: what any Python SGD-HD costs at least."""

    def __init__(self, params, lr, hypergrad_lr):
        super().__init__(params, {"lr": lr})
        self.beta, self.prev = hypergrad_lr, None

    @torch.no_grad()
    def step(self):
        ps = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in ps]
        group = self.param_groups[0]
        if self.prev is not None:
            h = sum(torch.dot(g.view(-1), q.view(-1)) for g, q in zip(grads, self.prev))
            group["lr"] += self.beta * float(h)
        for p, g in zip(ps, grads):
            p.add_(g, alpha=-group["lr"])
        self.prev = grads


class GradientPlusHVP(torch.optim.SGD):
    """Floor of MARTHE/RTHO as a drop-in: torch.optim.SGD whose closure's gradient is kept
    with ``create_graph`` and differentiated once more along a stored z (H_t z): the gradient +
    one HVP that no exact μ ≠ 0 method can skip, and nothing else. z is the last step's
    gradient, −g_{t−1} (HD's tangent, the size a real tangent has): on the 50-layer MLP the first
    layers' gradients are ~1e-21, and the HVP along them computes in float32's subnormal range,
    which a CPU does several times slower; a random z of unit size would time a cheaper HVP than
    any real run's."""

    def step(self, closure):
        ps = [p for g in self.param_groups for p in g["params"]]
        with torch.enable_grad():
            grads = torch.autograd.grad(closure(), ps, create_graph=True)
            if not hasattr(self, "z"):
                self.z = [-g.detach() for g in grads]
            hz = torch.autograd.grad(grads, ps, grad_outputs=self.z)
        for p, g, z in zip(ps, grads, self.z):
            p.grad = g.detach()
            torch.neg(p.grad, out=z)
        super().step()
        return hz


# floors: what the cheapest implementation of the same computation costs, timed like the rest
FLOORS = {
    "floor: minimal SGD-HD in torch ops": ("SGD", lambda ps: MinimalSGDHD(ps, lr=0.05, hypergrad_lr=1e-4),
                                           False, {}),
    "floor: SGD + gradient + one HVP": ("SGD", lambda ps: GradientPlusHVP(ps, lr=0.05), True, {}),
}
BASELINES = {"SGD": lambda ps: torch.optim.SGD(ps, lr=0.05),
             "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3)}


def mlp(size: str) -> nn.Module:
    d_in, hidden, d_out = SIZES[size]
    torch.manual_seed(0)
    layers, d = [], d_in
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, d_out))


def batches(size: str, n: int) -> list:
    d_in, _, d_out = SIZES[size]
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, d_in, generator=gen), torch.randint(d_out, (BATCH,), generator=gen))
            for _ in range(n)]


def loop(model: nn.Module, opt, data: list, closure: bool):
    """The user's training loop: ``steps`` full steps; returns a function timing them."""
    def run():
        for x, y in data:
            if closure:
                opt.step(lambda: F.cross_entropy(model(x), y))
            else:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    run.opt = opt
    return run


def make(size: str, factory, data, closure=False):
    model = copy.deepcopy(mlp(size))
    return loop(model, factory(list(model.parameters())), data, closure)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="full steps per timed call")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--profile", metavar="NAME", help="cProfile one candidate (on --sizes[0])")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    if args.profile:
        size = args.sizes[0]
        data = batches(size, args.steps)
        base, factory, closure, _ = CANDIDATES[args.profile]
        fn = make(size, factory, data, closure)
        fn()
        prof = cProfile.Profile()
        prof.runcall(fn)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0

    rows = []
    for size in args.sizes:
        data = batches(size, args.steps)
        for base in BASELINES:
            cands = {name: c for name, c in {**CANDIDATES, **FLOORS}.items() if c[0] == base}
            runs = {name: make(size, factory, data, closure) for name, (_, factory, closure, _) in cands.items()}
            res = common.interleaved(make(size, BASELINES[base], data), runs, repeats=args.repeats, warmup=1)
            per_step = res["baseline"]["wall_s"] / args.steps
            for name, (_, _, _, targets) in cands.items():
                r, tgt = res[name], targets.get(size)
                # a drop-in that diverged stops updating: its time is not a step's time
                diverged = [g["diverged_at"] for g in runs[name].opt.param_groups if g.get("diverged_at") is not None]
                value = None if diverged else r["ratio_wall"]
                rows.append(common.row(f"{name} ÷ torch.optim.{base}, {size} MLP", value, "×",
                                       f"≤ {tgt}" if tgt else None,
                                       None if tgt is None or value is None else bool(value <= tgt),
                                       f"diverged at step {diverged[0]} (DivergenceWarning): not timed" if diverged else
                                       f"CPU ratio {r['ratio_cpu']:.2f}; {r['wall_s'] / args.steps * 1e3:.2f} "
                                       f"ms/step vs {per_step * 1e3:.2f}"))
    payload = {"rows": rows, "env": common.env_info(args.threads), "batch": BATCH, "steps": args.steps,
               "repeats": args.repeats, "sizes": {k: SIZES[k] for k in args.sizes}}
    print(common.format_table(rows), f"written: {common.write_results('dropin', payload)}", sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
