"""Generates the measured parts of the documentation from the files the measurements wrote.

    python docs/generate.py   # docs/_generated/{benchmarks,results}.md (make docs runs it; conf.py
                              # too, so every build shows the same numbers)

- ``benchmarks.md`` (included by ``docs/performance.md``): one table per benchmark, from
  ``benchmarks/results/<name>.json``: the latest measurement of each, committed (so a fresh
  clone's site shows real numbers) and overwritten by ``make bench`` / ``python
  benchmarks/bench_NAME.py``; rows as ``benchmarks/run_all.py`` prints them, with the date
  and the machine each file records (``benchmarks/common.py``'s ``env_info``).
- ``results.md`` (included by ``docs/results.md``): the ``summary.md`` of every experiment under
  the results folder (``make demo``, ``python -m hgtoolkit reproduce NAME``; the folder is
  ``hgtoolkit.experiments.common.results_root()``), headings moved one level down and figures
  given as paths.
- the table of ``docs/reliability.md`` (between its ``% BEGIN``/``% END`` lines, rewritten in
  place): one row per case of ``tests/reliability_cases.py``, the list that
  ``tests/test_reliability.py`` runs, so that every row has its test and every test its row.
Nothing is retyped: a number on those pages is one a script wrote.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "_generated"
BENCH_RESULTS = ROOT / "benchmarks" / "results"
RELIABILITY = HERE / "reliability.md"
TABLE_BEGIN = "% BEGIN the table: written by docs/generate.py from tests/reliability_cases.py (do not edit)"
TABLE_END = "% END the table"


def _bench_modules():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
        import run_all
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return common, run_all


def benchmark_files() -> dict[str, Path]:
    """``{name: json}`` of ``benchmarks/results`` (committed; ``make bench`` rewrites them)."""
    return {p.stem: p for p in sorted(BENCH_RESULTS.glob("*.json"))}


def _measured(payload: dict) -> str:
    """When and where a result file was measured, from what it records (a checkout's file
    dates are those of the clone, not of the measurement)."""
    env = payload.get("env", {}) if isinstance(payload.get("env"), dict) else {}
    parts = [env.get("date", "date not recorded")]
    if "cpu" in env:
        parts.append(f"{env['cpu']}" + (f" ({env['cpu_count']} CPUs)" if "cpu_count" in env else ""))
    parts += [f"{k} {env[k]}" for k in ("torch", "torch_threads") if k in env]
    load = env.get("loadavg_before", payload.get("loadavg_before", env.get("loadavg")))
    if isinstance(load, (list, tuple)) and load:
        parts.append(f"load average {float(load[0]):.2f}")
    if payload.get("quick"):
        parts.append("a --quick run")
    return "; ".join(str(p) for p in parts)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def benchmarks_page() -> str:
    common, run_all = _bench_modules()
    files = benchmark_files()
    if not files:
        return ("No benchmark results in `benchmarks/results/`: run `make bench` (or `python "
                "benchmarks/run_all.py --only NAME`), then `make docs`.\n")
    parts = []
    for name, path in files.items():
        payload = json.loads(path.read_text(encoding="utf-8"))
        rows = run_all.rows_of(payload)
        source = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        lines = [f"### {name}", "", f"`{source}` ({_measured(payload)})", "",
                 "| metric | value | unit | target | met | note |", "| --- | --: | --- | --- | --- | --- |"]
        for r in rows:
            lines.append("| " + " | ".join(_cell(c) for c in (
                r.get("metric", ""), common._fmt(r.get("value")), r.get("unit", ""), r.get("target") or "",
                common._fmt(r.get("met")), r.get("note", ""))) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def results_page() -> str:
    sys.path.insert(0, str(ROOT))
    from hgtoolkit.experiments import common

    root = common.results_root()
    summaries = sorted(root.glob("*/summary.md")) if root.is_dir() else []
    if not summaries:
        return (f"No experiment results in `{root}` yet: run `make demo` (or `python -m hgtoolkit reproduce "
                "NAME`), then `make docs`.\n")
    parts = []
    for path in summaries:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"^(#+) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
        text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f"(figure `{path.parent.name}/{m.group(2)}`)", text)
        text = re.sub(r"(?<!!)\[([^\]]+)\]\((?!https?://)([^)]+)\)", r"\1 (`\2`)", text)
        when = time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))
        parts.append(f"### {path.parent.name}\n\n`{path}` ({when})\n\n{text.strip()}\n")
    return "\n\n".join(parts)


def reliability_cases():
    """The module ``tests/reliability_cases.py`` (tests/ is no package)."""
    import importlib.util
    if "reliability_cases" in sys.modules:
        return sys.modules["reliability_cases"]
    spec = importlib.util.spec_from_file_location("reliability_cases", ROOT / "tests" / "reliability_cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability_cases"] = module  # dataclasses look their module up there
    sys.path.insert(0, str(ROOT))
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["reliability_cases"]
        raise
    finally:
        sys.path.remove(str(ROOT))
    return module


def _expected(case) -> str:
    return "exit 2" if case.surface == "CLI" else case.expect.__name__


def _says(case) -> str:
    """The pattern the case's message must match, as words: escapes dropped, ``.*`` as "…"."""
    text = re.sub(r"\.\*|\.\+", "…", case.match)
    text = re.sub(r"\\b", "", text)
    text = re.sub(r"\\(.)", r"\1", text)
    return f"`{text}`" if text.strip() else ""


def reliability_table(cases=None) -> str:
    """The rows of docs/reliability.md: one table per surface (API, CLI), in the list's order."""
    cases = reliability_cases().CASES if cases is None else cases
    n_api = sum(c.surface == "API" for c in cases)
    lines = [f"{len(cases)} cases ({n_api} API, {len(cases) - n_api} CLI). Each row is "
             "`tests/test_reliability.py::test_case[<id>]`; the last column is the regular expression "
             "its message (API) or its one stderr line (CLI) must match, written as words (… for any text)."]
    for surface in ("API", "CLI"):
        lines += ["", f"### {surface}", "", "| id | entry point | class of input | gets | its message matches |",
                  "| --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(_cell(x) for x in (f"`{c.id}`", f"`{c.entry}`", c.klass, _expected(c), _says(c)))
                  + " |" for c in cases if c.surface == surface]
    return "\n".join(lines) + "\n"


def reliability_page(text: str, table: str) -> str:
    """``text`` (docs/reliability.md) with its generated table replaced by ``table``."""
    begin, end = text.index(TABLE_BEGIN) + len(TABLE_BEGIN), text.index(TABLE_END)
    return text[:begin] + "\n\n" + table + "\n" + text[end:]


def write() -> list[Path]:
    OUT.mkdir(exist_ok=True)
    written = []
    for name, text in (("benchmarks.md", benchmarks_page()), ("results.md", results_page())):
        path = OUT / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    if RELIABILITY.exists():
        text = RELIABILITY.read_text(encoding="utf-8")
        page = reliability_page(text, reliability_table())
        if page != text:
            RELIABILITY.write_text(page, encoding="utf-8")
        written.append(RELIABILITY)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args(argv)
    for path in write():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
