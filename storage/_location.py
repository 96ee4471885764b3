"""Where a cohort store lives: layout names, filesystem plumbing, liveness of writers, the disk-full error.

Every other layer (:mod:`storage._locking`, :mod:`storage._commit`, :mod:`storage._audit` and the facade
:mod:`storage.store`) builds on :class:`StoreLocation`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid
from typing import Any

from storage.schema import SCHEMA_VERSION, validate_patient_id

PATIENTS = "patients"
INDEX = "index"
TREATMENTS = "treatments"
STAGING = ".staging"
TRASH = ".trash"
LOCKS = ".locks"

# Test hook: "STAGE:SECONDS" makes a writer sleep at STAGE (see pause) so a test can SIGKILL it there, or,
# with PAUSE_RESUME_ENV naming a file, hold it there until that file appears (deterministic interleavings).
PAUSE_ENV = "COHORT_STORE_PAUSE"
PAUSE_SIGNAL_ENV = "COHORT_STORE_PAUSE_SIGNAL"
PAUSE_RESUME_ENV = "COHORT_STORE_PAUSE_RESUME"
# "lock-wait" is reached by a writer that found its patient locked by another writer, before it waits.
PAUSE_STAGES = ("lock-wait", "staged", "committing", "swapped")

# errno values that mean "the device (or the writer's quota) is full".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class ReadOnlyStoreError(ValueError):
    """A write to a store this code only reads: one of an older schema version (``longitudinal store migrate``
    or ``storage.store.migrate_store`` upgrades it). Not an I/O error: retrying never helps."""


class StoreFullError(OSError):
    """A write failed because the store's device is full (ENOSPC) or the writer's quota is spent (EDQUOT).

    ``errno`` is the original one; the message starts with "disk full" so reports and consoles say so. A write
    failing before its commit point is rolled back at once; what it could not remove, or a write failing after
    that point, is finished or rolled back when the store is next opened.
    """


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in ``exc`` or its cause/context chain (or exception group), else None."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        cur = pending.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_FULL_ERRNOS:
            return cur
        if isinstance(cur, BaseExceptionGroup):
            pending.extend(cur.exceptions)
        pending.extend(e for e in (cur.__cause__, cur.__context__) if e is not None)
    return None


def disk_full_error(cause: OSError, url: str, action: str) -> StoreFullError:
    """The StoreFullError for ``cause`` (an ENOSPC/EDQUOT OSError) hit while ``action`` (e.g. "writing
    patient p001") on the store at ``url``."""
    what = "quota exceeded" if cause.errno == errno.EDQUOT else "no space left on the store's device"
    err = StoreFullError(
        f"disk full ({what}) while {action} in store {url}. Free space and rerun; the next open of the store "
        "finishes or rolls back whatever this write left"
    )
    err.errno = cause.errno
    return err


def pause(stage: str) -> None:
    """Crash-test hook: sleep at ``stage`` when COHORT_STORE_PAUSE="stage:seconds" (touching the signal file).

    With COHORT_STORE_PAUSE_RESUME naming a file, the sleep ends early (polled every 20 ms) once it exists.
    """
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    name, _, seconds = spec.partition(":")
    if name != stage:
        return
    signal_path = os.environ.get(PAUSE_SIGNAL_ENV)
    if signal_path:
        with open(signal_path, "w") as fh:
            fh.write(stage)
    resume = os.environ.get(PAUSE_RESUME_ENV)
    deadline = time.monotonic() + float(seconds or 60)
    while (left := deadline - time.monotonic()) > 0:
        if resume and os.path.exists(resume):
            return
        time.sleep(min(left, 0.02) if resume else left)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal still exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLocation:
    """A store's location (local path or fsspec URL) and the file primitives the other layers share."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self._fs_cache: tuple[Any, str] | None = None
        # The root's schema_version as opened (set by CohortStore.open); older versions are read-only.
        self.schema_version: int = SCHEMA_VERSION

    def __getstate__(self) -> dict:
        # Filesystem handles do not pickle reliably; Dask/Prefect workers rebuild them.
        return {"url": self.url, "storage_options": self.storage_options, "_fs_cache": None,
                "schema_version": self.schema_version}

    @property
    def read_only(self) -> bool:
        """True for a store of an older schema version: it is read, never written, until migrated."""
        return self.schema_version != SCHEMA_VERSION

    def _require_writable(self, action: str) -> None:
        """Raise ReadOnlyStoreError when this store may not be written (an older schema version)."""
        if self.read_only:
            raise ReadOnlyStoreError(
                f"cannot {action}: store {self.url} has schema version {self.schema_version}, which this code "
                f"reads only; upgrade it to version {SCHEMA_VERSION} with `longitudinal store migrate {self.url}`"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @property
    def _fs(self) -> Any:
        return self._fs_and_root()[0]

    @property
    def _root(self) -> str:
        return self._fs_and_root()[1]

    def _fs_and_root(self) -> tuple[Any, str]:
        if self._fs_cache is None:
            from fsspec.core import url_to_fs

            fs, root = url_to_fs(self.url, **self.storage_options)
            self._fs_cache = (fs, root.rstrip("/"))
        return self._fs_cache

    @property
    def is_local(self) -> bool:
        """True when the store lives on a local filesystem (rename-based commits)."""
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self._fs, LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def _zarr_store(self, *parts: str, read_only: bool = False) -> Any:
        """A zarr Store rooted at ``<store>/<parts...>``."""
        import zarr

        if self.is_local:
            return zarr.storage.LocalStore(self._path(*parts), read_only=read_only)
        url = "/".join([self.url.rstrip("/"), *parts])
        return zarr.storage.FsspecStore.from_url(
            url, storage_options=self.storage_options, read_only=read_only
        )

    def _refresh(self, path: str | None = None) -> None:
        # Object-store filesystems cache listings; other processes (and zarr's own async fs) write behind it.
        with contextlib.suppress(Exception):
            self._fs.invalidate_cache(path)

    def _read_json(self, path: str) -> dict | None:
        try:
            return json.loads(self._fs.cat_file(path))
        except (FileNotFoundError, OSError, KeyError):
            return None

    def _write_bytes_atomic(self, path: str, data: bytes) -> None:
        if self.is_local:
            parent, name = os.path.split(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                # A full disk fails the write, not the unlink: leave no temp for verify to report.
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
        else:
            self._fs.pipe_file(path, data)  # a single PUT is atomic on object stores

    def _listdir(self, *parts: str) -> list[str]:
        """Base names directly under ``<store>/<parts>`` (empty when absent)."""
        path = self._path(*parts)
        self._refresh(path)
        try:
            entries = self._fs.ls(path, detail=False)
        except (FileNotFoundError, OSError):
            return []
        return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})

    def _rm(self, path: str) -> None:
        if self.is_local:
            import shutil

            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
            return
        self._refresh(path)
        with contextlib.suppress(FileNotFoundError):
            if self._fs.exists(path):
                self._fs.rm(path, recursive=True)

    # --- metadata every layer reads ------------------------------------------------------------------
    def _root_attrs(self) -> dict | None:
        meta = self._read_json(self._path("zarr.json"))
        if meta is None:
            return None
        return meta.get("attributes", {})

    def _group_meta(self, pid: str) -> dict | None:
        return self._read_json(self._path(PATIENTS, pid, "zarr.json"))

    def _committed_attrs(self, pid: str) -> dict:
        validate_patient_id(pid)
        meta = self._group_meta(pid)
        attrs = (meta or {}).get("attributes", {})
        if not attrs.get("commit"):
            raise KeyError(f"patient {pid!r} is not in store {self.url}")
        return attrs

    def _commit_attrs(self, pid: str) -> dict:
        """The committed group's ``commit`` attribute (generation, staged_unix, ...); {} when absent."""
        return (self._group_meta(pid) or {}).get("attributes", {}).get("commit", {}) or {}

    def has_patient(self, pid: str) -> bool:
        """Whether ``pid`` is committed in the store."""
        validate_patient_id(pid)
        meta = self._group_meta(pid)
        return bool(meta and meta.get("attributes", {}).get("commit"))
