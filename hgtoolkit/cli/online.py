"""Command ``online``: one HD / RTHO / MARTHE run (``hgtoolkit.online.run``); also hooks in ``analyse``.

    python -m hgtoolkit online --problem beale --method rtho --hypergrad-lr 1e-7 --lr 1e-3 \\
        --steps 500 --objective train --out results/online
    python -m hgtoolkit online --problem beale --method marthe --hypergrad-lr auto --kappa 1e-10 \\
        --find-hypergrad-lr --lr 1e-3 --steps 500 --out results/online

Writes ``<out>/<name>.json`` + ``.npz`` (the :class:`~hgtoolkit.online.OnlineResult`; name
defaults to ``online_<problem>_<method>``) and ``<out>/<name>.png`` + ``.pdf``: the schedule
η_t, the training/validation losses and, for MARTHE, μ_t and β_t. Exit status 1 when the run
diverged (the record is still written).
"""
from __future__ import annotations

import inspect
from pathlib import Path

from .. import divergence
from ..settings import OnlineSettings, add_arguments, add_renamed_flag, defaults, given_flags, specs, unused
from . import args as cli_args

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser(
        "online", help="adapt the learning rate online with HD, RTHO or MARTHE",
        description="One training run whose LR follows eta_{t+1} = max(eta_t - beta h_{t+1}, floor) "
                    "(beta = --hypergrad-lr), h_{t+1} = grad E(w_{t+1}) . z_{t+1}, z_{t+1} = "
                    "mu A_t z_t + B_t (HD: mu = 0, RTHO: mu = 1, MARTHE: mu and beta fixed or "
                    "adaptive). Writes the record (JSON + npz) and a figure (PNG + PDF).")
    g = p.add_argument_group("problem")
    cli_args.add_problem(g, dtype_help="default: the problem's")
    m = p.add_argument_group("method")
    add_arguments(m, OnlineSettings, [n for n in specs(OnlineSettings) if n not in ("steps", "eval_every", "seed")])
    m.add_argument("--find-hypergrad-lr", action="store_true",
                   help="start from --hypergrad-lr (or --kappa with --hypergrad-lr auto) and divide "
                        "by 10 until the run does not diverge (MARTHE's wrapper)")
    add_renamed_flag(m, "--find-beta", "--find-hypergrad-lr")
    r = p.add_argument_group("run and output")
    add_arguments(r, OnlineSettings, ["steps", "eval_every", "seed"])
    cli_args.add_out(r, "online")
    r.add_argument("--name", default=None, help="file stem (default online_<problem>_<method>)")
    cli_args.add_progress(r)
    p.set_defaults(func=run_online)


def run_online(args) -> int:
    from .. import online, plotting

    table, flags = specs(OnlineSettings), given_flags(args)
    kwargs = {k: getattr(args, k) for k in table}
    beta = "auto" if args.method == "marthe" and args.hypergrad_lr is None else args.hypergrad_lr
    given = unused(OnlineSettings, {**kwargs, "hypergrad_lr": beta}, flags)  # Spec.methods, Spec.needs
    if given:  # a flag given (at its default or not) that the run would not use
        flag = "--" + given[0].replace("_", "-")
        if args.method != "marthe":
            raise ValueError(f"{flag} is a MARTHE setting; --method {args.method} fixes μ = "
                             f"{0 if args.method == 'hd' else 1} and uses a constant --hypergrad-lr "
                             "(use --method marthe)")
        raise ValueError(f"{flag} is a setting of MARTHE's adaptive β (--hypergrad-lr auto); "
                         f"--hypergrad-lr {beta:g} is a constant β that does not use it")
    # what the run is passed: the flags given, and where the command's default is not the API's
    api = defaults(OnlineSettings)
    kwargs = {k: v for k, v in kwargs.items() if k in flags or k not in api or v != api[k]}
    kwargs["progress"] = args.progress
    if not args.find_hypergrad_lr:  # every setting checked before the problem (and its data) is built
        takes = inspect.signature(online.hyper_config).parameters
        online.hyper_config(**{k: v for k, v in kwargs.items() if k in takes})
    problem = cli_args.make_problem(args)
    if args.find_hypergrad_lr:
        auto = kwargs.get("hypergrad_lr", "auto" if args.method == "marthe" else None) == "auto"
        searched = "kappa" if auto else "hypergrad_lr"
        if searched == "hypergrad_lr" and args.hypergrad_lr is None:
            raise ValueError("--find-hypergrad-lr needs --hypergrad-lr: the first (large) value to try")
        start = kwargs.pop(searched) if searched == "hypergrad_lr" else kwargs.pop("kappa", 1e-6)
        result = online.find_hypergrad_lr(problem, start, **kwargs)
        tried = ", ".join(f"{t[searched]:.0e}" + ("✗" if t["diverged_at"] is not None else "✓")
                          for t in result.config["hypergrad_lr_search"])
        print(f"find_hypergrad_lr: {searched} tried {tried}")
    else:
        with divergence.recorded() as seen:  # reported below, and in the record
            result = online.run(problem, **kwargs)
    result.config["cli"] = cli_args.settings(args)

    out = Path(args.out)
    name = args.name or f"online_{problem.name}_{args.method}"
    json_path = result.save(out / name)
    beta = result.config["hypergrad_lr"]
    beta_txt = f"β auto (κ={result.config['kappa']:.1e})" if beta == "auto" else f"β={beta:.1e}"
    title = (f"{plotting.describe_source(result.config['problem'])} — {args.method.upper()}, "
             f"{args.optimizer.upper()}, η₀={args.lr:g}, {beta_txt}, objective {args.objective}")
    pngs = plotting.savefig(plotting.plot_online_run(result, title), out / name, close=True)
    seen = [] if args.find_hypergrad_lr else seen
    status = (f"DIVERGED at step {result.diverged_at} ({seen[0].message if seen else result.divergence})"
              if result.diverged else "ok")
    print(f"online {args.method}: {status}; best E = {result.best_val_loss:.6g}, final E = "
          f"{result.final_val_loss:.6g}, final η = {result.final_lr:.4g} ({result.wall_time:.2f} s); "
          f"wrote {json_path}, {pngs[0]}")
    return 1 if result.diverged else 0
