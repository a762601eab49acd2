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
    "OnlineResult": lambda: online.run(BEALE, "marthe", lr=1e-3, hypergrad_lr=1e-7, steps=6),
    "ScheduleResult": lambda: hgtoolkit.optimize_schedule(BEALE, ETA(5), 2, 1e-4),
    "TowerResult": lambda: towers.run(BEALE, "sgd(lr=1e-4) / sgd(lr=1e-9)", 5),
    "PeerResult": lambda: baselines.run_peer(BEALE, "constant", 5, lr=1e-3),
    "HDMResult": lambda: hdm.run(lambda x: (x ** 2).sum(), torch.ones(3, dtype=torch.float64),
                                 hdm.HDMConfig(L=2.0), max_iter=3),
    "DataRecord": lambda: records.DataRecord({"function": "beale", "steps": 3}, {"lrs": np.ones((2, 3))}),
    "ApproximationReport": lambda: analysis.analyse_online(
        online.run(BEALE, "hd", lr=1e-3, hypergrad_lr=1e-7, steps=5, keep_params=False), BEALE),
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
    r = online.run(BEALE, "marthe", lr=1e-3, hypergrad_lr=1e-7, steps=6)
    path = hgtoolkit.save(r, tmp_path / "run")
    target = tmp_path / f"run.{part}"
    _flip_digit(target) if part == "json" else _flip_byte(target)
    with pytest.raises(records.CorruptedFileError, match=rf"run\.{re.escape(part)}: corrupted.*nothing of it"):
        hgtoolkit.load(path)


def test_a_sweep_cell_with_one_byte_changed_is_refused(tmp_path):
    g = sweep.Grid("o", {"name": "beale"}, "online", axes={"method": ["hd"]},
                   fixed={"lr": 1e-3, "steps": 5, "hypergrad_lr": 1e-7})
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


# ----------------------------------------------------------------------------- LRS-OPT checkpoints

def _lrsopt(path, resume=None, steps=3, **kw):
    return lrsopt.optimize_schedule(BEALE, ETA(5), steps, 1e-4, checkpoint_path=path, resume=resume,
                                    checkpoint_interval=1, progress=False, **kw)


def test_a_checkpoint_with_a_flipped_bit_is_refused_not_called_different(tmp_path):
    ckpt = tmp_path / "c.pt"
    _lrsopt(ckpt, steps=2)
    assert _lrsopt(ckpt, resume=True, steps=3).outer_steps_done == 3  # intact: resumes
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 3] ^= 0x10  # one bit, inside a tensor or the pickled config
    ckpt.write_bytes(bytes(data))
    with pytest.raises(records.CorruptedFileError, match=r"c\.pt.*corrupted.*nothing of it was used") as exc:
        _lrsopt(ckpt, resume=True, steps=4)
    assert "different arguments" not in str(exc.value)
    assert _lrsopt(ckpt, resume=False, steps=2).outer_steps_done == 2  # resume=False: afresh, replaced


def test_a_checkpoint_written_before_checksums_resumes_with_a_warning(tmp_path):
    ckpt = tmp_path / "c.pt"
    full = _lrsopt(tmp_path / "full.pt", steps=3)
    _lrsopt(ckpt, steps=2)
    payload = records.unseal_bytes(ckpt.read_bytes(), "c")
    ckpt.write_bytes(payload)  # the old format: the torch file alone
    with pytest.warns(records.NoChecksumWarning, match="written before checkpoints carried checksums"):
        resumed = _lrsopt(ckpt, resume=True, steps=3)
    np.testing.assert_array_equal(resumed.final_lrs, full.final_lrs)


def test_an_existing_checkpoint_needs_resume_and_a_directory_is_refused_before_any_work(tmp_path):
    ckpt = tmp_path / "c.pt"
    _lrsopt(ckpt, steps=1)
    with pytest.raises(ValueError, match=r"c\.pt' exists: pass resume=True.*resume=False"):
        _lrsopt(ckpt, steps=1)
    calls = []

    def objective(eta):
        calls.append(1)
        return (eta ** 2).sum(), 2 * eta
    with pytest.raises(ValueError, match="is a directory; expected a file path"):
        lrsopt.optimize_schedule(BEALE, ETA(5), 2, 1e-4, checkpoint_path=tmp_path, objective=objective,
                                 progress=False)
    assert not calls  # refused before the first evaluation


def test_a_float64_schedule_on_a_float32_problem_is_cast_with_a_warning():
    p32 = problems.from_function("beale", dtype=torch.float32)
    with pytest.warns(UserWarning, match="lrs is torch.float64 but the problem is torch.float32: the schedule is cast"):
        r = lrsopt.optimize_schedule(p32, ETA(5), 1, 1e-4, progress=False)
    assert r.final_lrs.dtype == np.float32


# ----------------------------------------------------------------------------- CLI values

def test_problem_arg_values_are_parsed_by_the_parameter_type(tmp_path, monkeypatch):
    """The user's make(batch: bool, n: int, scale: float) gets a bool, an int and a float (it
    asserts so); the refusals (batch=maybe, n=2.5, scale=big) are rows of the reliability table."""
    import sys
    from hgtoolkit.cli import main
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from reliability_cases import user_problem
    finally:
        sys.path.remove(str(Path(__file__).parent))
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = user_problem(tmp_path) + ["--steps", "3", "--lr", "0.01", "--out", str(tmp_path / "out")]
    assert main(argv + ["--problem-arg", "batch=true", "--problem-arg", "n=4", "--problem-arg", "scale=2"]) == 0


def test_an_empty_or_garbage_checkpoint_is_corrupted_not_old(tmp_path, recwarn):
    for content in (b"", b"garbage" * 10):
        (tmp_path / "c.pt").write_bytes(content)
        with pytest.raises(records.CorruptedFileError, match=r"c\.pt.*corrupted \(empty, or neither"):
            _lrsopt(tmp_path / "c.pt", resume=True)
    assert not [w for w in recwarn if issubclass(w.category, records.NoChecksumWarning)]
