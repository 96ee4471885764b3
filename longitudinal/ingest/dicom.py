"""DICOM discovery: a folder of DICOM series -> patients by PatientID, sessions by study date, channels by
SeriesDescription (``Settings.dicom_channel_map``).

Only the tags discovery needs are parsed (never names, birth dates or institutions), and a series is named in
every problem and report by its session label (from the shifted date), series number and channel, never by its
folders: DICOM exports often name folders after the patient.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import defaultdict
from pathlib import Path

from longitudinal.ingest.deid import session_label, shift_date
from longitudinal.ingest.files import FileLimits, RefusedFile, check_file
from longitudinal.ingest.sources import (
    CohortSource,
    ScanFile,
    SessionSource,
    date_problem,
    new_patient,
    parse_date,
)
from longitudinal.settings import Settings

_DICOM_TAGS = ("PatientID", "AcquisitionDate", "StudyDate", "SeriesDate", "SeriesDescription",
               "SeriesNumber")


def _dicom_channel(description: str, channel_map: dict[str, str]) -> str | None:
    text = description.lower()
    # Longest key first, so "t1 post" wins over a shorter key contained in it.
    for key in sorted(channel_map, key=len, reverse=True):
        if key.lower() in text:
            return channel_map[key]
    return None


def discover_dicom(root: Path, settings: Settings) -> CohortSource:
    import pydicom
    import SimpleITK as sitk

    cohort = CohortSource(kind="dicom", root=root, patients=[])
    limits = FileLimits.of(settings)
    # raw id -> date text -> [(channel, the series' files in order, series number)]
    found: dict[str, dict[str, list[tuple[str, tuple[Path, ...], str]]]] = defaultdict(lambda: defaultdict(list))
    dirs = sorted({Path(d) for d, _, files in os.walk(root) if files})
    for folder in dirs:
        try:
            # GDCM's scan reads regular files only: devices and pipes in the folder are skipped, not opened.
            series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError:
            series_ids = ()
        for sid in series_ids:
            files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
            if not files:
                continue
            # Folders are never named in problems: exports often name them after the patient. The file name is.
            what = f"a series of {len(files)} file{'s' if len(files) > 1 else ''} ({files[0].name})"
            try:
                check_file(files[0], limits)
                # Only the tags discovery needs are parsed: names, birth dates, institutions never enter memory.
                ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
            except RefusedFile as exc:
                cohort.problems.append(exc.about(what))
                continue
            except Exception as exc:  # noqa: BLE001 - any parse failure is a reportable problem
                cohort.problems.append(f"unreadable DICOM header in {what}: {type(exc).__name__}")
                continue
            raw_id = str(getattr(ds, "PatientID", "") or "")
            date_text = ""
            for tag in ("AcquisitionDate", "StudyDate", "SeriesDate"):
                date_text = str(getattr(ds, tag, "") or "").strip()
                if date_text:
                    break
            channel = _dicom_channel(str(getattr(ds, "SeriesDescription", "") or ""), settings.dicom_channel_map)
            if channel is None:
                # Localisers and other contrasts are expected in a DICOM export: not a problem, just unused.
                continue
            number = str(getattr(ds, "SeriesNumber", "") or "").strip()
            found[raw_id][date_text].append((channel, files, number))

    for raw_id, by_date in found.items():
        patient = new_patient(raw_id, settings)
        if not raw_id:
            patient.problems.append("missing PatientID")
        for n, (date_text, items) in enumerate(sorted(by_date.items()), start=1):
            when, origin, problem = _dicom_session_date(date_text, n, raw_id, settings)
            session = SessionSource(origin=origin, date=when)
            if problem:
                session.problems.append(problem)
            for k, (channel, files, number) in enumerate(items, start=1):
                series = f"series {number}" if number else f"unnumbered series {k}"
                count = f"{len(files)} file{'s' if len(files) > 1 else ''}"
                scan = ScanFile(channel, "dicom", files, f"{origin} {series} ({channel}, {count})")
                if channel in session.scans:
                    session.problems.append(f"duplicate channel {channel}: {session.scans[channel].display} and {scan.display}")
                else:
                    session.scans[channel] = scan
            patient.sessions.append(session)
        cohort.patients.append(patient)
    return cohort


def _dicom_session_date(
    date_text: str, n: int, raw_id: str, settings: Settings
) -> tuple[dt.datetime | None, str, str | None]:
    """(date, origin, problem) of the ``n``-th session (1-based, in date order) of a DICOM patient.

    origin: the session label of the shifted date, as stored ("ses-YYYYMMDD"); "undated session n" when the
    date is missing, unparseable or implausible (then date is None and problem says why).
    """
    when = parse_date(date_text)
    undated = f"undated session {n}"
    if when is None:
        kind = "missing" if not date_text else "unparseable"
        return None, undated, f"{kind} study/acquisition date in {undated}"
    if (why := date_problem(when, settings, f"{undated} (study/acquisition date)")) is not None:
        return None, undated, why
    try:
        return when, session_label(shift_date(when, raw_id, settings.pseudonym_secret)), None
    except OverflowError:  # only with a date window configured down to year 1
        return None, undated, f"date out of range in {undated}: it cannot be shifted"
