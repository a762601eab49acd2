"""Command ``analyse``: how far an online method's hypergradient estimate is from the exact ones.

Usage::

    # run HD and RTHO on Beale, then compare each estimate with d⁽¹⁾, d⁽ᶜ⁾ and g
    python -m hgtoolkit analyse --problem beale --method hd rtho --hypergrad-lr 1e-6 1e-8 \\
        --lr 1e-3 --steps 200 --out results/analyse
    # or analyse a saved online run (its problem rebuilt from --problem/--problem-arg)
    python -m hgtoolkit analyse --run results/online/hd.json --out results/analyse

Writes, per analysed run ``<tag>`` (the method name, numbered when repeated):
``<out>/analyse_<tag>.json`` + ``.npz`` (the :class:`~hgtoolkit.analysis.ApproximationReport`),
``<out>/analyse_<tag>.png`` + ``.pdf`` (its figure), ``<out>/online_<tag>.json`` + ``.npz`` (the
online run, when this command ran it); and ``<out>/analyse.md`` (every summary table) and
``<out>/analyse.json`` (every summary).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from ..settings import HypergradSettings, OnlineSettings, add_arguments, given_flags
from . import args as cli_args

__all__ = ["register", "register_analyse"]


def register(sub) -> None:
    p = sub.add_parser(
        "analyse", help="online hypergradient estimates vs the exact ones (one-step, constant-LR, full horizon)",
        description="Run online methods (or load a saved run) and compare their estimates h_{t+1} with the "
                    "exact derivatives along the same trajectory: d1_t = dE(w_{t+1})/deta_t (HD horizon), "
                    "dc_t = sum_{s<=t} dE(w_{t+1})/deta_s (RTHO horizon) and g_t = dE(w_T)/deta_t (LRS-OPT). "
                    "Writes JSON/npz reports, a Markdown table and PNG/PDF figures.")
    src = p.add_argument_group("what to analyse")
    src.add_argument("--run", metavar="FILE", action="append", default=[],
                     help="a saved OnlineResult (.json written by OnlineResult.save), repeatable; "
                          "replaces running --method")
    add_arguments(src, OnlineSettings, ["method", "hypergrad_lr"], defaults={"method": ["hd", "rtho"]},
                  method={"nargs": "+", "help": "online methods to run and analyse (default: hd rtho)"},
                  hypergrad_lr={"nargs": "+", "help": "hyper-learning rate β, one value for all methods or one "
                                              "per method (default: 1e-6 for hd, 1e-8 for rtho, auto "
                                              "for marthe)"})
    add_arguments(src, OnlineSettings, ["mu", "kappa", "objective", "lr", "steps", "optimizer", "seed"],
                  defaults={"steps": 200},
                  objective={"help": "the online estimate's objective (default val; the references "
                                     "always use the validation loss E)"})
    g = p.add_argument_group("problem")
    cli_args.add_problem(g, default=None, dtype_help="floating-point type (default: the problem's, "
                                                     "or the saved run's)")
    add_arguments(p, HypergradSettings, ["memory"],
                  memory={"help": "memory budget of the reverse pass for g: bytes, '200MB', "
                                  "or 'auto' (default: half the free memory)"})
    cli_args.add_out(p, "analyse")
    cli_args.add_progress(p)
    p.set_defaults(func=run_analyse)


register_analyse = register  # its former name (cli.online used to call it)


_DEFAULT_BETA = {"hd": 1e-6, "rtho": 1e-8, "marthe": "auto"}


def _tags(names: list[str]) -> list[str]:
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def run_analyse(args) -> int:
    from .. import online, plotting
    from ..analysis import analyse_online
    from ..records import atomic_write_bytes, write_sealed_json

    out = Path(args.out)
    runs = []  # (tag, OnlineResult, problem)
    if args.run:
        results = []
        for path in args.run:
            if not Path(path).exists():
                raise FileNotFoundError(f"--run file {path!r} does not exist")
            results.append(online.OnlineResult.load(path))
        for tag, res in zip(_tags([r.method for r in results]), results):
            runs.append((tag, res, cli_args.make_problem(args, res.config.get("problem"))))
    else:
        betas = args.hypergrad_lr or [_DEFAULT_BETA[m] for m in args.method]
        if len(betas) == 1:
            betas = betas * len(args.method)
        if len(betas) != len(args.method):
            raise ValueError(f"--hypergrad-lr takes one value or one per method ({len(args.method)}), got {len(betas)}")
        for method, beta in zip(args.method, betas):
            if method != "marthe" and beta == "auto":
                raise ValueError(f"--hypergrad-lr auto is MARTHE's rule; give a number for {method}")
        # --mu and --kappa go to the runs that use them (MARTHE; κ: with β auto); given, some run must
        uses = {"mu": [m == "marthe" for m in args.method],
                "kappa": [m == "marthe" and b == "auto" for m, b in zip(args.method, betas)]}
        for name in sorted(given_flags(args) & set(uses)):
            if not any(uses[name]):
                what = "MARTHE's adaptive β (--hypergrad-lr auto)" if name == "kappa" else "--method marthe"
                raise ValueError(f"--{name} is a setting of {what}; none of the runs (--method "
                                 f"{' '.join(args.method)}, --hypergrad-lr {' '.join(map(str, betas))}) uses it")
        problem = cli_args.make_problem(args, None)
        for i, (tag, method, beta) in enumerate(zip(_tags(args.method), args.method, betas)):
            kw = {name: getattr(args, name) for name in uses if uses[name][i]}
            with warnings.catch_warnings():
                warnings.simplefilter("always", online.DivergenceWarning)
                res = online.run(problem, method, args.optimizer, lr=args.lr, steps=args.steps,
                                 hypergrad_lr=beta, objective=args.objective, seed=args.seed,
                                 progress=args.progress, **kw)
            res.config["cli"] = cli_args.settings(args)
            res.save(out / f"online_{tag}")
            runs.append((tag, res, problem))

    tables, summaries, written = [], {}, []
    for tag, res, problem in runs:
        if res.diverged:
            print(f"note: {tag} diverged at step {res.diverged_at}; analysing the steps before it")
        report = analyse_online(res, problem, memory=args.memory,
                                progress=args.progress)
        json_path = report.save(out / f"analyse_{tag}")
        fig = plotting.plot_approximation(report)
        pngs = plotting.savefig(fig, out / f"analyse_{tag}", close=True)
        tables.append(report.table())
        summaries[tag] = {"label": report.label, "summary": report.summary, "info": report.info}
        written += [json_path, pngs[0]]
    md = atomic_write_bytes(out / "analyse.md", ("\n\n".join(tables) + "\n").encode())
    js = write_sealed_json(out / "analyse.json", {"command": "analyse", "runs": summaries,  # + its checksum
                                                  "settings": cli_args.settings(args)})
    print("\n\n".join(tables))
    print(f"\nwrote {md}, {js}, " + ", ".join(str(w) for w in written))
    return 0
