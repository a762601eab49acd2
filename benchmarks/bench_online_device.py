"""Online engine on any device (``--device cuda``): per-step cost of HD / RTHO / MARTHE ÷ a plain
SGD loop, and R runs as one vmapped batch ÷ R single runs, on a 3×500 MLP with MNIST-shaped
synthetic data (784 inputs, 10 classes: no dataset is needed on the device machine).

Ratios are medians of interleaved rounds measured in one process (``common.interleaved``); on
CUDA every timed call ends with ``torch.cuda.synchronize()``. Prints a table and writes
``results/online_device_<device>.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hgtoolkit import batched, online, problems  # noqa: E402


def synthetic_mnist_mlp(device, dtype, seed=0, n_train=2000, n_val=500):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 784, generator=g)
    def sample(n):
        y = torch.randint(10, (n,), generator=g)
        return (centres[y] + 2 * torch.randn(n, 784, generator=g)).to(device, dtype), y.to(device)
    (xt, yt), (xv, yv) = sample(n_train), sample(n_val)
    return problems.classification_mlp(xt, yt, xv, yv, hidden=(500, 500, 500), batch_size=100, seed=seed,
                                       name="synthetic_mnist_mlp", info={"data": "synthetic, MNIST-shaped"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--runs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    p = synthetic_mnist_mlp(dev, torch.float32)
    T, lr = args.steps, 0.05

    def plain_sgd():
        w = {k: v.clone().requires_grad_(True) for k, v in p.params0.items()}
        for t in range(T):
            grads = torch.autograd.grad(p.train_loss(w, t), list(w.values()))
            with torch.no_grad():
                for x, gx in zip(w.values(), grads):
                    x.sub_(lr * gx)
        sync()

    def run(**kw):
        def fn():
            online.run(p, lr=lr, steps=T, objective="train", keep_params=False, **kw)
            sync()
        return fn

    res = common.interleaved(plain_sgd, {
        "HD": run(method="hd", hypergrad_lr=1e-4, lr_floor=None),
        "RTHO": run(method="rtho", hypergrad_lr=1e-4),
        "MARTHE μ auto": run(method="marthe", mu="auto", hypergrad_lr=1e-4),
    }, repeats=args.repeats)
    rows = [common.row(f"{name} ÷ plain SGD loop, T={T}, 3×500 MLP, {dev.type}", r["ratio_wall"], "×", None, None,
                       f"{r['wall_s'] / T * 1e3:.2f} ms/step")
            for name, r in res.items() if name != "baseline"]

    cells = [dict(method="marthe", mu="auto", lr=lr, hypergrad_lr=b, steps=T, objective="train", seed=s)
             for s in range(args.runs // 4) for b in (1e-5, 1e-4, 1e-3, 1e-2)]
    factory = lambda seed: synthetic_mnist_mlp(dev, torch.float32, seed=seed)
    batched.run_online_batch(factory, cells[:2])
    sync()
    t0 = time.perf_counter()
    batched.run_online_batch(factory, cells)
    sync()
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in cells[:2]:
        online.run(factory(c["seed"]), **c, keep_params=False)
    sync()
    t_loop = (time.perf_counter() - t0) * len(cells) / 2
    rows.append(common.row(f"{len(cells)} MARTHE runs: loop of online.run ÷ one vmapped batch, {dev.type}",
                           t_loop / t_batch, "× faster", None, None,
                           f"batch {t_batch:.2f} s, loop {t_loop:.2f} s (projected from 2 runs)"))
    env = common.env_info(args.threads)
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
    path = common.write_results(f"online_device_{dev.type}", {"rows": rows, "env": env, "steps": T})
    print(common.format_table(rows))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
