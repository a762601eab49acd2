"""Cost of the truncated-horizon references vs one full hypergradient (reverse mode).

    PYTHONPATH=. python benchmarks/bench_horizons.py [T]

truncated_ladder does one reverse pass (g: every K ≥ T and each rung's tail) plus, for the rungs
K < T, T − 1 jvps of width W = max{K < T} and ≤ T gradients of E in one forward pass; T separate
unrolls would cost T(T+1)/2 steps. Prints seconds (median of 3) per call, 1 torch thread.
"""
import sys
import time

import torch

from hgtoolkit import horizons, hypergradient, problems


def _time(fn, reps=3):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main(T: int = 100) -> None:
    torch.set_num_threads(1)
    p = problems.mnist_mlp(n_train=1000, n_val=200, hidden=(50, 50), dtype=torch.float64)
    lrs = torch.full((T,), 0.05, dtype=torch.float64)
    base = _time(lambda: hypergradient(p, lrs))
    print(f"T={T}: full hypergradient (reverse) {base:.3f} s")
    for K in (1, 10, T):
        s = _time(lambda: horizons.truncated(p, lrs, K))
        print(f"  truncated K={K:>3}: {s:.3f} s  ({s / base:.2f}× one hypergradient)")
    s = _time(lambda: horizons.truncated_ladder(p, lrs, [1, 10, T]))
    print(f"  ladder K=1,10,T (width 10): {s:.3f} s  ({s / base:.2f}×)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100)
