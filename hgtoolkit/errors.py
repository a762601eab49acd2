"""Errors the toolkit raises on purpose. The divergence types live in :mod:`hgtoolkit.divergence`
(with the rule that raises them); they are importable from here too."""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable

from .divergence import DivergenceError, DivergenceWarning

__all__ = ["DivergenceError", "DivergenceWarning", "MovedError", "moved", "RENAMED", "DEPRECATED",
           "OLD_NAMES", "renamed", "check_renamed", "accepts_deprecated"]

#: Old names of keywords, settings, flags and record keys → the name they have now (docs/glossary.md).
#: An old keyword raises ``TypeError`` naming the new one.
RENAMED = {"lr0": "lr", "lrs0": "lrs"}

#: Old keywords still accepted for one release (0.1.x): the value goes to the new name with a
#: ``FutureWarning`` naming it; they raise as :data:`RENAMED` ones in 0.2. On the command line
#: and in sweep grids they are errors naming the new name already.
DEPRECATED = {"beta": "hypergrad_lr", "beta0": "hypergrad_lr_init", "beta_rule": "hypergrad_lr_rule",
              "beta_bound": "hypergrad_lr_bound"}

#: Every old name → its new name (flags, grid keys and the keys of records written before).
OLD_NAMES = {**RENAMED, **DEPRECATED}


class MovedError(AttributeError):
    """A public name that moved: the message names its new place."""


def moved(old: str, new: str):
    """A stand-in for the public name ``old`` that moved to ``new``: calling it raises
    :class:`MovedError` naming ``new`` (no silent forwarding)."""
    def stand_in(*args, **kwargs):
        raise MovedError(f"{old} moved to {new}: import it from there")
    stand_in.__name__ = old.rpartition(".")[2]
    stand_in.__doc__ = f"Moved to :func:`{new}` (calling this raises :class:`hgtoolkit.errors.MovedError`)."
    return stand_in


def check_renamed(owner: str, given: Any, renames: dict | None = None, takes: Any = None,
                  stacklevel: int = 3) -> Any:
    """``TypeError`` naming the new name when ``given`` (keyword names) holds an old one of
    ``renames`` (default :data:`RENAMED`) whose new name ``owner`` takes (``takes``: the names it
    takes; None: all). With the default ``renames``, a :data:`DEPRECATED` old name of a keyword
    ``owner`` takes is forwarded: ``given`` (a dict) comes back with the value under the new
    name, after a ``FutureWarning`` naming it (``TypeError`` when both names are given);
    otherwise ``given`` comes back as it is. ``stacklevel``: the warning's, pointing at the
    caller of ``owner``."""
    for old, new in (RENAMED if renames is None else renames).items():
        if old in given and (takes is None or new in takes):
            raise TypeError(f"{owner}(): {old!r} was renamed {new!r} (docs/glossary.md); pass {new}=…")
    if renames is not None or not any(old in given for old in DEPRECATED):
        return given
    out = dict(given)
    for old, new in DEPRECATED.items():
        if old in out and (takes is None or new in takes):
            if new in out:
                raise TypeError(f"{owner}(): got both {old!r} and {new!r}; {old!r} is the old name of "
                                f"{new!r} (docs/glossary.md): pass {new}= only")
            warnings.warn(f"{owner}(): {old!r} is now {new!r} (docs/glossary.md); {old!r} will raise in 0.2",
                          FutureWarning, stacklevel=stacklevel)
            out = {(new if k == old else k): v for k, v in out.items()}
    return out


def accepts_deprecated(fn: Callable) -> Callable:
    """Decorator: a call with a :data:`DEPRECATED` old keyword of one ``fn`` takes is forwarded to
    the new keyword with a ``FutureWarning`` (:func:`check_renamed`); a :data:`RENAMED` one
    raises ``TypeError`` naming the new one."""
    takes = inspect.signature(fn).parameters
    owner = fn.__qualname__.replace(".__init__", "")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        return fn(*args, **check_renamed(owner, kwargs, takes=takes))
    return wrapper


def renamed(**renames: str) -> Callable[[Callable], Callable]:
    """Decorator: a call with an old keyword name raises ``TypeError`` naming the new one (no
    silent forwarding), e.g. ``@renamed(lr0="lr")``."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            check_renamed(fn.__qualname__.replace(".__init__", "").replace(".__new__", ""), kwargs, renames)
            return fn(*args, **kwargs)
        return wrapper
    return deco
