"""Rigid motion: matrices, the direction convention p_moved = M @ p_true, and undoing it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from longitudinal.synth.motion import apply_motion, random_motion, rigid_matrix, rotation_matrix, undo_motion

AFFINE = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -50.0], [0, 0, 2.0, -30.0], [0, 0, 0, 1]])
SHAPE = (40, 50, 30)


def _blob(centre_vox: tuple[float, float, float], sigma: float = 2.5) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij")
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre_vox, strict=True))
    return np.exp(-r2 / (2 * sigma**2)).astype(np.float32)


@pytest.mark.parametrize(
    ("angles", "shift"),
    [((0, 0, 0), (5, 0, 0)), ((0, 0, 10), (0, 0, 0)), ((3, -4, 2), (2, -3, 4)), ((-5, 5, -5), (0, 6, -2))],
)
def test_content_moves_to_motion_times_true_position(angles: tuple, shift: tuple) -> None:
    m = rigid_matrix(angles, shift, centre_mm=[0.0, 0.0, 0.0])
    true_vox = (18.0, 22.0, 14.0)
    moved = apply_motion(_blob(true_vox), AFFINE, m, order=1)
    got_vox = np.array(ndimage.center_of_mass(moved))
    got_mm = (AFFINE @ np.r_[got_vox, 1.0])[:3]
    want_mm = (m @ AFFINE @ np.r_[true_vox, 1.0])[:3]
    np.testing.assert_allclose(got_mm, want_mm, atol=0.2)


def test_rotation_is_orthonormal_and_rigid_keeps_its_centre() -> None:
    r = rotation_matrix([4, -3, 7])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    centre = np.array([10.0, -5.0, 3.0])
    m = rigid_matrix([4, -3, 7], [0, 0, 0], centre)
    np.testing.assert_allclose(m @ np.r_[centre, 1.0], np.r_[centre, 1.0], atol=1e-12)


def test_undo_restores_the_image() -> None:
    rng = np.random.default_rng(1)
    image = ndimage.gaussian_filter(rng.normal(size=SHAPE), 3).astype(np.float32)
    centre = (AFFINE @ np.r_[(np.array(SHAPE) - 1) / 2, 1.0])[:3]
    m = random_motion(rng, 5.0, 5.0, centre)
    moved = apply_motion(image, AFFINE, m, order=3)
    back = undo_motion(moved, AFFINE, m, order=3)
    inner = (slice(8, -8),) * 3  # voxels that never left the field of view
    corr_back = np.corrcoef(back[inner].ravel(), image[inner].ravel())[0, 1]
    corr_moved = np.corrcoef(moved[inner].ravel(), image[inner].ravel())[0, 1]
    assert corr_back > 0.99
    assert corr_moved < corr_back - 0.05  # the motion was real


def test_bad_shapes_are_reported_together() -> None:
    with pytest.raises(ValueError) as err:
        apply_motion(np.zeros((4, 4)), np.eye(3), np.eye(4))
    assert "3-D" in str(err.value) and "4x4" in str(err.value)
