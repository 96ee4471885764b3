"""Treatment histories: the sources' treatment tables, every row checked, and the events ingest stores.

Sources (both may be used together; their rows are pooled per patient):

- BIDS: ``sub-<label>/sub-<label>_treatments.tsv`` with columns ``date`` and ``treatment`` and optionally
  ``end_date`` (ISO dates; ``n/a`` or empty for no end). A subject without the file has no recorded treatment.
- Any source kind: a CSV given with ``longitudinal ingest SOURCE --treatments FILE.csv``, columns
  ``patient_id,date,treatment[,end_date]``. ``patient_id`` is the source's own id (BIDS subject label, with or
  without ``sub-``; manifest id; DICOM PatientID) and is matched through the same keyed pseudonym as the scans, so it
  may also name a patient already in the store but absent from this source.

``treatment`` is one of ``surgery``, ``radiotherapy``, ``chemotherapy`` (case-insensitive). Tables are read
through ``files.open_text`` (regular files under the size cap; a UTF-8 byte-order mark is dropped).

Checked here, at discovery, per row: an unknown kind; a missing, unparseable or implausible date or end date
(outside ``Settings.date_window()``); an end before the start; the same event (kind and start date) twice for
one patient, in one table or across both; a row without a patient id. Checked when the patient is ingested
(``patient.py``, which sees the store): a patient known neither to the source nor to the store; a start more than
``LOOKBACK_DAYS`` before the patient's first scan; an event already stored with another end date. A refused row
is named by file and line; the other rows, and the scans, go on. No problem echoes a raw date or patient id.

Dates travel as real dates only inside this package (``TreatmentRow``); the store keeps them shifted by the
patient's keyed date shift (``deid.shift_date``, the same as the patient's scans) and as whole days since the
calendar date of the patient's baseline scan (``storage.schema.TreatmentRecord``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from longitudinal.ingest.files import FileLimits, RefusedFile, open_text
from storage.schema import TREATMENT_KINDS

if TYPE_CHECKING:
    from longitudinal.ingest.sources import CohortSource
    from longitudinal.settings import Settings

BIDS_COLUMNS = ("date", "treatment")
CSV_COLUMNS = ("patient_id", "date", "treatment")
END_COLUMN = "end_date"
# A treatment starting more than this many days before the patient's first scan is refused as impossible
# (a typing error in the year, a placeholder date): about ten years.
LOOKBACK_DAYS = 3653
_SAFE_KIND = re.compile(r"[A-Za-z][A-Za-z _-]{0,31}")


@dataclass(frozen=True)
class TreatmentRow:
    """One treatment event as a source lists it.

    kind: one of ``storage.schema.TREATMENT_KINDS``. start / end: REAL calendar dates (never stored, printed or
    logged; ``repr`` hides them); end is None when the source gives none. origin: "<table> line <n>", the
    table named relative to the source (BIDS) or by its file name (the CSV).
    """

    kind: str
    start: dt.date = field(repr=False)
    end: dt.date | None = field(repr=False)
    origin: str


@dataclass(frozen=True)
class RefusedRow:
    """A treatment row that is not stored: where it is ("<table> line <n>") and every reason."""

    origin: str
    reasons: tuple[str, ...]


def _kind_text(text: str) -> str:
    """An unknown kind as a problem may show it: echoed only when it looks like a word (a shifted column could
    put a date or an id there)."""
    return repr(text) if _SAFE_KIND.fullmatch(text) else "(not shown)"


def parse_row(
    kind_text: str | None, date_text: str | None, end_text: str | None, origin: str, settings: Settings
) -> TreatmentRow | RefusedRow:
    """A row's event, or every reason it is refused (kind, date, end date, order of the dates)."""
    from longitudinal.ingest.sources import date_problem, parse_date

    reasons: list[str] = []
    kind = (kind_text or "").strip().lower()
    if not kind:
        reasons.append(f"missing treatment at {origin}")
    elif kind not in TREATMENT_KINDS:
        reasons.append(f"unknown treatment {_kind_text((kind_text or '').strip())} at {origin} "
                       f"(valid: {', '.join(TREATMENT_KINDS)})")
    dates: dict[str, dt.date | None] = {}
    for column, text, required in (("date", date_text, True), (END_COLUMN, end_text, False)):
        text = (text or "").strip()
        when = parse_date(text)
        dates[column] = None
        if when is None:
            if text and text.lower() not in {"n/a", "nan", "none"}:
                reasons.append(f"unparseable {column} at {origin}")
            elif required:
                reasons.append(f"missing {column} at {origin}")
        elif (why := date_problem(when, settings, f"{column} at {origin}")) is not None:
            reasons.append(why)
        else:
            dates[column] = when.date()
    start, end = dates["date"], dates[END_COLUMN]
    if start is not None and end is not None and end < start:
        reasons.append(f"impossible dates at {origin}: end_date before date")
    if reasons or start is None:
        return RefusedRow(origin, tuple(reasons))
    return TreatmentRow(kind, start, end, origin)


def _read_table(path: Path, display: str, required: tuple[str, ...], settings: Settings, delimiter: str,
                confine: bool) -> tuple[list[tuple[int, dict]], str | None]:
    """(line, row) pairs of a treatment table (the header is line 1), or a problem naming the table."""
    limits = FileLimits.of(settings)
    if not confine:
        limits = dataclasses.replace(limits, allowed_root=None)
    try:
        with open_text(path, limits) as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in required if c not in columns]
            if missing:
                return [], f"treatment table {display}: missing columns {missing} (need {list(required)}" \
                           f", optional {END_COLUMN!r})"
            rows = []
            for row in reader:
                # line_num: the physical line the row ends on (blank lines and quoted line breaks counted).
                rows.append((reader.line_num, {(k or "").strip(): v for k, v in row.items()}))

    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        why = exc.about(f"treatment table {display}") if isinstance(exc, RefusedFile) \
            else f"unreadable treatment table {display} ({type(exc).__name__})"
        return [], why
    return rows, None


def _pool(rows: list[TreatmentRow | RefusedRow]) -> tuple[list[TreatmentRow], list[RefusedRow]]:
    """Split parsed rows into events and refusals; the second of two rows with one kind and start is refused."""
    events: list[TreatmentRow] = []
    refused: list[RefusedRow] = []
    first: dict[tuple[str, dt.date], str] = {}
    for row in rows:
        if isinstance(row, RefusedRow):
            refused.append(row)
        elif (row.kind, row.start) in first:
            refused.append(RefusedRow(row.origin, (
                f"duplicate treatment at {row.origin}: {row.kind} starting the same day as at "
                f"{first[(row.kind, row.start)]}",)))
        else:
            first[(row.kind, row.start)] = row.origin
            events.append(row)
    return events, refused


def attach_treatments(cohort: CohortSource, settings: Settings, table: str | Path | None = None) -> None:
    """Read the cohort's treatment tables (BIDS subjects' ``_treatments.tsv``, then the CSV ``table``) and
    attach every row to its patient: ``PatientSource.treatments`` (accepted at discovery) and
    ``PatientSource.refused_treatments``. A CSV row naming a patient absent from the source gets a patient of
    its own with no sessions (``in_source`` False), judged against the store at ingest. Table-level problems
    (unreadable, missing columns) and rows without a patient id go to ``cohort.problems``."""
    from longitudinal.ingest.sources import new_patient

    parsed: dict[str, list[TreatmentRow | RefusedRow]] = {p.raw_id: [] for p in cohort.patients}
    if cohort.kind == "bids":
        for patient in cohort.patients:
            sub = f"sub-{patient.raw_id}"
            path = cohort.root / sub / f"{sub}_treatments.tsv"
            if not path.is_symlink() and not path.exists():
                continue  # no table: untreated as far as the data says
            display = path.relative_to(cohort.root).as_posix()
            rows, problem = _read_table(path, display, BIDS_COLUMNS, settings, "\t", confine=True)
            if problem:
                parsed[patient.raw_id].append(RefusedRow(display, (problem,)))
            for line, row in rows:
                parsed[patient.raw_id].append(parse_row(row.get("treatment"), row.get("date"),
                                                        row.get(END_COLUMN), f"{display} line {line}", settings))
    if table is not None:
        path = Path(table)
        # The operator names the table itself (like a manifest): it is not confined to the allowed root.
        rows, problem = _read_table(path, path.name, CSV_COLUMNS, settings, ",", confine=False)
        if problem:
            cohort.problems.append(problem)
        by_raw = {p.raw_id.strip(): p.raw_id for p in cohort.patients}
        for line, row in rows:
            origin = f"{path.name} line {line}"
            raw = (row.get("patient_id") or "").strip()
            if not raw:
                cohort.problems.append(f"treatment row without a patient_id at {origin}")
                continue
            if raw not in by_raw and cohort.kind == "bids" and raw.startswith("sub-"):
                raw = raw[len("sub-"):]  # a BIDS subject named with its prefix
            raw = by_raw.get(raw, raw)
            parsed.setdefault(raw, []).append(parse_row(row.get("treatment"), row.get("date"),
                                                        row.get(END_COLUMN), origin, settings))
    known = {p.raw_id: p for p in cohort.patients}
    for raw, rows in parsed.items():
        if not rows:
            continue
        patient = known.get(raw)
        if patient is None:
            patient = new_patient(raw, settings)
            patient.in_source = False
            cohort.patients.append(patient)
            known[raw] = patient
        patient.treatments, patient.refused_treatments = _pool(rows)
