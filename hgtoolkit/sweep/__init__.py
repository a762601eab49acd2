r"""Sweeps: a grid of runs expanded into cells, run locally or on a Ray cluster, with every
result streamed to a resumable directory.

A study in this field is a grid — methods × β × μ × η₀ × seeds, plus LRS-OPT per seed. A
:class:`Grid` names a problem, a cell *kind* and the values to sweep::

    grid = Grid("beale_fig1", problem={"name": "beale"}, kind="online",
                axes={"method": ["hd", "rtho"], "hypergrad_lr": [1e-7, 1e-6, 1e-5]},
                fixed={"lr": 1e-3, "steps": 500})
    report = sweep.run(grid, "results/beale_fig1")                  # in-process
    report = sweep.run(grid, "results/beale_fig1", executor="ray")  # local Ray, or address=…
    print(sweep.summary_table("results/beale_fig1"))

``grid.cells()`` is the Cartesian product of the axes (in the order written) merged over
``fixed``; each :class:`Cell` is one run with a stable id, the first 12 hex digits of the SHA-1
of the canonical JSON of (kind, kind version, problem section, the cell's *written* params):
the same settings give the same id in any process and Python version. Defaults that a grid
leaves out are not part of the id (so adding a new option to a method does not invalidate
stored sweeps); each record keeps the full configuration the run resolved to. A kind's
``version`` is bumped when its meaning changes, which gives all its cells new ids.

Cell kinds (:data:`CELL_KINDS`; add your own with :func:`register_cell_kind`):

- ``"online"``: ``hgtoolkit.online.run(problem, **params)`` (HD / RTHO / MARTHE);
- ``"lrsopt"``: ``hgtoolkit.lrsopt.optimize_schedule`` from the constant schedule η_t = ``lr``,
  checkpointed in the store so that a killed LRS-OPT cell resumes mid-run;
- ``"train"``: constant-LR training (``hgtoolkit.trajectory.train``), final value E(w_T);
- ``"hypergrad"``: the exact ∇f(η) of a constant schedule (``hgtoolkit.exact.hypergradient``).

The grid's ``problem`` section is ``{"name": …, **kwargs}`` for ``hgtoolkit.problems.get``
(a built-in name or ``"module:function"``, a function of yours returning a ``Problem``, importable
where the cells run; ``dtype`` may be written ``"float32"``/``"float64"``). A kind's settings and
their checks are those of :mod:`hgtoolkit.settings`. A cell's ``seed`` becomes the problem's
``seed`` (initial weights and minibatch order) when the problem takes one and the section does
not fix it, and is passed on to the run (online: minibatch order; LRS-OPT: the resampled orders).

Validation happens before any work: an unknown kind, key, method or problem, a negative β, μ
outside [0, 1], an empty or non-list axis, repeated axis values, … raise ``ValueError`` naming
the key (``axes.hypergrad_lr[1]``, ``fixed.mu``, ``problem.name``); every expanded cell is also checked
as a whole (e.g. ``mu`` with ``method: hd``) by the kind's ``check``.

The store (:class:`Store`), one directory per sweep::

    results_dir/manifest.json          every grid ever run into this directory
    results_dir/cells/<id>.json        one record per finished cell (written last: the commit mark)
    results_dir/cells/<id>.npz         its arrays (schedules, losses, …), written first
    results_dir/errors/<id>.json       a cell that raised (not finished: a re-run retries it)
    results_dir/checkpoints/<id>.*     in-flight LRS-OPT state (deleted when the cell finishes)
    results_dir/events.jsonl           start / finish / error events, with host, pid and time
    results_dir/driver.lock            the lease of the driver working on it (host, pid, token)

Every file is written atomically (temporary file + rename), so a reader, a re-run or a crash
never sees half a record. ``run`` skips cells whose record exists, so a killed sweep resumes
and nothing is computed twice: the driver checks before dispatching and every worker checks
again just before starting a cell. :func:`load_results` and :func:`summary_table` read the
directory only, never memory.

One driver at a time: :func:`run` takes a lease on the directory (``driver.lock``, refreshed
every 10 s); a second driver waits ``lock_timeout`` seconds and then raises
:class:`StoreLockedError` saying who holds it; the lease of a dead driver is taken over. Tasks
check the lease before each cell and before storing a record, so the tasks of a cancelled or
dead driver store nothing, and a task that does not find the lease file (a node that does not
share the filesystem) returns its records to the driver instead of writing them where the
driver cannot see them. Each record carries the lease token (``meta.run``):
``SweepReport.computed`` lists only this driver's cells.

Batch groups: online cells that differ only in (seed, β) form groups, cut in grid order into
pieces of at most ``batch`` cells (:func:`batch_groups`). The groups depend on the grid alone —
not on the executor, the chunk size or what is already stored (a group always runs whole) — so
a cell's numbers are the same however the sweep runs. When the cell kind has a ``run_batch``
(the online kind: ``hgtoolkit.batched.run_online_batch(problem_factory, cells)``, the vmap-batched runner), a group of ≥ 2
cells is handed to it — ``problem_factory(seed)`` builds the problem for a seed, ``cells`` are
:class:`Cell` objects, and it returns one ``OnlineResult`` (or :class:`CellOutput`) per cell, in
order; a group's records are stored as soon as the group finishes. ``batch=False`` runs every
cell alone.

Executors:

- ``"local"`` (default): in-process, group after group.
- ``"processes"``: a pool of ``num_cpus`` local processes (default one per core, "spawn"),
  one task per batch group, most expensive first; each task stores its records itself, as a
  Ray task does (no Ray needed; what the ``reproduce`` experiments use).
- ``"ray"``: a new local Ray (``ray.init("local", num_cpus=…)``) unless Ray is already
  initialised in this process (then it is used as it is) or ``address``
  (``"auto"`` for a cluster started with ``ray start``, ``"ray://host:10001"`` for Ray Client)
  is given. Batch groups are packed into chunks of about ``chunk_size`` cells (default ≈ cells /
  (4 × CPUs); a group is never split), the most expensive first (longest-processing-time order
  shortens the tail); each chunk is one ``@ray.remote(max_retries=3, retry_exceptions=False)``
  task that writes each record to the store itself as soon as its cell (or group) finishes. A
  killed worker loses only its in-flight cell or group: Ray re-runs the task, which skips the
  cells already stored; a task that fails ``max_retries + 1`` times is written to
  ``errors/<id>.json`` for each of its unstored cells. ``num_gpus`` per task defaults to 1
  when the problem asks for ``device: cuda`` and the cluster has GPUs, else 0. With
  ``worker_writes=False`` (a cluster without a shared filesystem, or a driver connected from
  outside through Ray Client — the default for ``ray://`` addresses) tasks return their
  records and the driver writes them (a killed worker then loses its whole task). Interrupting
  the driver cancels the outstanding tasks and returns only once Ray reports each of them
  ended (a KeyboardInterrupt first, a kill of the worker after 10 s).

Determinism: every cell runs with ``torch.set_num_threads(threads_per_cell)`` (default 1; a
Ray task reserves that many CPUs) and ``torch.manual_seed(seed)``, so a cell gives
bit-identical numbers in-process and in a Ray worker on the same machine (compare with
:func:`records_equal`, which ignores timings, host and pid); other hardware or library
versions may differ in the last bits. Batched runs (the hook above) are equal to one-by-one
runs only up to rounding, which is why the batch groups are fixed by the grid.
"""
from .grid import (CELL_KINDS, EXECUTORS, Cell, CellContext, CellKind, CellOutput, Grid,  # noqa: F401
                   SEED_SPEC, FLAG_SPEC, build_problem, canonical_json, load_grids, problem_kwargs,
                   register_cell_kind)
from .store import Store, StoreLockedError  # noqa: F401
from .executors import (BATCH_MAX, SweepReport, LeaseLost, ray_chunk, Runner,  # noqa: F401
                        unique_cells, batch_groups, run)
from .results import load_results, records_equal, summary_table, to_result  # noqa: F401
from . import kinds as _kinds  # noqa: F401,E402 - registers the built-in cell kinds
from .kinds import lrsopt_output, online_output, record_output, record_result  # noqa: F401,E402

__all__ = ["Grid", "Cell", "CellKind", "CellOutput", "CELL_KINDS", "register_cell_kind",
           "load_grids", "run", "SweepReport", "Store", "StoreLockedError", "load_results",
           "summary_table", "records_equal", "to_result", "EXECUTORS", "BATCH_MAX", "online_output",
           "lrsopt_output", "record_output", "record_result"]
