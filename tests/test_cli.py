"""Smoke tests of the ``hypergrad`` and ``lrsopt`` commands, run in-process with tiny settings."""
import json

import numpy as np
import pytest
import torch

from hgtoolkit import hypergradient, problems
from hgtoolkit.cli import main


def _read(path):
    with open(path) as fh:
        return json.load(fh)


def test_hypergrad_writes_json_and_figure(tmp_path):
    out = tmp_path / "hg"
    assert main(["hypergrad", "--problem", "beale", "--steps", "20", "--lr", "1e-3", "--out", str(out)]) == 0
    rec = _read(out / "hypergrad.json")
    assert (out / "hypergrad.png").stat().st_size > 10_000 and (out / "hypergrad.pdf").exists()
    expected = hypergradient(problems.from_function("beale"), torch.full((20,), 1e-3, dtype=torch.float64))
    assert rec["value"] == pytest.approx(float(expected.value), rel=1e-12)
    assert np.allclose(rec["grad"], expected.grad.numpy(), rtol=1e-12)
    assert rec["problem"]["name"] == "beale" and rec["settings"]["steps"] == 20 and rec["mode"] == "reverse"


def test_hypergrad_mlp_in_float32_forward_mode(tmp_path):
    out = tmp_path / "hg"
    code = main(["hypergrad", "--problem", "synthetic_mlp", "--problem-arg", "hidden=[4]",
                 "--problem-arg", "n_train=32", "--steps", "6", "--lr", "0.1", "--dtype", "float32",
                 "--mode", "forward", "--chunk-size", "4", "--optimizer", "momentum", "--out", str(out)])
    assert code == 0
    rec = _read(out / "hypergrad.json")
    assert rec["problem"]["dtype"] == "torch.float32" and rec["problem"]["hidden"] == [4]
    assert len(rec["grad"]) == 6 and all(np.isfinite(rec["grad"]))
    assert 0 <= rec["metrics"]["val_accuracy"] <= 1 and rec["optimizer"]["momentum"] == 0.9


def test_lrsopt_writes_result_figure_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "lo"
    args = ["lrsopt", "--problem", "beale", "--steps", "20", "--lr", "1e-3", "--outer-lr", "3e-4",
            "--no-progress", "--out", str(out), "--checkpoint-interval", "1"]
    assert main(args + ["--outer-steps", "3"]) == 0
    rec = _read(out / "lrsopt.json")
    assert len(rec["history"]) == 4 and rec["history"][-1] < rec["history"][0]
    assert rec["config"]["outer_optimizer"] == "adam" and rec["problem"]["name"] == "beale"
    for name in ("lrsopt.npz", "lrsopt.png", "lrsopt.pdf", "lrsopt.ckpt.pt"):
        assert (out / name).exists(), name
    assert main(args + ["--outer-steps", "5", "--resume"]) == 0
    resumed = _read(out / "lrsopt.json")
    assert len(resumed["history"]) == 6 and resumed["history"][:4] == rec["history"]
    # the optimised schedule feeds straight back into hypergrad
    assert main(["hypergrad", "--schedule", str(out / "lrsopt.npz"), "--out", str(tmp_path / "h")]) == 0
    assert _read(tmp_path / "h" / "hypergrad.json")["value"] == pytest.approx(resumed["best_value"], rel=1e-12)


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "hypergrad" in text and "lrsopt" in text
    with pytest.raises(SystemExit) as exc:
        main(["lrsopt", "--help"])
    assert exc.value.code == 0 and "--outer-optimizer" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["hypergrad", "--steps", "0"], "positive integer"),
    (["hypergrad", "--mode", "sideways"], "invalid choice"),
    (["lrsopt", "--outer-optimizer", "rmsprop"], "invalid choice"),
    (["lrsopt", "--lr", "-1"], "> 0"),
    (["hypergrad", "--problem-arg", "hidden"], "KEY=VALUE"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["hypergrad", "--problem", "nonesuch"], "unknown problem"),
    (["lrsopt", "--outer-optimizer", "sgd", "--no-progress"], "--outer-lr is required"),
    (["hypergrad", "--schedule", "missing.npy"], "does not exist"),
])
def test_bad_values_return_2_with_a_message(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_divergence_is_reported_not_raised(capsys, tmp_path):
    assert main(["hypergrad", "--problem", "beale", "--lr", "1", "--steps", "20", "--out", str(tmp_path)]) == 1
    assert "diverged" in capsys.readouterr().err
