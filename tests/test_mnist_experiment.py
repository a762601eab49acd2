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
    assert len(list((root / "data" / "online").glob("*.npz"))) == len(specs) * config.n_seeds
    assert len(list((root / "data" / "peers").glob("*.summary.json"))) == len(config.peers) * config.n_seeds
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
    arr = records.load_arrays(root / "data" / "online" / "hd_seed0.npz")
    assert arr["lrs"].shape == (len(config.betas), config.steps)
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
    # batched runs agree with single online.run calls
    assert summary["batched_check"]["runs_compared"] == len(specs)
    assert summary["batched_check"]["max_abs_accuracy_difference"] <= 0.01


def test_a_second_run_reuses_every_record(tiny, monkeypatch):
    root, summary = tiny
    files = {p: p.stat().st_mtime_ns for p in (root / "data").rglob("*") if p.is_file()}
    monkeypatch.setattr(mnist, "make_figures", lambda out: [])  # tested above; slow to redraw
    again = mnist.run(mnist.Config.tiny(), common.OutputDir(root), progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing recomputed or rewritten
    assert again["methods"] == summary["methods"] and again["lrsopt"] == summary["lrsopt"]


@pytest.mark.parametrize("field, value, match", [
    ("betas", (1e-2, -1.0), "betas must be positive"),
    ("lrsopt_seeds", 5, "lrsopt_seeds must be in"),
    ("lrsopt_optimizer", "newton", "lrsopt_optimizer must be one of"),
    ("peers", (("cosine", 0.1),), "peers entries"),
    ("mus", (1.5,), "mus must be in"),
    ("steps", 0, "steps must be ≥ 1"),
])
def test_bad_config_is_rejected_with_the_field_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(mnist.Config.tiny(), **{field: value})
