"""Query times: calendar dates, days after the latest scan, or days since the baseline -> days since baseline.

Dates and de-identification: the store keeps only *shifted* dates (``SessionRecord.shifted_date``: the real
date-time plus a keyed per-patient offset, see ``longitudinal.ingest.deid``); intervals are exact. So a
calendar date can be read in one of two calendars:

- ``real``: when the caller knows the patient's raw id and the site's pseudonym key (the CLI given a raw id,
  or scans given as files), the real baseline is ``shifted baseline - date_shift_days(raw id)``, and a real date
  D maps to ``D - real baseline`` days. The raw id is used for that subtraction only, never stored or returned.
- ``shifted``: given only the pseudonym, a date is read in the store's shifted calendar (the dates that
  ``ses-YYYYMMDD`` labels and the index show); a real calendar date cannot be mapped without the raw id.

A date is midnight of that day; days are float (the baseline may carry a time of day).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

from longitudinal.predict.errors import DateBeforeBaselineError, InvalidQueryError
from longitudinal.predict.result import Calendar

_DAY_S = 86400.0


@dataclass(frozen=True)
class PatientCalendar:
    """The patient's baseline date-time in ``calendar`` (both None when the store keeps no dates)."""

    baseline: dt.datetime | None
    calendar: Calendar | None

    def date_of(self, days: float) -> str | None:
        """ISO date ``days`` after the baseline in this calendar (None without dates)."""
        if self.baseline is None:
            return None
        return (self.baseline + dt.timedelta(days=float(days))).date().isoformat()

    def days_of(self, date: dt.date) -> float:
        """Days from the baseline to midnight of ``date``."""
        assert self.baseline is not None
        return (dt.datetime.combine(date, dt.time()) - self.baseline).total_seconds() / _DAY_S


def patient_calendar(shifted_baseline: str | None, raw_id: str | None, secret: bytes | None) -> PatientCalendar:
    """Calendar of a patient from its baseline session's ``shifted_date`` (module docstring)."""
    if not shifted_baseline:
        return PatientCalendar(None, None)
    base = dt.datetime.fromisoformat(shifted_baseline)
    if raw_id is not None and secret is not None:
        from longitudinal.ingest.deid import date_shift_days

        return PatientCalendar(base - dt.timedelta(days=date_shift_days(raw_id, secret)), "real")
    return PatientCalendar(base, "shifted")


@dataclass(frozen=True)
class Queries:
    """The query times of one forecast, in the three forms every surface names the same way (the CLI's options
    ``--in``, ``--at`` and ``--days-since-baseline``; the Python API, the forecast flow's and the MLflow model's
    parameters ``in_days``, ``at`` and ``days_since_baseline``).

    in_days: days after the latest scan (> 0). at: calendar dates ``YYYY-MM-DD`` (calendars: module docstring).
    days_since_baseline: days since the baseline scan (> 0; before the latest scan it is a retrospective
    forecast from the scans before it).
    """

    in_days: tuple[float, ...] = ()
    at: tuple[str, ...] = ()
    days_since_baseline: tuple[float, ...] = ()

    @classmethod
    def of(cls, in_days: Sequence[float] = (), at: Sequence[str | dt.date] = (),
           days_since_baseline: Sequence[float] = ()) -> Queries:
        return cls(tuple(in_days), tuple(str(a) for a in at), tuple(days_since_baseline))

    def __bool__(self) -> bool:
        return bool(self.in_days or self.at or self.days_since_baseline)

    def resolve(self, calendar: PatientCalendar, last_scan_days: float) -> list[ResolvedQuery]:
        """Sorted, de-duplicated queries in days since baseline (``resolve_queries``)."""
        return resolve_queries(calendar, last_scan_days, self.in_days, self.at, self.days_since_baseline)


@dataclass(frozen=True)
class ResolvedQuery:
    """One query: days since baseline and its ISO date in the patient's calendar (None without dates)."""

    days: float
    date: str | None


def parse_date(text: str | dt.date) -> dt.date | None:
    """``YYYY-MM-DD`` (or a date object) -> date; None when unparseable."""
    if isinstance(text, dt.datetime):
        return text.date()
    if isinstance(text, dt.date):
        return text
    try:
        return dt.date.fromisoformat(str(text).strip())
    except ValueError:
        return None


def resolve_queries(
    calendar: PatientCalendar,
    last_scan_days: float,
    days_after_last: Sequence[float] = (),
    dates: Sequence[str | dt.date] = (),
    days_since_baseline: Sequence[float] = (),
) -> list[ResolvedQuery]:
    """All query forms -> sorted, de-duplicated queries in days since baseline.

    days_after_last: days after the latest scan (> 0). dates: calendar dates (module docstring).
    days_since_baseline: days since the baseline scan (> 0).
    Raises DateBeforeBaselineError when every problem is a query on or before the baseline, else
    InvalidQueryError listing every problem.
    """
    problems: list[str] = []
    before: list[str] = []
    out: dict[float, str | None] = {}

    def add(days: float, date: str | None) -> None:
        key = round(float(days), 6)
        if key not in out or out[key] is None:
            out[key] = date

    for v in days_after_last:
        if not _finite(v) or float(v) <= 0:
            problems.append(f"--in {v!r}: days after the latest scan must be a finite number > 0")
        else:
            d = float(last_scan_days) + float(v)
            add(d, calendar.date_of(d))
    for v in days_since_baseline:
        if not _finite(v):
            problems.append(f"day {v!r}: days since baseline must be a finite number")
        elif float(v) <= 0:
            before.append(f"day {float(v):g} is not after the baseline scan (day 0)")
        else:
            add(float(v), calendar.date_of(float(v)))
    for text in dates:
        date = parse_date(text)
        if date is None:
            problems.append(f"--at {str(text)!r}: not a calendar date (use YYYY-MM-DD)")
            continue
        if calendar.baseline is None:
            problems.append(f"--at {date.isoformat()}: the store keeps no dates for this patient; "
                            "use --in DAYS (after the latest scan) instead")
            continue
        d = calendar.days_of(date)
        if d <= 0:
            before.append(f"--at {date.isoformat()} is not after the baseline scan of "
                          f"{calendar.baseline.date().isoformat()} ({calendar.calendar} calendar)")
        else:
            add(d, date.isoformat())
    if not (days_after_last or dates or days_since_baseline):
        problems.append("no query: give at least one --at YYYY-MM-DD or --in DAYS")
    if problems or before:
        if problems:
            raise InvalidQueryError("invalid forecast query: " + "; ".join(problems + before))
        raise DateBeforeBaselineError("date before the baseline: " + "; ".join(before))
    return [ResolvedQuery(k, out[k]) for k in sorted(out)]


def _finite(v: object) -> bool:
    try:
        return math.isfinite(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
