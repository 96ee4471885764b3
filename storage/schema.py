"""Cohort store schema v2: names, dtypes, chunking, and the records written per patient, session and treatment.

Layout (Zarr v3)::

    cohort.zarr/                     attrs: schema_version, created_by, reference_space
      patients/<patient_id>/         one group per patient; the unit of atomic write and of task mapping
        image  (time, channel, z, y, x) float32, chunks (1, 1, 64, 64, 64), zstd
        label  (time, z, y, x)          uint8 (0 background, 1 oedema/non-enhancing, 2 enhancing)
        time   (time)                   float64, days since the patient's baseline scan
        tissue (tissue, z, y, x)        float16, optional: white- and grey-matter probability in [0, 1]
                                        (TISSUE_CHANNELS) on the reference grid; absent when unknown
        attrs: see PatientRecord; ``treatments`` lists the patient's TreatmentRecords (plain JSON)
      index/<patient_id>.parquet     one row per session (INDEX_COLUMNS); ``pandas.read_parquet(store/"index")``
                                     reads the whole cohort as one table
      treatments/<patient_id>.parquet  one row per treatment event (TREATMENT_COLUMNS), empty for an untreated
                                     patient; ``pandas.read_parquet(store/"treatments")`` reads every event

Arrays carry ``_ARRAY_DIMENSIONS``-equivalent dimension names so plain ``xarray.open_zarr`` labels them.
Strings live in attributes or the index table (zarr v3 has no fixed-width unicode spec).

Version history: v1 had no treatments (no ``treatments`` attribute, no ``treatments/`` folder). This code opens
a v1 store read-only; ``storage.store.migrate_store`` turns it into v2.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import date

import numpy as np

SCHEMA_VERSION = 2
# Older versions this code still reads (read-only): writers refuse them until the store is migrated.
READ_ONLY_SCHEMA_VERSIONS = (1,)
IMAGE_CHUNKS = (1, 1, 64, 64, 64)
LABEL_CHUNKS = (1, 64, 64, 64)
IMAGE_DIMS = ("time", "channel", "z", "y", "x")
LABEL_DIMS = ("time", "z", "y", "x")
TIME_DIMS = ("time",)
# Optional per-patient tissue maps (the MNI152 templates registered to the baseline scan at ingest): float16 keeps
# probabilities to about 1e-3 at half the bytes of float32, and reads back as a plain float array.
TISSUE_CHANNELS = ("white_matter", "grey_matter")
TISSUE_DIMS = ("tissue", "z", "y", "x")
TISSUE_CHUNKS = (1, 64, 64, 64)
TISSUE_DTYPE = "float16"
LABEL_VALUES = {0: "background", 1: "oedema/non-enhancing", 2: "enhancing"}

# Patient ids become path components (group names, index file names): a strict whitelist, no separators,
# no dots (so no "..", no hidden names), bounded length.
PATIENT_ID_MAX_LEN = 64
_PATIENT_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{PATIENT_ID_MAX_LEN}}}")


def patient_id_problem(patient_id: object) -> str | None:
    """Why ``patient_id`` cannot name a patient in the store, or None when it is acceptable.

    Accepted: 1 to 64 characters from ``[A-Za-z0-9_-]`` (so no path separators, no ``..``, no control
    characters, no whitespace).
    """
    if not isinstance(patient_id, str):
        return f"patient id must be a string, got {type(patient_id).__name__}"
    if not _PATIENT_ID_RE.fullmatch(patient_id):
        return (
            f"invalid patient id {patient_id!r}: use 1-{PATIENT_ID_MAX_LEN} characters from [A-Za-z0-9_-] "
            "(no path separators, '..', dots, spaces or control characters)"
        )
    return None


def validate_patient_id(patient_id: object) -> str:
    """Return ``patient_id`` unchanged when valid; raise ValueError naming it otherwise."""
    problem = patient_id_problem(patient_id)
    if problem:
        raise ValueError(problem)
    return patient_id  # type: ignore[return-value]


INDEX_COLUMNS = (
    "patient_id",  # pseudonymised id (never the source id)
    "session",  # session label, e.g. "ses-03" (pseudonymised sources use "s<k>")
    "days",  # float64 days since the patient's baseline scan
    "time_index",  # position along the patient's time axis
    "qc_status",  # "ok" (quarantined sessions are never stored)
    "registration_metric",  # float, see SessionRecord
    "content_sha256",  # sha256 over the session's source files (sorted by channel)
    "has_label",  # bool
)


TREATMENT_KINDS = ("surgery", "radiotherapy", "chemotherapy")
TREATMENT_COLUMNS = (
    "patient_id",  # pseudonymised id
    "event",  # position in the patient's event list (ordered by start date, then kind)
    "kind",  # one of TREATMENT_KINDS
    "start_days",  # float64 whole days from the baseline scan's calendar date to the start (negative: before it)
    "end_days",  # float64 the same for the last day of the event; null when the source gives no end date
    "start_date",  # ISO date after the per-patient date shift (never the real date)
    "end_date",  # shifted ISO end date, or null
)


@dataclass(frozen=True)
class TreatmentRecord:
    """One treatment event of a patient, in the patient's shifted calendar.

    kind: one of TREATMENT_KINDS.
    start_days: whole days from the calendar date of the patient's baseline scan (``SessionRecord.shifted_date``
        of time point 0) to the event's first day; negative when the event precedes the baseline scan.
    start_date: ISO date (YYYY-MM-DD) of the first day, shifted like the patient's scans (never the real date).
    end_days / end_date: the same for the last day (radiotherapy, a course of chemotherapy); None when the
        source gives no end (a surgery).
    Events are identified by (kind, start_date): ingesting the same event again changes nothing.
    """

    kind: str
    start_days: float
    start_date: str
    end_days: float | None = None
    end_date: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(kind, start_date): what identifies the event within its patient."""
        return (self.kind, self.start_date)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TreatmentRecord:
        return cls(**d)

    def problems(self, baseline_date: str | None = None) -> list[str]:
        """Every inconsistency of this event; ``baseline_date`` (ISO, the baseline scan's shifted date) checks
        that the days agree with the dates."""
        where = f"treatment {self.kind!r} starting {self.start_date!r}"
        out: list[str] = []
        if self.kind not in TREATMENT_KINDS:
            out.append(f"{where}: kind must be one of {list(TREATMENT_KINDS)}")
        dates: dict[str, date | None] = {}
        for name, text in (("start_date", self.start_date), ("end_date", self.end_date)):
            try:
                dates[name] = None if text is None else date.fromisoformat(text)
            except (TypeError, ValueError):
                out.append(f"{where}: {name} {text!r} is not an ISO date")
                dates[name] = None
        days = [("start_days", self.start_days), ("end_days", self.end_days)]
        for name, value in days:
            if value is not None and (not isinstance(value, int | float) or not np.isfinite(value)):
                out.append(f"{where}: {name} must be a finite number of days, got {value!r}")
        if (self.end_days is None) != (self.end_date is None):
            out.append(f"{where}: end_days and end_date must both be set or both be None")
        start, end = dates.get("start_date"), dates.get("end_date")
        if start is not None and end is not None and end < start:
            out.append(f"{where}: ends before it starts")
        if out or baseline_date is None or start is None:
            return out
        base = date.fromisoformat(baseline_date[:10])
        if self.start_days != (start - base).days:
            out.append(f"{where}: start_days {self.start_days} != {(start - base).days} days after the baseline")
        if end is not None and self.end_days != (end - base).days:
            out.append(f"{where}: end_days {self.end_days} != {(end - base).days} days after the baseline")
        return out


@dataclass(frozen=True)
class SessionRecord:
    """Everything kept about one stored session (one time point).

    days: days since the patient's baseline scan (float).
    shifted_date: ISO date after the per-patient date shift (never the real calendar date), or None.
    source_sha256: channel (or "label") -> sha256 of the source file bytes.
    transform_to_reference: 4x4 RAS-mm matrix mapping points of this session's native physical space
        onto the reference (baseline) grid's physical space.
    registration_metric: QC metric after registration (documented by the registration module; lower is better).
    native_shape: (x, y, z) voxel shape of the native scan, as stored in its NIfTI header.
    native_affine: 4x4 voxel->RAS mm affine of the native scan.
    qc_flags: free-form QC flags (empty when clean).
    """

    session: str
    days: float
    shifted_date: str | None
    source_sha256: dict[str, str]
    transform_to_reference: list[list[float]]
    registration_metric: float
    native_shape: list[int]
    native_affine: list[list[float]]
    has_label: bool = False
    qc_flags: list[str] = field(default_factory=list)

    @property
    def content_sha256(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for key in sorted(self.source_sha256):
            h.update(key.encode())
            h.update(self.source_sha256[key].encode())
        return h.hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SessionRecord:
        return cls(**d)


@dataclass
class PatientRecord:
    """One patient's whole series, in reference space, ready to be written atomically.

    image: (T, C, Z, Y, X) float32 on the reference grid.
    label: (T, Z, Y, X) uint8; zeros where a session has no label (see SessionRecord.has_label).
    days: (T,) float64, strictly increasing, days[0] == 0 (the baseline).
    channels: channel names, length C (project names, e.g. ("T1c", "FLAIR")).
    spacing_mm: (z, y, x) voxel spacing of the reference grid in mm.
    reference_affine: 4x4 NIfTI affine of the reference grid: voxel (i, j, k) -> RAS mm. Store arrays are
        the NIfTI volume transposed, i.e. ``array[..., z, y, x] == nifti_data[x, y, z]`` with i=x, j=y, k=z.
    sessions: one SessionRecord per time point, same order as days.
    treatments: the patient's treatment events (TreatmentRecord), ordered by start date then kind; days are
        counted from the calendar date of sessions[0].
    tissue: (2, Z, Y, X) white- and grey-matter probabilities in [0, 1] on the reference grid (TISSUE_CHANNELS;
        stored as TISSUE_DTYPE), or None when unknown.
    """

    patient_id: str
    image: np.ndarray
    label: np.ndarray
    days: np.ndarray
    channels: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    reference_affine: np.ndarray
    sessions: list[SessionRecord]
    treatments: list[TreatmentRecord] = field(default_factory=list)
    tissue: np.ndarray | None = None

    def check(self) -> list[str]:
        """Every inconsistency in this record (empty when valid)."""
        problems: list[str] = []
        id_problem = patient_id_problem(self.patient_id)
        if id_problem:
            problems.append(id_problem)
        t = len(self.sessions)
        if self.image.ndim != 5:
            problems.append(f"image must be (T,C,Z,Y,X), got shape {self.image.shape}")
        elif self.image.shape[0] != t or self.image.shape[1] != len(self.channels):
            problems.append(f"image shape {self.image.shape} does not match T={t}, C={len(self.channels)}")
        if self.label.shape != (self.image.shape[:1] + self.image.shape[2:]):
            problems.append(f"label shape {self.label.shape} does not match image {self.image.shape}")
        if self.days.shape != (t,):
            problems.append(f"days shape {self.days.shape} != ({t},)")
        elif t and (self.days[0] != 0 or np.any(np.diff(self.days) <= 0)):
            problems.append(f"days must start at 0 and strictly increase, got {self.days.tolist()}")
        if not np.all(np.isfinite(self.image)):
            problems.append("image has non-finite voxels")
        if [s.days for s in self.sessions] != [float(d) for d in np.ravel(self.days)]:
            problems.append("session days do not match the days array")
        names = [s.session for s in self.sessions]
        if len(set(names)) != len(names):
            problems.append(f"session names are not unique: {names}")
        if len(set(self.channels)) != len(self.channels) or not self.channels:
            problems.append(f"channel names must be non-empty and unique, got {list(self.channels)}")
        if len(self.spacing_mm) != 3 or not all(np.isfinite(v) and v > 0 for v in self.spacing_mm):
            problems.append(f"spacing_mm must be 3 positive numbers (z, y, x), got {self.spacing_mm}")
        affine = np.asarray(self.reference_affine)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            problems.append(f"reference_affine must be a finite 4x4 matrix, got shape {affine.shape}")
        if self.label.size and (
            not np.issubdtype(self.label.dtype, np.integer)
            or self.label.min() < 0
            or self.label.max() > max(LABEL_VALUES)
        ):
            problems.append(f"label must hold integers in {sorted(LABEL_VALUES)}")
        baseline = self.sessions[0].shifted_date if self.sessions else None
        for event in self.treatments:
            problems.extend(event.problems(baseline))
        keys = [event.key for event in self.treatments]
        if len(set(keys)) != len(keys):
            problems.append("treatment events are not unique by (kind, start_date)")
        if self.treatments and not self.sessions:
            problems.append("treatment events need at least one session to count days from")
        if self.tissue is not None:
            tissue = np.asarray(self.tissue)
            want = (len(TISSUE_CHANNELS), *self.image.shape[2:])
            if tissue.shape != want:
                problems.append(f"tissue shape {tissue.shape} != {want} (channels {list(TISSUE_CHANNELS)}, grid)")
            elif not (np.all(np.isfinite(tissue)) and tissue.min(initial=0) >= 0 and tissue.max(initial=0) <= 1):
                problems.append("tissue must hold finite probabilities in [0, 1]")
        return problems
