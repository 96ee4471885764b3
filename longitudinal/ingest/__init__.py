"""Ingest: discover sources, de-identify, validate, preprocess, register, and write the cohort store.

Entry points: ``ingest_cohort`` (a whole source) and ``ingest_patient`` (one patient by pseudonym: the unit a
flow maps over). Raw patient ids and real dates never leave this package.
"""

from longitudinal.ingest.patient import IngestConfig, ingest_patient
from longitudinal.ingest.pipeline import (
    IngestPlan,
    finish,
    ingest_cohort,
    patient_fingerprint,
    plan,
    prepare,
)
from longitudinal.ingest.report import IngestReport, PatientOutcome, SessionOutcome, write_report
from longitudinal.ingest.sources import CohortSource, detect_kind, discover

__all__ = [
    "CohortSource",
    "IngestConfig",
    "IngestPlan",
    "IngestReport",
    "PatientOutcome",
    "SessionOutcome",
    "detect_kind",
    "discover",
    "ingest_cohort",
    "finish",
    "ingest_patient",
    "patient_fingerprint",
    "plan",
    "prepare",
    "write_report",
]
