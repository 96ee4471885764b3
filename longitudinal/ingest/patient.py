"""One patient's ingest: validate every session, register it to the patient's reference scan, QC it, and merge
the sessions that pass into the store under the patient's lock (steps 2-5 of ``pipeline``'s docstring), with
the patient's new treatment events (``treatments.py``): shifted like the scans, counted in whole days from the
calendar date of the baseline scan, merged by (kind, shifted start date) so a known event is never stored twice.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from longitudinal import __version__
from longitudinal.ingest.deid import public_text, session_label, shift_date
from longitudinal.ingest.files import FileLimits
from longitudinal.ingest.patient_events import PendingEvent, event_record, new_events, rebased
from longitudinal.ingest.preprocess import normalise, to_ras
from longitudinal.ingest.report import PatientOutcome, SessionOutcome, TreatmentOutcome, write_quarantine
from longitudinal.ingest.sources import PatientSource, discover_cached
from longitudinal.ingest.treatments import LOOKBACK_DAYS
from longitudinal.ingest.validate import (
    SessionScans,
    duplicate_date_problems,
    session_sha256,
    validate_session,
)
from longitudinal.registration.geometry import grid_from_affine, image_on_grid, ras_affine, ras_grid
from longitudinal.registration.rigid import (
    RegistrationConfig,
    qc_exclusion,
    register,
    registration_qc,
    resample_onto,
)
from longitudinal.registration.tissue import attach_tissue
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
    """The store at ``store_url``, created when missing. Raises ReadOnlyStoreError (a ValueError) for a store
    of an older schema version, which ingest cannot write (``longitudinal store migrate`` upgrades it)."""
    from storage.store import CohortStore

    store = CohortStore.open(store_url, create=True, created_by=f"longitudinal {__version__}", recover=recover)
    store._require_writable("ingest into it")
    return store


@dataclass
class _Entry:
    """One session on the reference grid, ready to merge. image (C, Z, Y, X) float32, label (Z, Y, X) uint8."""

    date: dt.datetime
    origin: str
    record: SessionRecord
    image: np.ndarray
    label: np.ndarray


@dataclass
class _MergeNote:
    """What the last run of ``_merge`` decided: ``unchanged`` (nothing new to write: every event is already
    committed and there is no session), ``added`` (keys of the events it added)."""

    unchanged: bool = False
    added: set[tuple[str, str]] = field(default_factory=set)


def ingest_patient(
    source: str, store_url: str, patient_id: str, settings: Settings, config: IngestConfig | None = None,
    treatments: str | None = None,
) -> PatientOutcome:
    """Ingest one patient of ``source`` (named by its pseudonym) into the store: the unit a flow maps over.
    ``treatments``: the treatments CSV of the run, if any (``treatments.py``).

    Raises OSError when the store cannot be read or written (worth a retry); never for bad input.
    """
    cohort = discover_cached(str(source), settings, treatments)
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

    def refuse_event(origin: str, reasons: list[str], kind: str | None = None) -> None:
        quarantine.append((origin, reasons))
        outcome.treatments.append(TreatmentOutcome(
            origin=public_text(origin, patient.raw_id, pid), status="quarantined", kind=kind,
            reasons=[public_text(r, patient.raw_id, pid) for r in reasons],
        ))

    for row in patient.refused_treatments:
        refuse_event(row.origin, list(row.reasons))
    if patient.problems:
        for ses in patient.sessions or []:
            refuse(ses.origin, list(patient.problems) + ses.problems)
        for row in patient.treatments:
            refuse_event(row.origin, list(patient.problems), row.kind)
        if not patient.sessions and not patient.treatments and not patient.refused_treatments:
            refuse("(patient)", list(patient.problems))
        outcome.report_path = write_quarantine(settings, pid, quarantine)
        return outcome

    known = store.has_patient(pid)
    if not patient.in_source and not known:
        for row in patient.treatments:
            refuse_event(row.origin, [f"unknown patient at {row.origin}: no scan of this patient_id in the source "
                                      "or the store"], row.kind)
        outcome.report_path = write_quarantine(settings, pid, quarantine)
        return outcome

    limits = FileLimits.of(settings)
    existing: list[SessionRecord] = store.sessions(pid) if known else []
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
    pending = new_events(patient, store.patient_treatments(pid) if known else [], secret, outcome, refuse_event)
    if not candidates and not pending:
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
    affine: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    if valid:
        entries, affine, spacing = _register_sessions(
            patient, store, existing, valid, shifted, settings, config, refuse
        )
    pending = _anchored_events(pending, existing, entries, refuse_event)

    if entries or pending:
        # The merge runs under the patient's lock on what is committed then, so a concurrent ingest of the
        # same patient is merged with, never overwritten.
        note = _MergeNote()
        update = store.update_patient(pid, lambda current: attach_tissue(  # tissue maps of the baseline scan
            _merge(pid, current, existing, entries, config, affine, spacing, pending, note), current))
        if update.record is None and not note.unchanged:
            # Another writer changed the patient in a way these entries were not prepared for: redo it from
            # the new state (each redo follows someone else's commit, so this ends).
            return process_patient(patient, store, settings, config)
        record = update.record
        outcome.wrote = record is not None
        for e in entries:
            days = next(s.days for s in record.sessions if s.session == e.record.session)
            outcome.sessions.append(SessionOutcome(
                origin=public_text(e.origin, patient.raw_id, pid), status="stored", session=e.record.session,
                days=days, registration_metric=e.record.registration_metric,
            ))
        # An event another writer stored meanwhile counts as already present.
        stored = {t.key: t for t in (record.treatments if record is not None else store.patient_treatments(pid))}
        for ev in pending:
            hit = stored.get(ev.key)
            outcome.treatments.append(TreatmentOutcome(
                origin=public_text(ev.origin, patient.raw_id, pid),
                status="stored" if ev.key in note.added else "skipped", kind=ev.kind,
                start_days=None if hit is None else hit.start_days, end_days=None if hit is None else hit.end_days,
            ))
    outcome.report_path = write_quarantine(settings, pid, quarantine)
    return outcome


def _anchored_events(
    pending: list[PendingEvent], existing: list[SessionRecord], entries: list[_Entry], refuse_event: Callable[..., None]
) -> list[PendingEvent]:
    """The events that can be dated against the patient's scans: refused when no scan of the patient is stored
    or being stored (nothing to count days from), or when the event starts more than LOOKBACK_DAYS before the
    first scan (an impossible date)."""
    dates = [dt.datetime.fromisoformat(s.shifted_date).date() for s in existing if s.shifted_date]
    dates += [e.date.date() for e in entries]
    keep: list[PendingEvent] = []
    for ev in pending:
        if not dates:
            refuse_event(ev.origin, [f"no scan to date the treatment at {ev.origin} against: none of this "
                                     "patient's sessions is stored"], ev.kind)
        elif (min(dates) - ev.start).days > LOOKBACK_DAYS:
            refuse_event(ev.origin, [f"impossible date at {ev.origin}: more than {LOOKBACK_DAYS} days before the "
                                     "patient's first scan"], ev.kind)
        else:
            keep.append(ev)
    return keep


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
        ref_label = np.asarray(arrays.label[ref_t]) if existing[ref_t].has_label else None
        reference_k = None
    else:
        reference_k = order[0]
        grid = ras_grid(valid[reference_k].images[reg_channel], settings.target_spacing_mm)
        fixed_norm = normalise(sitk.GetArrayFromImage(
            resample_onto(valid[reference_k].images[reg_channel], grid, None)))
        ref_scan_label = valid[reference_k].label
        ref_label = (None if ref_scan_label is None
                     else sitk.GetArrayFromImage(resample_onto(ref_scan_label, grid, None, label=True)))
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
        # Judged on the anatomy that should not change: both scans' tumours (and a resection cavity, which lies
        # within the margin around the pre-operative tumour) are left out.
        exclude = qc_exclusion([ref_label, label if scans.label is not None else None], spacing,
                               config.registration.qc_exclude_margin_mm)
        metric = 0.0 if k == reference_k else registration_qc(
            fixed, image_on_grid(image[ci], grid), config.registration, exclude)
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
    affine: np.ndarray | None,
    spacing: tuple[float, float, float] | None,
    events: Sequence[PendingEvent] = (),
    note: _MergeNote | None = None,
) -> PatientRecord | None:
    """Committed sessions (``current``, read under the patient's lock) + new entries in date order, days
    re-based on the earliest date; committed treatment events + the new ``events`` not committed yet, their
    days recounted from the (new) baseline scan's calendar date.

    ``existing``: the stored sessions the entries were checked and registered against. Sessions another
    writer committed since are kept. Returns None when the entries no longer fit what is committed (the
    patient appeared or vanished, changed grid or channels, lost a session, or gained one with an entry's
    content or calendar day): the caller redoes the patient from the new state. Also None, with
    ``note.unchanged`` set, when there is nothing to write (no entry, every event already committed).
    ``affine`` / ``spacing``: the reference grid the entries were resampled onto (None without entries).
    """
    note = note if note is not None else _MergeNote()
    note.unchanged, note.added = False, set()
    stored = current.sessions if current is not None else []
    if (current is None) != (not existing):
        return None
    known = {s.content_sha256 for s in stored}
    prepared = {s.content_sha256 for s in existing}
    if not prepared <= known:
        return None
    committed = list(current.treatments) if current is not None else []
    committed_keys = {t.key for t in committed}
    new_events = [ev for ev in events if ev.key not in committed_keys]
    if not entries and not new_events:
        note.unchanged = True
        return None
    if not entries:
        affine, spacing = current.reference_affine, current.spacing_mm  # type: ignore[union-attr]
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
    treatments = [rebased(t, base.date()) for t in committed] + [event_record(ev, base.date()) for ev in new_events]
    note.added = {ev.key for ev in new_events}
    return PatientRecord(
        patient_id=pid,
        image=np.stack([it[2] for it in items]).astype(np.float32),
        label=np.stack([it[3] for it in items]).astype(np.uint8),
        days=np.array([s.days for s in sessions], dtype=np.float64),
        channels=tuple(config.channels),
        spacing_mm=tuple(float(v) for v in spacing),
        reference_affine=np.asarray(affine, dtype=np.float64),
        sessions=sessions,
        treatments=sorted(treatments, key=lambda t: (t.start_date, t.kind, t.end_date or "")),
    )


def safe_error(exc: BaseException, patient: PatientSource) -> str:
    """An exception message safe to keep: the raw id redacted, absolute source paths cut."""
    return public_text(str(exc), patient.raw_id, patient.patient_id)[:300]


