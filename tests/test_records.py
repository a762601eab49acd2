"""The record codec (hgtoolkit.records): round trips, kinds, versions, old formats, bad files."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import hgtoolkit
from hgtoolkit import analysis, baselines, errors, hdm, lrsopt, online, problems, records, sweep, towers

LEGACY = Path(__file__).parent / "data" / "legacy_records"
nan, inf = math.nan, math.inf


def _params():
    return {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": [torch.tensor([1.5, -2.0])],
            "n": torch.tensor(3)}


def _run_arrays(n):
    rng = np.random.default_rng(n)
    return dict(lrs=rng.random(n), train_losses=np.r_[rng.random(n - 1), nan],
                eval_steps=np.arange(n + 1, dtype=np.int64), val_losses=np.r_[rng.random(n), inf])


def make_online():
    a = _run_arrays(5)
    return online.OnlineResult(config={"method": "hd", "lr": 0.1, "problem": {"name": "x"}}, **a,
                               hypergrad_lrs=np.full(5, 1e-3), mus=np.zeros(5), hypergrads=np.r_[np.ones(4), nan],
                               val_accuracy=np.linspace(0, 1, 6), step_times=np.cumsum(np.ones(5)),
                               final_lr=nan, diverged_at=4, divergence="loss is not finite", wall_time=1.25,
                               final_params=_params(), hypergrad_lr_capped=2)


def make_peer():
    return baselines.PeerResult(config={"method": "constant"}, **_run_arrays(4), val_accuracy=None,
                                wall_time=0.5, final_params=None)


def make_hdm():
    a = _run_arrays(3)
    return hdm.HDMResult(config={"method": "hdm"}, lrs=a["lrs"], momentums=np.ones(3), val_losses=np.ones(4),
                         eval_steps=np.arange(4), grad_inf=np.ones(4), grad_evals=np.arange(4),
                         accepted=np.array([1, 0, 1]), feedback=np.zeros(3), train_losses=np.ones(3),
                         solved_at=nan, total_grad_evals=4.0, total_f_evals=5.0,
                         final_params=torch.tensor([1.0, 2.0]))


def make_lrsopt():
    eta = np.linspace(1e-3, 2e-3, 6)
    return lrsopt.ScheduleResult(
        initial_lrs=eta, final_lrs=eta * 2, best_lrs=eta * 3, best_value=0.5, best_step=1,
        history=np.array([1.0, 0.5, nan]), grad_norms=np.array([3.0, 2.0, 1.0]),
        snapshot_steps=np.array([0, 2], dtype=np.int64), snapshots=np.stack([eta, eta * 2]),
        outer_state={"m": eta * 0.1, "v": eta ** 2, "n": 2, "lr_scale": 0.5}, n_evaluations=3,
        outer_steps_done=2, wall_time=0.25, status="completed", config={"outer_lr": 1e-4},
        problem={"name": "beale"}, metrics=[None, {"val_accuracy": 0.5}, {"val_accuracy": 0.75}],
        batch_seeds=np.array([-1, -1, -1], dtype=np.int64), events=[{"step": 1, "lr_scale": 0.5}],
        evaluations=np.array([[0.1, 1.0], [0.2, nan]]))


def make_approximation():
    rng = np.random.default_rng(0)
    v = {k: rng.standard_normal(5) for k in ("lrs", "estimates", "one_step", "constant_lr", "full_horizon",
                                             "val_losses", "train_losses")}
    v["estimates"][-1] = nan
    return analysis.ApproximationReport(
        **v, per_step={"one_step": {"rel_err": rng.random(5), "ratio": np.r_[rng.random(4), nan]}},
        summary={"one_step": {"cosine": 0.5, "pearson": nan}, "lr_update": {"n_steps": 4}},
        info={"label": "HD", "problem": {"name": "beale"}, "T": 5})


def make_towers():
    return towers.run(problems.get("beale"), "sgd(lr=1e-4, momentum=0.5) / sgd(lr=1e-9)", 4)


def make_hypergradient():
    return hgtoolkit.hypergradient(problems.get("beale"), torch.full((5,), 1e-3, dtype=torch.float64))


def make_data():
    return records.DataRecord({"function": "beale", "best": np.array([1.0, nan]), "n": 3},
                              {"lrs": np.arange(6.0).reshape(2, 3), "labels": np.array(["HD", "RTHO"])})


MAKERS = {"data": make_data, "hypergradient": make_hypergradient, "online": make_online, "peer": make_peer, "hdm": make_hdm, "lrsopt": make_lrsopt,
          "approximation": make_approximation, "towers": make_towers}


def assert_same(a, b, where="record"):
    """Equal values; arrays bit-equal (dtype, shape, bytes); tensors equal; NaN == NaN."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def test_every_registered_kind_has_a_round_trip_test():
    assert set(records.kinds()) == set(MAKERS)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_round_trip_is_exact(kind, tmp_path):
    obj = MAKERS[kind]()
    js = records.save(obj, tmp_path / "r")
    doc = json.loads(js.read_text())
    assert (doc["format"], doc["kind"], doc["version"]) == ("hgtoolkit.record", kind, records.spec(kind).version)
    back = records.load(tmp_path / "r.json")
    assert type(back) is type(obj)
    assert_same(records.to_dict(obj), records.to_dict(back))
    assert_same(records.to_dict(obj), records.to_dict(type(obj).load(tmp_path / "r")))  # the shim
    # in memory, the same codec: split → JSON text → join
    d, arrays = records.split_arrays(records.to_dict(obj))
    again = records.from_dict(records.join_arrays(json.loads(json.dumps(d)), arrays))
    assert_same(records.to_dict(obj), records.to_dict(again))


def test_files_are_plain_json_npz_and_a_weights_only_tensor_file(tmp_path):
    r = make_online()
    js = r.save(tmp_path / "run.json")
    assert js == tmp_path / "run.json"
    assert {p.name for p in tmp_path.iterdir()} == {"run.json", "run.npz", "run.params.pt"}
    with np.load(tmp_path / "run.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["lrs"], r.lrs)
        assert "step_times" not in z.files  # wall times: JSON only, so identical runs give identical npz
    params = torch.load(tmp_path / "run.params.pt", weights_only=True)
    assert_same(params, r.final_params)
    doc = json.loads(js.read_text())
    assert doc["best_val_loss"] == r.best_val_loss and doc["final_lr"] is None  # NaN → null → NaN
    assert doc["files"] == {"arrays": "run.npz", "params": "run.params.pt"}


def test_parameters_that_weights_only_loading_refuses_are_rejected(tmp_path):
    r = make_peer()
    r.final_params = {"w": torch.ones(2), "opt": object()}
    with pytest.raises(TypeError, match="weights_only"):
        r.save(tmp_path / "p")
    with pytest.raises(TypeError, match="object arrays"):
        records.split_arrays({"x": np.array([{}, 1], dtype=object)})


def test_readable_arrays_load_from_the_json_alone(tmp_path):
    rep = make_approximation()
    js = rep.save(tmp_path / "rep")
    npz = js.with_suffix(".npz")
    npz.unlink()
    assert_same(records.to_dict(rep), records.to_dict(records.load(js)))
    r = make_online()  # its arrays are not copied into the JSON: the npz is needed
    r.save(tmp_path / "o")
    (tmp_path / "o.npz").unlink()
    with pytest.raises(ValueError, match="o.npz is missing"):
        records.load(tmp_path / "o")


def test_wrong_kind_names_both_kinds_and_how_to_redo(tmp_path):
    make_online().save(tmp_path / "o")
    with pytest.raises(ValueError, match=r"'online' record.*not the 'lrsopt' record.*ScheduleResult.*hgtoolkit lrsopt"):
        lrsopt.ScheduleResult.load(tmp_path / "o")
    with pytest.raises(ValueError, match=r"'online'.*'peer'"):
        records.load(tmp_path / "o.json", kind="peer")
    with pytest.raises(ValueError, match="unknown record kind 'nope'"):
        records.load(tmp_path / "o.json", kind="nope")


def _edit(path, **changes):
    """A record written with other values (sealed again: its checksum matches)."""
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(records.seal(doc)))


def test_unknown_kind_and_unreadable_versions(tmp_path):
    js = make_online().save(tmp_path / "o")
    _edit(js, kind="bogus")
    with pytest.raises(ValueError, match=r"unknown kind 'bogus'"):
        records.load(js)
    v = records.spec("online").version
    _edit(js, kind="online", version=v + 1)
    with pytest.raises(ValueError, match=rf"version {v + 1}, written by a newer hgtoolkit.*reads version {v}.*upgrade"):
        online.OnlineResult.load(js)
    _edit(js, version=0)  # older than any migration
    with pytest.raises(ValueError, match=r"version 0, which this hgtoolkit cannot read.*hgtoolkit online"):
        online.OnlineResult.load(js)
    _edit(js, version="2")
    with pytest.raises(ValueError, match="no valid version"):
        records.load(js)


@pytest.mark.parametrize("content", [b'{"format": "hgtoolkit.record", "kind": "onl', b"", b"\x80\x81garbage", b"[1, 2]"])
def test_corrupt_json_is_a_clear_value_error(tmp_path, content):
    (tmp_path / "r.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"r\.json"):
        records.load(tmp_path / "r.json", kind="online")


def test_corrupt_npz_params_or_fields_are_clear_value_errors(tmp_path):
    js = make_online().save(tmp_path / "o")
    full = (tmp_path / "o.npz").read_bytes()
    (tmp_path / "o.npz").write_bytes(full[: len(full) // 2])
    with pytest.raises(records.CorruptedFileError, match=r"o\.npz: corrupted.*hgtoolkit online"):
        records.load(js)
    (tmp_path / "o.npz").write_bytes(full)
    (tmp_path / "o.params.pt").write_bytes(b"PK\x03\x04 not a tensor file")
    with pytest.raises(records.CorruptedFileError, match=r"o\.params\.pt: corrupted.*hgtoolkit online"):
        records.load(js)
    (tmp_path / "o.params.pt").unlink()
    with pytest.raises(ValueError, match=r"parameter file is missing"):
        records.load(js)
    js = make_peer().save(tmp_path / "p")
    doc = json.loads(js.read_text())
    del doc["config"]
    js.write_text(json.dumps(records.seal(doc)))
    with pytest.raises(ValueError, match=rf"cannot read this 'peer' record \(PeerResult\) of version {records.spec('peer').version} .*'config'"):
        records.load(js)


def test_register_refuses_clashing_or_unknown_fields():
    import dataclasses

    @dataclasses.dataclass
    class Bad:
        version: int = 1

    with pytest.raises(ValueError, match="clash"):
        records.register("bad_kind", version=1, redo="-")(Bad)
    @dataclasses.dataclass
    class Plain:
        x: int = 1

    with pytest.raises(ValueError, match="params names no field"):
        records.register("bad_kind", version=1, redo="-", params="weights")(Plain)
    assert "bad_kind" not in records.kinds()


# ----------------------------------------------------------------------------- old formats

LEGACY_FILES = {"online": online.OnlineResult, "online_noparams": online.OnlineResult, "peer": baselines.PeerResult,
                "hdm": hdm.HDMResult, "lrsopt": lrsopt.ScheduleResult,
                "approximation": analysis.ApproximationReport, "towers": towers.TowerResult}


@pytest.mark.parametrize("name", sorted(LEGACY_FILES))
def test_records_written_before_the_codec_load_through_a_migration(name, tmp_path):
    cls = LEGACY_FILES[name]
    old = json.loads((LEGACY / f"{name}.json").read_text())
    r = cls.load(LEGACY / name)
    assert type(r) is cls and type(records.load(LEGACY / f"{name}.json")) is cls
    if (LEGACY / f"{name}.npz").exists():  # the old npz held the arrays exactly
        with np.load(LEGACY / f"{name}.npz", allow_pickle=False) as z:
            for key in z.files:
                obj, attr = (r.outer_state, key.split(".", 1)[1]) if key.startswith("outer_state.") else (r, key)
                attr = getattr(cls, "RENAMED_FIELDS", {}).get(attr, attr)  # betas → hypergrad_lrs
                if key.startswith("per_step."):
                    _, ref, metric = key.split(".")
                    got = r.per_step[ref][metric]
                else:
                    got = obj[attr] if isinstance(obj, dict) else getattr(obj, attr)
                np.testing.assert_array_equal(got, z[key], err_msg=key)
    if (LEGACY / f"{name}.params.pt").exists():
        assert_same(r.final_params, torch.load(LEGACY / f"{name}.params.pt", weights_only=True))
    if name == "towers":
        assert str(r.tower) == old["history"]["tower"] and r.value == old["value"]
        assert len(r.history) == old["steps"] and r.params is None
    if name == "lrsopt":
        assert r.evaluations.shape == (3, 2) and r.wall_time == old["wall_time"]
    # saved again, it is a current record that reads back the same
    records.save(r, tmp_path / "again")
    assert_same(records.to_dict(r), records.to_dict(cls.load(tmp_path / "again")))


def test_old_hdm_records_load_with_betas_renamed_momentums():
    # the legacy file (before the codec): its array "betas" and config keys beta0/beta_max
    r = hdm.HDMResult.load(LEGACY / "hdm")
    with np.load(LEGACY / "hdm.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(r.momentums, z["betas"])
    old = json.loads((LEGACY / "hdm.json").read_text())["config"]
    assert r.config["momentum_init"] == old["beta0"] and r.config["momentum_max"] == old["beta_max"]
    assert not {"beta0", "beta_max", "hypergrad_lr_init"} & set(r.config)
    # a version-4 record (before the rename): field betas, config keys beta0/beta_max
    d = records.to_dict(make_hdm())
    assert d["version"] == 5
    d["version"], d["betas"] = 4, d.pop("momentums")
    d["config"] = {**d["config"], "beta0": 0.9, "beta_max": 0.99}
    back = records.from_dict(d, kind="hdm")
    np.testing.assert_array_equal(back.momentums, np.ones(3))
    assert back.config == {"method": "hdm", "momentum_init": 0.9, "momentum_max": 0.99}
    assert not hasattr(back, "betas")


def test_an_old_record_of_another_kind_is_refused_with_the_message(tmp_path):
    with pytest.raises(ValueError, match=r"old 'online' record.*not the 'towers' record.*hgtoolkit towers"):
        towers.TowerResult.load(LEGACY / "online.json")
    with pytest.raises(ValueError, match=r"format 'hgtoolkit.sweep.cell/1'.*expected a 'lrsopt' record"):
        lrsopt.ScheduleResult.load(LEGACY / "sweep_cells" / "lrsopt.json")
    (tmp_path / "x.json").write_text('{"format": "hgtoolkit.ScheduleResult/1"}')  # an old file, incomplete
    with pytest.raises(ValueError, match=r"cannot read this 'lrsopt' record.*version 1.*missing.*hgtoolkit lrsopt"):
        lrsopt.ScheduleResult.load(tmp_path / "x.json")


# ----------------------------------------------------------------------------- sweep cells

@pytest.mark.parametrize("kind", ["online", "lrsopt"])
def test_old_sweep_cells_still_give_their_result_objects(kind, tmp_path):
    old = json.loads((LEGACY / "sweep_cells" / f"{kind}.json").read_text())
    (tmp_path / "cells").mkdir()
    for ext in ("json", "npz"):
        shutil.copy(LEGACY / "sweep_cells" / f"{kind}.{ext}", tmp_path / "cells" / f"{old['id']}.{ext}")
    rec = sweep.Store(tmp_path).read(old["id"])
    r = sweep.to_result(rec)
    assert type(r) is records.spec(kind).cls
    for k, v in rec["arrays"].items():
        obj, attr = (r.outer_state, k.split(".", 1)[1]) if k.startswith("outer_state.") else (r, k)
        attr = getattr(type(r), "RENAMED_FIELDS", {}).get(attr, attr)  # betas → hypergrad_lrs
        np.testing.assert_array_equal(obj[attr] if isinstance(obj, dict) else getattr(obj, attr), v)
    renamed = {errors.OLD_NAMES.get(k, k): v for k, v in old["result"]["config"].items()}  # lr0 → lr, beta → …
    assert r.wall_time == old["meta"]["timing"]["wall_time"] and r.config == renamed


@pytest.mark.parametrize("kind", ["online", "lrsopt"])
def test_sweep_cells_store_the_codecs_dict(kind, tmp_path):
    from hgtoolkit.sweep import kinds
    from hgtoolkit.sweep.executors import _record
    obj = MAKERS[kind]()
    out = kinds.record_output(obj)
    assert out.result["kind"] == kind and "wall_time" not in out.result and "wall_time" in out.timing
    fixed = {"lr": 1e-3, "steps": 5, **({"outer_steps": 1, "outer_lr": 1e-4} if kind == "lrsopt" else {})}
    cell = sweep.Grid("g", {"name": "beale"}, kind, fixed=fixed).cells()[0]
    store = sweep.Store(tmp_path)
    store.write(*_record(cell, out, {}))
    back = sweep.to_result(store.read(cell.id))
    expect = records.to_dict(obj)
    expect.pop("final_params", None)
    got = records.to_dict(back)
    got.pop("final_params", None)
    assert_same(expect, got)
