"""Reading results from a store: records, the typed results and the summary table."""
from __future__ import annotations

import contextlib
import math
import os
from collections import Counter, OrderedDict
from typing import Any, Sequence

import numpy as np

from .executors import unique_cells
from .grid import CELL_KINDS, Grid, as_grids, get_kind, canonical_json
from .store import Store


# ============================================================================ reading results

def load_results(results_dir: str | os.PathLike, *, kind: str | None = None,
                 grid: "Grid | Sequence[Grid] | None" = None, arrays: bool = True) -> list[dict]:
    """All finished records in ``results_dir`` (from the directory only), in the order of the
    manifest's grids (then any others by id). Filter by ``kind`` or to the cells of ``grid``.

    A record: ``id``, ``kind``, ``problem``, ``params``, ``status`` (``"ok"``/``"diverged"``),
    ``result`` (values), ``arrays`` (name → ndarray), ``meta`` (executor, host, pid, time,
    warnings, versions, ``timing``)."""
    store = Store(results_dir)
    if not store.root.exists():
        raise FileNotFoundError(f"results directory {store.root} does not exist")
    done = store.done()
    if grid is not None:
        order = [c.id for c in unique_cells(as_grids(grid))]
        ids = [i for i in order if i in done]
    else:
        order = []
        manifest = store.manifest() or {}
        for g in manifest.get("grids", []):
            with contextlib.suppress(ValueError, TypeError):
                order += [c.id for c in Grid.from_dict(g).cells()]
        ordered = list(dict.fromkeys(i for i in order if i in done))
        ids = ordered + sorted(done - set(ordered))
    out = []
    for cid in ids:
        try:
            rec = store.read(cid, arrays=arrays)
        except FileNotFoundError:
            continue
        if kind is None or rec["kind"] == kind:
            out.append(rec)
    return out


def records_equal(a: dict, b: dict) -> bool:
    """Same cell and same numbers: everything but ``meta`` (timings, host, pid, executor)."""
    keys = ("id", "kind", "problem", "params", "status", "result")
    if any(canonical_json(a.get(k)) != canonical_json(b.get(k)) for k in keys):
        return False
    xa, xb = a.get("arrays") or {}, b.get("arrays") or {}
    if isinstance(xa, list) or isinstance(xb, list):
        return xa == xb
    return set(xa) == set(xb) and all(np.array_equal(xa[k], xb[k], equal_nan=True) for k in xa)


def to_result(record: dict) -> Any:
    """The module's own result object for a loaded record (online: ``OnlineResult``; lrsopt:
    ``ScheduleResult``), for the plotting code that takes those."""
    kind = get_kind(record.get("kind"), "record.kind")
    if kind.to_result is None:
        raise ValueError(f"cell kind {kind.name!r} has no result object; use the record itself")
    return kind.to_result(record)


def _fmt(values: list[float]) -> str:
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(vals) == 0:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.4g}"
    return f"{vals.mean():.4g} ± {vals.std(ddof=1):.2g}"


def summary_table(results_dir: str | os.PathLike, *, by: Sequence[str] | None = None) -> str:
    """A Markdown table per cell kind, built from the directory: one row per setting (all
    varying params except ``seed`` unless ``by`` names the columns), mean ± std over the
    seeds of the kind's summary values among runs that did not diverge, and how many runs
    diverged."""
    recs = load_results(results_dir, arrays=False)
    if not recs:
        return f"(no finished cells in {results_dir})\n"
    parts = []
    for kind_name in dict.fromkeys(r["kind"] for r in recs):
        rs = [r for r in recs if r["kind"] == kind_name]
        kind = CELL_KINDS.get(kind_name)
        metrics = list(kind.summary) if kind else []
        keys = list(dict.fromkeys(k for r in rs for k in r["params"]))
        if by is None:
            cols = [k for k in keys if k != "seed" and
                    len({canonical_json(r["params"].get(k)) for r in rs}) > 1]
            if len({canonical_json(r["problem"]) for r in rs}) > 1:
                cols = ["problem"] + cols
        else:
            cols = list(by)
        rows: "OrderedDict[str, list[dict]]" = OrderedDict()
        for r in rs:
            key = canonical_json([r["problem"] if c == "problem" else r["params"].get(c) for c in cols])
            rows.setdefault(key, []).append(r)
        fixed = {k: rs[0]["params"].get(k) for k in keys
                 if k not in cols and k != "seed" and len({canonical_json(r["params"].get(k)) for r in rs}) == 1}
        lines = [f"### {kind_name} ({len(rs)} cells; problem {rs[0]['problem'].get('name')}"
                 + (f"; {', '.join(f'{k}={v}' for k, v in fixed.items())}" if fixed else "") + ")", "",
                 "| " + " | ".join(cols + ["runs", "diverged"] + metrics) + " |",
                 "|" + "---|" * (len(cols) + 2 + len(metrics))]
        for group in rows.values():
            first = group[0]
            head = [first["problem"].get("name") if c == "problem" else str(first["params"].get(c, "–"))
                    for c in cols]
            ok = [g for g in group if g["status"] == "ok"]
            vals = [_fmt([g["result"].get(m) for g in ok]) for m in metrics]
            lines.append("| " + " | ".join(head + [str(len(group)), str(len(group) - len(ok))] + vals) + " |")
        parts.append("\n".join(lines))
    fallback = Counter(str(r["meta"].get("data")) for r in recs if r.get("meta", {}).get("fallback_data"))
    for src, n in fallback.items():
        parts.append(f"**Note: {n} of {len(recs)} cells ran on fallback data — {src}. Not comparable "
                     "with results on the full data set.**")
    return "\n\n".join(parts) + "\n"
