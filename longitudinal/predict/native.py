"""Reference grid -> the native grid of a stored session, and NIfTI writing on that grid.

The store keeps, per session, ``transform_to_reference`` (native RAS point -> reference RAS point), the
native grid's shape (x, y, z) and affine (voxel -> RAS mm). Resampling onto the native grid needs, for every
native voxel centre, the reference point it sees: exactly ``transform_to_reference``, which is what ITK's
resampler wants (output point -> input point), expressed in LPS. So "inverting the registration" means
pulling reference-space values through the forward matrix; no matrix inverse is taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from longitudinal.registration.geometry import (
    grid_from_affine,
    image_on_grid,
    matrix_to_transform,
    ras_to_lps,
)
from longitudinal.registration.rigid import resample_onto


def paste(full: np.ndarray, part: np.ndarray, start: Sequence[int]) -> None:
    """Write crop ``part`` (..., D, H, W) into ``full`` (..., Z, Y, X) at voxel ``start`` (z, y, x), in place;
    the parts of the crop outside the grid are dropped (crops may hang over the border, see data.crops)."""
    dst, src = [], []
    for s0, n, dim in zip(start, part.shape[-3:], full.shape[-3:], strict=True):
        lo, hi = max(int(s0), 0), min(int(s0) + n, dim)
        hi = max(lo, hi)
        dst.append(slice(lo, hi))
        src.append(slice(lo - int(s0), hi - int(s0)))
    full[(..., *dst)] = part[(..., *src)]


class NativeResampler:
    """Maps (Z, Y, X) volumes on the reference grid onto one session's native grid.

    reference_affine: 4x4 voxel (x, y, z) -> RAS mm of the store grid; reference_shape_zyx: store grid shape.
    native_affine / native_shape_xyz: the session's NIfTI geometry. transform_to_reference: 4x4 RAS map.
    """

    def __init__(self, reference_affine: np.ndarray, reference_shape_zyx: Sequence[int], native_affine: np.ndarray,
                 native_shape_xyz: Sequence[int], transform_to_reference: np.ndarray) -> None:
        self.reference = grid_from_affine(np.asarray(reference_affine, float),
                                          tuple(int(v) for v in reversed(tuple(reference_shape_zyx))))
        self.native_affine = np.asarray(native_affine, dtype=np.float64)
        self.native_shape = tuple(int(v) for v in native_shape_xyz)
        self.native = grid_from_affine(self.native_affine, self.native_shape)  # type: ignore[arg-type]
        self.transform = matrix_to_transform(ras_to_lps(np.asarray(transform_to_reference, float)))

    def to_native(self, volume_zyx: np.ndarray) -> np.ndarray:
        """Linear resampling of one reference-grid volume; returns NIfTI order (x, y, z) float32, 0 outside."""
        image = image_on_grid(np.asarray(volume_zyx, dtype=np.float32), self.reference)
        out = resample_onto(image, self.native, self.transform)
        return np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0)), dtype=np.float32)

    def save(self, volume_xyz: np.ndarray, path: Path) -> Path:
        """Write a native-order volume as NIfTI with the native affine (qform and sform both set, code 1)."""
        import nibabel as nib

        if tuple(volume_xyz.shape) != self.native_shape:
            raise ValueError(f"volume {volume_xyz.shape} does not match the native grid {self.native_shape}")
        img = nib.Nifti1Image(volume_xyz.astype(np.float32), self.native_affine)
        img.set_qform(self.native_affine, code=1)
        img.set_sform(self.native_affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
        return path
