"""Upgrading a cohort store to the current schema version in place (``longitudinal store migrate``).

v1 -> v2 (treatment events): every committed patient gains the group attribute ``treatments`` (an empty list:
a v1 store recorded no treatment), its checksum in the ``commit`` attribute and ``schema_version`` 2, and a
``treatments/<pid>.parquet`` fragment (an empty table); then the root's ``schema_version`` becomes 2. No array
is rewritten and no generation changes.

Atomicity: the root's ``zarr.json`` is written once, last, in one atomic write (``os.replace`` locally, a single
PUT on object stores); that write is the migration's commit point. Until it lands the store is a v1 store for
every reader (v1 code ignores the added attribute and folder, and this code opens it read-only), so a crash or
a failure anywhere before it leaves a sound v1 store and running the migration again finishes it: each step is
idempotent. Each patient's ``zarr.json`` is itself replaced in one atomic write under the patient's lock.

Before anything is changed, abandoned writes are recovered and the store is verified; any fault (or a v1
writer still at work, whose journal is then left) stops the migration with every fault listed. Writers of an
older code version must be stopped first: a patient they commit during the migration lacks the v2 attributes,
and the verification that ends the migration names it (running the migration again fixes it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from storage._location import PATIENTS, TREATMENTS
from storage._records import (
    TREATMENTS_CHECKSUM_DEFINITION,
    treatments_checksum,
    treatments_from_attrs,
)
from storage.schema import SCHEMA_VERSION, TREATMENT_COLUMNS


class MigrationError(ValueError):
    """The store cannot be migrated as it is: every reason, one per line (nothing was changed)."""


@dataclass
class MigrationReport:
    """What a migration did.

    from_version / to_version: schema versions before and after. steps: one line per action (recovered
    writes, migrated patients, the root flip). faults: what ``verify()`` found afterwards (empty when sound).
    """

    url: str
    from_version: int
    to_version: int
    steps: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    @property
    def migrated(self) -> bool:
        """Whether this run changed the store's version."""
        return self.from_version != self.to_version


def migrate(store: Any, verify: bool = True) -> MigrationReport:
    """Upgrade ``store`` (a CohortStore, opened without recovery) to SCHEMA_VERSION (module docstring).

    ``verify``: check the store once more afterwards (``MigrationReport.faults``). Raises MigrationError when
    the store is not sound before the migration (nothing is changed then), StoreFullError when the device is
    full (what was done is harmless and a rerun finishes it).
    """
    report = MigrationReport(store.url, store.schema_version, SCHEMA_VERSION)
    if not store.read_only:
        report.steps.append(f"already at schema version {SCHEMA_VERSION}: nothing to do")
        if verify:
            report.faults = store.verify()
        return report
    if store.schema_version != 1:
        raise MigrationError(f"store {store.url}: no migration from schema version {store.schema_version}")
    with store._naming_disk_full("migrating the store"):
        report.steps.extend(store.recover())
        faults = store.verify()
        if faults:
            raise MigrationError(
                f"store {store.url} has {len(faults)} fault(s); fix them before migrating (nothing was changed):\n"
                + "\n".join(f"- {f}" for f in faults)
            )
        for pid in store.patient_ids():
            report.steps.append(_migrate_patient(store, pid))
        _flip_root(store)
    report.steps.append(f"schema version 1 -> {SCHEMA_VERSION} (root attributes written)")
    store.schema_version = SCHEMA_VERSION
    if verify:
        report.faults = store.verify()
    return report


def _migrate_patient(store: Any, pid: str) -> str:
    """Give one committed v1 patient its v2 attributes and an empty treatments fragment (idempotent)."""
    path = store._path(PATIENTS, pid, "zarr.json")
    with store._patient_lock(pid):
        meta = store._read_json(path)
        attrs = (meta or {}).get("attributes", {})
        if not attrs.get("commit"):
            return f"patient {pid}: not committed, left alone"
        events = [t.to_dict() for t in treatments_from_attrs(attrs)]  # [] unless a rerun finds its own work
        attrs["schema_version"] = SCHEMA_VERSION
        attrs["treatments"] = events
        attrs["commit"] = {
            **attrs["commit"],
            "treatments_sha256": treatments_checksum(events),
            "treatments_checksum_definition": TREATMENTS_CHECKSUM_DEFINITION,
        }
        meta["attributes"] = attrs
        store._write_bytes_atomic(path, json.dumps(meta, indent=2, allow_nan=False).encode())
        store._write_treatments_fragment(pid, treatments_from_attrs(attrs))
    return f"patient {pid}: treatments attribute and fragment added ({len(events)} event(s))"


def _flip_root(store: Any) -> None:
    """The commit point: the root's zarr.json with the new schema version, in one atomic write."""
    path = store._path("zarr.json")
    meta = store._read_json(path)
    if meta is None:
        raise MigrationError(f"store {store.url}: the root zarr.json vanished during the migration")
    attrs = meta.setdefault("attributes", {})
    attrs["schema_version"] = SCHEMA_VERSION
    attrs["treatments"] = f"{TREATMENTS}/<patient_id>.parquet, columns {list(TREATMENT_COLUMNS)}"
    attrs["migrated"] = {
        "from_schema_version": 1,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store._write_bytes_atomic(path, json.dumps(meta, indent=2, allow_nan=False).encode())
