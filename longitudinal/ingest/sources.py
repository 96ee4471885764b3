"""Source discovery: a BIDS dataset, a manifest CSV, a folder of DICOM series (``dicom.py``) or a LUMIERE
``Patient-*/week-*`` tree (``lumiere.py``) -> typed records. The kind is detected, or set by
``Settings.source_kind``.

Discovery only lists files and dates; it reads no voxels. Problems found here (a missing file, an unparseable
date, an unknown channel, a hostile patient id) are attached to the session or patient they belong to, so that
validation can report them together with the problems of the images themselves.

Raw patient ids are kept in ``PatientSource.raw_id`` only (never printed by ``repr``), and are replaced by a keyed
pseudonym right here (``PatientSource.patient_id``). Files are named in reports by their path relative to the
source (``ScanFile.display``), never by DICOM tags. A DICOM series is named by its session label (from the
shifted date), series number and channel, never by its folders: DICOM exports often name folders after the
patient.

Every table discovery reads (manifest, BIDS sessions.tsv, treatment tables) passes ``files.open_text`` (regular
files under the size cap only; a UTF-8 byte-order mark is dropped). Dates outside ``Settings.date_window()`` are
refused per session, like unparseable ones. Treatment histories (BIDS ``sub-*_treatments.tsv``, a treatments
CSV) are attached to their patients by ``treatments.attach_treatments``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import re
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from longitudinal.ingest.deid import hostile_id_problems, pseudonym
from longitudinal.ingest.files import FileLimits, RefusedFile, open_text
from longitudinal.settings import CHANNELS, SOURCE_KINDS, Settings

if TYPE_CHECKING:
    from longitudinal.ingest.treatments import RefusedRow, TreatmentRow

SourceKind = Literal["bids", "manifest", "dicom", "lumiere"]
MANIFEST_COLUMNS = ("patient_id", "date", "channel", "path", "label_path")
LABEL_KEY = "label"


@dataclass(frozen=True)
class ScanFile:
    """One image to read: a NIfTI file or the ordered files of one DICOM series.

    display: the file named relative to the source root (what reports show); a DICOM series by session label,
        series number and channel.
    where: where the source lists the file, when that is not its path (a manifest's "m.csv line 5"), else "".
    values: for a label in another coding, (source value, stored class) pairs (every value the file holds must
        be listed, ``validate.relabel``); empty: the values are the store's classes already.
    """

    channel: str
    kind: Literal["nifti", "dicom"]
    paths: tuple[Path, ...]
    display: str
    where: str = ""
    values: tuple[tuple[int, int], ...] = ()


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
    """One patient as found in the source. ``raw_id`` never leaves the ingest package.

    treatments: treatment events accepted at discovery (real dates, see ``treatments.TreatmentRow``);
    refused_treatments: rows refused at discovery, each with its table line and reasons. in_source: False for a
    patient named only by a treatments CSV (no sessions here): ingest then looks for the patient in the store.
    """

    patient_id: str
    raw_id: str = field(repr=False)
    sessions: list[SessionSource] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    treatments: list[TreatmentRow] = field(default_factory=list)
    refused_treatments: list[RefusedRow] = field(default_factory=list)
    in_source: bool = True


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


def detect_kind(source: str | os.PathLike, kind: str = "auto") -> SourceKind:
    """What kind of source this is: 'bids' (has dataset_description.json), 'manifest' (.csv), 'lumiere'
    (``lumiere.is_lumiere``), else 'dicom'. An explicit ``kind`` (``Settings.source_kind``) is checked against the
    path (a manifest is a file, the others folders) and returned; "auto" detects."""
    from longitudinal.ingest.lumiere import is_lumiere

    path = Path(source)
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r} (valid: {', '.join(SOURCE_KINDS)})")
    if path.is_file():
        if kind not in ("auto", "manifest"):
            raise ValueError(f"source {path} is a file, not a {kind} source (a folder)")
        if path.suffix.lower() in {".csv", ".tsv"}:
            return "manifest"
        raise ValueError(f"{path} is a file but not a manifest (.csv)")
    if not path.is_dir():
        if path.exists():
            raise ValueError(f"source {path} is neither a folder nor a regular file")
        raise FileNotFoundError(f"source {path} does not exist")
    if kind != "auto":
        if kind not in ("bids", "dicom", "lumiere"):
            raise ValueError(f"source {path} is a folder, not a {kind} source")
        return kind  # type: ignore[return-value]
    if (path / "dataset_description.json").is_file():
        return "bids"
    return "lumiere" if is_lumiere(path) else "dicom"


def discover(
    source: str | os.PathLike, settings: Settings, treatments: str | os.PathLike | None = None
) -> CohortSource:
    """Discover every patient and session of a source (no voxels read), with the treatment histories of its
    BIDS subjects and of the CSV ``treatments`` (``treatments.attach_treatments``; a LUMIERE source adds its
    implied surgeries). Patients are sorted by pseudonym. Raises ValueError for a kind that does not fit the
    source, or for an invalid LUMIERE configuration."""
    from longitudinal.ingest.dicom import discover_dicom
    from longitudinal.ingest.lumiere import discover_lumiere
    from longitudinal.ingest.treatments import attach_treatments

    kind = detect_kind(source, settings.source_kind)
    root = Path(source).resolve()
    if kind == "lumiere":
        cohort = discover_lumiere(root, settings, treatments)
    else:
        cohort = {"bids": _discover_bids, "manifest": _discover_manifest, "dicom": discover_dicom}[kind](root, settings)
        attach_treatments(cohort, settings, treatments)
    cohort.patients.sort(key=lambda p: p.patient_id)
    return cohort


def _stamp(path: Path | None) -> tuple[int, int]:
    """(mtime ns, size) of ``path`` for memo keys; (-1, -1) when absent or unreadable."""
    try:
        st = path.stat() if path is not None else None
    except OSError:
        st = None
    return (st.st_mtime_ns, st.st_size) if st is not None else (-1, -1)


def discover_cached(source: str, settings: Settings, treatments: str | os.PathLike | None = None) -> CohortSource:
    """``discover`` memoised per process on (source, its mtime, the treatments CSV and its mtime and size, key,
    source kind and layout settings), for per-patient tasks that are given only the source and a pseudonym."""
    root = Path(source).resolve()
    stamp = _stamp(root)[0]
    table = Path(treatments).resolve() if treatments else None
    key = (
        str(root),
        stamp,
        str(table),
        _stamp(table),
        settings.pseudonym_secret,
        json.dumps(settings.bids_channel_map, sort_keys=True),
        json.dumps(settings.dicom_channel_map, sort_keys=True),
        json.dumps([settings.source_kind, settings.lumiere_channel_map, settings.lumiere_segmentation,
                    sorted(settings.lumiere_label_map.items())], sort_keys=True),
        FileLimits.of(settings),
        settings.date_window(),
    )
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
    if hit is None:
        hit = discover(source, settings, treatments)
        with _MEMO_LOCK:
            if len(_MEMO) >= 8:
                _MEMO.pop(next(iter(_MEMO)))
            _MEMO[key] = hit
    return hit


_MEMO: dict[tuple, CohortSource] = {}
_MEMO_LOCK = threading.Lock()


def new_patient(raw_id: str, settings: Settings) -> PatientSource:
    """A patient of raw id ``raw_id``: its pseudonym, and the problems of a hostile id."""
    return PatientSource(
        patient_id=pseudonym(raw_id, settings.pseudonym_secret),
        raw_id=raw_id,
        problems=hostile_id_problems(raw_id),
    )


def date_problem(when: dt.datetime, settings: Settings, where: str) -> str | None:
    """Why a parsed date is refused (None when plausible): outside ``settings.date_window()``. Such dates are
    typing errors or placeholders (0001-01-01, 1850, 2150), and the earliest cannot even be shifted. The date
    itself is not echoed: it may be real."""
    earliest, latest = settings.date_window()
    if earliest <= when.date() <= latest:
        return None
    return f"implausible date in {where}: outside {earliest:%Y-%m-%d} to {latest:%Y-%m-%d}"


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
        patient = new_patient(raw_id, settings)
        dates, date_problems = _bids_session_dates(root, sub_dir, settings)
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


def _bids_session_dates(
    root: Path, sub_dir: Path, settings: Settings
) -> tuple[dict[str, dt.datetime], dict[str, str]]:
    """session_id -> acq_time date, and session_id -> problem (naming the table and its line), from
    sub-X/sub-X_sessions.tsv."""
    tsv = sub_dir / f"{sub_dir.name}_sessions.tsv"
    rel = tsv.relative_to(root).as_posix()
    dates: dict[str, dt.datetime] = {}
    problems: dict[str, str] = {}
    if not tsv.is_symlink() and not tsv.exists():
        return dates, problems
    try:
        with open_text(tsv, FileLimits.of(settings)) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        why = (exc.about(rel) if isinstance(exc, RefusedFile)
               else f"unreadable sessions table {rel}: {type(exc).__name__}")
        for ses in (p.name for p in sub_dir.glob("ses-*")):
            problems[ses] = why
        return dates, problems
    # The header is line 1, so rows start at line 2.
    for line, row in enumerate(rows, start=2):
        ses = (row.get("session_id") or "").strip()
        if not ses:
            continue
        where = f"{rel} line {line}"
        date = parse_date(row.get("acq_time") or "")
        if date is None:
            # The raw value is not echoed: it may be a real date.
            kind = "missing" if not (row.get("acq_time") or "").strip() else "unparseable"
            problems[ses] = f"{kind} date: acq_time of {ses} in {where}"
        elif (why := date_problem(date, settings, f"acq_time of {ses} in {where}")) is not None:
            problems[ses] = why
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
        # The manifest itself is not confined to the allowed root: the operator names it; the files it lists are.
        with open_text(path, dataclasses.replace(FileLimits.of(settings), allowed_root=None)) as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                cohort.problems.append(f"{path.name}: missing columns {missing} (need {list(MANIFEST_COLUMNS)})")
                return cohort
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        cohort.problems.append(exc.about(path.name) if isinstance(exc, RefusedFile)
                               else f"{path.name}: unreadable manifest ({type(exc).__name__})")
        return cohort

    # (raw id, raw date text) -> rows; the header is line 1, so data rows start at line 2.
    groups: dict[str, dict[str, list[tuple[int, dict]]]] = defaultdict(lambda: defaultdict(list))
    for line, row in enumerate(rows, start=2):
        groups[row["patient_id"] or ""][(row["date"] or "").strip()].append((line, row))

    for raw_id, by_date in groups.items():
        patient = new_patient(raw_id, settings)
        for date_text, items in by_date.items():
            lines = [ln for ln, _ in items]
            origin = f"{path.name} line{'s' if len(lines) > 1 else ''} {','.join(map(str, lines))}"
            session = SessionSource(origin=origin, date=parse_date(date_text))
            if session.date is None:
                kind = "missing" if not date_text else "unparseable"
                session.problems.append(f"{kind} date in {origin}")
            elif (why := date_problem(session.date, settings, origin)) is not None:
                session.problems.append(why)
                session.date = None
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
    except (ValueError, RuntimeError):  # outside the manifest's folder, or a symlink loop
        display = text
    return ScanFile(channel, "nifti", (full,), display if text else f"(empty path at {where})", where)
