"""Rigid head motion: 4x4 RAS-mm matrices M with p_moved = M @ p_true, and resampling that applies them.

The header affine never changes: moving the head moves the image CONTENT on the fixed nominal grid, so a
registration step is needed to bring visits back into one space.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def rotation_matrix(angles_deg: np.ndarray | list[float]) -> np.ndarray:
    """3x3 rotation R = Rz @ Ry @ Rx from angles (degrees) about the x, y and z axes (RAS)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_matrix(angles_deg: np.ndarray | list[float], translation_mm: np.ndarray | list[float],
                 centre_mm: np.ndarray | list[float]) -> np.ndarray:
    """4x4 RAS-mm rigid motion: rotate about ``centre_mm`` (mm), then translate by ``translation_mm`` (mm).

    p_moved = R (p_true - centre) + centre + translation.
    """
    r = rotation_matrix(angles_deg)
    centre = np.asarray(centre_mm, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = centre - r @ centre + np.asarray(translation_mm, dtype=np.float64)
    return m


def random_motion(rng: np.random.Generator, max_rotation_deg: float, max_translation_mm: float,
                  centre_mm: np.ndarray) -> np.ndarray:
    """A random rigid 4x4 motion: each angle uniform in +-max_rotation_deg, each shift in +-max_translation_mm."""
    angles = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
    shift = rng.uniform(-max_translation_mm, max_translation_mm, size=3)
    return rigid_matrix(angles, shift, centre_mm)


def apply_motion(volume: np.ndarray, affine: np.ndarray, motion: np.ndarray, order: int = 1,
                 cval: float = 0.0) -> np.ndarray:
    """Move the content of ``volume`` by ``motion`` on its own (unchanged) grid.

    volume: (x, y, z) voxels; affine: its 4x4 voxel -> RAS mm; motion: 4x4 RAS mm, p_moved = motion @ p_true.
    Returns out with out(p) = volume(motion^-1 p), same shape and dtype family (float32 for floats).
    order: spline order of the interpolation (0 nearest, 1 linear, 3 cubic). cval fills exposed voxels.
    To undo a motion M, apply inv(M).
    """
    affine = np.asarray(affine, dtype=np.float64)
    motion = np.asarray(motion, dtype=np.float64)
    problems = []
    if volume.ndim != 3:
        problems.append(f"volume must be 3-D (x, y, z), got shape {volume.shape}")
    if affine.shape != (4, 4) or motion.shape != (4, 4):
        problems.append(f"affine and motion must be 4x4, got {affine.shape} and {motion.shape}")
    if problems:
        raise ValueError("apply_motion: " + "; ".join(problems))
    # Output voxel v sits at p = A v; it shows the true point M^-1 A v, i.e. input voxel A^-1 M^-1 A v.
    vox = np.linalg.inv(affine) @ np.linalg.inv(motion) @ affine
    out_dtype = np.float32 if np.issubdtype(volume.dtype, np.floating) else volume.dtype
    return ndimage.affine_transform(
        volume, vox[:3, :3], offset=vox[:3, 3], order=order, mode="constant", cval=cval, output=out_dtype
    )


def undo_motion(volume: np.ndarray, affine: np.ndarray, motion: np.ndarray, order: int = 1,
                cval: float = 0.0) -> np.ndarray:
    """Inverse of :func:`apply_motion`: bring a moved ``volume`` back to the true (unmoved) position."""
    return apply_motion(volume, affine, np.linalg.inv(np.asarray(motion, dtype=np.float64)), order, cval)
