"""Per-step cost of the online LR methods relative to plain SGD on the MNIST MLP.

Issue targets: HD ≤ 1.1×, RTHO / MARTHE ≤ 2.5× the cost of plain SGD training (one HVP per
step). Measured as ratios in one run (interleaved rounds, median of per-round ratios):

- functional engine ``online.run`` vs ``trajectory.train`` (the same T steps of plain SGD);
  HD in Baydin's form (``objective="train"``: no extra gradient), and HD / RTHO / MARTHE with
  the validation objective (one extra gradient of E over the whole validation set per step);
- drop-in ``optim.SGDHD`` vs ``torch.optim.SGD`` in an ordinary ``nn.Module`` loop.

The authors' public tower implementation (``gradient-descent-the-ultimate-optimizer``, HD as
an SGD/SGD tower) is measured side by side in ``bench_towers.py``.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hgtoolkit import online, optim, problems, trajectory  # noqa: E402


def module_loop(problem, make_opt, steps):
    """An ordinary PyTorch loop over the problem's minibatches with a torch.optim optimizer."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in problem.params0.items()}
    opt = make_opt(list(params.values()))
    for t in range(steps):
        opt.zero_grad()
        problem.train_loss(params, t).backward()
        opt.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: small MLP, few steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    hidden = (64,) if args.quick else (500, 500, 500)
    steps = 10 if args.quick else args.steps
    p = problems.mnist_mlp(hidden=hidden)
    lr = 0.05
    lrs = torch.full((steps,), lr)
    run = lambda **kw: (lambda: online.run(p, lr0=lr, steps=steps, eval_every=steps, keep_params=False, **kw))
    engine = common.interleaved(lambda: trajectory.train(p, lrs), {
        "HD (Baydin: objective=train)": run(method="hd", beta=1e-4, objective="train", lr_floor=None),
        "HD (objective=val)": run(method="hd", beta=1e-4),
        "RTHO (objective=val)": run(method="rtho", beta=1e-4),
        "MARTHE μ, β adaptive (val)": run(method="marthe", mu="auto", beta="auto", kappa=1e-6),
        "RTHO (objective=train)": run(method="rtho", beta=1e-4, objective="train"),
    }, repeats=args.repeats)
    dropin = common.interleaved(lambda: module_loop(p, lambda ps: torch.optim.SGD(ps, lr=lr), steps), {
        "optim.SGDHD": lambda: module_loop(p, lambda ps: optim.SGDHD(ps, lr=lr, hypergrad_lr=1e-4), steps),
    }, repeats=args.repeats)
    targets = {"HD (Baydin: objective=train)": 1.1, "optim.SGDHD": 1.1, "RTHO (objective=val)": 2.5,
               "MARTHE μ, β adaptive (val)": 2.5, "RTHO (objective=train)": 2.5}
    rows = []
    for base, res in (("trajectory.train", engine), ("torch.optim.SGD loop", dropin)):
        for name, r in res.items():
            if name == "baseline":
                continue
            tgt = targets.get(name)
            rows.append(common.row(f"{name} / {base}, T={steps}, {'×'.join(map(str, hidden))} MLP",
                                   r["ratio_wall"], "×", f"≤ {tgt}" if tgt else None,
                                   None if tgt is None else bool(r["ratio_wall"] <= tgt),
                                   f"CPU-time ratio {r['ratio_cpu']:.2f}"))
    payload = {"rows": rows, "env": common.env_info(args.threads), "data": p.info.get("data"),
               "steps": steps, "hidden": list(hidden)}
    path = common.write_results("online", payload)
    print(common.format_table(rows))
    print(f"data: {p.info.get('data')}\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
