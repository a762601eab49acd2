"""The command line's shared arguments: the problem (``--problem``, ``--problem-arg``, ``--dtype``,
``--device``), ``--out``, ``--progress/--no-progress`` and the argument types they use.

Run settings (``--lr``, ``--hypergrad-lr``, ``--outer-steps``, …) are not declared here: their flags are
generated from :mod:`hgtoolkit.settings` by :func:`hgtoolkit.settings.add_arguments`.
"""
from __future__ import annotations

import argparse
import ast

from ..settings import GIVEN_FLAGS, Spec

__all__ = ["DTYPES", "key_value", "positive_int", "non_negative_int", "positive_float", "add_problem", "add_out",
           "add_progress", "make_problem", "settings"]

DTYPES = ("float32", "float64")

#: ``"3"`` → 3 (ArgumentTypeError "expected a positive integer" otherwise)
positive_int = Spec("", kind="int", lo=1).parse
#: ``"0"`` → 0 (ArgumentTypeError "expected an integer ≥ 0" otherwise)
non_negative_int = Spec("", kind="int", lo=0).parse
#: ``"1e-3"`` → 0.001 (ArgumentTypeError "expected a number > 0" otherwise)
positive_float = Spec("", lo=0, open_lo=True).parse

PROBLEM_HELP = ("a test function (beale, bukin6, bukin_smooth, rosenbrock, …), mnist_mlp, "
                "synthetic_mlp, or module:function for a function of yours that returns a "
                "hgtoolkit.problems.Problem (the module importable, e.g. on PYTHONPATH)")


def key_value(text: str) -> tuple[str, object]:
    """``--problem-arg KEY=VALUE``: VALUE is a Python literal (number, list, …) or a plain word."""
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


def add_problem(parser, default: str | None = "beale", *, problem_args: bool = True,
                device: bool = True, dtype_help: str = "floating-point type (default: the "
                "problem's: float64 for test functions, float32 for mnist_mlp)") -> None:
    """``--problem`` (+ ``--problem-arg``, ``--dtype``, ``--device``) on ``parser`` or a group."""
    shown = f"default {default}" if default else "default: beale, or the saved run's problem"
    parser.add_argument("--problem", default=default, help=f"{PROBLEM_HELP} ({shown})")
    if problem_args:
        parser.add_argument("--problem-arg", metavar="KEY=VALUE", type=key_value, action="append",
                            default=[], help="extra keyword for the problem constructor, repeatable "
                                             "(e.g. --problem-arg hidden=[64] --problem-arg n_train=1000)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help=dtype_help)
    if device:
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")


def add_out(parser, command: str) -> None:
    """``--out``, default ``results/<command>``."""
    parser.add_argument("--out", default=f"results/{command}", help=f"output folder (default results/{command})")


def add_progress(parser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bars (default on; --no-progress turns them off)")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _declared_type(param) -> str | None:
    """"bool", "int" or "float": the type a constructor parameter declares (its annotation, else
    the type of its default), None when it declares none of these."""
    import inspect
    ann = param.annotation
    ann = getattr(ann, "__name__", ann) if ann is not inspect.Parameter.empty else None
    if isinstance(ann, str) and ann.replace(" ", "") in ("bool", "int", "float"):
        return ann.replace(" ", "")
    default = param.default
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int) and ann is None:
        return "int"
    if isinstance(default, float) and ann is None:
        return "float"
    return None


def typed_value(key: str, value: object, param) -> object:
    """A ``--problem-arg`` value converted to the type its parameter declares (bool: true/false,
    yes/no, on/off, 1/0; int; float); ValueError naming the flag and the type otherwise."""
    kind = _declared_type(param) if param is not None else None
    if kind is None:
        return value
    text = str(value).strip().lower()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise ValueError(f"--problem-arg {key}={value}: {key} takes a bool (true or false), got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"--problem-arg {key}={value}: {key} takes an int, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"--problem-arg {key}={value}: {key} takes a number, got {value!r}")


def make_problem(args, recorded: dict | None = None, **extra):
    """The problem of ``--problem``/``--problem-arg``/``--dtype``/``--device`` (``recorded``: a
    saved run's ``problem.describe()``, for its name and dtype when the flags leave them out;
    ``extra``: keywords the command adds). ``problems.get`` checks names and values."""
    import torch

    from .. import problems
    name = args.problem or (recorded or {}).get("name") or "beale"
    given = dict(getattr(args, "problem_arg", []))
    if given:
        params = problems.parameters(name)
        given = {k: typed_value(k, v, params.get(k)) for k, v in given.items()}
    kwargs = {**extra, **given}
    dtype = args.dtype or ((recorded or {}).get("dtype", "").replace("torch.", "") or None)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    device = getattr(args, "device", "cpu")
    if device != "cpu" or "device" in problems.parameters(name):
        kwargs["device"] = device  # a function of yours need not take device for the default
    return problems.get(name, **kwargs)


def settings(args) -> dict:
    """The parsed command line, for the record (``config["cli"]``)."""
    return {k: v for k, v in vars(args).items() if k != "func" and k != GIVEN_FLAGS}
