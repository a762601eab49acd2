"""Commands ``hypergrad`` (exact ∇f(η) of one schedule) and ``lrsopt`` (optimise a schedule).

    python -m hgtoolkit hypergrad --problem beale --steps 100 --lr 1e-3 --out results/hypergrad
    python -m hgtoolkit lrsopt --problem beale --steps 100 --lr 1e-3 --outer-steps 50 --out results/lrsopt

Each writes ``<out>/<command>.json`` (+ ``.npz`` for lrsopt) and a figure ``<out>/<command>.png``
(+ ``.pdf``). ``lrsopt`` checkpoints to ``<out>/lrsopt.ckpt.pt`` unless ``--checkpoint`` says
otherwise; ``--resume`` continues from it.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

__all__ = ["register"]

_DTYPES = ("float32", "float64")


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a keyword name as KEY, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw[:1] in "[({'\"" or raw[:1].isdigit() or raw[:1] in "+-.":
            raise argparse.ArgumentTypeError(
                f"{key}={raw}: not a valid value (a number, a list like [64, 64], or a word)") from None
        value = raw  # a plain word, e.g. dtype=float32 or device=cpu
    return key, value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _checkpoint_every(text: str):
    """``--checkpoint-every``: a positive int, or ``auto`` (k ≈ √T)."""
    return "auto" if text == "auto" else _positive_int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _common(out_default: str) -> argparse.ArgumentParser:
    from ..dynamics import NAMES
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("problem and schedule")
    g.add_argument("--problem", default="beale",
                   help="problem name: a test function (beale, bukin6, bukin_smooth, rosenbrock), "
                        "mnist_mlp or synthetic_mlp (default: beale)")
    g.add_argument("--problem-arg", metavar="KEY=VALUE", type=_key_value, action="append", default=[],
                   help="extra keyword for the problem constructor, repeatable "
                        "(e.g. --problem-arg hidden=[64] --problem-arg n_train=1000)")
    g.add_argument("--steps", type=_positive_int, default=100, help="T, the number of training steps (default 100)")
    g.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="constant learning rate η_t of the (initial) schedule (default 1e-3)")
    g.add_argument("--schedule", metavar="FILE",
                   help="read the (initial) schedule from a .npy file, a JSON list, or a lrsopt "
                        "result .json/.npz (its best_lrs); overrides --steps/--lr")
    g.add_argument("--optimizer", default="sgd", choices=sorted(NAMES), help="inner dynamics Φ_t (default sgd)")
    g.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="floating-point type (default: the problem's: float64 for test functions, "
                        "float32 for mnist_mlp)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    g.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    return p


def register(sub) -> None:
    from ..exact import MODES
    from ..lrsopt import OUTER_OPTIMIZERS

    hg = sub.add_parser(
        "hypergrad", parents=[_common("results/hypergrad")],
        help="exact hypergradient ∇f(η) of a schedule",
        description="Exact hypergradient ∂f/∂η_t, f(η) = E(w_T), of one schedule; writes "
                    "<out>/hypergrad.json and a figure of η_t and ∂f/∂η_t against t.")
    hg.add_argument("--mode", choices=MODES, default="reverse", help="how to compute it (default reverse)")
    hg.add_argument("--checkpoint-every", type=_checkpoint_every, default=None,
                    help="reverse mode: store every k-th state and recompute (memory O(T/k + k)); "
                         "'auto': k ≈ √T")
    hg.add_argument("--chunk-size", type=_positive_int, default=None,
                    help="forward mode: columns of Z_t propagated at once")
    hg.set_defaults(func=run_hypergrad)

    lo = sub.add_parser(
        "lrsopt", parents=[_common("results/lrsopt")],
        help="optimise a schedule with exact hypergradients (LRS-OPT)",
        description="LRS-OPT: projected gradient descent η ← max(η − α·U(∇f(η)), 0) on the whole "
                    "schedule. Writes <out>/lrsopt.json/.npz, a figure (initial vs optimised "
                    "schedule, objective per outer step) and a checkpoint for --resume.")
    lo.add_argument("--outer-steps", type=_positive_int, default=50, help="K, outer steps (default 50)")
    lo.add_argument("--outer-lr", type=_positive_float, default=None,
                    help="outer step size α (default for adam: 0.1×--lr, i.e. each step moves "
                         "η_t by about a tenth of its initial value; required for sgd; unused by lbfgsb)")
    lo.add_argument("--outer-optimizer", choices=OUTER_OPTIMIZERS, default="adam", help="default adam")
    lo.add_argument("--mode", choices=MODES, default="reverse", help="hypergradient mode (default reverse)")
    lo.add_argument("--checkpoint-every", type=_checkpoint_every, default=None,
                    help="reverse-mode state checkpointing for each hypergradient")
    lo.add_argument("--lr-max", type=_positive_float, default=None, help="upper bound η_max (default none)")
    lo.add_argument("--resample-batches", action="store_true",
                    help="new minibatch order at every outer step (MARTHE's LRS-OPT)")
    lo.add_argument("--seed", type=int, default=0, help="seed of the resampled minibatch orders")
    lo.add_argument("--snapshot-every", type=_positive_int, default=None,
                    help="keep the schedule every k outer steps (default: about 5 snapshots)")
    lo.add_argument("--checkpoint", default=None,
                    help="checkpoint file (default <out>/lrsopt.ckpt.pt)")
    lo.add_argument("--checkpoint-interval", type=_positive_int, default=10,
                    help="write the checkpoint every N outer steps (default 10)")
    lo.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    lo.add_argument("--overwrite", action="store_true",
                    help="start afresh even if the checkpoint exists (it is replaced)")
    lo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                    help="progress bars (default on; --no-progress turns them off)")
    lo.set_defaults(func=run_lrsopt)


# ----------------------------------------------------------------------------- helpers

def _problem(args):
    import torch

    from .. import problems
    kwargs = dict(args.problem_arg)  # problems.get checks names and values (dtype="float32" is fine)
    if args.dtype is not None:
        kwargs["dtype"] = getattr(torch, args.dtype)
    kwargs["device"] = args.device
    return problems.get(args.problem, **kwargs)


def _schedule(args, problem):
    import numpy as np
    import torch
    if args.schedule is None:
        return torch.full((args.steps,), args.lr, dtype=problem.dtype, device=problem.device)
    path = Path(args.schedule)
    if not path.exists():
        raise FileNotFoundError(f"--schedule file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        lrs = np.load(path)
    elif path.suffix == ".npz":
        with np.load(path) as data:
            if "best_lrs" not in data.files:
                raise ValueError(f"--schedule {str(path)!r} has no 'best_lrs' array")
            lrs = data["best_lrs"]
    else:
        from ..records import read_json
        obj = read_json(path)
        lrs = obj.get("best_lrs", obj.get("lrs")) if isinstance(obj, dict) else obj
        if lrs is None:
            raise ValueError(f"--schedule {str(path)!r} holds neither a list nor 'best_lrs'/'lrs'")
    return torch.as_tensor(np.asarray(lrs, dtype=np.float64), dtype=problem.dtype, device=problem.device)


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def _title(info: dict, args, T: int) -> str:
    from ..plotting import describe_source
    return f"{describe_source(info)} — {args.optimizer.upper()}, T = {T}"


# ----------------------------------------------------------------------------- commands

def run_hypergrad(args) -> int:
    from .. import plotting
    from ..exact import hypergradient
    from ..records import atomic_write_json

    problem = _problem(args)
    lrs = _schedule(args, problem)
    start = time.perf_counter()
    try:
        r = hypergradient(problem, lrs, args.optimizer, args.mode, checkpoint_every=args.checkpoint_every,
                          chunk_size=args.chunk_size, progress=True)
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    info = problem.describe()
    record = {"command": "hypergrad", "value": float(r.value), "grad": r.grad, "lrs": r.lrs,
              "train_losses": r.train_losses, "mode": r.mode, "optimizer": r.optimizer,
              "grad_norm": float(r.grad.norm()), "wall_time": elapsed, "settings": _settings(args),
              "problem": info,
              "metrics": problem.metrics(r.params) if problem.metrics is not None else None}
    json_path = atomic_write_json(out / "hypergrad.json", record)

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

    problem = _problem(args)
    lrs0 = _schedule(args, problem)
    outer_lr = args.outer_lr  # None: optimize_schedule's default for Adam (0.1 × max η^(0))
    if outer_lr is None and args.outer_optimizer == "sgd":
        raise ValueError("--outer-lr is required with --outer-optimizer sgd (its scale depends on "
                         "the size of ∇f(η); try a hypergrad run first)")
    out = Path(args.out)
    ckpt = Path(args.checkpoint) if args.checkpoint else out / "lrsopt.ckpt.pt"
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    if ckpt.exists() and not (args.resume or args.overwrite):
        raise ValueError(f"checkpoint {ckpt} exists: pass --resume to continue that run, or "
                         "--overwrite to start afresh and replace it (or another --checkpoint)")
    snapshot_every = args.snapshot_every or max(1, args.outer_steps // 5)
    try:
        result = optimize_schedule(
            problem, lrs0, args.outer_steps, outer_lr, args.outer_optimizer, optimizer=args.optimizer,
            mode=args.mode, checkpoint_every=args.checkpoint_every, resample_batches=args.resample_batches,
            seed=args.seed, lr_max=args.lr_max, snapshot_every=snapshot_every, checkpoint_path=ckpt,
            checkpoint_interval=args.checkpoint_interval, resume=args.resume, progress=args.progress)
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    result.config["cli"] = _settings(args)
    json_path, npz_path = result.save(out / "lrsopt")

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
