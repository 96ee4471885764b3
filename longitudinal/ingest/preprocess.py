"""Preprocessing: reorient to RAS + resample to the target spacing (one interpolation), and intensity
normalisation per channel.

Normalisation (per channel, per session, on the reference grid):
1. head mask = voxels above 10 % of the volume's 99th percentile (MRI background is near zero);
2. p1, p99 = 1st and 99th percentiles of the voxels inside the mask;
3. x -> clip((x - p1) / (p99 - p1), 0, 1). Background therefore maps to 0 and the head to [0, 1].
The result is float32 in [0, 1]; a constant head (p99 == p1) maps to 0.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from longitudinal.registration.geometry import ras_grid
from longitudinal.registration.rigid import resample_onto

HEAD_FRACTION = 0.10
LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0


def to_ras(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """``image`` resampled (linear) onto an RAS-aligned grid of isotropic ``spacing_mm`` covering it."""
    return resample_onto(image, ras_grid(image, spacing_mm), None)


def head_mask(data: np.ndarray) -> np.ndarray:
    """Boolean head mask: voxels above HEAD_FRACTION of the volume's 99th percentile (any shape)."""
    hi = float(np.percentile(data, HIGH_PERCENTILE))
    return data > HEAD_FRACTION * hi if hi > 0 else data > data.min()


def normalise(data: np.ndarray) -> np.ndarray:
    """Percentile-clip and scale one channel to [0, 1] within the head mask (module docstring). float32."""
    data = np.asarray(data, dtype=np.float32)
    mask = head_mask(data)
    if not mask.any():
        return np.zeros_like(data)
    lo, hi = np.percentile(data[mask], [LOW_PERCENTILE, HIGH_PERCENTILE])
    if hi <= lo:
        return np.zeros_like(data)
    # In float32 and in place: a float64 round trip would cost three full-volume temporaries for differences
    # below float32's own rounding.
    out = np.subtract(data, np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)
