"""Synthetic patient records with known content for the cohort-store tests (no downloads).

A plain module (not conftest) so crash-test subprocesses can import it too.
"""

from __future__ import annotations

import numpy as np

from storage.schema import PatientRecord, SessionRecord

GRID = (12, 14, 10)  # (z, y, x) voxels: small, and deliberately not a multiple of any chunk size


def make_session(i: int, days: float, seed: int = 0) -> SessionRecord:
    """A session record whose content hash depends on (seed, i)."""
    return SessionRecord(
        session=f"ses-{i:02d}",
        days=float(days),
        shifted_date=f"2031-{(i % 12) + 1:02d}-15",
        source_sha256={"T1c": f"t1c-{seed}-{i}", "FLAIR": f"flair-{seed}-{i}", "label": f"lab-{seed}-{i}"},
        transform_to_reference=np.eye(4).tolist(),
        registration_metric=-0.5 - 0.01 * i,
        native_shape=[GRID[2], GRID[1], GRID[0]],
        native_affine=np.diag([2.0, 2.0, 2.0, 1.0]).tolist(),
        has_label=True,
        qc_flags=[],
    )


def make_record(
    pid: str = "p001",
    days: tuple[float, ...] = (0.0, 45.5, 120.0),
    seed: int = 0,
    grid: tuple[int, int, int] = GRID,
    channels: tuple[str, ...] = ("T1c", "FLAIR"),
) -> PatientRecord:
    """A patient with T=len(days) sessions of random images and labels in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    t, c = len(days), len(channels)
    image = rng.normal(size=(t, c, *grid)).astype(np.float32)
    image[:, :, :2] = 0.0  # exact zeros must survive (no fill-value masking by readers)
    label = rng.integers(0, 3, size=(t, *grid)).astype(np.uint8)
    affine = np.array([[2.0, 0, 0, -10.0], [0, 2.0, 0, -14.0], [0, 0, 2.0, -12.0], [0, 0, 0, 1]])
    return PatientRecord(
        patient_id=pid,
        image=image,
        label=label,
        days=np.asarray(days, dtype=np.float64),
        channels=channels,
        spacing_mm=(2.0, 2.0, 2.0),
        reference_affine=affine,
        sessions=[make_session(i, d, seed) for i, d in enumerate(days)],
    )
