"""Helpers shared by the ``bench_*.py`` scripts: environment record, interleaved timing,
result rows, the results file and the printed table (see README.md for the row schema)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_info(threads: int | None = None) -> dict:
    """Versions, CPU, torch threads, the load average (this machine may be shared) and the
    date of the measurement (UTC; what docs/generate.py shows with the numbers)."""
    import numpy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": threads if threads is not None else torch.get_num_threads(),
            "loadavg": list(os.getloadavg()),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def arguments(argv, doc: str, steps: int, repeats: int) -> argparse.Namespace:
    """The flags most benchmarks take, parsed: ``--steps``, ``--repeats``, ``--threads`` (torch's
    thread count, set here) and ``--quick`` (a smoke run)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: a small model, few steps")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    return args


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(baseline: Callable[[], Any], candidates: dict[str, Callable[[], Any]], repeats: int,
                warmup: int = 1) -> dict:
    """Time ``baseline`` and every candidate round-robin, ``repeats`` rounds after ``warmup`` rounds.

    Each round times the baseline right before each candidate, so a ratio compares two runs made
    under the same machine load; the reported ratio is the median over rounds of those per-round
    ratios (wall and CPU time). Returns ``{name: {wall_s, cpu_s, ratio_wall, ratio_cpu, ...}}``
    with the medians and all raw samples, and ``"baseline"`` for the baseline alone.
    """
    for _ in range(warmup):
        baseline()
        for fn in candidates.values():
            fn()
    raw: dict[str, dict[str, list]] = {name: {"wall": [], "cpu": [], "base_wall": [], "base_cpu": []}
                                       for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            bw, bc = timed(baseline)
            w, c = timed(fn)
            r = raw[name]
            r["wall"].append(w), r["cpu"].append(c), r["base_wall"].append(bw), r["base_cpu"].append(bc)
    med = statistics.median
    out: dict[str, dict] = {}
    for name, r in raw.items():
        out[name] = {"wall_s": med(r["wall"]), "cpu_s": med(r["cpu"]),
                     "ratio_wall": med([a / b for a, b in zip(r["wall"], r["base_wall"])]),
                     "ratio_cpu": med([a / b for a, b in zip(r["cpu"], r["base_cpu"])]),
                     "samples": r}
    base_w = [w for r in raw.values() for w in r["base_wall"]]
    base_c = [c for r in raw.values() for c in r["base_cpu"]]
    out["baseline"] = {"wall_s": med(base_w), "cpu_s": med(base_c), "samples": len(base_w)}
    return out


def row(metric: str, value: float | None, unit: str = "", target: str | None = None,
        met: bool | None = None, note: str = "") -> dict:
    """One line of the combined table (the schema README.md describes)."""
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met, "note": note}


def write_results(name: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` (``payload`` should hold ``rows`` and ``env``); a
    ``--quick`` smoke run writes ``<name>_quick.json`` (untracked), never the committed latest
    measurement."""
    if "--quick" in sys.argv[1:] and not name.endswith("_quick"):
        name += "_quick"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    os.replace(tmp, path)
    return path


def report(name: str, rows: list[dict], payload: dict, load_before: tuple, threads: int | None) -> int:
    """Save ``payload`` (with ``rows``, the environment and the load averages before and after)
    as ``results/<name>.json``, print the table and the load; the exit status 0."""
    payload = {"rows": rows, **payload, "env": env_info(threads), "loadavg_before": load_before,
               "loadavg_after": os.getloadavg()}
    path = write_results(name, payload)
    print()
    print(format_table(rows))
    print(f"\nload average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; wrote {path}")
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "NO", None: ""}[v]
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict], benchmark: str | None = None) -> str:
    """A Markdown table of result rows (``benchmark`` column when given)."""
    head = (["benchmark"] if benchmark is not None else []) + ["metric", "value", "unit", "target", "met", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([benchmark] if benchmark is not None else []) + [
            r.get("metric", ""), _fmt(r.get("value")), r.get("unit", ""), r.get("target") or "",
            _fmt(r.get("met")), r.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
