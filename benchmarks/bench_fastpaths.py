"""What each fast path of ``hgtoolkit.fastpaths`` saves: the reference ÷ the path, ratios in one run.

The paths compute the reference's numbers (bit for bit, or to 1e-12 where a sum is
reassociated: ``tests/test_fastpaths.py``); this measures what they buy. Rows (float32 unless
said, one thread; medians of per-round ratios of interleaved runs, ``common.interleaved``, the
path timed right before the reference):

- ``online.run`` on the 3×500 MNIST MLP, HD / RTHO / MARTHE (train objective): the engine with
  the reference ``Plan()`` ÷ the plan ``online.run`` picks (buffer donation; HD also its
  direction kept as z);
- the same on Beale (float64, 500 steps: the per-step overhead);
- the drop-in ``optim.MARTHE`` (RTHO) on the 50×32 MLP (102 parameter tensors): the per-tensor
  reference step ÷ the flat buffers (``FlatGroup``);
- the exact reverse pass (``hypergradient``, stored and binomial) on the MNIST MLP, heavy ball:
  the reference adjoint (``SGD.cotangent``) ÷ the step in place (``adjoint_in_place``).

Runs as a batch (``Plan.rows``) are measured by ``bench_batched.py``.

    python benchmarks/bench_fastpaths.py [--steps 20 --repeats 5 --threads 1 --quick]

Writes ``benchmarks/results/fastpaths.json`` and prints a table.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import bench_dropin  # noqa: E402

from hgtoolkit import fastpaths, online, optim, problems  # noqa: E402
from hgtoolkit.settings import OnlineSettings  # noqa: E402


def _beta(fn) -> str:
    """The hyper-LR keyword of ``fn`` (``hypergrad_lr``, or ``beta`` before the rename)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    return "hypergrad_lr" if "hypergrad_lr" in params else "beta"


def reference_plan(fn):
    """``fn`` with every engine that ``online.run`` builds on the reference ``Plan()``."""
    def call():
        picked = online.engine_for
        online.engine_for = lambda *a, **k: dataclasses.replace(picked(*a, **k), plan=fastpaths.Plan())
        try:
            return fn()
        finally:
            online.engine_for = picked
    return call


def main(argv=None) -> int:
    args = common.arguments(argv, __doc__, steps=20, repeats=5)
    warnings.simplefilter("ignore")
    load = os.getloadavg()
    hidden = (64,) if args.quick else (500, 500, 500)
    steps = 3 if args.quick else args.steps
    beta = "hypergrad_lr" if "hypergrad_lr" in {f.name for f in dataclasses.fields(OnlineSettings)} else "beta"
    mnist = problems.mnist_mlp(hidden=hidden)
    beale = problems.from_function("beale")
    rows, payload = [], {}

    def runs(prob, T, lr, hyper):
        out = {}
        for method, kw in (("hd", {"lr_floor": None}), ("rtho", {}), ("marthe", {"mu": "auto"})):
            fast = lambda m=method, kw=kw: online.run(prob, method=m, lr=lr, steps=T, objective="train",
                                                       keep_params=False, **{beta: hyper}, **kw)
            out[method] = (fast, reference_plan(fast))
        return out

    for label, prob, T, lr, hyper in (
            (f"{'×'.join(map(str, hidden))} MNIST MLP, T={steps}", mnist, steps, 0.05, 1e-4),
            ("Beale, float64, T=500" if not args.quick else "Beale, float64, T=50", beale,
             50 if args.quick else 500, 1e-3, 1e-7)):
        for method, (fast, ref) in runs(prob, T, lr, hyper).items():
            r = common.interleaved(fast, {"reference": ref}, repeats=args.repeats)["reference"]
            payload[f"{method}, {label}"] = r
            rows.append(common.row(f"online {method.upper()}: reference Plan() ÷ the picked plan, {label}",
                                   r["ratio_wall"], "×", note=f"CPU-time ratio {r['ratio_cpu']:.2f}"))

    size = "64-128-10" if args.quick else "50×32"
    data = bench_dropin.batches(size, steps)
    key = _beta(optim.MARTHE.__init__)

    def dropin(flat):
        run = bench_dropin.make(size, lambda ps: optim.MARTHE(ps, lr=0.05, method="rtho", objective="train",
                                                                **{key: 1e-4}), data, closure=True)
        run.opt._flat_buffers = flat
        return run
    r = common.interleaved(dropin(True), {"reference": dropin(False)}, repeats=args.repeats)["reference"]
    payload[f"dropin flat, {size}"] = r
    rows.append(common.row(f"drop-in MARTHE (RTHO): per-tensor reference ÷ flat buffers, {size} MLP, T={steps}",
                           r["ratio_wall"], "×", note=f"CPU-time ratio {r['ratio_cpu']:.2f}"))
    from hgtoolkit import exact
    lrs = torch.full((steps,), 0.05)

    def reverse(in_place, **kw):
        def call():
            if in_place:
                return exact.hypergradient(mnist, lrs, "momentum", **kw)
            picked, fastpaths.adjoint_in_place = fastpaths.adjoint_in_place, lambda *a, **k: None
            try:
                return exact.hypergradient(mnist, lrs, "momentum", **kw)
            finally:
                fastpaths.adjoint_in_place = picked
        return call
    for label, kw in (("stored", {"checkpoint": None}), ("binomial c=4", {"checkpoint": "binomial", "snapshots": 4})):
        r = common.interleaved(reverse(True, **kw), {"reference": reverse(False, **kw)}, repeats=args.repeats)["reference"]
        payload[f"reverse {label}"] = r
        rows.append(common.row(f"exact reverse ({label}): reference adjoint ÷ in place, "
                               f"{'×'.join(map(str, hidden))} MNIST MLP, momentum, T={steps}",
                               r["ratio_wall"], "×", note=f"CPU-time ratio {r['ratio_cpu']:.2f}"))
    return common.report("fastpaths", rows, {"steps": steps, "repeats": args.repeats,
                                             "timings": {k: {x: v[x] for x in ("wall_s", "cpu_s", "ratio_wall",
                                                                              "ratio_cpu")}
                                                         for k, v in payload.items()}}, load, args.threads)


if __name__ == "__main__":
    sys.exit(main())
