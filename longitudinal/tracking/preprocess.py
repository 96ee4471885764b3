"""Native scans -> one patient's series on its baseline grid, for the pyfunc model and ``Forecaster``.

This mirrors ingest: the baseline (first) scan defines an RAS-aligned grid at the model's isotropic spacing
(``longitudinal.registration.geometry.ras_grid``: reorientation and resampling in one interpolation); every
other scan is rigidly registered to the baseline with the recipe of DESIGN.md (Mattes MI 50 bins, 10% random
sampling, RegularStepGradientDescent, shrink 4/2/1, smoothing 2/1/0, scales from physical shift,
geometry-centred initialisation); images are resampled linearly, labels nearest-neighbour; each channel is then
normalised per scan (1st-99th percentile within the head mask -> [0, 1]).

Arrays are returned in store orientation, (z, y, x) with i = x along R, j = y along A, k = z along S.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from longitudinal.registration.geometry import ras_affine, ras_grid

Scan = tuple[dict[str, str], str | None]  # (channel -> path, label path or None)


def normalise(volume: np.ndarray) -> np.ndarray:
    """Clip to the 1st-99th percentile inside the head mask (voxels > 0) and scale to [0, 1]; zero outside."""
    head = volume > 0
    if not head.any():
        return np.zeros_like(volume, dtype=np.float32)
    lo, hi = np.percentile(volume[head], [1, 99])
    out = np.clip((volume - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    out[~head] = 0
    return out


def register_rigid(fixed: sitk.Image, moving: sitk.Image, seed: int = 0) -> sitk.Transform:
    """Rigid transform mapping fixed-space points to moving-space points (ITK convention)."""
    init = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-4, numberOfIterations=200, gradientMagnitudeTolerance=1e-8
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def series_to_baseline(
    scans: Sequence[Scan], channels: Sequence[str], spacing_mm: float, register_channel: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Scans (time order, first = baseline) -> (images (T,C,Z,Y,X) float32, labels (T,Z,Y,X) uint8,
    has_label (T,) bool, baseline-grid affine 4x4 RAS mm, spacing (z, y, x) mm)."""
    first = sitk.ReadImage(scans[0][0][register_channel], sitk.sitkFloat32)
    grid = ras_grid(first, spacing_mm)
    fixed = sitk.Resample(first, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    images, labels, has_label = [], [], []
    for t, (paths, label) in enumerate(scans):
        moving = first if t == 0 else sitk.ReadImage(paths[register_channel], sitk.sitkFloat32)
        tx = sitk.Transform() if t == 0 else register_rigid(fixed, moving)
        chans = []
        for c in channels:
            img = moving if c == register_channel else sitk.ReadImage(paths[c], sitk.sitkFloat32)
            res = sitk.Resample(img, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            chans.append(normalise(sitk.GetArrayFromImage(res)))
        images.append(np.stack(chans))
        if label:
            lab = sitk.Resample(sitk.ReadImage(label, sitk.sitkUInt8), grid, tx, sitk.sitkNearestNeighbor, 0,
                                sitk.sitkUInt8)
            labels.append(sitk.GetArrayFromImage(lab).astype(np.uint8))
        else:
            labels.append(np.zeros(images[-1].shape[1:], np.uint8))
        has_label.append(bool(label))
    sp = grid.GetSpacing()
    return (np.stack(images), np.stack(labels), np.asarray(has_label), ras_affine(grid),
            (float(sp[2]), float(sp[1]), float(sp[0])))
