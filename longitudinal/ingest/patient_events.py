"""A patient's treatment rows as events ready to merge: dates shifted with the patient's keyed date shift (the same
as its scans), counted in whole days from the baseline scan's shifted calendar date, and matched against the
stored events by (kind, shifted start date)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from longitudinal.ingest.deid import public_text, shift_date
from longitudinal.ingest.report import PatientOutcome, TreatmentOutcome
from longitudinal.ingest.sources import PatientSource
from storage.schema import TreatmentRecord


@dataclass(frozen=True)
class PendingEvent:
    """One treatment event ready to merge: dates already shifted (the store's calendar)."""

    kind: str
    start: dt.date
    end: dt.date | None
    origin: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.start.isoformat())


def shift_day(day: dt.date, raw_id: str, secret: bytes) -> dt.date:
    """A calendar date shifted by the patient's keyed date shift (the same shift as its scans)."""
    return shift_date(dt.datetime.combine(day, dt.time()), raw_id, secret).date()


def event_record(event: PendingEvent, base: dt.date) -> TreatmentRecord:
    """The stored form of ``event``: whole days since ``base`` (the baseline scan's shifted calendar date)."""
    return TreatmentRecord(
        kind=event.kind,
        start_days=float((event.start - base).days),
        start_date=event.start.isoformat(),
        end_days=None if event.end is None else float((event.end - base).days),
        end_date=None if event.end is None else event.end.isoformat(),
    )


def rebased(record: TreatmentRecord, base: dt.date) -> TreatmentRecord:
    """``record`` with its days recounted from ``base`` (a new baseline scan came before the old one)."""
    end = None if record.end_date is None else dt.date.fromisoformat(record.end_date)
    return event_record(PendingEvent(record.kind, dt.date.fromisoformat(record.start_date), end, ""), base)


def new_events(
    patient: PatientSource,
    stored: list[TreatmentRecord],
    secret: bytes,
    outcome: PatientOutcome,
    refuse_event: Callable[..., None],
) -> list[PendingEvent]:
    """The patient's treatment rows that are not stored yet, their dates shifted. A row whose event (kind and
    shifted start date) is stored is skipped, or refused when its end date differs from the stored one."""
    by_key = {t.key: t for t in stored}
    pending: list[PendingEvent] = []
    for row in patient.treatments:
        try:
            start = shift_day(row.start, patient.raw_id, secret)
            end = None if row.end is None else shift_day(row.end, patient.raw_id, secret)
        except OverflowError:  # only with a date window configured down to year 1
            refuse_event(row.origin, [f"date out of range at {row.origin}: it cannot be shifted"], row.kind)
            continue
        event = PendingEvent(row.kind, start, end, row.origin)
        hit = by_key.get(event.key)
        if hit is None:
            pending.append(event)
        elif hit.end_date == (None if end is None else end.isoformat()):
            outcome.treatments.append(TreatmentOutcome(
                origin=public_text(row.origin, patient.raw_id, patient.patient_id), status="skipped",
                kind=row.kind, start_days=hit.start_days, end_days=hit.end_days,
            ))
        else:
            refuse_event(row.origin, [f"conflicting treatment at {row.origin}: the stored {row.kind} starting the "
                                      "same day has another end date"], row.kind)
    return pending
