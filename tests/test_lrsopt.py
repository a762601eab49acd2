"""LRS-OPT: it lowers f(η) of a constant schedule, its outer steps are the documented update
rules, divergence backtracks, and a resumed run reproduces an uninterrupted one bit for bit."""
import shutil

import numpy as np
import pytest
import torch

from hgtoolkit import hypergradient, problems, train
from hgtoolkit.lrsopt import ScheduleResult, adam_update, optimize_schedule

T_BEALE, LR_BEALE = 30, 1e-3


@pytest.fixture(scope="module")
def beale():
    return problems.from_function("beale")


@pytest.fixture(scope="module")
def mlp():
    return problems.synthetic_classification(n_train=48, n_val=32, hidden=(8,), batch_size=16)


def _const(T, lr, dtype=torch.float64):
    return torch.full((T,), lr, dtype=dtype)


def _run(problem, lrs, K, alpha, outer="adam", **kw):
    kw.setdefault("progress", False)
    return optimize_schedule(problem, lrs, K, alpha, outer, **kw)


# ----------------------------------------------------------------------------- it optimises

@pytest.mark.parametrize("outer, alpha", [("adam", 3e-4), ("sgd", 1e-6), ("lbfgsb", None)])
def test_lowers_final_loss_on_beale(beale, outer, alpha):
    lrs = _const(T_BEALE, LR_BEALE)
    f_const = float(train(beale, lrs).value)
    r = _run(beale, lrs, 8, alpha, outer)
    assert r.history[0] == pytest.approx(f_const, rel=1e-12)
    assert r.best_value < 0.9 * f_const
    assert float(train(beale, r.best_lrs).value) == pytest.approx(r.best_value, rel=1e-12)
    assert (r.final_lrs >= 0).all() and len(r.history) == r.outer_steps_done + 1
    assert r.n_evaluations >= r.outer_steps_done + 1


def test_lowers_validation_loss_of_small_mlp(mlp):
    lrs = _const(20, 0.05)
    r = _run(mlp, lrs, 10, 0.02)
    assert r.status == "completed"
    assert r.history[-1] < 0.8 * r.history[0]
    assert r.best_value == min(r.history)
    assert float(train(mlp, r.best_lrs).value) == pytest.approx(r.best_value, rel=1e-12)
    assert len(r.metrics) == 11 and "val_accuracy" in r.metrics[-1]


def test_resampled_minibatches_still_lower_the_loss(mlp):
    lrs = _const(20, 0.05)
    r = _run(mlp, lrs, 10, 0.02, resample_batches=True, seed=3)
    assert len(set(r.batch_seeds.tolist())) == 11  # a new order per evaluation
    # judged on the problem's own minibatch order, which LRS-OPT never trained on here
    assert float(train(mlp, r.final_lrs).value) < 0.8 * float(train(mlp, lrs).value)


# ----------------------------------------------------------------------------- the update rules

def test_sgd_outer_step_is_projected_gradient_step(beale):
    lrs = _const(T_BEALE, LR_BEALE)
    g0 = hypergradient(beale, lrs).grad
    alpha = 1e-6
    r = _run(beale, lrs, 1, alpha, "sgd")
    # (dynamics.SGD applied to η: one fused multiply-add, so equal up to the last bit)
    np.testing.assert_allclose(r.final_lrs, (lrs - alpha * g0).clamp(min=0).numpy(), rtol=1e-14, atol=0)


def test_adam_outer_step_matches_the_formula(beale):
    lrs = _const(T_BEALE, LR_BEALE)
    g0 = hypergradient(beale, lrs).grad
    alpha = 1e-4
    r = _run(beale, lrs, 1, alpha, "adam")
    m, v = (1 - 0.9) * g0, (1 - 0.999) * g0 * g0
    expected = lrs - alpha * (m / (1 - 0.9)) / ((v / (1 - 0.999)).sqrt() + 1e-8)
    assert np.allclose(r.final_lrs, expected.clamp(min=0).numpy(), rtol=1e-14, atol=0)
    assert r.outer_state["n"] == 1 and np.array_equal(r.outer_state["m"], m.numpy())
    # the pure rule does not mutate its input state
    state = {"m": torch.zeros(3), "v": torch.zeros(3), "n": 0}
    adam_update(torch.ones(3), torch.ones(3), state, 0.1)
    assert state["n"] == 0 and not state["m"].any()


def test_projection_clips_at_zero_and_lr_max(beale):
    lrs = _const(T_BEALE, LR_BEALE)
    g0 = hypergradient(beale, lrs).grad
    assert (g0 < 0).all()  # every η_t wants to grow: use −g to push them below zero
    r = _run(beale, lrs, 1, 1e-3, "adam", lr_max=1.5e-3)
    assert np.array_equal(r.final_lrs, np.full(T_BEALE, 1.5e-3))
    flipped = problems.Problem(beale.params0, beale.train_loss, lambda w: -beale.val_loss(w))
    r = _run(flipped, lrs, 1, 1e-2, "adam")  # f ↦ −f: the step goes the other way
    assert np.array_equal(r.final_lrs, np.zeros(T_BEALE))


# ----------------------------------------------------------------------------- divergence

def test_divergence_halves_the_outer_step_and_continues(beale):
    lrs = _const(T_BEALE, LR_BEALE)
    r = _run(beale, lrs, 3, 0.01, "sgd")  # η ≈ 0.18 diverges (η = 0.05 already does)
    assert r.status == "completed" and r.outer_steps_done == 3
    assert r.events and all("diverged" in e["error"] for e in r.events)
    assert r.outer_state["lr_scale"] == 0.5 ** len(r.events) < 1
    assert np.isfinite(r.history).all()
    assert r.n_evaluations == 4 + len(r.events)


def test_divergence_without_backtracking_stops_with_a_warning(beale):
    lrs = _const(T_BEALE, LR_BEALE)
    with pytest.warns(RuntimeWarning, match="diverged"):
        r = _run(beale, lrs, 3, 0.01, "sgd", max_backtracks=0)
    assert r.status.startswith("diverged") and r.outer_steps_done == 0
    assert np.array_equal(r.final_lrs, lrs.numpy())


def test_diverging_initial_schedule_is_reported(beale):
    with pytest.raises(FloatingPointError, match="lrs diverges"):
        _run(beale, _const(T_BEALE, 1.0), 2, 1e-4)


# ----------------------------------------------------------------------------- checkpoints

def _assert_same_run(a: ScheduleResult, b: ScheduleResult):
    for name in ScheduleResult._ARRAYS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert np.array_equal(a.evaluations[:, 1], b.evaluations[:, 1])  # (wall s, f): clocks differ
    assert a.outer_state.keys() == b.outer_state.keys()
    for k in a.outer_state:
        assert np.array_equal(a.outer_state[k], b.outer_state[k]), k
    assert (a.best_value, a.best_step, a.outer_steps_done, a.n_evaluations, a.metrics) == \
           (b.best_value, b.best_step, b.outer_steps_done, b.n_evaluations, b.metrics)


def test_resume_after_interrupt_is_bitwise_identical(mlp, tmp_path):
    lrs = _const(16, 0.05)
    kw = dict(resample_batches=True, seed=1, snapshot_every=2, checkpoint_interval=5)
    full = _run(mlp, lrs, 12, 0.02, **kw)

    ckpt, killed = tmp_path / "run.pt", tmp_path / "killed_at_5.pt"

    def interrupt(step, lrs, value, grad):
        if step == 5:  # the periodic checkpoint was just written: keep it as a "hard kill" copy
            shutil.copy(ckpt, killed)
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(mlp, lrs, 12, 0.02, checkpoint_path=ckpt, callback=interrupt, **kw)
    assert torch.load(ckpt, weights_only=True)["state"]["k"] == 7  # saved on the way out
    assert torch.load(killed, weights_only=True)["state"]["k"] == 5

    for path in (ckpt, killed):  # resume from the interrupt, and from the older periodic checkpoint
        resumed = _run(mlp, lrs, 12, 0.02, checkpoint_path=path, resume=True, **kw)
        _assert_same_run(full, resumed)
        assert resumed.outer_state["n"] == 12 and resumed.status == "completed"


def test_resume_to_more_outer_steps_equals_one_long_run(beale, tmp_path):
    lrs = _const(T_BEALE, LR_BEALE)
    full = _run(beale, lrs, 6, 3e-4)
    ckpt = tmp_path / "c.pt"
    part = _run(beale, lrs, 4, 3e-4, checkpoint_path=ckpt)
    assert part.outer_steps_done == 4
    resumed = _run(beale, lrs, 6, 3e-4, checkpoint_path=ckpt, resume=True)
    _assert_same_run(full, resumed)
    again = _run(beale, lrs, 6, 3e-4, checkpoint_path=ckpt, resume=True)  # nothing left to do
    assert again.n_evaluations == full.n_evaluations and np.array_equal(again.final_lrs, full.final_lrs)
    with pytest.raises(ValueError, match="outer_steps"):
        _run(beale, lrs, 3, 3e-4, checkpoint_path=ckpt, resume=True)


def test_resume_rejects_a_checkpoint_of_another_run(beale, tmp_path):
    lrs = _const(T_BEALE, LR_BEALE)
    ckpt = tmp_path / "c.pt"
    _run(beale, lrs, 2, 3e-4, checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="outer_lr"):
        _run(beale, lrs, 3, 1e-4, checkpoint_path=ckpt, resume=True)
    with pytest.raises(ValueError, match="optimizer"):
        _run(beale, lrs, 3, 3e-4, checkpoint_path=ckpt, resume=True, optimizer="momentum")
    with pytest.raises(ValueError, match="lrs"):
        _run(beale, lrs * 2, 3, 3e-4, checkpoint_path=ckpt, resume=True)


def test_resume_without_a_checkpoint_starts_fresh(beale, tmp_path):
    lrs = _const(T_BEALE, LR_BEALE)
    ckpt = tmp_path / "sub" / "none_yet.pt"
    r = _run(beale, lrs, 2, 3e-4, checkpoint_path=ckpt, resume=True)
    assert r.outer_steps_done == 2 and ckpt.exists()


def test_lbfgsb_resume_is_best_effort(beale, tmp_path):
    lrs = _const(T_BEALE, LR_BEALE)
    ckpt = tmp_path / "l.pt"
    first = _run(beale, lrs, 3, None, "lbfgsb", checkpoint_path=ckpt)
    assert first.outer_steps_done == 3
    resumed = _run(beale, lrs, 6, None, "lbfgsb", checkpoint_path=ckpt, resume=True)
    assert resumed.outer_steps_done == 6 and np.array_equal(resumed.history[:4], first.history)
    assert resumed.history[-1] <= first.history[-1]


# ----------------------------------------------------------------------------- record, callback

def test_save_load_roundtrip(beale, tmp_path):
    r = _run(beale, _const(T_BEALE, LR_BEALE), 3, 3e-4, snapshot_every=2)
    assert r.snapshot_steps.tolist() == [0, 2, 3]
    r.save(tmp_path / "res")
    back = ScheduleResult.load(tmp_path / "res.json")
    _assert_same_run(r, back)
    assert back.config == r.config and back.status == r.status


def test_callback_can_stop_the_run(beale):
    seen = []

    def cb(step, lrs, value, grad):
        seen.append((step, value))
        lrs.zero_()  # a copy: must not affect the run
        return step == 2

    r = _run(beale, _const(T_BEALE, LR_BEALE), 10, 3e-4, callback=cb)
    assert r.status == "stopped by callback" and r.outer_steps_done == 2
    assert [s for s, _ in seen] == [1, 2] and seen[-1][1] == r.history[-1]
    assert (r.final_lrs > 0).all()


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    (dict(outer_steps=0), "outer_steps"),
    (dict(outer_lr=-1.0), "outer_lr"),
    (dict(outer_lr=None, outer_optimizer="sgd"), "outer_lr"),
    (dict(outer_optimizer="rmsprop"), "rmsprop"),
    (dict(mode="sideways"), "mode"),
    (dict(resume=True), "checkpoint_path"),
    (dict(lr_max=1e-4), "lr_max"),
    (dict(outer_options={"beta3": 0.5}), "beta3"),
    (dict(checkpoint_interval=0), "checkpoint_interval"),
    (dict(outer_optimizer="lbfgsb", resample_batches=True), "resample_batches"),
    (dict(disk=3), "disk"),
    (dict(disk=True, checkpoint=4), "disk"),
    (dict(disk=True, mode="forward"), "disk"),
])
def test_bad_arguments_are_named(mlp, kwargs, match):
    args = dict(outer_steps=2, outer_lr=1e-3, outer_optimizer="adam")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        optimize_schedule(mlp, _const(5, 1e-3), args.pop("outer_steps"), args.pop("outer_lr"),
                          args.pop("outer_optimizer"), progress=False, **args)


def test_disk_snapshots_give_the_same_schedule_bit_for_bit(beale, tmp_path, monkeypatch):
    """disk= reaches every evaluation's reverse pass: a budget that holds no binomial snapshot
    puts them all on disk, and the schedule is the one computed in memory."""
    from hgtoolkit import checkpointing
    lrs, kw = _const(20, LR_BEALE), dict(optimizer="momentum", checkpoint="binomial", snapshots=4)
    ram = hypergradient(beale, lrs, "momentum", checkpoint="binomial", snapshots=4)
    state = 2 * ram.params.numel() * ram.params.element_size()  # w and the momentum buffer
    budget = int(checkpointing.ALLOCATOR_SLACK * (ram.memory_estimate - (ram.snapshots - 0.5) * state))
    alone = hypergradient(beale, lrs, "momentum", checkpoint="binomial", snapshots=4, memory=budget, disk=True)
    assert (alone.snapshots, alone.disk_snapshots) == (0, 4)  # every snapshot on disk
    writes, put = [], checkpointing.DiskSnapshots.put
    monkeypatch.setattr(checkpointing.DiskSnapshots, "put", lambda self, n, s: (writes.append(n), put(self, n, s)))
    plain = _run(beale, lrs, 2, 1e-4, **kw)
    assert writes == []
    on_disk = _run(beale, lrs, 2, 1e-4, memory=budget, disk=tmp_path, **kw)
    assert len(writes) >= 3 * 3 and list(tmp_path.iterdir()) == []  # 3 evaluations, files removed
    assert np.array_equal(on_disk.final_lrs, plain.final_lrs) and np.array_equal(on_disk.history, plain.history)
    assert np.array_equal(_run(beale, lrs, 2, 1e-4, memory=budget, disk=True, **kw).final_lrs, plain.final_lrs)


def test_resampling_needs_a_resampling_problem(beale):
    with pytest.raises(ValueError, match="resample"):
        _run(beale, _const(5, 1e-3), 2, 1e-4, resample_batches=True)


def test_every_evaluation_is_logged_with_its_time(beale, tmp_path):
    r = _run(beale, _const(T_BEALE, LR_BEALE), 4, None, "lbfgsb")
    assert r.evaluations.shape == (r.n_evaluations, 2)
    assert np.all(np.diff(r.evaluations[:, 0]) >= 0)
    assert set(r.history) <= set(r.evaluations[:, 1])  # accepted iterates are among the evaluations
    r.save(tmp_path / "run")
    assert np.array_equal(ScheduleResult.load(tmp_path / "run").evaluations, r.evaluations)


def test_full_scale_experiment_tiny_setting_runs_and_resumes(tmp_path):
    from hgtoolkit.experiments import lrsopt_full, run_experiment
    s = run_experiment("lrsopt", setting="tiny", out=tmp_path, progress=False)
    assert set(s["runs"]) == {"lbfgsb_seed0", "adam_seed0"}
    for m in s["runs"].values():
        w = m["within_1pct"]
        assert 1 <= w["evaluations"] <= m["n_evaluations"] and m["best_value"] < m["f_initial"]
    assert (tmp_path / "lrsopt" / "figures" / "schedules.png").exists()
    again = run_experiment("lrsopt", setting="tiny", out=tmp_path, progress=False)  # read back
    assert again["runs"]["lbfgsb_seed0"]["wall_time"] == s["runs"]["lbfgsb_seed0"]["wall_time"]
    ev = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.01], [4.0, 1.0]])
    assert lrsopt_full.time_to_within(ev) == {"best": 1.0, "evaluations": 3, "seconds": 3.0}


def test_adam_outer_lr_defaults_to_a_tenth_of_the_schedule(mlp):
    r = optimize_schedule(mlp, _const(5, 1e-3), 2, outer_optimizer="adam", progress=False)
    assert r.config["outer_lr"] == pytest.approx(1e-4) and r.outer_steps_done == 2
