"""Ingest of a cohort: discovered sessions -> validated, registered, normalised series -> one atomic write per
patient. This module is the one cohort fan-out (threads, a Dask cluster, or the flow's plan/finish), used by the
CLI, Dask and the Prefect flow; one patient's work lives in ``patient.py`` and the reports in ``report.py``.

Per patient (``patient.process_patient``):

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
   high-pass) of the registration channel against the reference inside the head, the tumours of both scans
   (dilated by ``RegistrationConfig.qc_exclude_margin_mm``, so a resection cavity too) left out; above
   ``RegistrationConfig.qc_max_metric`` the session is quarantined.
5. Stored and new sessions are merged in date order and committed with one ``CohortStore.update_patient``, which
   holds the patient's lock from reading what is stored to the commit, so concurrent ingests keep every session.

Treatment histories (``treatments.py``): the BIDS subjects' ``_treatments.tsv`` and the run's treatments CSV
are read at discovery, every row checked there or in step 5, and the patient's new events merged in the same
``update_patient`` (events alone, for a patient whose scans are all stored, make a commit of their own).

Dates: the real date never leaves this package. Days are exact differences of acquisition date-times (in days,
float); the stored ``shifted_date`` is the date-time shifted by a keyed per-patient offset
(``deid.shift_date``), so merging later sessions keeps exact intervals. Duplicates are judged by calendar day.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import SimpleITK as sitk

from longitudinal import __version__
from longitudinal.ingest.files import FileLimits
from longitudinal.ingest.patient import IngestConfig, open_store, process_patient, safe_error
from longitudinal.ingest.report import IngestReport, PatientOutcome, ProgressFn, write_report
from longitudinal.ingest.sources import CohortSource, PatientSource, discover, discover_cached
from longitudinal.ingest.validate import (
    session_sha256,
)
from longitudinal.settings import Settings


def prepare(source: str, store_url: str, settings: Settings,
            treatments: str | None = None) -> tuple[CohortSource, object]:
    """Discover the source (with the treatments CSV, if any) and open (create, recover) the store. Returns
    (cohort, store)."""
    cohort = discover_cached(str(source), settings, treatments)
    store = open_store(store_url, recover=True)
    return cohort, store


def ingest_cohort(
    source: str | os.PathLike,
    store_url: str,
    settings: Settings,
    workers: int = 1,
    progress: ProgressFn | None = None,
    config: IngestConfig | None = None,
    dask_address: str | None = None,
    treatments: str | os.PathLike | None = None,
) -> IngestReport:
    """Ingest every patient of ``source`` into the store at ``store_url`` with ``workers`` parallel patients.

    ``treatments``: a CSV of treatment events (``patient_id,date,treatment[,end_date]``) for the source's
    patients (or patients already stored), read besides any BIDS ``sub-*_treatments.tsv`` (``treatments.py``).

    With ``dask_address`` (``tcp://HOST:PORT`` of an existing Dask scheduler) the patients run as one task each
    on that cluster instead (``workers`` is then ignored; see ``_ingest_on_dask``).

    One bad patient never fails the cohort: its exception becomes ``PatientOutcome.error``. Writes the run's
    JSON report under ``settings.reports_path`` and returns it. Raises OSError only when the store cannot be
    opened or created (or the Dask scheduler cannot be reached), ReadOnlyStoreError (a ValueError) when the
    store has an older schema version.
    """
    t0 = time.perf_counter()
    config = config or IngestConfig()
    treatments = None if treatments is None else str(treatments)
    cohort = discover(source, settings, treatments)
    store_url = str(store_url)
    report = IngestReport(source_kind=cohort.kind, store_url=store_url, problems=list(cohort.problems))
    open_store(store_url, recover=True)
    if dask_address:
        outcomes = _ingest_on_dask(dask_address, source, store_url, cohort, settings, config, progress,
                                   treatments)
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
            return process_patient(patient, open_store(store_url, recover=False), settings, config)
        except Exception as exc:  # noqa: BLE001 - one patient never fails the cohort
            return PatientOutcome(patient_id=patient.patient_id, error=f"{type(exc).__name__}: {safe_error(exc, patient)}")

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
    source: str, store_url: str, patient_id: str, settings: Settings, config: IngestConfig,
    treatments: str | None = None,
) -> PatientOutcome:
    """``ingest_patient`` for a process that shares nothing with the caller but the arguments (a Dask worker):
    never raises, so one bad patient (or an unreadable source on that node) becomes ``PatientOutcome.error``.

    ``settings`` must carry the pseudonym key itself (``pseudonym_key``): a worker resolving its own would
    compute different pseudonyms and miss the patient."""
    try:
        patient = discover_cached(source, settings, treatments).patient(patient_id)
    except Exception as exc:  # noqa: BLE001 - the message may name raw paths; the type is enough here
        return PatientOutcome(patient_id=patient_id, error=f"{type(exc).__name__}: source not readable on worker")
    try:
        return process_patient(patient, open_store(store_url, recover=False), settings, config)
    except Exception as exc:  # noqa: BLE001 - one patient never fails the cohort
        return PatientOutcome(patient_id=patient_id, error=f"{type(exc).__name__}: {safe_error(exc, patient)}")


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
    treatments: str | None = None,
) -> dict[str, PatientOutcome]:
    """One ``ingest_patient_task`` per patient on the Dask cluster at ``address``; outcomes by pseudonym.

    Only pseudonyms, the source and store locations, the settings and the config travel to the workers: each
    worker rediscovers the source itself, so the source (the treatments CSV, and a local store) must be at the
    same path on every worker node (shared filesystem), or the store on object storage. The settings are resolved here and sent
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
    table_at = None if treatments is None else _portable(treatments)
    run = uuid.uuid4().hex[:8]
    outcomes: dict[str, PatientOutcome] = {}
    total = len(cohort.patients)
    with Client(address, timeout="30s", set_as_default=False) as client:
        # pure=False and a per-run key: a rerun must run again (the store may have changed), never be
        # deduplicated against an earlier client's result still held by the scheduler.
        futures = {
            client.submit(ingest_patient_task, source_at, store_at, p.patient_id, remote, config, table_at,
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


@dataclass(frozen=True)
class IngestPlan:
    """What a run will do: the source kind, the patients (pseudonyms only) and source-level problems."""

    source_kind: str
    patient_ids: list[str]
    problems: list[str]


def plan(source: str, store_url: str, settings: Settings, treatments: str | None = None) -> IngestPlan:
    """Discover the source (and the treatments CSV) and create/recover the store; returns pseudonyms only (safe
    as task parameters)."""
    cohort, _ = prepare(source, store_url, settings, treatments)
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
                        config: IngestConfig | None = None, treatments: str | None = None) -> str | None:
    """Cache key of one patient's ingest: code version, config, source file hashes, the patient's treatment
    rows and its state in the store (its stored content hashes and events). Equal keys mean equal inputs AND
    equal starting store, so the outcome is the same. None when it cannot be computed (then nothing is
    cached)."""
    try:
        patient = discover_cached(str(source), settings, treatments).patient(patient_id)
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
        # Real dates only enter the hash, never the key's text.
        h.update(repr([(t.kind, t.start, t.end, t.origin) for t in patient.treatments]).encode())
        h.update(repr(patient.refused_treatments).encode())
        h.update(repr(patient.in_source).encode())
        from storage.store import CohortStore

        try:
            store = CohortStore.open(store_url, recover=False)
            h.update(repr((store.schema_version, sorted(store.content_hashes(patient_id)))).encode())
            if store.has_patient(patient_id):
                h.update(repr(store.patient_treatments(patient_id)).encode())
            # The quarantine report is part of the outcome: a deleted report must not be served from cache.
            h.update(str((settings.reports_path / "quarantine" / f"{patient_id}.json").exists()).encode())
        except FileNotFoundError:
            h.update(b"no store")
        return h.hexdigest()
    except Exception:  # noqa: BLE001 - no key means no caching, never a failure
        return None
