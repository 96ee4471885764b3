"""Geometry helpers between SimpleITK (LPS physical space) and the store's NIfTI convention (RAS mm).

ITK's physical space is LPS: x grows to the patient's Left, y to Posterior. NIfTI/nibabel is RAS. The two differ
by ``FLIP = diag(-1, -1, 1, 1)``, which is its own inverse, so a 4x4 point map ``M_lps`` is ``FLIP @ M_ras @ FLIP``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(image: sitk.Image) -> np.ndarray:
    """4x4 voxel (i, j, k) -> RAS mm affine of a 3D SimpleITK image (the NIfTI ``affine``)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return FLIP @ lps


def transform_to_matrix(transform: sitk.Euler3DTransform | sitk.AffineTransform) -> np.ndarray:
    """4x4 LPS point map of a matrix-offset transform: ``p -> A (p - c) + t + c``."""
    a = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=float)
    translation = np.asarray(transform.GetTranslation(), dtype=float)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = translation + center - a @ center
    return out


def matrix_to_transform(matrix_lps: np.ndarray) -> sitk.AffineTransform:
    """SimpleITK affine transform applying a 4x4 LPS point map."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(np.asarray(matrix_lps[:3, :3], dtype=float).ravel().tolist())
    tx.SetTranslation(np.asarray(matrix_lps[:3, 3], dtype=float).tolist())
    return tx


def lps_to_ras(matrix_lps: np.ndarray) -> np.ndarray:
    """A 4x4 point map in LPS coordinates expressed in RAS coordinates."""
    return FLIP @ np.asarray(matrix_lps, dtype=float) @ FLIP


def ras_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """A 4x4 point map in RAS coordinates expressed in LPS coordinates."""
    return FLIP @ np.asarray(matrix_ras, dtype=float) @ FLIP


def ras_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """An empty float32 grid, axes aligned with R, A, S, at isotropic ``spacing_mm``, covering the physical
    extent of ``image`` (all 8 voxel-corner points). Resampling onto it reorients to RAS and resamples at once,
    so the data is interpolated a single time."""
    size = np.asarray(image.GetSize())
    corners_vox = np.array([[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5)
                            for z in (-0.5, size[2] - 0.5)])
    aff = ras_affine(image)
    corners = corners_vox @ aff[:3, :3].T + aff[:3, 3]
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    n = np.maximum(1, np.round((hi - lo) / spacing_mm).astype(int))
    origin_ras = lo + spacing_mm / 2.0
    grid = sitk.Image([int(v) for v in n], sitk.sitkFloat32)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    grid.SetOrigin((float(-origin_ras[0]), float(-origin_ras[1]), float(origin_ras[2])))
    return grid


def grid_from_affine(affine_ras: np.ndarray, size_xyz: tuple[int, int, int]) -> sitk.Image:
    """An empty float32 SimpleITK grid whose voxel -> RAS mm map is ``affine_ras`` and size is (x, y, z)."""
    lps = FLIP @ np.asarray(affine_ras, dtype=float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    grid = sitk.Image([int(v) for v in size_xyz], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    grid.SetOrigin(lps[:3, 3].tolist())
    return grid


def image_on_grid(array_zyx: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """A SimpleITK image with voxels ``array_zyx`` ((z, y, x), as stored) and the geometry of ``grid``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    image.CopyInformation(grid)
    return image
