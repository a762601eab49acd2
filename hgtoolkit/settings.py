"""The settings of a run, declared once: what each one means, its type, its range and its default.

One frozen dataclass per kind of run — :class:`OnlineSettings` (the keywords of
:func:`hgtoolkit.online.run`), :class:`LrsoptSettings` (:func:`hgtoolkit.lrsopt.optimize_schedule`),
:class:`TrainSettings` and :class:`HypergradSettings` (a constant schedule η_t = lr, t < steps,
trained or differentiated by :func:`hgtoolkit.hypergradient`), :class:`TowerSettings`
(:func:`hgtoolkit.towers.run`). Each field carries a :class:`Spec`
in its metadata, and from that one declaration come

- the command line's flags (``--lr-floor`` for ``lr_floor``, with the type, range, choices, help
  and default): :func:`add_arguments`, used by :mod:`hgtoolkit.cli`;
- the sweep grids' validators (``params=`` of the cell kinds in :mod:`hgtoolkit.sweep.kinds`):
  :func:`validators`;
- a checked set of keyword arguments for the Python API: ``OnlineSettings(lr=1e-3, steps=100,
  hypergrad_lr=1e-7)`` raises ``ValueError`` naming a setting that is out of range, and
  :meth:`RunSettings.kwargs` gives the keywords to pass on;
- the functions' signatures and their checks of each setting: a function marked
  :func:`takes` shows its schema's settings as its keywords, binds them (:func:`bind`: unknown
  names, missing required ones and old names) and checks each value by its Spec
  (:func:`check`); the function adds only the rules that tie settings together.

Only settings that are plain values are here: callables (``mu_rule``, ``callback``), the problem,
the schedule tensor and run control (``progress``, ``checkpoint_path``, ``resume``) stay arguments
of the functions.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

from . import dynamics
from .errors import OLD_NAMES, check_renamed

__all__ = ["Spec", "SettingTypeError", "setting", "check", "RunSettings", "OnlineSettings", "LrsoptSettings", "TrainSettings",
           "HypergradSettings", "ExactSettings", "TowerSettings", "specs", "validators", "add_arguments", "defaults", "required", "bind",
           "signature", "takes", "unused", "check_used", "add_renamed_flag", "dropin_option", "Bound", "passed",
           "given_only", "given_flags", "GIVEN_FLAGS"]

_KINDS = ("number", "int", "choice", "optimizer", "flag", "mapping", "bytes", "text")


class SettingTypeError(TypeError, ValueError):
    """A setting's value of the wrong type (a ``TypeError``; also a ``ValueError``, as the
    grids and the command line treat every bad value)."""
_NO_CLI_DEFAULT = "<none>"  # Spec.cli_default of a setting that has an API default


@dataclass(frozen=True)
class Spec:
    """What one setting accepts. ``kind``: ``"number"`` | ``"int"`` | ``"choice"`` (one of
    ``choices``) | ``"optimizer"`` (a :mod:`hgtoolkit.dynamics` name) | ``"flag"`` (bool) |
    ``"mapping"`` | ``"bytes"`` (a memory size: bytes or a string like ``"2GB"``, kept as
    given) | ``"text"`` (a string, e.g. a tower's specification); numbers lie in [``lo``, ``hi``] (``open_lo``: lo excluded); ``words``: strings
    accepted besides numbers (``"auto"``); ``none``: None accepted (written ``none`` on the
    command line); ``cli``: whether the command line has a flag for it; ``cli_default``: the
    flag's default for a setting the API requires; ``methods``: the online methods the setting
    is for (empty: all); ``needs``: further ``(setting, values)`` pairs under which alone it is
    used (e.g. ``(("hypergrad_lr", ("auto",)),)``: MARTHE's adaptive β only), see :func:`unused`;
    ``dropin``: an option of a drop-in optimizer's param groups
    (:class:`hgtoolkit.optim.MARTHE`'s keywords)."""

    help: str
    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    words: tuple = ()
    none: bool = False
    choices: tuple = ()
    cli: bool = True
    cli_default: Any = _NO_CLI_DEFAULT
    methods: tuple = ()
    needs: tuple = ()
    dropin: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")

    def conditions(self) -> tuple:
        """``(setting, values)`` pairs that must all hold for the setting to be used: its
        ``methods`` (as ``("method", methods)``) and its ``needs``."""
        return ((("method", self.methods),) if self.methods else ()) + tuple(self.needs)

    def options(self) -> tuple:
        return tuple(sorted(dynamics.NAMES)) if self.kind == "optimizer" else tuple(self.choices)

    def describe(self, none: str = "null") -> str:
        """What the setting must be, e.g. ``a number in [0, 1] or 'auto' or null`` (``none``: how
        None is written: ``null`` in a grid, ``'none'`` on the command line)."""
        if self.kind in ("choice", "optimizer"):
            what = f"one of {self.options()}"
        elif self.kind == "flag":
            what = "true or false"
        elif self.kind == "mapping":
            what = "a mapping"
        elif self.kind == "text":
            what = "a string"
        elif self.kind == "bytes":
            what = "a memory size (bytes, or like '200MB', '1.5GiB')"
        else:
            what = "an integer" if self.kind == "int" else "a number"
            if self.lo is not None and self.hi is not None:
                what += f" in [{self.lo:g}, {self.hi:g}]"
            elif self.lo is not None:
                what += f" {'>' if self.open_lo else '≥'} {self.lo:g}"
        alts = [repr(w) for w in self.words] + ([none] if self.none else [])
        return what + (" or " + " or ".join(alts) if alts else "")

    def check(self, value: Any, none: str = "null") -> Any:
        """The normalised value (ints of a number setting become floats, optimizer names lower
        case, mappings plain JSON), or ``ValueError("must be …, got …")``
        (:class:`SettingTypeError` for a value of the wrong type); ``none``: how None is
        written in the message."""
        if value is None and self.none:
            return None
        if isinstance(value, str) and value in self.words:
            return value
        what = f"must be {self.describe(none)}, got {value!r}"
        bad, wrong_type = ValueError(what), SettingTypeError(what)
        if self.kind in ("choice", "optimizer"):
            key = value.lower() if self.kind == "optimizer" and isinstance(value, str) else value
            if not isinstance(value, str):
                raise wrong_type
            if key not in self.options():
                raise bad
            return key
        if self.kind == "flag":
            if not isinstance(value, bool):
                raise wrong_type
            return value
        if self.kind == "text":
            if not isinstance(value, str):
                raise wrong_type
            return value
        if self.kind == "mapping":
            if not isinstance(value, dict):
                raise wrong_type
            return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
        if self.kind == "bytes":
            from .checkpointing import parse_memory
            try:
                parse_memory(value)
            except TypeError:
                raise wrong_type from None
            except ValueError:
                raise bad from None
            return value
        import numpy as np
        integer = self.kind == "int"
        ok = (int, np.integer) if integer else (int, float, np.integer, np.floating)
        if isinstance(value, bool) or not isinstance(value, ok):
            raise wrong_type
        value = int(value) if integer else float(value)
        if (not math.isfinite(value) or (self.lo is not None and value < self.lo)
                or (self.open_lo and value == self.lo) or (self.hi is not None and value > self.hi)):
            raise bad
        return value

    def parse(self, text: str) -> Any:
        """A command-line word → the value (``argparse.ArgumentTypeError`` saying what is expected)."""
        if self.none and text.lower() in ("none", "null"):
            return None
        if text in self.words or self.kind in ("choice", "optimizer", "bytes", "text"):
            value = int(text) if self.kind == "bytes" and text.isdigit() else text
        else:
            try:
                value = int(text) if self.kind == "int" else float(text)
            except ValueError:
                value = text
        try:
            return self.check(value)
        except ValueError:
            what = self.describe(none="'none'")
            if self.kind == "int" and self.lo == 1 and what == "an integer ≥ 1":
                what = "a positive integer"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def setting(default: Any = MISSING, help: str = "", **spec: Any):
    """A dataclass field with its :class:`Spec` (``default`` omitted: the API requires it)."""
    return field(default=default, metadata={"spec": Spec(help, **spec)})


def specs(schema: type, only: Callable[[Spec], bool] | None = None) -> dict[str, tuple[Any, Spec]]:
    """name → (default or ``dataclasses.MISSING``, :class:`Spec`), in declaration order;
    ``only``: the settings whose Spec it accepts (e.g. :func:`dropin_option`)."""
    return {f.name: (f.default, f.metadata["spec"]) for f in fields(schema)
            if only is None or only(f.metadata["spec"])}


def dropin_option(spec: Spec) -> bool:
    """Whether a setting is an option of a drop-in optimizer's param groups (``Spec.dropin``)."""
    return spec.dropin


def defaults(schema: type) -> dict[str, Any]:
    """The defaults of the settings that have one (the API's keyword defaults)."""
    return {k: d for k, (d, _) in specs(schema).items() if d is not MISSING}


class Bound(dict):
    """The settings :func:`bind` gives (every setting, defaults filled in) that remember the
    names the caller passed: ``given`` (a frozenset; the new names of forwarded old ones).
    ``Bound(items, given)`` for a changed copy that keeps them."""

    def __init__(self, items: Any = (), given: Any = ()):
        super().__init__(items)
        self.given = frozenset(given)


def passed(values: dict) -> frozenset:
    """The names of ``values`` that the caller passed: a :class:`Bound`'s ``given``, every key of
    a plain dict (what a caller writes in a call is what it passed)."""
    return values.given if isinstance(values, Bound) else frozenset(values)


def given_only(values: dict) -> dict:
    """The settings of ``values`` that the caller passed (:func:`passed`), to pass on."""
    names = passed(values)
    return {k: v for k, v in values.items() if k in names}


def bind(schema: type, given: dict, owner: str, *, required: bool = True,
         only: Callable[[Spec], bool] | None = None) -> Bound:
    """Keyword settings ``given`` to ``owner`` (a function's name, for the messages) completed
    with ``schema``'s defaults: every setting of the schema, in declaration order.
    An old name of a setting raises ``TypeError`` naming the new one, or (a deprecated one,
    :data:`hgtoolkit.errors.DEPRECATED`) is forwarded to it with a ``FutureWarning``.
    ``TypeError`` for a name the schema does not declare (listing those it does) and, with
    ``required``, for a required setting that is missing (as Python says it for a signature).
    Values are not checked here (:func:`check`). ``only``: the settings of ``schema`` ``owner``
    takes (:func:`specs`). The result is a :class:`Bound`: its ``given`` names what was passed."""
    table = specs(schema, only)
    given = check_renamed(owner, given, takes=table, stacklevel=4)
    unknown = [k for k in given if k not in table]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}; its settings "
                        f"are {list(table)} ({schema.__name__})")
    missing = [k for k, (d, _) in table.items() if d is MISSING and k not in given]
    if required and missing:
        raise TypeError(f"{owner}() missing required keyword argument {missing[0]!r}")
    return Bound({k: given[k] if k in given else d for k, (d, _) in table.items() if k in given or d is not MISSING},
                 given)


def check(schema: type, values: dict) -> dict:
    """``values`` (settings of ``schema``, e.g. as :func:`bind` gives them) checked each by its
    :class:`Spec`: the normalised values, or ``ValueError`` (:class:`SettingTypeError` for a
    value of the wrong type) naming the setting, as ``"outer_steps must be an integer ≥ 1, got
    0"``. A value that is no plain one (a Dynamics object, a tensor) is the function's to check;
    names the schema does not declare pass as they are."""
    import torch
    table, out = specs(schema), dict(values)
    for name, value in values.items():
        if name not in table or isinstance(value, (torch.Tensor, dynamics.Dynamics)):
            continue
        if table[name][1].kind == "optimizer":  # a name of hgtoolkit.dynamics, or a Dynamics
            dynamics.get(value)                  # (its messages name the optimizer)
        try:
            out[name] = table[name][1].check(value, none="None")
        except ValueError as exc:
            raise type(exc)(f"{name} {exc}") from None
    return out


def unused(schema: type, values: dict, given: Any = None) -> list[str]:
    """The settings the caller passed (``given``: their names; None: :func:`passed`, every key of
    a plain dict) whose :meth:`Spec.conditions` fail in ``values`` (checked ones, e.g.
    :func:`check`'s, with the function's own resolution of defaults such as MARTHE's β =
    ``"auto"`` applied): the run would silently ignore them. What was passed counts, not how it
    compares with the default: ``kappa=1e-6`` (its default) with ``method="hd"`` is unused; a
    setting not passed never is (a caller passing settings on passes only those it was given:
    :meth:`RunSettings.kwargs`, the drop-in's param groups, the command line's given flags)."""
    table, given = specs(schema), passed(values) if given is None else frozenset(given)
    return [k for k in values if k in given and k in table and table[k][1].conditions()
            and not all(values.get(c) in allowed for c, allowed in table[k][1].conditions())]


def check_used(schema: type, values: dict, given: Any = None) -> None:
    """``ValueError`` naming the first setting of :func:`unused` (``given`` as there) and what it
    applies to, as ``"kappa=0.001 applies to method='marthe' with hypergrad_lr='auto';
    method='hd' does not use it (leave it out)"``."""
    names = unused(schema, values, given)
    if not names:
        return
    name = names[0]
    spec = specs(schema)[name][1]
    def say(c, allowed):
        return f"{c}={allowed[0]!r}" if len(allowed) == 1 else f"{c} in {list(allowed)}"
    applies = " with ".join(say(c, allowed) for c, allowed in spec.conditions())
    c = next(c for c, allowed in spec.conditions() if values.get(c) not in allowed)
    raise ValueError(f"{name}={values[name]!r} applies to {applies}; {c}={values.get(c)!r} does not use it "
                     "(leave it out)")


def signature(fn: Callable, schema: type, only: Callable[[Spec], bool] | None = None) -> inspect.Signature:
    """``fn``'s signature with its ``**settings`` replaced by ``schema``'s settings as
    keyword-only parameters (default: the schema's; required ones without), so that ``help``,
    ``inspect`` and editors show the one declaration. A parameter of ``fn`` that is a setting
    keeps its place and takes the schema's default. ``only``: the settings ``fn`` takes (:func:`specs`)."""
    table = specs(schema, only)
    own = list(inspect.signature(fn).parameters.values())
    empty = inspect.Parameter.empty
    default = lambda name: empty if table[name][0] is MISSING else table[name][0]
    head = [p.replace(default=default(p.name)) if p.name in table else p for p in own
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    tail = [p for p in own if p.kind == p.KEYWORD_ONLY]
    named = {p.name for p in own}
    settings = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=default(k))
                for k in table if k not in named]
    return inspect.Signature(head + settings + tail, return_annotation=inspect.signature(fn).return_annotation)


def takes(schema: type, only: Callable[[Spec], bool] | None = None) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(…, **settings)`` shows the settings of ``schema`` (those ``only``
    accepts) as its keywords (:func:`signature`); the function binds them with :func:`bind`."""
    def mark(fn: Callable) -> Callable:
        fn.__signature__ = signature(fn, schema, only)
        return fn
    return mark


def required(schema: type) -> tuple[str, ...]:
    """The settings without a default (the API requires them)."""
    return tuple(k for k, (d, _) in specs(schema).items() if d is MISSING)


def validators(schema: type, **overrides: Callable) -> dict[str, Callable]:
    """Sweep-grid validators (value → normalised value, ValueError("must be …"))."""
    return {**{k: s.check for k, (_, s) in specs(schema).items()}, **overrides}


def add_arguments(parser: Any, schema: type, names: Sequence[str] | None = None, *,
                  defaults: dict | None = None, **overrides: dict) -> None:
    """Add ``--name-with-dashes`` flags for the settings ``names`` (default: every setting with
    ``cli=True``) of ``schema`` to ``parser`` (or an argument group). ``defaults``: per-command
    defaults; ``overrides``: extra ``add_argument`` keywords per setting (e.g. ``nargs``)."""
    table, defaults = specs(schema), defaults or {}
    for name in names if names is not None else [k for k, (_, s) in table.items() if s.cli]:
        default, spec = table[name]
        default = defaults.get(name, spec.cli_default if default is MISSING else default)
        if default is _NO_CLI_DEFAULT:
            raise ValueError(f"setting {name!r} of {schema.__name__} needs a command-line default")
        flag = "--" + name.replace("_", "-")
        help_text = spec.help + ("" if default is None else f" (default {default})")  # None: said in help
        kw: dict[str, Any] = {"default": default, "help": help_text.replace("%", "%%")}
        if spec.kind == "flag":
            kw["action"] = _GivenFlag
        else:
            kw["type"], kw["action"] = spec.parse, _Given
            if spec.kind in ("choice", "optimizer"):
                kw["choices"], kw["type"] = spec.options(), str
        kw.update(overrides.get(name, {}))
        parser.add_argument(flag, **kw)
    added = set(names if names is not None else [k for k, (_, s) in table.items() if s.cli])
    for old, new in OLD_NAMES.items():
        if new in added and old not in table:  # the old flag says the new one (no silent alias)
            add_renamed_flag(parser, "--" + old.replace("_", "-"), "--" + new.replace("_", "-"))


#: The parsed namespace's attribute listing the settings whose flags were given (:func:`given_flags`).
GIVEN_FLAGS = "given_settings"


def given_flags(args: Any) -> frozenset:
    """The settings whose flags :func:`add_arguments` added and the command line gave (at their
    default or not): what :func:`check_used` counts for a command."""
    return frozenset(getattr(args, GIVEN_FLAGS, ()))


def _note_given(namespace: Any, dest: str) -> None:
    seen = getattr(namespace, GIVEN_FLAGS, None)
    if seen is None:
        seen = []
        setattr(namespace, GIVEN_FLAGS, seen)
    if dest not in seen:
        seen.append(dest)


class _Given(argparse.Action):
    """A setting's flag: stores its value and notes that it was given (:func:`given_flags`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _note_given(namespace, self.dest)


class _GivenFlag(argparse.BooleanOptionalAction):
    """A boolean setting's ``--x``/``--no-x``, noted as given (:func:`given_flags`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def add_renamed_flag(parser: Any, old: str, new: str) -> None:
    """A hidden flag ``old`` of the old vocabulary: giving it is a usage error naming ``new``."""
    parser.add_argument(old, nargs="*", action=_RenamedFlag, new=new, help=argparse.SUPPRESS,
                        dest="_renamed_" + old.lstrip("-").replace("-", "_"))


class _RenamedFlag(argparse.Action):
    """A flag of the old vocabulary: the parser's error names the new flag."""

    def __init__(self, *args: Any, new: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed {self.new} (docs/glossary.md)")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Base of the schemas: every field is checked against its :class:`Spec` on construction;
    the names passed to the constructor are remembered (:meth:`kwargs`)."""

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        object.__setattr__(self, "_given", frozenset(kwargs))
        return self

    def __post_init__(self) -> None:
        for name, (_, spec) in specs(type(self)).items():
            try:
                object.__setattr__(self, name, spec.check(getattr(self, name)))
            except ValueError as exc:
                raise type(exc)(f"{name} {exc}") from None

    def kwargs(self) -> dict:
        """The settings passed to the constructor (normalised) as keyword arguments of the
        function they describe: what was passed is passed on, the rest keeps the function's
        defaults, which are the schema's (so a setting the run would not use raises there as
        it would have, :func:`check_used`). :meth:`all_settings`: every one."""
        given = getattr(self, "_given", None)
        return {k: v for k, v in asdict(self).items() if given is None or k in given}

    def all_settings(self) -> dict:
        """Every setting, defaults included."""
        return asdict(self)


_METHOD_HELP = "hd (μ = 0), rtho (μ = 1) or marthe (μ and β = hypergrad_lr fixed or adaptive)"


def _mode(help: str):
    return setting("reverse", help, kind="choice", choices=("reverse", "reversible", "forward", "autograd"))


def _checkpoint(cli: bool = True):
    return setting("auto", "reverse mode's schedule: none (store every step), k (every k-th state "
                           "kept, the rest recomputed), 'binomial' (revolve with --snapshots), "
                           "'auto' (the fastest that fits --memory)", kind="int", lo=1,
                   words=("auto", "binomial"), none=True, cli=cli)


def _snapshots(cli: bool = True):
    return setting(None, "checkpoint 'binomial': training states kept (w0 included; none: as many "
                         "as fit --memory)", kind="int", lo=1, none=True, cli=cli)


def _memory():
    return setting(None, "memory budget of the reverse pass: bytes, '200MB', '2GiB', or 'auto' "
                         "(half the free memory, cgroup limit included; none = auto)",
                   kind="bytes", words=("auto",), none=True)


def _disk():
    return setting(None, "reverse mode's disk tier: binomial snapshots that do not fit --memory go to "
                         "this directory ('tmp': a temporary one; removed afterwards; none: no disk)",
                   kind="text", words=("tmp",), none=True)


def _chunk_size():
    return setting(None, "forward mode: columns of Z_t propagated at once", kind="int", lo=1, none=True)


_ADAPTIVE_BETA = (("hypergrad_lr", ("auto",)),)  # Spec.needs of the settings of MARTHE's adaptive β


@dataclass(frozen=True, kw_only=True)
class OnlineSettings(RunSettings):
    """The settings of one online run: the keywords of :func:`hgtoolkit.online.run`."""

    method: str = setting("marthe", _METHOD_HELP, kind="choice", choices=("hd", "rtho", "marthe"),
                          dropin=True)
    optimizer: str = setting("sgd", "dynamics Φ", kind="optimizer")
    lr: float = setting(help="initial learning rate η_0", lo=0, cli_default=1e-3)
    steps: int = setting(help="T, the number of training steps", kind="int", lo=1, cli_default=500)
    hypergrad_lr: Any = setting(None, "hyper-learning rate β ≥ 0, or 'auto' (MARTHE's adaptive β, "
                                      "its default; required for hd and rtho)", lo=0, words=("auto",),
                                none=True, dropin=True)
    mu: Any = setting(None, "MARTHE's μ in [0, 1] or 'auto' (its default)", lo=0, hi=1,
                      words=("auto",), none=True, methods=("marthe",), dropin=True)
    kappa: float = setting(1e-6, "step size κ of MARTHE's adaptive β", lo=0, methods=("marthe",),
                           needs=_ADAPTIVE_BETA, dropin=True)
    hypergrad_lr_init: float = setting(0.0, "initial β of MARTHE's adaptive β", lo=0,
                                       methods=("marthe",), needs=_ADAPTIVE_BETA, dropin=True)
    hypergrad_lr_rule: str = setting("hh", "adaptive-β rule: κ h_{t+1} h_t (hh) or the authors' "
                                           "code's κ h_{t+1} η_{t+1} (h_eta)", kind="choice",
                                     choices=("hh", "h_eta"), methods=("marthe",),
                                     needs=_ADAPTIVE_BETA, dropin=True)
    objective: str = setting("val", "val: h uses ∇E(w_{t+1}); train: the next minibatch's "
                                    "gradient (HD)", kind="choice", choices=("val", "train"))
    lr_floor: Any = setting(0.0, "η is clipped at this value; none allows η < 0", lo=0, none=True,
                            dropin=True)
    lr_max: Any = setting(None, "|η| above this counts as divergence (none: 1e6·lr)", lo=0,
                          open_lo=True, none=True, dropin=True)
    hypergrad_lr_bound: Any = setting(1.0, "adaptive β: one update moves η by at most this × "
                                           "max(η, η_0); none: unbounded", lo=0, open_lo=True,
                                      none=True, methods=("marthe",), needs=_ADAPTIVE_BETA, dropin=True)
    divergence_factor: Any = setting(2.0, "the run diverges when its loss exceeds this × its "
                                          "initial value; none: off", lo=1, open_lo=True, none=True,
                                     dropin=True)
    hd_gradient: str = setting("regularised", "objective train with weight decay: v includes it "
                                              "(regularised) or not (raw)", kind="choice",
                               choices=("regularised", "raw"))
    eval_every: Any = setting(None, "record E every k steps (none: every step for val, else "
                                    "first and last)", kind="int", lo=1, none=True)
    val_batch_size: Any = setting(None, "objective val on a validation minibatch of this size per "
                                        "step (none: the full validation set)", kind="int", lo=1,
                                  none=True)
    seed: Any = setting(None, "minibatch order of a stochastic problem (problem.resample(seed))",
                        kind="int", lo=0, none=True)


@dataclass(frozen=True, kw_only=True)
class LrsoptSettings(RunSettings):
    """The settings of LRS-OPT: the keywords of :func:`hgtoolkit.lrsopt.optimize_schedule`
    besides the problem, the initial schedule and run control (``disk`` also takes True or a
    path there, as :func:`hgtoolkit.hypergradient`'s)."""

    outer_steps: int = setting(help="K, outer steps", kind="int", lo=1, cli_default=50)
    outer_lr: Any = setting(None, "outer step size α (adam's default: 0.1 × max η^(0); required "
                                  "for sgd; unused by lbfgsb)", lo=0, open_lo=True, none=True)
    outer_optimizer: str = setting("adam", "outer optimizer", kind="choice",
                                   choices=("adam", "sgd", "lbfgsb"))
    optimizer: str = setting("sgd", "inner dynamics Φ_t", kind="optimizer")
    mode: str = _mode("hypergradient mode")
    checkpoint: Any = _checkpoint(cli=False)  # lrsopt's --checkpoint is its checkpoint file
    snapshots: Any = _snapshots(cli=False)
    memory: Any = _memory()
    disk: Any = _disk()
    chunk_size: Any = _chunk_size()
    resample_batches: bool = setting(False, "new minibatch order at every outer step (MARTHE's "
                                            "LRS-OPT)", kind="flag")
    seed: int = setting(0, "seed of the resampled minibatch orders", kind="int", lo=0)
    lr_max: Any = setting(None, "upper bound η_max (none: no bound)", lo=0, open_lo=True, none=True)
    outer_options: Any = setting(None, "Adam's beta1/beta2/eps or scipy L-BFGS-B options",
                                 kind="mapping", none=True, cli=False)
    max_backtracks: int = setting(10, "halvings of the outer step after a diverged evaluation",
                                  kind="int", lo=0)
    snapshot_every: Any = setting(None, "keep the schedule every k outer steps", kind="int", lo=1,
                                  none=True)
    checkpoint_interval: int = setting(10, "write the checkpoint every N outer steps", kind="int", lo=1)


@dataclass(frozen=True, kw_only=True)
class TrainSettings(RunSettings):
    """A constant schedule η_t = ``lr`` for t < ``steps`` under ``optimizer``; ``seed`` is the
    problem's seed (initial weights, minibatch order) where it takes one."""

    lr: float = setting(help="constant learning rate η_t", lo=0, open_lo=True, cli_default=1e-3)
    steps: int = setting(help="T, the number of training steps", kind="int", lo=1, cli_default=100)
    optimizer: str = setting("sgd", "inner dynamics Φ_t", kind="optimizer")
    seed: int = setting(0, "the problem's seed", kind="int", lo=0)


@dataclass(frozen=True, kw_only=True)
class ExactSettings(RunSettings):
    """How :func:`hgtoolkit.hypergradient` computes ∇f(η) of a schedule: its keywords besides
    the problem, the schedule and run control (``progress``; ``disk``, which also takes True or
    a path there)."""

    optimizer: str = setting("sgd", "inner dynamics Φ_t", kind="optimizer")
    mode: str = _mode("how to compute it")
    checkpoint: Any = _checkpoint()
    snapshots: Any = _snapshots()
    memory: Any = _memory()
    chunk_size: Any = _chunk_size()


@dataclass(frozen=True, kw_only=True)
class HypergradSettings(ExactSettings, TrainSettings):
    """:class:`TrainSettings` (a constant schedule) plus :class:`ExactSettings` (how
    :func:`hgtoolkit.hypergradient` computes ∇f(η)) and the disk tier: the ``hypergrad``
    command and sweep cells."""

    disk: Any = _disk()


@dataclass(frozen=True, kw_only=True)
class TowerSettings(RunSettings):
    """The settings of a hyperoptimizer tower's run: the keywords of :func:`hgtoolkit.towers.run`
    (the tower may also be given as a :class:`hgtoolkit.towers.Level`)."""

    tower: str = setting(help="levels from the base up, e.g. 'sgd(lr=0.01, momentum=0.9) / adam(lr=1e-3) / "
                              "sgd(lr=1e-4)'; optimizers sgd, adam, adagrad, rmsprop; tune=lr+momentum "
                              "restricts what the next level learns", kind="text",
                         cli_default="sgd(lr=0.01) / sgd(lr=1e-4)")
    steps: int = setting(help="T, the number of training steps", kind="int", lo=1, cli_default=500)
    divergence_factor: Any = setting(2.0, "the run diverges when its minibatch loss exceeds this × "
                                          "its initial value; none: off", lo=1, open_lo=True, none=True)
