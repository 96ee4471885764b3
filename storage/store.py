"""The cohort store: one Zarr v3 hierarchy, one group per patient, atomic per-patient writes, an index table.

Layout (schema v2, see :mod:`storage.schema`)::

    <store>/zarr.json                     root group; attrs schema_version, created_by, reference_space
    <store>/patients/zarr.json            group holding one group per committed patient
    <store>/patients/<pid>/{image,label,time}   attrs include ``treatments`` (the patient's events, JSON)
    <store>/patients/<pid>/tissue         optional (2, z, y, x) float16 white/grey-matter probabilities
    <store>/index/<pid>.parquet           one row per session; ``pandas.read_parquet("<store>/index")``
    <store>/treatments/<pid>.parquet      one row per treatment event (none: an empty table);
                                          ``pandas.read_parquet("<store>/treatments")``
    <store>/.staging/<pid>.<uid>/         a patient group being written (never read by anyone)
    <store>/.staging/<pid>.<uid>.json     the write's journal: owner (host, pid), state "writing" | "commit"
    <store>/.trash/<pid>.<uid>/           a replaced patient group awaiting deletion (local stores)
    <store>/.locks/<pid>.lock             per-patient writer lock: a flock file (local stores) or a lease
                                          object: holder (host, pid, token, time) (object stores)

Reading without our code: ``xarray.open_zarr(url, group="patients/<pid>", consolidated=False)`` gives
``image`` (time, channel, z, y, x) float32, ``label`` (time, z, y, x) uint8 and the ``time`` coordinate in days
since the patient's baseline (float64); the group attribute ``treatments`` lists the patient's treatment
events (kind, start/end in days since the baseline scan's date and as shifted dates). No consolidated metadata is written anywhere, on purpose: xarray
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
4. Write ``index/<pid>.parquet`` and ``treatments/<pid>.parquet`` atomically (temp file + ``os.replace``
   locally; one PUT on object stores). Both are derivable from the committed group, so recovery can always
   rewrite them.
5. Delete trash, staging and the journal.

Concurrency: writers of different patients run in parallel freely (threads or processes). Writers of one
patient take its lock (:mod:`storage._locking`): ``fcntl.flock`` on ``.locks/<pid>.lock`` on local disk, a
lease object created with an exclusive PUT on object stores. ``write_patient`` (a blind replace) holds it for
steps 3-4, so racing replacements leave one complete version with a matching index. ``update_patient(pid,
merge)`` -- how appending writers such as ingest add sessions -- holds it from reading the committed patient,
through ``merge``, to the end of step 4, so concurrent updates are serialised and none loses another's
sessions. Its journal records the generation it read (``expect_generation``); at step 3 a different committed
generation (a blind write or a broken lease got in between) refuses the commit and ``merge`` runs again on the
new state; recovery drops such an abandoned commit instead of rolling it forward.

Recovery runs when a store is opened (``recover=True``): journals whose owner is gone (same host: the
process no longer exists, or -- for this very process -- the write has ended, e.g. failed on a full disk and
could not clean up; another host: older than ``STALE_AFTER_S``) are rolled back ("writing") or forward
("commit"), and object-store leases of dead holders are deleted. Journals of live writers are left alone, so
parallel writers never undo each other. An abandoned "commit" is dropped instead of rolled forward when a
generation staged after its flip has been committed since (a newer write wins). ``update_patient`` settles
abandoned journals of its patient under the lock before reading. ``verify()`` reports any leftover journal,
staging or trash entry, uncommitted group, and every inconsistency between arrays, attributes, index and the
stored data checksum.

Schema versions: a store of an older version (v1: no treatments) opens read-only: every reader works
(a v1 patient has no events), writers raise ``ReadOnlyStoreError``, and nothing is recovered on open.
``migrate_store`` (``longitudinal store migrate``) upgrades it in place (:mod:`storage._migrate`).

Full disk: a write failing with ENOSPC or EDQUOT removes its staging and journal and raises
``StoreFullError`` (an OSError with the original errno), whose message starts with "disk full"; what its
clean-up could not remove is recovered on the next open.

Crash means a process crash (SIGKILL, OOM, node loss with the disk intact). Chunk files are not fsynced, so
a power loss on a local disk may still lose a recent write; the checksum in verify() would notice.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

import numpy as np

from storage._audit import TEMP_STALE_S, StoreAudit
from storage._commit import (
    STALE_AFTER_S,
    UPDATE_ATTEMPTS,
    ConcurrentUpdateError,
    MergeFn,
    PatientUpdate,
)
from storage._location import (
    DISK_FULL_ERRNOS,
    INDEX,
    LOCKS,
    PATIENTS,
    PAUSE_ENV,
    PAUSE_RESUME_ENV,
    PAUSE_SIGNAL_ENV,
    PAUSE_STAGES,
    STAGING,
    TRASH,
    TREATMENTS,
    ReadOnlyStoreError,
    StoreFullError,
)
from storage._locking import LOCK_STALE_S, LOCK_WAIT_S
from storage._migrate import MigrationError, MigrationReport, migrate
from storage._records import (
    CHECKSUM_DEFINITION,
    REFERENCE_SPACE,
    TREATMENTS_CHECKSUM_DEFINITION,
    PatientArrays,
    data_checksum,
    index_rows,
    index_schema,
    reference_nifti,
    session_from_attrs,
    treatment_rows,
    treatments_from_attrs,
    treatments_schema,
    validate_patient_id_or_none,
)
from storage._staging import ZSTD_LEVEL
from storage.schema import (
    INDEX_COLUMNS,
    READ_ONLY_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    TREATMENT_COLUMNS,
    PatientRecord,
    SessionRecord,
    TreatmentRecord,
    validate_patient_id,
)

__all__ = [
    "CHECKSUM_DEFINITION",
    "DISK_FULL_ERRNOS",
    "INDEX",
    "LOCKS",
    "LOCK_STALE_S",
    "LOCK_WAIT_S",
    "PATIENTS",
    "PAUSE_ENV",
    "PAUSE_RESUME_ENV",
    "PAUSE_SIGNAL_ENV",
    "PAUSE_STAGES",
    "REFERENCE_SPACE",
    "STAGING",
    "STALE_AFTER_S",
    "TEMP_STALE_S",
    "TRASH",
    "TREATMENTS",
    "TREATMENTS_CHECKSUM_DEFINITION",
    "UPDATE_ATTEMPTS",
    "ZSTD_LEVEL",
    "CohortStore",
    "ConcurrentUpdateError",
    "MergeFn",
    "MigrationError",
    "MigrationReport",
    "PatientArrays",
    "PatientUpdate",
    "ReadOnlyStoreError",
    "StoreFullError",
    "data_checksum",
    "index_rows",
    "migrate_store",
    "reference_nifti",
    "treatment_rows",
    "validate_patient_id_or_none",
]


class CohortStore(StoreAudit):
    """Reader and writer of one cohort store (local path or fsspec URL). Build with :meth:`open`.

    Writers (``write_patient``, ``update_patient``, ``delete_patient``) come from :mod:`storage._commit`,
    ``recover``/``verify`` from :mod:`storage._audit`, the file plumbing from :mod:`storage._location`.
    """

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
        A store of an older schema version (READ_ONLY_SCHEMA_VERSIONS) opens read-only (``read_only``; writers
        raise ReadOnlyStoreError, nothing is recovered) until ``migrate_store`` upgrades it.
        Raises FileNotFoundError when the store is missing and ``create`` is False, ValueError on a schema
        version this code does not read.
        """
        store = cls(os.fspath(url), storage_options)
        attrs = store._root_attrs()
        if attrs is None:
            if not create:
                raise FileNotFoundError(f"no cohort store at {store.url} (use create=True to make one)")
            with store._naming_disk_full("creating the store"):
                store._create(created_by or "storage")
        elif attrs.get("schema_version") in READ_ONLY_SCHEMA_VERSIONS:
            store.schema_version = int(attrs["schema_version"])
        elif attrs.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"store {store.url} has schema_version {attrs.get('schema_version')!r}; "
                f"this code reads versions {[*READ_ONLY_SCHEMA_VERSIONS, SCHEMA_VERSION]}"
            )
        if recover and not store.read_only:
            store.recover()
        return store

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
                "treatments": f"{TREATMENTS}/<patient_id>.parquet, columns {list(TREATMENT_COLUMNS)}",
            },
        )
        root.require_group(PATIENTS)
        if self.is_local:
            os.makedirs(self._path(INDEX), exist_ok=True)
            os.makedirs(self._path(TREATMENTS), exist_ok=True)

    @property
    def attrs(self) -> dict:
        """Root attributes (schema_version, created_by, reference_space, ...)."""
        return self._root_attrs() or {}

    # --- reading ---------------------------------------------------------------------------------------
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

    def sessions(self, pid: str) -> list[SessionRecord]:
        """The patient's session records in time order (reads attributes only). KeyError if absent."""
        return [session_from_attrs(d) for d in self._committed_attrs(pid)["sessions"]]

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
            sessions=[session_from_attrs(d) for d in attrs["sessions"]],
            treatments=treatments_from_attrs(attrs),
            tissue=group["tissue"] if "tissue" in group else None,
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
            treatments=a.treatments,
            tissue=None if a.tissue is None else np.asarray(a.tissue[...], dtype=np.float32),
        )

    def patient_treatments(self, pid: str) -> list[TreatmentRecord]:
        """The patient's treatment events in stored order (start date, then kind); days since the baseline
        scan's calendar date. Empty for an untreated patient and in a schema v1 store. KeyError if absent."""
        return treatments_from_attrs(self._committed_attrs(pid))

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
                tables.append(pq.read_table(fh, schema=index_schema()))
        table = pa.concat_tables(tables) if tables else index_schema().empty_table()
        df: pd.DataFrame = table.to_pandas()
        df = df[list(INDEX_COLUMNS)]
        return df.sort_values(["patient_id", "days"], kind="stable").reset_index(drop=True)

    def treatments(self) -> Any:
        """One row per (committed patient, treatment event), columns TREATMENT_COLUMNS, sorted by (patient_id,
        event). Read from the ``treatments/`` fragments (in a schema v1 store, which has none: empty)."""
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        committed = set(self.patient_ids())
        tables = []
        for name in self._listdir(TREATMENTS):
            if not name.endswith(".parquet") or name.startswith((".", "_")):
                continue
            if name[: -len(".parquet")] not in committed:
                continue
            with self._fs.open(self._path(TREATMENTS, name), "rb") as fh:
                tables.append(pq.read_table(fh, schema=treatments_schema()))
        table = pa.concat_tables(tables) if tables else treatments_schema().empty_table()
        df: pd.DataFrame = table.to_pandas()
        df = df[list(TREATMENT_COLUMNS)]
        return df.sort_values(["patient_id", "event"], kind="stable").reset_index(drop=True)

    def info(self) -> dict:
        """Summary: url, schema version (and whether read-only), created_by, patients, sessions, treatment
        events, channels, grids, spacings, bytes."""
        attrs = self._root_attrs() or {}
        pids = self.patient_ids()
        sessions = 0
        events = 0
        channels: dict[str, None] = {}  # ordered set: channels in stored order
        grids: set[str] = set()
        spacings: set[str] = set()
        for pid in pids:
            a = self._committed_attrs(pid)
            sessions += len(a.get("sessions", []))
            events += len(a.get("treatments") or [])
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
            "read_only": self.read_only,
            "created_by": attrs.get("created_by"),
            "patients": len(pids),
            "sessions": sessions,
            "treatment_events": events,
            "channels": list(channels),
            "grids_zyx": sorted(grids),
            "spacings_mm_zyx": sorted(spacings),
            "size_bytes": size,
        }


def migrate_store(
    url: str | os.PathLike, *, storage_options: dict | None = None, verify: bool = True
) -> MigrationReport:
    """Upgrade the store at ``url`` to SCHEMA_VERSION in place (:func:`storage._migrate.migrate`); a store
    already at it is left as is. Raises MigrationError listing every fault that stops it, FileNotFoundError
    when there is no store, ValueError for a version this code does not read."""
    store = CohortStore.open(url, storage_options=storage_options, recover=False)
    return migrate(store, verify=verify)
