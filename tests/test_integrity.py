"""One codec for every result (hgtoolkit.save / hgtoolkit.load) and its integrity: every record,
sweep cell and LRS-OPT checkpoint carries the sha256 of its payload, verified on load; a file with
one byte changed is refused ("corrupted", naming it); files written before checksums load with a
NoChecksumWarning."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import hgtoolkit
from hgtoolkit import analysis, baselines, hdm, lrsopt, online, problems, records, sweep, towers

LEGACY = Path(__file__).parent / "data" / "legacy_records"
BEALE = problems.get("beale")
ETA = lambda T: torch.full((T,), 1e-3, dtype=torch.float64)  # noqa: E731

RESULTS = {
    "HypergradResult": lambda: hgtoolkit.hypergradient(BEALE, ETA(6)),
    "OnlineResult": lambda: online.run(BEALE, "marthe", lr0=1e-3, beta=1e-7, steps=6),
    "ScheduleResult": lambda: hgtoolkit.optimize_schedule(BEALE, ETA(5), 2, 1e-4),
    "TowerResult": lambda: towers.run(BEALE, "sgd(lr=1e-4) / sgd(lr=1e-9)", 5),
    "PeerResult": lambda: baselines.run_peer(BEALE, "constant", 5, lr=1e-3),
    "HDMResult": lambda: hdm.run(lambda x: (x ** 2).sum(), torch.ones(3, dtype=torch.float64),
                                 hdm.HDMConfig(L=2.0), max_iter=3),
    "ApproximationReport": lambda: analysis.analyse_online(
        online.run(BEALE, "hd", lr0=1e-3, beta=1e-7, steps=5, keep_params=False), BEALE),
}


def _flip_digit(path: Path) -> None:
    """Change one digit of a JSON file (it stays valid JSON)."""
    text = path.read_text()
    m = re.search(r'"value": -?(\d)', text) or re.search(r"\d", text)
    i = m.start(1) if m.re.groups else m.start()
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def _flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_every_result_round_trips_through_hgtoolkit_save_and_load(name, tmp_path):
    r = RESULTS[name]()
    path = hgtoolkit.save(r, tmp_path / "r")
    assert isinstance(path, Path) and path == tmp_path / "r.json"  # one return type: the JSON written
    assert r.save(tmp_path / "s") == tmp_path / "s.json"           # the method, the same
    back = hgtoolkit.load(path)
    assert type(back) is type(r)
    a, b = records.to_dict(r), records.to_dict(back)
    assert a.keys() == b.keys()
    if name == "HypergradResult":  # tensors come back as tensors, bit for bit
        assert torch.equal(back.grad, r.grad) and torch.equal(back.value, r.value)
        assert torch.equal(back.params, r.params) and back.mode == r.mode


@pytest.mark.parametrize("part", ["json", "npz", "params.pt"])
def test_a_record_with_one_byte_changed_is_refused(part, tmp_path):
    r = online.run(BEALE, "marthe", lr0=1e-3, beta=1e-7, steps=6)
    path = hgtoolkit.save(r, tmp_path / "run")
    target = tmp_path / f"run.{part}"
    _flip_digit(target) if part == "json" else _flip_byte(target)
    with pytest.raises(records.CorruptedFileError, match=rf"run\.{re.escape(part)}: corrupted.*nothing of it"):
        hgtoolkit.load(path)


def test_a_sweep_cell_with_one_byte_changed_is_refused(tmp_path):
    g = sweep.Grid("o", {"name": "beale"}, "online", axes={"method": ["hd"]},
                   fixed={"lr0": 1e-3, "steps": 5, "beta": 1e-7})
    sweep.run([g], tmp_path, progress=False)
    (cell,) = g.cells()
    store = sweep.Store(tmp_path)
    assert store.read(cell.id)["arrays"]  # verified: no warning, no error
    _flip_byte(tmp_path / "cells" / f"{cell.id}.npz")
    with pytest.raises(records.CorruptedFileError, match=rf"{cell.id}\.npz: corrupted"):
        store.read(cell.id)
    _flip_digit(tmp_path / "cells" / f"{cell.id}.json")
    with pytest.raises(records.CorruptedFileError, match=rf"{cell.id}\.json: corrupted"):
        store.read(cell.id)


@pytest.mark.parametrize("name", ["online", "peer", "hdm", "lrsopt", "approximation", "towers"])
def test_records_written_before_checksums_load_with_a_warning(name):
    with pytest.warns(records.NoChecksumWarning, match=rf"{name}\.json: written before records carried checksums"):
        r = hgtoolkit.load(LEGACY / f"{name}.json")
    assert type(r).__name__ in {"OnlineResult", "PeerResult", "HDMResult", "ScheduleResult",
                                "ApproximationReport", "TowerResult"}


def test_a_saved_record_reads_back_without_a_warning(tmp_path, recwarn):
    path = hgtoolkit.save(RESULTS["TowerResult"](), tmp_path / "t")
    hgtoolkit.load(path)
    assert not [w for w in recwarn if issubclass(w.category, records.NoChecksumWarning)]


def test_seal_and_unseal():
    doc = records.seal({"a": 1.5, "b": [1, None], "c": np.arange(3)})
    assert doc["checksum"].startswith("sha256:") and doc["c"] == [0, 1, 2]
    assert records.unseal(doc, "x") == {"a": 1.5, "b": [1, None], "c": [0, 1, 2]}
    with pytest.raises(records.CorruptedFileError, match="x: corrupted"):
        records.unseal({**doc, "a": 2.5}, "x")
