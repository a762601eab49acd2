"""``python -m hgtoolkit sweep grid.yaml [--executor ray] [--address …]``: run a grid of cells
into a resumable results directory (``hgtoolkit.sweep``), then write ``summary.md`` there.

Re-running the same command skips finished cells, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import args as cli_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a grid (YAML/JSON) of online / LRS-OPT / … runs, locally or on Ray",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid file (.yaml/.yml/.json)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: in-process (default); ray: Ray tasks (local Ray unless --address)")
    p.add_argument("--address", default=None,
                   help="Ray cluster: 'auto' (after `ray start`), 'ray://head:10001' (Ray Client)")
    p.add_argument("--out", default="results", help="parent directory (default: results/)")
    p.add_argument("--results-dir", default=None,
                   help="the sweep's directory (default: <out>/<grid name>)")
    p.add_argument("--num-cpus", type=cli_args.positive_int, default=None, help="CPUs of a local Ray (default: all)")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per Ray task (default: 1 if the problem asks for cuda and the cluster has GPUs)")
    p.add_argument("--chunk-size", type=cli_args.positive_int, default=None,
                   help="cells per Ray task (default: about cells / (4 × CPUs))")
    p.add_argument("--threads", type=cli_args.positive_int, default=1,
                   help="torch threads inside a cell (default 1: identical numbers on every executor)")
    p.add_argument("--max-retries", type=cli_args.non_negative_int, default=3, help="Ray retries of a task whose worker died")
    p.add_argument("--ship-code", action="store_true",
                   help="upload this hgtoolkit to the Ray workers (runtime_env py_modules)")
    p.add_argument("--driver-writes", action="store_true", default=None,
                   help="workers return records and the driver writes them (no shared filesystem; "
                        "the default with a ray:// address)")
    p.add_argument("--no-batch", action="store_true", help="do not use hgtoolkit.batched")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long while another driver holds the results directory (default: "
                        "stop at once and say who holds it)")
    cli_args.add_progress(p)
    p.add_argument("--dry-run", action="store_true", help="validate, count cells and stop")
    p.add_argument("--summary-only", action="store_true", help="print the summary of the directory and stop")
    p.set_defaults(func=_main)


def _default_dir(out: str, grids) -> Path:
    name = re.split(r"[/\[]", grids[0].name)[0] or "sweep"
    return Path(out) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _main(args) -> int:
    from .. import records, sweep

    grids = sweep.load_grids(args.grid)  # validation: nothing runs on a malformed grid
    results_dir = Path(args.results_dir) if args.results_dir else _default_dir(args.out, grids)
    cells = sweep.unique_cells(grids)
    done = sweep.Store(results_dir).done()
    if args.dry_run or args.summary_only:
        if args.dry_run:
            for g in grids:
                ids = [c.id for c in g.cells()]
                print(f"{g.name}: {len(ids)} cells ({g.kind}; axes "
                      f"{ {k: len(v) for k, v in g.axes.items()} }), {sum(i in done for i in ids)} done")
            print(f"{len(cells)} cells in all, {sum(c.id in done for c in cells)} done -> {results_dir}")
        if args.summary_only:
            print(sweep.summary_table(results_dir))
        return 0

    runtime_env = None
    if args.ship_code:
        import hgtoolkit
        import testfunctions
        runtime_env = {"py_modules": [str(Path(m.__file__).parent) for m in (hgtoolkit, testfunctions)]}
    try:
        report = sweep.run(grids, results_dir, executor=args.executor, address=args.address,
                           num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                           chunk_size=args.chunk_size, threads_per_cell=args.threads,
                           max_retries=args.max_retries, runtime_env=runtime_env,
                           worker_writes=None if args.driver_writes is None else False,
                           batch=not args.no_batch, lock_timeout=args.wait,
                           progress=args.progress)
    except sweep.StoreLockedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        n = len(sweep.Store(results_dir).done() & {c.id for c in cells})
        print(f"\ninterrupted: {n} of {len(cells)} cells are stored in {results_dir}; "
              "run the same command again to finish the rest", file=sys.stderr)
        return 130
    table = sweep.summary_table(results_dir)
    records.atomic_write_bytes(results_dir / "summary.md", table.encode())
    print(table)
    print(report)
    for cid, err in list(report.failed.items())[:5]:
        last = str(err).strip().splitlines()[-1] if str(err).strip() else "error"
        print(f"  failed {cid}: {last}  (details: {results_dir / 'errors' / (cid + '.json')})",
              file=sys.stderr)
    return 0 if report.ok else 1
