"""Counterfactual treatment plans: "what if we treat on date D?" -> planned events in days since baseline.

A plan is a list of planned treatments, each ``KIND@START[:END]`` (the CLI's ``--plan``, the forecast flow's and
the MLflow model's ``plan`` parameter) or a :class:`PlannedTreatment` (the Python API):

- KIND: one of ``longitudinal.models.base.TREATMENT_KINDS`` (surgery, radiotherapy, chemotherapy);
- START / END: a calendar date ``YYYY-MM-DD``, read in the patient's calendar exactly as a query's ``at`` date
  (``predict.queries``: real with the raw id and the site's key, else the store's shifted calendar), or ``+N``:
  N days after the latest scan (N >= 0). Without END the event is a single day (end = start); a surgery is
  always a single day.

Every planned event starts on or after the latest scan: a plan changes what happens next, never the recorded
history. The resolved events are added to the recorded history for one query only
(``data.context.PatientSeries.with_plan``). Every problem of a plan is collected and raised once
(``InvalidQueryError``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from longitudinal.models.base import TREATMENT_KINDS
from longitudinal.predict.errors import InvalidQueryError
from longitudinal.predict.queries import PatientCalendar, parse_date
from longitudinal.predict.result import Calendar

PLAN_SYNTAX = "KIND@START[:END] (START/END: YYYY-MM-DD or +DAYS after the latest scan)"


@dataclass(frozen=True)
class PlannedTreatment:
    """One planned treatment as the user gives it. kind: surgery, radiotherapy or chemotherapy. start / end:
    ``YYYY-MM-DD`` in the patient's calendar or ``+N`` days after the latest scan; end None: a single day."""

    kind: str
    start: str
    end: str | None = None

    @classmethod
    def parse(cls, text: str) -> PlannedTreatment:
        """``KIND@START[:END]`` -> PlannedTreatment; ValueError when the text has no ``@`` or an empty part.
        Kinds and dates are checked when the plan is resolved (:func:`resolve_plan`), all problems at once."""
        kind, sep, when = str(text).strip().partition("@")
        start, colon, end = when.partition(":")
        if not sep or not kind.strip() or not start.strip() or (colon and not end.strip()):
            raise ValueError(f"--plan {str(text)!r}: not {PLAN_SYNTAX}")
        return cls(kind.strip().lower(), start.strip(), end.strip() if colon else None)

    def __str__(self) -> str:
        return f"{self.kind}@{self.start}" + (f":{self.end}" if self.end is not None else "")


@dataclass(frozen=True)
class PlannedEvent:
    """One resolved planned event. start_days / end_days: days since baseline (end = start for a single day);
    start_date / end_date: ISO dates in ``calendar`` (None when the patient has no dates)."""

    kind: str
    start_days: float
    end_days: float
    start_date: str | None
    end_date: str | None
    calendar: Calendar | None

    @property
    def event(self) -> tuple[float, float, str]:
        """(start day, end day, kind): the form of ``PatientSeries.events``."""
        return (self.start_days, self.end_days, self.kind)

    def describe_days(self) -> str:
        """The event in days since baseline only (what a log, a flow artifact or a plot's metadata may hold)."""
        if self.end_days > self.start_days:
            return f"{self.kind} days {self.start_days:g}-{self.end_days:g}"
        return f"{self.kind} day {self.start_days:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "start_days": self.start_days, "end_days": self.end_days,
                "start_date": self.start_date, "end_date": self.end_date, "calendar": self.calendar}


def parse_plan(items: Sequence[PlannedTreatment | str] | None) -> tuple[PlannedTreatment, ...]:
    """Plan items (``PlannedTreatment``s or ``KIND@START[:END]`` strings) -> PlannedTreatments. Raises
    InvalidQueryError listing every malformed item (a bare string is refused: a plan is a list)."""
    if items is None:
        return ()
    if isinstance(items, str | bytes) or not isinstance(items, Sequence):
        raise InvalidQueryError(f"invalid plan: a plan is a list of {PLAN_SYNTAX}, got {type(items).__name__}")
    out: list[PlannedTreatment] = []
    problems: list[str] = []
    for item in items:
        if isinstance(item, PlannedTreatment):
            out.append(item)
        elif isinstance(item, str):
            try:
                out.append(PlannedTreatment.parse(item))
            except ValueError as exc:
                problems.append(str(exc))
        else:
            problems.append(f"--plan {item!r}: not {PLAN_SYNTAX}")
    if problems:
        raise InvalidQueryError("invalid plan: " + "; ".join(problems))
    return tuple(out)


def plan_problems(plan: Sequence[PlannedTreatment]) -> list[str]:
    """What is wrong with ``plan`` whatever the patient (empty when nothing): unknown kinds (naming the valid
    ones), a START/END that is neither ``YYYY-MM-DD`` nor ``+DAYS``, an END for a surgery. Cheap: a caller checks
    it before loading scans."""
    problems: list[str] = []
    for p in plan:
        problems.extend(_item_problems(p))
    return problems


def _item_problems(p: PlannedTreatment) -> list[str]:
    label = f"--plan {str(p)!r}"
    errors = []
    if p.kind not in TREATMENT_KINDS:
        errors.append(f"{label}: unknown treatment kind {p.kind!r}; valid kinds: {', '.join(TREATMENT_KINDS)}")
    for text in (p.start, p.end):
        if text is not None and _offset(text) is None and parse_date(str(text).strip()) is None:
            errors.append(f"{label}: {str(text)!r} is neither a calendar date YYYY-MM-DD nor +DAYS (a number >= 0 "
                          "of days after the latest scan)")
    if p.end is not None and p.kind == "surgery":
        errors.append(f"{label}: a surgery is a single day; give no END")
    return errors


def resolve_plan(plan: Sequence[PlannedTreatment], calendar: PatientCalendar,
                 last_scan_days: float) -> list[PlannedEvent]:
    """Planned treatments -> events in days since baseline, in start order.

    calendar: the patient's (``queries.patient_calendar``); last_scan_days: the latest scan's day. Raises
    InvalidQueryError listing every problem: those of :func:`plan_problems`, a calendar date for a patient
    without dates, an END before START, an event that starts before the latest scan (naming the date and the
    latest scan's date).
    """
    problems: list[str] = []
    out: list[PlannedEvent] = []
    last = float(last_scan_days)
    last_date = calendar.date_of(last)
    for p in plan:
        errors = _item_problems(p)
        if errors:
            problems.extend(errors)
            continue
        label = f"--plan {str(p)!r}"
        start = _day(p.start, calendar, last, label, errors)
        end = _day(p.end, calendar, last, label, errors) if p.end is not None else start
        if start is not None and start < last - 1e-9:
            when = (f"{p.start} starts before the latest scan of {last_date} ({calendar.calendar} calendar)"
                    if last_date else f"day {start:g} starts before the latest scan (day {last:g})")
            errors.append(f"{label}: {when}; a plan starts on or after the latest scan")
        if start is not None and end is not None and end < start:
            errors.append(f"{label}: END {p.end} is before START {p.start}")
        problems.extend(errors)
        if not errors and start is not None and end is not None:
            out.append(PlannedEvent(p.kind, start, end, calendar.date_of(start), calendar.date_of(end),
                                    calendar.calendar if calendar.baseline is not None else None))
    if problems:
        raise InvalidQueryError("invalid plan: " + "; ".join(problems))
    return sorted(out, key=lambda e: (e.start_days, e.end_days, e.kind))


def _offset(text: str) -> float | None:
    """``+N`` -> N (finite, >= 0); None for anything else."""
    text = str(text).strip()
    if not text.startswith("+"):
        return None
    try:
        n = float(text[1:])
    except ValueError:
        return None
    return n if math.isfinite(n) and n >= 0 else None


def _day(text: str, calendar: PatientCalendar, last: float, label: str, errors: list[str]) -> float | None:
    """A well-formed START or END -> days since baseline (None, with the reason appended to ``errors``, for a
    calendar date of a patient without dates)."""
    offset = _offset(text)
    if offset is not None:
        return round(last + offset, 6)
    date = parse_date(str(text).strip())
    assert date is not None  # _item_problems ruled out anything else
    if calendar.baseline is None:
        errors.append(f"{label}: the store keeps no dates for this patient; use +DAYS (after the latest scan)")
        return None
    day = calendar.days_of(date)
    # Dates are midnight while a scan may carry a time of day: a plan on the latest scan's own date starts with
    # that scan, not hours before it.
    if calendar.date_of(last) == date.isoformat() and day < last:
        day = last
    return round(day, 6)
