"""The cohort store: one Zarr v3 hierarchy, one group per patient, atomic per-patient writes, an index table.

Layout (schema v1, see :mod:`storage.schema`)::

    <store>/zarr.json                     root group; attrs schema_version, created_by, reference_space
    <store>/patients/zarr.json            group holding one group per committed patient
    <store>/patients/<pid>/{image,label,time}
    <store>/index/<pid>.parquet           one row per session; ``pandas.read_parquet("<store>/index")``
    <store>/.staging/<pid>.<uid>/         a patient group being written (never read by anyone)
    <store>/.staging/<pid>.<uid>.json     the write's journal: owner (host, pid), state "writing" | "commit"
    <store>/.trash/<pid>.<uid>/           a replaced patient group awaiting deletion (local stores)
    <store>/.locks/<pid>.lock             per-patient commit lock (local stores)

Reading without our code: ``xarray.open_zarr(url, group="patients/<pid>", consolidated=False)`` gives
``image`` (time, channel, z, y, x) float32, ``label`` (time, z, y, x) uint8 and the ``time`` coordinate in days
since the patient's baseline (float64). No consolidated metadata is written anywhere, on purpose: xarray
reads consolidated metadata from the *root* and trusts it blindly, and a root summary would go stale (wrong
shapes) as soon as one patient is appended by another writer. Without ``consolidated=False`` xarray still
opens the group, after a RuntimeWarning. ``zarr.open_group`` on the root warns that ``index`` and ``.staging``
are not Zarr nodes; that is harmless.

Atomic commit (a crash never leaves a half-written patient visible; a reader sees the old version, the
new one, or -- only during a swap -- no such patient):

1. Validate the record (every problem, one ValueError). Write the journal ``.staging/<pid>.<uid>.json`` with
   state "writing", then the complete patient group under ``.staging/<pid>.<uid>/``. Its group attributes
   include ``commit`` (generation uid, sha256 of the data bytes), written after the arrays.
2. Flip the journal to state "commit" (atomic replace / single PUT). From here the write is rolled forward
   after a crash; before this point it is rolled back (staging deleted).
3. Swap the group into ``patients/<pid>``:
   - local disk: ``os.rename`` the old group to ``.trash/``, then ``os.rename`` the staged group into
     place. Between the two renames the patient is merely absent, never partial.
   - object store (no rename): delete ``patients/<pid>/zarr.json`` first (the group stops existing for every
     reader, ours and plain zarr/xarray alike), delete the old objects, copy the staged arrays, and copy the
     group's ``zarr.json`` (carrying the ``commit`` attribute) last. A group is only visible once that
     single PUT lands, and the staged copy stays until the end, so a crash mid-copy is rolled forward.
4. Write ``index/<pid>.parquet`` atomically (temp file + ``os.replace`` locally; one PUT on object stores).
   The fragment is derivable from the committed group, so recovery can always rewrite it.
5. Delete trash, staging and the journal.

Concurrency: writers of different patients run in parallel freely (threads or processes). On local disk a
per-patient ``fcntl.flock`` on ``.locks/<pid>.lock`` serialises steps 3-4, so racing writers of one patient
leave one complete version with a matching index. Object stores have no lock: one writer per patient at a
time is the caller's contract (the ingest flow maps one task per patient); verify() catches violations
through the data checksum.

Recovery runs when a store is opened (``recover=True``): journals whose owner is gone (same host: the
process no longer exists; another host: older than ``STALE_AFTER_S``) are rolled back ("writing") or
forward ("commit"). Journals of live writers are left alone, so parallel writers never undo each other. An
abandoned "commit" is dropped instead of rolled forward when a generation staged after its flip has been
committed since (a newer write wins). ``verify()`` reports any leftover journal, staging or trash entry,
uncommitted group, and every inconsistency between arrays, attributes, index and the stored data checksum.

Crash means a process crash (SIGKILL, OOM, node loss with the disk intact). Chunk files are not fsynced, so
a power loss on a local disk may still lose a recent write; the checksum in verify() would notice.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from storage.schema import (
    IMAGE_CHUNKS,
    IMAGE_DIMS,
    INDEX_COLUMNS,
    LABEL_CHUNKS,
    LABEL_DIMS,
    LABEL_VALUES,
    SCHEMA_VERSION,
    TIME_DIMS,
    PatientRecord,
    SessionRecord,
    validate_patient_id,
)

PATIENTS = "patients"
INDEX = "index"
STAGING = ".staging"
TRASH = ".trash"
LOCKS = ".locks"
ZSTD_LEVEL = 3
# A journal written by another host is considered abandoned after this long (seconds); same-host journals
# are judged by whether their process still exists.
STALE_AFTER_S = 6 * 3600.0
# Temp files of atomic local writes exist for microseconds; older ones were left by a crash.
TEMP_STALE_S = 300.0
# Test hook: "STAGE:SECONDS" makes a writer sleep at STAGE (see _pause) so a test can SIGKILL it there.
PAUSE_ENV = "COHORT_STORE_PAUSE"
PAUSE_SIGNAL_ENV = "COHORT_STORE_PAUSE_SIGNAL"
PAUSE_STAGES = ("staged", "committing", "swapped")

REFERENCE_SPACE = (
    "Per patient: the baseline scan's grid, reoriented to RAS and resampled to isotropic spacing; later "
    "sessions are registered and resampled onto it. Arrays are the NIfTI volume transposed, "
    "array[..., z, y, x] == nifti[x, y, z]; the patient attribute reference_affine maps voxel (i=x, j=y, "
    "k=z) to RAS mm and reference_nifti describes the grid's NIfTI header."
)
CHECKSUM_DEFINITION = (
    "sha256 over, for t in 0..T-1: image[t] bytes then label[t] bytes (C order, little-endian), "
    "followed by the time array bytes (float64 little-endian)"
)


def _index_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("patient_id", pa.string()),
            ("session", pa.string()),
            ("days", pa.float64()),
            ("time_index", pa.int64()),
            ("qc_status", pa.string()),
            ("registration_metric", pa.float64()),
            ("content_sha256", pa.string()),
            ("has_label", pa.bool_()),
        ]
    )


@dataclass
class PatientArrays:
    """Lazy view of one committed patient.

    image: zarr.Array (T, C, Z, Y, X) float32; label: zarr.Array (T, Z, Y, X) uint8 (read slices on demand).
    days: (T,) float64 days since baseline. spacing_mm: (z, y, x) mm. affine: (4, 4) voxel (x, y, z) -> RAS mm.
    channels: C channel names. sessions: T SessionRecords in time order.
    """

    patient_id: str
    image: Any
    label: Any
    days: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    channels: tuple[str, ...]
    sessions: list[SessionRecord] = field(default_factory=list)


def data_checksum(image: Any, label: Any, days: np.ndarray) -> str:
    """sha256 of the patient's data bytes (see CHECKSUM_DEFINITION); reads one time point at a time.

    image: (T, C, Z, Y, X) float32 array-like (numpy or zarr); label: (T, Z, Y, X) uint8; days: (T,) float64.
    """
    h = hashlib.sha256()
    for t in range(int(image.shape[0])):
        h.update(np.ascontiguousarray(np.asarray(image[t]), dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(np.asarray(label[t]), dtype="u1").tobytes())
    h.update(np.ascontiguousarray(days, dtype="<f8").tobytes())
    return h.hexdigest()


def reference_nifti(reference_affine: np.ndarray, grid_zyx: tuple[int, ...], spacing_mm: tuple) -> dict:
    """NIfTI-1 header facts of the reference grid, enough to write ``array.T`` as a NIfTI of that grid."""
    affine = np.asarray(reference_affine, dtype=float)
    return {
        "shape_xyz": [int(v) for v in reversed(grid_zyx)],
        "pixdim_mm_xyz": [float(v) for v in reversed(spacing_mm)],
        "affine": affine.tolist(),
        "qform_code": 1,
        "sform_code": 1,
        "xyzt_units": "mm",
        "orientation": "RAS",
        "array_to_nifti": "nifti_data = array[..., z, y, x].transpose -> (x, y, z)",
    }


def index_rows(pid: str, sessions: list[SessionRecord]) -> list[dict]:
    """The index rows (INDEX_COLUMNS) for one patient's sessions, in time order."""
    return [
        {
            "patient_id": pid,
            "session": s.session,
            "days": float(s.days),
            "time_index": i,
            # Quarantined sessions are never stored; flagged-but-stored sessions are "warn".
            "qc_status": "ok" if not s.qc_flags else "warn",
            "registration_metric": float(s.registration_metric),
            "content_sha256": s.content_sha256,
            "has_label": bool(s.has_label),
        }
        for i, s in enumerate(sessions)
    ]


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None: attributes must stay strict JSON for other readers
    (Python's json would write a bare NaN token that most JSON parsers reject)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _session_from_attrs(d: dict) -> SessionRecord:
    """SessionRecord from stored attributes (a null registration metric was a non-finite float)."""
    d = dict(d)
    if d.get("registration_metric") is None:
        d["registration_metric"] = float("nan")
    return SessionRecord.from_dict(d)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return bool(a == b)


def _pause(stage: str) -> None:
    """Crash-test hook: sleep at ``stage`` when COHORT_STORE_PAUSE="stage:seconds" (touching the signal file)."""
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
    time.sleep(float(seconds or 60))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CohortStore:
    """Reader and writer of one cohort store (local path or fsspec URL). Build with :meth:`open`."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self._fs_cache: tuple[Any, str] | None = None

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str | os.PathLike,
        create: bool = False,
        *,
        created_by: str | None = None,
        storage_options: dict | None = None,
        recover: bool = True,
    ) -> CohortStore:
        """Open (or with ``create=True`` create) the store at ``url`` (path or fsspec URL such as s3://b/c.zarr).

        ``created_by`` is recorded in the root attrs on creation (e.g. "longitudinal 0.1.0"; default
        "storage"). ``recover`` finishes or rolls back writes abandoned by crashed writers (module docstring).
        Raises FileNotFoundError when the store is missing and ``create`` is False, ValueError on a schema
        version this code does not read.
        """
        store = cls(os.fspath(url), storage_options)
        attrs = store._root_attrs()
        if attrs is None:
            if not create:
                raise FileNotFoundError(f"no cohort store at {store.url} (use create=True to make one)")
            store._create(created_by or "storage")
        elif attrs.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"store {store.url} has schema_version {attrs.get('schema_version')!r}; "
                f"this code reads version {SCHEMA_VERSION}"
            )
        if recover:
            store.recover()
        return store

    def __getstate__(self) -> dict:
        # Filesystem handles do not pickle reliably; Dask/Prefect workers rebuild them.
        return {"url": self.url, "storage_options": self.storage_options, "_fs_cache": None}

    def __repr__(self) -> str:
        return f"CohortStore({self.url!r})"

    # --- filesystem plumbing --------------------------------------------------------------------------
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
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
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

    # --- root ------------------------------------------------------------------------------------------
    def _root_attrs(self) -> dict | None:
        meta = self._read_json(self._path("zarr.json"))
        if meta is None:
            return None
        return meta.get("attributes", {})

    def _create(self, created_by: str) -> None:
        import zarr

        root = zarr.open_group(
            self._zarr_store(),
            mode="a",
            zarr_format=3,
            attributes={
                "schema_version": SCHEMA_VERSION,
                "created_by": created_by,
                "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "reference_space": REFERENCE_SPACE,
                "index": f"{INDEX}/<patient_id>.parquet, columns {list(INDEX_COLUMNS)}",
            },
        )
        root.require_group(PATIENTS)
        if self.is_local:
            os.makedirs(self._path(INDEX), exist_ok=True)

    @property
    def attrs(self) -> dict:
        """Root attributes (schema_version, created_by, reference_space, ...)."""
        return self._root_attrs() or {}

    # --- reading ---------------------------------------------------------------------------------------
    def _group_meta(self, pid: str) -> dict | None:
        return self._read_json(self._path(PATIENTS, pid, "zarr.json"))

    def _committed_attrs(self, pid: str) -> dict:
        validate_patient_id(pid)
        meta = self._group_meta(pid)
        attrs = (meta or {}).get("attributes", {})
        if not attrs.get("commit"):
            raise KeyError(f"patient {pid!r} is not in store {self.url}")
        return attrs

    def patient_ids(self) -> list[str]:
        """Committed patients, sorted. Groups without a commit marker (object-store copies) are ignored."""
        out = []
        for name in self._listdir(PATIENTS):
            if name == "zarr.json" or validate_patient_id_or_none(name) is None:
                continue
            meta = self._group_meta(name)
            if meta and meta.get("attributes", {}).get("commit"):
                out.append(name)
        return out

    def has_patient(self, pid: str) -> bool:
        """Whether ``pid`` is committed in the store."""
        validate_patient_id(pid)
        meta = self._group_meta(pid)
        return bool(meta and meta.get("attributes", {}).get("commit"))

    def sessions(self, pid: str) -> list[SessionRecord]:
        """The patient's session records in time order (reads attributes only). KeyError if absent."""
        return [_session_from_attrs(d) for d in self._committed_attrs(pid)["sessions"]]

    def patient_attrs(self, pid: str) -> dict:
        """All group attributes of a committed patient (channels, spacing, affine, sessions, commit, ...)."""
        return self._committed_attrs(pid)

    def content_hashes(self, pid: str) -> set[str]:
        """SessionRecord.content_sha256 of every stored session of ``pid`` (empty when the patient is absent)."""
        validate_patient_id(pid)
        try:
            return {s.content_sha256 for s in self.sessions(pid)}
        except KeyError:
            return set()

    def _open_group(self, pid: str) -> Any:
        import zarr

        return zarr.open_group(self._zarr_store(read_only=True), path=f"{PATIENTS}/{pid}", mode="r")

    def arrays(self, pid: str) -> PatientArrays:
        """Lazy zarr arrays plus geometry of one committed patient (KeyError if absent)."""
        attrs = self._committed_attrs(pid)
        group = self._open_group(pid)
        return PatientArrays(
            patient_id=pid,
            image=group["image"],
            label=group["label"],
            days=np.asarray(group["time"][:], dtype=np.float64),
            spacing_mm=tuple(float(v) for v in attrs["spacing_mm"]),
            affine=np.asarray(attrs["reference_affine"], dtype=np.float64),
            channels=tuple(attrs["channels"]),
            sessions=[_session_from_attrs(d) for d in attrs["sessions"]],
        )

    def read_patient(self, pid: str) -> PatientRecord:
        """The whole committed patient as numpy arrays (see PatientRecord for shapes)."""
        a = self.arrays(pid)
        return PatientRecord(
            patient_id=pid,
            image=np.asarray(a.image[...], dtype=np.float32),
            label=np.asarray(a.label[...], dtype=np.uint8),
            days=a.days,
            channels=a.channels,
            spacing_mm=a.spacing_mm,
            reference_affine=a.affine,
            sessions=a.sessions,
        )

    def index(self) -> Any:
        """One row per (committed patient, session), columns INDEX_COLUMNS, sorted by (patient_id, days)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        committed = set(self.patient_ids())
        tables = []
        for name in self._listdir(INDEX):
            if not name.endswith(".parquet") or name.startswith((".", "_")):
                continue
            if name[: -len(".parquet")] not in committed:
                continue
            with self._fs.open(self._path(INDEX, name), "rb") as fh:
                tables.append(pq.read_table(fh, schema=_index_schema()))
        table = pa.concat_tables(tables) if tables else _index_schema().empty_table()
        df: pd.DataFrame = table.to_pandas()
        df = df[list(INDEX_COLUMNS)]
        return df.sort_values(["patient_id", "days"], kind="stable").reset_index(drop=True)

    # --- writing ---------------------------------------------------------------------------------------
    def write_patient(self, record: PatientRecord) -> str:
        """Atomically replace patient ``record.patient_id`` with ``record`` (append = write the merged series).

        record.image (T, C, Z, Y, X) float32, label (T, Z, Y, X) uint8, days (T,) float64 from 0, strictly
        increasing (module docstring describes the commit). Raises ValueError listing every problem of the
        record. Returns the committed generation id.
        """
        problems = record.check()
        if problems:
            raise ValueError(f"cannot write patient {record.patient_id!r}: " + "; ".join(problems))
        pid = record.patient_id
        uid = uuid.uuid4().hex
        name = f"{pid}.{uid}"
        journal = self._path(STAGING, f"{name}.json")
        self._write_journal(journal, pid, uid, "writing")
        try:
            self._write_staging(name, record, uid)
        except BaseException:
            self._rm(self._path(STAGING, name))
            self._rm(journal)
            raise
        _pause("staged")
        self._write_journal(journal, pid, uid, "commit")
        _pause("committing")
        self._finish_commit(pid, uid)
        return uid

    def _write_journal(self, path: str, pid: str, uid: str, state: str) -> None:
        body = {
            "patient_id": pid,
            "generation": uid,
            "state": state,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),
        }
        self._write_bytes_atomic(path, json.dumps(body).encode())

    def _write_staging(self, name: str, record: PatientRecord, uid: str) -> str:
        import zarr
        from zarr.codecs import ZstdCodec

        image = np.asarray(record.image, dtype=np.float32)
        label = np.asarray(record.label, dtype=np.uint8)
        days = np.asarray(record.days, dtype=np.float64)
        t, c, z, y, x = image.shape
        group = zarr.open_group(self._zarr_store(STAGING, name), mode="w", zarr_format=3)
        img = group.create_array(
            "image",
            shape=image.shape,
            dtype="float32",
            # Never larger than the grid: a 64^3 chunk on a 32^3 grid would only store padding.
            chunks=(1, 1, *(min(a, b) for a, b in zip(IMAGE_CHUNKS[2:], (z, y, x), strict=True))),
            compressors=ZstdCodec(level=ZSTD_LEVEL),
            fill_value=0.0,
            dimension_names=IMAGE_DIMS,
            attributes={
                "long_name": "image intensity (normalised per channel)",
                "channels": list(record.channels),
            },
        )
        lab = group.create_array(
            "label",
            shape=label.shape,
            dtype="uint8",
            chunks=(1, *(min(a, b) for a, b in zip(LABEL_CHUNKS[1:], (z, y, x), strict=True))),
            compressors=ZstdCodec(level=ZSTD_LEVEL),
            fill_value=0,
            dimension_names=LABEL_DIMS,
            attributes={
                "long_name": "tumour label",
                "flag_values": {str(k): v for k, v in LABEL_VALUES.items()},
            },
        )
        tim = group.create_array(
            "time",
            shape=days.shape,
            dtype="float64",
            chunks=(max(t, 1),),
            compressors=None,
            fill_value=0.0,
            dimension_names=TIME_DIMS,
            # No CF "units" on purpose: xarray would decode "days" into timedelta64.
            attributes={"long_name": "days since the patient's baseline scan", "unit_name": "day"},
        )
        for i in range(t):
            img[i] = image[i]
            lab[i] = label[i]
        tim[:] = days
        checksum = data_checksum(image, label, days)
        sessions = list(record.sessions)
        group.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "patient_id": record.patient_id,
                "channels": list(record.channels),
                "spacing_mm": [float(v) for v in record.spacing_mm],
                "reference_affine": np.asarray(record.reference_affine, dtype=float).tolist(),
                "reference_nifti": reference_nifti(record.reference_affine, (z, y, x), record.spacing_mm),
                "days": [float(d) for d in days],
                "acquisition_dates": [s.shifted_date for s in sessions],
                "sessions": [_json_safe(s.to_dict()) for s in sessions],
                # Written last: the staged group is complete once this attribute exists.
                "commit": {
                    "generation": uid,
                    "data_sha256": checksum,
                    "checksum_definition": CHECKSUM_DEFINITION,
                    "committed_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    # Orders generations when recovery finds an abandoned commit (see _finish_commit).
                    "staged_unix": time.time(),
                },
            }
        )
        return checksum

    @contextlib.contextmanager
    def _patient_lock(self, pid: str) -> Iterator[None]:
        """Serialise swap + index write of one patient across threads and processes (local stores).

        Object stores have no lock: there, one writer per patient at a time is the caller's contract (the
        ingest flow maps one task per patient).
        """
        if not self.is_local:
            yield
            return
        import fcntl

        os.makedirs(self._path(LOCKS), exist_ok=True)
        with open(self._path(LOCKS, f"{pid}.lock"), "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _finish_commit(self, pid: str, uid: str, flipped_at: float | None = None) -> None:
        """Steps 3-5 of the commit; idempotent, so recovery can call it again after a crash.

        ``flipped_at`` (recovery only): when the abandoned journal was flipped to "commit". A generation
        committed since then, staged after that moment, is newer: the abandoned one is dropped, not swapped in.
        """
        name = f"{pid}.{uid}"
        staged = self._path(STAGING, name)
        target = self._path(PATIENTS, pid)
        with self._patient_lock(pid):
            current = (self._group_meta(pid) or {}).get("attributes", {}).get("commit", {})
            superseded = flipped_at is not None and float(current.get("staged_unix", 0.0)) > flipped_at
            if current.get("generation") != uid and not superseded:
                if self.is_local:
                    self._swap_local(staged, target, self._path(TRASH, name))
                else:
                    self._swap_object(staged, target)
            if self.has_patient(pid):
                sessions = [_session_from_attrs(d) for d in self._committed_attrs(pid)["sessions"]]
                self._write_index_fragment(pid, sessions)
        if self.is_local:
            for entry in self._listdir(TRASH):
                if entry == name or entry.startswith(f"{name}."):
                    self._rm(self._path(TRASH, entry))
        self._rm(staged)
        self._rm(self._path(STAGING, f"{name}.json"))

    def _swap_local(self, staged: str, target: str, trash: str) -> None:
        # Trash is never restored from (recovery rolls forward from staging), so each attempt may use a fresh
        # name and anyone may delete it. Retrying only matters if two writers race on one patient.
        for attempt in range(5):
            if os.path.isdir(target):
                os.makedirs(os.path.dirname(trash), exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(target, trash if attempt == 0 else f"{trash}.{attempt}")
            _pause("swapped")
            try:
                os.rename(staged, target)
                return
            except OSError:
                if attempt == 4 or not os.path.isdir(staged):
                    raise

    def _swap_object(self, staged: str, target: str) -> None:
        fs = self._fs
        # Invisible first: without its zarr.json the group does not exist for any reader.
        self._rm(f"{target}/zarr.json")
        self._rm(target)
        _pause("swapped")
        self._refresh(staged)
        files = [f for f in fs.find(staged) if f.rstrip("/") != f"{staged}/zarr.json"]
        if files:
            # One batched call: async filesystems run the server-side copies concurrently.
            fs.copy(files, [target + f[len(staged) :] for f in files])
        fs.copy(f"{staged}/zarr.json", f"{target}/zarr.json")
        self._refresh(target)

    def _write_index_fragment(self, pid: str, sessions: list[SessionRecord]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(index_rows(pid, sessions), schema=_index_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._write_bytes_atomic(self._path(INDEX, f"{pid}.parquet"), buf.getvalue())

    def delete_patient(self, pid: str) -> None:
        """Remove a patient (index fragment first, so the index never names a missing group)."""
        validate_patient_id(pid)
        with self._patient_lock(pid):
            self._rm(self._path(INDEX, f"{pid}.parquet"))
            self._rm(f"{self._path(PATIENTS, pid)}/zarr.json")
            self._rm(self._path(PATIENTS, pid))

    # --- recovery --------------------------------------------------------------------------------------
    def _journals(self) -> list[tuple[str, dict | None]]:
        out = []
        for name in self._listdir(STAGING):
            if name.endswith(".json") and not name.startswith("."):
                out.append((name[: -len(".json")], self._read_json(self._path(STAGING, name))))
        return out

    @staticmethod
    def _owner_alive(journal: dict) -> bool:
        if journal.get("host") == socket.gethostname():
            owner = int(journal.get("pid", -1))
            # Threads of this very process may be writing right now.
            return owner == os.getpid() or (owner > 0 and _process_alive(owner))
        return time.time() - float(journal.get("time", 0)) < STALE_AFTER_S

    def recover(self) -> list[str]:
        """Finish or roll back writes abandoned by dead writers; returns what was done (one line each).

        Each item is handled on its own: on a read-only store (or when a concurrent recoverer got there
        first) the OSError is skipped and verify() reports what is left.
        """
        done: list[str] = []
        try:
            # List entries before journals: a writer creates its journal before its staging group, so any
            # staging entry seen here has its journal in the later listing while that write is alive.
            entries = {area: self._listdir(area) for area in (STAGING, TRASH)}
            journals = self._journals()
        except OSError:
            return done
        for name, journal in journals:
            if journal is not None and self._owner_alive(journal):
                continue
            pid, _, uid = name.partition(".")
            try:
                if validate_patient_id_or_none(pid) is None:
                    raise OSError(f"foreign journal {name}")
                if journal is not None and journal.get("state") == "commit":
                    self._finish_commit(pid, uid, flipped_at=float(journal.get("time", 0.0)))
                    done.append(f"rolled forward write {uid} of patient {pid}")
                else:
                    self._rm(self._path(STAGING, name))
                    self._rm(self._path(TRASH, name))
                    self._rm(self._path(STAGING, f"{name}.json"))
                    done.append(f"rolled back unfinished write {uid} of patient {pid}")
            except (OSError, KeyError, ValueError):
                continue
        try:
            live = {name for name, journal in self._journals() if journal is not None}
        except OSError:
            return done
        # Staging or trash entries that no journal owns are debris (e.g. a crash during clean-up); temp files
        # (".<name>.tmp", alive for microseconds) only once they are clearly abandoned.
        for area in (STAGING, TRASH):
            for entry in entries[area]:
                base = entry[: -len(".json")] if entry.endswith(".json") else entry
                if entry.startswith("."):
                    if not self._is_old_temp(self._path(area, entry)):
                        continue
                elif base in live:
                    continue
                try:
                    self._rm(self._path(area, entry))
                    done.append(f"removed leftover {area}/{entry}")
                except OSError:
                    continue
        for entry in self._listdir(INDEX):
            if entry.startswith(".") and self._is_old_temp(self._path(INDEX, entry)):
                with contextlib.suppress(OSError):
                    self._rm(self._path(INDEX, entry))
                    done.append(f"removed leftover {INDEX}/{entry}")
        return done

    def _is_old_temp(self, path: str) -> bool:
        if not (self.is_local and path.endswith(".tmp")):
            return False
        try:
            return time.time() - os.path.getmtime(path) > TEMP_STALE_S
        except OSError:
            return False

    # --- checking --------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Every fault in the store, one line each naming patient and problem (empty when sound)."""
        import pandas as pd

        problems: list[str] = []
        attrs = self._root_attrs()
        if attrs is None:
            return [f"store {self.url}: no root zarr.json"]
        if attrs.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"store: schema_version {attrs.get('schema_version')!r} != {SCHEMA_VERSION}")
        for area in (STAGING, TRASH):
            for entry in self._listdir(area):
                problems.append(f"store: unfinished write left in {area}/{entry}")
        committed = []
        for name in self._listdir(PATIENTS):
            if name == "zarr.json":
                continue
            if validate_patient_id_or_none(name) is None:
                problems.append(f"store: invalid patient group name {name!r} under {PATIENTS}/")
                continue
            meta = self._group_meta(name)
            if not meta or not meta.get("attributes", {}).get("commit"):
                problems.append(f"patient {name}: group present but not committed (partial write)")
            else:
                committed.append(name)
        try:
            index = self.index()
        except Exception as exc:  # a corrupt fragment must not hide every other fault
            problems.append(f"index: unreadable ({type(exc).__name__}: {exc})")
            index = pd.DataFrame(columns=list(INDEX_COLUMNS))
        for name in self._listdir(INDEX):
            stem = name[: -len(".parquet")] if name.endswith(".parquet") else None
            if name.startswith("."):
                continue
            if stem is None or stem not in committed:
                problems.append(f"index: fragment {name} does not belong to a committed patient")
        for pid in committed:
            problems.extend(f"patient {pid}: {p}" for p in self._verify_patient(pid, index))
        return problems

    def _verify_patient(self, pid: str, index: Any) -> list[str]:
        out: list[str] = []
        try:
            attrs = self._committed_attrs(pid)
            group = self._open_group(pid)
            members = dict(group.arrays())
        except Exception as exc:
            return [f"cannot open group ({type(exc).__name__}: {exc})"]
        expected = {
            "image": (IMAGE_DIMS, np.float32),
            "label": (LABEL_DIMS, np.uint8),
            "time": (TIME_DIMS, np.float64),
        }
        for key, (dims, dtype) in expected.items():
            if key not in members:
                out.append(f"array {key!r} missing")
                continue
            arr = members[key]
            if tuple(arr.metadata.dimension_names or ()) != dims:
                out.append(f"{key} dims {arr.metadata.dimension_names} != {dims}")
            if arr.dtype != dtype:
                out.append(f"{key} dtype {arr.dtype} != {np.dtype(dtype)}")
            if arr.ndim != len(dims):
                out.append(f"{key} has {arr.ndim} dims, expected {len(dims)}")
        if out:
            return out
        image, label, tarr = members["image"], members["label"], members["time"]
        t = tarr.shape[0]
        if image.shape[0] != t or label.shape[0] != t:
            out.append(f"time lengths differ: image {image.shape}, label {label.shape}, time {tarr.shape}")
        if tuple(image.shape[2:]) != tuple(label.shape[1:]):
            out.append(f"grid of image {image.shape} != grid of label {label.shape}")
        channels = attrs.get("channels", [])
        if image.shape[1] != len(channels):
            out.append(f"image has {image.shape[1]} channels but attrs name {len(channels)}: {channels}")
        days = np.asarray(tarr[:], dtype=np.float64)
        if t and (days[0] != 0 or np.any(np.diff(days) <= 0)):
            out.append(f"time must start at 0 and strictly increase, got {days.tolist()}")
        sessions = attrs.get("sessions", [])
        if len(sessions) != t:
            out.append(f"{len(sessions)} session records for {t} time points")
        try:
            records = [_session_from_attrs(d) for d in sessions]
        except Exception as exc:
            out.append(f"unreadable session records ({exc})")
            records = []
        if records and [r.days for r in records] != days.tolist():
            out.append("session record days differ from the time array")
        rows = index[index["patient_id"] == pid] if len(index) else index
        if len(rows) != t:
            out.append(f"index has {len(rows)} rows for {t} sessions")
        elif records:
            want = index_rows(pid, records)
            got = rows.sort_values("time_index").to_dict("records")
            for w, g in zip(want, got, strict=True):
                for col in INDEX_COLUMNS[1:]:
                    if not _same(w[col], g[col]):
                        out.append(f"index row {w['time_index']}: {col} {g[col]!r} != stored {w[col]!r}")
        if out:
            return out
        commit = attrs.get("commit", {})
        try:
            actual = data_checksum(image, label, days)
            bad_labels = set()
            for i in range(t):
                bad_labels |= set(np.unique(label[i]).tolist()) - set(LABEL_VALUES)
        except Exception as exc:
            return [f"data unreadable ({type(exc).__name__}: {exc})"]
        if actual != commit.get("data_sha256"):
            out.append(f"data checksum mismatch (stored {commit.get('data_sha256')}, computed {actual})")
        if bad_labels:
            out.append(f"label values outside {sorted(LABEL_VALUES)}: {sorted(bad_labels)}")
        return out

    def info(self) -> dict:
        """Summary: url, schema version, created_by, patients, sessions, channels, grids, spacings, bytes."""
        attrs = self._root_attrs() or {}
        pids = self.patient_ids()
        sessions = 0
        channels: dict[str, None] = {}  # ordered set: channels in stored order
        grids: set[str] = set()
        spacings: set[str] = set()
        for pid in pids:
            a = self._committed_attrs(pid)
            sessions += len(a.get("sessions", []))
            channels.update(dict.fromkeys(a.get("channels", [])))
            shape = a.get("reference_nifti", {}).get("shape_xyz")
            if shape:
                grids.add("x".join(str(v) for v in reversed(shape)))
            spacings.add("x".join(f"{v:g}" for v in a.get("spacing_mm", [])))
        try:
            self._refresh(self._root)
            size = int(self._fs.du(self._root, total=True))
        except Exception:
            size = -1
        return {
            "url": self.url,
            "schema_version": attrs.get("schema_version"),
            "created_by": attrs.get("created_by"),
            "patients": len(pids),
            "sessions": sessions,
            "channels": list(channels),
            "grids_zyx": sorted(grids),
            "spacings_mm_zyx": sorted(spacings),
            "size_bytes": size,
        }


def validate_patient_id_or_none(name: str) -> str | None:
    """``name`` when it is a valid patient id, else None (for skipping foreign directory entries)."""
    try:
        return validate_patient_id(name)
    except ValueError:
        return None
