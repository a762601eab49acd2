"""Command ``online``: one HD / RTHO / MARTHE run (``hgtoolkit.online.run``); also hooks in ``analyse``.

    python -m hgtoolkit online --problem beale --method rtho --beta 1e-7 --lr0 1e-3 --steps 500 \\
        --objective train --out results/online
    python -m hgtoolkit online --problem beale --method marthe --beta auto --kappa 1e-10 \\
        --find-beta --lr0 1e-3 --steps 500 --out results/online

Writes ``<out>/<name>.json`` + ``.npz`` (the :class:`~hgtoolkit.online.OnlineResult`; name
defaults to ``online_<problem>_<method>``) and ``<out>/<name>.png`` + ``.pdf``: the schedule
η_t, the training/validation losses and, for MARTHE, μ_t and β_t. Exit status 1 when the run
diverged (the record is still written).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

__all__ = ["register"]


def _beta(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0 or 'auto', got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text}")
    return value


def _mu(text: str):
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _floor(text: str):
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def register(sub) -> None:
    from ..dynamics import NAMES
    from ..online import METHODS, OBJECTIVES
    from .exact import _DTYPES, _key_value, _positive_int

    p = sub.add_parser(
        "online", help="adapt the learning rate online with HD, RTHO or MARTHE",
        description="One training run whose LR follows eta_{t+1} = max(eta_t - beta h_{t+1}, floor), "
                    "h_{t+1} = grad E(w_{t+1}) . z_{t+1}, z_{t+1} = mu A_t z_t + B_t (HD: mu = 0, RTHO: "
                    "mu = 1, MARTHE: mu and beta fixed or adaptive). Writes the record (JSON + npz) "
                    "and a figure (PNG + PDF).")
    g = p.add_argument_group("problem")
    g.add_argument("--problem", default="beale",
                   help="a test function (beale, bukin6, bukin_smooth, rosenbrock), mnist_mlp or "
                        "synthetic_mlp (default beale)")
    g.add_argument("--problem-arg", metavar="KEY=VALUE", type=_key_value, action="append", default=[],
                   help="extra keyword for the problem constructor, repeatable (e.g. --problem-arg seed=1)")
    g.add_argument("--dtype", choices=_DTYPES, default=None, help="default: the problem's")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    m = p.add_argument_group("method")
    m.add_argument("--method", choices=METHODS, default="marthe", help="default marthe")
    m.add_argument("--optimizer", choices=sorted(NAMES), default="sgd", help="dynamics Φ (default sgd)")
    m.add_argument("--lr0", type=float, default=1e-3, help="initial learning rate η_0 (default 1e-3)")
    m.add_argument("--beta", type=_beta, default=None,
                   help="hyper-learning rate β ≥ 0, or 'auto' (MARTHE's adaptive β; its default)")
    m.add_argument("--beta0", type=float, default=None, help="initial β for --beta auto (default 0)")
    m.add_argument("--kappa", type=float, default=None, help="step size κ of the adaptive β (default 1e-6)")
    m.add_argument("--beta-rule", choices=("hh", "h_eta"), default=None,
                   help="adaptive-β rule: κ h_{t+1} h_t (hh, default) or the authors' code's κ h_{t+1} η_{t+1}")
    m.add_argument("--mu", type=_mu, default=None, help="MARTHE's μ in [0, 1] or 'auto' (default auto)")
    m.add_argument("--objective", choices=OBJECTIVES, default="val",
                   help="val: ∇E(w_{t+1}) (default); train: the next minibatch's gradient (HD)")
    m.add_argument("--lr-floor", type=_floor, default=0.0,
                   help="η is clipped at this value (default 0); 'none' allows η < 0")
    m.add_argument("--lr-max", type=float, default=None,
                   help="|η| above this counts as divergence (default 1e6·lr0)")
    m.add_argument("--find-beta", action="store_true",
                   help="start from --beta (or --kappa with --beta auto) and divide by 10 until the "
                        "run does not diverge (MARTHE's wrapper)")
    r = p.add_argument_group("run and output")
    r.add_argument("--steps", type=_positive_int, default=500, help="T (default 500)")
    r.add_argument("--eval-every", type=_positive_int, default=1, help="record E every k steps (default 1)")
    r.add_argument("--seed", type=int, default=None,
                   help="minibatch order for stochastic problems (problem.resample(seed))")
    r.add_argument("--out", default="results/online", help="output folder (default results/online)")
    r.add_argument("--name", default=None, help="file stem (default online_<problem>_<method>)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bars (default on; --no-progress turns them off)")
    p.set_defaults(func=run_online)

    try:  # the approximation-error command lives beside this one
        from .analyse import register_analyse
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.analyse":
            raise
    else:
        register_analyse(sub)


def run_online(args) -> int:
    from .. import online, plotting
    from .exact import _problem, _settings

    marthe_only = {"mu": args.mu, "kappa": args.kappa, "beta0": args.beta0, "beta_rule": args.beta_rule}
    if args.method != "marthe":
        given = [k for k, v in marthe_only.items() if v is not None]
        if given:  # the API raises for mu; kappa/beta0/beta_rule would be silently unused
            raise ValueError(f"--{given[0].replace('_', '-')} is a MARTHE setting; --method "
                             f"{args.method} fixes μ = {0 if args.method == 'hd' else 1} and uses a "
                             "constant --beta (use --method marthe)")
    kwargs = dict(method=args.method, optimizer=args.optimizer, lr0=args.lr0, steps=args.steps,
                  beta=args.beta, objective=args.objective, lr_floor=args.lr_floor, lr_max=args.lr_max,
                  eval_every=args.eval_every, seed=args.seed, progress=args.progress)
    if args.method == "marthe":
        kwargs.update({k: v for k, v in marthe_only.items() if v is not None})
    hyper = {k: v for k, v in kwargs.items() if k in ("beta", "mu", "kappa", "beta0", "beta_rule",
                                                      "objective", "lr_floor", "lr_max")}
    if not args.find_beta:  # every setting checked before the problem (and its data) is built
        online.hyper_config(args.method, lr0=args.lr0, **hyper)
    problem = _problem(args)
    if args.find_beta:
        searched = "kappa" if kwargs.get("beta", "auto" if args.method == "marthe" else None) == "auto" else "beta"
        if searched == "beta" and args.beta is None:
            raise ValueError("--find-beta needs --beta: the first (large) value to try")
        start = kwargs.pop(searched) if searched == "beta" else kwargs.pop("kappa", 1e-6)
        result = online.find_beta(problem, start, **kwargs)
        tried = ", ".join(f"{t[searched]:.0e}" + ("✗" if t["diverged_at"] is not None else "✓")
                          for t in result.config["beta_search"])
        print(f"find_beta: {searched} tried {tried}")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", online.DivergenceWarning)  # reported below
            result = online.run(problem, **kwargs)
    result.config["cli"] = _settings(args)

    out = Path(args.out)
    name = args.name or f"online_{problem.name}_{args.method}"
    json_path = result.save(out / name)
    beta = result.config["beta"]
    beta_txt = f"β auto (κ={result.config['kappa']:.1e})" if beta == "auto" else f"β={beta:.1e}"
    title = (f"{plotting.describe_source(result.config['problem'])} — {args.method.upper()}, "
             f"{args.optimizer.upper()}, η₀={args.lr0:g}, {beta_txt}, objective {args.objective}")
    pngs = plotting.savefig(plotting.plot_online_run(result, title), out / name, close=True)
    status = f"DIVERGED at step {result.diverged_at} ({result.divergence})" if result.diverged else "ok"
    print(f"online {args.method}: {status}; best E = {result.best_val_loss:.6g}, final E = "
          f"{result.final_val_loss:.6g}, final η = {result.final_lr:.4g} ({result.wall_time:.2f} s); "
          f"wrote {json_path}, {pngs[0]}")
    return 1 if result.diverged else 0
