r"""The integer kernels of reversible mode (:mod:`hgtoolkit.reversible`) as one C loop each.

The same arithmetic as the torch kernels of :mod:`hgtoolkit.reversible` (integer operations,
and float64 operations on integers < 2⁵³, every one exactly rounded), written as one loop per
leaf and step over blocks of 2048 weights (a block's refill mask stays in L1), and compiled
once per machine with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``; ``-O3
-march=native -mprefer-vector-width=512 -fno-trapping-math -ffp-contract=off``) into
``$HGTOOLKIT_CACHE`` (default ``~/.cache/hgtoolkit/native``), loaded with :mod:`ctypes`.
``-fno-trapping-math`` lets the compiler vectorise ``floor`` (it changes no result, only the
assumption that floating-point exceptions are not observed); ``-ffp-contract=off`` forbids
fused multiply-adds, so every product is rounded as in the torch kernels: both give the same
bits (tested). The dot product of the fused reverse step is summed in 8 fixed lanes (the same
order on every run). Speeds measured on the 3×500 MNIST MLP: docs/memory.md.

Where no compiler works, :func:`library` returns None and the torch kernels run (the same
numbers, slower).

Per leaf (N weights; ``T`` is float or double, the leaf's dtype; coder states ``s`` int32,
``b``, ``w`` int64; spilled words int16):

- ``fwd_T(N, s, b, w, g, c, sg, sw, n, d, wf, out, peak) -> count``: one forward step in
  place; the spilled words go, compacted, to ``out``; ``wf`` = w as T; ``peak`` = (max |b|,
  max |w|);
- ``rev_b_T(N, s, b, g, sg, n, d, bf, words, avail) -> count``: b_t from b_{t+1} and g_t, the
  coder states refilled from ``words`` (at most ``avail``, in order); ``bf`` = b_t as T (NULL:
  not written);
- ``rev_wa_T(N, w, b, c, sw, wf, lw, hv, u, eta, wd, gam) -> ⟨λ_w, b⟩·2^{R_b}``: the reverse
  step's w half, w += [η b 2^{R_w−R_b}] and ``wf`` = w as T, with heavy-ball SGD's adjoint (:meth:`hgtoolkit.reversible.FixedPointState.reverse_adjoint`):
  λ_w += hv + wd·u, u = gam·u − eta·λ_w, in place;
- ``rev_bwa_T(N, s, b, g, sg, n, d, words, avail, used, w, c, sw, wf, lw, hv, u, eta, wd,
  gam)``: ``rev_b`` of step t+1 then ``rev_wa`` of step t in the same pass; ``used[0]`` = the
  words refilled.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["SOURCE", "SUFFIX", "library", "cache_dir"]

SOURCE = r"""
#include <stdint.h>
#include <math.h>
#define WORD 65536.0
#define HALF 32768
#define KS 8.0  /* L = d K: coder states in [L, WORD L) < 2^31 for d <= 4096 */
#define BLK 2048  /* weights per block: a block's mask (and old states) stay in L1 */
/* floor of a double as int64 without lfloor (which compilers do not vectorise) */
static inline int64_t ifloor(double x) { int64_t t = (int64_t)x; return t - (int64_t)(x < (double)t); }

/* Reverse, b half: b_{t+1} -> b_t given g_t; the coder state undoes its push (base d) and its
   pop (base n); mask: the state is short of a refill. Leaves b_t in bt. */
#define REV_B(j) \
    int64_t bt; { \
        int64_t y = bb[j] - (int64_t)((double)gb[j] * sg); \
        int64_t q = ifloor((double)y * invn); \
        double r = (double)(y - q * n); \
        double cr = floor((r + 0.5) * invn); \
        q += (int64_t)cr; r -= cr * dn; \
        double si = (double)sb[j]; \
        double sd = floor((si + 0.5) * invd); \
        double z = r * dd + (si - sd * dd); \
        double r0 = floor((z + 0.5) * invn); \
        si = sd * dn + (z - r0 * dn); \
        sb[j] = (int32_t)si; \
        mask[j] = (int8_t)(si < low); \
        bt = q * d + (int64_t)r0; \
        bb[j] = bt; \
    }
/* Reverse, w half with the adjoint (T: the float type): w_{t+1} -> w_t with b_{t+1} = B, then
   lw += hv + wd u, u = gam u - eta lw; P = lw B (a term of the dot product). */
#define REV_WA(T, j, B, P) { \
        int64_t wi = wb[j] + (int64_t)((double)(B) * c); \
        wb[j] = wi; \
        fb[j] = (T)((double)wi * sw); \
        T lj = (T)((double)lwb[j] + (double)hb[j] + wd * (double)ub[j]); \
        lwb[j] = lj; \
        ub[j] = (T)(gam * (double)ub[j] - eta * (double)lj); \
        P = (double)lj * (double)(B); \
    }
/* acc[0..7] += the block's terms, in a fixed order (8 lanes: vectorised without reassociation) */
#define ACC8 { \
        int64_t j = 0; \
        for (; j + 8 <= m; j += 8) for (int64_t l = 0; l < 8; l++) acc[l] += prod[j + l]; \
        for (; j < m; j++) acc[0] += prod[j]; \
    }
#define REFILL \
    for (int64_t j = 0; j < m; j++) \
        if (mask[j] && k < avail) sb[j] = (sb[j] << 16) + ((int32_t)words[k++] + HALF);
#define BLOCKS(...) \
    for (int64_t i0 = 0; i0 < N; i0 += BLK) { \
        const int64_t m = N - i0 < BLK ? N - i0 : BLK; \
        __VA_ARGS__ \
    }
#define SUM8(a) (((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7])))

#define KERNELS(T, SUF) \
int64_t fwd_##SUF(int64_t N, int32_t *restrict s, int64_t *restrict b, int64_t *restrict w, \
        const T *restrict g, double c, double sg, double sw, int64_t n, int64_t d, T *restrict wf, \
        int16_t *restrict out, int64_t *restrict peak) { \
    const double top = WORD * (double)n * KS, invW = 1.0 / WORD; \
    const double invn = 1.0 / (double)n, invd = 1.0 / (double)d, dn = (double)n, dd = (double)d; \
    int64_t mb = 0, mw = 0, k = 0; \
    double old[BLK]; int8_t mask[BLK]; \
    BLOCKS( \
        int32_t *restrict sb = s + i0; int64_t *restrict bb = b + i0, *restrict wb = w + i0; \
        const T *restrict gb = g + i0; T *restrict fb = wf + i0; \
        for (int64_t j = 0; j < m; j++) { \
            double si = (double)sb[j]; \
            int full = si >= top; \
            old[j] = si; \
            mask[j] = (int8_t)full; \
            si = full ? floor(si * invW) : si; \
            int64_t bi = bb[j]; \
            int64_t q = ifloor((double)bi * invd); \
            double r = (double)(bi - q * d); \
            double cr = floor((r + 0.5) * invd); \
            q += (int64_t)cr; r -= cr * dd; \
            double sn = floor((si + 0.5) * invn); \
            double z = r * dn + (si - sn * dn); \
            double zq = floor((z + 0.5) * invd); \
            sb[j] = (int32_t)(sn * dd + (z - zq * dd)); \
            bi = q * n + (int64_t)zq + (int64_t)((double)gb[j] * sg); \
            bb[j] = bi; \
            int64_t wi = wb[j] - (int64_t)((double)bi * c); \
            wb[j] = wi; \
            fb[j] = (T)((double)wi * sw); \
            int64_t ab = bi < 0 ? -bi : bi, aw = wi < 0 ? -wi : wi; \
            mb = ab > mb ? ab : mb; mw = aw > mw ? aw : mw; \
        } \
        for (int64_t j = 0; j < m; j++) \
            if (mask[j]) out[k++] = (int16_t)((int64_t)(old[j] - floor(old[j] * invW) * WORD) - HALF); \
    ) \
    peak[0] = mb; peak[1] = mw; \
    return k; \
} \
int64_t rev_b_##SUF(int64_t N, int32_t *restrict s, int64_t *restrict b, const T *restrict g, \
        double sg, int64_t n, int64_t d, T *restrict bf, const int16_t *restrict words, int64_t avail) { \
    const double invn = 1.0 / (double)n, invd = 1.0 / (double)d, dn = (double)n, dd = (double)d; \
    const double low = dd * KS, isg = 1.0 / sg; \
    int64_t k = 0; \
    int8_t mask[BLK]; \
    BLOCKS( \
        int32_t *restrict sb = s + i0; int64_t *restrict bb = b + i0; const T *restrict gb = g + i0; \
        for (int64_t j = 0; j < m; j++) { REV_B(j) } \
        if (bf) for (int64_t j = 0; j < m; j++) bf[i0 + j] = (T)((double)bb[j] * isg); \
        REFILL \
    ) \
    return k; \
} \
double rev_wa_##SUF(int64_t N, int64_t *restrict w, const int64_t *restrict b, double c, double sw, \
        T *restrict wf, T *restrict lw, const T *restrict hv, T *restrict u, double eta, double wd, \
        double gam) { \
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, prod[BLK]; \
    BLOCKS( \
        int64_t *restrict wb = w + i0; const int64_t *restrict bb = b + i0; const T *restrict hb = hv + i0; \
        T *restrict fb = wf + i0, *restrict lwb = lw + i0, *restrict ub = u + i0; \
        for (int64_t j = 0; j < m; j++) REV_WA(T, j, bb[j], prod[j]) \
        ACC8 \
    ) \
    return SUM8(acc); \
} \
double rev_bwa_##SUF(int64_t N, int32_t *restrict s, int64_t *restrict b, const T *restrict g, \
        double sg, int64_t n, int64_t d, const int16_t *restrict words, int64_t avail, int64_t *restrict used, \
        int64_t *restrict w, double c, double sw, T *restrict wf, T *restrict lw, const T *restrict hv, \
        T *restrict u, double eta, double wd, double gam) { \
    const double invn = 1.0 / (double)n, invd = 1.0 / (double)d, dn = (double)n, dd = (double)d; \
    const double low = dd * KS; \
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, prod[BLK]; \
    int64_t k = 0; \
    int8_t mask[BLK]; \
    BLOCKS( \
        int32_t *restrict sb = s + i0; int64_t *restrict bb = b + i0, *restrict wb = w + i0; \
        const T *restrict gb = g + i0, *restrict hb = hv + i0; \
        T *restrict fb = wf + i0, *restrict lwb = lw + i0, *restrict ub = u + i0; \
        for (int64_t j = 0; j < m; j++) { REV_B(j) REV_WA(T, j, bt, prod[j]) } \
        ACC8 \
        REFILL \
    ) \
    *used = k; \
    return SUM8(acc); \
}

KERNELS(float, f32)
KERNELS(double, f64)
"""

_FLAGS = (["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-ffp-contract=off"],
          ["-O3", "-march=native", "-fno-trapping-math", "-ffp-contract=off"],
          ["-O3", "-fno-trapping-math", "-ffp-contract=off"])  # the next where a flag is refused
_LIB: dict = {}


def cache_dir() -> Path:
    """Where the compiled kernels live: ``$HGTOOLKIT_CACHE``, else ``~/.cache/hgtoolkit/native``."""
    env = os.environ.get("HGTOOLKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "hgtoolkit" / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu_key() -> str:
    """The CPU's feature flags (a -march=native library is only valid on the same kind of CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(cc: str, flags: list[str]) -> Path | None:
    key = hashlib.sha256("\0".join([SOURCE, cc, *flags, platform.machine(), _cpu_key()]).encode()).hexdigest()[:16]
    for root in (cache_dir(), Path(tempfile.gettempdir()) / "hgtoolkit-native"):
        lib = root / f"fixedpoint-{key}.so"
        if lib.exists():
            return lib
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                src, out = Path(tmp) / "fixedpoint.c", Path(tmp) / "fixedpoint.so"
                src.write_text(SOURCE)
                done = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src), "-lm"],
                                      capture_output=True, timeout=120)
                if done.returncode != 0 or not out.exists():
                    return None  # the compiler refused: another root would not help
                os.replace(out, lib)  # atomic: a concurrent build of the same key writes the same bytes
            return lib
        except (OSError, subprocess.SubprocessError):
            continue  # a directory we cannot write: the next one
    return None


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, D, L = ctypes.c_void_p, ctypes.c_double, ctypes.c_int64
    for suf in ("f32", "f64"):
        f = getattr(lib, f"fwd_{suf}")
        f.argtypes, f.restype = [L, P, P, P, P, D, D, D, L, L, P, P, P], L
        f = getattr(lib, f"rev_wa_{suf}")
        f.argtypes, f.restype = [L, P, P, D, D, P, P, P, P, D, D, D], D
        f = getattr(lib, f"rev_b_{suf}")
        f.argtypes, f.restype = [L, P, P, P, D, L, L, P, P, L], L
        f = getattr(lib, f"rev_bwa_{suf}")
        f.argtypes, f.restype = [L, P, P, P, D, L, L, P, L, P, P, D, D, P, P, P, P, D, D, D], D
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use, then cached on disk), or None where no C
    compiler works (``HGTOOLKIT_NATIVE=0`` also says None)."""
    if "lib" in _LIB:
        return _LIB["lib"]
    lib = None
    cc = _compiler() if os.environ.get("HGTOOLKIT_NATIVE", "1") != "0" else None
    for flags in (_FLAGS if cc else ()):
        path = _build(cc, flags)
        if path is not None:
            try:
                lib = _bind(path)
                break
            except OSError:
                continue
    if lib is None and os.environ.get("HGTOOLKIT_NATIVE", "1") != "0":
        import warnings
        warnings.warn("mode='reversible': no working C compiler (set CC=...), so the fixed-point kernels run "
                      "as torch operations: the same numbers, ≈ 10× slower (docs/memory.md)", RuntimeWarning,
                      stacklevel=3)
    _LIB["lib"] = lib
    return lib


SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
