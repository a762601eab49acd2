r"""Assertion helpers to unit-check a hypergradient approximation in your own pytest suite.

    from hgtoolkit.testing import assert_hypergrad_close
    exact = hgtoolkit.hypergradient(problem, lrs).grad
    assert_hypergrad_close(my_estimate, exact, rtol=None, cos_min=0.9, sign_min=0.8)

Each helper raises ``AssertionError`` with every failed criterion spelt out (the worst steps,
the measured and required values), and ``ValueError``/``TypeError`` naming the argument for
bad input (shape mismatch, NaN/inf, criteria out of range). Metrics are those of
:mod:`hgtoolkit.analysis`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .analysis import (REFERENCES, ApproximationReport, paired_arrays, cosine_similarity,
                       sign_agreement)

__all__ = ["assert_hypergrad_close", "assert_approximation"]


def _check_bound(value: Any, name: str, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)


def _steps(idx: np.ndarray, limit: int = 8) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:limit])
    return shown + (f", … ({len(idx)} in all)" if len(idx) > limit else "")


def assert_hypergrad_close(estimate: Any, exact: Any, *, rtol: float | None = 1e-7,
                           atol: float = 0.0, cos_min: float | None = None,
                           sign_min: float | None = None, name: str = "estimate") -> None:
    r"""Assert that ``estimate`` (h_t, one per step) is close to ``exact`` (d_t).

    Criteria (each skipped when its argument is None; at least one must be given):

    - ``rtol``/``atol``: |h_t − d_t| ≤ atol + rtol·|d_t| at every step;
    - ``cos_min``: cosine similarity h·d / (‖h‖‖d‖) ≥ cos_min (a zero vector fails);
    - ``sign_min``: fraction of steps with sign(h_t) = sign(d_t) ≥ sign_min.

    >>> assert_hypergrad_close([1.0, -2.0], [1.0, -2.0])
    >>> assert_hypergrad_close([1.1, -2.0], [1.0, -2.0], rtol=None, cos_min=0.99, sign_min=1.0)
    """
    h, d = paired_arrays(estimate, exact, ("estimate", "exact"))
    rtol = _check_bound(rtol, "rtol", 0.0, math.inf)
    atol = _check_bound(atol, "atol", 0.0, math.inf)
    cos_min = _check_bound(cos_min, "cos_min", -1.0, 1.0)
    sign_min = _check_bound(sign_min, "sign_min", 0.0, 1.0)
    if rtol is None and cos_min is None and sign_min is None:
        raise ValueError("give at least one criterion: rtol, cos_min or sign_min")
    failures = []
    if rtol is not None:
        err = np.abs(h - d)
        bad = np.flatnonzero(err > atol + rtol * np.abs(d))
        if bad.size:
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.where(d != 0, err / np.abs(d), np.where(err == 0, 0.0, np.inf))
            w = int(bad[np.argmax(err[bad] - atol - rtol * np.abs(d[bad]))])
            failures.append(
                f"{bad.size}/{h.size} steps violate |h − d| ≤ atol + rtol·|d| (rtol={rtol:g}, "
                f"atol={atol:g}) at t = {_steps(bad)}; worst t = {w}: {name} = {h[w]:.10g}, "
                f"exact = {d[w]:.10g}, |h − d| = {err[w]:.3g}, relative error {rel[w]:.3g}")
    if cos_min is not None:
        cos = cosine_similarity(h, d)
        if not cos >= cos_min:
            why = " (a zero vector has no direction)" if math.isnan(cos) else ""
            failures.append(f"cosine similarity {cos:.6g} < cos_min = {cos_min:g}{why}")
    if sign_min is not None:
        agree = sign_agreement(h, d)
        frac = float(agree.mean())
        if frac < sign_min:
            failures.append(f"sign agreement {frac:.4g} ({int(agree.sum())}/{h.size} steps) < "
                            f"sign_min = {sign_min:g}; signs differ at t = "
                            f"{_steps(np.flatnonzero(~agree))}")
    if failures:
        raise AssertionError(f"{name} is not close to the exact hypergradient over {h.size} steps:\n- "
                             + "\n- ".join(failures))


def assert_approximation(report: ApproximationReport, reference: str = "full_horizon", *,
                         cos_min: float | None = None, sign_min: float | None = None,
                         median_rel_err_max: float | None = None) -> None:
    """Assert bounds on an :class:`~hgtoolkit.analysis.ApproximationReport`'s summary against
    ``reference`` ∈ ("one_step", "constant_lr", "full_horizon")."""
    if not isinstance(report, ApproximationReport):
        raise TypeError(f"report must be an ApproximationReport, got {type(report).__name__}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    cos_min = _check_bound(cos_min, "cos_min", -1.0, 1.0)
    sign_min = _check_bound(sign_min, "sign_min", 0.0, 1.0)
    median_rel_err_max = _check_bound(median_rel_err_max, "median_rel_err_max", 0.0, math.inf)
    if cos_min is None and sign_min is None and median_rel_err_max is None:
        raise ValueError("give at least one criterion: cos_min, sign_min or median_rel_err_max")
    s = report.summary[reference]
    failures = []
    if cos_min is not None and not s["cosine"] >= cos_min:
        failures.append(f"cosine {s['cosine']:.6g} < cos_min = {cos_min:g}")
    if sign_min is not None and not s["sign_agreement"] >= sign_min:
        failures.append(f"sign agreement {s['sign_agreement']:.4g} < sign_min = {sign_min:g}")
    if median_rel_err_max is not None and not s["median_rel_err"] <= median_rel_err_max:
        failures.append(f"median relative error {s['median_rel_err']:.4g} > "
                        f"median_rel_err_max = {median_rel_err_max:g}")
    if failures:
        raise AssertionError(f"{report.label} vs {reference} ({s['n_steps']} steps):\n- "
                             + "\n- ".join(failures))
