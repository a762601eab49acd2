"""Commands ``hypergrad`` (exact ∇f(η) of one schedule) and ``lrsopt`` (optimise a schedule).

    python -m hgtoolkit hypergrad --problem beale --steps 100 --lr 1e-3 --out results/hypergrad
    python -m hgtoolkit lrsopt --problem beale --steps 100 --lr 1e-3 --outer-steps 50 --out results/lrsopt

Each writes ``<out>/<command>.json`` (+ ``.npz`` for lrsopt) and a figure ``<out>/<command>.png``
(+ ``.pdf``). ``lrsopt`` checkpoints to ``<out>/lrsopt.ckpt.pt`` unless ``--checkpoint`` says
otherwise; ``--resume`` continues from it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..settings import HypergradSettings, LrsoptSettings, TrainSettings, add_arguments, specs
from . import args as cli_args

__all__ = ["register"]


def _common(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("problem and schedule")
    cli_args.add_problem(g)
    add_arguments(g, TrainSettings, ["steps", "lr"])
    g.add_argument("--schedule", metavar="FILE",
                   help="read the (initial) schedule from a .npy file, a JSON list, or a lrsopt "
                        "result .json/.npz (its best_lrs); overrides --steps/--lr")
    add_arguments(g, TrainSettings, ["optimizer"])
    cli_args.add_out(g, command)
    return p


def register(sub) -> None:
    hg = sub.add_parser(
        "hypergrad", parents=[_common("hypergrad")],
        help="exact hypergradient ∇f(η) of a schedule",
        description="Exact hypergradient ∂f/∂η_t, f(η) = E(w_T), of one schedule; writes "
                    "<out>/hypergrad.json and a figure of η_t and ∂f/∂η_t against t.")
    add_arguments(hg, HypergradSettings, ["mode", "checkpoint", "snapshots", "memory", "disk", "chunk_size"])
    hg.set_defaults(func=run_hypergrad)

    lo = sub.add_parser(
        "lrsopt", parents=[_common("lrsopt")],
        help="optimise a schedule with exact hypergradients (LRS-OPT)",
        description="LRS-OPT: projected gradient descent η ← max(η − α·U(∇f(η)), 0) on the whole "
                    "schedule. Writes <out>/lrsopt.json/.npz, a figure (initial vs optimised "
                    "schedule, objective per outer step) and a checkpoint for --resume.")
    add_arguments(lo, LrsoptSettings, [n for n, (_, spec) in specs(LrsoptSettings).items()
                                       if spec.cli and n != "optimizer"],
                  snapshot_every={"help": "keep the schedule every k outer steps (default: about 5 snapshots)"})
    lo.add_argument("--checkpoint", default=None,
                    help="checkpoint file (default <out>/lrsopt.ckpt.pt)")
    lo.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    lo.add_argument("--overwrite", action="store_true",
                    help="start afresh even if the checkpoint exists (it is replaced)")
    cli_args.add_progress(lo)
    lo.set_defaults(func=run_lrsopt)


# ----------------------------------------------------------------------------- helpers

def _schedule(args, problem):
    import zipfile

    import numpy as np
    import torch
    if args.schedule is None:
        return torch.full((args.steps,), args.lr, dtype=problem.dtype, device=problem.device)
    path = Path(args.schedule)
    if not path.exists():
        raise FileNotFoundError(f"--schedule file {str(path)!r} does not exist")
    expected = ("expected a .npy array of learning rates, an .npz or JSON LRS-OPT record (its 'best_lrs'), "
                "or a JSON list")
    try:
        if path.suffix == ".npy":
            with open(path, "rb") as fh:
                if fh.read(6) != b"\x93NUMPY":
                    raise ValueError("it is not a .npy file")
            lrs = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "best_lrs" not in data.files:
                    raise ValueError(f"it has no 'best_lrs' array (arrays: {sorted(data.files)[:5]})")
                lrs = data["best_lrs"]
        else:
            from ..records import read_json
            obj = read_json(path)
            lrs = obj.get("best_lrs", obj.get("lrs")) if isinstance(obj, dict) else obj
            if lrs is None:
                raise ValueError("it holds neither a list nor 'best_lrs'/'lrs'")
        lrs = np.asarray(lrs, dtype=np.float64)
    except (ValueError, TypeError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--schedule {str(path)!r} is not a schedule file ({reason[:160]}); {expected}") from None
    if lrs.ndim != 1:
        raise ValueError(f"--schedule {str(path)!r} holds an array of shape {lrs.shape}, not a 1-D schedule; {expected}")
    return torch.as_tensor(lrs, dtype=problem.dtype, device=problem.device)


def _title(info: dict, args, T: int) -> str:
    from ..plotting import describe_source
    return f"{describe_source(info)} — {args.optimizer.upper()}, T = {T}"


# ----------------------------------------------------------------------------- commands

def run_hypergrad(args) -> int:
    from .. import plotting
    from ..exact import for_mode, hypergradient
    from ..records import write_sealed_json

    problem = cli_args.make_problem(args)
    lrs = _schedule(args, problem)
    start = time.perf_counter()
    try:
        r = hypergradient(problem, lrs, progress=True, **for_mode(vars(args)))
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    info = problem.describe()
    record = {"command": "hypergrad", "value": float(r.value), "grad": r.grad, "lrs": r.lrs,
              "train_losses": r.train_losses, "mode": r.mode, "optimizer": r.optimizer,
              "grad_norm": float(r.grad.norm()), "wall_time": elapsed, "settings": cli_args.settings(args),
              "problem": info,
              "metrics": problem.metrics(r.params) if problem.metrics is not None else None,
              "memory": {k: getattr(r, k) for k in ("schedule", "snapshots", "disk_snapshots", "recomputed_steps",
                                                    "memory_estimate", "memory_budget", "peak_memory", "buffer_bytes")}}
    json_path = write_sealed_json(out / "hypergrad.json", record)  # with its checksum

    fig, (a, b) = plotting.figure(ncols=2)
    plotting.plot_schedules({"$\\eta$": r.lrs}, ax=a, title="schedule")
    plotting.plot_hypergradient(r.grad, ax=b, title=f"exact hypergradient ({r.mode} mode)")
    fig.suptitle(_title(info, args, len(r.lrs)) + f" — f(η) = {float(r.value):.6g}", fontsize=9)
    pngs = plotting.savefig(fig, out / "hypergrad", close=True)
    print(f"f(η) = {float(r.value):.6g}, |∇f(η)| = {float(r.grad.norm()):.4g} ({elapsed:.2f} s); "
          f"wrote {json_path}, {pngs[0]}")
    return 0


def run_lrsopt(args) -> int:
    from .. import plotting
    from ..lrsopt import optimize_schedule

    problem = cli_args.make_problem(args)
    lrs = _schedule(args, problem)
    if args.outer_lr is None and args.outer_optimizer == "sgd":  # Adam's default: 0.1 × max η^(0)
        raise ValueError("--outer-lr is required with --outer-optimizer sgd (its scale depends on "
                         "the size of ∇f(η); try a hypergrad run first)")
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "lrsopt.ckpt.pt"
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if ckpt.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"checkpoint {ckpt} exists: pass --resume to continue that run, or "
                         "--overwrite to start afresh and replace it (or another --checkpoint)")
    # the settings with a flag (lrsopt's --checkpoint is the checkpoint file, not checkpoint=)
    kw = {name: getattr(args, name) for name, (_, spec) in specs(LrsoptSettings).items()
          if spec.cli and hasattr(args, name)}
    kw["snapshot_every"] = args.snapshot_every or max(1, args.outer_steps // 5)
    try:
        result = optimize_schedule(problem, lrs, checkpoint_path=ckpt,
                                   resume=True if args.resume else (False if args.overwrite else None),
                                   progress=args.progress, **kw)
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result.config["cli"] = cli_args.settings(args)
    json_path = result.save(out / "lrsopt")
    npz_path = json_path.with_suffix(".npz")

    fig, (a, b) = plotting.figure(ncols=2)
    mid = [(int(k), s) for k, s in zip(result.snapshot_steps, result.snapshots)
           if 0 < k < result.outer_steps_done]
    # one legend entry for all intermediate snapshots (labels starting with "_" are not listed)
    schedules = {("intermediate $\\eta^{(k)}$" if i == 0 else f"_k={k}"): s for i, (k, s) in enumerate(mid)}
    styles = {label: {"color": "0.65", "lw": 0.8} for label in schedules}
    first, last, best = ("initial $\\eta^{(0)}$", f"final $\\eta^{{({result.outer_steps_done})}}$",
                         f"best $\\eta^{{({result.best_step})}}$")
    schedules = {first: result.initial_lrs, **schedules, last: result.final_lrs, best: result.best_lrs}
    styles.update({first: {"color": "k", "ls": ":"}, last: {"color": "C0"},
                   best: {"color": "C3", "ls": "--"}})
    if result.best_step == result.outer_steps_done:  # best == final: draw it once
        schedules.pop(best)
    steps = ", ".join(str(k) for k, _ in mid)
    plotting.plot_schedules(schedules, ax=a, styles=styles,
                            title="schedules" + (f" (grey: k = {steps})" if steps else ""))
    plotting.plot_objective(result.history, ax=b, title=f"LRS-OPT, outer optimizer {args.outer_optimizer}")
    fig.suptitle(_title(result.problem, args, len(result.final_lrs)), fontsize=9)
    pngs = plotting.savefig(fig, out / "lrsopt", close=True)
    print(f"LRS-OPT {result.status}: f {result.history[0]:.6g} → best {result.best_value:.6g} "
          f"(outer step {result.best_step}/{result.outer_steps_done}); wrote {json_path}, {npz_path}, "
          f"{pngs[0]}; checkpoint {ckpt}")
    return 0
