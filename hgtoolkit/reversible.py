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

**The buffer** is a streaming (rANS-style) coder per weight: an int32 state x ∈ [L, 2¹⁶ L),
L = 8 d (< 2³¹ for d ≤ 4096). A step first spills the low 16 bits of the states x ≥ 2¹⁶·n·8
(leaving x ∈ [L n/d, L)), then pops base n and pushes base d: x ← ⌊x/n⌋ d + (z mod d); both cases land in
[L, 2¹⁶ L) again, and the reverse step tells them apart by x < L after undoing the pop and
push: so a step stores only the spilled 16-bit words (≈ 1 % of the weights per step at
γ = 0.9), never a mask. At the end of the reverse pass every state is L again and b = 0
(checked: the reversal was exact).

**Tolerance against stored reverse of the float trajectory.** Both use the same adjoint
(:meth:`~hgtoolkit.dynamics.Dynamics.cotangent`, one HVP per step; on the CPU its heavy-ball
closed form runs fused into the reverse kernel, :meth:`FixedPointState.reverse_adjoint`,
equal to it to rounding); they differ only in the states at which it is evaluated. Per step the fixed-point state differs from the exact-
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

from . import _fixedpoint as _native, checkpointing as _ckpt
from ._step import Step as _Step, add_w as _add_w, objective as _objective, probe as _probe
from .dynamics import SGD, Dynamics
from .divergence import VALIDATION_LOSS, check_finite
from .trajectory import progress_bar

__all__ = ["check_reversible", "ratio", "FixedPointState", "reversible_reverse", "estimate_bytes"]

_WORD = 1 << 16  # the buffer spills 16-bit words
_K = 8  # L = d·K: the coder states x ∈ [L, 2¹⁶ L) are int32 (< 2³¹ for d ≤ 4096)
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


_F64, _I64 = torch.float64, torch.int64


def _floor_div(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(⌊x/m⌋, x mod m) of int64 x (|x| < 2⁶¹) for a small m > 0, without integer division (slow
    on CPUs): the float64 quotient x·(1/m) is off by at most 2⁹/m + 1, corrected exactly from
    the remainder, which float64 holds exactly. The remainder comes back as float64."""
    q = torch.floor(x.to(_F64) * (1.0 / m)).to(_I64)
    r = (x - q * m).to(_F64)
    c = torch.floor(r / m)
    return q + c.to(_I64), r - c * m


def _forward_kernel(s, b, w, g, c, sg, sw, n: int, d: int, dtype: torch.dtype):
    r"""One exact step on one flat leaf. ``s``: coder states (float64 holding integers < 2⁵³),
    ``b``, ``w``: int64; ``g``: the gradient (float); c = η·2^{R_w−R_b}, sg = 2^{R_b},
    sw = 2^{−R_w}. Returns (s', spilled mask, the low words (int32; kept where the mask is
    set), b', w', w' as floats, max |b'|, max |w'|). γ ⊙ b pops base n, pushes base d."""
    full = s >= float(_WORD * n * _K)
    hi = torch.floor(s * (1.0 / _WORD))
    word = (s - hi * _WORD).to(torch.int32)
    s = torch.where(full, hi, s)
    q, r0 = _floor_div(b, d)  # b = q d + r0
    sn = torch.floor(s / n)
    z = r0 * n + (s - sn * n)  # r0 n + (popped r): z ∈ [0, dn)
    zq = torch.floor(z / d)
    s = sn * d + (z - zq * d)  # push z mod d
    b = q * n + zq.to(_I64) + (g.to(_F64) * sg).to(_I64)  # γ ⊙ b + [g 2^R]
    w = w - (b.to(_F64) * c).to(_I64)
    return s, full, word, b, w, (w.to(_F64) * sw).to(dtype), b.abs().max(), w.abs().max()


def _reverse_w_kernel(w, b, c, sw, dtype: torch.dtype):
    """w_t = w_{t+1} + [η_t b_{t+1} 2^{R_w−R_b}] (the forward's very function), and as floats."""
    w = w + (b.to(_F64) * c).to(_I64)
    return w, (w.to(_F64) * sw).to(dtype)


def _reverse_b_kernel(s, b, g, sg, n: int, d: int):
    """b_t from b_{t+1} and g_t: undo the push (base d) and the pop (base n). Returns (b_t, the
    coder states before their refill, the refill mask)."""
    y = b - (g.to(_F64) * sg).to(_I64)  # = q n + ⌊z/d⌋
    q, zq = _floor_div(y, n)
    sd = torch.floor(s / d)
    z = zq * d + (s - sd * d)
    r0 = torch.floor(z / n)
    s = sd * n + (z - r0 * n)  # push r (base n)
    return q * d + r0.to(_I64), s, s < float(d * _K)


_CHUNK = 1 << 22  # words per chunk of the buffer (8 MB)


class FixedPointState:
    r"""w and b of heavy-ball SGD as flat int64 leaves with their information buffer (per
    weight an int32 coder state, per step the spilled 16-bit words of all leaves): one exact
    step forward (:meth:`forward`) and back (:meth:`reverse_w`, then :meth:`reverse_b` once g_t
    is known; with the C kernels, :meth:`reverse_adjoint` does step t+1's b half, step t's w half
    and the adjoint in one pass, and the lone w half runs as the torch kernel). On the CPU the steps run as the C kernels of
    :mod:`hgtoolkit._fixedpoint` (in place, blocked), elsewhere — or without a C compiler, or
    with ``native=False`` — as the torch kernels above; both give the same bits."""

    def __init__(self, w_leaves: list, Rw: list, Rb: list, n: int, d: int, native: bool = True):
        self.n, self.d, self.Rw, self.Rb = n, d, Rw, Rb
        self.shapes = [x.shape for x in w_leaves]
        self.dtypes = [x.dtype for x in w_leaves]
        self.w = [torch.round(x.detach().reshape(-1).to(_F64) * 2.0 ** R).to(_I64) for x, R in zip(w_leaves, Rw)]
        self.b = [torch.zeros_like(x) for x in self.w]
        self.s = [torch.full(x.shape, d * _K, dtype=torch.int32, device=x.device) for x in self.w]
        self.words: list[tuple[int, int, int]] = []  # per step: (chunk, start, count)
        self.chunks: list[torch.Tensor] = []  # the words, in int16 chunks of 2²² (no per-step allocation)
        self.words_bytes = 0
        self.dev = self.w[0].device
        self.sg = [torch.tensor(2.0 ** R, dtype=_F64, device=self.dev) for R in Rb]
        self.sw = [torch.tensor(2.0 ** -R, dtype=_F64, device=self.dev) for R in Rw]
        self.lib = None
        if native and self.dev.type == "cpu" and all(dt in _native.SUFFIX for dt in self.dtypes):
            self.lib = _native.library()
        if self.lib is not None:  # scratch of the C kernels: one step's words, the peaks
            self._stage = torch.empty(sum(x.numel() for x in self.w), dtype=torch.int16)
            self._peak = torch.zeros(2 * len(self.w), dtype=_I64)
            self._used = torch.zeros(1, dtype=_I64)
            self._fn = [{k: getattr(self.lib, f"{k}_{_native.SUFFIX[dt]}") for k in ("fwd", "rev_wa", "rev_b", "rev_bwa")}
                        for dt in self.dtypes]

    def _c(self, eta: float, i: int) -> torch.Tensor:
        return torch.tensor(eta * 2.0 ** (self.Rw[i] - self.Rb[i]), dtype=_F64, device=self.dev)

    def floats_w(self) -> list:
        return [(x.to(_F64) * sw).to(dt).reshape(sh) for x, sw, dt, sh in zip(self.w, self.sw, self.dtypes, self.shapes)]

    def floats_b(self) -> list:
        return [(x.to(_F64) * (1 / sg)).to(dt).reshape(sh)
                for x, sg, dt, sh in zip(self.b, self.sg, self.dtypes, self.shapes)]

    def _flat_g(self, g: list) -> list:
        return [gi.detach().reshape(-1).to(dt).contiguous() for gi, dt in zip(g, self.dtypes)]

    def forward(self, g: list, eta: float, t: int) -> list:
        """One step with the gradient leaves ``g``; returns w_{t+1} as float leaves."""
        out, g = [], self._flat_g(g)
        if self.lib is not None:
            at, p = 0, self._peak.data_ptr()
            for i, gi in enumerate(g):
                wf = torch.empty(gi.numel(), dtype=self.dtypes[i])
                at += self._fn[i]["fwd"](
                    gi.numel(), self.s[i].data_ptr(), self.b[i].data_ptr(), self.w[i].data_ptr(), gi.data_ptr(),
                    eta * 2.0 ** (self.Rw[i] - self.Rb[i]), 2.0 ** self.Rb[i], 2.0 ** -self.Rw[i], self.n, self.d,
                    wf.data_ptr(), self._stage[at:].data_ptr(), p + 16 * i)
                out.append(wf.reshape(self.shapes[i]))
            words, peak = self._stage[:at], int(self._peak.max())
        else:
            words, peaks = [], []
            for i, gi in enumerate(g):
                s, full, word, b, w, wf, mb, mw = _forward_kernel(
                    self.s[i].to(_F64), self.b[i], self.w[i], gi, self._c(eta, i), self.sg[i], self.sw[i], self.n, self.d,
                    self.dtypes[i])
                self.s[i], self.b[i], self.w[i] = s.to(torch.int32), b, w
                words.append((word[full] - _WORD // 2).to(torch.int16))
                peaks += [mb, mw]
                out.append(wf.reshape(self.shapes[i]))
            words, peak = torch.cat(words), float(torch.stack(peaks).max())
        self._push(words)
        if peak >= _LIMIT:
            raise OverflowError(f"mode='reversible': the weights or velocities outgrew their fixed-point "
                                f"range at step {t} (more than 2^{_HEADROOM}× their initial magnitude); use "
                                "mode='reverse' with memory=... (binomial checkpointing)")
        return out

    def _push(self, words: torch.Tensor) -> None:
        """One step's spilled words onto the buffer's stack of chunks."""
        count = words.numel()
        end = self.words[-1][1] + self.words[-1][2] if self.words else 0
        if not self.chunks or end + count > self.chunks[-1].numel():
            self.chunks.append(torch.empty(max(_CHUNK, count), dtype=torch.int16, device=self.dev))
            end = 0
        self.chunks[-1][end:end + count].copy_(words)
        self.words.append((len(self.chunks) - 1, end, count))
        self.words_bytes += count * 2

    def reverse_w(self, eta: float) -> list:
        """w_{t+1} → w_t; returns w_t as float leaves (the torch kernel: with the C kernels the
        reverse pass takes :meth:`reverse_adjoint`, which does this half fused)."""
        out = []
        for i, x in enumerate(self.w):
            self.w[i], wf = _reverse_w_kernel(x, self.b[i], self._c(eta, i), self.sw[i], self.dtypes[i])
            out.append(wf.reshape(self.shapes[i]))
        return out

    def reverse_adjoint(self, eta: float, lw: list, hv: list, u: list, wd: float, gamma: float,
                        g: list | None = None) -> tuple[list, float]:
        r"""C kernels only: :meth:`reverse_w` fused with heavy-ball SGD's adjoint, and with ``g``
        (the gradient g_{t+1} at w_{t+1}) first :meth:`reverse_b` of step t+1, in the same pass
        over memory. On flat leaves of the float dtype, in place: λ_w ← λ_w + ``hv`` + wd·u
        (``hv`` = H_{t+1} u: completes w̄_{t+1} = λ_w + H_{t+1} ḡ_{t+1} + wd ḡ_{t+1}), then
        u ← γ·u − η_t λ_w (on entry u = ḡ_{t+1}, so γ·u = b̄_{t+1}; on exit u = ḡ_t = b̄_{t+1} −
        η_t w̄_{t+1}, the cotangent of b_{t+1} through both of its uses and the vector of step
        t's HVP). Returns (w_t as float leaves, η̄_t = −⟨w̄_{t+1}, b_{t+1}⟩, b_{t+1} read from the
        exact integers). The reference is :meth:`hgtoolkit.dynamics.SGD.cotangent`, which the
        torch kernels' path calls (tested equal to 1e-12)."""
        out, dot = [], 0.0
        if g is not None:
            step, count, ci = self._pop_words()
            at, used, g = 0, self._used, self._flat_g(g)
        for i, x in enumerate(self.w):
            wf = torch.empty(x.numel(), dtype=self.dtypes[i])
            c, sw = eta * 2.0 ** (self.Rw[i] - self.Rb[i]), 2.0 ** -self.Rw[i]
            adj = (wf.data_ptr(), lw[i].data_ptr(), hv[i].data_ptr(), u[i].data_ptr(), eta, wd, gamma)
            if g is None:
                dot += self._fn[i]["rev_wa"](x.numel(), x.data_ptr(), self.b[i].data_ptr(), c, sw, *adj) \
                    * 2.0 ** -self.Rb[i]
            else:
                dot += self._fn[i]["rev_bwa"](
                    x.numel(), self.s[i].data_ptr(), self.b[i].data_ptr(), g[i].data_ptr(), 2.0 ** self.Rb[i],
                    self.n, self.d, step[at:].data_ptr(), count - at, used.data_ptr(), x.data_ptr(), c, sw,
                    *adj) * 2.0 ** -self.Rb[i]
                at += int(used[0])
            out.append(wf.reshape(self.shapes[i]))
        if g is not None:
            self._words_done(at, count, ci)
        return out, -dot

    def _pop_words(self) -> tuple[torch.Tensor, int, int]:
        """The last step's spilled words (its words, their count, its chunk), off the buffer."""
        ci, start, count = self.words.pop()
        self.words_bytes -= count * 2
        return self.chunks[ci][start:start + count], count, ci

    def _words_done(self, at: int, count: int, ci: int) -> None:
        """After a reverse b half: every word of the step refilled; its chunk freed when empty."""
        if at != count:
            raise RuntimeError("mode='reversible': the information buffer is out of step (a bug)")
        if not self.words or self.words[-1][0] != ci:  # no earlier step's words are in this chunk
            self.chunks.pop()

    def reverse_b(self, g: list, floats: bool = True) -> list | None:
        """b_{t+1} → b_t given g_t (the gradient at w_t), refilling the spilled words; returns
        b_t as float leaves (``floats=False``: None)."""
        step, count, ci = self._pop_words()
        at, out = 0, []
        for i, gi in enumerate(self._flat_g(g)):
            if self.lib is not None:
                bf = torch.empty(gi.numel(), dtype=self.dtypes[i]) if floats else None
                at += self._fn[i]["rev_b"](gi.numel(), self.s[i].data_ptr(), self.b[i].data_ptr(), gi.data_ptr(),
                                           2.0 ** self.Rb[i], self.n, self.d, None if bf is None else bf.data_ptr(),
                                           step[at:].data_ptr(), count - at)
            else:
                self.b[i], s, short = _reverse_b_kernel(self.s[i].to(_F64), self.b[i], gi, self.sg[i], self.n, self.d)
                m = int(short.sum())
                s[short] = s[short] * _WORD + (step[at:at + m].to(_F64) + _WORD // 2)
                at += m
                self.s[i] = s.to(torch.int32)
                bf = (self.b[i].to(_F64) * (1 / self.sg[i])).to(self.dtypes[i]) if floats else None
            out.append(None if bf is None else bf.reshape(self.shapes[i]))
        self._words_done(at, count, ci)
        return out if floats else None

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer: its word chunks and the coder states."""
        return sum(c.numel() * 2 for c in self.chunks) + sum(x.numel() * x.element_size() for x in self.s)

    def back_at_start(self) -> bool:
        """True when every coder state is at its start and b = 0 (after the reverse pass)."""
        L = self.d * _K
        return (not self.words and all(bool((s == L).all()) for s in self.s)
                and not any(bool(x.any()) for x in self.b))


def _bits(values: list[torch.Tensor], limit: int, floor: float = 1e-30) -> list[int]:
    """R per leaf: ⌊log₂ limit⌋ − headroom − ⌈log₂ max|x|⌉ (|x| may grow 2^headroom-fold)."""
    out = []
    for v in values:
        m = float(v.abs().max()) if v.numel() else 0.0
        m = m if m > floor and math.isfinite(m) else 1.0
        out.append(limit.bit_length() - 1 - _HEADROOM - math.ceil(math.log2(m)))
    return out


def estimate_bytes(T: int, numel: int, gamma: float, fp: "_ckpt.Footprint") -> int:
    """Bytes of reversible mode: integers of w and b (16 per weight) and the int32 coder
    states (4), the C kernels' scratch (≤ 2 per weight: one step's words), the buffer's
    T·d·log₂(d/n)/8 bytes (+ 1/16 for the word granularity, + one 8 MB chunk), one step's graph
    and the reverse pass's work space (λ and the adjoint's vectors: ``fp.work``)."""
    n, d = ratio(gamma)
    buffer = T * numel * math.log2(d / n) / 8 * (1 + 1 / 16) + 2 * _CHUNK
    return int(22 * numel + buffer + fp.step + fp.work)


def reversible_reverse(problem, dyn, lrs, memory, progress):
    """Reverse mode for heavy-ball momentum by running training backwards (module docstring).
    Returns (value, grads, w_T, train losses, info for HypergradResult)."""

    if getattr(problem, "buffers0", None) is not None:
        raise ValueError(f"mode='reversible' cannot run problem {problem.name!r} backwards: it carries "
                         "buffers (e.g. BatchNorm running statistics), which training overwrites "
                         "(no exact inverse); use mode='reverse' with memory=... (checkpointing)")
    gamma = check_reversible(dyn)
    n, d = ratio(gamma)
    T = len(lrs)
    wd = float(dyn.weight_decay)
    device = lrs.device
    sampler = _ckpt.MemorySampler(device)
    s0 = dyn.init(problem.params0)
    leaves0, spec = tree_flatten(s0["w"])
    first, fp = _probe(problem, dyn, s0)
    numel = sum(x.numel() for x in leaves0)
    estimate = estimate_bytes(T, numel, gamma, fp)
    limit, _ = _ckpt.budget(memory, device)
    if limit is not None and estimate * _ckpt.ALLOCATOR_SLACK > limit:
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
    Rw = _bits(leaves0, _LIMIT)
    Rb = _bits([gg / (1 - gamma) for gg in g0], _LIMIT)
    fx = FixedPointState(leaves0, Rw, Rb, n, d)
    losses = torch.empty(T, dtype=lrs.dtype, device=device)
    eta = lrs.double().tolist()
    wf = fx.floats_w()
    exact0 = all(torch.equal(a, c) for a, c in zip(wf, leaves0))  # w_0 in fixed point is w_0
    for t in progress_bar(range(T), progress, desc="reversible forward", leave=False):
        if t == 0 and exact0:  # the probe is step 0
            losses[0], g = first.loss, g0
        else:
            st, g = grad_of(wf, t, graph=False)
            losses[t] = st.loss
        first = None
        wf = fx.forward(g, eta[t], t)
        sampler.sample()
    final = {"w": tree_unflatten(wf, spec), "b": tree_unflatten(fx.floats_b(), spec)}
    lam, value = _objective(problem, dyn, final)
    check_finite(value, T - 1, final["w"], VALIDATION_LOSS)
    buffer_bytes = fx.nbytes
    grads = torch.empty(T, dtype=lrs.dtype, device=device)
    steps = progress_bar(range(T - 1, -1, -1), progress, desc="reversible backward", leave=False)
    if fx.lib is not None:  # the C kernels with the adjoint fused in (FixedPointState.reverse_adjoint)
        lw = [x.detach().reshape(-1).to(dt).clone() for x, dt in zip(tree_flatten(lam["w"])[0], fx.dtypes)]
        u = [torch.zeros_like(x) for x in lw]
        wf, lbar = fx.reverse_adjoint(eta[T - 1], lw, [torch.zeros_like(x) for x in lw], u, wd, gamma)  # no H u yet
        for t in steps:
            st, g = grad_of(wf, t, graph=True)
            hv = tree_flatten(st.hvp(tree_unflatten([x.view(sh) for x, sh in zip(u, fx.shapes)], spec)))[0]
            grads[t] = lbar
            if t:
                wf, lbar = fx.reverse_adjoint(eta[t - 1], lw, [x.reshape(-1) for x in hv], u, wd, gamma, g=g)
            else:
                fx.reverse_b(g, floats=False)
            sampler.sample()
    else:
        for t in steps:
            wf = fx.reverse_w(eta[t])
            st, g = grad_of(wf, t, graph=True)
            bf = fx.reverse_b(g)
            st.state = {"w": tree_unflatten(wf, spec), "b": tree_unflatten(bf, spec)}
            sbar, gbar, lbar = dyn.cotangent(st.state, st.grad, lrs[t], t, lam)
            lam = _add_w(sbar, st.hvp(gbar))
            grads[t] = lbar
            sampler.sample()
    if not fx.back_at_start():
        raise RuntimeError("mode='reversible': the reverse pass did not return to the start exactly (a bug)")
    if not bool(torch.isfinite(grads).all()):
        raise FloatingPointError("the hypergradient has non-finite entries although training stayed finite")
    info = {"schedule": "reversible", "snapshots": 0, "recomputed_steps": 0, "memory_estimate": estimate,
            "memory_budget": limit, "peak_memory": sampler.peak, "buffer_bytes": buffer_bytes}
    return value, grads, final["w"], losses, info
