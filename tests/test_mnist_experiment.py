"""The `mnist` experiment (MARTHE Sec. 5) in its tiny setting: records, figures, summary, resume."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hgtoolkit import records
from hgtoolkit.experiments import EXPERIMENTS, common, mnist, run_experiment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add synchronisation
    try:
        out = tmp_path_factory.mktemp("results")
        summary = run_experiment("mnist", setting="tiny", out=out, progress=False)
    finally:
        torch.set_num_threads(n)
    return out / "mnist", summary


def test_registered_and_configs_build():
    assert EXPERIMENTS["mnist"].load() is mnist
    for setting in common.SETTINGS:
        config = getattr(mnist.Config, setting)()
        assert config.lrsopt_seeds <= config.n_seeds
    full = mnist.Config.full()
    assert (full.hidden, full.steps, full.n_seeds, full.lrsopt_seeds, full.lrsopt_steps,
            full.lrsopt_optimizer, full.batch_size, full.n_train, full.n_val) == \
        ((500, 500, 500), 500, 20, 4, 5000, "sgd", 100, 7000, 700)


def test_tiny_run_writes_records_figures_and_summary(tiny):
    root, summary = tiny
    config = mnist.Config.tiny()
    specs = mnist.method_specs(config)
    for stem in ("mnist_fig2", "mnist_methods_and_peers", "mnist_approximation",
                 "mnist_schedules_all_seeds", "mnist_accuracy_vs_kappa"):
        for ext in ("png", "pdf"):
            assert (root / "figures" / f"{stem}.{ext}").stat().st_size > 1000
    rec = mnist.load_records(root)  # the store, read back (config from config.json)
    assert {(label, s) for label, per in rec["online"].items() for s in per} == \
        {(spec["label"], s) for spec in specs for s in config.seeds}
    assert len(rec["peers"]) == len(config.peers) * config.n_seeds
    n_online = sum(len(spec["values"]) for spec in specs) * config.n_seeds
    n_cells = n_online + config.lrsopt_seeds + len(config.peers) * config.n_seeds + len(specs)
    assert len(list((root / "data" / "sweep" / "cells").glob("*.json"))) == n_cells
    assert sorted(summary["cells"]["computed"]) == sorted(p.stem for p in (root / "data" / "sweep" / "cells").glob("*.json"))
    # batched: one vmapped call per (method, seed) over its β values (the event log says so)
    batched = [e["batched"] for e in mnist_events(root) if e["event"] == "start" and "batched" in e]
    assert batched == [len(config.hypergrad_lrs)] * (len(config.hypergrad_lrs) * config.n_seeds * sum(s["grid"] == "hypergrad_lr" for s in specs))
    md = (root / "summary.md").read_text()
    assert "LRS-OPT" in md and "Approximation error" in md and "peer: fixed η=0.1" in md
    if summary["dataset"]["is_fallback"]:
        assert "FALLBACK" in md  # the data source is said, not hidden

    # every method ran on every seed and β; accuracies are accuracies
    for spec in specs:
        m = summary["methods"][spec["label"]]
        assert len(m["per_value"]) == len(spec["values"])
        for p in m["per_value"]:
            assert p["accuracy"]["n"] + p["accuracy"]["n_failed"] == config.n_seeds
            assert p["accuracy"]["mean"] is None or 0.0 <= p["accuracy"]["mean"] <= 1.0
    arr = rec["online"]["HD"][0][1]
    assert arr["lrs"].shape == (len(config.hypergrad_lrs), config.steps)
    assert np.array_equal(arr["eval_steps"], np.arange(0, config.steps + 1, config.eval_every))

    # LRS-OPT ran, improved its objective on the resampled minibatches, and was replayed
    lr = summary["lrsopt"]
    assert lr["ran"] and lr["per_seed"]["0"]["outer_steps"] == config.lrsopt_steps
    assert 0.0 < lr["accuracy"]["mean"] <= 1.0

    # the analysis measures what it should: HD's estimate IS the one-step derivative and RTHO's
    # the constant-LR one (same trajectory), so those cosines are 1 up to float32 rounding
    a = summary["analysis"]
    assert a["HD"]["summary"]["one_step"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert a["RTHO"]["summary"]["constant_lr"]["cosine"] == pytest.approx(1.0, abs=1e-4)
    assert set(a) == {s["label"] for s in specs}
    # on the CPU the online cells ran one by one (online.run), so the analysis reads their stored
    # records instead of recomputing them: nothing to compare, and the replay is the run itself
    assert summary["batched_check"]["runs_compared"] == 0
    assert all(v["replay_gap"] <= 1e-4 for v in a.values()), {k: v["replay_gap"] for k, v in a.items()}


def test_a_second_run_reuses_every_record(tiny, monkeypatch):
    root, summary = tiny
    files = {p: p.stat().st_mtime_ns for p in (root / "data" / "sweep" / "cells").rglob("*")}
    monkeypatch.setattr(mnist, "make_figures", lambda out, config=None: [])  # tested above; slow to redraw
    again = mnist.run(mnist.Config.tiny(), common.OutputDir(root), progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing recomputed or rewritten
    assert again["cells"]["computed"] == []
    assert again["methods"] == summary["methods"] and again["lrsopt"] == summary["lrsopt"]


def test_an_interrupted_run_computes_only_the_missing_cells(tiny, tmp_path, monkeypatch):
    """Interrupted = some cells' records missing (deleted here, deterministically): the re-run
    (``reproduce mnist``) computes exactly those cells, and its tables and numbers equal the
    uninterrupted run's."""
    import shutil
    from hgtoolkit.cli import main
    root, summary = tiny
    copy = tmp_path / "mnist"
    shutil.copytree(root, copy)
    cells = copy / "data" / "sweep" / "cells"
    by_kind: dict = {}
    for p in sorted(cells.glob("*.json")):
        by_kind.setdefault(records.read_json(p)["kind"], []).append(p.stem)
    # one online cell (its batch group re-runs whole, only it is stored), one peer, the LRS-OPT run
    # and one analysis: the kinds the experiment has
    gone = {by_kind["mnist.online"][3], by_kind["mnist.peer"][1], by_kind["mnist.lrsopt"][0],
            by_kind["mnist.analysis"][0]}
    for cid in gone:
        for ext in ("json", "npz"):
            (cells / f"{cid}.{ext}").unlink(missing_ok=True)
    events_before = len(mnist_events(copy))
    monkeypatch.setattr(mnist, "make_figures", lambda out, config=None: [])  # their data are compared below
    n = torch.get_num_threads()
    try:
        assert main(["reproduce", "mnist", "--tiny", "--out", str(tmp_path), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(n)
    again = records.read_json(copy / "summary.json")
    assert sorted(again["cells"]["computed"]) == sorted(gone)
    finished = {e["id"] for e in mnist_events(copy)[events_before:] if e["event"] == "finish"}
    assert finished == gone  # the store's event log says the same
    for key in ("methods", "lrsopt", "peers", "analysis", "schedules", "batched_check", "measured"):
        a, b = _without_timing(summary[key]), _without_timing(again[key])
        assert a == b, key
    tables = lambda p: [part for part in p.read_text().split("\n## ") if " vs β" in part or " vs κ" in part
                        or part.startswith("Approximation error")]
    assert len(tables(root / "summary.md")) == 3 and tables(copy / "summary.md") == tables(root / "summary.md")
    # what the figures are drawn from: every record read back equal
    a, b = mnist.load_records(root), mnist.load_records(copy)
    for label, per_seed in a["online"].items():
        for s, (_, arrays) in per_seed.items():
            other = b["online"][label][s][1]
            assert all(np.array_equal(arrays[k], other[k], equal_nan=True) for k in arrays if k != "wall_time")
    assert np.array_equal(a["lrsopt"][0]["result"].final_lrs, b["lrsopt"][0]["result"].final_lrs)
    for label, x in a["analysis"].items():
        assert np.array_equal(x["report"].estimates, b["analysis"][label]["report"].estimates, equal_nan=True)


def mnist_events(root):
    from hgtoolkit import sweep
    return sweep.Store(root / "data" / "sweep").events()


def _without_timing(x):
    """A summary entry without its wall-clock numbers (everything else must be equal)."""
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items()
                if not any(w in k for w in ("wall_time", "seconds", "_s", "cost"))}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


@pytest.mark.parametrize("field, value, match", [
    ("hypergrad_lrs", (1e-2, -1.0), "hypergrad_lrs must be positive"),
    ("lrsopt_seeds", 5, "lrsopt_seeds must be in"),
    ("lrsopt_optimizer", "newton", "lrsopt_optimizer must be one of"),
    ("peers", (("cosine", 0.1),), "peers entries"),
    ("mus", (1.5,), "mus must be in"),
    ("steps", 0, "steps must be ≥ 1"),
])
def test_bad_config_is_rejected_with_the_field_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(mnist.Config.tiny(), **{field: value})


def test_the_analysis_of_the_stored_run_equals_that_of_the_recomputed_run(tiny):
    """An analysis cell reads the stored online record (CPU); without a store it recomputes the
    run with online.run: the same report, and only the recomputation has a single-run accuracy."""
    from hgtoolkit import sweep
    from hgtoolkit.sweep.store import Store
    root, summary = tiny
    cfg = mnist.Config.tiny()
    grid = mnist.analysis_grids(cfg, summary["methods"], mnist.grids(cfg)["online"])["RTHO"]
    (cell,) = grid.cells()
    problem = mnist.problem(cfg, cell.params["seed"])
    store = Store(root / "data" / "sweep")
    assert store.has(cell.params["online_cell"])
    ctx = sweep.CellContext(None, lambda s: problem, cell.id, store)
    stored, recomputed = mnist.run_analysis_cell(problem, cell.params, ctx), mnist.run_analysis_cell(problem, cell.params, None)
    assert stored.result["extra"]["single_run_final_val_accuracy"] is None
    assert recomputed.result["extra"]["single_run_final_val_accuracy"] is not None
    assert stored.result["summary"] == recomputed.result["summary"]
    with pytest.raises(ValueError, match="online_cell"):
        sweep.Grid("g", grid.problem, "mnist.analysis", fixed={**cell.params, "online_cell": "nope"})


def test_fig2_legend_inside_caption_whole_no_phantom_marker(tiny, monkeypatch):
    """Fig. 2 redrawn from the records: panel (c)'s legend lies inside its axes and explains only
    markers that are drawn; the caption names the whole data source (not cut with "…")."""
    from hgtoolkit import plotting
    root, _ = tiny
    seen = {}
    real = plotting.savefig

    def capture(fig, path, **kw):
        seen[str(path).rsplit("/", 1)[-1]] = fig
        return real(fig, path, **{**kw, "close": False, "background": False})

    monkeypatch.setattr(plotting, "savefig", capture)
    mnist.make_figures(root)
    fig = seen["mnist_fig2"]
    assert plotting.layout_problems(fig) == []
    ax = fig.axes[2]
    renderer = plotting.layout_renderer(fig)
    legend = ax.get_legend().get_window_extent(renderer)
    box = ax.get_window_extent(renderer)
    assert box.x0 <= legend.x0 and legend.x1 <= box.x1 and box.y0 <= legend.y0 and legend.y1 <= box.y1
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    hollow = [l for l in ax.lines if l.get_marker() == "o" and l.get_markerfacecolor() == "white"]
    assert ("some seeds diverged (mean of the rest)" in texts) == bool(hollow)
    crosses = [l for l in ax.lines if l.get_marker() == "x"]
    assert ("all seeds diverged" in texts) == bool(crosses)
    problem = mnist.load_records(root)["online"]
    meta = next(iter(next(iter(problem.values())).values()))[0]
    caption = fig._supxlabel.get_text().replace("\n", " ")
    assert str(meta["problem"]["data"]).replace("\n", " ") in caption or \
        " ".join(str(meta["problem"]["data"]).split()) in " ".join(caption.split())
    import matplotlib.pyplot as plt
    for f in seen.values():
        plt.close(f)
