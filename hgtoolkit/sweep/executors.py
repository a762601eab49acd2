"""Running cells: the in-process runner, batch groups, the Ray driver and :func:`run`."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
import traceback
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .. import records
from ..errors import DivergenceError
from .grid import CELL_KINDS, Cell, CellContext, CellKind, CellOutput, EXECUTORS, Grid, OUTPUT_CONVERTERS, RECORD_FORMAT, as_grids, build_problem
from .store import Store, HEARTBEAT_S, utc_now, read_json_named


# ============================================================================ running cells

def _versions() -> dict:
    from .. import __version__
    return {"hgtoolkit": __version__, "torch": torch.__version__, "numpy": np.__version__}


@contextlib.contextmanager
def _cell_environment(threads: int, seed: int):
    """Fixed thread count and global seed for the cell; warnings captured for the record."""
    old_threads = torch.get_num_threads()
    old_rng = torch.random.get_rng_state()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.set_num_threads(old_threads)
        torch.random.set_rng_state(old_rng)


def _record(cell: Cell, out: CellOutput, meta: dict) -> tuple[dict, dict, dict]:
    """(record JSON, arrays, timing arrays) for the store."""
    arrays = {k: np.asarray(v) for k, v in out.arrays.items() if v is not None}
    timing_scalars, timing_arrays = {}, {}
    for k, v in out.timing.items():
        if isinstance(v, (np.ndarray, torch.Tensor, list, tuple)):
            timing_arrays[k] = np.asarray(v)
        else:
            timing_scalars[k] = v
    rec = {"format": RECORD_FORMAT, "id": cell.id, **cell.to_dict(), "status": out.status,
           "result": records.to_jsonable(out.result), "arrays": sorted(arrays),
           "meta": {**meta, "timing": timing_scalars, "timing_arrays": sorted(timing_arrays)}}
    return rec, arrays, timing_arrays


def _warning_texts(caught) -> list[str]:
    seen = []
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in seen:
            seen.append(text)
    return seen[:20]


def _divergence_output(exc: DivergenceError) -> CellOutput:
    return CellOutput({"diverged_at": exc.step, "divergence": str(exc)}, status="diverged")


def _as_output(kind: CellKind, obj: Any) -> CellOutput:
    if isinstance(obj, CellOutput):
        return obj
    convert = OUTPUT_CONVERTERS.get(kind.name)
    if convert is None:
        raise TypeError(f"the {kind.name!r} runner returned {type(obj).__name__}, not a CellOutput")
    return convert(obj)


class LeaseLost(RuntimeError):
    """The driver that started this task no longer holds the results directory."""


class Runner:
    """Runs cells into a store: one process's worth of the sweep (local executor or a Ray task).

    ``token``: the driver's lease; with ``write`` the runner checks it before each cell and
    before storing a record, so that a task whose driver was cancelled (or died, and another
    driver took over) stores nothing."""

    def __init__(self, store: Store, executor: str, threads: int, write: bool,
                 token: str | None = None):
        self.store, self.executor, self.threads, self.write = store, executor, threads, write
        self.token = token
        self.payloads: list = []  # (record, arrays, timing) when the driver writes

    def _check_lease(self) -> None:
        if self.write and self.token is not None and not self.store.holds(self.token):
            raise LeaseLost(f"the driver's lease on {self.store.root} is gone (cancelled, or "
                             "another driver took over): stopping without storing anything")

    def _meta(self, t0: float, caught, problem=None) -> dict:
        meta = {"executor": self.executor, "host": socket.gethostname(), "pid": os.getpid(),
                "run": self.token, "finished": utc_now(), "wall_time": time.perf_counter() - t0,
                "warnings": _warning_texts(caught), "versions": _versions()}
        info = getattr(problem, "info", None) or {}
        if "data" in info:  # where the data came from (the MNIST fallback says so)
            meta["data"] = info["data"]
            meta["fallback_data"] = bool(info.get("is_fallback", False))
        return meta

    def _finish(self, cell: Cell, out: CellOutput, meta: dict) -> None:
        rec, arrays, timing = _record(cell, out, meta)
        rec["meta"]["timing"].setdefault("wall_time", meta["wall_time"])
        if self.write:
            self._check_lease()
            self.store.write(rec, arrays, timing)
            self.store.clear_checkpoint(cell.id)
            self.store.log("finish", cell.id, status=out.status, wall_time=meta["wall_time"])
        else:
            self.payloads.append((rec, arrays, timing))

    def _fail(self, cell: Cell, t0: float, caught) -> str:
        error = traceback.format_exc(limit=20)
        meta = self._meta(t0, caught)
        if self.write:
            self._check_lease()
            self.store.write_error(cell, error, meta)
            self.store.log("error", cell.id, error=error.strip().splitlines()[-1])
        else:
            self.payloads.append(({"id": cell.id, "error": error, **cell.to_dict(), "meta": meta}, None, None))
        return error

    def run_cell(self, cell: Cell) -> str:
        """``"existing"`` (already stored: skipped), ``"computed"`` or ``"error"``."""
        if self.write and self.store.has(cell.id):
            return "existing"
        self._check_lease()
        kind = CELL_KINDS[cell.kind]
        if self.write:
            self.store.log("start", cell.id, executor=self.executor)
        t0, problem = time.perf_counter(), None
        with _cell_environment(self.threads, cell.seed) as caught:
            try:
                factory = lambda seed: build_problem(cell.problem, seed)
                ctx = CellContext(self.store.checkpoint(cell.id) if self.write else None, factory, cell.id,
                                  self.store if self.write else None)
                problem = factory(cell.seed)
                try:
                    out = _as_output(kind, kind.run(problem, dict(cell.params), ctx))
                except DivergenceError as exc:
                    out = _divergence_output(exc)
            except Exception:  # recorded in errors/<id>.json; a re-run retries the cell
                self._fail(cell, t0, caught)
                return "error"
        self._finish(cell, out, self._meta(t0, caught, problem))
        return "computed"

    def run_batch(self, fn: Callable, group: list[Cell]) -> list[str]:
        """A batch group (fixed by the grid, :func:`batch_groups`) through the batched runner.
        The whole group always runs, so that a cell's numbers never depend on which of its
        group-mates were stored before; only the missing cells are stored."""
        todo = [c for c in group if not (self.write and self.store.has(c.id))]
        if not todo:
            return ["existing"] * len(group)
        self._check_lease()
        kind, first = CELL_KINDS[group[0].kind], group[0]
        for c in todo:
            if self.write:
                self.store.log("start", c.id, executor=self.executor, batched=len(group))
        t0, failure, problem = time.perf_counter(), None, None
        with _cell_environment(self.threads, first.seed) as caught:
            try:
                factory = lambda seed: build_problem(first.problem, seed)
                problem = factory(first.seed)
                outs = fn(factory, group)
                outs = [_as_output(kind, o) for o in outs]
                if len(outs) != len(group):
                    raise RuntimeError(f"run_batch returned {len(outs)} results for {len(group)} cells")
            except Exception:
                failure = traceback.format_exc(limit=1).strip().splitlines()[-1]
        if failure is not None:  # fall back to one by one
            warnings.warn(f"the batched runner of kind {first.kind!r} failed ({failure}); running the "
                          f"{len(group)} cells one by one", RuntimeWarning, stacklevel=2)
            return [self.run_cell(c) for c in group]
        meta = self._meta(t0, caught, problem)
        meta["batched"] = len(group)
        for c, o in zip(group, outs):
            if c in todo:
                self._finish(c, o, meta)
        return ["computed" if c in todo else "existing" for c in group]

    def run_groups(self, groups: Sequence[Sequence[Cell]],
                   on_done: Callable[[Cell, str], None] | None = None) -> dict[str, str]:
        """Run batch groups (lists of cells; a group of one runs unbatched), storing each
        cell's record as soon as it (or its group) finishes."""
        status: dict[str, str] = {}
        for group in groups:
            fn = CELL_KINDS[group[0].kind].run_batch
            results = self.run_batch(fn, list(group)) if len(group) > 1 else [self.run_cell(group[0])]
            for c, s in zip(group, results):
                status[c.id] = s
                if on_done is not None:
                    on_done(c, s)
        return status


BATCH_MAX = 32  # cells per batch group (``batch=True``)


def batch_groups(cells: Sequence[Cell], batch: bool | int = True) -> list[list[Cell]]:
    """The batch groups of ``cells`` (all cells of the grids, in grid order): online cells that
    differ only in (seed, β), cut in grid order into pieces of at most ``batch`` cells
    (``True``: :data:`BATCH_MAX`; ``False``/1, or a kind without ``run_batch``: every cell alone). The
    groups depend on the grid only — never on the executor, the chunk size or what is stored —
    so a cell's numbers are the same however the sweep is run."""
    size = BATCH_MAX if batch is True else int(batch or 1)
    if size < 2:
        return [[c] for c in cells]
    keyed: "OrderedDict[str, list[Cell]]" = OrderedDict()
    for c in cells:
        keyed.setdefault(c.batch_key() if CELL_KINDS[c.kind].run_batch is not None else c.id, []).append(c)
    return [g[i:i + size] for g in keyed.values() for i in range(0, len(g), size)]


def ray_chunk(groups: list[list[dict]], root: str, threads: int, write: bool, token: str,
               kind_modules: list[str], executor: str = "ray") -> list:
    """One Ray (or process-pool) task: run a chunk of batch groups, storing each record as it finishes.
    Returns [status, payloads, info]: when this node cannot see the driver's lease in
    ``root`` (no shared filesystem) the records come back as payloads for the driver."""
    import importlib
    for m in kind_modules:  # kinds registered by other modules (e.g. tests) exist here too
        importlib.import_module(m)
    store = Store(root)
    sees = store.holds(token)
    runner = Runner(store, executor, threads, write and sees, token if sees else None)
    status = runner.run_groups([[Cell.from_dict(c) for c in g] for g in groups])
    return [status, runner.payloads, {"host": socket.gethostname(), "sees_store": sees}]


# ============================================================================ the driver

@dataclass
class SweepReport:
    """What one call of :func:`run` did. ``existing``: cells already stored (skipped);
    ``computed``: cells finished by this call (this driver's own records); ``failed``: id →
    error (not stored; a re-run retries them); ``missing``: cells neither stored nor failed
    (interrupted); ``notes``: things to know about the results (fallback data, workers that
    could not see the results directory)."""

    results_dir: Path
    executor: str
    total: int
    existing: list = field(default_factory=list)
    computed: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)
    wall_time: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def missing(self) -> int:
        return self.total - len(self.existing) - len(self.computed) - len(self.failed)

    @property
    def ok(self) -> bool:
        return not self.failed and self.missing == 0

    def __str__(self) -> str:
        rate = len(self.computed) / self.wall_time if self.wall_time > 0 else math.nan
        text = (f"sweep {self.results_dir}: {self.total} cells — {len(self.existing)} already done, "
                f"{len(self.computed)} computed ({rate:.3g} cells/s, {self.executor}), "
                f"{len(self.failed)} failed, {self.missing} missing; {self.wall_time:.1f} s")
        return "\n".join([text] + [f"  note: {n}" for n in self.notes])


def unique_cells(grids: Sequence[Grid]) -> list[Cell]:
    seen, cells = set(), []
    for g in grids:
        for c in g.cells():
            if c.id not in seen:
                seen.add(c.id)
                cells.append(c)
    return cells


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int ≥ {lo}, got {value!r}")


def run(grids: "Grid | Sequence[Grid] | str | os.PathLike | dict", results_dir: str | os.PathLike, *,
        executor: str = "local", address: str | None = None, num_cpus: int | None = None,
        num_gpus: float | None = None, chunk_size: int | None = None, threads_per_cell: int = 1,
        max_retries: int = 3, runtime_env: dict | None = None, worker_writes: bool | None = None,
        batch: bool | int = True, lock_timeout: float = 0.0, progress: bool = True,
        callback: Callable[[int, int], Any] | None = None) -> SweepReport:
    """Run every cell of ``grids`` not yet in ``results_dir``; return a :class:`SweepReport`.

    ``executor``: ``"local"`` (in-process), ``"processes"`` (a pool of ``num_cpus`` local
    processes, default one per core; each batch group is one task that stores its own
    records) or ``"ray"``. For Ray (module docstring):
    ``address`` (None: a local Ray with ``num_cpus`` CPUs, unless Ray is already initialised,
    in which case it is used as it is), ``num_gpus`` and ``max_retries`` per task,
    ``chunk_size`` cells per task (a batch group is never split), ``runtime_env`` for
    ``ray.init``; ``worker_writes``: workers write records into ``results_dir`` (a path they
    must see: local Ray, or a filesystem shared by the cluster — a worker that does not see the
    driver's lease file there sends its records back instead), or with False always return
    them for the driver to write; default False for a ``ray://`` (Ray Client) address, else True.
    ``threads_per_cell``: torch threads inside a cell (1: deterministic across executors).
    ``batch``: batch groups of at most this many cells (True: :data:`BATCH_MAX`) go through
    their kind's ``run_batch`` (online: ``hgtoolkit.batched``); False: every cell alone.
    ``lock_timeout``: seconds to wait while another driver holds ``results_dir`` before
    raising :class:`StoreLockedError` (default 0: say so at once).
    ``callback(done, total)`` is called by the driver whenever cells finish
    (an exception raised there interrupts the sweep like Ctrl-C does). Errors inside a cell
    do not stop the sweep: they are stored in ``errors/`` and reported in ``report.failed``.
    """
    grids = as_grids(grids)
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {EXECUTORS}")
    _check_int("threads_per_cell", threads_per_cell, 1)
    if executor != "ray" and (address is not None or num_gpus):
        raise ValueError("address and num_gpus are for executor='ray'")
    if num_cpus is not None:
        _check_int("num_cpus", num_cpus, 1)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)
    _check_int("max_retries", max_retries, 0)
    if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or num_gpus < 0):
        raise ValueError(f"num_gpus must be a number ≥ 0, got {num_gpus!r}")
    if not isinstance(batch, bool):
        _check_int("batch", batch, 1)
    if isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float)) or not lock_timeout >= 0:
        raise ValueError(f"lock_timeout must be a number of seconds ≥ 0, got {lock_timeout!r}")

    if executor == "ray":
        import importlib.util
        if importlib.util.find_spec("ray") is None:
            raise ModuleNotFoundError("executor='ray' needs Ray: pip install 'hgtoolkit[ray]'")
    if worker_writes is None:
        worker_writes = not (isinstance(address, str) and address.startswith("ray://"))
    if os.path.exists(results_dir) and not os.path.isdir(results_dir):
        raise ValueError(f"results_dir {os.fspath(results_dir)!r} is a file; expected a directory (new or "
                         "holding earlier results of these grids)")
    store = Store(results_dir)
    token = uuid.uuid4().hex
    store.acquire(token, lock_timeout)
    beat = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, token, beat), daemon=True).start()
    try:
        store.add_grids(grids)
        cells = unique_cells(grids)
        groups = batch_groups(cells, batch)
        done = store.done()
        report = SweepReport(store.root, executor, len(cells),
                             existing=[c.id for c in cells if c.id in done])
        pending = [g for g in groups if any(c.id not in done for c in g)]
        t0 = time.perf_counter()
        from ..trajectory import progress_bar
        bar = progress_bar(None, progress, total=len(cells), initial=len(report.existing), unit="cell",
                           desc=f"sweep {grids[0].name}" + (f" +{len(grids) - 1}" if len(grids) > 1 else ""))
        try:
            if pending:
                if executor == "local":
                    _run_local(pending, store, report, bar, threads_per_cell, callback, token)
                elif executor == "processes":
                    _run_processes(pending, store, report, bar, threads_per_cell, callback, num_cpus, token)
                else:
                    _run_ray(pending, store, report, bar, threads_per_cell, callback, address,
                             num_cpus, num_gpus, chunk_size, max_retries, runtime_env, worker_writes, token)
        finally:
            report.wall_time = time.perf_counter() - t0
            if hasattr(bar, "close"):
                bar.close()
        report.notes += _data_notes(store, cells)
    finally:
        beat.set()
        store.release(token)
    return report


def _heartbeat(store: Store, token: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        store.heartbeat(token)


def _data_notes(store: Store, cells: Sequence[Cell]) -> list[str]:
    """A note when stored cells of this sweep ran on fallback data (e.g. the 5000-digit MNIST)."""
    sources: Counter = Counter()
    for c in cells:
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = read_json_named(store.record_path(c.id), "a record").get("meta", {})
            if meta.get("fallback_data"):
                sources[str(meta.get("data"))] += 1
    return [f"{n} of {len(cells)} cells ran on fallback data: {src} — not comparable with "
            "results on the full data set" for src, n in sources.items()]


def _run_local(pending, store, report, bar, threads, callback, token) -> None:
    runner = Runner(store, "local", threads, True, token)
    total, done0 = report.total, len(report.existing)

    def on_done(cell: Cell, status: str) -> None:
        if status == "computed":
            report.computed.append(cell.id)
        elif status == "error":
            report.failed[cell.id] = store.error(cell.id)
        elif status == "existing" and cell.id not in report.existing:  # stored meanwhile
            report.existing.append(cell.id)
        if hasattr(bar, "update"):
            bar.update(1)
        if callback is not None:
            callback(done0 + len(report.computed) + len(report.failed), total)

    runner.run_groups(pending, on_done)


def _run_processes(pending, store, report, bar, threads, callback, workers, token) -> None:
    """``executor="processes"``: the batch groups as tasks of a pool of ``workers`` processes
    (default: the CPU cores of this process; started with "spawn", safe with torch), the most
    expensive first; each task runs :func:`ray_chunk` on one group, which writes its records
    into the store as Ray tasks do. One process, or one pending group: in-process."""
    if workers is None:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), len(pending)))
    if workers == 1:
        return _run_local(pending, store, report, bar, threads, callback, token)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    modules = sorted({CELL_KINDS[c.kind].run.__module__ for g in pending for c in g})
    root, total, done0 = str(store.root.resolve()), report.total, len(report.existing)
    ordered = sorted(pending, key=_cost, reverse=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(ray_chunk, [[c.to_dict() for c in g]], root, threads, True, token,
                               modules, "processes"): g for g in ordered}
        try:
            for fut in as_completed(futures):
                group = futures[fut]
                try:
                    status = fut.result()[0]
                except Exception as exc:  # the worker process died or the task could not start
                    status = {c.id: "error" for c in group if not store.has(c.id)}
                    meta = {"executor": "processes", "host": socket.gethostname(), "pid": os.getpid(),
                            "run": token, "finished": utc_now(), "task_failed": True}
                    for c in group:
                        if c.id in status:
                            store.write_error(c, f"{type(exc).__name__}: {exc}", meta)
                for c in group:
                    s = status.get(c.id, "existing")
                    if s == "computed":
                        report.computed.append(c.id)
                    elif s == "error":
                        report.failed[c.id] = store.error(c.id)
                    elif c.id not in report.existing:
                        report.existing.append(c.id)
                    if hasattr(bar, "update"):
                        bar.update(1)
                if callback is not None:
                    callback(done0 + len(report.computed) + len(report.failed), total)
        except BaseException:  # Ctrl-C or a callback: drop the queued tasks, wait for the running
            for f in futures:
                f.cancel()
            raise


def _cost(group: Sequence[Cell]) -> float:
    return sum(CELL_KINDS[c.kind].cost(c.params) for c in group)


def _chunks(groups: list[list[Cell]], chunk_size: int) -> list[list[list[Cell]]]:
    """Batch groups packed into tasks of about ``chunk_size`` cells (a group is never split),
    the most expensive cells first (longest processing time first shortens the tail)."""
    ordered = sorted(groups, key=lambda g: _cost(g) / len(g), reverse=True)
    chunks: list[list[list[Cell]]] = []
    size = chunk_size + 1
    for g in ordered:
        if size + len(g) > chunk_size:
            chunks.append([])
            size = 0
        chunks[-1].append(g)
        size += len(g)
    return chunks


_REMOTE = None


def _remote_chunk():
    global _REMOTE
    if _REMOTE is None:
        import ray
        _REMOTE = ray.remote(max_retries=3, retry_exceptions=False, num_cpus=1)(ray_chunk)
    return _REMOTE


def _own_records(store: Store, ids: Iterable[str], token: str) -> list[str]:
    """Those of ``ids`` whose stored record was written under this driver's lease."""
    done, out = store.done(), []
    for cid in ids:
        if cid in done:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if read_json_named(store.record_path(cid), "a record").get("meta", {}).get("run") == token:
                    out.append(cid)
    return out


def _run_ray(pending, store, report, bar, threads, callback, address, num_cpus, num_gpus,
             chunk_size, max_retries, runtime_env, worker_writes, token) -> None:
    try:
        import ray
    except ModuleNotFoundError:
        raise ModuleNotFoundError("executor='ray' needs Ray: pip install 'hgtoolkit[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": address, "runtime_env": runtime_env,
                              "logging_level": logging.WARNING}
        if address is None:  # a new local Ray, even if a cluster runs on this machine
            kw.update(address="local", num_cpus=num_cpus, include_dashboard=False)
        ray.init(**kw)
        started_here = True
    pending_cells = [c for g in pending for c in g]
    pending_ids = {c.id for c in pending_cells}
    try:
        cpus = max(int(ray.cluster_resources().get("CPU", 1)), 1)
        if num_gpus is None:
            wants_cuda = any(str(c.problem.get("device", "cpu")).startswith("cuda") for c in pending_cells)
            num_gpus = 1 if wants_cuda and ray.cluster_resources().get("GPU", 0) > 0 else 0
        size = chunk_size or max(1, math.ceil(len(pending_cells) / (4 * max(cpus // threads, 1))))
        task = _remote_chunk().options(max_retries=max_retries, num_gpus=num_gpus, num_cpus=threads)
        modules = sorted({CELL_KINDS[c.kind].run.__module__ for c in pending_cells})
        refs = {task.remote([[c.to_dict() for c in g] for g in chunk], str(store.root.resolve()),
                            threads, worker_writes, token, modules): [c for g in chunk for c in g]
                for chunk in _chunks(pending, size)}
        total, done0 = report.total, len(report.existing)
        seen: set[str] = set()
        blind: set[str] = set()

        def account(newly: Iterable[str]) -> None:
            fresh = [i for i in newly if i not in seen]
            if not fresh:
                return
            seen.update(fresh)
            if hasattr(bar, "update"):
                bar.update(len(fresh))
            if callback is not None:
                callback(done0 + len(seen), total)

        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.25)
                for ref in ready:
                    chunk = refs.pop(ref)
                    try:
                        status, payloads, info = ray.get(ref)
                    except Exception as exc:  # the task failed max_retries + 1 times
                        msg = f"{type(exc).__name__}: {exc}".strip()
                        status, payloads, info = {c.id: "error" for c in chunk if not store.has(c.id)}, [], {}
                        meta = {"executor": "ray", "host": socket.gethostname(), "pid": os.getpid(),
                                "run": token, "finished": utc_now(), "task_failed": True}
                        for c in chunk:
                            if c.id in status:
                                store.write_error(c, msg, meta)  # where the CLI says it is
                                report.failed[c.id] = msg
                    if info and not info.get("sees_store") and worker_writes:
                        blind.add(str(info.get("host")))
                    for rec, arrays, timing in payloads:  # the driver writes
                        if arrays is None:
                            store.write_error(Cell.from_dict(rec), rec["error"], rec["meta"])
                        elif not store.has(rec["id"]):
                            rec["meta"]["run"] = token
                            store.write(rec, arrays, timing)
                            store.log("finish", rec["id"], status=rec["status"], via="driver")
                    for cid, s in status.items():
                        if s == "error" and cid not in report.failed:
                            report.failed[cid] = store.error(cid)
                    account(cid for cid, s in status.items() if s != "error")
                account(store.done() & pending_ids)
        except BaseException:  # Ctrl-C or a callback: stop every task before handing back, so
            _cancel(ray, list(refs))  # that none writes a record behind a re-run's back
            raise
        finally:
            report.computed.extend(_own_records(store, (c.id for c in pending_cells), token))
            own, stored, known = set(report.computed), store.done(), set(report.existing)
            report.existing.extend(c.id for c in pending_cells  # stored by another driver meanwhile
                                   if c.id in stored and c.id not in own and c.id not in known)
            for cid in list(report.failed):
                if cid in own:
                    del report.failed[cid]
            if blind:
                report.notes.append(
                    f"Ray workers on {sorted(blind)} cannot see {store.root} (no shared filesystem): "
                    "their records were sent back to the driver and stored here")
    finally:
        if started_here:
            ray.shutdown()


def _cancel(ray, refs: list, grace: float = 10.0, confirm: float = 120.0) -> None:
    """Cancel tasks and return only once each is confirmed ended: a KeyboardInterrupt in the
    running ones (their workers survive), then after ``grace`` seconds a kill of the workers
    still running; then wait for Ray to report every task finished, cancelled or dead."""
    if not refs:
        return
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref)
    left = _wait_ended(ray, refs, grace)
    for ref in left:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    left = _wait_ended(ray, left, confirm)
    if left:
        warnings.warn(f"{len(left)} cancelled Ray task(s) not confirmed dead after {confirm:.0f} s; "
                      "they cannot store records (the lease is released) but may still run",
                      RuntimeWarning, stacklevel=3)


def _wait_ended(ray, refs: list, timeout: float) -> list:
    """The refs still unresolved after ``timeout`` seconds (a cancelled or killed task's ref
    resolves, with an error, once Ray knows the task stopped)."""
    deadline = time.monotonic() + timeout
    left = list(refs)
    while left and time.monotonic() < deadline:
        try:
            _, left = ray.wait(left, num_returns=len(left), timeout=min(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a ref of a dead task can make wait raise; poll again
            time.sleep(0.1)
    return left
