r"""The noisy quadratic model (NQM).

A diagonal quadratic with additive Gaussian gradient noise, used to study
stochastic optimisers and learning-rate schedules in closed form (Schaul,
Zhang & LeCun 2013, "No more pesky learning rates"; Zhang et al. 2019, "Which
algorithmic choices matter at which batch sizes?").

With curvatures ``h`` and noise variances ``c`` (both of shape ``(d,)``)::

    loss            L(w) = 1/2 sum_i h_i w_i^2
    stochastic grad g_t(w) = h * w + sqrt(c) * xi_t,        xi_t ~ N(0, I_d)

so ``E[g_t(w)] = grad L(w)`` and ``Cov[g_t(w)] = diag(c)``.  SGD with step sizes
``eta_t`` gives ``w_{t+1} = (1 - eta_t h) w_t - eta_t sqrt(c) xi_t``, whose first
two moments obey the deterministic recursion (coordinate-wise)::

    E[w_{t+1}]   = (1 - eta_t h_i)   E[w_t]
    E[w_{t+1}^2] = (1 - eta_t h_i)^2 E[w_t^2] + eta_t^2 c_i

and therefore ``E[L(w_T)] = 1/2 sum_i h_i E[w_{T,i}^2]`` is an exact,
differentiable function of the schedule ``(eta_0, ..., eta_{T-1})``.

The noise ``xi_t`` is a pure function of ``(seed, t)``: it is drawn from a
``torch.Generator`` seeded with a stable hash of the pair, so the same schedule
and seed always reproduce the same trajectory, independently of global RNG
state, call order, dtype or device.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = ["NoisyQuadratic"]


def _generator_seed(seed: int, t: int) -> int:
    """Stable 63-bit seed derived from ``(seed, t)`` (same value in every process)."""
    digest = hashlib.blake2b(f"nqm:{int(seed)}:{int(t)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class NoisyQuadratic:
    r"""Noisy quadratic model ``L(w) = 1/2 sum_i h_i w_i^2`` with gradient noise ``N(0, diag(c))``.

    Args:
        h: curvatures, shape ``(d,)``, non-negative.
        c: gradient-noise variances, shape ``(d,)``, non-negative.
        w0: initial point, shape ``(d,)`` or a scalar broadcast to ``(d,)``.

    The floating dtype and device are taken from ``h`` (the default dtype if
    ``h`` is not floating); ``c`` and ``w0`` are converted to match.  Methods
    taking ``w`` accept any shape ``(..., d)``; losses reduce over the last axis.
    """

    def __init__(self, h, c, w0):
        h = torch.as_tensor(h)
        dtype = h.dtype if h.is_floating_point() else torch.get_default_dtype()
        h = h.to(dtype)
        c = torch.as_tensor(c).to(dtype=dtype, device=h.device)
        w0 = torch.as_tensor(w0).to(dtype=dtype, device=h.device)
        if h.ndim != 1:
            raise ValueError(f"h must have shape (d,); got shape {tuple(h.shape)}")
        if c.shape != h.shape:
            raise ValueError(f"c must have the shape of h {tuple(h.shape)}; got {tuple(c.shape)}")
        if w0.ndim == 0:
            w0 = w0.expand(h.shape)
        if w0.shape != h.shape:
            raise ValueError(
                f"w0 must be a scalar or have the shape of h {tuple(h.shape)}; "
                f"got {tuple(w0.shape)}"
            )
        if not bool((h >= 0).all()):
            raise ValueError("h (curvatures) must be non-negative")
        if not bool((c >= 0).all()):
            raise ValueError("c (noise variances) must be non-negative")
        self.h = h
        self.c = c
        self.w0 = w0.clone()
        self._sqrt_c = torch.sqrt(c)

    @classmethod
    def power_law(cls, d: int, *, noise_scale: float = 1.0, w0: float = 1.0,
                  dtype: torch.dtype = torch.float64, device=None) -> "NoisyQuadratic":
        """Ill-conditioned instance with ``h_i = 1/i`` and ``c_i = noise_scale * h_i`` (i = 1..d).

        This is the spectrum used in the NQM study of Zhang et al. (2019),
        where the noise covariance is proportional to the curvature.
        """
        if d < 1:
            raise ValueError(f"d must be a positive integer; got {d}")
        h = 1.0 / torch.arange(1, d + 1, dtype=dtype, device=device)
        return cls(h, noise_scale * h, torch.full((d,), float(w0), dtype=dtype, device=device))

    # ------------------------------------------------------------------ basics
    @property
    def dim(self) -> int:
        return self.h.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype

    @property
    def device(self) -> torch.device:
        return self.h.device

    def __repr__(self) -> str:
        return f"NoisyQuadratic(d={self.dim}, dtype={self.dtype}, device={self.device})"

    def loss(self, w: Tensor) -> Tensor:
        """Noise-free loss ``L(w) = 1/2 sum_i h_i w_i^2`` (reduces the last axis)."""
        return 0.5 * (self.h * w * w).sum(-1)

    def noise(self, t: int, seed: int) -> Tensor:
        """The standard-normal draw ``xi_t`` (shape ``(d,)``) for step ``t`` of run ``seed``.

        Drawn in float64 on the CPU from a generator seeded by a hash of
        ``(seed, t)``, then cast to the model's dtype and device, so it is
        identical across calls, processes, dtypes and devices.
        """
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_generator_seed(seed, t))
        xi = torch.randn(self.dim, generator=gen, dtype=torch.float64)
        return xi.to(dtype=self.dtype, device=self.device)

    def stochastic_grad(self, w: Tensor, t: int, seed: int) -> Tensor:
        """Stochastic gradient ``g_t(w) = h * w + sqrt(c) * xi_t`` (a function of ``(seed, t)``)."""
        return self.h * w + self._sqrt_c * self.noise(t, seed)

    def sample_loss(self, w: Tensor, t: int, seed: int) -> Tensor:
        """Differentiable minibatch loss ``1/2 sum h w^2 + sum sqrt(c) xi_t w``.

        Its gradient w.r.t. ``w`` is exactly :meth:`stochastic_grad` and, as
        ``E[xi_t] = 0``, its expectation is :meth:`loss`.  It can therefore be
        used as the training loss of any autograd-based optimiser.
        """
        return self.loss(w) + (self._sqrt_c * self.noise(t, seed) * w).sum(-1)

    # -------------------------------------------------------------------- SGD
    def _schedule(self, lrs) -> Tensor:
        lrs = torch.as_tensor(lrs).to(dtype=self.dtype, device=self.device)
        if lrs.ndim != 1:
            raise ValueError(
                f"lrs must be a 1-D schedule (eta_0, ..., eta_(T-1)); got shape {tuple(lrs.shape)}"
            )
        return lrs

    def simulate_sgd(self, lrs, seed: int, w0: Tensor | None = None) -> Tensor:
        """Run SGD ``w_{t+1} = w_t - lrs[t] * stochastic_grad(w_t, t, seed)``.

        Returns the iterates ``w_0, ..., w_T`` stacked into shape ``(T + 1, d)``.
        Differentiable in ``lrs`` and ``w0``.
        """
        lrs = self._schedule(lrs)
        w = self.w0 if w0 is None else torch.as_tensor(w0).to(dtype=self.dtype, device=self.device)
        iterates = [w]
        for t in range(lrs.shape[0]):
            w = w - lrs[t] * self.stochastic_grad(w, t, seed)
            iterates.append(w)
        return torch.stack(iterates)

    def expected_moments_sgd(self, lrs, m0: Tensor | None = None,
                             s0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exact ``(E[w_T], E[w_T^2])`` after SGD with schedule ``lrs`` (shape ``(T,)``).

        Iterates, coordinate-wise::

            m_{t+1} = (1 - eta_t h) m_t
            s_{t+1} = (1 - eta_t h)^2 s_t + eta_t^2 c

        from ``m_0 = m0`` and ``s_0 = s0``.  Defaults: ``m0 = w0`` and
        ``s0 = m0**2``, i.e. a deterministic start.  Pure torch, so
        differentiable in ``lrs``, ``m0`` and ``s0``.
        """
        lrs = self._schedule(lrs)
        m = self.w0 if m0 is None else torch.as_tensor(m0).to(dtype=self.dtype, device=self.device)
        # Without s0 the start is deterministic (zero variance): E[w_0^2] = E[w_0]^2.
        s = m * m if s0 is None else torch.as_tensor(s0).to(dtype=self.dtype, device=self.device)
        for t in range(lrs.shape[0]):
            a = 1.0 - lrs[t] * self.h
            m = a * m
            s = a * a * s + lrs[t] * lrs[t] * self.c
        return m, s

    def expected_loss_sgd(self, lrs, m0: Tensor | None = None, s0: Tensor | None = None) -> Tensor:
        """Exact expected final loss ``E[L(w_T)] = 1/2 sum_i h_i E[w_{T,i}^2]`` under SGD.

        ``lrs`` is the schedule ``(eta_0, ..., eta_{T-1})``; see
        :meth:`expected_moments_sgd` for the recursion and for ``m0``/``s0``.
        The result is a differentiable torch scalar, so
        ``torch.autograd.grad(nqm.expected_loss_sgd(lrs), lrs)`` is the exact
        hypergradient of the expected loss with respect to the schedule.
        """
        _, s = self.expected_moments_sgd(lrs, m0=m0, s0=s0)
        return 0.5 * (self.h * s).sum()
