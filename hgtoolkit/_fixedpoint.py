r"""The integer kernels of reversible mode (:mod:`hgtoolkit.reversible`) as one C loop each.

The same arithmetic as the torch kernels of :mod:`hgtoolkit.reversible` (integer operations,
and float64 operations on integers < 2⁵³, every one exactly rounded), written as a single pass
over memory per leaf and step, and compiled once per machine with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``; ``-O3 -march=native -fno-trapping-math
-ffp-contract=off``) into ``$HGTOOLKIT_CACHE`` (default ``~/.cache/hgtoolkit/native``), loaded
with :mod:`ctypes`. ``-fno-trapping-math`` lets the compiler vectorise ``floor`` (it changes
no result, only the assumption that floating-point exceptions are not observed);
``-ffp-contract=off`` forbids fused multiply-adds, so every product is rounded as in the torch
kernels: both give the same bits (tested). Measured on the 3×500 MNIST MLP's 392 000-weight
leaf: 1.3 ns per weight for the forward step against 13–17 ns for the ``torch.compile``'d torch
kernel (``floor`` and ``(int64)floor`` are not vectorised there; docs/memory.md).

Where no compiler works, :func:`library` returns None and the torch kernels run (the same
numbers, slower).

Per leaf (N weights; ``T`` is float or double, the leaf's dtype):

- ``fwd_T(N, s, b, w, g, c, sg, sw, n, d, wf, word, mask, out, peak) -> count``: one forward
  step in place on the coder states ``s`` (float64), ``b``, ``w`` (int64); the spilled words
  go, compacted, to ``out`` (int16); ``wf`` = w as T; ``peak`` = (max |b|, max |w|); ``word``
  and ``mask`` are scratch of ≥ N entries;
- ``rev_w_T(N, w, b, c, sw, wf)``: w += [η b 2^{R_w−R_b}], ``wf`` = w as T;
- ``rev_b_T(N, s, b, g, sg, n, d, bf, words, avail, mask) -> count``: b_t from b_{t+1} and g_t, the
  coder states refilled from ``words`` (at most ``avail``, in order); ``bf`` = b_t as T;
  ``mask``: scratch.
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
/* floor of a double as int64 without lfloor (which compilers do not vectorise) */
static inline int64_t ifloor(double x) { int64_t t = (int64_t)x; return t - (int64_t)(x < (double)t); }

#define KERNELS(T, SUF) \
int64_t fwd_##SUF(int64_t N, double *restrict s, int64_t *restrict b, int64_t *restrict w, \
        const T *restrict g, double c, double sg, double sw, int64_t n, int64_t d, T *restrict wf, \
        int16_t *restrict word, int8_t *restrict mask, int16_t *restrict out, int64_t *restrict peak) { \
    const double top = WORD * (double)n * 65536.0, invW = 1.0 / WORD; \
    const double invn = 1.0 / (double)n, invd = 1.0 / (double)d, dn = (double)n, dd = (double)d; \
    int64_t mb = 0, mw = 0, k = 0; \
    for (int64_t i = 0; i < N; i++) { \
        double si = s[i]; \
        double hi = floor(si * invW); \
        int64_t full = si >= top; \
        word[i] = (int16_t)(((int64_t)(si - hi * WORD) - HALF) * full); \
        mask[i] = (int8_t)full; \
        si = full ? hi : si; \
        int64_t bi = b[i]; \
        int64_t q = ifloor((double)bi * invd); \
        double r = (double)(bi - q * d); \
        double cr = floor((r + 0.5) * invd); \
        q += (int64_t)cr; r -= cr * dd; \
        double sn = floor((si + 0.5) * invn); \
        double z = r * dn + (si - sn * dn); \
        double zq = floor((z + 0.5) * invd); \
        s[i] = sn * dd + (z - zq * dd); \
        bi = q * n + (int64_t)zq + (int64_t)((double)g[i] * sg); \
        b[i] = bi; \
        int64_t wi = w[i] - (int64_t)((double)bi * c); \
        w[i] = wi; \
        wf[i] = (T)((double)wi * sw); \
        int64_t ab = bi < 0 ? -bi : bi, aw = wi < 0 ? -wi : wi; \
        mb = ab > mb ? ab : mb; mw = aw > mw ? aw : mw; \
    } \
    for (int64_t i = 0; i < N; i++) if (mask[i]) out[k++] = word[i]; \
    peak[0] = mb; peak[1] = mw; \
    return k; \
} \
void rev_w_##SUF(int64_t N, int64_t *restrict w, const int64_t *restrict b, double c, double sw, \
        T *restrict wf) { \
    for (int64_t i = 0; i < N; i++) { \
        int64_t wi = w[i] + (int64_t)((double)b[i] * c); \
        w[i] = wi; \
        wf[i] = (T)((double)wi * sw); \
    } \
} \
int64_t rev_b_##SUF(int64_t N, double *restrict s, int64_t *restrict b, const T *restrict g, \
        double sg, int64_t n, int64_t d, T *restrict bf, const int16_t *restrict words, int64_t avail, \
        int8_t *restrict mask) { \
    const double invn = 1.0 / (double)n, invd = 1.0 / (double)d, dn = (double)n, dd = (double)d; \
    const double low = dd * 65536.0, isg = 1.0 / sg; \
    int64_t k = 0; \
    for (int64_t i = 0; i < N; i++) { \
        int64_t y = b[i] - (int64_t)((double)g[i] * sg); \
        int64_t q = ifloor((double)y * invn); \
        double r = (double)(y - q * n); \
        double cr = floor((r + 0.5) * invn); \
        q += (int64_t)cr; r -= cr * dn; \
        double si = s[i]; \
        double sd = floor((si + 0.5) * invd); \
        double z = r * dd + (si - sd * dd); \
        double r0 = floor((z + 0.5) * invn); \
        si = sd * dn + (z - r0 * dn); \
        s[i] = si; \
        mask[i] = (int8_t)(si < low); \
        int64_t bi = q * d + (int64_t)r0; \
        b[i] = bi; \
        bf[i] = (T)((double)bi * isg); \
    } \
    for (int64_t i = 0; i < N; i++) \
        if (mask[i] && k < avail) s[i] = s[i] * WORD + ((double)words[k++] + HALF); \
    return k; \
}

KERNELS(float, f32)
KERNELS(double, f64)
"""

_FLAGS = (["-O3", "-march=native", "-fno-trapping-math", "-ffp-contract=off"],
          ["-O3", "-fno-trapping-math", "-ffp-contract=off"])  # the second where -march=native fails
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
        f.argtypes, f.restype = [L, P, P, P, P, D, D, D, L, L, P, P, P, P, P], L
        f = getattr(lib, f"rev_w_{suf}")
        f.argtypes, f.restype = [L, P, P, D, D, P], None
        f = getattr(lib, f"rev_b_{suf}")
        f.argtypes, f.restype = [L, P, P, P, D, L, L, P, P, L, P], L
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
