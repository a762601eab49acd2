"""Run every ``benchmarks/bench_*.py`` (each in its own process) and print one combined table.

    python benchmarks/run_all.py                 # run all, then summarise
    python benchmarks/run_all.py --only exact    # run bench_exact.py only
    python benchmarks/run_all.py --summary-only  # just summarise benchmarks/results/*.json
    python benchmarks/run_all.py --quick         # pass --quick to the benchmarks that accept it

Each benchmark writes ``benchmarks/results/<name>.json``. Files with a ``rows`` list (the
schema in README.md) are shown row by row; for other files the top-level numbers, flags and
short strings are listed. A benchmark that fails is reported and the others still run; the
exit code is then 1.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, format_table, row  # noqa: E402


def discover() -> dict[str, Path]:
    """``{name: path}`` for every ``bench_<name>.py`` beside this file."""
    return {p.stem[len("bench_"):]: p for p in sorted(HERE.glob("bench_*.py"))}


def accepts_quick(path: Path) -> bool:
    return "--quick" in path.read_text()


def run(name: str, path: Path, quick: bool) -> dict:
    cmd = [sys.executable, str(path)] + (["--quick"] if quick and accepts_quick(path) else [])
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, cwd=HERE.parent)
    return {"returncode": rc, "wall_s": time.perf_counter() - t0}


def rows_of(payload: dict) -> list[dict]:
    """The rows of a result file: its own ``rows``, else its top-level scalars."""
    if isinstance(payload.get("rows"), list):
        return payload["rows"]
    out = []
    for key, value in payload.items():
        if isinstance(value, bool) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            out.append(row(key, value))
        elif isinstance(value, str) and len(value) <= 60:
            out.append(row(key, None, note=value))
    return out


def summarise(names: list[str]) -> str:
    parts = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            parts.append(f"| {name} | (no results file {path.relative_to(HERE.parent)}) |")
            continue
        payload = json.loads(path.read_text())
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
        table = format_table(rows_of(payload), benchmark=name)
        parts.append(f"{name} ({path.relative_to(HERE.parent)}, {when}):\n\n{table}")
    return "\n\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (bench_<NAME>.py)")
    ap.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="do not run these")
    ap.add_argument("--summary-only", action="store_true", help="do not run anything, summarise results/")
    ap.add_argument("--quick", action="store_true", help="pass --quick to benchmarks that accept it")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)

    found = discover()
    if args.list:
        print("\n".join(f"{n}\t{p.relative_to(HERE.parent)}" for n, p in found.items()))
        return 0
    unknown = set(args.only or []) - set(found)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; available: {sorted(found)}")
    names = [n for n in (args.only or found) if n not in args.skip]

    status = {}
    if not args.summary_only:
        for name in names:
            status[name] = run(name, found[name], args.quick)
    shown = [n + "_quick" if args.quick and accepts_quick(found[n]) else n for n in names]
    print("\n\n# Combined results\n")
    print(summarise(shown))
    failed = [n for n, s in status.items() if s["returncode"] != 0]
    if status:
        print("\nrun times: " + ", ".join(f"{n} {s['wall_s']:.0f} s" + (" (FAILED)" if s["returncode"] else "")
                                          for n, s in status.items()))
    if failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
