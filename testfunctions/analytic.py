"""Two-dimensional analytic test functions for optimiser and learning-rate studies.

Every function is an instance of a :class:`TestFunction` subclass.  The base
class owns everything that is shared -- input validation, splitting ``xy`` into
coordinates, stacking gradients and Hessians back into tensors, and the
plotting/benchmark metadata -- so a concrete function only writes down its
formula and its hand-derived first and second derivatives in terms of the
scalar coordinate tensors ``x`` and ``y``.

Conventions
-----------
* Inputs have shape ``(..., 2)``; the last axis holds ``(x, y)``.  Values have
  shape ``(...)``, gradients ``(..., 2)`` and Hessians ``(..., 2, 2)``.
* Everything is plain, out-of-place torch arithmetic on the input tensor, so the
  functions work for any floating dtype and device and compose with
  ``torch.autograd`` and ``torch.func`` (``grad``, ``jvp``, ``vjp``, ``vmap``,
  ``hessian``).
* :meth:`TestFunction.grad` and :meth:`TestFunction.hessian` are *analytic*:
  they are independent of autograd and exist so that autograd-based code (and
  the tests) can be checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TestFunction",
    "Beale",
    "Bukin6",
    "BukinSmooth",
    "BukinSharp",
    "Rosenbrock",
    "beale",
    "bukin6",
    "bukin_smooth",
    "bukin_sharp",
    "rosenbrock",
    "FUNCTIONS",
    "get",
]

Point = tuple[float, float]
Bounds = tuple[tuple[float, float], tuple[float, float]]


@dataclass(frozen=True)
class TestFunction:
    """Base class of the 2-D test functions: metadata plus shared tensor plumbing.

    Subclasses implement :meth:`_value`, :meth:`_grad` and :meth:`_hessian` on
    the coordinate tensors ``x = xy[..., 0]`` and ``y = xy[..., 1]``; the public
    :meth:`__call__`, :meth:`grad` and :meth:`hessian` validate the input and
    assemble the results.

    Attributes:
        name: registry key, e.g. ``"rosenbrock"``.
        minimiser: location ``(x*, y*)`` of the global minimum.
        minimum: function value at :attr:`minimiser`.
        default_start: recommended initial point for optimisation runs.
        bounds: ``((xmin, xmax), (ymin, ymax))`` window for contour plots; it
            contains both :attr:`minimiser` and :attr:`default_start`.
        log_contours: plotting hint -- ``True`` when the values over
            :attr:`bounds` span many decades, so contour levels should be
            logarithmically spaced.
    """

    # Not a pytest test class, despite the name.
    __test__ = False

    name: str
    minimiser: Point
    minimum: float
    default_start: Point
    bounds: Bounds
    log_contours: bool

    # ------------------------------------------------------------------ public
    def __call__(self, xy: Tensor) -> Tensor:
        """Function value at ``xy`` (shape ``(..., 2)``); returns shape ``(...)``."""
        return self._value(*self._split(xy))

    def grad(self, xy: Tensor) -> Tensor:
        """Analytic gradient at ``xy`` (shape ``(..., 2)``); returns shape ``(..., 2)``."""
        gx, gy = self._grad(*self._split(xy))
        return torch.stack((gx, gy), dim=-1)

    def hessian(self, xy: Tensor) -> Tensor:
        """Analytic Hessian at ``xy`` (shape ``(..., 2)``); returns shape ``(..., 2, 2)``."""
        hxx, hxy, hyy = self._hessian(*self._split(xy))
        row_x = torch.stack((hxx, hxy), dim=-1)
        row_y = torch.stack((hxy, hyy), dim=-1)
        return torch.stack((row_x, row_y), dim=-2)

    def derivatives(self, xy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, grad, hessian)`` at ``xy`` in one go (shapes ``(...)``, ``(..., 2)``,
        ``(..., 2, 2)``), sharing the subexpressions where a function knows how
        (:meth:`_derivatives`); the same formulas as :meth:`__call__`, :meth:`grad` and
        :meth:`hessian`."""
        value, gx, gy, hxx, hxy, hyy = self._derivatives(*self._split(xy))
        row_x = torch.stack((hxx, hxy), dim=-1)
        row_y = torch.stack((hxy, hyy), dim=-1)
        return value, torch.stack((gx, gy), dim=-1), torch.stack((row_x, row_y), dim=-2)

    def start(self, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
        """:attr:`default_start` as a fresh tensor of shape ``(2,)``."""
        return torch.tensor(self.default_start, dtype=dtype, device=device)

    # ------------------------------------------------------- subclass formulas
    def _value(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _grad(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(df/dx, df/dy)``."""
        raise NotImplementedError

    def _hessian(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(d2f/dx2, d2f/dxdy, d2f/dy2)``."""
        raise NotImplementedError

    def _derivatives(self, x: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """Return ``(f, df/dx, df/dy, d2f/dx2, d2f/dxdy, d2f/dy2)`` (override to share work)."""
        return (self._value(x, y), *self._grad(x, y), *self._hessian(x, y))

    # ----------------------------------------------------------------- helpers
    @staticmethod
    def _split(xy: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(xy, Tensor):
            xy = torch.as_tensor(xy)
        if not xy.is_floating_point():
            xy = xy.to(torch.get_default_dtype())
        if xy.ndim == 0 or xy.shape[-1] != 2:
            raise ValueError(
                f"xy must have shape (..., 2) holding (x, y) pairs; got shape {tuple(xy.shape)}"
            )
        x, y = xy.unbind(dim=-1)
        return x, y


class Beale(TestFunction):
    r"""Beale function.

    .. math::
        f(x, y) = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2

    Global minimum ``f(3, 0.5) = 0``.  Written as ``f = sum_k r_k^2`` with
    ``r_k = c_k - x + x y^k`` (k = 1, 2, 3; ``c = (1.5, 2.25, 2.625)``), the
    gradient is ``sum_k 2 r_k grad(r_k)`` with ``grad(r_k) = (y^k - 1, k x y^{k-1})``
    and the Hessian is ``sum_k 2 (grad(r_k) grad(r_k)^T + r_k Hess(r_k))`` with
    ``Hess(r_k) = [[0, k y^{k-1}], [k y^{k-1}, k (k-1) x y^{k-2}]]``.

    Default start ``(1.0, 1.5)`` (``f = 41.25``), chosen by running plain
    gradient descent from candidate points:

    * It avoids the flat valley ``y = 1``: there ``r_k = c_k`` for every ``x``,
      so ``f = 14.203`` and ``df/dx = 0`` along the whole line, and descent
      started near it barely moves in ``x``.
    * It avoids the ``x < 0`` half-plane.  From e.g. ``(-1.0, 1.5)`` descent
      slides towards ``x ~ -2`` and stalls at ``f ~ 1`` (a value *higher* than
      its start after 500 steps at ``lr = 1e-2``).
    * From ``(1.0, 1.5)``, 500 steps of gradient descent with any constant
      learning rate in ``[1e-3, 3e-2]`` decrease ``f`` monotonically towards
      the minimiser (``f ~ 0.29`` at ``lr = 1e-3``, ``~ 1.5e-3`` at
      ``lr = 1e-2``), whereas ``lr >= 4e-2`` hits the steep ``x^2 y^6`` wall
      and overflows.  So the start tells learning rates apart without being
      hopeless; ``tests/test_testfunctions.py`` checks this.
    """

    @staticmethod
    def _residuals(x, y):
        """``(r_1, r_2, r_3), y², x·y, x·y²`` with r_k = c_k − x + x·y^k (c = 1.5, 2.25, 2.625);
        −x + c_k equals c_k − x exactly and keeps forward-mode AD on native kernels."""
        y2 = y * y
        xy = x * y
        xy2 = xy * y
        return (-x + 1.5 + xy, -x + 2.25 + xy2, -x + 2.625 + xy2 * y), y2, xy, xy2

    def _value(self, x, y):
        (r1, r2, r3), *_ = self._residuals(x, y)
        return r1 * r1 + r2 * r2 + r3 * r3

    def _first(self, x, y):
        """The residuals, dr_k/dx = y^k − 1, dr_k/dy = k x y^{k−1} and the gradient."""
        (r1, r2, r3), y2, xy, xy2 = self._residuals(x, y)
        a1, a2, a3 = y - 1.0, y2 - 1.0, y2 * y - 1.0
        b2, b3 = 2.0 * xy, 3.0 * xy2  # dr_1/dy = x
        gx = 2.0 * (r1 * a1 + r2 * a2 + r3 * a3)
        gy = 2.0 * (r1 * x + r2 * b2 + r3 * b3)
        return (r1, r2, r3), (a1, a2, a3), (b2, b3), y2, xy, (gx, gy)

    def _grad(self, x, y):
        return self._first(x, y)[-1]

    def _hessian(self, x, y):
        return self._derivatives(x, y)[3:]

    def _derivatives(self, x, y):
        (r1, r2, r3), (a1, a2, a3), (b2, b3), y2, xy, (gx, gy) = self._first(x, y)
        hxx = 2.0 * (a1 * a1 + a2 * a2 + a3 * a3)
        # d2r_k/dxdy = k y^{k−1}, d2r_k/dy2 = k (k−1) x y^{k−2}
        hxy = 2.0 * (a1 * x + a2 * b2 + a3 * b3 + r1 + 2.0 * r2 * y + 3.0 * r3 * y2)
        hyy = 2.0 * (x * x + b2 * b2 + b3 * b3 + 2.0 * r2 * x + 6.0 * r3 * xy)
        return r1 * r1 + r2 * r2 + r3 * r3, gx, gy, hxx, hxy, hyy


class Bukin6(TestFunction):
    r"""Bukin function N.6 (original, non-smooth).

    .. math::
        f(x, y) = 100 \sqrt{|y - 0.01 x^2|} + 0.01 |x + 10|

    Global minimum ``f(-10, 1) = 0``; every point of the parabola
    ``y = 0.01 x^2`` is a local minimum along ``y``.

    The function is **not differentiable** on that valley (the square root of
    ``|u|``, ``u = y - 0.01 x^2``, has an infinite slope at ``u = 0``) nor on
    the line ``x = -10``.  :meth:`grad` and :meth:`hessian` return the
    classical derivatives wherever they exist::

        s = sign(u),  g1 = s / (2 sqrt|u|),  g2 = -1 / (4 |u|^{3/2})
        df/dx   = 100 g1 (-0.02 x) + 0.01 sign(x + 10)
        df/dy   = 100 g1
        d2f/dx2 = 100 (g2 (0.02 x)^2 - 0.02 g1)
        d2f/dxdy = 100 g2 (-0.02 x)
        d2f/dy2 = 100 g2

    On the valley they are non-finite (NaN/inf), exactly like autograd; on
    ``x = -10`` the ``|x + 10|`` term contributes the zero subgradient.

    Default start ``(-7.0, 2.0)``, shared with :data:`bukin_smooth` so the two
    can be compared directly.  Because ``|grad f|`` grows like
    ``1/sqrt|u|`` near the valley, constant-step gradient descent reaches
    the valley quickly and then zig-zags across it, never settling.  That
    is what makes this function a hard case.
    """

    def _value(self, x, y):
        u = y - 0.01 * x * x
        return 100.0 * torch.sqrt(torch.abs(u)) + 0.01 * torch.abs(x + 10.0)

    def _sqrt_abs_derivs(self, x, y):
        u = y - 0.01 * x * x
        r = torch.sqrt(torch.abs(u))
        g1 = torch.sign(u) / (2.0 * r)  # d sqrt|u| / du
        g2 = -0.25 / (r * r * r)  # d^2 sqrt|u| / du^2 (same on both sides)
        return g1, g2

    def _grad(self, x, y):
        g1, _ = self._sqrt_abs_derivs(x, y)
        ux = -0.02 * x
        return 100.0 * g1 * ux + 0.01 * torch.sign(x + 10.0), 100.0 * g1

    def _hessian(self, x, y):
        g1, g2 = self._sqrt_abs_derivs(x, y)
        ux = -0.02 * x
        return 100.0 * (g2 * ux * ux - 0.02 * g1), 100.0 * g2 * ux, 100.0 * g2


class BukinSmooth(TestFunction):
    r"""Smooth Bukin-type function (squared residuals instead of roots/abs).

    .. math::
        f(x, y) = 100 (y - 0.01 x^2)^2 + 0.01 (x + 10)^2

    Global minimum ``f(-10, 1) = 0``.  With ``u = y - 0.01 x^2``::

        df/dx    = -4 x u + 0.02 (x + 10)
        df/dy    = 200 u
        d2f/dx2  = 0.08 x^2 - 4 u + 0.02
        d2f/dxdy = -4 x
        d2f/dy2  = 200

    This keeps Bukin N.6's curved parabolic valley and its extreme anisotropy
    (Hessian eigenvalues ~208 and ~0.019 at the minimum, condition number
    ~1e4) while being smooth, so hypergradients through long gradient-descent
    runs are well defined.  It is a simplified stand-in: the MARTHE paper
    (Donini et al., 2020) uses a smoothed Bukin function whose exact formula
    is not recoverable from the paper, so this is *not* guaranteed to be
    that function.

    Default start ``(-7.0, 2.0)``: inside the usual Bukin window, off the
    valley (which passes ``y = 0.49`` at ``x = -7``) and 3 units from the
    minimiser along it.  Gradient descent is stable for constant learning
    rates below ~``2/208 ~ 9.6e-3`` (the stiff valley-normal direction);
    with ``lr = 5e-3`` it drops onto the valley within ~5 steps (``f`` from
    228 to ~0.08) and then creeps along it, which is the slow regime learning-rate schedules are
    meant to fix.
    """

    def _value(self, x, y):
        u = y - 0.01 * x * x
        return 100.0 * u * u + 0.01 * (x + 10.0) ** 2

    def _grad(self, x, y):
        u = y - 0.01 * x * x
        return -4.0 * x * u + 0.02 * (x + 10.0), 200.0 * u

    def _hessian(self, x, y):
        u = y - 0.01 * x * x
        return 0.08 * x * x - 4.0 * u + 0.02, -4.0 * x, torch.full_like(x, 200.0)



class BukinSharp(TestFunction):
    r"""Sharp-valley smoothing of Bukin N.6 (roots kept, kinks rounded off).

    .. math::
        f(x, y) = 100 ((u^2 + ε)^{1/4} - ε^{1/4}) + 0.01 (\sqrt{(x + 10)^2 + ε} - \sqrt{ε}),
        \quad u = y - 0.01 x^2,\ ε = 10^{-4}

    Bukin N.6's ``sqrt|u|`` becomes ``(u^2 + ε)^{1/4}`` and ``|x + 10|`` becomes
    ``sqrt((x + 10)^2 + ε)``: smooth everywhere, equal to Bukin N.6 up to ``O(ε^{1/4})``
    away from the valley, and the constants ``ε^{1/4}``, ``sqrt(ε)`` are subtracted so the
    global minimum is ``f(-10, 1) = 0`` (they do not change any gradient). Unlike
    :data:`bukin_smooth` (which squares ``u``), the valley stays *sharp*: the slope across it
    grows like ``|u|^{-1/2}`` down to ``|u| ~ sqrt(ε) = 0.01``, then turns over within that
    width. This is the regime of the MARTHE paper's Fig. 1 (right): RTHO's LR grows, then
    collapses to 0 once the trajectory reaches the valley, while HD stays near it (measured
    by ``hgtoolkit.experiments.fig1``).

    With ``a = u^2 + ε``, ``p1 = u / (2 a^{3/4})`` and ``p2 = (2ε - u^2) / (4 a^{7/4})``
    (first and second derivatives of ``a^{1/4}`` in ``u``), ``s = x + 10``,
    ``q1 = s / sqrt(s^2 + ε)``, ``q2 = ε / (s^2 + ε)^{3/2}``::

        df/dx    = 100 p1 (-0.02 x) + 0.01 q1
        df/dy    = 100 p1
        d2f/dx2  = 100 (p2 (0.02 x)^2 - 0.02 p1) + 0.01 q2
        d2f/dxdy = 100 p2 (-0.02 x)
        d2f/dy2  = 100 p2

    At the minimiser ``p2 = 1/(2 ε^{3/4}) = 500`` and the Hessian is
    ``[[2001, 1e4], [1e4, 5e4]]`` (largest eigenvalue ~5.2e4), so constant-step gradient
    descent is only stable in the valley bottom for ``lr < ~3.8e-5``, where it is far too slow
    to get there in 500 steps (``f`` from 113 to ~59 at ``lr = 4e-5``); with ``lr >= 1e-4`` it
    reaches the valley (``f ~ 0.03``) and then bounces across it, as on Bukin N.6 itself.

    Default start ``(-7.0, 2.0)``, shared with :data:`bukin6` and :data:`bukin_smooth`.
    """

    EPS = 1e-4

    def _value(self, x, y):
        eps = self.EPS
        u = y - 0.01 * x * x
        return (100.0 * ((u * u + eps) ** 0.25 - eps**0.25)
                + 0.01 * (torch.sqrt((x + 10.0) ** 2 + eps) - eps**0.5))

    def _root_derivs(self, x, y):
        """``(p1, p2, u_x, a)``: d a^{1/4}/du, d^2 a^{1/4}/du^2 (a = u^2 + ε), du/dx and a."""
        eps = self.EPS
        u = y - 0.01 * x * x
        a = u * u + eps
        a34 = a**0.75
        p1 = u / (2.0 * a34)
        p2 = (2.0 * eps - u * u) / (4.0 * a34 * a)
        return p1, p2, -0.02 * x, a

    def _grad(self, x, y):
        p1, _, ux, _ = self._root_derivs(x, y)
        s = x + 10.0
        q1 = s / torch.sqrt(s * s + self.EPS)
        return 100.0 * p1 * ux + 0.01 * q1, 100.0 * p1

    def _hessian(self, x, y):
        return self._derivatives(x, y)[3:]

    def _derivatives(self, x, y):
        eps = self.EPS
        p1, p2, ux, a = self._root_derivs(x, y)
        s = x + 10.0
        s2e = s * s + eps
        root = torch.sqrt(s2e)
        value = 100.0 * (a**0.25 - eps**0.25) + 0.01 * (root - eps**0.5)
        return (value, 100.0 * p1 * ux + 0.01 * (s / root), 100.0 * p1,
                100.0 * (p2 * ux * ux - 0.02 * p1) + 0.01 * (eps / (s2e * root)), 100.0 * p2 * ux,
                100.0 * p2)


class Rosenbrock(TestFunction):
    r"""Rosenbrock's banana function.

    .. math::
        f(x, y) = (1 - x)^2 + 100 (y - x^2)^2

    Global minimum ``f(1, 1) = 0``.  Derivatives::

        df/dx    = -2 (1 - x) - 400 x (y - x^2)
        df/dy    = 200 (y - x^2)
        d2f/dx2  = 2 - 400 y + 1200 x^2
        d2f/dxdy = -400 x
        d2f/dy2  = 200

    Default start ``(-1.2, 1.0)``, the classical starting point (Rosenbrock
    1960): on the far side of the curved valley, so an optimiser must follow
    the banana around to reach ``(1, 1)``.
    """

    def _value(self, x, y):
        return (1.0 - x) ** 2 + 100.0 * (y - x * x) ** 2

    def _grad(self, x, y):
        v = y - x * x
        return -2.0 * (1.0 - x) - 400.0 * x * v, 200.0 * v

    def _hessian(self, x, y):
        return 2.0 - 400.0 * y + 1200.0 * x * x, -400.0 * x, torch.full_like(x, 200.0)


# ---------------------------------------------------------------------------
# Instances and registry
# ---------------------------------------------------------------------------

beale = Beale(
    name="beale",
    minimiser=(3.0, 0.5),
    minimum=0.0,
    default_start=(1.0, 1.5),
    bounds=((-4.5, 4.5), (-4.5, 4.5)),
    log_contours=True,
)

bukin6 = Bukin6(
    name="bukin6",
    minimiser=(-10.0, 1.0),
    minimum=0.0,
    default_start=(-7.0, 2.0),
    bounds=((-15.0, -5.0), (-3.0, 3.0)),
    log_contours=False,
)

bukin_smooth = BukinSmooth(
    name="bukin_smooth",
    minimiser=(-10.0, 1.0),
    minimum=0.0,
    default_start=(-7.0, 2.0),
    bounds=((-15.0, -5.0), (-3.0, 3.0)),
    log_contours=True,
)

bukin_sharp = BukinSharp(
    name="bukin_sharp",
    minimiser=(-10.0, 1.0),
    minimum=0.0,
    default_start=(-7.0, 2.0),
    bounds=((-15.0, -5.0), (-3.0, 3.0)),
    log_contours=True,
)

rosenbrock = Rosenbrock(
    name="rosenbrock",
    minimiser=(1.0, 1.0),
    minimum=0.0,
    default_start=(-1.2, 1.0),
    bounds=((-2.0, 2.0), (-1.0, 3.0)),
    log_contours=True,
)

#: All analytic test functions, keyed by :attr:`TestFunction.name`.
FUNCTIONS: dict[str, TestFunction] = {
    f.name: f for f in (beale, bukin6, bukin_smooth, bukin_sharp, rosenbrock)
}


def get(name: str) -> TestFunction:
    """Look up a test function by name.

    Raises:
        ValueError: if ``name`` is not a key of :data:`FUNCTIONS`; the message
            names the argument and lists the valid names.
    """
    try:
        return FUNCTIONS[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(FUNCTIONS))
        raise ValueError(f"unknown test function name={name!r}; valid names: {valid}") from None
