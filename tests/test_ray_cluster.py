"""Sweeps on a real two-node Ray cluster on one host (``ray start --head`` + ``ray start
--address``), killing a worker, a whole node and the driver. Barrier cells (``hgtoolkit._barrier``)
make every fault land at a known point. About 2 minutes, so not part of ``make test``::

    PYTHONPATH=$PWD .venv/bin/python -m pytest tests/test_ray_cluster.py --cluster -v

Ray ≥ 2.59 turns token authentication on for ``ray start --head``; joining nodes and drivers need
``RAY_AUTH_MODE=token`` and the token (here ``~/.ray/auth_token``, the same file on one host).
Every process started here is killed by process id (with its descendants) at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from hgtoolkit import _barrier
from hgtoolkit.sweep import Grid, Store

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def _env():
    return {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT),
            "RAY_DISABLE_USAGE_STATS": "1"}


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{p}/cmdline", "rb") as fh:
                    out[int(p)] = (ppid, fh.read().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _tree(roots: set[int]) -> set[int]:
    ps, found = _procs(), set(roots)
    grew = True
    while grew:
        grew = False
        for p, (pp, _) in ps.items():
            if pp in found and p not in found:
                found.add(p)
                grew = True
    return found


def _kill(pids) -> None:
    for p in sorted(pids):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_until(pred, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="hgrc", dir="/tmp"))  # short: socket paths
        self.port = _free_port()
        subprocess.run([str(RAY), "start", "--head", f"--port={self.port}", "--num-cpus=1",
                        f"--temp-dir={self.tmp}", "--include-dashboard=false", "--disable-usage-stats"],
                       env=_env(), check=True, capture_output=True)
        self.address = f"{socket.gethostbyname(socket.gethostname())}:{self.port}"
        self.address = self._head_address()
        self.worker_raylet = None

    def _head_address(self) -> str:
        for _, cmd in _procs().values():
            if str(self.tmp) in cmd and "gcs_server" in cmd:
                for part in cmd.split():
                    if part.startswith("--node_ip_address="):
                        return f"{part.split('=', 1)[1]}:{self.port}"
        return self.address

    def raylets(self) -> set[int]:
        return {p for p, (_, c) in _procs().items() if str(self.tmp) in c and "/raylet " in c + " "
                and "raylet/raylet" in c}

    def add_worker_node(self, cpus=2) -> None:
        before = self.raylets()
        subprocess.run([str(RAY), "start", f"--address={self.address}", f"--num-cpus={cpus}",
                        "--disable-usage-stats"], env=_env(), check=True, capture_output=True)
        new = self.raylets() - before
        assert len(new) == 1, new
        self.worker_raylet = new.pop()

    def kill_worker_node(self) -> None:
        _kill(_tree({self.worker_raylet}))
        wait_until(lambda: gone(self.worker_raylet), "the worker node's raylet to die")

    def shutdown(self) -> None:
        _kill(_tree({p for p, (_, c) in _procs().items() if str(self.tmp) in c}))
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def cluster():
    c = Cluster()
    try:
        c.add_worker_node()
        yield c
    finally:
        c.shutdown()


DRIVER = """
import json, sys
from hgtoolkit import _barrier, sweep
grid = sweep.Grid.from_dict(json.loads(sys.argv[1]))
report = sweep.run(grid, sys.argv[2], executor="ray", address=sys.argv[3], chunk_size=2, progress=False)
print("REPORT" + json.dumps({"ok": report.ok, "computed": report.computed, "existing": report.existing,
                            "failed": list(report.failed)}))
"""


def start_driver(grid: Grid, results: Path, cluster: Cluster) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(grid.to_dict()), str(results),
                             cluster.address], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(driver: subprocess.Popen, timeout=300) -> dict:
    out, err = driver.communicate(timeout=timeout)
    assert driver.returncode == 0, err[-3000:]
    return json.loads(out.split("REPORT", 1)[1])


def grid(tmp_path, seeds=range(3)):
    return Grid("cluster", {"name": "beale"}, "barrier", axes={"seed": list(seeds), "gate": [False, True]},
                fixed={"dir": str(tmp_path / "barrier")})


def counts(store, event):
    return Counter(e["id"] for e in store.events() if e["event"] == event)


def test_killed_worker_node(tmp_path, cluster):
    # three tasks [free, gated] on 1 + 2 CPUs; the worker node dies while its two gated cells
    # wait; Ray re-runs those tasks on the head node
    g, store = grid(tmp_path), Store(tmp_path / "out")
    driver = start_driver(g, store.root, cluster)
    wait_until(lambda: len(_barrier.started(tmp_path / "barrier")) == 3, "three gated cells to start")
    on_worker = {cid for cid, pid in _barrier.started(tmp_path / "barrier").items()
                 if pid in _tree({cluster.worker_raylet})}
    assert len(on_worker) == 2
    cluster.kill_worker_node()
    _barrier.release(tmp_path / "barrier")
    report = finish(driver)
    assert report["ok"] and len(report["computed"]) == 6
    assert set(counts(store, "finish").values()) == {1}
    assert all(counts(store, "start")[cid] == 2 for cid in on_worker)


def test_killed_worker_and_second_driver(tmp_path, cluster, capsys):
    g, store = grid(tmp_path), Store(tmp_path / "out")
    driver = start_driver(g, store.root, cluster)
    wait_until(lambda: len(_barrier.started(tmp_path / "barrier")) == 3, "three gated cells to start")
    # a second driver on the same directory is told who holds it (and computes nothing)
    from hgtoolkit.cli import main
    (tmp_path / "g.json").write_text(json.dumps(g.to_dict()))
    assert main(["sweep", str(tmp_path / "g.json"), "--results-dir", str(store.root), "--no-progress"]) == 2
    assert "in use by another sweep driver" in capsys.readouterr().err
    cid, pid = sorted(_barrier.started(tmp_path / "barrier").items())[0]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), "the worker to die")
    _barrier.release(tmp_path / "barrier")
    report = finish(driver)
    assert report["ok"] and len(report["computed"]) == 6
    assert set(counts(store, "finish").values()) == {1} and counts(store, "start")[cid] == 2


def test_killed_driver_then_rerun(tmp_path, cluster):
    g, store = grid(tmp_path), Store(tmp_path / "out")
    driver = start_driver(g, store.root, cluster)
    wait_until(lambda: len(_barrier.started(tmp_path / "barrier")) == 3, "three gated cells to start")
    first = store.done()
    assert len(first) == 3  # the free cells
    waiting = _barrier.started(tmp_path / "barrier")
    driver.kill()
    driver.wait()
    # Ray ends the tasks of a dead driver; only then is the barrier released
    wait_until(lambda: all(gone(pid) for pid in waiting.values()), "the dead driver's tasks to end")
    _barrier.release(tmp_path / "barrier")
    assert store.holder() is not None  # the dead driver's lease is left behind …
    report = finish(start_driver(g, store.root, cluster))
    assert report["ok"] and set(report["existing"]) == first  # … and taken over by the re-run
    assert set(report["computed"]) == {c.id for c in g.cells()} - first
    assert set(counts(store, "finish").values()) == {1}
    assert any(e["event"] == "lease_taken_over" for e in store.events())
