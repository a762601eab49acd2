"""Errors the toolkit raises on purpose. The divergence types live in :mod:`hgtoolkit.divergence`
(with the rule that raises them); they are importable from here too."""
from __future__ import annotations

from .divergence import DivergenceError, DivergenceWarning

__all__ = ["DivergenceError", "DivergenceWarning", "MovedError", "moved"]


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
