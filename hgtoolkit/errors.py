"""Errors the toolkit raises on purpose."""
from __future__ import annotations


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or parameters.

    ``step`` is the 0-based training step at which it was detected (the step whose
    minibatch loss, or whose resulting parameters, were NaN/inf); ``what`` says which.
    """

    def __init__(self, step: int, what: str = "loss", value: float | None = None):
        self.step = step
        self.what = what
        self.value = value
        msg = f"training diverged at step {step}: {what} is not finite"
        if value is not None:
            msg += f" ({value})"
        super().__init__(msg)


class DivergenceWarning(RuntimeWarning):
    """An online run stopped because it diverged (non-finite values or an exploding LR).

    The run's record says where (``result.diverged_at``); pass ``raise_on_divergence=True``
    to get a :class:`DivergenceError` instead.
    """
