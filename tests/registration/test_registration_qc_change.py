"""Registration QC tells a change of the patient from a misregistration: a scan whose tumour grew past 150 ml, or
whose tumour was resected, moved by a known motion, under another scanner gain and bias field, registered as
ingest registers it, passes QC; the same registration spoiled by 4 mm or 4 degrees fails it."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from longitudinal.ingest.preprocess import normalise
from longitudinal.registration.geometry import matrix_to_transform, ras_affine, ras_to_lps
from longitudinal.registration.rigid import (
    RegistrationConfig,
    qc_exclusion,
    register,
    registration_qc,
    resample_onto,
)

SPACING = 2.0
SHAPE = (64, 80, 64)  # (z, y, x) voxels: a 128 x 160 x 128 mm field of view
CENTRE = (np.array(SHAPE) - 1) / 2.0
LESION = CENTRE + np.array([4.0, 6.0, 5.0])  # voxel (z, y, x) the tumour grows from


def _anatomy() -> np.ndarray:
    """A textured head (z, y, x): scalp, brain, two dark ventricles, tissue texture of a few mm."""
    rng = np.random.default_rng(11)
    z, y, x = np.indices(SHAPE).astype(np.float64)
    r = np.sqrt(((z - CENTRE[0]) / 28) ** 2 + ((y - CENTRE[1]) / 35) ** 2 + ((x - CENTRE[2]) / 28) ** 2)
    img = (r < 1) * 450.0 + (r < 0.88) * 350.0
    for side in (-1, 1):
        v = np.sqrt(((z - CENTRE[0] - 2) / 5) ** 2 + ((y - CENTRE[1] + 4) / 12) ** 2
                    + ((x - CENTRE[2] - 5 * side) / 3) ** 2)
        img = np.where(v < 1, 120.0, img)
    # Tissue texture on the scale of a few mm, as folded cortex and sulci give a brain scan once high-passed.
    texture = gaussian_filter(rng.normal(size=SHAPE), 0.7)
    return img * np.clip(1 + 0.5 * texture / texture.std(), 0.2, None) * (r < 1)


def _scan(anatomy: np.ndarray, tumour_mm: float, cavity_mm: float, motion_ras: np.ndarray, gain: float,
          bias_seed: int) -> tuple[sitk.Image, sitk.Image]:
    """One session: an enhancing tumour of radius ``tumour_mm`` (0: none) with a necrotic core, or a fluid cavity
    of radius ``cavity_mm`` where it was resected; its label (1 on the tumour); content moved by ``motion_ras``
    (p_moved = M p), intensities times ``gain`` and a smooth bias field. RAS-aligned grid (LPS direction
    diag(-1, -1, 1)). Returns (image, label), both normalised/uint8 as ingest stores them."""
    z, y, x = np.indices(SHAPE).astype(np.float64)
    d = np.sqrt((z - LESION[0]) ** 2 + (y - LESION[1]) ** 2 + (x - LESION[2]) ** 2) * SPACING
    img, label = anatomy.copy(), np.zeros(SHAPE, np.uint8)
    if tumour_mm:
        img = np.where(d <= tumour_mm, np.where(d <= 0.6 * tumour_mm, 250.0, 1300.0), img)
        label[d <= tumour_mm] = 1
    if cavity_mm:
        img = np.where(d <= cavity_mm, 60.0, img)
    rng = np.random.default_rng(bias_seed)
    a = rng.normal(0, 0.25, 3)
    bias = np.exp(a[0] * (z / SHAPE[0] - 0.5) + a[1] * (y / SHAPE[1] - 0.5) ** 2 + a[2] * (x / SHAPE[2] - 0.5))
    img = gaussian_filter(img * bias * gain, 0.6) + np.abs(rng.normal(0, 8.0, SHAPE))

    def on_grid(arr: np.ndarray) -> sitk.Image:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((SPACING,) * 3)
        im.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        im.SetOrigin((63.0, 79.0, -63.0))
        return im

    image, lab = on_grid(img.astype(np.float32)), on_grid(label)
    inv = matrix_to_transform(ras_to_lps(np.linalg.inv(motion_ras)))
    moved = sitk.Resample(image, image, inv, sitk.sitkLinear, 0.0)
    moved_label = sitk.Resample(lab, lab, inv, sitk.sitkNearestNeighbor, 0)
    normalised = sitk.GetImageFromArray(normalise(sitk.GetArrayFromImage(moved)))
    normalised.CopyInformation(moved)
    return normalised, moved_label


def _motion(angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = shift_mm
    return m


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"tumour_mm": 12.0, "cavity_mm": 0.0}, {"tumour_mm": 34.0, "cavity_mm": 0.0}),  # 7 ml -> 165 ml
        ({"tumour_mm": 22.0, "cavity_mm": 0.0}, {"tumour_mm": 0.0, "cavity_mm": 28.0}),  # resected, 92 ml cavity
    ],
    ids=["growth past 150 ml", "post-operative"],
)
def test_changed_scan_passes_qc_once_registered_and_a_4mm_or_4deg_spoil_fails(before, after):
    config = RegistrationConfig()
    anatomy = _anatomy()
    fixed, fixed_label = _scan(anatomy, **before, motion_ras=np.eye(4), gain=1.0, bias_seed=1)
    motion = _motion((4.0, -3.0, 5.0), (3.0, -4.0, 2.5))
    moving, moving_label = _scan(anatomy, **after, motion_ras=motion, gain=1.8, bias_seed=2)

    result = register(fixed, moving, config)
    # Registered, not just scored: the recovered map is the known motion to well under a voxel in the head.
    head = np.argwhere(sitk.GetArrayViewFromImage(fixed) > 0.2)
    pts = np.c_[head[:, ::-1], np.ones(len(head))] @ ras_affine(fixed).T
    error = np.linalg.norm((pts @ np.linalg.inv(result.to_reference_ras).T - pts @ motion.T)[:, :3], axis=1)
    assert error.max() < 1.0, (error.mean(), error.max())

    centre = fixed.TransformContinuousIndexToPhysicalPoint(head[:, ::-1].mean(axis=0).tolist())
    spoils = {
        "registered": result.transform,
        "shifted 4 mm": sitk.CompositeTransform([result.transform, sitk.TranslationTransform(3, (4.0, 0, 0))]),
        "rotated 4 deg": sitk.CompositeTransform(
            [result.transform, sitk.Euler3DTransform(centre, 0.0, 0.0, float(np.deg2rad(4.0)))]),
    }
    scores = {}
    for name, tx in spoils.items():
        moved = resample_onto(moving, fixed, tx)
        moved_label = sitk.GetArrayFromImage(resample_onto(moving_label, fixed, tx, label=True))
        exclude = qc_exclusion([sitk.GetArrayFromImage(fixed_label), moved_label], (SPACING,) * 3,
                               config.qc_exclude_margin_mm)
        scores[name] = registration_qc(fixed, moved, config, exclude)
    limit = config.qc_max_metric
    assert scores["registered"] < limit < min(scores["shifted 4 mm"], scores["rotated 4 deg"]), scores
