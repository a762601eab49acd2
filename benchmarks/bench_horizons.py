"""Cost of the truncated-horizon references vs one full hypergradient (reverse mode).

    PYTHONPATH=. python benchmarks/bench_horizons.py [--steps T] [--repeats R] [--quick]

truncated_ladder does one reverse pass (g: every K ≥ T and each rung's tail) plus, for the rungs
K < T, T − 1 jvps of width W = max{K < T} and ≤ T gradients of E in one forward pass; T separate
unrolls would cost T(T+1)/2 steps. Each row is one call's time ÷ one full hypergradient's, timed
in the same process round-robin (``common.interleaved``: the median of the per-round ratios),
1 torch thread; the seconds are in the notes. Writes ``results/horizons.json``
(``--quick``: a small MLP, T = 10, one round, to ``results/horizons_quick.json``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import common  # noqa: E402
from hgtoolkit import horizons, hypergradient, problems  # noqa: E402


def measure(T: int, repeats: int, quick: bool) -> tuple[list[dict], dict]:
    if quick:
        p = problems.mnist_mlp(n_train=200, n_val=50, hidden=(16,), dtype=torch.float64)
    else:
        p = problems.mnist_mlp(n_train=1000, n_val=200, hidden=(50, 50), dtype=torch.float64)
    lrs = torch.full((T,), 0.05, dtype=torch.float64)
    ks = sorted({1, min(10, T), T})
    mid = [k for k in ks if k < T]
    candidates = {f"truncated K={K}": (lambda K=K: horizons.truncated(p, lrs, K)) for K in ks}
    ladder = f"ladder K={','.join(map(str, ks))} (width {max(mid) if mid else 0})"
    candidates[ladder] = lambda: horizons.truncated_ladder(p, lrs, ks)
    timing = common.interleaved(lambda: hypergradient(p, lrs), candidates, repeats)
    base = timing["baseline"]
    rows = [common.row(f"T={T}: {name} ÷ one full hypergradient (reverse)", timing[name]["ratio_wall"], "×",
                       note=f"{timing[name]['wall_s']:.3g} s vs {base['wall_s']:.3g} s wall; "
                            f"CPU ratio {timing[name]['ratio_cpu']:.2f}")
            for name in candidates]
    rows.append(common.row(f"T={T}: one full hypergradient (reverse)", base["wall_s"], "s",
                           note=f"median of {base['samples']} calls; MLP {p.name}"))
    return rows, {"T": T, "ks": ks, "quick": quick, "timing": timing}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].isdigit():  # the old form: bench_horizons.py T
        argv = ["--steps", argv[0], *argv[1:]]
    args = common.arguments(argv, __doc__, steps=100, repeats=3)
    T, repeats = (10, 1) if args.quick else (args.steps, args.repeats)
    load_before = os.getloadavg()
    rows, payload = measure(T, repeats, args.quick)
    return common.report("horizons", rows, payload, load_before, args.threads)


if __name__ == "__main__":
    raise SystemExit(main())
