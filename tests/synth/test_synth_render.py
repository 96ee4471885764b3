"""Image contrasts and labels rendered from a known density on the real (4 mm) MNI anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from longitudinal.synth.anatomy import diffusivity_map, load_anatomy
from longitudinal.synth.render import (
    Thresholds,
    bias_field,
    label_map,
    render_clean,
    rician,
    white_matter_level,
)

THR = Thresholds(flair=0.2, enhancing=0.6, necrosis=0.95)


@pytest.fixture(scope="module")
def scene():
    anatomy = load_anatomy(4.0)
    seed = tuple(int(v) for v in np.argwhere(anatomy.wm >= 0.9)[0])
    grid = np.meshgrid(*[np.arange(n) for n in anatomy.shape], indexing="ij")
    r = np.sqrt(sum((g - s) ** 2 for g, s in zip(grid, seed, strict=True))) * anatomy.spacing_mm
    # A radial profile: necrotic centre (c ~ 1) inside 6 mm, falling to 0 by 30 mm.
    c = np.where(anatomy.parenchyma, np.clip(1.0 - np.maximum(r - 6.0, 0.0) / 24.0, 0.0, 1.0), 0.0)
    return anatomy, c.astype(np.float32)


def test_labels_are_nested_thresholds(scene) -> None:
    _, c = scene
    lab = label_map(c, THR)
    assert np.array_equal(lab == 2, c >= THR.enhancing)
    assert np.array_equal(lab == 1, (c >= THR.flair) & (c < THR.enhancing))
    assert np.count_nonzero(lab == 1) > 0 and np.count_nonzero(lab == 2) > 0


def test_contrasts_oedema_bright_on_flair_rim_bright_and_necrosis_dark_on_t1c(scene) -> None:
    anatomy, c = scene
    img = render_clean(anatomy, c, THR)
    wm = (anatomy.wm >= 0.9) & (c == 0)
    oedema = (c > THR.flair + 0.1) & (c < THR.enhancing - 0.1)
    rim = (c > THR.enhancing + 0.1) & (c < THR.necrosis - 0.1)
    necrosis = c >= THR.necrosis + 0.02
    assert oedema.any() and rim.any() and necrosis.any()
    assert img["FLAIR"][oedema].mean() > 1.3 * img["FLAIR"][wm].mean()
    assert img["T1c"][rim].mean() > 1.3 * img["T1c"][wm].mean()
    assert img["T1c"][necrosis].mean() < 0.5 * img["T1c"][wm].mean()
    no_tumour = render_clean(anatomy, np.zeros_like(c), THR)
    far = c == 0
    for ch in ("T1c", "FLAIR"):
        np.testing.assert_allclose(img[ch][far], no_tumour[ch][far], rtol=1e-5)


def test_bias_field_is_smooth_and_rician_noise_has_its_sigma(scene) -> None:
    anatomy, _ = scene
    rng = np.random.default_rng(0)
    b = bias_field(rng, anatomy, 0.08)
    assert 0.6 < b.min() and b.max() < 1.6
    assert np.abs(np.diff(b, axis=0)).max() < 0.05  # smooth: small change per 4 mm voxel
    level = white_matter_level(anatomy)
    flat = np.full((64, 64, 64), level, np.float32)
    noisy = rician(rng, flat, 30.0)
    assert noisy.std() == pytest.approx(30.0, rel=0.05)  # high SNR: Rician ~ Gaussian
    dark = rician(rng, np.zeros((64, 64, 64), np.float32), 30.0)
    assert dark.mean() == pytest.approx(30.0 * np.sqrt(np.pi / 2), rel=0.03)  # Rayleigh mean in background


def test_diffusivity_is_d_white_in_white_and_a_tenth_in_grey() -> None:
    anatomy = load_anatomy(4.0)
    d = diffusivity_map(anatomy, 0.5)
    pure_wm = anatomy.parenchyma & (anatomy.wm > 0.99) & (anatomy.gm < 0.01)
    pure_gm = anatomy.parenchyma & (anatomy.gm > 0.99) & (anatomy.wm < 0.01)
    assert pure_wm.any() and pure_gm.any()
    np.testing.assert_allclose(d[pure_wm], 0.5, rtol=0.02)
    np.testing.assert_allclose(d[pure_gm], 0.05, rtol=0.05)  # up to 1% white matter mixed in
    assert np.all(d[~anatomy.parenchyma] == 0)
