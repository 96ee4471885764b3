"""Phantom cohorts with exactly known growth: a brain-like ellipsoid with a spherical tumour whose radius grows
linearly in time. Tests of the data layer, training, evaluation, tracking and forecasting build stores from these
so every expected number (centre, radius, volume) is known without running a model.

Geometry: grid (Z, Y, X) voxels, spacing (z, y, x) mm. Tumour: whole tumour (label 1) is the sphere of radius
``r(t) = r0 + growth * t / 365.25`` mm; the enhancing core (label 2) is the concentric sphere of radius
``core_fraction * r(t)``. Volumes reported here are voxel counts times the voxel volume (ml), i.e. exactly what
the labels contain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from storage.schema import PatientRecord, SessionRecord

DAYS_PER_YEAR = 365.25
# Per-channel intensities (brain, oedema, enhancing); background outside the brain is exactly 0.
_INTENSITY = {"T1c": (0.5, 0.55, 1.0), "FLAIR": (0.4, 1.0, 0.8)}


@dataclass(frozen=True)
class PhantomPatient:
    """Truth for one phantom patient.

    centres_vox: per time point, tumour centre (z, y, x) in voxels of the store grid.
    radii_mm: per time point, whole-tumour radius (mm).
    days: days since baseline.
    whole_ml / enhancing_ml: per time point, volume of labels >= 1 / == 2 in ml (from the written labels).
    """

    patient_id: str
    days: tuple[float, ...]
    centres_vox: tuple[tuple[float, float, float], ...]
    radii_mm: tuple[float, ...]
    growth_mm_per_year: float
    whole_ml: tuple[float, ...]
    enhancing_ml: tuple[float, ...]


@dataclass
class PhantomCohort:
    """What `make_phantom_store` wrote: the store URL and the truth per patient."""

    url: str
    grid: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    channels: tuple[str, ...]
    patients: dict[str, PhantomPatient] = field(default_factory=dict)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing_mm)) / 1000.0


def sphere_labels(
    grid: Sequence[int],
    spacing_mm: Sequence[float],
    centre_vox: Sequence[float],
    radius_mm: float,
    core_fraction: float = 0.6,
) -> np.ndarray:
    """(Z, Y, X) uint8 labels: 1 inside the sphere of ``radius_mm`` (physical distance, anisotropic spacing
    respected), 2 inside the concentric core sphere of ``core_fraction * radius_mm``, 0 elsewhere."""
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid], indexing="ij")
    d2 = sum(((a - c) * s) ** 2 for a, c, s in zip((zz, yy, xx), centre_vox, spacing_mm, strict=True))
    lab = np.zeros(tuple(grid), dtype=np.uint8)
    lab[d2 <= radius_mm**2] = 1
    lab[d2 <= (core_fraction * radius_mm) ** 2] = 2
    return lab


def brain_mask(grid: Sequence[int]) -> np.ndarray:
    """(Z, Y, X) bool ellipsoid filling ~90% of each axis: the phantom's 'brain'."""
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid], indexing="ij")
    c = [(n - 1) / 2 for n in grid]
    r = [0.45 * n for n in grid]
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0


def phantom_record(
    patient_id: str,
    days: Sequence[float],
    centres_vox: Sequence[Sequence[float]],
    radii_mm: Sequence[float],
    grid: Sequence[int] = (32, 32, 32),
    spacing_mm: Sequence[float] = (2.0, 2.0, 2.0),
    channels: Sequence[str] = ("T1c", "FLAIR"),
    noise: float = 0.02,
    seed: int = 0,
    core_fraction: float = 0.6,
) -> PatientRecord:
    """A PatientRecord with one sphere per time point (centre and radius given per time point).

    Image (T, C, Z, Y, X) float32: per-channel brain / oedema / enhancing intensities plus Gaussian noise
    (``noise`` std) inside the brain, exactly 0 outside it. Label (T, Z, Y, X) uint8 from `sphere_labels`.
    """
    days_a = np.asarray(days, dtype=np.float64)
    t = len(days_a)
    if not (len(centres_vox) == len(radii_mm) == t):
        raise ValueError(f"need one centre and radius per time point: {t} days, {len(centres_vox)} centres, "
                         f"{len(radii_mm)} radii")
    rng = np.random.default_rng(seed)
    brain = brain_mask(grid)
    labels = np.stack([sphere_labels(grid, spacing_mm, c, r, core_fraction)
                       for c, r in zip(centres_vox, radii_mm, strict=True)])
    labels[:, ~brain] = 0
    image = np.zeros((t, len(channels), *grid), dtype=np.float32)
    for ci, ch in enumerate(channels):
        base, oed, enh = _INTENSITY.get(ch, (0.5, 0.8, 1.0))
        vals = np.array([0.0, oed, enh], dtype=np.float32)
        img = np.where(labels > 0, vals[labels], np.float32(base))
        img = img + rng.normal(0.0, noise, size=img.shape).astype(np.float32)
        img[:, ~brain] = 0.0
        image[:, ci] = img
    sz, sy, sx = (float(s) for s in spacing_mm)
    affine = np.diag([sx, sy, sz, 1.0])
    ident = np.eye(4).tolist()
    sessions = []
    for k, d in enumerate(days_a):
        sha = hashlib.sha256(f"{patient_id}/{k}/{seed}".encode()).hexdigest()
        sessions.append(SessionRecord(
            session=f"ses-{k:02d}", days=float(d), shifted_date=None,
            source_sha256={ch: sha for ch in channels}, transform_to_reference=ident,
            registration_metric=0.0, native_shape=[int(grid[2]), int(grid[1]), int(grid[0])],
            native_affine=affine.tolist(), has_label=True,
        ))
    return PatientRecord(
        patient_id=patient_id, image=image, label=labels, days=days_a, channels=tuple(channels),
        spacing_mm=(sz, sy, sx), reference_affine=affine, sessions=sessions,
    )


def make_phantom_store(
    url: str,
    n_patients: int = 6,
    seed: int = 0,
    grid: tuple[int, int, int] = (32, 32, 32),
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    n_times: tuple[int, int] = (3, 5),
    gap_days: tuple[float, float] = (60.0, 200.0),
    r0_mm: tuple[float, float] = (4.0, 7.0),
    growth_mm_per_year: tuple[float, float] = (2.0, 5.0),
    channels: tuple[str, ...] = ("T1c", "FLAIR"),
    noise: float = 0.02,
) -> PhantomCohort:
    """Write ``n_patients`` growing-sphere phantoms to a new cohort store at ``url`` and return the truth.

    Per patient (all drawn from ``seed``): number of scans in ``n_times`` (inclusive), gaps between scans in
    ``gap_days`` (days), initial radius in ``r0_mm``, linear radial growth in ``growth_mm_per_year``, a fixed
    centre inside the brain. Patient ids are ``P000``, ``P001``, ...
    """
    from storage.store import CohortStore

    rng = np.random.default_rng(seed)
    store = CohortStore.open(url, create=True)
    cohort = PhantomCohort(url=url, grid=tuple(grid), spacing_mm=tuple(spacing_mm), channels=tuple(channels))
    vox_ml = cohort.voxel_volume_ml
    for i in range(n_patients):
        pid = f"P{i:03d}"
        t = int(rng.integers(n_times[0], n_times[1] + 1))
        days = np.concatenate([[0.0], np.cumsum(rng.uniform(*gap_days, size=t - 1))]).round(1)
        r0 = float(rng.uniform(*r0_mm))
        g = float(rng.uniform(*growth_mm_per_year))
        radii = [r0 + g * d / DAYS_PER_YEAR for d in days]
        # Keep the centre away from the brain edge by a third of the grid so the tumour stays inside.
        centre = tuple(float(rng.uniform(0.38 * n, 0.62 * n)) for n in grid)
        rec = phantom_record(pid, days, [centre] * t, radii, grid, spacing_mm, channels, noise,
                             seed=seed * 100_003 + i)
        store.write_patient(rec)
        cohort.patients[pid] = PhantomPatient(
            patient_id=pid, days=tuple(float(d) for d in days), centres_vox=tuple([centre] * t),
            radii_mm=tuple(float(r) for r in radii), growth_mm_per_year=g,
            whole_ml=tuple(float((lab > 0).sum()) * vox_ml for lab in rec.label),
            enhancing_ml=tuple(float((lab == 2).sum()) * vox_ml for lab in rec.label),
        )
    return cohort


@dataclass
class InMemoryPatient:
    """A ``PatientArrays``-like patient held in numpy (what ``data.context.PatientSeries`` reads), for tests and
    benchmarks that need no store. image (T, C, Z, Y, X) float32, label (T, Z, Y, X) uint8, days (T,) days since
    baseline, spacing_mm (z, y, x); treatments: ``TreatmentRecord``-like events."""

    image: np.ndarray
    label: np.ndarray
    days: np.ndarray
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0)
    channels: tuple[str, ...] = ("T1c",)
    patient_id: str = "phantom"
    treatments: list = field(default_factory=list)


def sphere_patient(radii_mm: Sequence[float], days: Sequence[float], grid: int = 100,
                   spacing_mm: float = 2.0) -> InMemoryPatient:
    """A centred spherical tumour of radius ``radii_mm[t]`` (enhancing core: half the radius) at ``days[t]`` in a
    cubic ``grid`` of ``spacing_mm`` voxels, inside a 90 mm brain; one T1c channel."""
    axis = (np.arange(grid) - grid / 2 + 0.5) * spacing_mm
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    label = np.stack([np.where(r <= rad, np.where(r <= rad / 2, 2, 1), 0) for rad in radii_mm]).astype(np.uint8)
    image = (label[:, None] * 0.5 + (r <= 90)[None, None]).astype(np.float32)
    return InMemoryPatient(image=image, label=label, days=np.asarray(days, np.float64),
                           spacing_mm=(spacing_mm,) * 3)
