"""Plain result records: JSON/npz conversion and atomic writes (shared by every result type)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["to_jsonable", "atomic_write_json", "atomic_write_bytes", "atomic_torch_save",
           "read_json", "save_arrays", "load_arrays"]


def to_jsonable(x: Any) -> Any:
    """Tensors/arrays → (nested) lists, NaN/inf → None, dataclasses → dicts, paths → str."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (Path, torch.dtype, torch.device)):
        return str(x)
    return x


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file beside ``path`` and rename it over: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, json.dumps(to_jsonable(obj), indent=1, allow_nan=False).encode())


def read_json(path: str | os.PathLike) -> Any:
    """``json.load`` whose errors name the file (a ``json.JSONDecodeError``, i.e. ValueError)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(f"{path}: not a valid JSON record ({exc.msg})", exc.doc, exc.pos) from None
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError(f"{path}: not a text (JSON) file", "", exc.start) from None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def save_arrays(path: str | os.PathLike, **arrays: Any) -> Path:
    """Atomically save named arrays/tensors to an ``.npz`` file."""
    import io
    buf = io.BytesIO()
    np.savez(buf, **{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                     for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file; a truncated or foreign file raises ValueError naming it."""
    import zipfile
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("a single array, not an .npz archive")
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the arrays ({type(exc).__name__}: {exc}); the file is "
                         "truncated or not an .npz written by hgtoolkit") from None


class RunRecord:
    """What every training-run record shares: derived values and JSON + npz (+ params) files.

    A subclass is a dataclass with the fields ``config``, the per-step/evaluation arrays named
    in ``ARRAYS`` (``lrs``, ``train_losses``, ``eval_steps``, ``val_losses``, ``val_accuracy``,
    …), the float scalars named in ``SCALARS``, and ``diverged_at``, ``divergence``,
    ``wall_time``, ``final_params``. ``KIND`` tags its files; ``ARRAYS_IN_JSON`` also copies the
    arrays into the JSON for readers without numpy.
    """

    KIND: str = "run"
    ARRAYS: tuple[str, ...] = ()
    SCALARS: tuple[str, ...] = ()
    ARRAYS_IN_JSON: bool = False

    @property
    def method(self) -> str:
        return self.config.get("method", "?")

    @property
    def steps_run(self) -> int:
        return int(len(self.lrs))

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    @property
    def best_val_loss(self) -> float:
        """min_k E(w_k) over the finite evaluations (NaN if there is none)."""
        v = np.asarray(self.val_losses, dtype=float)
        v = v[np.isfinite(v)]
        return float(v.min()) if len(v) else math.nan

    @property
    def final_val_loss(self) -> float:
        """E at the last evaluation (E(w_T) when the run completed)."""
        return float(self.val_losses[-1]) if len(self.val_losses) else math.nan

    @property
    def final_val_accuracy(self) -> float:
        if self.val_accuracy is None or not len(self.val_accuracy):
            return math.nan
        return float(self.val_accuracy[-1])

    @staticmethod
    def _paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".json", ".npz") else path
        return (stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz"),
                stem.with_name(stem.name + ".params.pt"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<stem>.json`` (config and scalars), ``<stem>.npz`` (the arrays, exact) and,
        when ``final_params`` is set, ``<stem>.params.pt``. ``path`` may end in .json or have
        no suffix. Returns the JSON path."""
        jpath, npath, ppath = self._paths(path)
        arrays = {k: getattr(self, k) for k in self.ARRAYS if getattr(self, k) is not None}
        save_arrays(npath, **arrays)
        if self.final_params is not None:
            atomic_torch_save(torch.utils._pytree.tree_map(lambda x: x.detach().cpu(), self.final_params), ppath)
        meta = {"kind": self.KIND, "config": self.config,
                **{k: getattr(self, k) for k in self.SCALARS},
                "diverged_at": self.diverged_at, "divergence": self.divergence,
                "wall_time": self.wall_time, "steps_run": self.steps_run,
                "best_val_loss": self.best_val_loss, "final_val_loss": self.final_val_loss,
                "final_val_accuracy": self.final_val_accuracy,
                "arrays": npath.name, "params": ppath.name if self.final_params is not None else None,
                **(arrays if self.ARRAYS_IN_JSON else {})}
        return atomic_write_json(jpath, meta)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Read a record written by :meth:`save` (the .json path or the stem)."""
        jpath, _, _ = cls._paths(path)
        meta = read_json(jpath)
        if not isinstance(meta, dict) or meta.get("kind") != cls.KIND:
            meta = meta if isinstance(meta, dict) else {}
            raise ValueError(f"path {jpath} is not a {cls.__name__} record (kind={meta.get('kind')!r})")
        arrays = load_arrays(jpath.with_name(meta["arrays"]))
        params = None
        if meta.get("params"):
            params = torch.load(jpath.with_name(meta["params"]), weights_only=True)
        scalars = {k: math.nan if meta.get(k) is None else float(meta[k]) for k in cls.SCALARS}
        return cls(config=meta["config"], **{k: arrays.get(k) for k in cls.ARRAYS}, **scalars,
                   diverged_at=meta["diverged_at"], divergence=meta.get("divergence"),
                   wall_time=float(meta["wall_time"]), final_params=params)
