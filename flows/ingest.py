"""Flow ``ingest-cohort``: discover a source, ingest each patient in its own mapped task, publish QC artifacts.

Thin: the body is ``plan`` -> ``ingest_patient`` per patient -> ``finish`` from ``longitudinal.ingest``, the
same functions the CLI twin ``longitudinal ingest`` runs through ``ingest_cohort``.

De-identification: parameters are the source, treatments-table and store strings plus options; the mapped task
receives only a patient's pseudonym, never a raw id, a raw path or a treatment date (it reads the treatment rows
itself). Secrets (the pseudonym key) come from the environment or the
workspace inside the task, never as parameters. Task results and artifacts carry redacted outcomes.

Retries: only when the task failed with an I/O error (OSError: the store or the source could not be read or
written). Validation never raises; a bad session is quarantined in the outcome, so it is never retried.
Caching: keyed on the code version, the patient's source file hashes and its state in the store
(``longitudinal.ingest.patient_fingerprint``), so an identical rerun is served from the cache and anything that
changed runs again.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from flows.retries import retry_on_io

DASK_ADDRESS_ENV = "LONGITUDINAL_DASK_ADDRESS"
QC_TABLE_KEY = "ingest-qc"
SUMMARY_KEY = "ingest-summary"


def _settings(home: str | None, reports_dir: str | None, target_spacing_mm: float | None,
              allowed_root: str | None = None):
    from longitudinal.settings import get_settings

    return get_settings(home=home, reports_dir=reports_dir, target_spacing_mm=target_spacing_mm,
                        allowed_root=allowed_root)


def _config(registration: str):
    from longitudinal.ingest import IngestConfig
    from longitudinal.registration.rigid import RegistrationConfig

    return IngestConfig(registration=RegistrationConfig(kind=registration))


def _treatments(treatments: str | None) -> str | None:
    """The treatments CSV, or None: an empty string (an unset deployment placeholder) means none."""
    return (treatments.strip() or None) if treatments else None


def patient_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Input hashes + code version + the patient's state in the store (None: do not cache)."""
    from longitudinal.ingest import patient_fingerprint

    settings = _settings(parameters.get("home"), parameters.get("reports_dir"), parameters.get("target_spacing_mm"),
                         parameters.get("allowed_root"))
    key = patient_fingerprint(parameters["source"], parameters["store"], parameters["patient_id"], settings,
                              _config(parameters.get("registration", "rigid")),
                              _treatments(parameters.get("treatments")))
    return None if key is None else f"ingest-patient-{key}"


@task(
    name="ingest-patient",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_io,
    cache_key_fn=patient_cache_key,
    persist_result=True,
    task_run_name="ingest-{patient_id}",
)
def ingest_patient_task(
    source: str,
    store: str,
    patient_id: str,
    home: str | None = None,
    reports_dir: str | None = None,
    target_spacing_mm: float | None = None,
    registration: str = "rigid",
    allowed_root: str | None = None,
    treatments: str | None = None,
):
    """One patient (by pseudonym) -> PatientOutcome (redacted)."""
    from longitudinal.ingest import ingest_patient

    settings = _settings(home, reports_dir, target_spacing_mm, allowed_root)
    return ingest_patient(source, store, patient_id, settings, _config(registration), _treatments(treatments))


def _task_runner():
    """Threads on this machine (2 patients at a time), or an existing Dask cluster when
    LONGITUDINAL_DASK_ADDRESS is set (scale-out; every worker then needs LONGITUDINAL_PSEUDONYM_KEY so that all
    of them compute the same pseudonyms)."""
    address = os.environ.get(DASK_ADDRESS_ENV)
    if address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=address)
    return ThreadPoolTaskRunner(max_workers=2)


@flow(name="ingest-cohort", task_runner=_task_runner())
def ingest_cohort_flow(
    source: str,
    store: str | None = None,
    home: str | None = None,
    reports_dir: str | None = None,
    target_spacing_mm: float | None = None,
    registration: str = "rigid",
    allowed_root: str | None = None,
    treatments: str | None = None,
) -> dict[str, Any]:
    """source: BIDS folder, manifest CSV or DICOM folder. store: cohort store URL (default: the workspace's).
    allowed_root: read only files inside this folder (``Settings.allowed_root``). treatments: a CSV of
    treatment events (``patient_id,date,treatment[,end_date]``; empty: none), as ``longitudinal ingest
    --treatments``.
    Returns the run summary (counts and the report path)."""
    from longitudinal.ingest import PatientOutcome, finish, plan

    t0 = time.perf_counter()
    settings = _settings(home, reports_dir, target_spacing_mm, allowed_root)
    store = store or settings.store_url
    treatments = _treatments(treatments)
    the_plan = plan(source, store, settings, treatments)
    futures = ingest_patient_task.map(
        source, store, the_plan.patient_ids, home=home, reports_dir=reports_dir,
        target_spacing_mm=target_spacing_mm, registration=registration, allowed_root=allowed_root,
        treatments=treatments,
    )
    outcomes = []
    for pid, fut in zip(the_plan.patient_ids, futures, strict=True):
        fut.wait()
        state = fut.state
        if state.is_completed():
            outcomes.append(fut.result())
        else:
            # One bad patient never fails the cohort: it becomes a failed row of the QC table.
            exc = state.result(raise_on_failure=False)
            outcomes.append(PatientOutcome(patient_id=pid, error=f"{type(exc).__name__}"))
    report = finish(the_plan, store, outcomes, settings, time.perf_counter() - t0)
    create_table_artifact(key=QC_TABLE_KEY, table=report.rows() or [{"status": "no sessions"}],
                          description="Per-session QC: stored, skipped (already stored) or quarantined, with reasons")
    create_markdown_artifact(key=SUMMARY_KEY, markdown=report.markdown(), description="Ingest summary")
    return report.summary()


def with_workers(workers: int):
    """The flow with ``workers`` patients in parallel (threads; use a DaskTaskRunner to scale out)."""
    return ingest_cohort_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max(1, workers)))
