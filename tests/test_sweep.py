"""Sweeps: grid expansion and ids, validation before work, the resumable store, the local and
Ray executors (identical records, a killed worker, an interrupted driver), the CLI."""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from hgtoolkit import _barrier, online, problems, sweep
from hgtoolkit.cli import main as cli_main
from hgtoolkit.lrsopt import optimize_schedule
from hgtoolkit.sweep import Grid, Store


GRID_FILE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "grids", "beale.yaml")


def train_grid(**over):
    kw = dict(name="train", problem={"name": "synthetic_mlp"}, kind="train",
              axes={"lr": [0.1, 0.3], "seed": [0, 1, 2]}, fixed={"steps": 30})
    kw.update(over)
    return Grid(**kw)


def beale_online_grid():
    return Grid("beale", {"name": "beale"}, "online",
                axes={"method": ["hd", "rtho"], "hypergrad_lr": [1e-7, 1e-3]}, fixed={"lr": 1e-3, "steps": 60})


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


@pytest.mark.parametrize("path", sorted(Path(GRID_FILE).parent.glob("*.yaml")), ids=lambda p: p.name)
def test_the_committed_grid_files_load_and_use_todays_names(path):
    """Every grid shipped in benchmarks/grids/ builds its cells (an old key such as ``beta`` is refused)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        grids = sweep.load_grids(path)
    assert grids and all(len(g.cells()) > 0 for g in grids)


def test_grid_files_yaml_and_json(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "name: study\nproblem: {name: beale}\ngrids:\n"
        "  - name: a\n    kind: online\n    fixed: {lr: 1e-3, steps: 10}\n"
        "    axes: {method: [hd, rtho], hypergrad_lr: [1e-7, 2e-7]}\n"
        "  - kind: train\n    fixed: {lr: 1e-3, steps: 5}\n    axes: {seed: [0]}\n")
    grids = sweep.load_grids(tmp_path / "g.yaml")
    assert [g.name for g in grids] == ["study/a", "study[1]"]
    assert grids[0].axes["hypergrad_lr"] == [1e-7, 2e-7]  # YAML 1.1 would read "1e-7" as a string
    assert isinstance(grids[0].fixed["lr"], float)
    (tmp_path / "g.json").write_text(json.dumps(grids[0].to_dict()))
    assert Grid.from_file(tmp_path / "g.json") == grids[0]
    with pytest.raises(ValueError, match="2 grids"):
        Grid.from_file(tmp_path / "g.yaml")


FIXED = {"lr": 0.1, "steps": 10}
BAD_GRIDS = [  # (changes to a valid grid, the error naming the offending key)
    ({"axes": {"method": ["hd", "sgdr"]}}, r"axes\.method\[1\].*'sgdr'"),
    ({"fixed": FIXED, "axes": {"method": ["hd"], "hypergrad_lr": [1e-3, -1e-3]}},
     r"axes\.hypergrad_lr\[1\]: hypergrad_lr must be a number ≥ 0"),
    ({"fixed": {**FIXED, "method": "marthe", "mu": 1.5}, "axes": {}}, r"fixed\.mu: mu must be a number in \[0, 1\]"),
    ({"axes": {"method": ["hd"], "seed": []}}, r"axes\.seed is empty"),
    ({"axes": {"method": "hd"}}, r"axes\.method must be a list"),
    ({"fixed": FIXED, "axes": {"hypergrad_lr": [1e-3, 1e-3]}}, r"axes\.hypergrad_lr repeats"),
    ({"axes": {"methd": ["hd"]}}, r"axes\.methd\[0\]: unknown key 'methd'"),
    ({"axes": {"lr0": [1e-3]}}, r"axes\.lr0\[0\]: unknown key 'lr0' for kind 'online' \('lr0' was renamed 'lr'"),
    ({"kind": "online2"}, r"kind: unknown cell kind 'online2'"),
    ({"problem": {"name": "bael"}}, r"problem\.name: unknown problem 'bael'"),
    ({"problem": {"name": "beale", "n_train": 10}}, r"problem\.n_train: unknown argument"),
    ({"fixed": {"steps": 10}}, r"'lr' is required"),
    ({"axes": {"method": ["hd", "rtho"], "mu": [0.5]}},
     r"cell \{'method': 'hd', 'mu': 0\.5\}: mu=0\.5 contradicts method='hd'"),
    ({"fixed": {**FIXED, "steps": 0}}, r"fixed\.steps: steps must be an integer ≥ 1"),
]


@pytest.mark.parametrize("change, message", BAD_GRIDS)
def test_malformed_grid_is_rejected_before_any_work(tmp_path, change, message):
    d = {"name": "bad", "problem": {"name": "beale"}, "kind": "online",
         "fixed": {**FIXED, "hypergrad_lr": 1e-3}, "axes": {"method": ["hd"]}, **change}
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
    recs = {(r["params"]["method"], r["params"]["hypergrad_lr"]): r for r in sweep.load_results(tmp_path)}
    direct = online.run(problems.get("beale"), "rtho", lr=1e-3, hypergrad_lr=1e-7, steps=60, seed=0,
                        keep_params=False)
    r = sweep.to_result(recs[("rtho", 1e-7)])
    assert isinstance(r, online.OnlineResult) and r.config == direct.config
    for k in ("lrs", "hypergrads", "val_losses", "mus", "hypergrad_lrs"):
        np.testing.assert_array_equal(getattr(r, k), getattr(direct, k))
    assert recs[("hd", 1e-3)]["status"] == "diverged"  # β = 1e-3 blows up on Beale
    assert recs[("hd", 1e-7)]["meta"]["timing"]["step_times"].shape == (60,)


def test_lrsopt_cell_matches_optimize_schedule_and_cleans_its_checkpoint(tmp_path):
    g = Grid("lrs", {"name": "beale"}, "lrsopt",
             fixed={"lr": 1e-3, "steps": 15, "outer_steps": 3, "outer_lr": 1e-4})
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
        calls.append([(c.params["hypergrad_lr"], c.params.get("seed")) for c in cells])
        return [online.run(problem_factory(c.seed), **{"seed": 0, **c.params}, keep_params=False)
                for c in cells]

    online_kind = sweep.CELL_KINDS["online"]
    monkeypatch.setitem(sweep.CELL_KINDS, "online", dataclasses.replace(online_kind, run_batch=run_online_batch))
    g = Grid("b", {"name": "beale"}, "online",
             axes={"method": ["hd", "rtho"], "hypergrad_lr": [1e-7, 2e-7]}, fixed={"lr": 1e-3, "steps": 20})
    assert sweep.run(g, tmp_path / "batched", progress=False).ok
    assert calls == [[(1e-7, None), (2e-7, None)]] * 2  # one call per method
    monkeypatch.setitem(sweep.CELL_KINDS, "online", dataclasses.replace(online_kind, run_batch=None))
    assert sweep.run(g, tmp_path / "plain", progress=False).ok
    a, b = sweep.load_results(tmp_path / "batched"), sweep.load_results(tmp_path / "plain")
    assert [x["meta"].get("batched") for x in a] == [2] * 4
    assert all(sweep.records_equal(x, y) for x, y in zip(a, b))

    def broken(problem_factory, cells):
        raise RuntimeError("vmap says no")

    monkeypatch.setitem(sweep.CELL_KINDS, "online", dataclasses.replace(online_kind, run_batch=broken))
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


# ----------------------------------------------------------------------------- the lease

def test_a_second_driver_is_told_who_holds_the_directory(tmp_path):
    store = Store(tmp_path)
    store.acquire("other-driver")
    with pytest.raises(sweep.StoreLockedError, match=rf"pid {os.getpid()} on .*driver\.lock"):
        sweep.run(train_grid(), tmp_path, progress=False)
    assert not store.done() and store.holds("other-driver")
    code = cli_main(["sweep", "--results-dir", str(tmp_path), "--no-progress", str(GRID_FILE)])
    assert code == 2
    store.release("other-driver")
    # a lease whose driver died (same host, pid gone) is taken over
    (tmp_path / "driver.lock").write_text(json.dumps({"token": "dead", "host": __import__("socket").gethostname(),
                                                       "pid": 2 ** 22 + 12345, "started": "then"}))
    assert sweep.run(train_grid(axes={"lr": [0.1]}), tmp_path, progress=False).ok
    assert store.holder() is None
    assert any(e["event"] == "lease_taken_over" for e in store.events())


def test_tasks_of_a_lost_lease_store_nothing_and_blind_workers_send_records_back(tmp_path):
    cells = train_grid(axes={"lr": [0.1]}).cells()
    status, payloads, info = sweep.ray_chunk([[c.to_dict()] for c in cells[:2]], str(tmp_path), 1,
                                              True, "no-such-lease", [])
    assert info["sees_store"] is False and status == {c.id: "computed" for c in cells[:2]}
    assert [p[0]["id"] for p in payloads] == [c.id for c in cells[:2]]
    assert not (tmp_path / "cells").exists()           # nothing written where it cannot see
    store = Store(tmp_path)
    store.acquire("mine")
    runner = sweep.Runner(store, "ray", 1, True, "mine")
    store.release("mine")                              # the driver cancelled
    with pytest.raises(sweep.LeaseLost):
        runner.run_groups([[cells[0]]])
    assert not store.done()


def test_add_grids_from_many_writers_keeps_every_grid(tmp_path):
    import threading
    grids = [train_grid(name=f"g{i}", fixed={"steps": 30 + i}) for i in range(8)]
    threads = [threading.Thread(target=Store(tmp_path).add_grids, args=([g],)) for g in grids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(g["name"] for g in Store(tmp_path).manifest()["grids"]) == sorted(g.name for g in grids)


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
    # batch groups are fixed by the grid: the same groups on every executor and chunk size
    assert [r["meta"].get("batched") for r in a] == [r["meta"].get("batched") for r in b]
    assert [r["meta"].get("batched") for r in b if r["kind"] == "online"] == [2] * 4
    assert os.getpid() not in {r["meta"]["pid"] for r in b}  # computed in the workers
    # the driver can also write (no shared filesystem): same records
    drv = sweep.run(grids[2], tmp_path / "driver", executor="ray", worker_writes=False, progress=False)
    assert drv.ok and all(sweep.records_equal(x, y) for x, y in
                          zip(sweep.load_results(tmp_path / "driver"), a[-2:]))
    assert {e.get("via") for e in Store(tmp_path / "driver").events()} == {"driver"}


def barrier_grid(tmp_path, seeds, name="barrier"):
    """Cells (seed, free) and (seed, gated) in grid order; gated cells block until released."""
    return Grid(name, {"name": "beale"}, "barrier",
                axes={"seed": list(seeds), "gate": [False, True]}, fixed={"dir": str(tmp_path / "barrier")})


def wait_until(predicate, what, timeout=60.0):
    """Poll (not a timed assertion): the condition is certain to hold, the deadline only stops a
    broken run from hanging the suite."""
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def process_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def kill_worker_of_a_gated_cell(barrier_dir):
    """SIGKILL the worker of a gated (blocked, unstored) cell; return (cell id, pid) once the
    process is gone."""
    wait_until(lambda: _barrier.started(barrier_dir), "a gated cell to start")
    cid, pid = sorted(_barrier.started(barrier_dir).items())[0]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: process_gone(pid), f"worker {pid} to die")
    return cid, pid


def test_ray_sweep_survives_a_killed_worker(tmp_path, ray_cluster):
    # two tasks of three cells: [0 free, 0 gated, 1 free], [1 gated, 2 free, 2 gated]. Both
    # block in a gated cell; one worker is killed there, then the barrier is released: the
    # killed task is retried, skips its stored cell and computes the rest.
    g = barrier_grid(tmp_path, range(3))
    store = Store(tmp_path / "ray")
    killed = {}

    def kill_then_release(done, total):
        if not killed:
            killed["id"], killed["pid"] = kill_worker_of_a_gated_cell(tmp_path / "barrier")
            _barrier.release(tmp_path / "barrier")

    report = sweep.run(g, store.root, executor="ray", chunk_size=3, progress=False,
                       callback=kill_then_release)
    assert killed and report.ok and len(report.computed) == 6
    assert store.done() == {c.id for c in g.cells()}
    assert set(finishes(store).values()) == {1}        # every cell finished exactly once
    assert starts(store)[killed["id"]] == 2            # the killed cell was started again
    assert store.read(killed["id"])["meta"]["pid"] != killed["pid"]


def test_ray_task_that_keeps_dying_is_reported_in_errors(tmp_path, ray_cluster):
    g = barrier_grid(tmp_path, [0])  # one task: [free, gated]; its worker dies, no retries
    killed = {}

    def kill(done, total):
        if not killed:
            killed["id"], _ = kill_worker_of_a_gated_cell(tmp_path / "barrier")

    report = sweep.run(g, tmp_path / "out", executor="ray", chunk_size=2, max_retries=0,
                       progress=False, callback=kill)
    assert list(report.failed) == [killed["id"]] and len(report.computed) == 1
    err = Store(tmp_path / "out").errors()[killed["id"]]  # where the CLI points to
    assert err["id"] == killed["id"] and err["meta"]["task_failed"]
    assert any(w in err["error"] for w in ("died", "Worker", "crash")), err["error"]


def test_interrupted_ray_driver_completes_only_missing_cells(tmp_path, ray_cluster):
    # four tasks [s free, s gated] on two CPUs: exactly two free cells finish, then both
    # running tasks block; the interrupt comes at done == 2 and the driver returns only once
    # the cancelled tasks are gone.
    g = barrier_grid(tmp_path, range(4))
    free = {c.id for c in g.cells() if not c.params["gate"]}

    def interrupt(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(g, tmp_path, executor="ray", chunk_size=2, progress=False, callback=interrupt)
    store = Store(tmp_path)
    first = store.done()
    assert len(first) == 2 and first <= free
    assert store.holder() is None                       # the lease was given back
    _barrier.release(tmp_path / "barrier")
    report = sweep.run(g, tmp_path, executor="ray", chunk_size=2, progress=False)
    assert report.ok and set(report.existing) == first
    assert set(report.computed) == {c.id for c in g.cells()} - first
    assert set(finishes(store).values()) == {1}
