"""Ingest: discovered sessions -> validated, registered, normalised series -> one atomic write per patient.

Per patient (``process_patient``):

1. Sessions whose content hash (``SessionRecord.content_sha256`` of the source files) is already stored are
   skipped: re-ingesting writes nothing.
2. Every other session is validated (every problem collected, ``validate.py``); a session with any problem,
   including a duplicate date, is quarantined with its reasons.
3. Reference space: for a new patient, the earliest valid session's registration channel reoriented to RAS and
   resampled to ``Settings.target_spacing_mm``. For a known patient, the stored reference grid is kept (so
   stored sessions are never re-interpolated); a new session is registered to the stored reference scan, and
   when it predates the baseline, days are re-based on it.
4. Each session is registered (rigid, optionally affine) on its registration channel to the reference scan;
   every channel is resampled from its native grid straight onto the reference grid (linear; labels nearest),
   then normalised (``preprocess.normalise``). QC: ``registration_qc`` (1 - NCC after the bias-removing
   high-pass) of the registration channel against the reference inside the head; above ``RegistrationConfig.qc_max_metric`` the session is quarantined.
5. Stored and new sessions are merged in date order and committed with one ``CohortStore.update_patient``, which
   holds the patient's lock from reading what is stored to the commit, so concurrent ingests keep every session.

Dates: the real date never leaves this module. Days are exact differences of acquisition date-times (in days,
float); the stored ``shifted_date`` is the date-time shifted by a keyed per-patient offset
(``deid.shift_date``), so merging later sessions keeps exact intervals. Duplicates are judged by calendar day.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from longitudinal import __version__
from longitudinal.ingest.deid import public_text, session_label, shift_date
from longitudinal.ingest.files import FileLimits
from longitudinal.ingest.preprocess import normalise, to_ras
from longitudinal.ingest.sources import CohortSource, PatientSource, discover, discover_cached
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

Status = Literal["stored", "skipped", "quarantined"]


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


@dataclass
class SessionOutcome:
    """What happened to one source session. ``origin`` names it relative to the source (raw id redacted);
    ``session``/``days`` are set when it is (or already was) in the store."""

    origin: str
    status: Status
    session: str | None = None
    days: float | None = None
    registration_metric: float | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class PatientOutcome:
    """What happened to one patient. ``error``: the patient could not be processed at all (e.g. the store
    could not be written); ``report_path``: its quarantine report, when it has quarantined sessions."""

    patient_id: str
    sessions: list[SessionOutcome] = field(default_factory=list)
    wrote: bool = False
    error: str | None = None
    report_path: str | None = None

    def count(self, status: Status) -> int:
        return sum(s.status == status for s in self.sessions)


@dataclass
class IngestReport:
    """The outcome of one ingest run over a source."""

    source_kind: str
    store_url: str
    patients: list[PatientOutcome] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    report_path: str | None = None
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        return sum(p.count("stored") for p in self.patients)

    @property
    def skipped(self) -> int:
        return sum(p.count("skipped") for p in self.patients)

    @property
    def quarantined(self) -> int:
        return sum(p.count("quarantined") for p in self.patients)

    @property
    def failed_patients(self) -> list[str]:
        return [p.patient_id for p in self.patients if p.error]

    def exit_code(self) -> int:
        """0: the run completed (quarantines allowed); 1: nothing could be ingested (no session stored or
        already present); 2: some patient could not be written to the store."""
        if self.failed_patients:
            return 2
        if self.stored + self.skipped == 0:
            return 1
        return 0

    def rows(self) -> list[dict]:
        """One row per session (and per failed patient): the QC table."""
        rows = []
        for p in self.patients:
            if p.error:
                rows.append({"patient_id": p.patient_id, "session": "", "origin": "", "status": "failed",
                             "days": None, "registration_metric": None, "reasons": p.error})
            for s in p.sessions:
                rows.append({
                    "patient_id": p.patient_id,
                    "session": s.session or "",
                    "origin": s.origin,
                    "status": s.status,
                    "days": s.days,
                    "registration_metric": None if s.registration_metric is None else round(s.registration_metric, 4),
                    "reasons": "; ".join(s.reasons),
                })
        return rows

    def summary(self) -> dict:
        return {
            "source_kind": self.source_kind,
            "patients": len(self.patients),
            "stored": self.stored,
            "skipped": self.skipped,
            "quarantined": self.quarantined,
            "failed_patients": len(self.failed_patients),
            "problems": len(self.problems),
            "seconds": round(self.seconds, 2),
            "report": self.report_path,
        }

    def markdown(self) -> str:
        s = self.summary()
        lines = [
            "# Ingest summary",
            "",
            f"- source kind: {s['source_kind']}",
            f"- patients: {s['patients']} ({s['failed_patients']} failed)",
            f"- sessions stored: {s['stored']}, already present: {s['skipped']}, quarantined: {s['quarantined']}",
            f"- time: {s['seconds']} s",
            f"- report: {s['report']}",
        ]
        if self.problems:
            lines += ["", "## Source problems", ""] + [f"- {p}" for p in self.problems]
        bad = [r for r in self.rows() if r["status"] in ("quarantined", "failed")]
        if bad:
            lines += ["", "## Quarantined", "", "| patient | origin | reasons |", "| --- | --- | --- |"]
            lines += [f"| {r['patient_id']} | {r['origin']} | {r['reasons']} |" for r in bad]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "problems": self.problems,
                "patients": [dataclasses.asdict(p) for p in self.patients]}


# --- per patient ------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One session on the reference grid, ready to merge. image (C, Z, Y, X) float32, label (Z, Y, X) uint8."""

    date: dt.datetime
    origin: str
    record: SessionRecord
    image: np.ndarray
    label: np.ndarray


def _open_store(store_url: str, recover: bool) -> object:
    from storage.store import CohortStore

    return CohortStore.open(store_url, create=True, created_by=f"longitudinal {__version__}", recover=recover)


def prepare(source: str, store_url: str, settings: Settings) -> tuple[CohortSource, object]:
    """Discover the source and open (create, recover) the store. Returns (cohort, store)."""
    cohort = discover_cached(str(source), settings)
    store = _open_store(store_url, recover=True)
    return cohort, store


def ingest_patient(
    source: str, store_url: str, patient_id: str, settings: Settings, config: IngestConfig | None = None
) -> PatientOutcome:
    """Ingest one patient of ``source`` (named by its pseudonym) into the store: the unit a flow maps over.

    Raises OSError when the store cannot be read or written (worth a retry); never for bad input.
    """
    cohort = discover_cached(str(source), settings)
    patient = cohort.patient(patient_id)
    store = _open_store(store_url, recover=False)
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
        outcome.report_path = _write_quarantine(settings, pid, quarantine)
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
        outcome.report_path = _write_quarantine(settings, pid, quarantine)
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
    outcome.report_path = _write_quarantine(settings, pid, quarantine)
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


def _write_quarantine(settings: Settings, pid: str, quarantine: list[tuple[str, list[str]]]) -> str | None:
    """Write (or clear) the patient's quarantine report: reports/quarantine/<pid>.json. Files are named
    relative to the source, so the operator can find them."""
    path = settings.reports_path / "quarantine" / f"{pid}.json"
    if not quarantine:
        if path.exists():
            path.unlink()
        return None
    body = {
        "patient_id": pid,
        "written": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quarantined": [{"origin": o, "reasons": r} for o, r in quarantine],
    }
    _atomic_write_json(path, body)
    return str(path)


def _atomic_write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2, default=str)
    os.replace(tmp, path)


# --- cohort ----------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, PatientOutcome], None]


def ingest_cohort(
    source: str | os.PathLike,
    store_url: str,
    settings: Settings,
    workers: int = 1,
    progress: ProgressFn | None = None,
    config: IngestConfig | None = None,
    dask_address: str | None = None,
) -> IngestReport:
    """Ingest every patient of ``source`` into the store at ``store_url`` with ``workers`` parallel patients.

    With ``dask_address`` (``tcp://HOST:PORT`` of an existing Dask scheduler) the patients run as one task each
    on that cluster instead (``workers`` is then ignored; see ``_ingest_on_dask``).

    One bad patient never fails the cohort: its exception becomes ``PatientOutcome.error``. Writes the run's
    JSON report under ``settings.reports_path`` and returns it. Raises OSError only when the store cannot be
    opened or created (or the Dask scheduler cannot be reached).
    """
    t0 = time.perf_counter()
    config = config or IngestConfig()
    cohort = discover(source, settings)
    store_url = str(store_url)
    report = IngestReport(source_kind=cohort.kind, store_url=store_url, problems=list(cohort.problems))
    _open_store(store_url, recover=True)
    if dask_address:
        outcomes = _ingest_on_dask(dask_address, source, store_url, cohort, settings, config, progress)
        report.patients = [outcomes[p.patient_id] for p in cohort.patients]
        report.seconds = time.perf_counter() - t0
        report.report_path = write_report(report, settings)
        return report
    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if workers > 1:
        # Patients already run in parallel; keep ITK's own threads from oversubscribing the cores.
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, (os.cpu_count() or 1) // workers))
    lock = threading.Lock()
    done = 0

    def one(patient: PatientSource) -> PatientOutcome:
        try:
            return process_patient(patient, _open_store(store_url, recover=False), settings, config)
        except Exception as exc:  # noqa: BLE001 - one patient never fails the cohort
            return PatientOutcome(patient_id=patient.patient_id, error=f"{type(exc).__name__}: {_safe(exc, patient)}")

    outcomes: dict[str, PatientOutcome] = {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(one, p) for p in cohort.patients]
            for fut in as_completed(futures):
                out = fut.result()
                with lock:
                    outcomes[out.patient_id] = out
                    done += 1
                if progress is not None:
                    progress(done, len(cohort.patients), out)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(itk_threads)
    report.patients = [outcomes[p.patient_id] for p in cohort.patients]
    report.seconds = time.perf_counter() - t0
    report.report_path = write_report(report, settings)
    return report


def ingest_patient_task(
    source: str, store_url: str, patient_id: str, settings: Settings, config: IngestConfig
) -> PatientOutcome:
    """``ingest_patient`` for a process that shares nothing with the caller but the arguments (a Dask worker):
    never raises, so one bad patient (or an unreadable source on that node) becomes ``PatientOutcome.error``.

    ``settings`` must carry the pseudonym key itself (``pseudonym_key``): a worker resolving its own would
    compute different pseudonyms and miss the patient."""
    try:
        patient = discover_cached(source, settings).patient(patient_id)
    except Exception as exc:  # noqa: BLE001 - the message may name raw paths; the type is enough here
        return PatientOutcome(patient_id=patient_id, error=f"{type(exc).__name__}: source not readable on worker")
    try:
        return process_patient(patient, _open_store(store_url, recover=False), settings, config)
    except Exception as exc:  # noqa: BLE001 - one patient never fails the cohort
        return PatientOutcome(patient_id=patient_id, error=f"{type(exc).__name__}: {_safe(exc, patient)}")


def _portable(location: str | os.PathLike) -> str:
    """A location another process on another working directory resolves the same way: local paths made
    absolute, URLs (``scheme://``) unchanged."""
    text = os.fspath(location)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def _ingest_on_dask(
    address: str,
    source: str | os.PathLike,
    store_url: str,
    cohort: CohortSource,
    settings: Settings,
    config: IngestConfig,
    progress: ProgressFn | None,
) -> dict[str, PatientOutcome]:
    """One ``ingest_patient_task`` per patient on the Dask cluster at ``address``; outcomes by pseudonym.

    Only pseudonyms, the source and store locations, the settings and the config travel to the workers: each
    worker rediscovers the source itself, so the source (and a local store) must be at the same path on every
    worker node (shared filesystem), or the store on object storage. The settings are resolved here and sent
    explicitly: the pseudonym key (workers must compute the same pseudonyms as this process, whatever their own
    home holds) and absolute workspace/report folders. Quarantine reports are written by the worker that ran
    the patient. Raises OSError (TimeoutError) when the scheduler cannot be reached.
    """
    from distributed import Client, as_completed

    remote = settings.model_copy(update={
        "pseudonym_key": settings.pseudonym_secret.decode(),
        "home": settings.home_dir,
        "reports_dir": settings.reports_path.expanduser().resolve(),
    })
    source_at, store_at = _portable(source), _portable(store_url)
    run = uuid.uuid4().hex[:8]
    outcomes: dict[str, PatientOutcome] = {}
    total = len(cohort.patients)
    with Client(address, timeout="30s", set_as_default=False) as client:
        # pure=False and a per-run key: a rerun must run again (the store may have changed), never be
        # deduplicated against an earlier client's result still held by the scheduler.
        futures = {
            client.submit(ingest_patient_task, source_at, store_at, p.patient_id, remote, config,
                          key=f"ingest-patient-{p.patient_id}-{run}", pure=False): p.patient_id
            for p in cohort.patients
        }
        for done, fut in enumerate(as_completed(list(futures), loop=client.loop), start=1):
            pid = futures[fut]
            try:
                out = fut.result()
            except Exception as exc:  # noqa: BLE001 - e.g. the worker died (KilledWorker): that patient fails
                out = PatientOutcome(patient_id=pid, error=f"{type(exc).__name__} on the Dask cluster")
            outcomes[pid] = out
            if progress is not None:
                progress(done, total, out)
    return outcomes


def _safe(exc: BaseException, patient: PatientSource) -> str:
    """An exception message safe to keep: the raw id redacted, absolute source paths cut."""
    return public_text(str(exc), patient.raw_id, patient.patient_id)[:300]


def write_report(report: IngestReport, settings: Settings) -> str:
    """Write the run's JSON report under settings.reports_path (ingest-<UTC time>.json); returns its path."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = settings.reports_path / f"ingest-{stamp}.json"
    report.report_path = str(path)
    _atomic_write_json(path, report.to_dict())
    return str(path)


# --- helpers for orchestrators (flows map ingest_patient over plan().patient_ids) ---------------------------


@dataclass(frozen=True)
class IngestPlan:
    """What a run will do: the source kind, the patients (pseudonyms only) and source-level problems."""

    source_kind: str
    patient_ids: list[str]
    problems: list[str]


def plan(source: str, store_url: str, settings: Settings) -> IngestPlan:
    """Discover the source and create/recover the store; returns pseudonyms only (safe as task parameters)."""
    cohort, _ = prepare(source, store_url, settings)
    return IngestPlan(cohort.kind, [p.patient_id for p in cohort.patients], list(cohort.problems))


def finish(plan_: IngestPlan, store_url: str, outcomes: list[PatientOutcome], settings: Settings,
           seconds: float) -> IngestReport:
    """Assemble the run's IngestReport from per-patient outcomes and write its JSON report."""
    report = IngestReport(source_kind=plan_.source_kind, store_url=str(store_url), patients=list(outcomes),
                          problems=list(plan_.problems), seconds=seconds)
    write_report(report, settings)
    return report


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version + sha256 of the ingest and registration sources: changes whenever their code does."""
    h = hashlib.sha256(__version__.encode())
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent / "registration"):
        for path in sorted(folder.glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


def patient_fingerprint(source: str, store_url: str, patient_id: str, settings: Settings,
                        config: IngestConfig | None = None) -> str | None:
    """Cache key of one patient's ingest: code version, config, source file hashes and the patient's state in
    the store (its stored content hashes). Equal keys mean equal inputs AND equal starting store, so the
    outcome is the same. None when it cannot be computed (then nothing is cached)."""
    try:
        patient = discover_cached(str(source), settings).patient(patient_id)
        h = hashlib.sha256()
        h.update(code_version().encode())
        h.update(repr(config or IngestConfig()).encode())
        h.update(f"{settings.target_spacing_mm}|{store_url}|{patient_id}|{settings.reports_path}".encode())
        limits = FileLimits.of(settings)
        h.update(repr((limits, settings.date_window())).encode())
        for ses in patient.sessions:
            h.update(repr(sorted((session_sha256(ses, limits) or {"missing": ses.origin}).items())).encode())
            h.update(repr(ses.date).encode())
            h.update(repr(ses.problems).encode())
        h.update(repr(patient.problems).encode())
        from storage.store import CohortStore

        try:
            store = CohortStore.open(store_url, recover=False)
            h.update(repr(sorted(store.content_hashes(patient_id))).encode())
            # The quarantine report is part of the outcome: a deleted report must not be served from cache.
            h.update(str((settings.reports_path / "quarantine" / f"{patient_id}.json").exists()).encode())
        except FileNotFoundError:
            h.update(b"no store")
        return h.hexdigest()
    except Exception:  # noqa: BLE001 - no key means no caching, never a failure
        return None
