"""The store: one directory per sweep, written atomically, with a driver lease."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence


from .. import records
from .grid import Cell, Grid, RECORD_FORMAT, canonical_json


# ============================================================================ the store

def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


LEASE_STALE_S = 60.0  # a lease on another host without a heartbeat for this long is stale
HEARTBEAT_S = 10.0


class StoreLockedError(RuntimeError):
    """Another driver holds the results directory."""


def read_json_named(path: Path, what: str) -> Any:
    """``json.load`` whose errors name the file (a corrupt record says which one, and what to do)."""
    try:
        data = records.read_json(path)
    except json.JSONDecodeError as exc:  # its message names the file
        raise ValueError(f"{exc.msg}: {what} is corrupted; delete the file to recompute it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


class Store:
    """A sweep's results directory (layout in the module docstring). Safe for many writers:
    every file is written atomically and each cell has its own files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.cells_dir = self.root / "cells"
        self.errors_dir = self.root / "errors"
        self.checkpoints_dir = self.root / "checkpoints"
        self.events_path = self.root / "events.jsonl"
        self.manifest_path = self.root / "manifest.json"
        self.lock_path = self.root / "driver.lock"

    # ---------------------------------------------------------------- records
    def record_path(self, cell_id: str) -> Path:
        return self.cells_dir / f"{cell_id}.json"

    def has(self, cell_id: str) -> bool:
        return self.record_path(cell_id).exists()

    def done(self) -> set[str]:
        """Ids of all finished cells (one directory listing)."""
        try:
            names = os.listdir(self.cells_dir)
        except FileNotFoundError:
            return set()
        return {n[:-5] for n in names if n.endswith(".json") and not n.startswith(".")}

    def write(self, record: dict, arrays: dict, timing_arrays: dict) -> Path:
        """The arrays first, then the JSON record (its presence marks the cell finished)."""
        cid = record["id"]
        all_arrays = {**arrays, **{f"meta.{k}": v for k, v in timing_arrays.items()}}
        if all_arrays:  # the record holds the npz's checksum, and its own
            record = {**record, "checksums": {"arrays": records.save_sealed_arrays(self.cells_dir / f"{cid}.npz",
                                                                                  **all_arrays)}}
        path = records.write_sealed_json(self.record_path(cid), record)
        with contextlib.suppress(FileNotFoundError):
            (self.errors_dir / f"{cid}.json").unlink()
        return path

    def read(self, cell_id: str, arrays: bool = True) -> dict:
        """A record; with ``arrays`` its arrays as ``record["arrays"]`` (name → ndarray) and
        timing arrays in ``record["meta"]["timing"]``."""
        rec = read_json_named(self.record_path(cell_id), f"the record of cell {cell_id}")
        redo = f"delete it to recompute the cell {cell_id}"
        rec = records.unseal(rec, self.record_path(cell_id), redo)
        sums = rec.pop("checksums", None) or {}
        if rec.get("format") != RECORD_FORMAT or not isinstance(rec.get("meta"), dict):
            raise ValueError(f"{self.record_path(cell_id)}: not a sweep cell record (format "
                             f"{rec.get('format')!r}, expected {RECORD_FORMAT!r}); delete it to "
                             "recompute the cell")
        names, tnames = rec.get("arrays", []), rec["meta"].get("timing_arrays", [])
        if not arrays:
            return rec
        npz = self.cells_dir / f"{cell_id}.npz"
        try:
            data = records.load_arrays(npz, sums.get("arrays"), redo) if names or tnames else {}
            rec["arrays"] = {k: data[k] for k in names}
            timing_arrays = {k: data[f"meta.{k}"] for k in tnames}
        except records.CorruptedFileError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise ValueError(f"{npz}: missing; the arrays of cell {cell_id} are gone "
                                 f"(delete {self.record_path(cell_id)} to recompute it)") from None
            raise ValueError(f"{npz}: corrupt arrays of cell {cell_id} ({type(exc).__name__}: {exc}); "
                             f"delete it and {self.record_path(cell_id)} to recompute the cell") from None
        rec["meta"]["timing"] = {**{k: v for k, v in rec["meta"].get("timing", {}).items()},
                                 **timing_arrays}
        return rec

    # ---------------------------------------------------------------- errors, checkpoints, log
    def write_error(self, cell: Cell, error: str, meta: dict) -> None:
        records.atomic_write_json(self.errors_dir / f"{cell.id}.json",
                                  {"id": cell.id, **cell.to_dict(), "error": error, "meta": meta})

    def error(self, cell_id: str) -> str:
        """The traceback stored for a failed cell ("" if none)."""
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return records.read_json(self.errors_dir / f"{cell_id}.json").get("error", "")
        return ""

    def errors(self) -> dict[str, dict]:
        if not self.errors_dir.exists():
            return {}
        out = {}
        for p in sorted(self.errors_dir.glob("*.json")):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                out[p.stem] = records.read_json(p)
        return out

    def checkpoint(self, cell_id: str) -> Path:
        return self.checkpoints_dir / cell_id

    def clear_checkpoint(self, cell_id: str) -> None:
        for p in self.checkpoints_dir.glob(f"{cell_id}*") if self.checkpoints_dir.exists() else ():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def log(self, event: str, cell_id: str, **info: Any) -> None:
        """Append one JSON line (a single ``write`` with O_APPEND: lines from concurrent
        processes on a local filesystem do not interleave; on NFS the log is best-effort)."""
        line = json.dumps({"event": event, "id": cell_id, "time": utc_now(), "host": socket.gethostname(),
                           "pid": os.getpid(), **records.to_jsonable(info)}) + "\n"
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.events_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def events(self) -> list[dict]:
        """The event log (malformed lines, e.g. from a crash mid-write, are skipped)."""
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    # ---------------------------------------------------------------- manifest
    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        return read_json_named(self.manifest_path, "the sweep's manifest")

    def add_grids(self, grids: Sequence[Grid]) -> None:
        """Record the grids in ``manifest.json`` (a re-run with an extended grid adds it).
        The read-modify-write holds an exclusive ``flock`` on ``.manifest.lock``, so two
        processes adding grids at once both land."""
        import fcntl
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                old = self.manifest() or {}
                known = list(old.get("grids", []))
                texts = {canonical_json(g) for g in known}
                for g in grids:
                    if canonical_json(g.to_dict()) not in texts:
                        known.append(g.to_dict())
                records.atomic_write_json(self.manifest_path, {
                    "format": "hgtoolkit.sweep.manifest/1", "grids": known,
                    "created": old.get("created", utc_now()), "updated": utc_now()})
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # ---------------------------------------------------------------- the driver's lease
    # ``driver.lock`` holds {token, host, pid, started}; its mtime is the driver's heartbeat.
    # Only one driver works on a directory at a time; tasks check the lease before starting a
    # cell and before storing one, so a task of a cancelled (or dead) driver stores nothing, and
    # a task that cannot see the file is on a node without the shared filesystem.

    def holder(self) -> dict | None:
        """The lease (token, host, pid, started) or None when no driver holds the directory."""
        try:
            with open(self.lock_path) as fh:
                return json.load(fh)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def holds(self, token: str) -> bool:
        return (self.holder() or {}).get("token") == token

    def _stale(self, info: dict | None) -> bool:
        if info is None:  # a lock file being written, or garbage: judge by its age
            with contextlib.suppress(FileNotFoundError):
                return time.time() - self.lock_path.stat().st_mtime > LEASE_STALE_S
            return False
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError, OverflowError):
                pass
            return False
        with contextlib.suppress(FileNotFoundError):
            return time.time() - self.lock_path.stat().st_mtime > LEASE_STALE_S
        return False

    def acquire(self, token: str, wait: float = 0.0) -> None:
        """Take the lease, waiting up to ``wait`` seconds for another driver to finish; a lease
        whose driver died (same host: its pid is gone; elsewhere: no heartbeat for
        ``LEASE_STALE_S`` s) is taken over. Raises :class:`StoreLockedError` saying who holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait
        body = json.dumps({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": utc_now()}).encode()
        while True:
            try:
                fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                info = self.holder()
                if self._stale(info):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.lock_path)
                    self.log("lease_taken_over", "", previous=info)
                    continue
                if time.monotonic() >= deadline:
                    who = (f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
                           if info else "a driver")
                    raise StoreLockedError(
                        f"results_dir {self.root} is in use by another sweep driver ({who}); "
                        f"wait for it to finish (lock_timeout=…, CLI --wait SECONDS), or if that "
                        f"driver is dead and this is not detected, delete {self.lock_path}") from None
                time.sleep(0.2)
                continue
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            return

    def heartbeat(self, token: str) -> None:
        if self.holds(token):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.lock_path)

    def release(self, token: str) -> None:
        if self.holds(token):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lock_path)
