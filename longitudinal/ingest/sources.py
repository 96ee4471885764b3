"""Source discovery: a BIDS dataset, a manifest CSV, or a folder of DICOM series -> typed records.

Discovery only lists files and dates; it reads no voxels. Problems found here (a missing file, an unparseable
date, an unknown channel, a hostile patient id) are attached to the session or patient they belong to, so that
validation can report them together with the problems of the images themselves.

Raw patient ids are kept in ``PatientSource.raw_id`` only (never printed by ``repr``), and are replaced by a keyed
pseudonym right here (``PatientSource.patient_id``). Files are named in reports by their path relative to the
source (``ScanFile.display``), never by DICOM tags.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from longitudinal.ingest.deid import hostile_id_problems, pseudonym
from longitudinal.settings import CHANNELS, Settings

SourceKind = Literal["bids", "manifest", "dicom"]
MANIFEST_COLUMNS = ("patient_id", "date", "channel", "path", "label_path")
LABEL_KEY = "label"


@dataclass(frozen=True)
class ScanFile:
    """One image to read: a NIfTI file or the ordered files of one DICOM series.

    display: the file named relative to the source root (what reports show).
    """

    channel: str
    kind: Literal["nifti", "dicom"]
    paths: tuple[Path, ...]
    display: str


@dataclass
class SessionSource:
    """One visit as found in the source.

    date: date and time of the visit (real, never stored; midnight when the source gives only a date), None
        when missing or unparseable.
    scans: project channel -> file; label: segmentation on the grid of the session's images, when present.
    problems: discovery problems of this session (each names its file).
    origin: where the session comes from, relative to the source (for reports).
    """

    origin: str
    date: dt.datetime | None
    scans: dict[str, ScanFile] = field(default_factory=dict)
    label: ScanFile | None = None
    problems: list[str] = field(default_factory=list)

    def files(self) -> dict[str, ScanFile]:
        """channel (or "label") -> file, the keys of ``SessionRecord.source_sha256``."""
        out = dict(self.scans)
        if self.label is not None:
            out[LABEL_KEY] = self.label
        return out


@dataclass
class PatientSource:
    """One patient as found in the source. ``raw_id`` never leaves the ingest package."""

    patient_id: str
    raw_id: str = field(repr=False)
    sessions: list[SessionSource] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class CohortSource:
    """Everything discovered in one source. ``problems`` are source-level (e.g. an unreadable manifest)."""

    kind: SourceKind
    root: Path
    patients: list[PatientSource]
    problems: list[str] = field(default_factory=list)

    def patient(self, patient_id: str) -> PatientSource:
        for p in self.patients:
            if p.patient_id == patient_id:
                return p
        raise KeyError(f"no patient {patient_id} in this source")


def detect_kind(source: str | os.PathLike) -> SourceKind:
    """What kind of source this is: 'bids' (has dataset_description.json), 'manifest' (.csv), else 'dicom'."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() in {".csv", ".tsv"}:
            return "manifest"
        raise ValueError(f"{path} is a file but not a manifest (.csv)")
    if not path.is_dir():
        raise FileNotFoundError(f"source {path} does not exist")
    if (path / "dataset_description.json").is_file():
        return "bids"
    return "dicom"


def discover(source: str | os.PathLike, settings: Settings) -> CohortSource:
    """Discover every patient and session of a source (no voxels read). Patients are sorted by pseudonym."""
    kind = detect_kind(source)
    root = Path(source).resolve()
    if kind == "bids":
        cohort = _discover_bids(root, settings)
    elif kind == "manifest":
        cohort = _discover_manifest(root, settings)
    else:
        cohort = _discover_dicom(root, settings)
    cohort.patients.sort(key=lambda p: p.patient_id)
    return cohort


def discover_cached(source: str, settings: Settings) -> CohortSource:
    """``discover`` memoised per process on (source, its mtime, key, channel maps), for per-patient tasks that
    are given only the source and a pseudonym."""
    root = Path(source).resolve()
    try:
        stamp = root.stat().st_mtime_ns
    except OSError:
        stamp = -1
    key = (
        str(root),
        stamp,
        settings.pseudonym_secret,
        json.dumps(settings.bids_channel_map, sort_keys=True),
        json.dumps(settings.dicom_channel_map, sort_keys=True),
    )
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
    if hit is None:
        hit = discover(source, settings)
        with _MEMO_LOCK:
            if len(_MEMO) >= 8:
                _MEMO.pop(next(iter(_MEMO)))
            _MEMO[key] = hit
    return hit


_MEMO: dict[tuple, CohortSource] = {}
_MEMO_LOCK = threading.Lock()


def _new_patient(raw_id: str, settings: Settings) -> PatientSource:
    return PatientSource(
        patient_id=pseudonym(raw_id, settings.pseudonym_secret),
        raw_id=raw_id,
        problems=hostile_id_problems(raw_id),
    )


def parse_date(text: str) -> dt.datetime | None:
    """ISO date or datetime (``2024-03-01``, ``2024-03-01T10:00:00``) or DICOM ``YYYYMMDD`` -> naive datetime
    (midnight for a bare date; a timezone is dropped after conversion to UTC); None when unparseable."""
    text = (text or "").strip()
    if not text or text.lower() in {"n/a", "nan", "none"}:
        return None
    if re.fullmatch(r"\d{8}", text):
        try:
            return dt.datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return when


# --- BIDS -------------------------------------------------------------------------------------------------

_ENTITY_RE = re.compile(r"^([a-zA-Z0-9]+)-(.+)$")


def _bids_entities(filename: str) -> dict[str, str] | None:
    """Entities + suffix + extension of a BIDS file name, or None when it is not a NIfTI file."""
    name = filename
    if name.endswith(".nii.gz"):
        stem, ext = name[: -len(".nii.gz")], ".nii.gz"
    elif name.endswith(".nii"):
        stem, ext = name[: -len(".nii")], ".nii"
    else:
        return None
    parts = stem.split("_")
    out = {"suffix": parts[-1], "extension": ext}
    for part in parts[:-1]:
        m = _ENTITY_RE.match(part)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _matches(entities: dict[str, str], rule: dict[str, str]) -> bool:
    return all(entities.get(k) == v for k, v in rule.items())


def _discover_bids(root: Path, settings: Settings) -> CohortSource:
    cohort = CohortSource(kind="bids", root=root, patients=[])
    channel_map = settings.bids_channel_map
    for sub_dir in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("sub-")):
        raw_id = sub_dir.name[len("sub-") :]
        patient = _new_patient(raw_id, settings)
        dates, date_problems = _bids_session_dates(root, sub_dir)
        for ses_dir in sorted(p for p in sub_dir.iterdir() if p.is_dir() and p.name.startswith("ses-")):
            ses_id = ses_dir.name
            rel = ses_dir.relative_to(root).as_posix()
            session = SessionSource(origin=rel, date=dates.get(ses_id))
            if ses_id in date_problems:
                session.problems.append(date_problems[ses_id])
            elif session.date is None:
                tsv = (sub_dir / f"{sub_dir.name}_sessions.tsv").relative_to(root).as_posix()
                session.problems.append(f"missing date: no acq_time for {ses_id} in {tsv}")
            anat = ses_dir / "anat"
            files = sorted(anat.iterdir()) if anat.is_dir() else []
            for channel, rule in channel_map.items():
                hits = [f for f in files if (e := _bids_entities(f.name)) is not None and _matches(e, rule)]
                if len(hits) > 1:
                    names = ", ".join(h.relative_to(root).as_posix() for h in hits)
                    session.problems.append(f"ambiguous channel {channel}: several files match ({names})")
                elif hits:
                    session.scans[channel] = ScanFile(
                        channel, "nifti", (hits[0],), hits[0].relative_to(root).as_posix()
                    )
            label = _bids_label(root, sub_dir.name, ses_id)
            if label is not None:
                session.label = ScanFile(LABEL_KEY, "nifti", (label,), label.relative_to(root).as_posix())
            patient.sessions.append(session)
        if not patient.sessions:
            patient.problems.append(f"no ses-* folders in {sub_dir.relative_to(root).as_posix()}")
        cohort.patients.append(patient)
    return cohort


def _bids_session_dates(root: Path, sub_dir: Path) -> tuple[dict[str, dt.datetime], dict[str, str]]:
    """session_id -> acq_time date, and session_id -> problem, from sub-X/sub-X_sessions.tsv."""
    tsv = sub_dir / f"{sub_dir.name}_sessions.tsv"
    rel = tsv.relative_to(root).as_posix()
    dates: dict[str, dt.datetime] = {}
    problems: dict[str, str] = {}
    if not tsv.is_file():
        return dates, problems
    try:
        with tsv.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        for ses in (p.name for p in sub_dir.glob("ses-*")):
            problems[ses] = f"unreadable sessions table {rel}: {type(exc).__name__}"
        return dates, problems
    for row in rows:
        ses = (row.get("session_id") or "").strip()
        if not ses:
            continue
        date = parse_date(row.get("acq_time") or "")
        if date is None:
            # The raw value is not echoed: it may be a real date.
            kind = "missing" if not (row.get("acq_time") or "").strip() else "unparseable"
            problems[ses] = f"{kind} date: acq_time of {ses} in {rel}"
        else:
            dates[ses] = date
    return dates, problems


def _bids_label(root: Path, sub: str, ses: str) -> Path | None:
    deriv = root / "derivatives"
    if not deriv.is_dir():
        return None
    for pipeline in sorted(p for p in deriv.iterdir() if p.is_dir()):
        anat = pipeline / sub / ses / "anat"
        if anat.is_dir():
            hits = sorted(anat.glob(f"{sub}_{ses}*_dseg.nii*"))
            if hits:
                return hits[0]
    return None


# --- manifest CSV -----------------------------------------------------------------------------------------


def _discover_manifest(path: Path, settings: Settings) -> CohortSource:
    cohort = CohortSource(kind="manifest", root=path.parent, patients=[])
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                cohort.problems.append(f"{path.name}: missing columns {missing} (need {list(MANIFEST_COLUMNS)})")
                return cohort
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        cohort.problems.append(f"{path.name}: unreadable manifest ({type(exc).__name__})")
        return cohort

    # (raw id, raw date text) -> rows; the header is line 1, so data rows start at line 2.
    groups: dict[str, dict[str, list[tuple[int, dict]]]] = defaultdict(lambda: defaultdict(list))
    for line, row in enumerate(rows, start=2):
        groups[row["patient_id"] or ""][(row["date"] or "").strip()].append((line, row))

    for raw_id, by_date in groups.items():
        patient = _new_patient(raw_id, settings)
        for date_text, items in by_date.items():
            lines = [ln for ln, _ in items]
            origin = f"{path.name} line{'s' if len(lines) > 1 else ''} {','.join(map(str, lines))}"
            session = SessionSource(origin=origin, date=parse_date(date_text))
            if session.date is None:
                kind = "missing" if not date_text else "unparseable"
                session.problems.append(f"{kind} date in {origin}")
            for line, row in items:
                channel = (row["channel"] or "").strip()
                where = f"{path.name} line {line}"
                if channel not in CHANNELS:
                    session.problems.append(f"unknown channel {channel!r} at {where} (valid: {', '.join(CHANNELS)})")
                    continue
                if channel in session.scans:
                    session.problems.append(f"duplicate channel {channel} at {where}")
                    continue
                session.scans[channel] = _manifest_file(path.parent, channel, row["path"], where, session)
                label_text = (row.get("label_path") or "").strip()
                if label_text:
                    label = _manifest_file(path.parent, LABEL_KEY, label_text, where, session)
                    if session.label is not None and session.label.paths != label.paths:
                        session.problems.append(f"conflicting label paths at {where}")
                    session.label = label
            patient.sessions.append(session)
        cohort.patients.append(patient)
    return cohort


def _manifest_file(base: Path, channel: str, text: str, where: str, session: SessionSource) -> ScanFile:
    text = (text or "").strip()
    p = Path(text)
    full = p if p.is_absolute() else base / p
    if not text:
        session.problems.append(f"missing file: empty path for {channel} at {where}")
    try:
        display = full.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        display = text
    return ScanFile(channel, "nifti", (full,), display if text else f"(empty path at {where})")


# --- DICOM folders ----------------------------------------------------------------------------------------


_DICOM_TAGS = ("PatientID", "AcquisitionDate", "StudyDate", "SeriesDate", "SeriesDescription")


def _dicom_channel(description: str, channel_map: dict[str, str]) -> str | None:
    text = description.lower()
    # Longest key first, so "t1 post" wins over a shorter key contained in it.
    for key in sorted(channel_map, key=len, reverse=True):
        if key.lower() in text:
            return channel_map[key]
    return None


def _discover_dicom(root: Path, settings: Settings) -> CohortSource:
    import pydicom
    import SimpleITK as sitk

    cohort = CohortSource(kind="dicom", root=root, patients=[])
    # raw id -> date text -> list of (ScanFile or problem)
    found: dict[str, dict[str, list[tuple[str | None, ScanFile | None, str | None]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    dirs = sorted({Path(d) for d, _, files in os.walk(root) if files})
    for folder in dirs:
        try:
            series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        except RuntimeError:
            series_ids = ()
        for sid in series_ids:
            files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid))
            if not files:
                continue
            rel_dir = folder.relative_to(root).as_posix()
            display = f"{rel_dir}/{files[0].name}" + (f" (+{len(files) - 1} files)" if len(files) > 1 else "")
            try:
                # Only the tags discovery needs are parsed: names, birth dates, institutions never enter memory.
                ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=list(_DICOM_TAGS))
            except Exception as exc:  # noqa: BLE001 - any parse failure is a reportable problem
                cohort.problems.append(f"unreadable DICOM header {display}: {type(exc).__name__}")
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
            found[raw_id][date_text].append((channel, ScanFile(channel, "dicom", files, display), None))

    for raw_id, by_date in found.items():
        patient = _new_patient(raw_id, settings)
        if not raw_id:
            patient.problems.append("missing PatientID")
        for date_text, items in sorted(by_date.items()):
            first = next((sf.display for _, sf, _ in items if sf is not None), None)
            origin = (first.split(" (+")[0].rsplit("/", 1)[0] if first else "dicom series")
            session = SessionSource(origin=origin, date=parse_date(date_text))
            if session.date is None:
                kind = "missing" if not date_text else "unparseable"
                session.problems.append(f"{kind} study/acquisition date in {origin}")
            for channel, scan, note in items:
                if scan is None or channel is None:
                    session.problems.append(note or "unusable series")
                elif channel in session.scans:
                    session.problems.append(f"duplicate channel {channel}: {session.scans[channel].display} and {scan.display}")
                else:
                    session.scans[channel] = scan
            patient.sessions.append(session)
        cohort.patients.append(patient)
    return cohort
