r"""Divergence: one rule, one record, one warning and one error type for every run of the toolkit.

The rule (every runner applies it: :func:`hgtoolkit.online.run` and its engine, the batched runs,
the drop-in optimizers, :func:`hgtoolkit.towers.run`, the peers of :mod:`hgtoolkit.baselines`,
the exact modes and :func:`hgtoolkit.train`). A run diverges at step t when

- a quantity it computes is not finite: the training loss L_t, the validation loss E(w_t), the
  hypergradient h_t, the learning rate η_t, the hyper-learning rate β_t, a tower's
  hyperparameter or hypergradient, or the parameters after the step; or
- the loss that defines the run — E(w_t) for ``objective="val"``, else L_t — rises above
  :func:`loss_limit` (ref, ``divergence_factor``) = ref + (factor − 1)·|ref| (factor × ref for
  ref > 0), ref its value at step 0 (off with ``divergence_factor=None``; the exact modes and the
  peers apply only the finiteness rule); or
- |η_t| > ``lr_max`` where a runner has one.

What is reported: a :class:`Divergence` (step, quantity, value, reason), as a
:class:`DivergenceWarning` carrying it (``warning.divergence``) when the run stops and records it
(``result.diverged_at``, ``result.divergence``), or as a :class:`DivergenceError` (a
``FloatingPointError``) with ``raise_on_divergence=True`` or where no record can be returned. The
library never silences the warning for itself; a caller that expects divergence (a sweep, an
experiment, the CLI) collects it with :func:`recorded` and keeps it with its results.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from ._tree import tree_all_finite

__all__ = ["Divergence", "DivergenceError", "DivergenceWarning", "CODES", "loss_limit", "check_finite",
           "from_code", "recorded", "check_loss", "TRAINING_LOSS", "VALIDATION_LOSS"]

TRAINING_LOSS = "training loss"
VALIDATION_LOSS = "validation loss"
NOT_FINITE = "is not finite"
ABOVE_LIMIT = "above divergence_factor × its initial value"

#: The online engine's ``state.why`` codes, as (quantity, reason). Code 3's quantity is the loss
#: that defines the run (:func:`from_code` names it from the objective).
CODES = {1: (TRAINING_LOSS, NOT_FINITE), 2: (VALIDATION_LOSS, NOT_FINITE), 3: ("loss", ABOVE_LIMIT),
         4: ("hypergradient h", NOT_FINITE), 5: ("learning rate", "is not finite or exceeds lr_max"),
         6: ("hyper-learning rate β", NOT_FINITE),
         7: ("parameters after the step", "are not finite")}  # 7: only in older records


def _value_text(value: float | None) -> str:
    return "" if value is None else f" ({value:.4g})" if math.isfinite(value) else f" ({value})"


@dataclass(frozen=True)
class Divergence:
    """What went wrong, where: the 0-based ``step`` t, the ``quantity`` ("training loss",
    "validation loss", "learning rate", "hypergradient h", "level-1 hyperparameter 'lr' (sgd)", …),
    its ``value`` (None when not known) and the ``reason`` ("is not finite", "above
    divergence_factor × its initial value", …)."""

    step: int
    quantity: str
    value: float | None = None
    reason: str = NOT_FINITE

    @property
    def message(self) -> str:
        """``"training diverged at step t: <quantity> <reason> (<value>)"``."""
        return f"training diverged at step {self.step}: {self.quantity} {self.reason}{_value_text(self.value)}"

    def error(self, prefix: str = "", note: str = "") -> "DivergenceError":
        """The :class:`DivergenceError` of this divergence, message ``"<prefix><message><note>"``."""
        return DivergenceError(self.step, self.quantity, self.value, self.reason, prefix=prefix, note=note)

    def warn(self, prefix: str = "", note: str = "", stacklevel: int = 2) -> None:
        """Issue the :class:`DivergenceWarning` ``"<prefix><message><note>"`` (carrying ``self``)."""
        warnings.warn(DivergenceWarning(f"{prefix}{self.message}{note}", self), stacklevel=stacklevel + 1)


def from_code(step: int, code: int, value: float | None = None, objective: str = "train") -> Divergence:
    """The :class:`Divergence` of an online engine's ``why`` code (:data:`CODES`); code 3 names the
    loss of ``objective`` ("val": the validation loss, else the training loss)."""
    quantity, reason = CODES.get(int(code), ("unknown quantity", "diverged"))
    if int(code) == 3:
        quantity = VALIDATION_LOSS if objective == "val" else TRAINING_LOSS
    return Divergence(int(step), quantity, None if value is None else float(value), reason)


class DivergenceError(FloatingPointError):
    """A run diverged (the rule: module docstring). ``step`` = the 0-based step t at which it was
    detected; ``quantity`` = what was not finite or too large; ``value`` = its value (None when not
    known); ``reason``; ``divergence`` = the :class:`Divergence`. ``what`` is ``quantity``'s older
    name."""

    def __init__(self, step: int, quantity: str = TRAINING_LOSS, value: float | None = None,
                 reason: str = NOT_FINITE, *, prefix: str = "", note: str = ""):
        self.divergence = Divergence(int(step), quantity, None if value is None else float(value), reason)
        super().__init__(prefix + self.divergence.message + note)

    def __reduce__(self):  # pickles (a sweep's worker processes) with its fields, not its message
        return _rebuild_error, (self.divergence, str(self))

    step = property(lambda self: self.divergence.step, lambda self, v: self._set(step=int(v)))
    quantity = property(lambda self: self.divergence.quantity)
    what = quantity
    value = property(lambda self: self.divergence.value)
    reason = property(lambda self: self.divergence.reason)

    def _set(self, **kw: Any) -> None:
        d = self.divergence
        self.divergence = Divergence(**{**d.__dict__, **kw})


def _rebuild_error(divergence: Divergence, message: str) -> DivergenceError:
    err = divergence.error()
    err.args = (message,)
    return err


class DivergenceWarning(RuntimeWarning):
    """A run stopped because it diverged; ``divergence`` (a :class:`Divergence`: step, quantity,
    value, reason) says where and why, as does the run's record (``result.diverged_at``,
    ``result.divergence``). ``raise_on_divergence=True`` raises :class:`DivergenceError` instead."""

    def __init__(self, message: str = "", divergence: Divergence | None = None):
        super().__init__(message)
        self.divergence = divergence


def loss_limit(ref: Any, factor: Any) -> Any:
    """The loss rule's threshold ref + (factor − 1)·|ref| (= factor × ref for ref > 0); inf when
    the rule is off (``factor`` None, ref = 0). ``ref`` a float (non-finite: inf) or a tensor
    (elementwise, for the engine's 0-d or per-run states; ``factor`` then a number or tensor)."""
    if isinstance(ref, torch.Tensor):
        return torch.where(ref != 0, ref + (factor - 1) * ref.abs(), math.inf)
    if factor is None or ref == 0 or not math.isfinite(ref):
        return math.inf
    return ref + (factor - 1) * abs(ref)


def check_loss(t: int, value: float, ref: float, factor: float | None,
               quantity: str = TRAINING_LOSS) -> Divergence | None:
    """The loss rule at step ``t`` for a loss ``value`` (a float) whose step-0 value is ``ref``:
    not finite, or above :func:`loss_limit` (ref, ``factor``); None when fine."""
    if not math.isfinite(value):
        return Divergence(t, quantity, value)
    if value > loss_limit(ref, factor):
        return Divergence(t, quantity, value, ABOVE_LIMIT)
    return None


def check_finite(loss: torch.Tensor, t: int, state: Any = None, quantity: str = TRAINING_LOSS) -> None:
    """Raise :class:`DivergenceError` at step ``t`` when ``loss`` (named ``quantity``: the training
    loss L_t, or the validation loss E(w_t)) or ``state`` (the parameters after the step) is NaN/inf."""
    if not bool(torch.isfinite(loss).all()):
        raise DivergenceError(t, quantity, float(loss.detach().reshape(-1)[0]))
    if state is not None and not tree_all_finite(state):
        raise DivergenceError(t, "parameters after the step", reason="are not finite")


@contextlib.contextmanager
def recorded() -> Iterator[list]:
    """Collect the :class:`DivergenceWarning`\\ s issued inside the block, for a caller that expects
    divergence and keeps it with its results (a sweep cell, an experiment, the CLI's report);
    yields the list they are appended to (as :class:`Divergence` records). Every other warning is
    re-issued unchanged when the block ends.

    >>> from hgtoolkit import online, problems, divergence
    >>> with divergence.recorded() as seen:
    ...     r = online.run(problems.from_function("beale"), "hd", lr=1e-3, hypergrad_lr=1e-3, steps=500)
    >>> seen[0].step == r.diverged_at
    True
    """
    seen: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DivergenceWarning)
        try:
            yield seen
        finally:
            others = []
            for w in caught:
                if issubclass(w.category, DivergenceWarning):
                    d = getattr(w.message, "divergence", None)
                    seen.append(d if d is not None else Divergence(-1, "run", None, str(w.message)))
                else:
                    others.append(w)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
