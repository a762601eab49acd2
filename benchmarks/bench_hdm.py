"""Per-iteration cost of HDM (``hgtoolkit.hdm``) ÷ a plain gradient-descent iteration, ratios in one run.

HDM's iteration is two levels of the one hyper-level step (``hgtoolkit.hyperstep``: the trial
update ``hdm.TrialStep``, θ = (P, β) by an AdaGrad level) plus its own bookkeeping, around ONE
gradient and function evaluation, the same as GD's. The baseline is that: ``max_iter``
iterations x ← x − ∇f(x)/L with the same oracle; each candidate is ``hdm.run`` for the same
number of iterations (tolerance 1e-300: it never stops early). The ratio is HDM's cost in GD
iterations (medians of per-round ratios of interleaved runs, ``common.interleaved``, one
thread, float64), on diagonal quadratics of n = 50 and n = 2000 coordinates with a closed-form
oracle (the per-iteration overhead shows; a costly f hides it):

- HDM-Best (diagonal P, learnt momentum), HDM (diagonal P, no momentum), HDM with a scalar P;
- Baydin's HD as HDM's special case (``mode="scalar"``, no momentum, null steps, AdaGrad,
  normalisation or η_p schedule).

    python benchmarks/bench_hdm.py [--steps 200 --repeats 7 --threads 1 --quick]

Writes ``benchmarks/results/hdm.json`` and prints a table.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

from hgtoolkit import hdm  # noqa: E402

F64 = torch.float64


def variants(L: float) -> dict[str, hdm.HDMConfig]:
    return {"HDM-Best": hdm.HDMConfig(L=L),
            "HDM (diag)": hdm.HDMConfig(L=L, momentum=False),
            "HDM (scalar)": hdm.HDMConfig(L=L, mode="scalar", momentum=False),
            "HD (Baydin)": hdm.HDMConfig(L=L, mode="scalar", momentum=False, p0=0.5 / L, eta_p=1e-4 / L,
                                         null_steps=False, adagrad=False, normalise=False,
                                         schedule_hyper_lr=False)}


def main(argv=None) -> int:
    args = common.arguments(argv, __doc__, steps=200, repeats=7)
    steps = 20 if args.quick else args.steps
    repeats = 2 if args.quick else args.repeats
    load = os.getloadavg()
    rows, raw = [], {}
    for n in ((50,) if args.quick else (50, 2000)):
        a = torch.linspace(1.0, 100.0, n, dtype=F64)
        L = float(a.max())
        f = lambda x: 0.5 * (a * x * x).sum()
        oracle = lambda x: (0.5 * (a * x * x).sum(), a * x)
        x0 = torch.ones(n, dtype=F64)

        def gd():
            x = x0
            for _ in range(steps):
                _, g = oracle(x)
                x = x - g / L

        cands = {name: (lambda cfg=cfg: hdm.run(f, x0, cfg, max_iter=steps, tol=1e-300, oracle=oracle))
                 for name, cfg in variants(L).items()}
        res = common.interleaved(gd, cands, repeats)
        raw[n] = {k: {kk: vv for kk, vv in v.items() if kk != "samples"} for k, v in res.items()}
        for name in cands:
            rows.append(common.row(f"{name} iteration ÷ GD iteration, n = {n}", res[name]["ratio_cpu"], "×",
                                   note=f"{1e6 * res[name]['cpu_s'] / steps:.0f} µs CPU per iteration"))
    return common.report("hdm", rows, {"benchmark": "hdm", "steps": steps, "repeats": repeats, "raw": raw},
                         load, args.threads)


if __name__ == "__main__":
    sys.exit(main())
