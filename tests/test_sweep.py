"""Sweeps: grid expansion and ids, validation before work, the resumable store, the local and
Ray executors (identical records, a killed worker, an interrupted driver), the CLI."""
import json
import logging
import os
import signal
import subprocess
import sys
import types
from collections import Counter

import numpy as np
import pytest
import torch

from hgtoolkit import online, problems, sweep
from hgtoolkit.cli import main as cli_main
from hgtoolkit.lrsopt import optimize_schedule
from hgtoolkit.sweep import Grid, Store


def train_grid(**over):
    kw = dict(name="train", problem={"name": "synthetic_mlp"}, kind="train",
              axes={"lr": [0.1, 0.3], "seed": [0, 1, 2]}, fixed={"steps": 30})
    kw.update(over)
    return Grid(**kw)


def beale_online_grid():
    return Grid("beale", {"name": "beale"}, "online",
                axes={"method": ["hd", "rtho"], "beta": [1e-7, 1e-3]}, fixed={"lr0": 1e-3, "steps": 60})


def finishes(store):
    return Counter(e["id"] for e in store.events() if e["event"] == "finish")


def starts(store):
    return Counter(e["id"] for e in store.events() if e["event"] == "start")


# ----------------------------------------------------------------------------- grid and ids

def test_cell_ids_are_stable_and_depend_only_on_settings():
    g = train_grid()
    cells = g.cells()
    assert len(cells) == len(g) == 6
    assert [c.params for c in cells[:2]] == [{"steps": 30, "lr": 0.1, "seed": 0},
                                             {"steps": 30, "lr": 0.1, "seed": 1}]
    # a literal: the id must not change across processes, Python versions or refactorings
    assert cells[0].id == sweep.Cell("train", {"name": "synthetic_mlp"},
                                     {"seed": 0, "lr": 0.1, "steps": 30}).id == "53599b892add"
    assert len({c.id for c in cells}) == 6
    # the same value written as int or float, or in another key order, is the same cell
    same = Grid("other name", {"name": "synthetic_mlp"}, "train",
                axes={"seed": [0, 1, 2], "lr": [0.1, 0.3]}, fixed={"steps": 30})
    assert {c.id for c in same.cells()} == {c.id for c in cells}
    assert Grid("x", {"name": "beale"}, "train", fixed={"lr": 1, "steps": 3}).cells()[0].id == \
        Grid("x", {"name": "beale"}, "train", fixed={"lr": 1.0, "steps": 3}).cells()[0].id
    # a different problem section is a different cell
    other = train_grid(problem={"name": "synthetic_mlp", "hidden": [4]})
    assert not {c.id for c in other.cells()} & {c.id for c in cells}


def test_id_is_the_same_in_another_process():
    cell = beale_online_grid().cells()[3]
    code = ("from hgtoolkit import sweep; import json, sys; "
            "print(sweep.Cell(**json.loads(sys.argv[1])).id)")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(cell.to_dict())],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert out.stdout.strip() == cell.id


def test_grid_files_yaml_and_json(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "name: study\nproblem: {name: beale}\ngrids:\n"
        "  - name: a\n    kind: online\n    fixed: {lr0: 1e-3, steps: 10}\n"
        "    axes: {method: [hd, rtho], beta: [1e-7, 2e-7]}\n"
        "  - kind: train\n    fixed: {lr: 1e-3, steps: 5}\n    axes: {seed: [0]}\n")
    grids = sweep.load_grids(tmp_path / "g.yaml")
    assert [g.name for g in grids] == ["study/a", "study[1]"]
    assert grids[0].axes["beta"] == [1e-7, 2e-7]  # YAML 1.1 would read "1e-7" as a string
    assert isinstance(grids[0].fixed["lr0"], float)
    (tmp_path / "g.json").write_text(json.dumps(grids[0].to_dict()))
    assert Grid.from_file(tmp_path / "g.json") == grids[0]
    with pytest.raises(ValueError, match="2 grids"):
        Grid.from_file(tmp_path / "g.yaml")


FIXED = {"lr0": 0.1, "steps": 10}
BAD_GRIDS = [  # (changes to a valid grid, the error naming the offending key)
    ({"axes": {"method": ["hd", "sgdr"]}}, r"axes\.method\[1\].*'sgdr'"),
    ({"fixed": FIXED, "axes": {"method": ["hd"], "beta": [1e-3, -1e-3]}},
     r"axes\.beta\[1\]: beta must be a number ≥ 0"),
    ({"fixed": {**FIXED, "method": "marthe", "mu": 1.5}, "axes": {}}, r"fixed\.mu: mu must be a number in \[0, 1\]"),
    ({"axes": {"method": ["hd"], "seed": []}}, r"axes\.seed is empty"),
    ({"axes": {"method": "hd"}}, r"axes\.method must be a list"),
    ({"fixed": FIXED, "axes": {"beta": [1e-3, 1e-3]}}, r"axes\.beta repeats"),
    ({"axes": {"methd": ["hd"]}}, r"axes\.methd\[0\]: unknown key 'methd'"),
    ({"kind": "online2"}, r"kind: unknown cell kind 'online2'"),
    ({"problem": {"name": "bael"}}, r"problem\.name: unknown problem 'bael'"),
    ({"problem": {"name": "beale", "n_train": 10}}, r"problem\.n_train: unknown argument"),
    ({"fixed": {"steps": 10}}, r"'lr0' is required"),
    ({"axes": {"method": ["hd", "rtho"], "mu": [0.5]}},
     r"cell \{'method': 'hd', 'mu': 0\.5\}: mu=0\.5 contradicts method='hd'"),
    ({"fixed": {**FIXED, "steps": 0}}, r"fixed\.steps: steps must be an integer ≥ 1"),
]


@pytest.mark.parametrize("change, message", BAD_GRIDS)
def test_malformed_grid_is_rejected_before_any_work(tmp_path, change, message):
    d = {"name": "bad", "problem": {"name": "beale"}, "kind": "online",
         "fixed": {**FIXED, "beta": 1e-3}, "axes": {"method": ["hd"]}, **change}
    with pytest.raises(ValueError, match=message):
        sweep.run(d, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # nothing was started, not even the directory


# ----------------------------------------------------------------------------- local executor

def test_local_sweep_streams_records_and_resumes(tmp_path):
    g = train_grid()
    report = sweep.run(g, tmp_path, progress=False)
    assert report.ok and len(report.computed) == 6 and not report.existing
    store = Store(tmp_path)
    assert store.done() == {c.id for c in g.cells()}
    assert not [p for p in (tmp_path / "cells").iterdir() if p.name.startswith(".")]  # no temp files
    recs = sweep.load_results(tmp_path)
    assert [r["id"] for r in recs] == [c.id for c in g.cells()]  # manifest order
    r0 = recs[0]
    assert r0["status"] == "ok" and r0["meta"]["executor"] == "local"
    # the record is the run: same numbers as calling trajectory.train directly
    from hgtoolkit.trajectory import train
    p = problems.get("synthetic_mlp", seed=r0["params"]["seed"])
    direct = train(p, torch.full((30,), 0.1, dtype=torch.float64))
    assert r0["result"]["value"] == float(direct.value)
    np.testing.assert_array_equal(r0["arrays"]["train_losses"], direct.train_losses.numpy())

    again = sweep.run(g, tmp_path, progress=False)
    assert again.ok and not again.computed and len(again.existing) == 6
    assert set(finishes(store).values()) == {1}  # nothing computed twice
    # extending the grid computes only the new cells; the manifest keeps both grids
    bigger = train_grid(axes={"lr": [0.1, 0.3, 1.0], "seed": [0, 1, 2]})
    third = sweep.run(bigger, tmp_path, progress=False)
    assert len(third.computed) == 3 and len(third.existing) == 6
    assert len(store.manifest()["grids"]) == 2
    table = sweep.summary_table(tmp_path)
    assert "| lr | runs | diverged | value |" in table and "| 1.0 | 3 | 0 |" in table


def test_interrupted_local_driver_completes_only_missing_cells(tmp_path):
    g = train_grid()

    def stop_after_two(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(g, tmp_path, progress=False, callback=stop_after_two)
    store = Store(tmp_path)
    first = store.done()
    assert len(first) == 2
    report = sweep.run(g, tmp_path, progress=False)
    assert set(report.computed) == {c.id for c in g.cells()} - first
    assert set(report.existing) == first
    assert set(finishes(store).values()) == {1}


def test_failing_and_diverging_cells(tmp_path):
    # batch_size > n_train fails when the problem is built (validation cannot know): recorded,
    # reported, not stored as finished, retried by a re-run
    bad = train_grid(problem={"name": "synthetic_mlp", "batch_size": 1000}, axes={"lr": [0.1]})
    report = sweep.run(bad, tmp_path, progress=False)
    assert not report.ok and len(report.failed) == 1
    assert "batch_size" in next(iter(report.failed.values()))
    store = Store(tmp_path)
    assert not store.done() and set(store.errors()) == set(report.failed)
    assert len(sweep.run(bad, tmp_path, progress=False).failed) == 1  # retried, fails again
    # divergence is a result, not an error
    div = Grid("div", {"name": "beale"}, "train", fixed={"lr": 10.0, "steps": 50})
    report = sweep.run(div, tmp_path, progress=False)
    assert report.ok
    rec = sweep.load_results(tmp_path, kind="train")[0]
    assert rec["status"] == "diverged" and isinstance(rec["result"]["diverged_at"], int)
    assert "| 1 | 1 |" in sweep.summary_table(tmp_path)  # 1 run, 1 diverged


def test_online_cells_match_online_run(tmp_path):
    g = beale_online_grid()
    report = sweep.run(g, tmp_path, progress=False)
    assert report.ok
    recs = {(r["params"]["method"], r["params"]["beta"]): r for r in sweep.load_results(tmp_path)}
    direct = online.run(problems.get("beale"), "rtho", lr0=1e-3, beta=1e-7, steps=60, seed=0,
                        keep_params=False)
    r = sweep.to_result(recs[("rtho", 1e-7)])
    assert isinstance(r, online.OnlineResult) and r.config == direct.config
    for k in ("lrs", "hypergrads", "val_losses", "mus", "betas"):
        np.testing.assert_array_equal(getattr(r, k), getattr(direct, k))
    assert recs[("hd", 1e-3)]["status"] == "diverged"  # β = 1e-3 blows up on Beale
    assert recs[("hd", 1e-7)]["meta"]["timing"]["step_times"].shape == (60,)


def test_lrsopt_cell_matches_optimize_schedule_and_cleans_its_checkpoint(tmp_path):
    g = Grid("lrs", {"name": "beale"}, "lrsopt",
             fixed={"lr0": 1e-3, "steps": 15, "outer_steps": 3, "outer_lr": 1e-4})
    assert sweep.run(g, tmp_path, progress=False).ok
    rec = sweep.load_results(tmp_path)[0]
    direct = optimize_schedule(problems.get("beale"), torch.full((15,), 1e-3, dtype=torch.float64),
                               3, 1e-4, progress=False)
    np.testing.assert_array_equal(rec["arrays"]["final_lrs"], direct.final_lrs)
    assert rec["result"]["best_value"] == direct.best_value
    np.testing.assert_array_equal(sweep.to_result(rec).history, direct.history)
    assert not list((tmp_path / "checkpoints").glob("*"))


def test_batched_hook_gets_groups_that_differ_in_seed_and_beta(tmp_path, monkeypatch):
    calls = []

    def run_online_batch(problem_factory, cells):
        calls.append([(c.params["beta"], c.params.get("seed")) for c in cells])
        return [online.run(problem_factory(c.seed), **{"seed": 0, **c.params}, keep_params=False)
                for c in cells]

    monkeypatch.setitem(sys.modules, "hgtoolkit.batched",
                        types.SimpleNamespace(run_online_batch=run_online_batch))
    g = Grid("b", {"name": "beale"}, "online",
             axes={"method": ["hd", "rtho"], "beta": [1e-7, 2e-7]}, fixed={"lr0": 1e-3, "steps": 20})
    assert sweep.run(g, tmp_path / "batched", progress=False).ok
    assert calls == [[(1e-7, None), (2e-7, None)]] * 2  # one call per method
    monkeypatch.delitem(sys.modules, "hgtoolkit.batched")
    assert sweep.run(g, tmp_path / "plain", progress=False).ok
    a, b = sweep.load_results(tmp_path / "batched"), sweep.load_results(tmp_path / "plain")
    assert [x["meta"].get("batched") for x in a] == [2] * 4
    assert all(sweep.records_equal(x, y) for x, y in zip(a, b))

    def broken(problem_factory, cells):
        raise RuntimeError("vmap says no")

    monkeypatch.setitem(sys.modules, "hgtoolkit.batched", types.SimpleNamespace(run_online_batch=broken))
    with pytest.warns(RuntimeWarning, match="vmap says no.*one by one"):
        assert sweep.run(g, tmp_path / "fallback", progress=False).ok
    assert all(sweep.records_equal(x, y) for x, y in zip(sweep.load_results(tmp_path / "fallback"), b))


def test_cli_runs_a_grid_file(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text("name: cli\nproblem: {name: beale}\nkind: hypergrad\n"
                    "fixed: {steps: 5}\naxes: {lr: [1e-4, 1e-3]}\n")
    assert cli_main(["sweep", str(grid), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 computed" in out and "grad_norm" in out
    assert (tmp_path / "cli" / "summary.md").read_text().startswith("### hypergrad")
    assert cli_main(["sweep", str(grid), "--out", str(tmp_path), "--dry-run"]) == 0
    assert "2 cells in all, 2 done" in capsys.readouterr().out
    grid.write_text("name: cli\nproblem: {name: beale}\nkind: hypergrad\nfixed: {steps: 5}\naxes: {lr: []}\n")
    assert cli_main(["sweep", str(grid), "--out", str(tmp_path)]) == 2
    assert "axes.lr is empty" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Ray executor

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")  # the optional extra hgtoolkit[ray]
    ray.init("local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


def mixed_grids():
    return [train_grid(), beale_online_grid(),
            Grid("hg", {"name": "synthetic_mlp"}, "hypergrad", axes={"seed": [0, 1]}, fixed={"lr": 0.1, "steps": 10})]


def test_ray_and_local_executors_give_identical_records(tmp_path, ray_cluster):
    grids = mixed_grids()
    local = sweep.run(grids, tmp_path / "local", progress=False)
    remote = sweep.run(grids, tmp_path / "ray", executor="ray", chunk_size=3, progress=False)
    assert local.ok and remote.ok and len(remote.computed) == 12
    a, b = sweep.load_results(tmp_path / "local"), sweep.load_results(tmp_path / "ray")
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert all(sweep.records_equal(x, y) for x, y in zip(a, b))
    assert {r["meta"]["executor"] for r in b} == {"ray"}
    assert os.getpid() not in {r["meta"]["pid"] for r in b}  # computed in the workers
    # the driver can also write (no shared filesystem): same records
    drv = sweep.run(grids[2], tmp_path / "driver", executor="ray", worker_writes=False, progress=False)
    assert drv.ok and all(sweep.records_equal(x, y) for x, y in
                          zip(sweep.load_results(tmp_path / "driver"), a[-2:]))
    assert {e.get("via") for e in Store(tmp_path / "driver").events()} == {"driver"}


def test_ray_sweep_survives_a_killed_worker(tmp_path, ray_cluster):
    # cells of a few hundred training steps; two tasks of three cells, one per worker
    g = train_grid(axes={"lr": [0.05, 0.1, 0.2], "seed": [0, 1]}, fixed={"steps": 400})
    store = Store(tmp_path / "ray")
    killed = {}

    def kill_a_running_worker(done, total):
        if killed:
            return
        finished = finishes(store)
        running = [e for e in store.events() if e["event"] == "start" and e["id"] not in finished]
        if running:
            killed.update(id=running[-1]["id"], pid=running[-1]["pid"])
            os.kill(killed["pid"], signal.SIGKILL)

    report = sweep.run(g, store.root, executor="ray", chunk_size=3, progress=False,
                       callback=kill_a_running_worker)
    assert killed, "no cell was running when the first one finished"
    assert report.ok and store.done() == {c.id for c in g.cells()}
    assert set(finishes(store).values()) == {1}        # every cell finished exactly once
    if store.read(killed["id"])["meta"]["pid"] != killed["pid"]:
        assert starts(store)[killed["id"]] == 2        # the killed cell was started again
    else:  # the kill landed in the millisecond between storing the cell and logging it
        assert starts(store)[killed["id"]] == 1 and finishes(store)[killed["id"]] == 0
    local = sweep.run(g, tmp_path / "local", progress=False)
    assert local.ok
    assert all(sweep.records_equal(x, y) for x, y in
               zip(sweep.load_results(tmp_path / "local"), sweep.load_results(store.root)))


def test_interrupted_ray_driver_completes_only_missing_cells(tmp_path, ray_cluster):
    g = train_grid(axes={"lr": [0.05, 0.1, 0.2, 0.4], "seed": [0, 1]}, fixed={"steps": 400})

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(g, tmp_path, executor="ray", chunk_size=2, progress=False, callback=interrupt)
    store = Store(tmp_path)
    first = store.done()
    assert 0 < len(first) < 8
    report = sweep.run(g, tmp_path, executor="ray", chunk_size=2, progress=False)
    assert report.ok
    assert set(report.computed) == {c.id for c in g.cells()} - first
    assert max(finishes(store).values()) == 1
