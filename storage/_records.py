"""Pure helpers of the cohort store: patient views, data checksum, index rows, attribute encoding.

Nothing here touches a filesystem; :mod:`storage.store` re-exports the public names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from storage.schema import SessionRecord, TreatmentRecord, validate_patient_id

REFERENCE_SPACE = (
    "Per patient: the baseline scan's grid, reoriented to RAS and resampled to isotropic spacing; later "
    "sessions are registered and resampled onto it. Arrays are the NIfTI volume transposed, "
    "array[..., z, y, x] == nifti[x, y, z]; the patient attribute reference_affine maps voxel (i=x, j=y, "
    "k=z) to RAS mm and reference_nifti describes the grid's NIfTI header."
)
CHECKSUM_DEFINITION = (
    "sha256 over, for t in 0..T-1: image[t] bytes then label[t] bytes (C order, little-endian), "
    "followed by the time array bytes (float64 little-endian)"
)

TISSUE_CHECKSUM_DEFINITION = (
    "sha256 of the tissue array bytes (float16 little-endian, C order, white matter then grey matter); "
    "only patients with tissue maps carry it, so the data checksum of the others is unchanged"
)

TREATMENTS_CHECKSUM_DEFINITION = (
    "sha256 of the patient attribute 'treatments' as JSON: a list of objects in stored order, keys sorted, "
    "separators ',' and ':', ASCII only"
)


def index_schema() -> Any:
    """The pyarrow schema of an index fragment (INDEX_COLUMNS with their types)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("patient_id", pa.string()),
            ("session", pa.string()),
            ("days", pa.float64()),
            ("time_index", pa.int64()),
            ("qc_status", pa.string()),
            ("registration_metric", pa.float64()),
            ("content_sha256", pa.string()),
            ("has_label", pa.bool_()),
        ]
    )


def treatments_schema() -> Any:
    """The pyarrow schema of a treatments fragment (TREATMENT_COLUMNS with their types)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("patient_id", pa.string()),
            ("event", pa.int64()),
            ("kind", pa.string()),
            ("start_days", pa.float64()),
            ("end_days", pa.float64()),
            ("start_date", pa.string()),
            ("end_date", pa.string()),
        ]
    )


@dataclass
class PatientArrays:
    """Lazy view of one committed patient.

    image: zarr.Array (T, C, Z, Y, X) float32; label: zarr.Array (T, Z, Y, X) uint8 (read slices on demand).
    days: (T,) float64 days since baseline. spacing_mm: (z, y, x) mm. affine: (4, 4) voxel (x, y, z) -> RAS mm.
    channels: C channel names. sessions: T SessionRecords in time order. treatments: the patient's
    TreatmentRecords (days since the baseline scan's calendar date; empty in a schema v1 store). tissue:
    zarr.Array (2, Z, Y, X) float16 white- and grey-matter probabilities in [0, 1] on the same grid
    (``storage.schema.TISSUE_CHANNELS``), or None when the patient has none (stores written before them).
    """

    patient_id: str
    image: Any
    label: Any
    days: np.ndarray
    spacing_mm: tuple[float, float, float]
    affine: np.ndarray
    channels: tuple[str, ...]
    sessions: list[SessionRecord] = field(default_factory=list)
    treatments: list[TreatmentRecord] = field(default_factory=list)
    tissue: Any = None


def tissue_checksum(tissue: Any) -> str:
    """sha256 of the tissue maps (see TISSUE_CHECKSUM_DEFINITION); ``tissue``: (2, Z, Y, X) array-like."""
    h = hashlib.sha256()
    for k in range(int(tissue.shape[0])):
        h.update(np.ascontiguousarray(np.asarray(tissue[k]), dtype="<f2").tobytes())
    return h.hexdigest()


def data_checksum(image: Any, label: Any, days: np.ndarray) -> str:
    """sha256 of the patient's data bytes (see CHECKSUM_DEFINITION); reads one time point at a time.

    image: (T, C, Z, Y, X) float32 array-like (numpy or zarr); label: (T, Z, Y, X) uint8; days: (T,) float64.
    """
    h = hashlib.sha256()
    for t in range(int(image.shape[0])):
        h.update(np.ascontiguousarray(np.asarray(image[t]), dtype="<f4").tobytes())
        h.update(np.ascontiguousarray(np.asarray(label[t]), dtype="u1").tobytes())
    h.update(np.ascontiguousarray(days, dtype="<f8").tobytes())
    return h.hexdigest()


def reference_nifti(reference_affine: np.ndarray, grid_zyx: tuple[int, ...], spacing_mm: tuple) -> dict:
    """NIfTI-1 header facts of the reference grid, enough to write ``array.T`` as a NIfTI of that grid."""
    affine = np.asarray(reference_affine, dtype=float)
    return {
        "shape_xyz": [int(v) for v in reversed(grid_zyx)],
        "pixdim_mm_xyz": [float(v) for v in reversed(spacing_mm)],
        "affine": affine.tolist(),
        "qform_code": 1,
        "sform_code": 1,
        "xyzt_units": "mm",
        "orientation": "RAS",
        "array_to_nifti": "nifti_data = array[..., z, y, x].transpose -> (x, y, z)",
    }


def index_rows(pid: str, sessions: list[SessionRecord]) -> list[dict]:
    """The index rows (INDEX_COLUMNS) for one patient's sessions, in time order."""
    return [
        {
            "patient_id": pid,
            "session": s.session,
            "days": float(s.days),
            "time_index": i,
            # Quarantined sessions are never stored; flagged-but-stored sessions are "warn".
            "qc_status": "ok" if not s.qc_flags else "warn",
            "registration_metric": float(s.registration_metric),
            "content_sha256": s.content_sha256,
            "has_label": bool(s.has_label),
        }
        for i, s in enumerate(sessions)
    ]


def treatment_rows(pid: str, treatments: list[TreatmentRecord]) -> list[dict]:
    """The treatments-table rows (TREATMENT_COLUMNS) for one patient's events, in stored order."""
    return [
        {
            "patient_id": pid,
            "event": i,
            "kind": t.kind,
            "start_days": float(t.start_days),
            "end_days": None if t.end_days is None else float(t.end_days),
            "start_date": t.start_date,
            "end_date": t.end_date,
        }
        for i, t in enumerate(treatments)
    ]


def sorted_treatments(treatments: list[TreatmentRecord]) -> list[TreatmentRecord]:
    """Events in stored order: by start date, then kind, then end date (open ends first)."""
    return sorted(treatments, key=lambda t: (t.start_date, t.kind, t.end_date or ""))


def treatments_attr(treatments: list[TreatmentRecord]) -> list[dict]:
    """The patient attribute ``treatments``: plain JSON objects in stored order."""
    return [t.to_dict() for t in sorted_treatments(treatments)]


def treatments_checksum(attr: list[dict]) -> str:
    """sha256 of the ``treatments`` attribute (see TREATMENTS_CHECKSUM_DEFINITION)."""
    text = json.dumps(attr, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def treatments_from_attrs(attrs: dict) -> list[TreatmentRecord]:
    """A patient's TreatmentRecords from its group attributes ([] for a group written by schema v1)."""
    return [TreatmentRecord.from_dict(dict(d)) for d in attrs.get("treatments") or []]


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None: attributes must stay strict JSON for other readers
    (Python's json would write a bare NaN token that most JSON parsers reject)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def session_from_attrs(d: dict) -> SessionRecord:
    """SessionRecord from stored attributes (a null registration metric was a non-finite float)."""
    d = dict(d)
    if d.get("registration_metric") is None:
        d["registration_metric"] = float("nan")
    return SessionRecord.from_dict(d)


def same_value(a: Any, b: Any) -> bool:
    """``a == b``, except that two NaN floats are the same (index cells against stored records)."""
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return bool(a == b)


def validate_patient_id_or_none(name: str) -> str | None:
    """``name`` when it is a valid patient id, else None (for skipping foreign directory entries)."""
    try:
        return validate_patient_id(name)
    except ValueError:
        return None
