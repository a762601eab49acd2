r"""Result records: one codec for every result type, plus atomic writes.

Every result type (``exact.HypergradResult``, ``online.OnlineResult``, ``baselines.PeerResult``,
``hdm.HDMResult``, ``lrsopt.ScheduleResult``, ``analysis.ApproximationReport``,
``towers.TowerResult``) is a dataclass registered with :func:`register` (:func:`register_run` for
:class:`RunRecord` subclasses) under a *kind* name (``hypergradient``, ``online``, ``peer``,
``hdm``, ``lrsopt``, ``approximation``, ``towers``) and a *version*. :func:`save` ``(obj, path)``
(also ``hgtoolkit.save``; every result's ``.save`` method) writes, arrays and parameters first,
and returns the JSON path:

- ``<stem>.json``: ``"format": "hgtoolkit.record"``, ``"kind"``, ``"version"``, every scalar and
  setting (non-finite floats as ``null``), derived values for readers (``best_val_loss`` …),
  ``"files"`` (the names of the two files below) and ``"arrays"`` = {npz key: {"path", "dtype",
  "shape"}}; in the fields an array is a readable list (the kind's ``readable`` fields; such a
  record also loads from its JSON alone) or ``{"npz": key, "dtype", "shape"}``;
- ``<stem>.npz``: every numpy array, bit-exact, under its dotted path (``outer_state.m``),
  read with ``np.load(allow_pickle=False)``; but the kind's ``timing`` arrays (wall times) are
  JSON lists only, so that identical runs write identical npz files;
- ``<stem>.params.pt``: the model parameters, if the kind has a ``params`` field and it is set:
  a pytree of tensors (dicts, lists, tuples) written by ``torch.save``, checked to load with
  ``torch.load(weights_only=True)``, which is how it is read.

Integrity: the JSON holds ``"checksums"`` (the sha256 of the npz and parameter files) and its own
``"checksum"`` (the sha256 of its canonical form without that key). :func:`load` verifies all of
them before using anything: a file with one byte changed raises :class:`CorruptedFileError` (a
ValueError) naming the file and saying "corrupted". Files written before checksums existed load
with a :class:`NoChecksumWarning`. The sweep's cell records and LRS-OPT's checkpoints carry the
same checksums (:func:`seal`, :func:`unseal`, :func:`save_sealed_arrays`, :func:`digest`).

:func:`load` ``(path, kind=None)`` returns the registered dataclass (dispatch on the JSON's
``kind``). In memory the codec is :func:`to_dict` (kind, version, fields; arrays stay numpy,
parameters stay tensors) ↔ :func:`from_dict`, and :func:`split_arrays` / :func:`join_arrays`
move the arrays out of / back into such a dict. The sweep's ``online`` and ``lrsopt`` cells
store exactly that (``result`` = the JSON part, the cell's arrays = the npz part), with the
kind's ``timing`` fields (wall times) kept in the cell's ``meta``.

Loading a record of another kind than asked, of an unknown kind, of a newer version, or of an
older version without a migration raises ValueError naming the file, what it is, what was
expected and how to regenerate it; so do truncated or corrupt JSON, npz and parameter files.
Records written before this codec (version 1: the old ``RunRecord``, ``ScheduleResult/1``,
``ApproximationReport/1`` and ``TowerResult`` files, and the sweep's old cell results) load
through the kinds' migrations (``migrations[1](cls, d)``: the current fields from the old
JSON values with the old arrays merged in by name). No pickle anywhere: npz files hold no
object arrays and parameters are read with ``weights_only=True``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import OLD_NAMES

__all__ = ["FORMAT", "NoChecksumWarning", "CorruptedFileError", "digest", "seal", "unseal", "corrupted",
           "write_sealed_json", "read_sealed_json", "read_verified_bytes", "save_sealed_arrays", "seal_bytes",
           "unseal_bytes", "load_torch", "RecordType", "register", "kinds", "spec", "to_dict", "from_dict", "split_arrays",
           "join_arrays", "save", "load", "RunRecord", "register_run", "to_jsonable", "atomic_write_json",
           "atomic_write_bytes", "atomic_torch_save", "read_json", "save_arrays", "load_arrays", "DataRecord"]


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
    """``torch.save`` of ``obj``, atomically, sealed with the sha256 of its bytes (a checkpoint:
    :func:`load_torch` verifies it)."""
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, seal_bytes(buf.getvalue()))


def load_torch(path: str | os.PathLike, what: str, redo: str = "", map_location: Any = None) -> Any:
    """The object of a file written by :func:`atomic_torch_save`, verified first
    (:class:`CorruptedFileError` naming ``what``); read with ``torch.load(weights_only=True)``.
    A file written before checksums loads with a :class:`NoChecksumWarning`."""
    import io
    payload = unseal_bytes(Path(path).read_bytes(), what, redo)
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - empty, truncated, garbage or not plain tensors: all one
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise corrupted(what, f"not a torch file of tensors: {first[:200]}", redo) from None


def save_arrays(path: str | os.PathLike, **arrays: Any) -> Path:
    """Atomically save named arrays/tensors to an ``.npz`` file."""
    return atomic_write_bytes(path, _npz_bytes(arrays))


def save_sealed_arrays(path: str | os.PathLike, **arrays: Any) -> str:
    """:func:`save_arrays`, returning the file's :func:`digest` (for the record beside it)."""
    data = _npz_bytes(arrays)
    atomic_write_bytes(path, data)
    return digest(data)


def load_arrays(path: str | os.PathLike, checksum: str | None = None, redo: str = "") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, verified against ``checksum`` when given
    (:class:`CorruptedFileError`); a truncated or foreign file raises ValueError naming it."""
    return _arrays_of(read_verified_bytes(path, checksum, redo), path)


# ============================================================================ integrity (sha256)
# Every record, sweep cell and checkpoint carries the sha256 of its payload: the JSON document its
# own (of its canonical form, without the "checksum" key), and the digests of the files beside it
# (npz arrays, parameters). Readers verify before using anything; a file written before checksums
# existed is read with a :class:`NoChecksumWarning`.

class NoChecksumWarning(UserWarning):
    """A record or checkpoint written before they carried checksums: read, but not verified."""


class CorruptedFileError(ValueError):
    """A file whose content does not match its checksum (or cannot be parsed): nothing of it is used."""


def digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(doc: dict) -> dict:
    """``doc`` (made JSON-able) with ``"checksum"`` = the digest of its canonical form."""
    doc = to_jsonable({k: v for k, v in doc.items() if k != "checksum"})
    return {**doc, "checksum": digest(_canonical(doc))}


def corrupted(path: Any, what: str, redo: str = "") -> CorruptedFileError:
    """The error for a file that fails its check: names the file and says "corrupted"."""
    return CorruptedFileError(f"{path}: corrupted ({what}); nothing of it was used"
                              + (f"; {redo}" if redo else ""))


def unseal(doc: Any, path: Any, redo: str = "") -> Any:
    """``doc`` without its ``"checksum"``, verified (:class:`CorruptedFileError` on a mismatch);
    a document without one (written before checksums) warns :class:`NoChecksumWarning`."""
    if not isinstance(doc, dict) or "checksum" not in doc:
        warnings.warn(f"{path}: written before records carried checksums; read without verification "
                      "(save it again to add one)", NoChecksumWarning, stacklevel=3)
        return doc
    body = {k: v for k, v in doc.items() if k != "checksum"}
    if digest(_canonical(body)) != doc["checksum"]:
        raise corrupted(path, "its content does not match its sha256 checksum", redo)
    return body


def write_sealed_json(path: str | os.PathLike, doc: dict) -> Path:
    """:func:`atomic_write_json` of :func:`seal` (doc)."""
    return atomic_write_bytes(path, json.dumps(seal(doc), indent=1, allow_nan=False).encode())


def read_sealed_json(path: str | os.PathLike, redo: str = "") -> Any:
    """The JSON document at ``path``, verified (:func:`unseal`); unparsable: corrupted."""
    try:
        doc = read_json(path)
    except json.JSONDecodeError as exc:
        raise corrupted(path, exc.msg.removeprefix(f"{path}: "), redo) from None
    return unseal(doc, path, redo)


def read_verified_bytes(path: str | os.PathLike, expected: str | None, redo: str = "") -> bytes:
    """The bytes of ``path``, checked against ``expected`` (a :func:`digest`; None: not checked)."""
    data = Path(path).read_bytes()
    if expected is not None and digest(data) != expected:
        raise corrupted(path, "its bytes do not match the sha256 checksum its record holds", redo)
    return data


_SEAL = b"\nhgtoolkit-checksum "  # + digest: the trailer of a sealed binary file


def seal_bytes(payload: bytes) -> bytes:
    """``payload`` + a trailer holding its :func:`digest` (read back by :func:`unseal_bytes`)."""
    return payload + _SEAL + digest(payload).encode()


def unseal_bytes(data: bytes, what: Any, redo: str = "") -> bytes:
    """The payload of :func:`seal_bytes` output, verified (:class:`CorruptedFileError` naming
    ``what``); data without a trailer (written before checksums) is returned as it is, with a
    :class:`NoChecksumWarning`."""
    n = len(_SEAL) + len(digest(b""))
    if len(data) >= n and data[-n:-n + len(_SEAL)] == _SEAL:
        payload, expected = data[:-n], data[-n + len(_SEAL):].decode("ascii", "replace")
        if digest(payload) != expected:
            raise corrupted(what, "its bytes do not match their sha256 checksum", redo)
        return payload
    if _SEAL[1:] in data[-2 * n:]:  # a trailer that was itself damaged
        raise corrupted(what, "its checksum trailer is damaged", redo)
    if not data.startswith(b"PK\x03\x04"):  # not even the zip archive torch.save writes
        raise corrupted(what, "empty, or neither a sealed file nor a torch file", redo)
    warnings.warn(f"{what}: written before checkpoints carried checksums; read without verification",
                  NoChecksumWarning, stacklevel=3)
    return data


def _npz_bytes(arrays: dict) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                     for k, v in arrays.items()})
    return buf.getvalue()


def _arrays_of(data: bytes, path: Any) -> dict[str, np.ndarray]:
    import io
    import zipfile
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("a single array, not an .npz archive")
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise ValueError(f"{path}: cannot read the arrays ({type(exc).__name__}: {exc}); the file is "
                         "truncated or not an .npz written by hgtoolkit") from None


# ============================================================================ the record codec

FORMAT = "hgtoolkit.record"
_RESERVED = ("format", "kind", "version", "files", "arrays", "checksum", "checksums")
_LEGACY_VERSION = 1  # every format written before this codec


@dataclass(frozen=True)
class RecordType:
    """A registered result type (see :func:`register`)."""

    kind: str
    cls: type
    version: int
    redo: str
    params: str | None = None
    timing: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    readable: tuple[str, ...] = ()
    nan: tuple[str, ...] = ()
    legacy_formats: tuple[str, ...] = ()
    migrations: dict = field(default_factory=dict)

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.cls))


_REGISTRY: dict[str, RecordType] = {}


def register(kind: str, *, version: int, redo: str, params: str | None = None,
             timing: tuple[str, ...] = (), derived: tuple[str, ...] = (),
             readable: tuple[str, ...] = (), nan: tuple[str, ...] = (),
             legacy_formats: tuple[str, ...] = (),
             migrations: dict[int, Callable[[type, dict], dict]] | None = None) -> Callable[[type], type]:
    """Class decorator: register a dataclass as the record type ``kind`` at ``version``.

    ``redo``: how to regenerate such a record (shown when one cannot be read); ``params``: the
    field holding model parameters (a pytree of tensors, written to ``.params.pt``);
    ``timing``: machine-dependent fields (wall times), kept apart by the sweep; ``derived``:
    properties also written to the JSON for readers (ignored on load); ``readable``: fields
    whose arrays are also copied into the JSON as lists; ``nan``: fields whose nulls read back
    as NaN (``float`` fields do so anyway); ``legacy_formats``: ``"format"`` strings of files
    written before this codec; ``migrations[v](cls, d)``: the current fields from the flat dict
    ``d`` of a version-``v`` record (JSON values with the arrays merged in by name).

    A class may define ``_record_fields(self) -> dict`` and ``_from_record_fields(cls, d)``
    when its fields are not plain values (default: the dataclass fields, ``cls(**d)``).
    """
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"kind must be a non-empty string, got {kind!r}")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be an int >= 1, got {version!r}")

    def deco(cls: type) -> type:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"register({kind!r}): {cls.__name__} is not a dataclass")
        if kind in _REGISTRY and _REGISTRY[kind].cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"record kind {kind!r} is already registered by {_REGISTRY[kind].cls.__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        clash = names & set(_RESERVED)
        if clash:
            raise ValueError(f"register({kind!r}): field(s) {sorted(clash)} clash with the record's own keys")
        for what, given in (("params", (params,) if params else ()), ("timing", timing), ("readable", readable),
                            ("nan", nan)):
            if set(given) - names:
                raise ValueError(f"register({kind!r}): {what} names no field(s) {sorted(set(given) - names)}")
        _REGISTRY[kind] = RecordType(kind, cls, version, redo, params, tuple(timing), tuple(derived),
                                     tuple(readable), tuple(nan), tuple(legacy_formats), dict(migrations or {}))
        return cls
    return deco


def kinds() -> dict[str, RecordType]:
    """The registered record types by kind (imports the modules that define them)."""
    _import_record_modules()
    return dict(_REGISTRY)


def _import_record_modules() -> None:
    import importlib
    for name in ("online", "baselines", "hdm", "lrsopt", "analysis", "towers", "exact"):
        importlib.import_module(f"hgtoolkit.{name}")


def spec(obj_or_kind: Any) -> RecordType:
    """The :class:`RecordType` of a record, a record class or a kind name."""
    if isinstance(obj_or_kind, str):
        if obj_or_kind not in _REGISTRY:
            _import_record_modules()
        if obj_or_kind not in _REGISTRY:
            raise ValueError(f"unknown record kind {obj_or_kind!r}; known: {sorted(_REGISTRY)}")
        return _REGISTRY[obj_or_kind]
    cls = obj_or_kind if isinstance(obj_or_kind, type) else type(obj_or_kind)
    for klass in cls.__mro__:
        for s in _REGISTRY.values():
            if s.cls is klass:
                return s
    raise TypeError(f"{cls.__name__} is not a registered record type (see hgtoolkit.records.register)")


# ---------------------------------------------------------------------------- in memory

def to_dict(obj: Any) -> dict:
    """``{"format", "kind", "version", <fields>, <derived values>}``; arrays stay numpy arrays
    and the ``params`` field its pytree of tensors (:func:`split_arrays` makes it JSON)."""
    s = spec(obj)
    hook = getattr(obj, "_record_fields", None)
    fields = hook() if hook is not None else {f: getattr(obj, f) for f in s.fields}
    d = {"format": FORMAT, "kind": s.kind, "version": s.version, **fields}
    d.update({k: getattr(obj, k) for k in s.derived})
    return d


def _none_to_nan(x: Any) -> Any:
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _none_to_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return x


def _describe(d: dict) -> str:
    if d.get("format") == FORMAT:
        return f"a {d.get('kind')!r} record (version {d.get('version')!r})"
    if d.get("format") is not None:
        return f"a record of format {d.get('format')!r}"
    if d.get("kind") is not None:
        return f"an old {d.get('kind')!r} record"
    return "not a hgtoolkit record"


def _identify(d: Any, kind: str | None, source: str, redo: str | None,
              untagged: bool = False) -> tuple[RecordType, int]:
    """(type, version) of a record dict; ValueError when it is not the kind asked or unreadable."""
    if kind is not None:
        spec(kind)  # an unknown kind asked for is the caller's error
    if not isinstance(d, dict):
        raise ValueError(f"{source}: not a hgtoolkit record (a JSON {type(d).__name__}, expected an object)")
    fmt = d.get("format")
    if fmt == FORMAT:
        found, version = d.get("kind"), d.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{source}: record has no valid version ({version!r}); "
                             f"{redo or _redo(kind or found)}")
    else:  # written before this codec
        _import_record_modules()
        version = _LEGACY_VERSION
        by_format = [s.kind for s in _REGISTRY.values() if fmt is not None and fmt in s.legacy_formats]
        if by_format:
            found = by_format[0]
        elif fmt is None and d.get("kind") in _REGISTRY:
            found = d["kind"]
        elif untagged and fmt is None and kind is not None and "kind" not in d:
            found = kind  # an old sweep cell result: the caller knows the kind
        else:
            expected = f"a {kind!r} record ({_REGISTRY[kind].cls.__name__})" if kind else "a hgtoolkit record"
            raise ValueError(f"{source}: {_describe(d)}, expected {expected} (format {FORMAT!r}); "
                             f"{redo or _redo(kind)}")
    if found not in _REGISTRY:
        _import_record_modules()
    if found not in _REGISTRY:
        raise ValueError(f"{source}: a record of unknown kind {found!r} (known: {sorted(_REGISTRY)})"
                         + (f", expected a {kind!r} record" if kind else "") + f"; {redo or _redo(kind)}")
    s = _REGISTRY[found]
    if kind is not None and found != kind:
        raise ValueError(f"{source}: {_describe(d)} ({s.cls.__name__}), not the {kind!r} record "
                         f"({_REGISTRY[kind].cls.__name__}) expected; {redo or _redo(kind)}")
    if version > s.version:
        raise ValueError(f"{source}: a {found!r} record of version {version}, written by a newer hgtoolkit "
                         f"(this one reads version {s.version}); upgrade hgtoolkit, or {redo or s.redo}")
    if version < s.version and version not in s.migrations:
        raise ValueError(f"{source}: a {found!r} record of version {version}, which this hgtoolkit cannot "
                         f"read (it reads version {s.version}); {redo or s.redo}")
    return s, version


def _redo(kind: str | None) -> str:
    return _REGISTRY[kind].redo if kind in _REGISTRY else "regenerate it with the code that wrote it"


def from_dict(d: dict, kind: str | None = None, *, source: str = "record", redo: str | None = None,
              untagged: bool = False) -> Any:
    """The record object of a :func:`to_dict` dict (arrays merged in, see :func:`join_arrays`),
    or of an older version through the kind's migration. ``kind``: the kind expected (None:
    any); ``source`` names the record and ``redo`` says how to regenerate it in errors;
    ``untagged``: a dict with neither ``"format"`` nor ``"kind"`` is an old (version 1) record
    of ``kind`` (the sweep's cell results written before this codec)."""
    s, version = _identify(d, kind, source, redo, untagged)
    try:
        if version != s.version:
            fields = s.migrations[version](s.cls, d)
        else:
            known = set(s.fields) | set(s.derived) | set(_RESERVED)
            unknown = set(d) - known
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            fields = {k: v for k, v in d.items() if k in s.fields}
        for f in dataclasses.fields(s.cls):
            if f.name in fields and (f.name in s.nan or f.type in ("float", float)):
                fields[f.name] = _none_to_nan(fields[f.name])
        hook = getattr(s.cls, "_from_record_fields", None)
        return hook(fields) if hook is not None else s.cls(**fields)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{source}: cannot read this {s.kind!r} record ({s.cls.__name__}) of version "
                         f"{version} ({what}); "
                         f"the record is incomplete or corrupt; {redo or s.redo}") from None


def split_arrays(d: dict, readable: tuple[str, ...] = (),
                 json_only: tuple[str, ...] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON-able dict, arrays): every numpy array (or tensor: marked, to come back as one) leaf
    of ``d`` moves to the arrays under its dotted path; the dict keeps, at its place, a list (top-level key in ``readable``)
    or ``{"npz": key, "dtype", "shape"}``, and ``"arrays"`` = {key: {"path", "dtype", "shape"}}
    to put it back. Arrays under a top-level key in ``json_only`` (wall times) stay in the dict
    as lists only (so that two identical runs write identical npz files)."""
    arrays: dict[str, np.ndarray] = {}
    paths: dict[str, list] = {}

    def walk(v: Any, path: list) -> Any:
        tensor = isinstance(v, torch.Tensor)
        if tensor:
            v = v.detach().cpu().numpy()
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise TypeError(f"{'.'.join(map(str, path))}: object arrays cannot be stored (no pickle)")
            key = ".".join(map(str, path))
            while key in paths:
                key += "_"
            paths[key] = {"path": list(path), "dtype": str(v.dtype), "shape": list(v.shape)}
            if tensor:
                paths[key]["tensor"] = True
            if path[0] in json_only:
                return to_jsonable(v)
            arrays[key] = v
            if path[0] in readable:
                return to_jsonable(v)
            return {"npz": key, "dtype": str(v.dtype), "shape": list(v.shape)}
        if isinstance(v, dict):
            return {str(k): walk(x, path + [str(k)]) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x, path + [i]) for i, x in enumerate(v)]
        return to_jsonable(v)

    doc = {k: walk(v, [k]) for k, v in d.items() if k != "arrays"}
    doc["arrays"] = paths
    return doc, arrays


def join_arrays(doc: dict, arrays: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`split_arrays`; an array missing from ``arrays`` is rebuilt from its
    readable copy in ``doc`` when there is one (bit-exact: JSON floats round-trip). A record
    written before this codec (no ``"format": "hgtoolkit.record"``) gets its arrays merged in
    by name instead."""
    if doc.get("format") != FORMAT:
        return {**doc, **arrays}
    out = copy.deepcopy({k: v for k, v in doc.items() if k != "arrays"})
    entries = doc.get("arrays") or {}
    if not isinstance(entries, dict):
        raise ValueError(f"the record's \"arrays\" must map npz keys to paths, got {type(entries).__name__}")
    for key, entry in entries.items():
        path = entry["path"]
        node = out
        for p in path[:-1]:
            node = node[p]
        if key in arrays:
            value = arrays[key]
        elif isinstance(node[path[-1]], list):
            value = np.asarray(_none_to_nan(node[path[-1]]), dtype=entry["dtype"]).reshape(entry["shape"])
        else:
            raise ValueError(f"array {key!r} is missing (not in the npz, no readable copy in the JSON)")
        node[path[-1]] = torch.from_numpy(np.array(value)) if entry.get("tensor") else value
    return out


# ---------------------------------------------------------------------------- on disk

def _paths(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """(``<stem>.json``, ``<stem>.npz``, ``<stem>.params.pt``) for a path with or without a
    ``.json``/``.npz`` suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".npz") else path
    return (stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".npz"),
            stem.with_name(stem.name + ".params.pt"))


def _params_bytes(params: Any, where: str) -> bytes:
    """``torch.save`` of a detached CPU copy, checked to load back with ``weights_only=True``."""
    import io
    buf = io.BytesIO()
    torch.save(torch.utils._pytree.tree_map(
        lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, params), buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal means: not a plain pytree of tensors
        raise TypeError(f"{where}: parameters must be a pytree of tensors (dicts, lists, tuples) that "
                        f"torch.load(weights_only=True) reads ({type(exc).__name__})") from None
    return buf.getvalue()


def _load_params(path: Path, redo: str, checksum: str | None = None) -> Any:
    import io
    try:
        return torch.load(io.BytesIO(read_verified_bytes(path, checksum, redo)), weights_only=True,
                          map_location="cpu")
    except CorruptedFileError:
        raise
    except FileNotFoundError:
        raise ValueError(f"{path}: the record's parameter file is missing; {redo}") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt/unsafe: all the same to the reader
        raise ValueError(f"{path}: cannot read the parameters ({type(exc).__name__}); the file is "
                         f"truncated or not written by hgtoolkit; {redo}") from None


def save(obj: Any, path: str | os.PathLike) -> Path:
    """Write a registered record to ``<stem>.json`` + ``<stem>.npz`` (+ ``<stem>.params.pt``),
    the arrays and parameters first; ``path`` may end in .json/.npz or have no suffix.
    Returns the JSON path."""
    s = spec(obj)
    jpath, npath, ppath = _paths(path)
    d = to_dict(obj)
    params = d.pop(s.params) if s.params else None
    doc, arrays = split_arrays(d, s.readable, json_only=s.timing)
    files, sums = {}, {}
    if arrays:
        sums["arrays"] = save_sealed_arrays(npath, **arrays)
        files["arrays"] = npath.name
    if params is not None:
        data = _params_bytes(params, f"{type(obj).__name__}.{s.params}")
        atomic_write_bytes(ppath, data)
        files["params"], sums["params"] = ppath.name, digest(data)
    doc["files"], doc["checksums"] = files, sums
    return write_sealed_json(jpath, doc)


def load(path: str | os.PathLike, kind: str | None = None) -> Any:
    """The record saved at ``path`` (its .json, .npz or stem) as its registered dataclass.
    ``kind``: the kind expected (ValueError for another); records written before this codec
    load through the kind's migration."""
    jpath, npath, ppath = _paths(path)
    doc = read_sealed_json(jpath, _redo(kind))
    s, _ = _identify(doc, kind, str(jpath), None)
    if doc.get("format") == FORMAT:
        files, sums = doc.get("files") or {}, doc.pop("checksums", None) or {}
        npz = jpath.with_name(files["arrays"]) if files.get("arrays") else None
        try:  # (no npz: the readable copies in the JSON)
            arrays = load_arrays(npz, sums.get("arrays"), s.redo) if npz is not None and npz.exists() else {}
        except CorruptedFileError:
            raise
        except ValueError as exc:
            raise ValueError(f"{exc}; {s.redo}") from None
        try:
            d = join_arrays(doc, arrays)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            missing = f" ({npz.name} is missing)" if npz is not None and not npz.exists() else ""
            raise ValueError(f"{jpath}: the arrays do not match the record{missing}: {exc}; {s.redo}") from None
        d.pop("files", None)
        if s.params:
            d[s.params] = (_load_params(jpath.with_name(files["params"]), s.redo, sums.get("params"))
                           if files.get("params") else None)
    else:  # written before this codec: arrays by name, parameters named by "params"
        legacy_npz = jpath.with_name(doc["arrays"]) if isinstance(doc.get("arrays"), str) else npath
        d = {**doc, **(load_arrays(legacy_npz) if legacy_npz.exists() else {})}
        if isinstance(doc.get("params"), str):
            d["$params"] = _load_params(jpath.with_name(doc["params"]), s.redo)
    return from_dict(d, kind or s.kind, source=str(jpath))


# ============================================================================ training-run records

#: a run's config keys written before 0.2 → their names now (docs/glossary.md)
_CONFIG_RENAMED = {**OLD_NAMES, "beta_search": "hypergrad_lr_search"}


class RunRecord:
    """What every training-run record shares: derived values and the codec's save/load.

    A subclass is a dataclass registered with :func:`register_run` under its ``KIND``, with
    the fields ``config``, the per-step/evaluation arrays named in ``ARRAYS`` (``lrs``,
    ``train_losses``, ``eval_steps``, ``val_losses``, ``val_accuracy``, …), the float scalars
    named in ``SCALARS``, and ``diverged_at``, ``divergence``, ``wall_time``, ``final_params``;
    ``ARRAYS_IN_JSON`` also copies the arrays into the JSON for readers without numpy;
    ``RENAMED_FIELDS``: old field name → new, for the records written before.
    """

    KIND: str = "run"
    ARRAYS: tuple[str, ...] = ()
    SCALARS: tuple[str, ...] = ()
    RENAMED_FIELDS: dict = {}
    #: the class's own old config keys → new ones (before the generic ones of :data:`_CONFIG_RENAMED`)
    CONFIG_RENAMED: dict = {}
    #: the record's version: 4, or higher for a class whose fields were renamed since (each older
    #: version ≥ 4 loads through :meth:`migrate_v4`)
    VERSION: int = 4
    ARRAYS_IN_JSON: bool = False
    TIMING = ("wall_time", "step_times")
    DERIVED = ("steps_run", "best_val_loss", "final_val_loss", "final_val_accuracy")

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

    def save(self, path: str | os.PathLike) -> Path:
        """:func:`hgtoolkit.records.save`: ``<stem>.json``, ``<stem>.npz`` and, when
        ``final_params`` is set, ``<stem>.params.pt``. Returns the JSON path."""
        return save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike):
        """:func:`hgtoolkit.records.load` of a record of this class's kind."""
        return load(path, kind=spec(cls).kind)

    @staticmethod
    def _renamed_fields(cls: type, d: dict) -> dict:
        renames = getattr(cls, "RENAMED_FIELDS", {})
        return {(renames[k] if k in renames and renames[k] not in d else k): v for k, v in d.items()}

    @staticmethod
    def _renamed(cls: type, d: dict, config_renames: dict) -> dict:
        """``d`` with the class's ``RENAMED_FIELDS`` and the config's keys in ``config_renames``
        under their new names (an old name whose new one is also there is left as it is)."""
        d = RunRecord._renamed_fields(cls, d)
        out = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        config = out.get("config")
        if isinstance(config, dict):
            out["config"] = {(config_renames[k] if k in config_renames and config_renames[k] not in config
                              else k): v for k, v in config.items()}
        return out

    @staticmethod
    def migrate_v1(cls: type, d: dict) -> dict:
        """The fields of a record written before the codec: the old ``RunRecord.save`` files
        (arrays by name, parameters in ``"$params"``) and the sweep's old ``online`` cells."""
        out = {}
        d = RunRecord._renamed_fields(cls, d)
        for f in dataclasses.fields(cls):
            if f.name == "final_params":
                out[f.name] = d.get("$params")
            elif f.name in d:
                out[f.name] = d[f.name]
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(f.name)
        return RunRecord.migrate_v2(cls, out)

    @staticmethod
    def migrate_v2(cls: type, d: dict) -> dict:
        """The fields of a record written before the 0.2 vocabulary (versions 2 and 3): the
        class's ``RENAMED_FIELDS`` (``betas`` → ``hypergrad_lrs``) and the config's old keys
        (``lr0``, ``beta``: :data:`hgtoolkit.errors.OLD_NAMES`, ``beta_search``; the class's
        ``CONFIG_RENAMED`` first, e.g. HDM's ``beta0`` → ``momentum_init``) under their new names."""
        return RunRecord._renamed(cls, d, {**_CONFIG_RENAMED, **cls.CONFIG_RENAMED})

    @staticmethod
    def migrate_v4(cls: type, d: dict) -> dict:
        """The fields of a record written at version 4 by a class whose ``VERSION`` is higher:
        only the class's own ``RENAMED_FIELDS`` and ``CONFIG_RENAMED`` (HDM's ``betas`` →
        ``momentums``, ``beta0``/``beta_max`` → ``momentum_init``/``momentum_max``)."""
        return RunRecord._renamed(cls, d, cls.CONFIG_RENAMED)


def register_run(*, redo: str) -> Callable[[type], type]:
    """:func:`register` for a :class:`RunRecord` subclass under its ``KIND`` (version
    ``cls.VERSION``, 4 unless the class renamed fields since): parameters in ``final_params``,
    wall times as timing, the derived values in the JSON, and the migrations of the files and
    sweep cells written before the codec (version 1), before the 0.2 vocabulary (version 2:
    ``lr0``; version 3: ``beta``, ``betas``: the old key names) and before the class's own
    renames (versions 4 … ``VERSION`` − 1: :meth:`RunRecord.migrate_v4`)."""
    def deco(cls: type) -> type:
        names = {f.name for f in dataclasses.fields(cls)}
        return register(cls.KIND, version=cls.VERSION, redo=redo, params="final_params",
                        timing=tuple(t for t in RunRecord.TIMING if t in names), derived=RunRecord.DERIVED,
                        readable=cls.ARRAYS if cls.ARRAYS_IN_JSON else (),
                        migrations={1: RunRecord.migrate_v1, 2: RunRecord.migrate_v2, 3: RunRecord.migrate_v2,
                                    **{v: RunRecord.migrate_v4 for v in range(4, cls.VERSION)}})(cls)
    return deco


# ============================================================================ experiment data

@register("data", version=1, readable=("meta",),
          redo="rerun the experiment that wrote it (`python -m hgtoolkit reproduce ...`)")
@dataclass
class DataRecord:
    """An experiment's raw data in the one codec: ``meta`` (settings and numbers; arrays in it are
    also written as readable JSON lists) and ``data`` (name → ndarray, in the npz, bit-exact).
    ``save(DataRecord(meta, data), path)`` writes ``<stem>.json`` (+ ``<stem>.npz``),
    checksummed; ``load(path, kind="data")`` gives it back."""

    meta: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> Path:
        """:func:`save`; returns the JSON path."""
        return save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DataRecord":
        """:func:`load` of a ``data`` record."""
        return load(path, kind="data")
