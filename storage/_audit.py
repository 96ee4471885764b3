"""Audit of a cohort store: ``recover()`` (finish or roll back what dead writers left) and ``verify()``.

:class:`StoreAudit` is a mixin of :class:`storage.store.CohortStore` (it reads through the facade's
``index()`` and ``_open_group``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import numpy as np

from storage._commit import CommitProtocol, journal_owner_alive
from storage._location import INDEX, PATIENTS, STAGING, TRASH, TREATMENTS
from storage._records import (
    data_checksum,
    index_rows,
    same_value,
    session_from_attrs,
    sorted_treatments,
    tissue_checksum,
    treatment_rows,
    treatments_checksum,
    treatments_from_attrs,
    validate_patient_id_or_none,
)
from storage.schema import (
    IMAGE_DIMS,
    INDEX_COLUMNS,
    LABEL_DIMS,
    LABEL_VALUES,
    READ_ONLY_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    TIME_DIMS,
    TISSUE_CHANNELS,
    TISSUE_DIMS,
    TISSUE_DTYPE,
    TREATMENT_COLUMNS,
)

# Temp files of atomic local writes exist for microseconds (a failed write removes its own); older ones were
# left by a killed writer.
TEMP_STALE_S = 300.0


class StoreAudit(CommitProtocol):
    """Mixin of CohortStore: recovery and verification."""

    def recover(self) -> list[str]:
        """Finish or roll back writes abandoned by dead writers; returns what was done (one line each).

        A writer is dead when its process is gone (same host), its write failed and is over (this process:
        a full disk, say, left what its clean-up could not remove), or its journal is older than
        ``STALE_AFTER_S`` (another host). Each item is handled on its own: on a read-only store (or when a
        concurrent recoverer got there first) the OSError is skipped and verify() reports what is left.
        """
        done: list[str] = []
        try:
            # List entries before journals: a writer creates its journal before its staging group, so any
            # staging entry seen here has its journal in the later listing while that write is alive.
            entries = {area: self._listdir(area) for area in (STAGING, TRASH)}
            journals = self._journals()
        except OSError:
            return done
        handled: set[str] = set()
        for name, journal in journals:
            if journal is not None and journal_owner_alive(journal):
                continue
            try:
                done.append(self._recover_journal(name, journal))
                handled.add(name)
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
                elif base in live or base in handled:
                    continue
                try:
                    self._rm(self._path(area, entry))
                    done.append(f"removed leftover {area}/{entry}")
                except OSError:
                    continue
        for area in (INDEX, TREATMENTS):
            for entry in self._listdir(area):
                if entry.startswith(".") and self._is_old_temp(self._path(area, entry)):
                    with contextlib.suppress(OSError):
                        self._rm(self._path(area, entry))
                        done.append(f"removed leftover {area}/{entry}")
        done.extend(self._clear_abandoned_leases())
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
        """Every fault in the store, one line each naming patient and problem (empty when sound).

        A schema v1 store is checked as v1 (it has no treatments); a v2 store's treatment events are checked
        too: their records, their checksum in the ``commit`` attribute and the ``treatments/`` fragments.
        """
        import pandas as pd

        problems: list[str] = []
        attrs = self._root_attrs()
        if attrs is None:
            return [f"store {self.url}: no root zarr.json"]
        version = attrs.get("schema_version")
        if version not in (SCHEMA_VERSION, *READ_ONLY_SCHEMA_VERSIONS):
            problems.append(f"store: schema_version {version!r} != {SCHEMA_VERSION}")
        with_treatments = version == SCHEMA_VERSION
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
        treatments = pd.DataFrame(columns=list(TREATMENT_COLUMNS))
        if with_treatments:
            try:
                treatments = self.treatments()  # type: ignore[attr-defined]
            except Exception as exc:  # a corrupt fragment must not hide every other fault
                problems.append(f"treatments: unreadable ({type(exc).__name__}: {exc})")
            fragments = set()
            for name in self._listdir(TREATMENTS):
                if name.startswith("."):
                    continue
                stem = name[: -len(".parquet")] if name.endswith(".parquet") else None
                fragments.add(stem)
                if stem is None or stem not in committed:
                    problems.append(f"treatments: fragment {name} does not belong to a committed patient")
            problems += [f"patient {pid}: no treatments fragment {TREATMENTS}/{pid}.parquet"
                         for pid in committed if pid not in fragments]
        for pid in committed:
            problems.extend(f"patient {pid}: {p}" for p in self._verify_patient(pid, index))
            if with_treatments:
                problems.extend(f"patient {pid}: {p}" for p in self._verify_treatments(pid, treatments))
        return problems

    def _verify_treatments(self, pid: str, table: Any) -> list[str]:
        """The patient's treatment events against their checksum, their records and the treatments table."""
        try:
            attrs = self._committed_attrs(pid)
        except Exception as exc:
            return [f"cannot read attributes ({type(exc).__name__}: {exc})"]
        raw = attrs.get("treatments")
        if not isinstance(raw, list):
            return ["no treatments attribute (written by schema v1 code: run the migration again)"]
        out: list[str] = []
        expected = (attrs.get("commit") or {}).get("treatments_sha256")
        if expected is None:
            out.append("no treatments checksum in the commit attribute")
        elif treatments_checksum(raw) != expected:
            out.append(f"treatments checksum mismatch (stored {expected}, computed {treatments_checksum(raw)})")
        try:
            records = treatments_from_attrs(attrs)
        except Exception as exc:
            return [*out, f"unreadable treatment records ({type(exc).__name__}: {exc})"]
        sessions = attrs.get("sessions") or []
        baseline = sessions[0].get("shifted_date") if sessions and isinstance(sessions[0], dict) else None
        for record in records:
            out.extend(record.problems(baseline))
        if len({r.key for r in records}) != len(records):
            out.append("treatment events are not unique by (kind, start_date)")
        if records != sorted_treatments(records):
            out.append("treatment events are not in stored order (start date, kind)")
        rows = table[table["patient_id"] == pid] if len(table) else table
        want = treatment_rows(pid, records)
        if len(rows) != len(want):
            out.append(f"treatments table has {len(rows)} rows for {len(want)} events")
            return out
        got = rows.sort_values("event").to_dict("records")
        for w, g in zip(want, got, strict=True):
            for col in TREATMENT_COLUMNS[1:]:
                if not _same_cell(w[col], g[col]):
                    out.append(f"treatments row {w['event']}: {col} {g[col]!r} != stored {w[col]!r}")
        return out

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
            records = [session_from_attrs(d) for d in sessions]
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
                    if not same_value(w[col], g[col]):
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
        return out + _verify_tissue(members.get("tissue"), commit.get("tissue_sha256"), tuple(image.shape[2:]))


def _verify_tissue(arr: Any, expected: str | None, grid: tuple[int, ...]) -> list[str]:
    """The optional tissue maps against their layout and their checksum (none at all is sound)."""
    if arr is None:
        return [] if expected is None else ["tissue checksum recorded but the tissue array is missing"]
    out = []
    if tuple(arr.metadata.dimension_names or ()) != TISSUE_DIMS:
        out.append(f"tissue dims {arr.metadata.dimension_names} != {TISSUE_DIMS}")
    if arr.dtype != np.dtype(TISSUE_DTYPE):
        out.append(f"tissue dtype {arr.dtype} != {np.dtype(TISSUE_DTYPE)}")
    if tuple(arr.shape) != (len(TISSUE_CHANNELS), *grid):
        out.append(f"tissue shape {tuple(arr.shape)} != {(len(TISSUE_CHANNELS), *grid)}")
    if expected is None:
        return [*out, "tissue array present but no tissue checksum in the commit attribute"]
    try:
        actual = tissue_checksum(arr)
    except Exception as exc:
        return [*out, f"tissue unreadable ({type(exc).__name__}: {exc})"]
    if actual != expected:
        out.append(f"tissue checksum mismatch (stored {expected}, computed {actual})")
    return out


def _same_cell(a: Any, b: Any) -> bool:
    """``same_value``, with None and NaN (how pandas reads a null) counted as the same missing value."""
    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, float) and np.isnan(v))

    if missing(a) or missing(b):
        return missing(a) and missing(b)
    return same_value(a, b)
