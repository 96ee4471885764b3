"""The commit protocol of a cohort store: journal, staging, the swap, the index fragment, crash semantics.

:class:`CommitProtocol` is a mixin of :class:`storage.store.CohortStore`; the store module's docstring
describes the protocol step by step. Here live the writers (``write_patient``, ``update_patient``,
``delete_patient``) and what a crash leaves behind means (``_recover_journal``), which both the writers and
``recover()`` apply.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from storage._location import (
    INDEX,
    PATIENTS,
    STAGING,
    TRASH,
    TREATMENTS,
    StoreFullError,
    disk_full_cause,
    disk_full_error,
    pause,
    process_alive,
)
from storage._locking import RECOVERY_LOCK_WAIT_S, PatientLocking
from storage._records import (
    index_rows,
    index_schema,
    session_from_attrs,
    treatment_rows,
    treatments_from_attrs,
    treatments_schema,
    validate_patient_id_or_none,
)
from storage._staging import write_patient_group
from storage.schema import PatientRecord, validate_patient_id

# A journal written by another host is considered abandoned after this long (seconds); same-host journals
# are judged by whether their process still exists (and, for this process, whether the write still runs).
STALE_AFTER_S = 6 * 3600.0
# update_patient re-reads and re-merges at most this often when another writer committed in between.
UPDATE_ATTEMPTS = 5

_ANY: Any = object()  # "no expected generation": a blind replace
# Generations being written by threads of this process: a journal of this process naming any other
# generation was left by a write that failed and could not clean up (a full disk, say).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()

MergeFn = Callable[[PatientRecord | None], PatientRecord | None]


class ConcurrentUpdateError(OSError):
    """Another writer committed the patient between an update's read and its commit (worth a retry)."""


@dataclass(frozen=True)
class PatientUpdate:
    """What ``update_patient`` did.

    generation: the patient's committed generation afterwards (the unchanged one, or None for an absent
    patient, when the merge returned None). record: what was written, None when nothing was.
    """

    patient_id: str
    generation: str | None
    record: PatientRecord | None

    @property
    def written(self) -> bool:
        """Whether a new generation was committed."""
        return self.record is not None


def journal_owner_alive(journal: dict) -> bool:
    """Whether the writer of ``journal`` may still be running (module docstring of storage.store)."""
    if journal.get("host") == socket.gethostname():
        owner = int(journal.get("pid", -1))
        if owner == os.getpid():
            if "writer" not in journal:
                return True  # not written by this code: another thread of this process may be writing
            with _ACTIVE_LOCK:
                return journal.get("generation") in _ACTIVE
        return owner > 0 and process_alive(owner)
    return time.time() - float(journal.get("time", 0)) < STALE_AFTER_S


class CommitProtocol(PatientLocking):
    """Mixin of CohortStore: atomic per-patient writes (read side: ``read_patient`` of the facade)."""

    # --- public writers ------------------------------------------------------------------------------
    def write_patient(self, record: PatientRecord) -> str:
        """Atomically replace patient ``record.patient_id`` with ``record`` (a blind replace).

        record.image (T, C, Z, Y, X) float32, label (T, Z, Y, X) uint8, days (T,) float64 from 0, strictly
        increasing (module docstring describes the commit). To add to what is stored, use
        :meth:`update_patient`: a merge computed from an earlier read would drop what others committed since.
        Raises ValueError listing every problem of the record, StoreFullError (an OSError) when the device is
        full, ReadOnlyStoreError on a store of an older schema version. Returns the committed generation id.
        """
        self._require_writable(f"write patient {record.patient_id}")
        with self._naming_disk_full(f"writing patient {record.patient_id}"):
            return self._commit_record(record)

    def update_patient(self, pid: str, merge: MergeFn, *, attempts: int = UPDATE_ATTEMPTS) -> PatientUpdate:
        """Read-modify-write patient ``pid`` under its writer lock: concurrent updates never lose each other.

        ``merge(current)`` gets the committed patient (None when absent), read while holding the lock, and
        returns the record to commit, or None to write nothing. The lock is held from the read to the end of
        the commit (other writers of ``pid`` wait; other patients proceed). Should another writer commit in
        between anyway (a blind ``write_patient``, a broken lease), the commit is refused and ``merge`` runs
        again on the new state, up to ``attempts`` times, then ConcurrentUpdateError. Raises what ``merge``
        raises, ValueError for an invalid record, StoreFullError when the device is full, ReadOnlyStoreError on a
        store of an older schema version.
        """
        validate_patient_id(pid)
        self._require_writable(f"update patient {pid}")
        with self._naming_disk_full(f"updating patient {pid}"):
            for _ in range(max(1, attempts)):
                with self._patient_lock(pid):
                    self._settle_abandoned(pid)
                    base = self._commit_attrs(pid).get("generation")
                    current = self.read_patient(pid) if base is not None else None  # type: ignore[attr-defined]
                    record = merge(current)
                    if record is None:
                        return PatientUpdate(pid, base, None)
                    if record.patient_id != pid:
                        raise ValueError(f"merge for patient {pid!r} returned patient {record.patient_id!r}")
                    try:
                        return PatientUpdate(pid, self._commit_record(record, expect=base), record)
                    except ConcurrentUpdateError:
                        continue
        raise ConcurrentUpdateError(
            f"patient {pid}: another writer committed between read and commit in each of {attempts} attempts"
        )

    def delete_patient(self, pid: str) -> None:
        """Remove a patient (index and treatments fragments first, so no table names a missing group)."""
        validate_patient_id(pid)
        self._require_writable(f"delete patient {pid}")
        with self._patient_lock(pid):
            self._rm(self._path(INDEX, f"{pid}.parquet"))
            self._rm(self._path(TREATMENTS, f"{pid}.parquet"))
            self._rm(f"{self._path(PATIENTS, pid)}/zarr.json")
            self._rm(self._path(PATIENTS, pid))

    @contextlib.contextmanager
    def _naming_disk_full(self, action: str) -> Iterator[None]:
        """Turn an ENOSPC/EDQUOT anywhere below into StoreFullError, whose message says "disk full"."""
        try:
            yield
        except StoreFullError:
            raise
        except Exception as exc:
            cause = disk_full_cause(exc)
            if cause is None:
                raise
            raise disk_full_error(cause, self.url, action) from exc

    # --- steps 1-2: journal and staging ----------------------------------------------------------------
    def _commit_record(self, record: PatientRecord, expect: Any = _ANY) -> str:
        """Steps 1-5 for ``record``; ``expect``: the generation the commit must replace (None: no patient)."""
        problems = record.check()
        if problems:
            raise ValueError(f"cannot write patient {record.patient_id!r}: " + "; ".join(problems))
        pid = record.patient_id
        uid = uuid.uuid4().hex
        name = f"{pid}.{uid}"
        journal = self._path(STAGING, f"{name}.json")
        with _ACTIVE_LOCK:
            _ACTIVE.add(uid)
        try:
            try:
                self._write_journal(journal, pid, uid, "writing", expect)
                self._write_staging(name, record, uid)
                pause("staged")
                self._write_journal(journal, pid, uid, "commit", expect)
            except BaseException:
                self._discard(name)
                raise
            pause("committing")
            try:
                self._finish_commit(pid, uid, expect=expect)
            except ConcurrentUpdateError:
                self._discard(name)
                raise
        finally:
            # From here a leftover of this write is abandoned: recovery in this process may handle it too.
            with _ACTIVE_LOCK:
                _ACTIVE.discard(uid)
        return uid

    def _discard(self, name: str) -> None:
        """Best-effort roll back of an uncommitted write (recovery removes what this leaves)."""
        for path in (self._path(STAGING, name), self._path(STAGING, f"{name}.json")):
            with contextlib.suppress(OSError):
                self._rm(path)

    def _write_journal(self, path: str, pid: str, uid: str, state: str, expect: Any = _ANY) -> None:
        body = {
            "patient_id": pid,
            "generation": uid,
            "state": state,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "writer": "storage",
            "time": time.time(),
        }
        if expect is not _ANY:
            body["expect_generation"] = expect
        self._write_bytes_atomic(path, json.dumps(body).encode())

    def _write_staging(self, name: str, record: PatientRecord, uid: str) -> str:
        """Step 1's patient group under ``.staging/<name>/``; returns its data checksum."""
        return write_patient_group(self._zarr_store(STAGING, name), record, uid)

    # --- steps 3-5: swap, index, clean-up ----------------------------------------------------------------
    def _finish_commit(
        self, pid: str, uid: str, flipped_at: float | None = None, expect: Any = _ANY, recovering: bool = False
    ) -> bool:
        """Steps 3-5 of the commit; idempotent, so recovery can call it again after a crash. Returns whether
        generation ``uid`` is the committed one afterwards.

        ``expect``: the generation the write replaces (None: no patient). A live writer finding another one
        committed raises ConcurrentUpdateError; recovery (``recovering``) drops such a write instead, and
        also accepts an absent patient (its own half-done swap). ``flipped_at`` (recovery only): when the
        abandoned journal was flipped to "commit"; a generation staged after that moment and committed since
        is newer, so the abandoned one is dropped, not swapped in.
        """
        name = f"{pid}.{uid}"
        staged = self._path(STAGING, name)
        target = self._path(PATIENTS, pid)
        with self._patient_lock(pid, timeout_s=RECOVERY_LOCK_WAIT_S if recovering else None):
            current = self._commit_attrs(pid)
            generation = current.get("generation")
            committed = generation == uid
            if not committed:
                superseded = flipped_at is not None and float(current.get("staged_unix", 0.0)) > flipped_at
                if expect is not _ANY and generation != expect and not (recovering and generation is None):
                    if not recovering:
                        raise ConcurrentUpdateError(
                            f"patient {pid}: generation {generation} was committed after this update read "
                            f"{expect}"
                        )
                    superseded = True
                if not superseded:
                    if self.is_local:
                        self._swap_local(staged, target, self._path(TRASH, name))
                    else:
                        self._swap_object(staged, target)
                    committed = True
            if self.has_patient(pid):
                attrs = self._committed_attrs(pid)
                self._write_index_fragment(pid, [session_from_attrs(d) for d in attrs["sessions"]])
                if not self.read_only:
                    self._write_treatments_fragment(pid, treatments_from_attrs(attrs))
        if self.is_local:
            for entry in self._listdir(TRASH):
                if entry == name or entry.startswith(f"{name}."):
                    self._rm(self._path(TRASH, entry))
        self._rm(staged)
        self._rm(self._path(STAGING, f"{name}.json"))
        return committed

    def _swap_local(self, staged: str, target: str, trash: str) -> None:
        # Trash is never restored from (recovery rolls forward from staging), so each attempt may use a fresh
        # name and anyone may delete it. Retrying only matters if two writers race on one patient.
        for attempt in range(5):
            if os.path.isdir(target):
                os.makedirs(os.path.dirname(trash), exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(target, trash if attempt == 0 else f"{trash}.{attempt}")
            pause("swapped")
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
        pause("swapped")
        self._refresh(staged)
        files = [f for f in fs.find(staged) if f.rstrip("/") != f"{staged}/zarr.json"]
        if files:
            # One batched call: async filesystems run the server-side copies concurrently.
            fs.copy(files, [target + f[len(staged) :] for f in files])
        fs.copy(f"{staged}/zarr.json", f"{target}/zarr.json")
        self._refresh(target)

    def _write_index_fragment(self, pid: str, sessions: list) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(index_rows(pid, sessions), schema=index_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._write_bytes_atomic(self._path(INDEX, f"{pid}.parquet"), buf.getvalue())

    def _write_treatments_fragment(self, pid: str, treatments: list) -> None:
        """``treatments/<pid>.parquet``: the patient's events (TREATMENT_COLUMNS), written even when empty so
        that every committed patient has one and plain readers always find the columns."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(treatment_rows(pid, treatments), schema=treatments_schema())
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self._write_bytes_atomic(self._path(TREATMENTS, f"{pid}.parquet"), buf.getvalue())

    # --- crash semantics -------------------------------------------------------------------------------
    def _journals(self) -> list[tuple[str, dict | None]]:
        """(``<pid>.<uid>``, journal body or None when unreadable) for every journal under .staging/."""
        out = []
        for name in self._listdir(STAGING):
            if name.endswith(".json") and not name.startswith("."):
                out.append((name[: -len(".json")], self._read_json(self._path(STAGING, name))))
        return out

    def _recover_journal(self, name: str, journal: dict | None) -> str:
        """Roll the abandoned write ``name`` (``<pid>.<uid>``) forward ("commit") or back; says what it did.

        Raises OSError (e.g. on a read-only store, or for a foreign journal name), KeyError or ValueError.
        """
        pid, _, uid = name.partition(".")
        if validate_patient_id_or_none(pid) is None:
            raise OSError(f"foreign journal {name}")
        if journal is not None and journal.get("state") == "commit":
            committed = self._finish_commit(
                pid,
                uid,
                flipped_at=float(journal.get("time", 0.0)),
                expect=journal.get("expect_generation", _ANY),
                recovering=True,
            )
            if committed:
                return f"rolled forward write {uid} of patient {pid}"
            return f"dropped write {uid} of patient {pid}: a newer generation was committed"
        self._rm(self._path(STAGING, name))
        self._rm(self._path(TRASH, name))
        self._rm(self._path(STAGING, f"{name}.json"))
        return f"rolled back unfinished write {uid} of patient {pid}"

    def _settle_abandoned(self, pid: str) -> None:
        """Under ``pid``'s lock, before an update reads it: finish or roll back its dead writers' journals,
        so the update starts from what a crashed committer meant to leave (never from a half-done swap)."""
        for name, journal in self._journals():
            if name.partition(".")[0] != pid or (journal is not None and journal_owner_alive(journal)):
                continue
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._recover_journal(name, journal)
