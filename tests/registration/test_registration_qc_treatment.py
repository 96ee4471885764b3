"""Registration QC after treatment: a perfectly aligned post-operative scan (tumour gone, a cavity in its place)
is judged on the anatomy that should not change, and misalignment is still caught."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from longitudinal.registration.rigid import RegistrationConfig, qc_exclusion, registration_qc

SPACING = 2.0
SHAPE = (48, 56, 48)  # (z, y, x)


def _head(tumour: bool, cavity: bool, shift_vox: int = 0) -> tuple[sitk.Image, np.ndarray]:
    """A textured head (z, y, x) with a bright tumour, or a dark cavity where the tumour and a margin were, and
    its label (1 where the tumour is). ``shift_vox`` moves the content along x (a misregistration)."""
    rng = np.random.default_rng(3)
    z, y, x = np.indices(SHAPE).astype(np.float64)
    r = np.sqrt(((z - 24) / 20) ** 2 + ((y - 28) / 24) ** 2 + ((x - 24) / 20) ** 2)
    img = (r < 1) * 600.0 + (r < 0.6) * 250.0
    img *= 1 + 0.5 * gaussian_filter(rng.normal(size=SHAPE), 1.2)
    lesion = np.sqrt((z - 22) ** 2 + (y - 34) ** 2 + (x - 30) ** 2)
    label = (lesion <= 7).astype(np.uint8) if tumour else np.zeros(SHAPE, np.uint8)
    if tumour:
        img = np.where(lesion <= 7, 1400.0, img)
    if cavity:
        img = np.where(lesion <= 10, 60.0, img)  # the core and a 6 mm margin resected: fluid
    img = np.roll(gaussian_filter(np.clip(img, 0, None), 0.7), shift_vox, axis=2)
    image = sitk.GetImageFromArray(img.astype(np.float32))
    image.SetSpacing((SPACING,) * 3)
    return image, np.roll(label, shift_vox, axis=2)


def test_a_cavity_does_not_fail_qc_once_the_tumour_region_is_left_out():
    config = RegistrationConfig()
    fixed, pre_label = _head(tumour=True, cavity=False)
    post, post_label = _head(tumour=False, cavity=True)
    exclude = qc_exclusion([pre_label, post_label], (SPACING,) * 3, config.qc_exclude_margin_mm)
    assert exclude is not None and exclude[pre_label > 0].all()
    assert qc_exclusion([None, np.zeros(SHAPE, np.uint8)], (SPACING,) * 3, 10.0) is None

    same = registration_qc(fixed, _head(tumour=True, cavity=False)[0], config)
    raw = registration_qc(fixed, post, config)
    judged = registration_qc(fixed, post, config, exclude)
    # Aligned, the post-operative scan differs only where the tumour and cavity are: left out, it scores as an
    # identical scan does; judged everywhere, this large resection alone would fail it.
    assert judged < same + 0.02 and raw > config.qc_max_metric, (same, judged, raw)
    # Misalignment is still caught with the same exclusion: 2 voxels (4 mm) off fails QC.
    shifted, _ = _head(tumour=False, cavity=True, shift_vox=2)
    assert registration_qc(fixed, shifted, config, exclude) > config.qc_max_metric
