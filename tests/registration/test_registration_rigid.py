"""Registration on phantoms with exactly known motion, and the LPS/RAS geometry it relies on."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from longitudinal.registration.geometry import (
    grid_from_affine,
    lps_to_ras,
    matrix_to_transform,
    ras_affine,
    ras_grid,
    ras_to_lps,
    transform_to_matrix,
)
from longitudinal.registration.rigid import (
    RegistrationConfig,
    qc_metric,
    register,
    registration_qc,
    resample_onto,
)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r = np.eye(4)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def _phantom(spacing: float = 2.0) -> sitk.Image:
    """A textured ellipsoidal 'head' with an off-centre blob, RAS-aligned grid (LPS direction diag(-1,-1,1))."""
    rng = np.random.default_rng(0)
    n = (56, 64, 52)  # (x, y, z) voxels at 2 mm
    z, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in n[::-1]], indexing="ij")
    c = np.array(n[::-1]) / 2
    r = np.sqrt(((z - c[0]) / 20) ** 2 + ((y - c[1]) / 26) ** 2 + ((x - c[2]) / 22) ** 2)
    img = (r < 1) * 1.0 + (r < 0.6) * 0.6 + 0.9 * (((z - 20) ** 2 + (y - 38) ** 2 + (x - 33) ** 2) < 30)
    img = gaussian_filter(img * (1 + 1.5 * gaussian_filter(rng.normal(size=img.shape), 2)), 1).astype(np.float32)
    im = sitk.GetImageFromArray(img)
    im.SetSpacing((spacing,) * 3)
    im.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    im.SetOrigin((55.0, 63.0, -51.0))
    return im


def _move(image: sitk.Image, motion_ras: np.ndarray) -> sitk.Image:
    """Content moved by motion_ras (p_moved = M p_true) on the same grid: out(p) = in(M^-1 p)."""
    inv = matrix_to_transform(ras_to_lps(np.linalg.inv(motion_ras)))
    return sitk.Resample(image, image, inv, sitk.sitkLinear, 0.0)


@pytest.mark.parametrize(
    ("angles", "shift"),
    [((6.0, 0.0, -5.0), (5.0, -4.0, 3.0)), ((0.0, -7.0, 3.0), (-6.0, 2.0, 7.0))],
)
def test_rigid_registration_recovers_known_motion(angles, shift):
    fixed = _phantom()
    motion = _rotation(0, angles[0]) @ _rotation(1, angles[1]) @ _rotation(2, angles[2])
    motion[:3, 3] = shift
    moving = _move(fixed, motion)
    result = register(fixed, moving)
    # Estimated native->reference map must equal M^-1 on the head.
    arr = sitk.GetArrayFromImage(fixed)
    vox = np.argwhere(arr > 0.3)[:, ::-1]
    pts = np.c_[vox, np.ones(len(vox))] @ ras_affine(fixed).T
    estimated = pts @ np.linalg.inv(result.to_reference_ras).T
    truth = pts @ motion.T
    tre = np.linalg.norm(estimated[:, :3] - truth[:, :3], axis=1)
    assert tre.mean() < 0.5 and tre.max() < 1.0, (tre.mean(), tre.max())
    moved_back = sitk.GetArrayFromImage(resample_onto(moving, fixed, result.transform))
    unregistered = sitk.GetArrayFromImage(resample_onto(moving, fixed, None))
    assert qc_metric(arr, moved_back) < 0.02 < qc_metric(arr, unregistered)


def test_affine_option_recovers_scaling():
    fixed = _phantom()
    motion = _rotation(2, 4.0)
    motion[:3, :3] = motion[:3, :3] @ np.diag([1.04, 0.97, 1.0])
    motion[:3, 3] = (3.0, -2.0, 1.0)
    moving = _move(fixed, motion)
    result = register(fixed, moving, RegistrationConfig(kind="affine"))
    est = np.linalg.inv(result.to_reference_ras)
    assert np.allclose(est[:3, :3], motion[:3, :3], atol=0.02)


def test_ras_affine_matches_nibabel(tmp_path):
    affine = np.array([[0.0, -1.5, 0.0, 90.0], [0.0, 0.0, 2.0, -120.0], [-1.2, 0.0, 0.0, 70.0], [0, 0, 0, 1]])
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), affine), path)
    image = sitk.ReadImage(str(path))
    assert np.allclose(ras_affine(image), affine, atol=1e-5)
    grid = grid_from_affine(affine, (5, 6, 7))
    assert np.allclose(ras_affine(grid), affine, atol=1e-6)


def test_ras_grid_is_ras_aligned_and_covers_the_image():
    image = sitk.Image([10, 12, 8], sitk.sitkFloat32)
    image.SetSpacing((1.0, 1.0, 3.0))
    image.SetDirection((1, 0, 0, 0, 0, 1, 0, 1, 0))  # LPS-ish, permuted axes
    grid = ras_grid(image, 2.0)
    aff = ras_affine(grid)
    assert np.allclose(aff[:3, :3], np.diag([2.0, 2.0, 2.0]))
    assert grid.GetSize() == (5, 12, 6)  # extents 10, 24, 12 mm along R, A, S


def test_lps_ras_conversion_round_trip():
    m = _rotation(1, 10.0)
    m[:3, 3] = (1.0, 2.0, 3.0)
    assert np.allclose(ras_to_lps(lps_to_ras(m)), m)
    tx = matrix_to_transform(m)
    assert np.allclose(transform_to_matrix(tx), m)
    # A pure RAS shift of +x (toward Right) is a -x shift in LPS.
    shift = np.eye(4)
    shift[0, 3] = 5.0
    assert ras_to_lps(shift)[0, 3] == -5.0


def test_qc_metric_known_answers():
    rng = np.random.default_rng(1)
    a = rng.uniform(1, 2, size=(8, 8, 8))
    assert qc_metric(a, 3 * a + 1) == pytest.approx(0.0, abs=1e-9)
    assert qc_metric(a, -a) == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="equal shapes"):
        qc_metric(a, a[:4])


def test_config_rejects_bad_choices_all_at_once():
    with pytest.raises(ValueError) as err:
        RegistrationConfig(kind="bspline", shrink_factors=(4, 2), samples=(0, 10, 10), metrics=("ncc",) * 3)
    msg = str(err.value)
    assert "'rigid', 'affine'" in msg and "same length" in msg and "samples" in msg and "metrics" in msg


def test_registration_qc_ignores_bias_but_catches_misregistration():
    """A strong smooth bias field on a perfectly aligned scan must pass QC; a 4 mm shift must fail it."""
    fixed = _phantom()
    arr = sitk.GetArrayFromImage(fixed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in arr.shape], indexing="ij")
    biased = sitk.GetImageFromArray((arr * np.exp(0.6 * x - 0.5 * z + 0.4 * y * z)).astype(np.float32))
    biased.CopyInformation(fixed)
    shift = np.eye(4)
    shift[0, 3] = 4.0
    misregistered = _move(biased, shift)
    limit = RegistrationConfig().qc_max_metric
    assert registration_qc(fixed, biased) < limit < registration_qc(fixed, misregistered)
    # On raw intensities the aligned-but-biased scan already scores far worse than after the high-pass.
    raw = RegistrationConfig(highpass_sigma_mm=None)
    assert registration_qc(fixed, biased) < 0.5 * registration_qc(fixed, biased, raw)

