"""Native scans -> one patient's series on its baseline grid, exactly as ingest does it.

The functions are ingest's and registration's own (``longitudinal.ingest.preprocess``,
``longitudinal.registration``): the baseline (first) scan's registration channel defines an RAS-aligned grid at
the model's isotropic spacing (reorientation + resampling in one interpolation); every later scan's registration
channel, reoriented, is rigidly registered to the normalised baseline; every channel is resampled (linear,
labels nearest) through that transform onto the grid and normalised per channel (1st-99th percentile within the
head mask -> [0, 1]).

Arrays are returned in store orientation, (z, y, x) with i = x along R, j = y along A, k = z along S.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from longitudinal.ingest.preprocess import normalise, to_ras
from longitudinal.registration.geometry import image_on_grid, ras_affine, ras_grid
from longitudinal.registration.rigid import register, resample_onto

Scan = tuple[dict[str, str], str | None]  # (channel -> path, label path or None)


def series_to_baseline(
    scans: Sequence[Scan], channels: Sequence[str], spacing_mm: float, register_channel: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Scans (time order, first = baseline) -> (images (T,C,Z,Y,X) float32 in [0, 1], labels (T,Z,Y,X) uint8,
    has_label (T,) bool, baseline-grid affine 4x4 voxel -> RAS mm, spacing (z, y, x) mm)."""
    first = sitk.ReadImage(scans[0][0][register_channel], sitk.sitkFloat32)
    grid = ras_grid(first, spacing_mm)
    fixed = image_on_grid(normalise(sitk.GetArrayFromImage(resample_onto(first, grid, None))), grid)
    images, labels, has_label = [], [], []
    for t, (paths, label) in enumerate(scans):
        transform = None
        if t > 0:
            moving = to_ras(sitk.ReadImage(paths[register_channel], sitk.sitkFloat32), spacing_mm)
            transform = register(fixed, moving).transform
        images.append(np.stack([
            normalise(sitk.GetArrayFromImage(resample_onto(sitk.ReadImage(paths[c], sitk.sitkFloat32), grid,
                                                           transform)))
            for c in channels
        ]))
        if label:
            lab = resample_onto(sitk.ReadImage(label, sitk.sitkUInt8), grid, transform, label=True)
            labels.append(sitk.GetArrayFromImage(lab).astype(np.uint8))
        else:
            labels.append(np.zeros(images[-1].shape[1:], np.uint8))
        has_label.append(bool(label))
    sx, sy, sz = grid.GetSpacing()
    return (np.stack(images), np.stack(labels), np.asarray(has_label), ras_affine(grid),
            (float(sz), float(sy), float(sx)))
