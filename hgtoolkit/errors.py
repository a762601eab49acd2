"""Errors the toolkit raises on purpose. The divergence types live in :mod:`hgtoolkit.divergence`
(with the rule that raises them); they are importable from here too."""
from __future__ import annotations

import functools
from typing import Any, Callable

from .divergence import DivergenceError, DivergenceWarning

__all__ = ["DivergenceError", "DivergenceWarning", "MovedError", "moved", "RENAMED", "renamed",
           "check_renamed"]

#: Old names of keywords, settings, flags and record keys → the name they have now (docs/glossary.md).
RENAMED = {"lr0": "lr", "lrs0": "lrs"}


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


def check_renamed(owner: str, given: Any, renames: dict | None = None, takes: Any = None) -> None:
    """``TypeError`` naming the new name when ``given`` (keyword names) holds an old one of
    ``renames`` (default :data:`RENAMED`) whose new name ``owner`` takes (``takes``: the names it
    takes; None: all)."""
    for old, new in (RENAMED if renames is None else renames).items():
        if old in given and (takes is None or new in takes):
            raise TypeError(f"{owner}(): {old!r} was renamed {new!r} (docs/glossary.md); pass {new}=…")


def renamed(**renames: str) -> Callable[[Callable], Callable]:
    """Decorator: a call with an old keyword name raises ``TypeError`` naming the new one (no
    silent forwarding), e.g. ``@renamed(lr0="lr")``."""
    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any):
            check_renamed(fn.__qualname__.replace(".__init__", ""), kwargs, renames)
            return fn(*args, **kwargs)
        return wrapper
    return deco
