"""One patient's ingest: validate every session, register it to the patient's reference scan, QC it, and merge
the sessions that pass into the store under the patient's lock (steps 2-5 of ``pipeline``'s docstring).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from longitudinal import __version__
from longitudinal.ingest.deid import public_text, session_label, shift_date
from longitudinal.ingest.files import FileLimits
from longitudinal.ingest.preprocess import normalise, to_ras
from longitudinal.ingest.report import PatientOutcome, SessionOutcome, write_quarantine
from longitudinal.ingest.sources import PatientSource, discover_cached
from longitudinal.ingest.validate import (
    SessionScans,
    duplicate_date_problems,
    session_sha256,
    validate_session,
)
from longitudinal.registration.geometry import grid_from_affine, image_on_grid, ras_affine, ras_grid
from longitudinal.registration.rigid import RegistrationConfig, register, registration_qc, resample_onto
from longitudinal.settings import CHANNELS, Settings
from storage.schema import PatientRecord, SessionRecord


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest and how to register it."""

    channels: tuple[str, ...] = CHANNELS
    registration_channel: str = "T1c"
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def __post_init__(self) -> None:
        if self.registration_channel not in self.channels:
            raise ValueError(
                f"registration_channel {self.registration_channel!r} must be one of {list(self.channels)}"
            )


def open_store(store_url: str, recover: bool) -> object:
    from storage.store import CohortStore

    return CohortStore.open(store_url, create=True, created_by=f"longitudinal {__version__}", recover=recover)


@dataclass
class _Entry:
    """One session on the reference grid, ready to merge. image (C, Z, Y, X) float32, label (Z, Y, X) uint8."""

    date: dt.datetime
    origin: str
    record: SessionRecord
    image: np.ndarray
    label: np.ndarray


def ingest_patient(
    source: str, store_url: str, patient_id: str, settings: Settings, config: IngestConfig | None = None
) -> PatientOutcome:
    """Ingest one patient of ``source`` (named by its pseudonym) into the store: the unit a flow maps over.

    Raises OSError when the store cannot be read or written (worth a retry); never for bad input.
    """
    cohort = discover_cached(str(source), settings)
    patient = cohort.patient(patient_id)
    store = open_store(store_url, recover=False)
    return process_patient(patient, store, settings, config or IngestConfig())


def process_patient(patient: PatientSource, store, settings: Settings, config: IngestConfig) -> PatientOutcome:
    """Skip, validate, register and store one patient's sessions (module docstring). See ``ingest_patient``."""
    pid = patient.patient_id
    secret = settings.pseudonym_secret
    quarantine: list[tuple[str, list[str]]] = []  # unredacted, for the operator's report only
    outcome = PatientOutcome(patient_id=pid)

    def refuse(origin: str, reasons: list[str]) -> None:
        quarantine.append((origin, reasons))
        outcome.sessions.append(SessionOutcome(
            origin=public_text(origin, patient.raw_id, pid), status="quarantined",
            reasons=[public_text(r, patient.raw_id, pid) for r in reasons],
        ))

    if patient.problems:
        for ses in patient.sessions or []:
            refuse(ses.origin, list(patient.problems) + ses.problems)
        if not patient.sessions:
            refuse("(patient)", list(patient.problems))
        outcome.report_path = write_quarantine(settings, pid, quarantine)
        return outcome

    limits = FileLimits.of(settings)
    existing: list[SessionRecord] = store.sessions(pid) if store.has_patient(pid) else []
    by_hash = {s.content_sha256: s for s in existing}
    stored_dates = {dt.datetime.fromisoformat(s.shifted_date).date(): s.session for s in existing if s.shifted_date}

    candidates: list[int] = []
    seen: dict[str, str] = {}  # content hash -> origin of its first session in this source
    same_content: dict[int, list[str]] = {}
    for k, ses in enumerate(patient.sessions):
        hashes = session_sha256(ses, limits)
        content = SessionRecord("", 0.0, None, hashes, [], 0.0, [], []).content_sha256 if hashes else None
        hit = by_hash.get(content) if content else None
        if content and content in seen and hit is None:
            same_content[k] = [f"duplicate content: {ses.origin} lists the same files as {seen[content]}"]
        elif content:
            seen[content] = ses.origin
        if hit is not None:
            outcome.sessions.append(SessionOutcome(
                origin=public_text(ses.origin, patient.raw_id, pid), status="skipped", session=hit.session,
                days=hit.days, registration_metric=hit.registration_metric,
            ))
        else:
            candidates.append(k)
    if not candidates:
        outcome.report_path = write_quarantine(settings, pid, quarantine)
        return outcome

    shifted: dict[int, dt.datetime | None] = {}
    unshiftable: dict[int, list[str]] = {}
    for k in candidates:
        ses = patient.sessions[k]
        try:
            shifted[k] = shift_date(ses.date, patient.raw_id, secret) if ses.date else None
        except OverflowError:
            # Discovery refuses dates outside Settings.date_window(); this guards a window configured so wide
            # that a date cannot be shifted: that session is refused, never its patient.
            shifted[k] = None
            unshiftable[k] = [f"date out of range in {ses.origin}: it cannot be shifted"]
    origins = {k: patient.sessions[k].origin for k in candidates}
    duplicates = duplicate_date_problems(shifted, origins, stored_dates)

    valid: dict[int, SessionScans] = {}
    for k in candidates:
        scans = validate_session(patient.sessions[k], config.channels, config.registration_channel, limits)
        scans.problems.extend(duplicates.get(k, []) + same_content.get(k, []) + unshiftable.get(k, []))
        if scans.problems:
            refuse(origins[k], scans.problems)
        else:
            valid[k] = scans

    entries: list[_Entry] = []
    if valid:
        entries, affine, spacing = _register_sessions(
            patient, store, existing, valid, shifted, settings, config, refuse
        )

    if entries:
        # The merge runs under the patient's lock on what is committed then, so a concurrent ingest of the
        # same patient is merged with, never overwritten.
        update = store.update_patient(
            pid, lambda current: _merge(pid, current, existing, entries, config, affine, spacing)
        )
        if update.record is None:
            # Another writer changed the patient in a way these entries were not prepared for: redo it from
            # the new state (each redo follows someone else's commit, so this ends).
            return process_patient(patient, store, settings, config)
        record = update.record
        outcome.wrote = True
        for e in entries:
            days = next(s.days for s in record.sessions if s.session == e.record.session)
            outcome.sessions.append(SessionOutcome(
                origin=public_text(e.origin, patient.raw_id, pid), status="stored", session=e.record.session,
                days=days, registration_metric=e.record.registration_metric,
            ))
    outcome.report_path = write_quarantine(settings, pid, quarantine)
    return outcome


def _register_sessions(
    patient: PatientSource,
    store,
    existing: list[SessionRecord],
    valid: dict[int, SessionScans],
    shifted: dict[int, dt.datetime | None],
    settings: Settings,
    config: IngestConfig,
    refuse: Callable[[str, list[str]], None],
) -> tuple[list[_Entry], np.ndarray, tuple[float, float, float]]:
    """Register and resample every valid session onto the reference grid. Returns (entries, reference
    affine (4x4 RAS), spacing (z, y, x) mm); refused sessions go through ``refuse``."""
    reg_channel = config.registration_channel
    ci = config.channels.index(reg_channel)
    order = sorted(valid, key=lambda k: shifted[k])
    entries: list[_Entry] = []

    if existing:
        arrays = store.arrays(patient.patient_id)
        if tuple(arrays.channels) != tuple(config.channels):
            for k in order:
                refuse(patient.sessions[k].origin,
                       [f"stored channels {list(arrays.channels)} differ from {list(config.channels)}"])
            return [], arrays.affine, arrays.spacing_mm
        ref_t = next((t for t, s in enumerate(existing)
                      if np.allclose(s.transform_to_reference, np.eye(4), atol=0)), 0)
        shape_zyx = arrays.image.shape[2:]
        grid = grid_from_affine(arrays.affine, tuple(reversed(shape_zyx)))
        fixed_norm = np.asarray(arrays.image[ref_t, ci], dtype=np.float32)
        reference_k = None
    else:
        reference_k = order[0]
        grid = ras_grid(valid[reference_k].images[reg_channel], settings.target_spacing_mm)
        fixed_norm = normalise(sitk.GetArrayFromImage(
            resample_onto(valid[reference_k].images[reg_channel], grid, None)))
    fixed = image_on_grid(fixed_norm, grid)
    affine = ras_affine(grid)
    sx, sy, sz = grid.GetSpacing()
    spacing = (float(sz), float(sy), float(sx))

    for k in order:
        ses, scans = patient.sessions[k], valid[k]
        reg_display = ses.scans[reg_channel].display
        try:
            if k == reference_k:
                transform, to_ref = None, np.eye(4)
            else:
                moving = to_ras(scans.images[reg_channel], settings.target_spacing_mm)
                # Normalised like the fixed scan, so first ingest and later appends see the same contrast.
                moving = image_on_grid(normalise(sitk.GetArrayFromImage(moving)), moving)
                result = register(fixed, moving, config.registration)
                transform, to_ref = result.transform, result.to_reference_ras
            image = np.stack([
                normalise(sitk.GetArrayFromImage(resample_onto(scans.images[c], grid, transform)))
                for c in config.channels
            ])
            if scans.label is not None:
                label = sitk.GetArrayFromImage(resample_onto(scans.label, grid, transform, label=True))
            else:
                label = np.zeros(image.shape[1:], dtype=np.uint8)
        except RuntimeError as exc:
            refuse(ses.origin, [f"registration/resampling failed for {reg_display}: {type(exc).__name__}"])
            continue
        metric = 0.0 if k == reference_k else registration_qc(fixed, image_on_grid(image[ci], grid), config.registration)
        limit = config.registration.qc_max_metric
        if metric > limit:
            refuse(ses.origin, [f"registration QC failed for {reg_display}: 1-NCC = {metric:.3f} > {limit}"])
            continue
        native = scans.images[reg_channel]
        record = SessionRecord(
            session=session_label(shifted[k]),
            days=0.0,  # set when merged
            shifted_date=shifted[k].isoformat(timespec="seconds"),
            source_sha256=dict(sorted(scans.sha256.items())),
            transform_to_reference=np.asarray(to_ref, dtype=float).tolist(),
            registration_metric=float(metric),
            native_shape=[int(v) for v in native.GetSize()],
            native_affine=ras_affine(native).tolist(),
            has_label=scans.label is not None,
            qc_flags=[],
        )
        entries.append(_Entry(shifted[k], ses.origin, record, image.astype(np.float32), label.astype(np.uint8)))
    return entries, affine, spacing


def _merge(
    pid: str,
    current: PatientRecord | None,
    existing: list[SessionRecord],
    entries: list[_Entry],
    config: IngestConfig,
    affine: np.ndarray,
    spacing: tuple[float, float, float],
) -> PatientRecord | None:
    """Committed sessions (``current``, read under the patient's lock) + new entries in date order, days
    re-based on the earliest date.

    ``existing``: the stored sessions the entries were checked and registered against. Sessions another
    writer committed since are kept. Returns None when the entries no longer fit what is committed (the
    patient appeared or vanished, changed grid or channels, lost a session, or gained one with an entry's
    content or calendar day): the caller redoes the patient from the new state.
    """
    stored = current.sessions if current is not None else []
    if (current is None) != (not existing):
        return None
    known = {s.content_sha256 for s in stored}
    prepared = {s.content_sha256 for s in existing}
    if not prepared <= known:
        return None
    items: list[tuple[dt.datetime, SessionRecord, np.ndarray, np.ndarray]] = []
    if current is not None:
        grid = tuple(current.image.shape[2:])
        if (
            tuple(current.channels) != tuple(config.channels)
            or any(tuple(e.image.shape[1:]) != grid for e in entries)
            or not np.allclose(current.reference_affine, affine)
            or not np.allclose(current.spacing_mm, spacing)
        ):
            return None
        added_days = {dt.datetime.fromisoformat(s.shifted_date).date()
                      for s in stored if s.content_sha256 not in prepared and s.shifted_date}
        if any(e.record.content_sha256 in known or e.date.date() in added_days for e in entries):
            return None
        for t, s in enumerate(stored):
            date = dt.datetime.fromisoformat(s.shifted_date) if s.shifted_date else None
            if date is None:
                raise ValueError(f"stored session {s.session} of {pid} has no shifted_date; cannot merge by date")
            items.append((date, s, current.image[t], current.label[t]))
    for e in entries:
        items.append((e.date, e.record, e.image, e.label))
    items.sort(key=lambda it: it[0])
    base = items[0][0]
    sessions = [dataclasses.replace(s, days=(d - base).total_seconds() / 86400.0) for d, s, _, _ in items]
    return PatientRecord(
        patient_id=pid,
        image=np.stack([it[2] for it in items]).astype(np.float32),
        label=np.stack([it[3] for it in items]).astype(np.uint8),
        days=np.array([s.days for s in sessions], dtype=np.float64),
        channels=tuple(config.channels),
        spacing_mm=tuple(float(v) for v in spacing),
        reference_affine=np.asarray(affine, dtype=np.float64),
        sessions=sessions,
    )


def safe_error(exc: BaseException, patient: PatientSource) -> str:
    """An exception message safe to keep: the raw id redacted, absolute source paths cut."""
    return public_text(str(exc), patient.raw_id, patient.patient_id)[:300]


