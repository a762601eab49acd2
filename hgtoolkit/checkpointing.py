r"""Checkpointing schedules for exact reverse mode, and the memory budget that chooses one.

The reverse pass of :func:`hgtoolkit.hypergradient` needs, at step t = T−1 … 0, the training
state s_t and the gradient graph of step t (for H_t ḡ). Storing all of them costs
T·(S + G) bytes (S: one training state, G: one step's gradient graph). A *schedule* trades
memory for recomputation; every schedule here is a sequence of the actions of the
`checkpoint_schedules` package (Firedrake project, LGPL-3.0, imported — not copied):

- ``Forward(n0, n1, write_ics, write_adj_deps, storage)``: advance s_{n0} → s_{n1};
  ``write_ics``: keep s_{n0} as a snapshot; ``write_adj_deps``: keep the gradient graphs of
  steps n0 … n1−1 for the reverse pass;
- ``Reverse(n1, n0, clear)``: the adjoint over steps n1−1 … n0 from the kept graphs;
- ``Copy(n, RAM, WORK)`` / ``Move(n, RAM, WORK)``: restart the forward from snapshot n
  (``Move`` drops the snapshot); ``EndForward`` (s_T reached: λ_T = ∇E) and ``EndReverse``.

:func:`run` interprets them; the three schedules are three action lists:

- ``"stored"`` (``checkpoint=None``): one ``Forward(0, T, …, write_adj_deps)``; nothing is
  recomputed; memory T·(S + G);
- ``"every"`` (``checkpoint=k``): s_0, s_k, s_2k, … kept; each segment of k steps replayed
  with its graphs in the reverse pass (the last one keeps its graphs from the forward pass);
  memory ≈ ⌈T/k⌉·S + k·(S + G), recomputed steps = the steps before the last segment;
- ``"binomial"`` (``checkpoint="binomial", snapshots=c``): revolve (Griewank & Walther, ACM
  TOMS 2000) as ``checkpoint_schedules.MultistageCheckpointSchedule(T, c, 0)``, the closed-form
  binomial schedule — its ``Revolve``/``HRevolve`` build their schedules by dynamic programming
  in Python (3.6 s at T = 1000, c = 10, growing as T²; the multistage schedule takes 0.12 s at
  T = 10⁴, c = 30; measured on this project's 2-vCPU machine); memory c·S + (S + G); the
  number of recomputed steps is the binomial optimum :func:`binomial_recomputations`.

A **snapshot** is a whole training state (the optimizer state dict: weights and optimizer
buffers; model buffers and an RNG position will join it as entries of the same dict). States
are immutable here (every update returns new tensors), so a snapshot is a reference, never a
copy. **w₀ counts as a snapshot**: s_0 is the first of the c snapshots of a binomial schedule
(as in ``checkpoint_schedules``), and of the every-k schedule's ⌈T/k⌉.

**Steps recomputed** = forward steps run in all − T (one training pass). The reverse step of
every memory-bounded schedule rebuilds its step's graph (the adjoint step includes its forward
evaluation, the convention of the binomial formula); that rebuild is not counted, so
"stored" recomputes 0 steps and "every"/"binomial" ≥ T − k resp. ≥ T − 1.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["MemoryBudgetError", "Footprint", "Plan", "parse_memory", "available_memory", "budget",
           "binomial_recomputations", "stored_plan", "every_plan", "binomial_plan", "choose", "plan",
           "run", "AUTO_FRACTION", "ALLOCATOR_SLACK", "reject_removed", "check_checkpoint", "fmt_bytes", "MemorySampler",
           "DISK_REPEATS", "disk_target", "DiskBudget", "disk_budget", "DiskSnapshots", "disk_traffic", "measure_io"]

#: ``memory="auto"``: this fraction of the device's free memory (cgroup limit included); the
#: disk tier may use this fraction of its directory's free space.
AUTO_FRACTION = 0.5
#: with a disk tier and too little memory, the binomial schedule gets as many snapshots as make
#: it run no step more than this many times forward beyond the first pass (:func:`disk_target`).
DISK_REPEATS = 2
#: a schedule fits a budget B when its estimate is ≤ B / ALLOCATOR_SLACK: the resident set holds
#: more than the tensors counted (the allocator's freed-but-kept memory): measured −6 … +3 % at
#: T ≤ 1000 and +22 % at T = 10⁴ (104 snapshots, 0.97 GB for an estimate of 0.79 GB) on the
#: 3×500 MNIST MLP.
ALLOCATOR_SLACK = 1.25

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


class MemoryBudgetError(MemoryError):
    """A reverse pass that would not fit the memory budget, refused before any work (the
    message gives the estimate and the options that fit)."""


# ----------------------------------------------------------------------------- the budget

def parse_memory(memory: Any, argname: str = "memory") -> "int | str":
    """Bytes from an int, or a string "200MB", "1.5GiB", "2e9" (SI and binary units; case-
    insensitive); "auto" is returned as is."""
    if isinstance(memory, bool) or not isinstance(memory, (int, float, str)):
        raise TypeError(f"{argname} must be a number of bytes, a string like '2GB', or 'auto', "
                        f"got {type(memory).__name__}")
    if isinstance(memory, str):
        text = memory.strip().lower()
        if text == "auto":
            return "auto"
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?b|b)?", text)
        if m is None:
            raise ValueError(f"{argname}={memory!r}: expected bytes like '200MB', '1.5GiB', "
                             "'2e9' or 'auto'")
        memory = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if not math.isfinite(memory) or memory <= 0:
        raise ValueError(f"{argname} must be > 0 bytes, got {memory!r}")
    return int(memory)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" = no limit


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory(device: Any = "cpu", cgroup: "str | Path" = "/sys/fs/cgroup") -> int | None:
    """Free bytes on ``device``: CUDA ``mem_get_info``; CPU the smaller of MemAvailable and the
    cgroup's ``memory.max − memory.current`` (v2; v1's ``memory/memory.limit_in_bytes`` −
    ``memory.usage_in_bytes``). None where nothing can be read."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    root = Path(cgroup)
    free = [_meminfo_available()]
    for lim, cur in (("memory.max", "memory.current"),
                     ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit, current = _read_int(root / lim), _read_int(root / cur)
        if limit is not None and current is not None and limit < 2 ** 60:
            free.append(max(0, limit - current))
    free = [f for f in free if f is not None]
    return min(free) if free else None


def budget(memory: Any, device: Any = "cpu") -> tuple[int | None, str]:
    """(bytes the reverse pass may add, how that number was obtained). ``memory=None`` or
    "auto": AUTO_FRACTION of :func:`available_memory` (None if unknown: no limit)."""
    memory = "auto" if memory is None else parse_memory(memory)
    if memory != "auto":
        return memory, "memory="
    free = available_memory(device)
    if free is None:
        return None, "free memory unknown"
    return int(AUTO_FRACTION * free), f"{AUTO_FRACTION:.0%} of the {fmt_bytes(free)} free on {torch.device(device)}"


def fmt_bytes(n: float) -> str:
    """A byte count for messages: 1.5 GB, 200 MB, 3 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- the memory model

@dataclass(frozen=True)
class Footprint:
    r"""Bytes of one training state (``state``: every tensor of the optimizer state), of one
    step's kept gradient graph (``graph``: the tensors autograd saved for the double backward,
    and g_t; measured on step 0), and of the work space of the reverse pass (``work``: λ, the
    cotangent temporaries, the validation gradient: 4·S + G, a bound)."""

    state: int
    graph: int

    @property
    def work(self) -> int:
        return 4 * self.state + self.graph

    @property
    def step(self) -> int:
        """A kept step: its state and its graph."""
        return self.state + self.graph


@dataclass(frozen=True)
class Plan:
    """A schedule with its predicted cost: ``kind`` ("stored", "every", "binomial"), ``k``
    (every k steps), ``snapshots`` (states kept at once, s_0 included), ``recomputed`` (forward
    steps beyond one training pass), ``estimate`` (bytes, :class:`Footprint` model)."""

    kind: str
    T: int
    k: int | None
    snapshots: int
    recomputed: int
    estimate: int
    disk: int = 0  #: binomial: snapshots on disk besides the ``snapshots`` in memory
    state_bytes: int = 0  #: one snapshot (S)

    @property
    def disk_bytes(self) -> int:
        """Bytes the disk snapshots take at most (S each)."""
        return self.disk * self.state_bytes

    def actions(self) -> Iterable:
        import checkpoint_schedules as cs
        T = self.T
        if self.kind == "binomial":  # the multistage allocation puts the least used snapshots on disk
            yield from _until_end(cs.MultistageCheckpointSchedule(T, self.snapshots, self.disk))
            return
        W, RAM = cs.StorageType.WORK, cs.StorageType.RAM
        if self.kind == "stored":
            yield from (cs.Forward(0, T, False, True, W), cs.EndForward(), cs.Reverse(T, 0, True),
                        cs.EndReverse())
            return
        k, last = self.k, (T - 1) // self.k * self.k
        yield from (cs.Forward(a, a + k, True, False, RAM) for a in range(0, last, k))
        yield from (cs.Forward(last, T, False, True, W), cs.EndForward(), cs.Reverse(T, last, True))
        for a in range(last - k, -1, -k):
            yield from (cs.Move(a, RAM, W), cs.Forward(a, a + k, False, True, W), cs.Reverse(a + k, a, True))
        yield cs.EndReverse()

    def describe(self) -> str:
        what = {"stored": "store every step", "every": f"checkpoint={self.k}",
                "binomial": f"checkpoint='binomial', snapshots={self.snapshots + self.disk}"}[self.kind]
        disk = f" ({self.disk} of them on disk, ≈ {fmt_bytes(self.disk_bytes)})" if self.disk else ""
        return f"{what}{disk}: ≈ {fmt_bytes(self.estimate)}, {self.recomputed} steps recomputed"


def _until_end(schedule) -> Iterable:
    import checkpoint_schedules as cs
    for action in schedule:
        yield action
        if isinstance(action, cs.EndReverse):
            return


def binomial_recomputations(T: int, c: int) -> int:
    r"""Fewest forward steps beyond one training pass for T steps with c snapshots (s_0 among
    them), when each reverse step rebuilds its own step (Griewank & Walther 2000):
    r·T − β(c+1, r−1) with β(s, r) = C(s + r, s) and r the least with β(c, r) ≥ T."""
    if T < 1 or c < 1:
        raise ValueError(f"need T ≥ 1 and c ≥ 1 snapshots, got T={T}, c={c}")
    r = 0
    while math.comb(c + r, c) < T:
        r += 1
    return r * T - math.comb(c + r, c + 1) if r else 0


def stored_plan(T: int, fp: Footprint) -> Plan:
    return Plan("stored", T, None, 0, 0, T * fp.step + fp.work)


def every_plan(T: int, k: int, fp: Footprint) -> Plan:
    k = min(k, T)
    last = (T - 1) // k * k
    n_snap = last // k  # s_0, s_k, … before the last segment
    return Plan("every", T, k, n_snap, last, n_snap * fp.state + max(k, T - last) * fp.step + fp.work)


def binomial_plan(T: int, c: int, fp: Footprint, disk: int = 0) -> Plan:
    """Revolve with c snapshots in memory and ``disk`` more on disk (recomputation: that of
    c + disk snapshots; memory: c of them)."""
    disk = max(0, min(disk, T))
    c = max(0 if disk else 1, min(c, T))
    total = min(c + disk, T)
    return Plan("binomial", T, None, c, binomial_recomputations(T, total), c * fp.state + fp.step + fp.work,
                disk, fp.state)


def disk_target(T: int) -> int:
    r"""Snapshots that a disk tier brings the binomial schedule to (``DISK_REPEATS``): the fewest
    c whose schedule runs no step more than twice forward beyond the first pass, i.e. the least
    c with C(c + 2, 2) ≥ T (≈ √(2T): 44 at T = 1000, 140 at T = 10⁴)."""
    c = 1
    while math.comb(c + DISK_REPEATS, DISK_REPEATS) < T:
        c += 1
    return min(c, T)


def _with_disk(T: int, fp: Footprint, c_ram: int, disk: "DiskBudget | None", asked: int | None) -> Plan | None:
    """The binomial plan with c_ram snapshots in memory and the rest of ``asked`` (None: of
    :func:`disk_target`) on disk; None if no disk tier or nothing needs to go there."""
    want = disk_target(T) if asked is None else asked
    if disk is None or c_ram >= want:
        return None
    c_ram = max(c_ram, 0)
    n_disk = want - c_ram
    if asked is None:  # automatic: as many as the disk holds, as few as the disk's cost favours
        n_disk = _cheapest_disk(T, fp, c_ram, min(n_disk, disk.free // max(fp.state, 1)), disk)
    p = binomial_plan(T, c_ram, fp, n_disk)
    if p.disk_bytes > disk.free:
        raise MemoryBudgetError(f"{p.describe()}: the disk snapshots need ≈ {fmt_bytes(p.disk_bytes)} in "
                                f"{disk.where}, where {fmt_bytes(disk.free)} may be used "
                                f"({AUTO_FRACTION:.0%} of the free space); free disk space, name another "
                                "directory (disk=...) or ask for fewer snapshots")
    return p if p.snapshots + p.disk >= 1 else None


def disk_traffic(p: Plan) -> tuple[int, int]:
    """(snapshots written to disk, snapshots read back) by the actions of plan ``p``."""
    import checkpoint_schedules as cs
    writes = reads = 0
    for a in p.actions():
        if isinstance(a, cs.Forward) and a.write_ics and a.storage == cs.StorageType.DISK:
            writes += 1
        elif isinstance(a, (cs.Copy, cs.Move)) and a.from_storage == cs.StorageType.DISK:
            reads += 1
    return writes, reads


def _cheapest_disk(T: int, fp: Footprint, c_ram: int, most: int, disk: "DiskBudget") -> int:
    """Of 0 (if c_ram ≥ 1) or 1 … ``most`` disk snapshots (a geometric sample of them and
    ``most``), the count whose schedule is predicted fastest: recomputed steps +
    io_steps·(disk writes + reads), io_steps = one disk transfer in training steps
    (``disk.io_steps()``; 0 or unknown: ``most``)."""
    cost = disk.io_steps() if disk.io_steps is not None and most >= 1 else 0.0
    if not cost:
        return max(most, 0)
    tried = sorted({most, *(max(1, round(most / 2 ** (k / 2))) for k in range(1, 16))} | ({0} if c_ram else set()))
    scored = []
    for n in tried:
        p = binomial_plan(T, c_ram, fp, n)
        scored.append((p.recomputed + cost * sum(disk_traffic(p)), -n, n))
    return min(scored)[2]


def choose(T: int, fp: Footprint, limit: int | None, shown: int | None = None,
           disk: "DiskBudget | None" = None) -> Plan:
    """The schedule with the fewest recomputed steps whose estimate fits ``limit`` bytes (None:
    no limit): store everything if it fits; else every k steps with the largest k that fits
    (it recomputes T − k·… < T − 1 steps, fewer than any binomial schedule can); else binomial
    with as many snapshots as fit — with a disk tier (``disk``), topped up with snapshots on
    disk to :func:`disk_target`. :class:`MemoryBudgetError` if not even one snapshot fits (with
    a disk tier: not even the working step)."""
    stored = stored_plan(T, fp)
    if limit is None or stored.estimate <= limit:
        return stored
    best = None
    for k in range(1, T):  # every_plan's estimate is not monotone in k: look at all (cheap)
        p = every_plan(T, k, fp)
        if p.estimate <= limit and (best is None or p.recomputed < best.recomputed):
            best = p
    if best is not None:
        return best
    c = int((limit - fp.step - fp.work) // max(fp.state, 1))
    if c >= 0:
        tiered = _with_disk(T, fp, c, disk, None)
        if tiered is not None:
            return tiered
    if c >= 1:
        return binomial_plan(T, c, fp)
    raise MemoryBudgetError(_refusal(T, fp, limit, None, shown, disk is not None))


def _refusal(T: int, fp: Footprint, limit: int, asked: Plan | None, shown: int | None = None,
             has_disk: bool = False) -> str:
    """The message of a refusal: ``limit`` = the bytes estimates must fit, ``shown`` = the budget
    as the user gave it (default ``limit``)."""
    head = (f"{asked.describe()} does not fit" if asked is not None else
            "no checkpointing schedule fits") + f" the memory budget of {fmt_bytes(shown or limit)}"
    options = [stored_plan(T, fp), every_plan(T, max(1, round(math.sqrt(T))), fp), binomial_plan(T, 1, fp)]
    fitting = None
    try:
        fitting = choose(T, fp, limit) if asked is not None else None
    except MemoryBudgetError:
        pass
    lines = [f"{head} (T={T}; one training state {fmt_bytes(fp.state)}, one step's gradient graph "
             f"{fmt_bytes(fp.graph)}). Options:"]
    lines += [f"  {p.describe()}" for p in options]
    if fitting is not None:
        lines.append(f"  within the budget: {fitting.describe()} (memory=... chooses it)")
    disk = ("the disk tier holds snapshots, not the working step" if has_disk else
            "put snapshots on disk (disk=True)")
    lines.append(f"  or raise the budget (memory='4GB'), {disk}, or use mode='reversible' (SGD with momentum)")
    return "\n".join(lines)


def plan(T: int, fp: Footprint, checkpoint: Any, snapshots: Any, limit: int | None,
         disk: "DiskBudget | None" = None) -> Plan:
    """The schedule asked for (``checkpoint``: "auto" = chosen by the budget, None = store
    all, int k, "binomial" with ``snapshots``), checked against ``limit`` (bytes; the estimate
    must be ≤ limit / ALLOCATOR_SLACK). With a disk tier (``disk``) the binomial snapshots
    that do not fit in memory go to disk."""
    shown, limit = limit, None if limit is None else int(limit / ALLOCATOR_SLACK)
    if checkpoint == "auto":
        if snapshots is not None:
            raise ValueError("snapshots= needs checkpoint='binomial'")
        return choose(T, fp, limit, shown, disk)
    if checkpoint is None:
        asked = stored_plan(T, fp)
    elif checkpoint == "binomial":
        c = T if limit is None else int((limit - fp.step - fp.work) // max(fp.state, 1))
        if c >= 0:
            tiered = _with_disk(T, fp, c, disk, snapshots)
            if tiered is not None:
                return tiered
        if snapshots is None:
            if c < 1:
                raise MemoryBudgetError(_refusal(T, fp, limit, binomial_plan(T, 1, fp), shown, disk is not None))
            return binomial_plan(T, c, fp)
        asked = binomial_plan(T, snapshots, fp)
    else:
        asked = every_plan(T, checkpoint, fp)
    if limit is not None and asked.estimate > limit:
        raise MemoryBudgetError(_refusal(T, fp, limit, asked, shown, disk is not None))
    return asked


def reject_removed(removed: dict, function: str) -> None:
    """TypeError for keywords ``function`` does not take; ``checkpoint_every`` names its successor."""
    if "checkpoint_every" in removed:
        raise TypeError(f"{function}: checkpoint_every was removed; say checkpoint=k (every k steps), "
                        "checkpoint='binomial' (with snapshots=c), or memory='2GB' (the schedule "
                        "that fits)")
    if removed:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {sorted(removed)}")


def check_checkpoint(checkpoint: Any, snapshots: Any, disk: Any = None) -> None:
    """TypeError/ValueError for a bad ``disk=`` and for ``checkpoint=``/``snapshots=``/``disk=``
    that do not go together (each of ``checkpoint``, ``snapshots`` is checked by its declaration
    in :mod:`hgtoolkit.settings` before)."""
    if disk is not None and disk is not False:
        if not isinstance(disk, (bool, str, os.PathLike)) or disk == "":
            raise TypeError(f"disk must be None (no disk tier), True or 'tmp' (a temporary directory) or a "
                            f"directory, got {disk!r}")
        if checkpoint not in ("auto", "binomial"):
            raise ValueError(f"disk= holds binomial snapshots: it needs checkpoint='binomial' or 'auto', got "
                             f"checkpoint={checkpoint!r}")
    if snapshots is not None and checkpoint != "binomial":
        raise ValueError(f"snapshots= needs checkpoint='binomial', got checkpoint={checkpoint!r}")


# ----------------------------------------------------------------------------- the disk tier

@dataclass(frozen=True)
class DiskBudget:
    """Where disk snapshots go (``where``: the directory; ``directory``: None = a temporary one),
    the bytes they may take (``free``: AUTO_FRACTION of the free space there), and ``io_steps``:
    None, or a function giving the time of one snapshot's transfer (a write or a read, their
    mean) in training steps, called only when the automatic choice weighs disk snapshots
    against recomputation (:func:`measure_io`)."""

    directory: Path | None
    where: str
    free: int
    io_steps: Callable[[], float] | None = None


def measure_io(disk: DiskBudget, state: dict, step_seconds: float, device: Any = None) -> DiskBudget:
    """``disk`` whose ``io_steps`` writes ``state`` (a training state) to disk once, reads it back
    (as :class:`DiskSnapshots` does) and divides the mean time by ``step_seconds`` (one training
    step's time); measured once, on first call."""
    import time
    seen: list[float] = []

    def io_steps() -> float:
        if not seen:
            with DiskSnapshots(disk, device) as store:
                t0 = time.perf_counter()
                store.put(0, state)
                t1 = time.perf_counter()
                store.get(0, drop=True)
                t2 = time.perf_counter()
            seen.append((t2 - t0) / 2 / max(step_seconds, 1e-9))
        return seen[0]
    return dataclasses.replace(disk, io_steps=io_steps)


def disk_budget(disk: Any) -> DiskBudget | None:
    """The disk tier ``disk=`` asks for: None/False = none; True or "tmp" = a temporary
    directory (``tempfile.gettempdir()``), removed afterwards; a path = that directory (created
    if need be; the run's files, in a subdirectory of their own, are removed afterwards)."""
    if disk is None or disk is False:
        return None
    directory = None if disk is True or disk == "tmp" else Path(disk)
    probe = Path(tempfile.gettempdir()) if directory is None else directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = int(AUTO_FRACTION * shutil.disk_usage(probe).free)
    return DiskBudget(directory, str(directory or tempfile.gettempdir()), free)


class DiskSnapshots:
    """Snapshots on disk, one file per snapshot: ``records.atomic_torch_save`` (sha256-sealed)
    in a fresh subdirectory of the budget's directory, read back with ``records.load_torch``
    (verified; ``map_location`` = the run's device), so a restored state is the saved one bit for
    bit. :meth:`close` removes the subdirectory; a context manager."""

    def __init__(self, disk: DiskBudget, device: Any = None):
        base = disk.directory
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="hgtoolkit-snapshots-", dir=base))
        self.device = device
        self.files: dict[int, tuple[Path, int]] = {}
        self.peak = self.peak_bytes = self.writes = self.reads = 0

    def put(self, n: int, state: dict) -> None:
        from . import records
        path = records.atomic_torch_save(state, self.root / f"state_{n}.pt")
        self.files[n] = (path, path.stat().st_size)
        self.writes += 1
        self.peak = max(self.peak, len(self.files))
        self.peak_bytes = max(self.peak_bytes, sum(size for _, size in self.files.values()))

    def get(self, n: int, drop: bool) -> dict:
        from . import records
        path, _ = self.files[n]
        state = records.load_torch(path, f"the disk snapshot of step {n}", map_location=self.device)
        self.reads += 1
        if drop:
            del self.files[n]
            path.unlink()
        return state

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.files.clear()

    def __enter__(self) -> "DiskSnapshots":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- the interpreter

class MemorySampler:
    """Memory in use now (CPU: resident set size from /proc/self/statm; CUDA: bytes allocated),
    and the largest growth over the first reading seen by :meth:`sample`."""

    def __init__(self, device: Any = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._fd = None  # /proc/self/statm, opened once: a sample per step is one pread
        if not self.cuda:
            try:
                self._fd = os.open("/proc/self/statm", os.O_RDONLY)
                weakref.finalize(self, os.close, self._fd)
            except OSError:
                pass
        self.start = self.now()
        self.peak = 0

    def now(self) -> int | None:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        if self._fd is None:
            return None
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def sample(self) -> None:
        now = self.now()
        if now is not None and self.start is not None:
            self.peak = max(self.peak, now - self.start)


@dataclass
class RunStats:
    forward_steps: int = 0
    snapshots: int = 0
    kept_graphs: int = 0
    disk_snapshots: int = 0  #: held on disk at once
    disk_writes: int = 0
    disk_bytes: int = 0  #: the most bytes on disk at once


def materialised(state: Any) -> dict:
    """A state ``advance`` may have left as a callable (:func:`run`), computed."""
    return state() if callable(state) else state


def run(actions: Iterable, s0: dict, advance: Callable, begin_adjoint: Callable, adjoint_step: Callable,
        sampler: MemorySampler | None = None, disk: DiskSnapshots | None = None) -> RunStats:
    """Interpret a schedule's actions. ``advance(state, t, graph) -> (s_{t+1}, step)`` (step
    kept when ``graph``; s_{t+1} may be a callable that computes it: a Forward's last step
    with its graph kept, whose state a schedule mostly replaces by a restored snapshot right
    after its Reverse, is then never updated — see :func:`materialised`),
    ``begin_adjoint(s_T)`` at EndForward, ``adjoint_step(step, t)`` for t in each Reverse.
    Snapshots in memory are references to the (immutable) states; those of ``DISK`` storage go
    to ``disk``."""
    import checkpoint_schedules as cs
    n, state = 0, s0
    snaps: dict[int, dict] = {}
    DISK = cs.StorageType.DISK
    deps: dict[int, Any] = {}
    stats = RunStats()
    for a in actions:
        if isinstance(a, cs.Forward):
            if a.n0 != n:
                raise RuntimeError(f"schedule: Forward from step {a.n0} while the state is at step {n}")
            state = materialised(state)
            if a.write_ics:
                if a.storage == DISK and disk is not None:
                    disk.put(a.n0, state)
                elif a.storage == cs.StorageType.RAM:
                    snaps[a.n0] = state
                    stats.snapshots = max(stats.snapshots, len(snaps))
                else:
                    raise NotImplementedError(f"snapshot storage {a.storage!r} (disk snapshots need disk=...)")
            for t in range(a.n0, a.n1):
                state, step = advance(materialised(state), t, a.write_adj_deps)
                if a.write_adj_deps:
                    deps[t] = step
                if sampler is not None:
                    sampler.sample()
            stats.forward_steps += a.n1 - a.n0
            stats.kept_graphs = max(stats.kept_graphs, len(deps))
            n = a.n1
        elif isinstance(a, cs.EndForward):
            state = materialised(state)
            begin_adjoint(state)
        elif isinstance(a, cs.Reverse):
            for t in range(a.n1 - 1, a.n0 - 1, -1):
                adjoint_step(deps.pop(t) if a.clear_adj_deps else deps[t], t)
                if sampler is not None:
                    sampler.sample()
        elif isinstance(a, (cs.Copy, cs.Move)):
            if a.to_storage != cs.StorageType.WORK or a.from_storage not in (cs.StorageType.RAM, DISK):
                raise NotImplementedError(f"{a!r}: snapshots are restored from RAM or disk into the work state")
            move = isinstance(a, cs.Move)
            if a.from_storage == DISK:
                if disk is None:
                    raise NotImplementedError(f"{a!r}: disk snapshots need disk=...")
                n, state = a.n, disk.get(a.n, drop=move)
            else:
                n, state = a.n, (snaps.pop(a.n) if move else snaps[a.n])
        elif isinstance(a, cs.EndReverse):
            break
        else:
            raise NotImplementedError(f"schedule action {a!r}")
    if disk is not None:
        stats.disk_snapshots, stats.disk_writes, stats.disk_bytes = disk.peak, disk.writes, disk.peak_bytes
    return stats
