r"""Exactly reversible heavy-ball training: the reverse pass without stored states.

Maclaurin, Duvenaud & Adams (ICML 2015, "Gradient-based hyperparameter optimization through
reversible learning"): run SGD with momentum in fixed-point arithmetic, where the update is an
exact bijection of (weights, velocity) but for the multiplication of the velocity by γ < 1,
and keep in an *information buffer* exactly the bits that multiplication destroys. The reverse
pass then runs training backwards to the last bit and needs no snapshot at all.

**The form of momentum** is the toolkit's (:class:`hgtoolkit.dynamics.SGD`, as
``torch.optim.SGD`` with dampening 0): b_{t+1} = γ b_t + g_t, w_{t+1} = w_t − η_t b_{t+1}, with
g_t = ∇L_t(w_t) (+ weight decay · w_t). Maclaurin et al. write v_{t+1} = γ v_t − (1−γ) g_t,
w_{t+1} = w_t + η'_t v_{t+1}: the same dynamics with v = −(1−γ) b and η' = η/(1−γ). This module
is exact for the toolkit's form. Reversed:

    w_t = w_{t+1} + η_t b_{t+1},  g_t = ∇L_t(w_t),  b_t = (b_{t+1} − g_t) / γ.

**Fixed point.** Each leaf of w and of b is an int64 tensor of units 2^−R (R per leaf and per
w/b: R = 54 − ⌈log₂ m⌉ for the largest magnitude m of w_0, resp. of g_0/(1 − γ), so a value may
grow 2⁷-fold within the checked range |x| < 2⁶¹). One step, exact in integers:

    b ← γ ⊙ b + [g·2^R],   w ← w − [η_t b 2^{R_w − R_b}]      ([·]: round to nearest)

where [·] is any deterministic function (it is evaluated again on the same integers in the
reverse pass) and γ ⊙ b is the exact multiplication by the rational γ = n/d (``fractions.
Fraction(γ).limit_denominator(4096)``: exactly 9/10 for γ = 0.9): b = q d + r₀ (0 ≤ r₀ < d);
pop r ∈ [0, n) from the buffer; z = r₀ n + r ∈ [0, dn); γ ⊙ b = q n + ⌊z/d⌋ (within one unit
of γ b, and no product larger than b is formed); push z mod d. The buffer grows by log₂(d/n)
= log₂(1/γ) bits per weight per step — T·d·log₂(1/γ) bits in all (arithmetic coding, as the
paper's buffer), plus ≤ 16 bits of granularity per weight.

**The buffer** is a streaming (rANS-style) coder per weight: an int64 state x ∈ [L, 2¹⁶ L),
L = 2¹⁶ d. A step first spills the low 16 bits of the states x ≥ 2¹⁶·n·2¹⁶ (leaving x ∈
[L n/d, L)), then pops base n and pushes base d: x ← ⌊x/n⌋ d + (z mod d); both cases land in
[L, 2¹⁶ L) again, and the reverse step tells them apart by x < L after undoing the pop and
push: so a step stores only the spilled 16-bit words (≈ 1 % of the weights per step at
γ = 0.9), never a mask. At the end of the reverse pass every state is L again and b = 0
(checked: the reversal was exact).

**Tolerance against stored reverse of the float trajectory.** Both use the same adjoint
(:meth:`~hgtoolkit.dynamics.Dynamics.cotangent`, one HVP per step); they differ only in the
states at which it is evaluated. Per step the fixed-point state differs from the exact-
arithmetic step by at most 1.5 units of b (γ ⊙ and [g 2^R]) and half a unit of w, i.e.
δ_b ≤ 1.5·2^{−R_b} = 1.5·2^{−54}·2^{⌈log₂ m_b⌉} ≈ 3·2^{−54} m_b, δ_w ≈ 2^{−55} m_w; the float
trajectory rounds each of its ≈ 4 operations per entry by 2^{−53} of the entry. Both errors
are propagated by the same linearised dynamics A_t; summed over T steps and read through the
adjoint, the relative difference of ∇f is ≲ T·κ·(δ_b/m_b + 2^{−53}) where κ = max_t ‖λ_t‖·m /
‖∇f‖ is the problem's amplification. With T ≤ 100 and κ ≲ 10 (the test problems) this gives
≲ 10⁻¹², the tolerance the tests assert for γ = 0.9 and 0.5 (measured: 2·10⁻¹⁶ … 10⁻¹⁴). The
velocity's range costs log₂(1/(1−γ)) bits of the 63 (b grows to ≈ g/(1 − γ)): at γ = 0.99 that
is 6.6 bits, so there the fixed-point resolution is ≈ 2⁵× coarser than float64 and the measured
difference is 2·10⁻¹² … 5·10⁻¹² (asserted ≤ 1e-11). In float32 the float trajectory itself
carries float32 rounding (2⁻²⁴ per operation) while the fixed-point one is exact to 2⁻⁵⁴ m: the
two hypergradients differ by the float32 training's own rounding (measured in
``benchmarks/bench_memory.py`` and docs/memory.md).

Refused, with the reason: plain SGD (γ = 0 destroys all of b: w_t = w_{t+1} + η_t g_t(w_t) is
an implicit equation, i.e. as many bits per step as the weights have), Nesterov (w' = w −
η(g + γ b') needs g(w_t) to find w_t: implicit again), Adam, AdaGrad, RMSProp (the division by
√v is not a bijection of fixed-point numbers, and their accumulators decay by β2 with bits lost
in every entry of a second state).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import checkpointing as _ckpt
from ._step import Step as _Step, add_w as _add_w, objective as _objective, probe as _probe
from .dynamics import SGD, Dynamics
from .divergence import VALIDATION_LOSS, check_finite
from .trajectory import progress_bar

__all__ = ["check_reversible", "ratio", "InformationBuffer", "reversible_reverse", "estimate_bytes"]

_WORD = 1 << 16  # the buffer spills 16-bit words
_K = 1 << 16  # L = d·K
_HEADROOM = 7  # bits of growth allowed over the initial magnitudes
_LIMIT = 1 << 61  # |integer| range checked after every step
_MAX_DENOMINATOR = 4096


def check_reversible(dyn: Dynamics) -> float:
    """γ of a heavy-ball :class:`~hgtoolkit.dynamics.SGD`, or ValueError saying why the
    dynamics cannot be run backwards exactly."""
    if not isinstance(dyn, SGD):
        raise ValueError(f"mode='reversible' needs SGD with heavy-ball momentum ('momentum'); "
                         f"{type(dyn).__name__} cannot be reversed this way: its update divides by "
                         "a root of its accumulators (no bijection of fixed-point numbers) and their "
                         "decay destroys bits of a second state in every entry. Use mode='reverse' "
                         "with memory=... (binomial checkpointing)")
    if dyn.nesterov:
        raise ValueError("mode='reversible' cannot reverse Nesterov momentum: w' = w − η(g(w) + γb') "
                         "needs g(w) to find w (an implicit equation, not an exact inverse); use "
                         "'momentum' (heavy ball) or mode='reverse' with memory=...")
    if dyn.momentum == 0:
        raise ValueError("mode='reversible' cannot reverse plain SGD: γ = 0 destroys the whole "
                         "velocity, so w_t = w_{t+1} + η g(w_t) is implicit and every bit of w_t would "
                         "have to be stored; use optimizer='momentum' (γ = 0.9) or mode='reverse' "
                         "with memory=...")
    return float(dyn.momentum)


def ratio(gamma: float) -> tuple[int, int]:
    """(n, d): γ as the fraction n/d used by the exact multiplication (d ≤ 4096)."""
    f = Fraction(gamma).limit_denominator(_MAX_DENOMINATOR)
    if f.numerator <= 0 or f >= 1:
        raise ValueError(f"momentum must be in (0, 1), got {gamma}")
    return f.numerator, f.denominator


class InformationBuffer:
    r"""The bits that x ↦ γ ⊙ x destroys, for one int64 tensor x, per entry: see the module
    docstring. ``forward(x)`` returns γ ⊙ x and stores; ``reverse(y)`` returns x with
    γ ⊙ x = y and forgets. ``nbytes``: the words stored plus the coder states."""

    def __init__(self, like: torch.Tensor, n: int, d: int):
        self.n, self.d = n, d
        self.L = d * _K
        self.spill = _WORD * n * _K  # states ≥ this spill a word before the step
        self.state = torch.full_like(like, self.L, dtype=torch.int64)
        self.words: list[torch.Tensor] = []
        self.words_bytes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = self.n, self.d
        s = self.state
        full = s >= self.spill
        low = s[full]
        word = (low.remainder(_WORD) - (_WORD // 2)).to(torch.int16)
        self.words.append(word)
        self.words_bytes += word.numel() * 2
        s[full] = torch.div(low, _WORD, rounding_mode="floor")
        q = torch.div(x, d, rounding_mode="floor")  # x = q d + r0
        z = (x - q * d).mul_(n).add_(s.remainder(n))  # r0 n + r, r popped (base n): z ∈ [0, dn)
        zq = torch.div(z, d, rounding_mode="floor")
        self.state = torch.div(s, n, rounding_mode="floor").mul_(d).add_(z.sub_(zq * d))  # push z mod d
        return q.mul_(n).add_(zq)  # q n + ⌊z/d⌋: within one unit of x n/d

    def reverse(self, y: torch.Tensor) -> torch.Tensor:
        n, d = self.n, self.d
        s = self.state
        q = torch.div(y, n, rounding_mode="floor")
        z = (y - q * n).mul_(d).add_(s.remainder(d))  # pop z mod d (base d)
        r0 = torch.div(z, n, rounding_mode="floor")
        s = torch.div(s, d, rounding_mode="floor").mul_(n).add_(z.sub_(r0 * n))  # push r (base n)
        short = s < self.L
        word = self.words.pop()
        self.words_bytes -= word.numel() * 2
        if int(short.sum()) != word.numel():
            raise RuntimeError("reversible mode: the information buffer is out of step (a bug)")
        s[short] = s[short] * _WORD + (word.to(torch.int64) + _WORD // 2)
        self.state = s
        return q.mul_(d).add_(r0)

    @property
    def nbytes(self) -> int:
        return self.words_bytes + self.state.numel() * 8

    def exhausted(self) -> bool:
        """True when every coder state is back at its start (after a full reverse pass)."""
        return not self.words and bool((self.state == self.L).all())


def _bits(values: list[torch.Tensor], limit: int, floor: float = 1e-30) -> list[int]:
    """R per leaf: ⌊log₂ limit⌋ − headroom − ⌈log₂ max|x|⌉ (|x| may grow 2^headroom-fold)."""
    out = []
    for v in values:
        m = float(v.abs().max()) if v.numel() else 0.0
        m = m if m > floor and math.isfinite(m) else 1.0
        out.append(limit.bit_length() - 1 - _HEADROOM - math.ceil(math.log2(m)))
    return out


def _to_int(x: torch.Tensor, R: int, what: str = "", t: int = 0) -> torch.Tensor:
    y = torch.round(x.double() * 2.0 ** R)
    if what and y.numel() and not float(y.abs().max()) < _LIMIT:  # NaN fails too
        raise OverflowError(f"mode='reversible': {what} outgrew its fixed-point range at step {t} "
                            f"(more than 2^{_HEADROOM}× the initial magnitude); use mode='reverse' "
                            "with memory=... (binomial checkpointing)")
    return y.to(torch.int64)


def _to_float(x: torch.Tensor, R: int, dtype: torch.dtype) -> torch.Tensor:
    return (x.double() * 2.0 ** -R).to(dtype)


def _check_range(ints: list[torch.Tensor], limit: int, what: str, t: int) -> None:
    for x in ints:
        if x.numel() and int(x.abs().max()) >= limit:
            raise OverflowError(f"mode='reversible': {what} outgrew its fixed-point range at step {t} "
                                f"(more than 2^{_HEADROOM}× its initial magnitude); use mode='reverse' "
                                "with memory=... (binomial checkpointing)")


def estimate_bytes(T: int, numel: int, gamma: float, fp: "_ckpt.Footprint") -> int:
    """Bytes of reversible mode: integers of w, b and the coder states (24 per weight), the
    buffer's T·d·log₂(d/n)/8 bytes (+ 1/16 for the word granularity), one step's graph and the
    reverse pass's work space."""
    n, d = ratio(gamma)
    buffer = T * numel * math.log2(d / n) / 8 * (1 + 1 / 16)
    return int(24 * numel + buffer + fp.step + fp.work)


def reversible_reverse(problem, dyn, lrs, memory, progress):
    """Reverse mode for heavy-ball momentum by running training backwards (module docstring).
    Returns (value, grads, w_T, train losses, info for HypergradResult)."""

    gamma = check_reversible(dyn)
    n, d = ratio(gamma)
    T = len(lrs)
    wd = float(dyn.weight_decay)
    device = lrs.device
    sampler = _ckpt.MemorySampler(device)
    s0 = dyn.init(problem.params0)
    leaves0, spec = tree_flatten(s0["w"])
    dtypes = [x.dtype for x in leaves0]
    first, fp = _probe(problem, dyn, s0)
    numel = sum(x.numel() for x in leaves0)
    estimate = estimate_bytes(T, numel, gamma, fp)
    limit, _ = _ckpt.budget(memory, device)
    if limit is not None and estimate > limit:
        raise _ckpt.MemoryBudgetError(
            f"mode='reversible' needs ≈ {_ckpt.fmt_bytes(estimate)} (T={T}, {numel} weights, "
            f"{math.log2(d / n):.3g} bits per weight and step) > the budget of {_ckpt.fmt_bytes(limit)}; "
            "raise memory= or use mode='reverse' (binomial checkpointing)")

    def grad_of(w_leaves, t, graph):
        st = _Step(problem, dyn, {"w": tree_unflatten(w_leaves, spec)}, t, graph)
        check_finite(st.loss, t)
        g = tree_flatten(st.grad)[0]
        if wd:
            g = [gg + wd * ww for gg, ww in zip(g, w_leaves)]
        return st, g

    g0 = tree_flatten(first.grad)[0]
    if wd:
        g0 = [gg + wd * ww for gg, ww in zip(g0, leaves0)]
    limit_b = _LIMIT
    Rw = _bits(leaves0, _LIMIT)
    Rb = _bits([gg / (1 - gamma) for gg in g0], limit_b)
    w = [_to_int(x, R) for x, R in zip(leaves0, Rw)]
    b = [torch.zeros_like(x) for x in w]
    bufs = [InformationBuffer(x, n, d) for x in w]
    losses = torch.empty(T, dtype=lrs.dtype, device=device)

    eta = lrs.double().tolist()

    def lr_step(t, bi, i):  # [η_t b 2^{R_w − R_b}]: a deterministic function of the integers b
        return torch.round(bi.double() * (eta[t] * 2.0 ** (Rw[i] - Rb[i]))).to(torch.int64)

    def floats(ints, Rs):
        return [_to_float(x, R, dt) for x, R, dt in zip(ints, Rs, dtypes)]

    for t in progress_bar(range(T), progress, desc="reversible forward", leave=False):
        wf = floats(w, Rw)
        if t == 0 and all(torch.equal(a, c) for a, c in zip(wf, leaves0)):  # w_0 is exact: the probe is step 0
            losses[0], g = first.loss, g0
        else:
            st, g = grad_of(wf, t, graph=False)
            losses[t] = st.loss
        first = None
        for i in range(len(w)):
            b[i] = bufs[i].forward(b[i]).add_(_to_int(g[i], Rb[i], "the gradient", t))
            w[i] = w[i] - lr_step(t, b[i], i)
        _check_range(w, _LIMIT, "the weights", t)
        _check_range(b, limit_b, "the velocities", t)
        sampler.sample()
    final_w = floats(w, Rw)
    final = {"w": tree_unflatten(final_w, spec), "b": tree_unflatten(floats(b, Rb), spec)}
    lam, value = _objective(problem, dyn, final)
    check_finite(value, T - 1, final["w"], VALIDATION_LOSS)
    buffer_bytes = sum(x.nbytes for x in bufs)
    grads = torch.empty(T, dtype=lrs.dtype, device=device)
    for t in progress_bar(range(T - 1, -1, -1), progress, desc="reversible backward", leave=False):
        for i in range(len(w)):
            w[i] = w[i] + lr_step(t, b[i], i)
        wf = floats(w, Rw)
        st, g = grad_of(wf, t, graph=True)
        for i in range(len(w)):
            b[i] = bufs[i].reverse(b[i] - _to_int(g[i], Rb[i]))
        st.state = {"w": tree_unflatten(wf, spec), "b": tree_unflatten(floats(b, Rb), spec)}
        sbar, gbar, lbar = dyn.cotangent(st.state, st.grad, lrs[t], t, lam)
        lam = _add_w(sbar, st.hvp(gbar))
        grads[t] = lbar
        sampler.sample()
    if not all(buf.exhausted() for buf in bufs) or any(bool(x.any()) for x in b):
        raise RuntimeError("mode='reversible': the reverse pass did not return to w_0, b_0 = 0 "
                           "exactly (a bug)")
    if not bool(torch.isfinite(grads).all()):
        raise FloatingPointError("the hypergradient has non-finite entries although training stayed finite")
    info = {"schedule": "reversible", "snapshots": 0, "recomputed_steps": 0, "memory_estimate": estimate,
            "memory_budget": limit, "peak_memory": sampler.peak, "buffer_bytes": buffer_bytes}
    return value, grads, final["w"], losses, info
