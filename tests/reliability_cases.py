"""The table of bad inputs and edge cases (docs/reliability.md): ONE list of cases, as data.

Each :class:`Case` is one class of input at one public entry point: what is called (an API
callable of a temporary folder, or a CLI argv), what it gets (an exception or a warning type, or
the CLI's exit status 2 with one line on stderr) and a regex the message must match (it names the
argument, the file or the quantity). ``tests/test_reliability.py`` runs every case;
``docs/generate.py`` writes the page's table from the same list, and a test checks that the
committed page is what the list generates: a row without its test, or a test without its row,
cannot happen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from hgtoolkit import (DivergenceError, DivergenceWarning, analysis, baselines, batched, dynamics, exact, hdm, horizons,
                       lrsopt, online, optim, problems, records, sweep, towers, trajectory)
import hgtoolkit

F64 = torch.float64
T = 4
BEALE = problems.from_function("beale")
LRS = torch.full((T,), 1e-3, dtype=F64)
CE = nn.functional.cross_entropy


@dataclass(frozen=True)
class Case:
    id: str                 # unique, the test's parameter id
    surface: str            # "API" or "CLI"
    entry: str              # the public entry point
    klass: str              # the class of input (distinct within an entry point)
    call: Any               # API: callable(tmp_path); CLI: argv list or callable(tmp_path) -> argv
    expect: Any             # an exception or warning type (API), 2 (CLI exit status)
    match: str              # regex the message (API) or the stderr line (CLI) must match (shown on the page)


CASES: list[Case] = []


def api(id: str, entry: str, klass: str, call: Callable[[Path], Any], expect: type, match: str) -> None:
    CASES.append(Case(id, "API", entry, klass, call, expect, match))


def cli(id: str, command: str, klass: str, argv: Any, match: str) -> None:
    CASES.append(Case(id, "CLI", f"hgtoolkit {command}", klass, argv, 2, match))


# ----------------------------------------------------------------------------- helpers (tiny problems)

def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def quadratic(train=None, val=None, nan_at=None, val_nan=False, dtype=F64) -> problems.Problem:
    """w ∈ R³, L_t = |w|² (NaN at step ``nan_at``), E = |w|²; ``train``/``val`` override a loss."""
    def train_loss(w, t):
        return (w ** 2).sum() * (math.nan if t == nan_at else 1.0)

    def val_loss(w):
        return (w ** 2).sum() * (math.nan if val_nan else 1.0)
    return problems.Problem(torch.ones(3, dtype=dtype), train or train_loss, val or val_loss)


def bn_data(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    Y = torch.randint(2, (n,), generator=g)
    return X, Y


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(F64)


def user_bn_problem() -> problems.Problem:
    """A user's own Problem over a BatchNorm module through functional_call (buffers not carried)."""
    model, (X, Y) = bn_model(), bn_data()
    loss = lambda w, *_: CE(torch.func.functional_call(model, w, (X,)), Y)  # noqa: E731
    return problems.Problem({k: v.detach().clone() for k, v in model.named_parameters()}, loss, loss)


def user_impure_problem(kind: str) -> problems.Problem:
    """A user's own Problem whose losses are not pure functions of (w, t): ``"dropout"`` draws its
    masks anew at every call; ``"bn-eval"`` validates in eval mode the running statistics that the
    training-mode train_loss keeps writing."""
    torch.manual_seed(0)
    if kind == "dropout":
        model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64)
    else:
        model = bn_model()
    X, Y = bn_data()

    def train_loss(w, *_):
        model.train()
        return CE(torch.func.functional_call(model, w, (X,)), Y)

    def val_loss(w):
        model.eval()
        return CE(torch.func.functional_call(model, w, (X,)), Y)
    return problems.Problem({k: v.detach().clone() for k, v in model.named_parameters()}, train_loss, val_loss)


def bn_problem() -> problems.Problem:
    data = bn_data()
    return problems.from_module(bn_model(), CE, data, data, batch_size=8)


def dropout_problem():
    """A plain model with dropout: its train_loss draws the masks of (seed, t)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64)
    data = bn_data()
    return problems.from_module(model, CE, data, data, batch_size=8)


def train_loss_in_vmap(problem, randomness: str):
    """problem.train_loss(w_0, 0) called in a vmap of two rows with this ``randomness``."""
    return torch.func.vmap(lambda x: problem.train_loss(problem.params0, 0) + x,
                           randomness=randomness)(torch.zeros(2, dtype=F64))


class CountingInForward(nn.Module):
    """A layer that writes a buffer in its forward (not a BatchNorm): refused by from_module."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, x):
        self.calls += 1
        return x


def lrsopt_ckpt(tmp: Path, steps: int = 1, **kw) -> Path:
    path = tmp / "ck" / "c.pt"
    lrsopt.optimize_schedule(BEALE, LRS, steps, 1e-4, checkpoint_path=path, progress=False, **kw)
    return path


def resume(path: Path, steps: int = 2, **kw):
    return lrsopt.optimize_schedule(BEALE, LRS, steps, 1e-4, checkpoint_path=path, resume=True, progress=False, **kw)


def flip_byte(path: Path, where: float = 0.5) -> Path:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def flip_digit(path: Path) -> Path:
    """One digit of a JSON record changed (still valid JSON)."""
    import re
    text = path.read_text()
    m = re.search(r'"final_val_loss": -?(\d)', text)
    i = m.start(1)
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
    return path


def saved_online(tmp: Path) -> Path:
    return hgtoolkit.save(online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-7, steps=T), tmp / "run")


def tensors(n=3):
    return [torch.zeros(2, requires_grad=True, dtype=F64) for _ in range(n)][:n]


def grid(**kw) -> sweep.Grid:
    base = dict(name="g", problem={"name": "beale"}, kind="train", fixed={"lr": 1e-3, "steps": 2})
    return sweep.Grid(**{**base, **kw})


def dropin_step(opt_factory: Callable, closure: bool = True, val: bool = False, before: Callable | None = None):
    """One step of a drop-in on a tiny linear model (float64)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(F64)
    X = torch.randn(8, 3, dtype=F64)
    opt = opt_factory(model.parameters())
    loss_fn = lambda: (model(X) ** 2).mean()  # noqa: E731
    for _ in range(2):
        opt.zero_grad()
        if before is not None:
            before(model, opt, loss_fn)
        opt.step(loss_fn if closure else None, **({"val_closure": loss_fn} if val else {}))
    return opt


GRID_YAML = b"name: g\nproblem: {name: beale}\nkind: train\nfixed: {lr: 1e-3, steps: 2}\n"


def user_problem(tmp: Path, arg: str | None = None) -> list:
    """argv of hypergrad on a problem of the user's module (typed parameters), on sys.path."""
    (tmp / "rel_userproblem.py").write_text(
        "import hgtoolkit, torch\n"
        "def make(batch: bool = False, n: int = 3, scale: float = 1.0):\n"
        "    assert isinstance(batch, bool) and isinstance(n, int) and isinstance(scale, float)\n"
        "    return hgtoolkit.problems.from_function(lambda w: scale * (w ** 2).sum(),"
        " torch.ones(n, dtype=torch.float64))\n")
    return ["hypergrad", "--problem", "rel_userproblem:make"] + (["--problem-arg", arg] if arg else [])


def schedule_file(tmp: Path, name: str, content: bytes) -> list:
    return ["hypergrad", "--schedule", str(write(tmp / name, content))]


# ============================================================================= API

# ---- hypergradient: the schedule
H = "hypergradient"
api("lrs-nan", H, "NaN in the schedule", lambda tmp: exact.hypergradient(BEALE, [1e-3, math.nan]), ValueError,
    r"lrs contains NaN or inf at steps \[1\]")
api("lrs-inf", H, "inf in the schedule", lambda tmp: exact.hypergradient(BEALE, [1e-3, math.inf]), ValueError,
    r"lrs contains NaN or inf")
api("lrs-negative", H, "negative learning rate", lambda tmp: exact.hypergradient(BEALE, [1e-3, -1e-3]),
    ValueError, r"lrs must be ≥ 0; negative at steps \[1\]")
api("lrs-empty", H, "empty schedule", lambda tmp: exact.hypergradient(BEALE, []), ValueError,
    r"lrs is empty: the schedule needs at least one step")
api("lrs-2d", H, "2-D schedule", lambda tmp: exact.hypergradient(BEALE, torch.ones(2, 2) * 1e-3), ValueError,
    r"lrs must be 1-D \(one learning rate per step\), got shape \(2, 2\)")
api("lrs-0d", H, "0-d schedule (a scalar)", lambda tmp: exact.hypergradient(BEALE, torch.tensor(1e-3)),
    ValueError, r"lrs must be 1-D \(one learning rate per step\), got shape \(\)")
api("lrs-string", H, "a string for the schedule", lambda tmp: exact.hypergradient(BEALE, "1e-3"), TypeError,
    r"lrs must be a 1-D tensor, array or sequence of learning rates, got str")
api("lrs-none", H, "None for the schedule", lambda tmp: exact.hypergradient(BEALE, None), TypeError,
    r"lrs must be a 1-D tensor, array or sequence of learning rates, got")
api("lrs-complex", H, "complex dtype", lambda tmp: exact.hypergradient(BEALE, torch.ones(3, dtype=torch.complex64)),
    TypeError, r"lrs must be real numbers, got dtype torch\.complex64")
api("lrs-bool", H, "bool tensor for the schedule",
    lambda tmp: exact.hypergradient(BEALE, torch.ones(3, dtype=torch.bool)), TypeError,
    r"lrs must be real numbers, got dtype torch\.bool")
api("lrs-device", H, "schedule on another device", lambda tmp: exact.hypergradient(BEALE, torch.ones(3, device="meta")),
    ValueError, r"lrs is on meta but the problem's parameters are on cpu; move one of")
api("optimizer-unknown", H, "unknown optimizer name", lambda tmp: exact.hypergradient(BEALE, LRS, "adamw2"),
    ValueError, r"unknown optimizer 'adamw2'; choose one of \['adagrad', 'adam',")
api("optimizer-type", H, "optimizer neither a name nor a Dynamics", lambda tmp: exact.hypergradient(BEALE, LRS, 3),
    TypeError, r"optimizer must be a name or a hgtoolkit\.dynamics\.Dynamics, got int")
api("mode-unknown", H, "unknown mode", lambda tmp: exact.hypergradient(BEALE, LRS, "sgd", "sideways"), ValueError,
    r"mode must be one of \('reverse', 'reversible',")
api("checkpoint-negative", H, "negative checkpoint interval",
    lambda tmp: exact.hypergradient(BEALE, LRS, checkpoint=-1), ValueError, r"checkpoint must be an integer ≥ 1 or 'auto' or 'binomial' or None, got -1")
api("checkpoint-word", H, "unknown checkpoint word", lambda tmp: exact.hypergradient(BEALE, LRS, checkpoint="some"),
    TypeError, r"checkpoint must be an integer ≥ 1 or 'auto' or 'binomial' or None, got 'some'")
api("memory-word", H, "unparsable memory budget", lambda tmp: exact.hypergradient(BEALE, LRS, memory="lots"),
    ValueError, r"memory must be a memory size \(bytes, or like '200MB', '1\.5GiB'\) or 'auto' or None, got 'lots'")
api("memory-negative", H, "negative memory budget", lambda tmp: exact.hypergradient(BEALE, LRS, memory=-1),
    ValueError, r"memory must be a memory size \(bytes, .* got -1")
api("memory-forward", H, "memory budget with forward mode",
    lambda tmp: exact.hypergradient(BEALE, LRS, mode="forward", memory="1GB"), ValueError,
    r"memory= applies to mode='reverse' or 'reversible', not 'forward'")
api("chunk-size-zero", H, "chunk_size 0", lambda tmp: exact.hypergradient(BEALE, LRS, mode="forward", chunk_size=0),
    ValueError, r"chunk_size must be an integer ≥ 1 or None, got 0")
api("snapshots-zero", H, "snapshots 0", lambda tmp: exact.hypergradient(BEALE, LRS, snapshots=0), ValueError,
    r"snapshots must be an integer ≥ 1 or None, got 0")
api("removed-keyword", H, "a removed keyword (checkpoint_every)",
    lambda tmp: exact.hypergradient(BEALE, LRS, checkpoint_every=2), TypeError,
    r"hypergradient: checkpoint_every was removed; say checkpoint=k \(every")

# ---- hypergradient: the problem's losses
api("train-loss-vector", H, "vector-valued training loss (reverse)",
    lambda tmp: exact.hypergradient(quadratic(train=lambda w, t: w ** 2), LRS), ValueError,
    r"problem\.train_loss must return a scalar")
api("val-loss-vector", H, "vector-valued validation loss (forward)",
    lambda tmp: exact.hypergradient(quadratic(val=lambda w: w ** 2), LRS, mode="forward"), ValueError,
    r"problem\.val_loss must return a scalar")
api("train-loss-vector-autograd", H, "vector-valued training loss (autograd mode)",
    lambda tmp: exact.hypergradient(quadratic(train=lambda w, t: w ** 2), LRS, mode="autograd"), ValueError,
    r"problem\.train_loss must return a scalar")
api("val-loss-vector-autograd", H, "vector-valued validation loss (autograd mode)",
    lambda tmp: exact.hypergradient(quadratic(val=lambda w: w ** 2), LRS, mode="autograd"), ValueError,
    r"problem\.val_loss must return a scalar")
api("train-loss-float", H, "training loss a Python float",
    lambda tmp: exact.hypergradient(quadratic(train=lambda w, t: 1.0), LRS), ValueError,
    r"problem\.train_loss must return a scalar \(0-d\) tensor, got float")
api("train-loss-nan", H, "training loss NaN at step t",
    lambda tmp: exact.hypergradient(quadratic(nan_at=2), LRS), DivergenceError,
    r"step 2: training loss is not finite")
api("val-nan", H, "validation loss NaN",
    lambda tmp: exact.hypergradient(quadratic(val_nan=True), LRS), DivergenceError,
    r"validation loss is not finite")
api("val-nan-forward", H, "validation loss NaN (forward mode)",
    lambda tmp: exact.hypergradient(quadratic(val_nan=True), LRS, mode="forward"), DivergenceError,
    r"validation loss is not finite")
api("stateful-reversible", H, "stateful problem (BatchNorm) in reversible mode",
    lambda tmp: exact.hypergradient(bn_problem(), LRS, "momentum", mode="reversible"), ValueError,
    r"mode='reversible' cannot run problem 'module' backwards: it carries")

api("user-dropout", H, "own Problem drawing random numbers anew at every call (dropout)",
    lambda tmp: exact.hypergradient(user_impure_problem("dropout"), LRS), ValueError,
    r"problem\.train_loss is not a pure function of \(w, t\).*problems\.from_module")
api("user-batchnorm-eval", H, "own Problem whose train_loss writes BatchNorm statistics val_loss reads",
    lambda tmp: exact.hypergradient(user_impure_problem("bn-eval"), LRS, mode="forward"), ValueError,
    r"problem\.val_loss changed after a call of problem\.train_loss.*BatchNorm.*problems\.from_module")
api("problem-a-name", H, "a problem name instead of a Problem", lambda tmp: exact.hypergradient("beale", LRS),
    TypeError, r"problem must be a hgtoolkit\.Problem \(e\.g\. problems\.get\('beale'\) for a name")
api("problem-a-number", H, "a number instead of a Problem", lambda tmp: exact.hypergradient(3, LRS), TypeError,
    r"problem must be a hgtoolkit\.Problem .*got int")

# ---- directional_derivative
D = "directional_derivative"
api("direction-nan", D, "NaN in the direction", lambda tmp: exact.directional_derivative(BEALE, LRS, [math.nan] * T),
    ValueError, r"direction contains NaN")
api("direction-length", D, "direction of another length",
    lambda tmp: exact.directional_derivative(BEALE, LRS, [1.0] * (T + 1)), ValueError,
    r"direction must have the schedule's shape")
api("direction-2d", D, "2-D direction", lambda tmp: exact.directional_derivative(BEALE, LRS, torch.ones(T, 1)),
    ValueError, r"direction must be 1-D")
api("direction-string", D, "a string for the direction", lambda tmp: exact.directional_derivative(BEALE, LRS, "up"),
    TypeError, r"direction must be a 1-D tensor, array or sequence of learning rates,")
api("direction-user-dropout", D, "own Problem drawing random numbers anew at every call (dropout)",
    lambda tmp: exact.directional_derivative(user_impure_problem("dropout"), LRS, torch.ones(T)), ValueError,
    r"problem\.train_loss is not a pure function of \(w, t\)")
api("direction-lrs-negative", D, "negative schedule",
    lambda tmp: exact.directional_derivative(BEALE, -LRS, torch.ones(T)), ValueError,
    r"lrs must be ≥ 0; negative at steps \[0, 1, 2, 3\]")

# ---- finite_difference
FD = "finite_difference"
api("fd-steps-range", FD, "step index out of range", lambda tmp: exact.finite_difference(BEALE, LRS, steps=[T]),
    ValueError, r"steps\[0\]=4 is out of range")
api("fd-steps-string", FD, "steps a string", lambda tmp: exact.finite_difference(BEALE, LRS, steps="all"), TypeError,
    r"steps must be a sequence")
api("fd-eps-negative", FD, "negative eps", lambda tmp: exact.finite_difference(BEALE, LRS, eps=-1.0), ValueError,
    r"eps must be a finite number > 0, got -1\.0")
api("fd-eps-zero", FD, "eps 0", lambda tmp: exact.finite_difference(BEALE, LRS, eps=0.0), ValueError,
    r"eps must be a finite number > 0, got 0\.0")
api("fd-eps-float32", FD, "float64-sized eps on a float32 problem",
    lambda tmp: exact.finite_difference(problems.from_function("beale", dtype=torch.float32), LRS.float(),
                                        eps=1e-9, steps=[0]),
    RuntimeWarning, r"small for torch\.float32")
api("fd-user-batchnorm", FD, "own Problem over a BatchNorm module (buffer written in place)",
    lambda tmp: exact.finite_difference(user_bn_problem(), LRS, steps=[0]), ValueError,
    r"problem\.train_loss writes in place.*problems\.from_module")

# ---- train / make_step
TR = "train"
api("train-user-batchnorm", TR, "own Problem over a BatchNorm module (buffer written in place)",
    lambda tmp: trajectory.train(user_bn_problem(), LRS), ValueError,
    r"problem\.train_loss writes in place.*problems\.from_module")
api("train-nan", TR, "training loss NaN at step t", lambda tmp: hgtoolkit.train(quadratic(nan_at=1), LRS),
    DivergenceError, r"step 1: training loss is not finite")
api("train-val-nan", TR, "validation loss NaN", lambda tmp: hgtoolkit.train(quadratic(val_nan=True), LRS),
    DivergenceError, r"step 3: validation loss is not finite")
api("train-optimizer", TR, "unknown optimizer", lambda tmp: hgtoolkit.train(BEALE, LRS, "lion"), ValueError,
    r"unknown optimizer 'lion'; choose one of \['adagrad', 'adam',")
api("make-step-stateful", "trajectory.make_step", "stateful problem stepped from a state without buffers",
    lambda tmp: trajectory.make_step(bn_problem(), dynamics.sgd())({"w": bn_problem().params0}, LRS[0], 0),
    ValueError, r"is stateful .*holds no buffers")
api("stateful-train-loss-direct", "from_module problem", "calling a stateful problem's train_loss(w, t)",
    lambda tmp: bn_problem().train_loss(bn_problem().params0, 0), ValueError,
    r"problem 'module' is stateful \(running statistics")
api("stateful-val-loss-direct", "from_module problem", "calling a stateful problem's val_loss(w)",
    lambda tmp: bn_problem().val_loss(bn_problem().params0), ValueError,
    r"problem 'module' is stateful \(running statistics")

# ---- optimize_schedule
O = "optimize_schedule"


def opt(**kw):
    args = dict(outer_steps=1, outer_lr=1e-4, progress=False)
    args.update(kw)
    return lambda tmp: lrsopt.optimize_schedule(BEALE, LRS, **args)


api("outer-steps-zero", O, "outer_steps 0", opt(outer_steps=0), ValueError,
    r"outer_steps must be an integer ≥ 1, got 0")
api("outer-steps-bool", O, "bool for outer_steps", opt(outer_steps=True), TypeError,
    r"outer_steps must be an integer ≥ 1, got True")
api("outer-lr-negative", O, "negative outer_lr", opt(outer_lr=-1.0), ValueError,
    r"outer_lr must be a number > 0 or None, got -1\.0")
api("outer-optimizer-unknown", O, "unknown outer optimizer", opt(outer_optimizer="newton"), ValueError,
    r"outer_optimizer.*newton|newton.*outer_optimizer")
api("lrsopt-mode-unknown", O, "unknown mode", opt(mode="sideways"), ValueError,
    r"mode must be one of \('reverse', 'reversible',")
api("lr-max-negative", O, "negative lr_max", opt(lr_max=-1.0), ValueError,
    r"lr_max must be a number > 0 or None, got -1\.0")
api("max-backtracks-negative", O, "negative max_backtracks", opt(max_backtracks=-1), ValueError,
    r"max_backtracks must be an integer ≥ 0, got -1")
api("checkpoint-interval-zero", O, "checkpoint_interval 0",
    lambda tmp: lrsopt.optimize_schedule(BEALE, LRS, 1, 1e-4, checkpoint_path=tmp / "c.pt", checkpoint_interval=0,
                                         progress=False),
    ValueError, r"checkpoint_interval must be an integer ≥ 1, got 0")
api("resume-without-path", O, "resume=True without checkpoint_path", opt(resume=True), ValueError,
    r"resume=True needs checkpoint_path")
api("checkpoint-path-directory", O, "checkpoint_path a directory",
    lambda tmp: lrsopt.optimize_schedule(BEALE, LRS, 1, 1e-4, checkpoint_path=tmp, progress=False), ValueError,
    r"is a directory; expected a file path")
api("checkpoint-exists", O, "existing checkpoint without resume",
    lambda tmp: lrsopt.optimize_schedule(BEALE, LRS, 1, 1e-4, checkpoint_path=lrsopt_ckpt(tmp), progress=False),
    ValueError, r"c\.pt' exists: pass resume=True")
api("checkpoint-flipped-bit", O, "checkpoint with one bit flipped",
    lambda tmp: resume(flip_byte(lrsopt_ckpt(tmp), 1 / 3)), records.CorruptedFileError,
    r"c\.pt.*corrupted.*nothing of it was used")
api("checkpoint-empty", O, "empty checkpoint file", lambda tmp: resume(write(tmp / "c.pt", b"")),
    records.CorruptedFileError, r"c\.pt.*corrupted \(empty")
api("checkpoint-garbage", O, "checkpoint of garbage bytes", lambda tmp: resume(write(tmp / "c.pt", b"garbage" * 10)),
    records.CorruptedFileError,
    r"checkpoint_path '.*c\.pt': corrupted \(empty, or neither a sealed file nor a torch file\); "
    r"nothing of it was used")
api("checkpoint-truncated", O, "truncated checkpoint",
    lambda tmp: resume(write(tmp / "c.pt", lrsopt_ckpt(tmp).read_bytes()[:200])), ValueError,
    r"c\.pt.*(corrupted|not an LRS-OPT)")
api("checkpoint-foreign", O, "a torch file of something else as checkpoint",
    lambda tmp: (torch.save({"weights": torch.zeros(2)}, tmp / "c.pt"), resume(tmp / "c.pt")), ValueError,
    r"c\.pt.*(corrupted|not an LRS-OPT)")
api("checkpoint-other-config", O, "resume with different arguments",
    lambda tmp: resume(lrsopt_ckpt(tmp), outer_optimizer="sgd"), ValueError, r"different arguments")
api("checkpoint-no-checksum", O, "checkpoint written before checksums",
    lambda tmp: resume(write(tmp / "c.pt", records.unseal_bytes(lrsopt_ckpt(tmp).read_bytes(), "c"))),
    records.NoChecksumWarning, r"written before checkpoints carried checksums")
api("lrsopt-dtype-cast", O, "float64 schedule on a float32 problem",
    lambda tmp: lrsopt.optimize_schedule(problems.from_function("beale", dtype=torch.float32), LRS, 1, 1e-4,
                                         progress=False),
    UserWarning, r"lrs is torch\.float64 but the problem is torch\.float32: the schedule is cast")
api("lrsopt-disk-bad", O, "disk neither True/'tmp' nor a directory", opt(disk=3), TypeError,
    r"disk must be None \(no disk tier\), True or 'tmp' \(a temporary directory\) or a directory, got 3")
api("lrsopt-disk-not-binomial", O, "disk with a checkpoint that is not binomial", opt(disk=True, checkpoint=4),
    ValueError, r"disk= holds binomial snapshots: it needs checkpoint='binomial' or 'auto', got checkpoint=4")
api("lrsopt-disk-forward", O, "disk with mode='forward' (no reverse pass)", opt(disk=True, mode="forward"),
    ValueError, r"disk= holds the snapshots of mode='reverse'; mode='forward' has none")
api("lrsopt-removed-keyword", O, "a removed keyword (checkpoint_every)", opt(checkpoint_every=2), TypeError,
    r"optimize_schedule: checkpoint_every was removed; say checkpoint=k")
api("lrsopt-diverges", O, "outer step that makes training diverge", opt(outer_lr=1e6, outer_optimizer="sgd",
                                                                         max_backtracks=0),
    DivergenceWarning,
    r"LRS-OPT stopped: .*diverged at outer step 1")

# ---- online.run
R = "online.run"


def run(**kw):
    args = dict(method="marthe", lr=1e-3, hypergrad_lr=1e-7, steps=3)
    args.update(kw)
    return lambda tmp: online.run(BEALE, **args)


api("online-hd-mu", R, "mu given with method='hd'", run(method="hd", mu=0.5), ValueError,
    r"mu=0\.5 contradicts method='hd'")
api("online-rtho-mu", R, "mu ≠ 1 given with method='rtho'", run(method="rtho", mu=0.5), ValueError,
    r"mu=0\.5 contradicts method='rtho', which fixes μ=1\.0; use")
api("online-hypergrad-lr-negative", R, "negative hypergrad_lr", run(method="rtho", hypergrad_lr=-1.0), ValueError,
    r"hypergrad_lr\ must\ be\ a\ number\ ≥\ 0\ or\ 'auto'\ or\ None,\ got\ \-1\.0")
api("online-hypergrad-lr-nan", R, "NaN hypergrad_lr", run(method="hd", hypergrad_lr=math.nan), ValueError,
    r"hypergrad_lr\ must\ be\ a\ number\ ≥\ 0\ or\ 'auto'\ or\ None,\ got\ nan")
api("online-method-unknown", R, "unknown method", run(method="sgdr"), ValueError, r"method\ must\ be\ one\ of\ \('hd',\ 'rtho',\ 'marthe'\),\ got\ 'sgdr'")
api("online-lr-negative", R, "negative lr", run(lr=-1e-3), ValueError,
    r"lr\ must\ be\ a\ number\ ≥\ 0,\ got\ \-0\.001")
api("online-lr-string", R, "a string for lr", run(lr="fast"), TypeError,
    r"lr\ must\ be\ a\ number\ ≥\ 0,\ got\ 'fast'")
api("online-lr-bool", R, "bool for lr", run(lr=True), TypeError,
    r"lr\ must\ be\ a\ number\ ≥\ 0,\ got\ True")
api("online-steps-zero", R, "steps 0", run(steps=0), ValueError, r"steps\ must\ be\ an\ integer\ ≥\ 1,\ got\ 0")
api("online-steps-float", R, "float steps", run(steps=2.5), TypeError,
    r"steps\ must\ be\ an\ integer\ ≥\ 1,\ got\ 2\.5")
api("online-mu-range", R, "mu above 1", run(mu=1.5), ValueError,
    r"mu\ must\ be\ a\ number\ in\ \[0,\ 1\]\ or\ 'auto'\ or\ None,\ got\ 1\.5")
api("online-kappa-negative", R, "negative kappa", run(kappa=-1.0), ValueError,
    r"kappa\ must\ be\ a\ number\ ≥\ 0,\ got\ \-1\.0")
api("online-hypergrad-lr-rule", R, "unknown hypergrad_lr_rule", run(hypergrad_lr_rule="magic"), ValueError,
    r"hypergrad_lr_rule\ must\ be\ one\ of\ \('hh',\ 'h_eta'\),\ got\ 'magic'")
api("online-objective", R, "unknown objective", run(objective="test"), ValueError,
    r"objective\ must\ be\ one\ of\ \('val',\ 'train'\),\ got\ 'test'")
api("online-floor-above-max", R, "lr_floor above lr_max", run(lr_floor=1.0, lr_max=0.1), ValueError,
    r"lr_floor must be in \[0, lr=0\.001\] \(or None for no clipping\), got 1\.0")
api("online-divergence-factor", R, "divergence_factor ≤ 1", run(divergence_factor=0.5), ValueError,
    r"divergence_factor\ must\ be\ a\ number\ >\ 1\ or\ None,\ got\ 0\.5")
api("online-hd-gradient", R, "unknown hd_gradient", run(method="hd", hd_gradient="exact"), ValueError,
    r"hd_gradient\ must\ be\ one\ of\ \('regularised',\ 'raw'\),\ got\ 'exact'")
api("online-eval-every", R, "eval_every 0", run(eval_every=0), ValueError,
    r"eval_every\ must\ be\ an\ integer\ ≥\ 1\ or\ None,\ got\ 0")
api("online-val-batch-size", R, "val_batch_size on a problem without batches", run(val_batch_size=4), ValueError,
    r"val_batch_size needs a problem with val_batch\(t, size\) and batch_loss")
api("online-hypergrad-lr-bound", R, "negative hypergrad_lr_bound", run(hypergrad_lr_bound=-1.0), ValueError,
    r"hypergrad_lr_bound\ must\ be\ a\ number\ >\ 0\ or\ None,\ got\ \-1\.0")
api("online-train-nan", R, "training loss NaN at step t",
    lambda tmp: online.run(quadratic(nan_at=2), "hd", lr=0.1, hypergrad_lr=1e-3, steps=5), DivergenceWarning,
    r"step 2: training loss is not finite")
api("online-val-nan", R, "validation loss NaN",
    lambda tmp: online.run(quadratic(val_nan=True), "hd", lr=0.1, hypergrad_lr=1e-3, steps=5), DivergenceWarning,
    r"validation loss is not finite")
api("online-raise", R, "divergence with raise_on_divergence=True",
    lambda tmp: online.run(quadratic(nan_at=1), "hd", lr=0.1, hypergrad_lr=1e-3, steps=5, raise_on_divergence=True),
    DivergenceError, r"step 1: training loss")
api("online-blowup", R, "loss climbing above divergence_factor × L_0",
    lambda tmp: online.run(problems.from_function("rosenbrock"), "hd", lr=1e-2, hypergrad_lr=1e-2, steps=20),
    DivergenceWarning,
    r"online hd run stopped: training diverged at step 1: validation loss")
api("online-removed-keyword", R, "an old keyword (lr0)", run(lr0=1e-3), TypeError, r"'lr0' was renamed 'lr'")
api("online-optimizer", R, "unknown inner optimizer", run(optimizer="lion"), ValueError,
    r"unknown optimizer 'lion'; choose one of \['adagrad', 'adam',")

api("online-problem-name", R, "a problem name instead of a Problem",
    lambda tmp: online.run("beale", "hd", lr=1e-3, hypergrad_lr=1e-7, steps=3), TypeError,
    r"problem must be a hgtoolkit\.Problem \(e\.g\. problems\.get\('beale'\)")
api("online-lr-max", R, "lr_max below lr", run(lr_max=-1.0), ValueError, r"lr_max\ must\ be\ a\ number\ >\ 0\ or\ None,\ got\ \-1\.0")
api("online-seed", R, "negative seed", run(seed=-1), ValueError, r"seed\ must\ be\ an\ integer\ ≥\ 0\ or\ None,\ got\ \-1")
api("online-hypergrad-lr-word", R, "a word for hypergrad_lr", run(hypergrad_lr="big"), ValueError,
    r"hypergrad_lr\ must\ be\ a\ number\ ≥\ 0\ or\ 'auto'\ or\ None,\ got\ 'big'")
api("online-mu-word", R, "a word for mu", run(mu="sometimes"), ValueError,
    r"mu\ must\ be\ a\ number\ in\ \[0,\ 1\]\ or\ 'auto'\ or\ None,\ got\ 'sometimes'")
api("online-hypergrad-lr-auto-hd", R, "hypergrad_lr='auto' with method='hd'", run(method="hd", hypergrad_lr="auto"), ValueError,
    r"hypergrad_lr='auto' is MARTHE's adaptive rule; method='hd' needs a number")
api("online-mu-rule", R, "mu_rule not callable", run(mu_rule=3), TypeError,
    r"mu_rule must be callable as mu_rule\(mu, counter, stats\) -> \(mu, counter\), got int")

# ---- find_hypergrad_lr
api("find-hypergrad-lr-factor", "online.find_hypergrad_lr", "factor ≤ 1",
    lambda tmp: online.find_hypergrad_lr(BEALE, 1.0, factor=1.0, method="hd", lr=1e-3, steps=3), ValueError,
    r"factor must be > 1, got 1\.0")
api("online-hd-kappa", R, "kappa (MARTHE's adaptive β) given with method='hd'",
    run(method="hd", kappa=1e-3), ValueError,
    r"kappa=0\.001 applies to method='marthe' with hypergrad_lr='auto'; method='hd' does not use it")
api("online-hd-kappa-default", R, "kappa passed at its default with method='hd' (what is passed counts)",
    run(method="hd", kappa=1e-6), ValueError,
    r"kappa=1e-06 applies to method='marthe' with hypergrad_lr='auto'; method='hd' does not use it")
api("hyper-config-fixed-beta-bound-default", "online.hyper_config",
    "hypergrad_lr_bound passed at its default with a numeric hypergrad_lr",
    lambda tmp: online.hyper_config("marthe", lr=1e-3, hypergrad_lr=1e-7, hypergrad_lr_bound=1.0), ValueError,
    r"hypergrad_lr_bound=1\.0 applies to method='marthe' with hypergrad_lr='auto'; hypergrad_lr=1e-07 does not")
api("online-fixed-beta-init", R, "hypergrad_lr_init given with a numeric hypergrad_lr (fixed β)",
    run(hypergrad_lr_init=1e-3), ValueError,
    r"hypergrad_lr_init=0\.001 applies to .*; hypergrad_lr=1e-07 does not use it \(leave it out\)")
api("hyper-config-rtho-rule", "online.hyper_config", "hypergrad_lr_rule given with method='rtho'",
    lambda tmp: online.hyper_config("rtho", lr=1e-3, hypergrad_lr=1e-7, hypergrad_lr_rule="h_eta"), ValueError,
    r"hypergrad_lr_rule='h_eta' applies to method='marthe' with hypergrad_lr='auto'; method='rtho' does not")
api("find-hypergrad-lr-all-diverge", "online.find_hypergrad_lr", "every value tried diverges",
    lambda tmp: online.find_hypergrad_lr(quadratic(nan_at=1), 1.0, max_tries=2, method="hd", lr=0.1, steps=3),
    DivergenceError, r"find_hypergrad_lr: all 2 values of hypergrad_lr from 1 down to 0\.1 diverged; the last: .*step 1")

# ---- run_online_batch
api("batch-unknown-key", "batched.run_online_batch", "a cell with a key online.run does not take",
    lambda tmp: batched.run_online_batch(lambda s: BEALE,
                                         [dict(method="hd", lr=1e-3, hypergrad_lr=1e-7, steps=3, momentum=0.9)]),
    TypeError, r"cells\[0\]: online\.run\(\) got an unexpected keyword argument 'momentum';")
api("batch-bad-value", "batched.run_online_batch", "a cell with a negative lr",
    lambda tmp: batched.run_online_batch(lambda s: BEALE, [dict(method="hd", lr=-1e-3, hypergrad_lr=1e-7, steps=3)]),
    ValueError, r"cells\[0\]:\ lr\ must\ be\ a\ number\ ≥\ 0,\ got\ \-0\.001")

api("batch-unused-setting", "batched.run_online_batch", "a cell with a setting its method does not use",
    lambda tmp: batched.run_online_batch(lambda s: BEALE, [dict(method="hd", lr=1e-3, hypergrad_lr=1e-7, steps=3,
                                                                hypergrad_lr_bound=None)]),
    ValueError, r"cells\[0\]: hypergrad_lr_bound=None applies to .*; method='hd' does not use it")

api("batch-unused-setting-default", "batched.run_online_batch", "a cell passing a MARTHE setting at its default, method hd",
    lambda tmp: batched.run_online_batch(lambda s: BEALE, [dict(method="hd", lr=1e-3, hypergrad_lr=1e-7, steps=3,
                                                                kappa=1e-6)]),
    ValueError, r"cells\[0\]: kappa=1e-06 applies to .*; method='hd' does not use it")

# ---- towers
TP, TRUN = "towers.parse", "towers.run"
api("tower-negative-lr", TP, "negative hyperparameter", lambda tmp: towers.parse("sgd(lr=-1)"), ValueError,
    r"towers\.SGD: lr must be ≥ 0, got -1\.0")
api("tower-unknown-kind", TP, "unknown optimizer kind", lambda tmp: towers.parse("lion(lr=1e-3)"), ValueError,
    r"tower: unknown optimizer 'lion'; choose one of \['adagrad', 'adam',")
api("tower-unbalanced", TP, "unbalanced parentheses", lambda tmp: towers.parse("sgd(lr=1e-3"), ValueError,
    r"tower: cannot read 'sgd\(lr=1e-3'; write e\.g\. 'sgd\(lr=0\.01,")
api("tower-unknown-hyper", TP, "unknown hyperparameter", lambda tmp: towers.parse("sgd(gamma=0.9)"), ValueError,
    r"tower: sgd takes \['tune', 'lr', 'momentum', 'nesterov',")
api("tower-empty", TP, "empty spec", lambda tmp: towers.parse(""), ValueError,
    r"tower: cannot read ''; write e\.g\. 'sgd\(lr=0\.01, momentum=0\.9\)'")
api("tower-value-word", TP, "a word for a value", lambda tmp: towers.parse("sgd(lr=oops)"), ValueError,
    r"tower: lr='oops' in 'sgd\(lr=oops\)' is not a number")
api("tower-unit-interval", TP, "beta1 outside [0, 1)", lambda tmp: towers.parse("adam(lr=1e-3, beta1=1.5)"),
    ValueError, r"towers\.Adam: beta1 must be in \[0, 1\), got 1\.5")
api("tower-divergence-factor", TRUN, "divergence_factor ≤ 1",
    lambda tmp: towers.run(BEALE, "sgd(lr=1e-4)", 2, divergence_factor=0.5), ValueError,
    r"divergence_factor must be > 1 \(or None\), got 0\.5")
api("tower-steps-zero", TRUN, "steps 0", lambda tmp: towers.run(BEALE, "sgd(lr=1e-4)", 0), ValueError,
    r"steps must be ≥ 1, got 0")
api("tower-not-a-spec", TRUN, "tower neither a spec nor a Level", lambda tmp: towers.run(BEALE, 3, 2), TypeError,
    r"tower must be a string such as 'sgd\(lr=0\.01\) / sgd\(lr=1e-4\)' or a")
api("tower-blowup", TRUN, "loss climbing above divergence_factor × L_0",
    lambda tmp: towers.run(problems.from_function("rosenbrock"), "adam(lr=1e-2) / sgd(lr=1e-3) / sgd(lr=1e-4)", 30),
    DivergenceWarning,
    r"tower adam\(lr=0\.01\) / sgd\(lr=0\.001\) / sgd\(lr=0\.0001\): training")
api("tower-nan", TRUN, "training loss NaN at step t",
    lambda tmp: towers.run(quadratic(nan_at=3), "sgd(lr=0.1) / sgd(lr=1e-3)", 6), DivergenceWarning,
    r"step 3: training loss is not finite")

# ---- hdm
HD = "hdm.run"
QUAD = lambda x: (x ** 2).sum()  # noqa: E731
api("hdm-L-negative", "hdm.HDMConfig", "negative smoothness L", lambda tmp: hdm.HDMConfig(L=-1.0), ValueError,
    r"L must be a finite number > 0, got -1\.0")
api("hdm-mode", "hdm.HDMConfig", "unknown mode", lambda tmp: hdm.HDMConfig(L=1.0, mode="full"), ValueError,
    r"unknown mode='full'; choose one of \('scalar', 'diag'\)")
api("hdm-x0-2d", HD, "2-D x0", lambda tmp: hdm.run(QUAD, torch.ones(2, 2, dtype=F64), hdm.HDMConfig(L=2.0)),
    TypeError, r"x0 must be a 1-D floating-point tensor, got torch\.float64 of shape \(2, 2\)")
api("hdm-x0-list", HD, "x0 not a tensor", lambda tmp: hdm.run(QUAD, [1.0, 2.0], hdm.HDMConfig(L=2.0)), TypeError,
    r"x0 must be a 1-D floating-point tensor, got list")
api("hdm-max-iter", HD, "max_iter 0",
    lambda tmp: hdm.run(QUAD, torch.ones(2, dtype=F64), hdm.HDMConfig(L=2.0), max_iter=0),
    ValueError, r"max_iter must be an int ≥ 1, got 0")
api("hdm-tol", HD, "negative tol", lambda tmp: hdm.run(QUAD, torch.ones(2, dtype=F64), hdm.HDMConfig(L=2.0), tol=-1.0),
    ValueError, r"tol must be > 0, got -1\.0")
api("hdm-vector-f", HD, "vector-valued f", lambda tmp: hdm.run(lambda x: x ** 2, torch.ones(2, dtype=F64),
                                                               hdm.HDMConfig(L=2.0), max_iter=2),
    ValueError, r"f must return a scalar \(0-d\) tensor, got shape \(2,\)")
api("hdm-config-type", HD, "config not an HDMConfig", lambda tmp: hdm.run(QUAD, torch.ones(2, dtype=F64), {"L": 2.0}),
    TypeError, r"config must be an HDMConfig, got dict")

# ---- drop-ins
S, A, M = "optim.SGDHD", "optim.AdamHD", "optim.MARTHE"
api("sgdhd-lr-negative", S, "negative lr", lambda tmp: optim.SGDHD(tensors(), lr=-1.0), ValueError,
    r"lr must be a finite number ≥ 0, got -1\.0")
api("sgdhd-hypergrad-lr", S, "negative hypergrad_lr", lambda tmp: optim.SGDHD(tensors(), hypergrad_lr=-1.0), ValueError,
    r"hypergrad_lr must be a finite number ≥ 0, got -1\.0")
api("sgdhd-momentum", S, "momentum above 1", lambda tmp: optim.SGDHD(tensors(), momentum=1.5), ValueError,
    r"SGD: momentum must be in \[0, 1\), got 1\.5")
api("sgdhd-weight-decay", S, "negative weight_decay", lambda tmp: optim.SGDHD(tensors(), weight_decay=-1.0), ValueError,
    r"SGD: weight_decay must be ≥ 0, got -1\.0")
api("sgdhd-nesterov", S, "nesterov without momentum", lambda tmp: optim.SGDHD(tensors(), nesterov=True), ValueError,
    r"SGD: nesterov=True needs momentum > 0")
api("sgdhd-no-params", S, "empty parameter list", lambda tmp: optim.SGDHD([]), ValueError,
    r"optimizer got an empty parameter list")
api("sgdhd-int-params", S, "integer tensors as parameters", lambda tmp: optim.SGDHD([torch.zeros(2, dtype=torch.long)]),
    TypeError, r"params must be floating-point")
api("sgdhd-floor-max", S, "lr_floor above lr_max", lambda tmp: optim.SGDHD(tensors(), lr_floor=1.0, lr_max=0.1),
    ValueError, r"lr_floor must be in \[0, lr=0\.001\] \(or None for no clipping\), got 1\.0")
api("sgdhd-divergence-factor", S, "divergence_factor ≤ 1",
    lambda tmp: optim.SGDHD(tensors(), divergence_factor=0.5), ValueError,
    r"divergence_factor\ must\ be\ a\ number\ >\ 1\ or\ None,\ got\ 0\.5")
api("sgdhd-module", S, "module= not a torch.nn.Module", lambda tmp: optim.SGDHD(tensors(), module=3), TypeError,
    r"module must be the torch\.nn\.Module the closure evaluates, got int")
api("sgdhd-lr-string", S, "a string for lr", lambda tmp: optim.SGDHD(tensors(), lr="0.1"), ValueError,
    r"lr must be a finite number ≥ 0, got '0\.1'")
api("adamhd-betas", A, "betas outside [0, 1)", lambda tmp: optim.AdamHD(tensors(), betas=(1.2, 0.999)), ValueError,
    r"beta1 must be in \[0, 1\), got 1\.2")
api("adamhd-eps", A, "negative eps", lambda tmp: optim.AdamHD(tensors(), eps=-1.0), ValueError,
    r"Adam: eps must be ≥ 0, got -1\.0")
api("adamhd-lr-nan", A, "NaN lr", lambda tmp: optim.AdamHD(tensors(), lr=math.nan), ValueError,
    r"lr must be a finite number ≥ 0, got nan")
api("marthe-method", M, "unknown method", lambda tmp: optim.MARTHE(tensors(), method="sgdr"), ValueError,
    r"method\ must\ be\ one\ of\ \('hd',\ 'rtho',\ 'marthe'\),\ got\ 'sgdr'")
api("marthe-mu", M, "mu above 1", lambda tmp: optim.MARTHE(tensors(), mu=1.5), ValueError,
    r"mu\ must\ be\ a\ number\ in\ \[0,\ 1\]\ or\ 'auto'\ or\ None,\ got\ 1\.5")
api("marthe-hd-mu", M, "mu with method='hd'", lambda tmp: optim.MARTHE(tensors(), method="hd", mu=0.5), ValueError,
    r"mu=0\.5 contradicts method='hd', which fixes μ=0\.0; use")
api("marthe-kappa", M, "negative kappa", lambda tmp: optim.MARTHE(tensors(), kappa=-1.0), ValueError,
    r"kappa\ must\ be\ a\ number\ ≥\ 0,\ got\ \-1\.0")
api("marthe-fixed-beta-kappa", M, "kappa with a numeric hypergrad_lr (fixed β)",
    lambda tmp: optim.MARTHE(tensors(), hypergrad_lr=1e-3, kappa=1e-3), ValueError,
    r"kappa=0\.001 applies to .*; hypergrad_lr=0\.001 does not use it")
api("marthe-fixed-beta-kappa-default", M, "kappa at its default with a numeric hypergrad_lr",
    lambda tmp: optim.MARTHE(tensors(), hypergrad_lr=1e-3, kappa=1e-6), ValueError,
    r"kappa=1e-06 applies to .*; hypergrad_lr=0\.001 does not use it")
api("marthe-group-kappa-default", M, "a param group's own kappa (its default) with method='hd'",
    lambda tmp: optim.MARTHE([{"params": tensors(), "kappa": 1e-6}], method="hd", hypergrad_lr=1e-3), ValueError,
    r"kappa=1e-06 applies to .*; method='hd' does not use it")
api("marthe-objective", M, "unknown objective", lambda tmp: optim.MARTHE(tensors(), objective="test"), ValueError,
    r"unknown objective 'test'; choose one of \('val', 'train'\)")
api("marthe-optimizer", M, "unknown inner optimizer", lambda tmp: optim.MARTHE(tensors(), optimizer="lion"), ValueError,
    r"unknown optimizer 'lion'; choose one of \['adagrad', 'adam',")
api("marthe-no-closure", M, "step() without closure when μ ≠ 0",
    lambda tmp: dropin_step(lambda ps: optim.MARTHE(ps, lr=1e-2, hypergrad_lr=1e-3, objective="train"), closure=False,
                            before=lambda m, o, f: f().backward()),
    ValueError, r"closure is required")
api("marthe-no-val-closure", M, "objective='val' without val_closure",
    lambda tmp: dropin_step(lambda ps: optim.MARTHE(ps, lr=1e-2, hypergrad_lr=1e-3)), ValueError,
    r"val_closure is required")
api("marthe-closure-backward", M, "closure that calls backward() itself",
    lambda tmp: _closure_backward(), RuntimeError,
    r"could not differentiate the loss returned by the closure: it must be")
api("marthe-closure-vector", M, "closure returning a vector", lambda tmp: _closure_vector(), TypeError,
    r"closure must return the loss as a one-element tensor")
api("marthe-closure-no-grad", M, "closure computed under no_grad", lambda tmp: _closure_no_grad(), RuntimeError,
    r"does not depend on the optimizer's trainable parameters")
api("dropin-grad-changed", M, "p.grad changed in place after the step (clipping behind the optimizer's back)",
    lambda tmp: _grad_changed_behind(), RuntimeError, r"changed in place since")


api("sgdhd-nan-gradient", S, "a NaN loss at step t in the user's loop",
    lambda tmp: _nan_loop(lambda ps: optim.SGDHD(ps, lr=0.1)), DivergenceWarning,
    r"SGDHD: training diverged at step 1: the gradient p\.grad \(so the training loss or its backward\) is not "
    r"finite; the step was not applied")
api("adamhd-nan-raise", A, "a NaN loss at step t with raise_on_divergence=True",
    lambda tmp: _nan_loop(lambda ps: optim.AdamHD(ps, lr=0.1, raise_on_divergence=True)), DivergenceError,
    r"step 1: the gradient p\.grad .* is not finite \(nothing was changed\)")
api("tower-optimizer-nan", "towers.TowerOptimizer", "a NaN loss at step t in the user's loop",
    lambda tmp: _nan_loop(lambda ps: towers.TowerOptimizer(ps, "sgd(lr=0.1) / sgd(lr=1e-3)")), DivergenceWarning,
    r"TowerOptimizer: training diverged at step 1: level-0 hyperparameter 'lr' \(sgd\) is not finite")


def _nan_loop(make):
    """Three steps of a user's loop (backward, step) whose loss is NaN at step 1."""
    model, X = _linear()
    o = make(model.parameters())
    for k in range(3):
        o.zero_grad()
        ((model(X) ** 2).mean() * (math.nan if k == 1 else 1.0)).backward()
        o.step()


def _linear():
    torch.manual_seed(0)
    return nn.Linear(3, 1).to(F64), torch.randn(8, 3, dtype=F64)


def _closure_backward():
    model, X = _linear()
    o = optim.MARTHE(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, objective="train")

    def closure():
        loss = (model(X) ** 2).mean()
        loss.backward()
        return loss
    o.step(closure)
    o.step(closure)


def _closure_vector():
    model, X = _linear()
    optim.MARTHE(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, objective="train").step(lambda: model(X).squeeze())


def _closure_no_grad():
    model, X = _linear()

    def closure():
        with torch.no_grad():
            return (model(X) ** 2).mean()
    optim.MARTHE(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, objective="train").step(closure)


def _grad_changed_behind():
    model, X = _linear()
    o = optim.MARTHE(model.parameters(), lr=1e-2, hypergrad_lr=1e-3, objective="train")
    closure = lambda: (model(X) ** 2).mean()  # noqa: E731
    o.step(closure)
    for p in model.parameters():
        p.grad.mul_(0.5)  # clipping after step(), behind the optimizer's back
    o.step(closure)


api("tower-optimizer-spec", "towers.TowerOptimizer", "bad tower spec",
    lambda tmp: towers.TowerOptimizer(tensors(), "sgd(lr=-1) / sgd(lr=1e-3)"), ValueError,
    r"towers\.SGD: lr must be ≥ 0, got -1\.0")

# ---- dynamics (the inner optimizers)
DY = "dynamics"
api("dyn-momentum-range", DY, "momentum(γ ≥ 1)", lambda tmp: dynamics.momentum(1.5), ValueError,
    r"SGD: momentum must be in \[0, 1\), got 1\.5")
api("dyn-momentum-negative", DY, "momentum(γ < 0)", lambda tmp: dynamics.momentum(-0.1), ValueError,
    r"SGD: momentum must be ≥ 0, got -0\.1")
api("dyn-adam-beta2", DY, "adam(beta2 = 1)", lambda tmp: dynamics.adam(betas=(0.9, 1.0)), ValueError,
    r"Adam: beta2 must be in \[0, 1\), got 1\.0")
api("dyn-adam-eps", DY, "adam(eps < 0)", lambda tmp: dynamics.adam(eps=-1),
    ValueError, r"Adam: eps must be ≥ 0, got -1")
api("dyn-sgd-weight-decay", DY, "sgd(weight_decay < 0)", lambda tmp: dynamics.sgd(weight_decay=-1), ValueError,
    r"SGD: weight_decay must be ≥ 0, got -1")
api("dyn-nesterov", DY, "sgd(nesterov=True) without momentum", lambda tmp: dynamics.sgd(nesterov=True), ValueError,
    r"SGD: nesterov=True needs momentum > 0")

# ---- horizons
HZ = "horizons"
api("horizon-K-zero", HZ, "truncated(K=0)", lambda tmp: horizons.truncated(BEALE, LRS, 0), ValueError,
    r"K must be ≥ 1, got 0")
api("horizon-Ks-empty", HZ, "truncated_ladder(Ks=[])", lambda tmp: horizons.truncated_ladder(BEALE, LRS, []),
    ValueError, r"Ks is empty")
api("horizon-d-zero", HZ, "nqm_spectrum(d=0)", lambda tmp: horizons.nqm_spectrum(0), ValueError,
    r"d must be an int ≥ 1, got 0")
api("horizon-kind", HZ, "nqm_spectrum(kind unknown)", lambda tmp: horizons.nqm_spectrum(10, kind="x"), ValueError,
    r"unknown kind='x'; choose 'chebyshev' or 'geometric'")
api("horizon-kappa", HZ, "nqm_spectrum(kappa < 1)", lambda tmp: horizons.nqm_spectrum(10, kappa=0.5), ValueError,
    r"kappa must be ≥ 1, got 0\.5")
api("horizon-nqm-type", HZ, "greedy_schedule of something not a noisy quadratic",
    lambda tmp: horizons.greedy_schedule(None, 3),
    TypeError, r"nqm must be a testfunctions\.NoisyQuadratic, got NoneType")
api("disk-not-a-directory", H, "disk neither True/'tmp' nor a directory",
    lambda tmp: exact.hypergradient(BEALE, LRS, disk=3), TypeError,
    r"disk must be None \(no disk tier\), True or 'tmp' \(a temporary directory\) or a directory, got 3")
api("disk-not-binomial", H, "disk with a checkpoint that is not binomial",
    lambda tmp: exact.hypergradient(BEALE, LRS, checkpoint=4, disk=True), ValueError,
    r"disk= holds binomial snapshots: it needs checkpoint='binomial' or 'auto', got checkpoint=4")

# ---- problems
FM, FF, P, G = "problems.from_module", "problems.from_function", "Problem", "problems.get"
TRD = bn_data()
api("module-not-module", FM, "model not a torch.nn.Module",
    lambda tmp: problems.from_module(lambda x: x, CE, TRD, TRD, batch_size=4),
    TypeError, r"model must be a torch\.nn\.Module")
api("module-batch-size-large", FM, "batch_size above the training set",
    lambda tmp: problems.from_module(bn_model(), CE, TRD, TRD, batch_size=100), ValueError,
    r"batch_size must be an int in")
api("module-batch-size-float", FM, "float batch_size",
    lambda tmp: problems.from_module(bn_model(), CE, TRD, TRD, batch_size=4.5),
    ValueError, r"batch_size must be an int in \[1, 16\], got 4\.5")
api("module-val-mode", FM, "unknown val_mode",
    lambda tmp: problems.from_module(bn_model(), CE, TRD, TRD, batch_size=4, val_mode="test"),
    ValueError, r"val_mode must be 'eval' or 'train', got 'test'")
api("module-lengths", FM, "inputs and targets of different lengths",
    lambda tmp: problems.from_module(bn_model(), CE, (TRD[0], TRD[1][:3]), TRD, batch_size=4), ValueError,
    r"same number of examples")
api("module-data-type", FM, "train_data neither tensors nor a dataset",
    lambda tmp: problems.from_module(bn_model(), CE, 3, TRD, batch_size=4), TypeError, r"train_data must be")
api("module-buffer-in-forward", FM, "a layer writing a buffer in its forward (not BatchNorm)",
    lambda tmp: problems.from_module(nn.Sequential(nn.Linear(3, 2), CountingInForward()).to(F64), CE, TRD, TRD,
                                     batch_size=4), ValueError,
    r"layer '1' \(CountingInForward\) writes its buffer 'calls'")
api("module-dropout-vmap-different", FM, "a dropout model's train_loss under vmap(randomness='different')",
    lambda tmp: train_loss_in_vmap(dropout_problem(), "different"), ValueError,
    r"draws random numbers in its forward pass \(e\.g\. dropout\).*vmap it with randomness='same'")
api("module-loss-vector", FM, "loss_fn returning a vector",
    lambda tmp: exact.hypergradient(problems.from_module(bn_model(), lambda o, y: CE(o, y, reduction="none"), TRD, TRD,
                                                         batch_size=8), LRS), ValueError,
    r"problem\.train_loss must return a scalar \(0-d\) tensor, got shape \(8,\);")
api("function-unknown", FF, "unknown test function", lambda tmp: problems.from_function("bael"), ValueError,
    r"unknown test function name='bael'; valid names: beale, bukin6,")
api("function-x0-shape", FF, "x0 of the wrong shape",
    lambda tmp: problems.from_function("beale", torch.ones(3, dtype=F64)),
    ValueError, r"x0 must have shape \(2,\) .* got \(3,\)")
api("function-not-callable", FF, "f neither a name nor a callable", lambda tmp: problems.from_function(3), TypeError,
    r"f must be callable or a test-function name, got int")
api("function-callable-no-x0", FF, "a callable without x0", lambda tmp: problems.from_function(QUAD), ValueError,
    r"x0 is required when f is a callable")
api("function-dtype-int", FF, "an integer dtype",
    lambda tmp: problems.from_function("beale", dtype=torch.int64), TypeError,
    r"dtype must be a floating-point torch\.dtype")
api("problem-train-loss", P, "train_loss not callable", lambda tmp: problems.Problem(torch.ones(2), 3, QUAD), TypeError,
    r"train_loss must be callable as train_loss\(params, t\)")
api("problem-rng-seed-alone", P, "rng_seed without batch_loss",
    lambda tmp: problems.Problem(torch.ones(2), lambda w, t: w.sum(), QUAD, rng_seed=lambda t: t), TypeError,
    r"rng_seed goes with batch/batch_loss")
api("problem-params0", P, "params0 not tensors", lambda tmp: problems.Problem("w", lambda w, t: w, QUAD), TypeError,
    r"params0 must be a tensor or a pytree \(dict/list/tuple\) of tensors")
api("get-unknown", G, "unknown problem", lambda tmp: problems.get("bael"), ValueError, r"unknown problem 'bael'")
api("get-keyword", G, "keyword the problem does not take", lambda tmp: problems.get("beale", n_train=10), TypeError,
    r"problem 'beale' takes no argument 'n_train'")
api("get-dtype", G, "dtype not a float type", lambda tmp: problems.get("synthetic_mlp", dtype="int8"), TypeError,
    r"dtype must be a floating-point torch\.dtype or one of \['bfloat16',")
api("get-hidden-malformed", G, "hidden malformed", lambda tmp: problems.get("synthetic_mlp", hidden="[64"), ValueError,
    r"hidden must be a list of positive layer widths such as \[64, 64\], got")
api("get-hidden-zero", G, "hidden with a zero width", lambda tmp: problems.get("synthetic_mlp", hidden=[0]), ValueError,
    r"hidden must be a list of positive layer widths such as \[64, 64\], got")

api("module-device", FM, "an unknown device",
    lambda tmp: problems.from_module(bn_model(), CE, TRD, TRD, batch_size=4, device="tpu"),
    ValueError, r"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'tpu'")
api("module-seed", FM, "negative seed",
    lambda tmp: problems.from_module(bn_model(), CE, TRD, TRD, batch_size=4, seed=-1),
    ValueError, r"seed must be an int ≥ 0, got -1")
api("function-device", FF, "an unknown device", lambda tmp: problems.from_function("beale", device="tpu"), ValueError,
    r"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got 'tpu'")
api("problem-val-loss", P, "val_loss not callable",
    lambda tmp: problems.Problem(torch.ones(2), lambda w, t: w.sum(), 3),
    TypeError, r"val_loss must be callable as val_loss\(params\)")

# ---- save / load / records
SV, LD = "save", "load"
api("save-not-result", SV, "something that is not a result", lambda tmp: hgtoolkit.save({"a": 1}, tmp / "x"), TypeError,
    r"dict is not a registered record type")
api("load-missing", LD, "missing file", lambda tmp: hgtoolkit.load(tmp / "nope.json"), FileNotFoundError,
    r"No such file or directory: '.*nope\.json'")
api("load-json-truncated", LD, "truncated JSON record",
    lambda tmp: online.OnlineResult.load(write(tmp / "r.json", b'{"kind": "onl')), ValueError,
    r"r\.json: corrupted \(not a valid JSON record")
api("load-not-text", LD, "binary bytes as a record",
    lambda tmp: towers.TowerResult.load(write(tmp / "t.json", b"\x80\x81garbage")),
    ValueError, r"t\.json: corrupted \(not a text")
api("load-digit-changed", LD, "record with one digit changed",
    lambda tmp: hgtoolkit.load(flip_digit(saved_online(tmp))),
    records.CorruptedFileError, r"run\.json: corrupted.*nothing of it")
api("load-npz-byte", LD, "record's arrays with one byte changed",
    lambda tmp: (saved_online(tmp), hgtoolkit.load(flip_byte(tmp / "run.npz") and tmp / "run.json")),
    records.CorruptedFileError, r"run\.npz: corrupted")
api("load-params-byte", LD, "record's parameters with one byte changed",
    lambda tmp: (saved_online(tmp), hgtoolkit.load(flip_byte(tmp / "run.params.pt") and tmp / "run.json")),
    records.CorruptedFileError, r"run\.params\.pt: corrupted")
api("load-npz-missing", LD, "record whose arrays file is gone",
    lambda tmp: (saved_online(tmp), (tmp / "run.npz").unlink(), hgtoolkit.load(tmp / "run.json")), ValueError,
    r"run\.json: the arrays do not match the record \(run\.npz is missing\)")
api("load-foreign-json", LD, "JSON that is no hgtoolkit record",
    lambda tmp: hgtoolkit.load(write(tmp / "x.json", b'{"a": 1}')),
    ValueError, r"x\.json: not a hgtoolkit record")
api("load-legacy", LD, "record written before checksums",
    lambda tmp: hgtoolkit.load(Path(__file__).parent / "data" / "legacy_records" / "online.json"),
    records.NoChecksumWarning, r"online\.json: written before records carried checksums")
api("load-arrays-truncated", "records.load_arrays", "truncated .npz",
    lambda tmp: records.load_arrays(write(tmp / "a.npz", b"PK\x03\x04trunc")), ValueError,
    r"a\.npz: cannot read the arrays")
api("unseal-changed", "records.unseal", "sealed payload changed",
    lambda tmp: records.unseal({**records.seal({"a": 1.5}), "a": 2.5}, "x"), records.CorruptedFileError,
    r"x: corrupted \(its content does not match its sha256 checksum\);")

# ---- analysis / baselines / explore
api("analyse-not-online", "analysis.analyse_online", "result not an online run",
    lambda tmp: analysis.analyse_online(exact.hypergradient(BEALE, LRS), BEALE), TypeError,
    r"result must be an hgtoolkit\.online\.OnlineResult, got HypergradResult")
api("peer-unknown", "baselines.run_peer", "unknown peer", lambda tmp: baselines.run_peer(BEALE, "sgdx", 3, lr=1e-3),
    ValueError, r"unknown peer name 'sgdx'")
api("peer-steps", "baselines.run_peer", "steps 0", lambda tmp: baselines.run_peer(BEALE, "constant", 0, lr=1e-3),
    ValueError, r"steps must be ≥ 1, got 0")
api("explore-problem", "explore",
    "unknown problem", lambda tmp: hgtoolkit.explore("bael", precompute=False, widgets=False),
    ValueError, r"problem must name a 2-D test function, one of \['beale', 'bukin6',")
api("explore-method", "explore", "unknown method",
    lambda tmp: hgtoolkit.explore("beale", method="sgdr", precompute=False, widgets=False), ValueError,
    r"method must be one of \['hd', 'rtho', 'marthe', 'adaptive_hypergrad_lr'\], got")
api("explore-steps", "explore",
    "steps 0", lambda tmp: hgtoolkit.explore("beale", steps=0, precompute=False, widgets=False),
    ValueError, r"steps must be an int in \[1, 1000\] \(the largest horizon of the grid\),")

api("compare-shapes", "analysis.compare", "estimate and reference of different lengths",
    lambda tmp: analysis.compare([1.0, 2.0], [1.0]), ValueError,
    r"estimate has shape \(2,\) but reference has shape \(1,\); they must hold one value per step")
api("references-negative", "analysis.exact_references", "negative schedule",
    lambda tmp: analysis.exact_references(BEALE, -LRS), ValueError, r"lrs must be ≥ 0; negative at steps")
api("towers-problem-name", TRUN, "a problem name instead of a Problem",
    lambda tmp: towers.run("beale", "sgd(lr=1e-3)", 3), TypeError, r"problem must be a hgtoolkit\.Problem")
api("lrsopt-problem-name", O, "a problem name instead of a Problem",
    lambda tmp: lrsopt.optimize_schedule("beale", LRS, 1, 1e-4, progress=False), TypeError,
    r"problem must be a hgtoolkit\.Problem")
api("fd-steps-float", FD, "a float step index", lambda tmp: exact.finite_difference(BEALE, LRS, steps=[0.5]), TypeError,
    r"steps\[0\] must be an int, got 0\.5")
api("fd-eps-string", FD, "eps a string", lambda tmp: exact.finite_difference(BEALE, LRS, eps="1e-5"), TypeError,
    r"eps must be a number or None, got str")
api("get-batch-size", G, "batch_size 0", lambda tmp: problems.get("mnist_mlp", batch_size=0), ValueError,
    r"batch_size must be a positive int, got 0")
api("get-n-train", G, "n_train 0", lambda tmp: problems.get("synthetic_mlp", n_train=0), ValueError,
    r"n_train must be a positive int, got 0")

api("explore-grid-empty", "explore", "an empty slider grid",
    lambda tmp: hgtoolkit.explore("beale", grids={"lr": []}, precompute=False, widgets=False), ValueError,
    r"grids\['lr'\] must hold at least one value")
api("explore-lr", "explore", "negative lr",
    lambda tmp: hgtoolkit.explore("beale", lr=-1, precompute=False, widgets=False),
    ValueError, r"lr must be > 0, got -1")

# ---- sweep
SG, SR, SL = "sweep.Grid", "sweep.run", "sweep.load_grids"
api("grid-kind", SG, "unknown kind", lambda tmp: grid(kind="magic"), ValueError,
    r"grid 'g': kind: unknown cell kind 'magic'; choose one of \('online',")
api("grid-axis-scalar", SG, "an axis that is not a list", lambda tmp: grid(axes={"lr": 1e-3}), ValueError,
    r"grid 'g': axes\.lr must be a list of values, got 0\.001")
api("grid-fixed-unknown", SG, "unknown fixed key", lambda tmp: grid(fixed={"lr": 1e-3, "steps": 2, "momentum": 0.9}),
    ValueError, r"unknown key 'momentum'")
api("grid-axis-and-fixed", SG, "a key both an axis and fixed", lambda tmp: grid(axes={"lr": [1e-3]}), ValueError,
    r"grid 'g': axes\.lr is also in fixed; set it in one place")
api("grid-unused-setting", SG, "an axis crossing method with a setting one method does not use",
    lambda tmp: grid(kind="online", fixed={"lr": 1e-3, "steps": 2, "hypergrad_lr": 1e-7},
                     axes={"method": ["hd", "marthe"], "kappa": [1e-3]}), ValueError,
    r"grid 'g': cell \{'method': 'hd', 'kappa': 0\.001\}: kappa=0\.001 applies to .*; method='hd' does not")
api("grid-unused-setting-default", SG, "a fixed MARTHE setting at its default with method hd",
    lambda tmp: grid(kind="online", fixed={"lr": 1e-3, "steps": 2, "hypergrad_lr": 1e-7, "hypergrad_lr_rule": "hh"},
                     axes={"method": ["hd"]}), ValueError,
    r"grid 'g': cell \{'method': 'hd'\}: hypergrad_lr_rule='hh' applies to .*; method='hd' does not")
api("grid-yaml", SL, "malformed YAML",
    lambda tmp: sweep.load_grids(write(tmp / "g.yaml", b"name: [x\nproblem: {")), ValueError,
    r"g\.yaml: not valid YAML")
api("grid-top-level", SL, "unknown top-level key",
    lambda tmp: sweep.load_grids(write(tmp / "g.yaml", b"name: x\nproblem: {name: beale}\nkind: train\n"
                                       b"fixed: {lr: 1e-3, steps: 3}\nfixd: {}\n")), ValueError,
    r"unknown top-level key 'fixd'")
api("grid-missing", SL, "missing file", lambda tmp: sweep.load_grids(tmp / "nope.yaml"), FileNotFoundError,
    r"grid file .*nope\.yaml does not exist")
api("grid-list", SL, "a YAML list instead of a mapping",
    lambda tmp: sweep.load_grids(write(tmp / "g.yaml", b"- a\n- b\n")),
    ValueError, r"expected a mapping")
api("grid-axis-empty", SG, "an empty axis", lambda tmp: grid(axes={"lr": []}, fixed={"steps": 2}), ValueError,
    r"grid 'g': axes\.lr is empty: an axis needs at least one value")
api("grid-problem-unknown", SG, "an unknown problem", lambda tmp: grid(problem={"name": "bael"}), ValueError,
    r"grid 'g': problem\.name: unknown problem 'bael'")
api("grid-required-missing", SR, "a grid without a required setting (steps)",
    lambda tmp: sweep.run(grid(fixed={"lr": 1e-3}), tmp / "s", progress=False), ValueError,
    r"grid 'g': 'steps' is required for kind 'train' \(set it in fixed or axes\)")
api("sweep-lock-timeout", SR, "negative lock_timeout",
    lambda tmp: sweep.run(grid(), tmp / "s", lock_timeout=-1), ValueError,
    r"lock_timeout must be a number of seconds ≥ 0, got -1")
api("sweep-executor", SR, "unknown executor", lambda tmp: sweep.run(grid(), tmp / "s", executor="slurm"), ValueError,
    r"unknown executor 'slurm'; choose one of \('local', 'processes', 'ray'\)")
api("sweep-threads", SR, "threads_per_cell 0", lambda tmp: sweep.run(grid(), tmp / "s", threads_per_cell=0), ValueError,
    r"threads_per_cell must be an int ≥ 1, got 0")
api("sweep-retries", SR, "negative max_retries", lambda tmp: sweep.run(grid(), tmp / "s", max_retries=-1), ValueError,
    r"max_retries must be an int ≥ 0, got -1")
api("sweep-results-file", SR, "results_dir an existing file",
    lambda tmp: sweep.run(grid(), write(tmp / "f", b"x"), progress=False), ValueError,
    r"results_dir '.*f' is a file; expected a directory")
api("sweep-cell-corrupt", "sweep.load_results", "a cell record that is not valid JSON",
    lambda tmp: (sweep.run(grid(), tmp, progress=False),
                 write(next((tmp / "cells").glob("*.json")), b'{"format": "hgtoolkit.sweep.cell/1", "id": '),
                 sweep.load_results(tmp)), ValueError, r"not a valid JSON record.*delete the file")
api("sweep-cell-foreign", "sweep.load_results", "a cell record of something else",
    lambda tmp: (sweep.run(grid(), tmp, progress=False), write(next((tmp / "cells").glob("*.json")), b'{"x": 1}'),
                 sweep.load_results(tmp)), ValueError,
    r"not a sweep cell record")

# ============================================================================= CLI

cli("cli-hd-mu", "online", "--mu with --method hd", ["online", "--method", "hd", "--hypergrad-lr", "1e-7", "--mu", "0.5"],
    r"--mu is a MARTHE setting; --method hd fixes μ = 0 and uses a constant")
cli("cli-rtho-kappa", "online", "--kappa with --method rtho", ["online", "--method", "rtho", "--hypergrad-lr", "1e-7",
    "--kappa", "1e-3"],
    r"--kappa is a MARTHE setting; --method rtho fixes μ = 1 and uses a")
cli("cli-fixed-beta-kappa", "online", "--kappa with a numeric --hypergrad-lr (fixed β)",
    ["online", "--method", "marthe", "--hypergrad-lr", "1e-7", "--kappa", "1e-3"],
    r"--kappa is a setting of MARTHE's adaptive β \(--hypergrad-lr auto\); --hypergrad-lr 1e-07 is a constant β")
cli("cli-hd-kappa-default", "online", "--kappa given at its default with --method hd",
    ["online", "--method", "hd", "--hypergrad-lr", "1e-7", "--kappa", "1e-6"],
    r"--kappa is a MARTHE setting; --method hd fixes μ = 0 and uses a constant")
cli("cli-hypergrad-lr-negative", "online", "negative --hypergrad-lr", ["online", "--hypergrad-lr", "-1"],
    r"argument --hypergrad-lr: expected a number ≥ 0 or 'auto' or 'none', got '-1'")
cli("cli-mu-range", "online", "--mu above 1", ["online", "--mu", "1.5"],
    r"argument --mu: expected a number in \[0, 1\] or 'auto' or 'none', got")
cli("cli-online-steps", "online", "--steps 0", ["online", "--steps", "0"],
    r"argument --steps: expected a positive integer, got '0'")
cli("cli-lr-floor-word", "online", "a word for --lr-floor", ["online", "--lr-floor", "low"],
    r"argument --lr-floor: expected a number ≥ 0 or 'none', got 'low'")
cli("cli-online-lr-nan", "online", "--lr nan", ["online", "--lr", "nan"],
    r"argument --lr: expected a number ≥ 0, got 'nan'")
cli("cli-divergence-factor", "online", "--divergence-factor ≤ 1", ["online", "--divergence-factor", "0.5"],
    r"argument --divergence-factor: expected a number > 1 or 'none', got '0\.5'")
cli("cli-eval-every", "online", "--eval-every 0", ["online", "--eval-every", "0"],
    r"argument --eval-every: expected an integer ≥ 1 or 'none', got '0'")
cli("cli-method-unknown", "online", "unknown --method", ["online", "--method", "sgdr"],
    r"argument --method: invalid choice: 'sgdr' \(choose from 'hd', 'rtho',")
cli("cli-problem-arg-malformed", "hypergrad", "--problem-arg value malformed",
    ["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "hidden=[64"],
    r"argument --problem-arg: hidden=\[64: not a valid value \(a number, a")
cli("cli-problem-arg-unknown", "hypergrad", "--problem-arg key the problem does not take",
    ["hypergrad", "--problem-arg", "n_train=3"],
    r"problem 'beale' takes no argument 'n_train'; it takes \['x0', 'dtype',")
cli("cli-problem-arg-dtype", "hypergrad", "--problem-arg dtype=int8",
    ["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "dtype=int8"],
    r"dtype must be a floating-point torch\.dtype or one of \['bfloat16',")
cli("cli-problem-arg-syntax", "hypergrad", "--problem-arg not KEY=VALUE", ["hypergrad", "--problem-arg", "1x=3"],
    r"argument --problem-arg: expected KEY=VALUE with a keyword name as")
cli("cli-problem-unknown", "hypergrad", "unknown --problem", ["hypergrad", "--problem", "nonesuch"],
    r"unknown problem 'nonesuch'; choose one of \['beale', 'bukin6',")
cli("cli-problem-module-missing", "hypergrad", "--problem module:function that does not import",
    ["hypergrad", "--problem", "no_such_module_xyz:make"], r"cannot import module 'no_such_module_xyz' .*on sys\.path")
cli("cli-optimizer-unknown", "hypergrad", "unknown --optimizer", ["hypergrad", "--optimizer", "adamw2"],
    r"argument --optimizer: invalid choice: 'adamw2' \(choose from")
cli("cli-mode-unknown", "hypergrad", "unknown --mode", ["hypergrad", "--mode", "sideways"],
    r"argument --mode: invalid choice: 'sideways' \(choose from 'reverse',")
cli("cli-dtype-unknown", "hypergrad", "unknown --dtype", ["hypergrad", "--dtype", "float8"],
    r"argument --dtype: invalid choice: 'float8' \(choose from 'float32',")
cli("cli-hg-steps-negative", "hypergrad", "negative --steps", ["hypergrad", "--steps", "-1"],
    r"argument --steps: expected a positive integer, got '-1'")
cli("cli-hg-lr-negative", "hypergrad", "negative --lr", ["hypergrad", "--lr", "-0.1"],
    r"argument --lr: expected a number > 0, got '-0\.1'")
cli("cli-hg-lr-word", "hypergrad", "a word for --lr", ["hypergrad", "--lr", "fast"],
    r"argument --lr: expected a number > 0, got 'fast'")
cli("cli-hg-checkpoint", "hypergrad", "negative --checkpoint", ["hypergrad", "--checkpoint", "-1"],
    r"argument --checkpoint: expected an integer ≥ 1 or 'auto' or")
cli("cli-hg-memory", "hypergrad", "unparsable --memory", ["hypergrad", "--memory", "lots"],
    r"argument --memory: expected a memory size \(bytes, or like '200MB',")
cli("cli-hg-chunk-size", "hypergrad", "--chunk-size 0", ["hypergrad", "--mode", "forward", "--chunk-size", "0"],
    r"argument --chunk-size: expected an integer ≥ 1 or 'none', got '0'")
cli("cli-schedule-missing", "hypergrad", "--schedule file missing", ["hypergrad", "--schedule", "missing.npy"],
    r"--schedule file 'missing\.npy' does not exist")
cli("cli-schedule-npy", "hypergrad", "--schedule a .npy that is not numpy",
    lambda tmp: schedule_file(tmp, "x.npy", b"not numpy at all"), r"--schedule '.*x\.npy' is not a schedule file")
cli("cli-schedule-npz", "hypergrad",
    "--schedule a broken .npz", lambda tmp: schedule_file(tmp, "x.npz", b"PK\x03\x04broken"),
    r"--schedule '.*x\.npz' is not a schedule file")
cli("cli-schedule-json", "hypergrad", "--schedule a JSON without a schedule",
    lambda tmp: schedule_file(tmp, "x.json", b'{"a": 1}'), r"--schedule '.*x\.json' is not a schedule file")
cli("cli-schedule-negative", "hypergrad", "--schedule holding a negative rate",
    lambda tmp: schedule_file(tmp, "s.json", b"[0.001, -0.001]"),
    r"lrs must be ≥ 0; negative at steps \[1\]")
cli("cli-resume-overwrite", "lrsopt", "--resume with --overwrite", ["lrsopt", "--resume", "--overwrite"],
    r"--resume and --overwrite contradict each other: pick one")
cli("cli-outer-steps", "lrsopt", "--outer-steps 0", ["lrsopt", "--outer-steps", "0"],
    r"argument --outer-steps: expected a positive integer, got '0'")
cli("cli-outer-lr", "lrsopt", "negative --outer-lr", ["lrsopt", "--outer-lr", "-1"],
    r"argument --outer-lr: expected a number > 0 or 'none', got '-1'")
cli("cli-outer-optimizer", "lrsopt", "unknown --outer-optimizer", ["lrsopt", "--outer-optimizer", "newton"],
    r"argument --outer-optimizer: invalid choice: 'newton' \(choose from")
cli("cli-checkpoint-interval", "lrsopt", "--checkpoint-interval 0", ["lrsopt", "--checkpoint-interval", "0"],
    r"argument --checkpoint-interval: expected a positive integer, got '0'")
cli("cli-lrsopt-exists", "lrsopt", "existing checkpoint without --resume",
    lambda tmp: (lrsopt_ckpt(tmp), ["lrsopt", "--steps", "4", "--outer-steps", "1", "--no-progress", "--checkpoint",
                                     str(tmp / "ck" / "c.pt")])[1], r"--resume.*--overwrite")
cli("cli-lrsopt-corrupt", "lrsopt", "--resume from a corrupted checkpoint",
    lambda tmp: ["lrsopt", "--steps", "4", "--outer-steps", "2", "--resume", "--no-progress", "--checkpoint",
                 str(write(tmp / "c.pt", b"garbage" * 10))],
    r"checkpoint_path '.*c\.pt': corrupted .*\(CLI: --overwrite\)")
cli("cli-towers-spec", "towers", "bad --tower spec", ["towers", "--tower", "sgd(lr=oops)"],
    r"tower: lr='oops' in 'sgd\(lr=oops\)' is not a number")
cli("cli-towers-steps", "towers", "--steps 0", ["towers", "--steps", "0"],
    r"argument --steps: expected a positive integer, got '0'")
cli("cli-towers-divergence-factor", "towers", "--divergence-factor ≤ 1", ["towers", "--divergence-factor", "1"],
    r"argument --divergence-factor: expected a number > 1 or 'none', got '1'")
cli("cli-analyse-run-missing", "analyse", "--run file missing", ["analyse", "--run", "missing.json"],
    r"--run file 'missing\.json' does not exist")
cli("cli-analyse-run-corrupt", "analyse", "--run a corrupted record",
    lambda tmp: ["analyse", "--run", str(write(tmp / "r.json", b'{"kind": "onl'))],
    r"r\.json: corrupted \(not a valid JSON record")
cli("cli-reproduce-unknown", "reproduce", "unknown experiment", ["reproduce", "fig99"],
    r"unknown experiment name='fig99'; choose one of: fig1, mnist, hd,")
cli("cli-sweep-missing", "sweep", "grid file missing", ["sweep", "no-such-grid.yaml"],
    r"grid file no-such-grid\.yaml does not exist")
cli("cli-sweep-threads", "sweep", "a word for --threads", ["sweep", "no-such-grid.yaml", "--threads", "x"],
    r"argument --threads: expected a positive integer, got 'x'")
cli("cli-sweep-yaml", "sweep", "malformed grid YAML",
    lambda tmp: ["sweep", str(write(tmp / "g.yaml",
                                    b"name: g\nproblem: {name: beale}\nkind: train\naxes: {lr: [1e-3, ]\n"))],
    r"g\.yaml: not valid YAML")
cli("cli-sweep-key", "sweep", "grid with an unknown fixed key",
    lambda tmp: ["sweep", str(write(tmp / "g.yaml", b"name: g\nproblem: {name: beale}\nkind: train\n"
                                    b"fixed: {lr: 1e-3, steps: 3, momentum: 0.9}\n"))], r"unknown key 'momentum'")
cli("cli-sweep-list", "sweep",
    "grid file holding a list", lambda tmp: ["sweep", str(write(tmp / "g.yaml", b"- just\n- a list\n"))],
    r"expected a mapping")
cli("cli-sweep-executor", "sweep", "unknown --executor", ["sweep", "no-such-grid.yaml", "--executor", "slurm"],
    r"argument --executor: invalid choice: 'slurm' \(choose from 'local',")
cli("cli-sweep-retries", "sweep",
    "negative --max-retries", lambda tmp: ["sweep", str(write(tmp / "g.yaml", GRID_YAML)), "--max-retries", "-1"],
    r"argument --max-retries: expected an integer ≥ 0, got '-1'")
cli("cli-problem-arg-bool", "hypergrad", "--problem-arg word for a bool parameter",
    lambda tmp: user_problem(tmp, "batch=maybe"),
    r"--problem-arg batch=maybe: batch takes a bool \(true or false\), got 'maybe'")
cli("cli-problem-arg-int", "hypergrad", "--problem-arg fraction for an int parameter",
    lambda tmp: user_problem(tmp, "n=2.5"), r"--problem-arg n=2\.5: n takes an int, got 2\.5")
cli("cli-problem-arg-float", "hypergrad", "--problem-arg word for a float parameter",
    lambda tmp: user_problem(tmp, "scale=big"), r"--problem-arg scale=big: scale takes a number, got 'big'")
cli("cli-problem-function-missing", "hypergrad", "--problem module:function, the function missing",
    lambda tmp: [x.replace(":make", ":nope") for x in user_problem(tmp)],
    r"problem 'rel_userproblem:nope': module 'rel_userproblem' has no 'nope'")
cli("cli-device-unknown", "hypergrad", "unknown --device", ["hypergrad", "--device", "tpu"],
    r"argument --device: invalid choice: 'tpu'")
cli("cli-sgd-outer-lr", "lrsopt", "--outer-optimizer sgd without --outer-lr", ["lrsopt", "--outer-optimizer", "sgd"],
    r"--outer-lr is required with --outer-optimizer sgd")
cli("cli-val-batch-size", "online", "--val-batch-size on a problem without batches",
    ["online", "--val-batch-size", "4"],
    r"val_batch_size needs a problem with val_batch\(t, size\) and batch_loss")
cli("cli-analyse-kappa-unused", "analyse", "--kappa when no run uses it (hd, rtho)",
    ["analyse", "--method", "hd", "rtho", "--kappa", "1e-6"],
    r"--kappa is a setting of MARTHE's adaptive β \(--hypergrad-lr auto\); none of the runs")
cli("cli-analyse-method", "analyse", "unknown --method", ["analyse", "--method", "sgdr"],
    r"argument --method: invalid choice: 'sgdr'")
cli("cli-reproduce-settings", "reproduce", "--tiny with --full", ["reproduce", "demo", "--tiny", "--full"],
    r"argument --full: not allowed with argument --tiny")
cli("cli-command-unknown", "", "unknown subcommand", ["trian"],
    r"python -m hgtoolkit: error: argument command: invalid choice: 'trian'")
