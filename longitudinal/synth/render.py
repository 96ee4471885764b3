"""Images and labels from a density map: T1c-like and FLAIR-like contrasts, bias field, Rician noise.

Intensities are arbitrary scanner units with white matter near 1000 in T1c; images are written as int16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from longitudinal.synth.anatomy import Anatomy


@dataclass(frozen=True)
class Thresholds:
    """Per-patient thresholds on the tumour cell density c (dimensionless, 0..1).

    flair: c >= flair is visible on FLAIR (whole tumour: label 1 or 2).
    enhancing: c >= enhancing is the tumour core (label 2): the enhancing rim plus the necrosis it encloses.
    necrosis: c >= necrosis is necrotic (dark on T1c); necrosis > enhancing > flair.
    """

    flair: float
    enhancing: float
    necrosis: float

    def problems(self) -> list[str]:
        if not 0 < self.flair < self.enhancing < self.necrosis < 1:
            return [f"thresholds must satisfy 0 < flair < enhancing < necrosis < 1, got {self}"]
        return []


def _step(c: np.ndarray, threshold: float, width: float) -> np.ndarray:
    """Smooth 0 -> 1 transition of c around ``threshold`` (width in units of c)."""
    return (0.5 * (1.0 + np.tanh((c - threshold) / width))).astype(np.float32)


def label_map(c: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """uint8 labels from density: 0 background, 1 oedema/non-enhancing (flair <= c < enhancing), 2 core."""
    lab = np.zeros(c.shape, dtype=np.uint8)
    lab[c >= thresholds.flair] = 1
    lab[c >= thresholds.enhancing] = 2
    return lab


def white_matter_level(anatomy: Anatomy) -> float:
    """Mean T1 template intensity in white matter times 1000 (the T1c white-matter level)."""
    return float(anatomy.t1[anatomy.wm >= 0.9].mean() * 1000.0)


def render_clean(
    anatomy: Anatomy, c: np.ndarray, thresholds: Thresholds, cavity: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Noise-free images in the true (unmoved) space, keyed by project channel ("T1c", "FLAIR").

    c: (x, y, z) density on the anatomy grid. cavity: (x, y, z) bool mask of a resection cavity (fluid: dark on
    T1c, nulled on FLAIR like CSF), or None. Returns float32 (x, y, z) arrays.
    The transitions are smooth (width 0.03 in c; the cavity's edge blurred by half a voxel) so the edges look
    like images, not masks.
    """
    wm_level = white_matter_level(anatomy)
    oed = _step(c, thresholds.flair, 0.03)
    enh = _step(c, thresholds.enhancing, 0.03)
    nec = _step(c, thresholds.necrosis, 0.01)

    t1c = anatomy.t1 * 1000.0
    t1c = t1c * (1.0 - 0.2 * oed)  # infiltrated tissue is mildly T1-hypointense
    t1c = t1c * (1.0 - enh) + enh * (1.5 * wm_level)  # contrast uptake where the blood-brain barrier breaks
    t1c = t1c * (1.0 - nec) + nec * (0.3 * wm_level)  # necrosis takes no contrast

    tissue = 0.6 * anatomy.wm + 0.8 * anatomy.gm + 0.1 * anatomy.csf  # FLAIR: CSF nulled, GM > WM
    flair = np.where(anatomy.brain, tissue * wm_level, 0.5 * anatomy.t1 * 1000.0)
    flair = flair * (1.0 - oed) + oed * (1.5 * wm_level)  # oedema is hyperintense
    flair = flair * (1.0 - nec) + nec * (0.8 * wm_level)
    if cavity is not None and cavity.any():
        from scipy.ndimage import gaussian_filter

        fluid = np.clip(gaussian_filter(cavity.astype(np.float32), 0.5), 0.0, 1.0)
        t1c = t1c * (1.0 - fluid) + fluid * (0.15 * wm_level)  # fluid is T1-dark and takes no contrast
        flair = flair * (1.0 - fluid) + fluid * (0.1 * wm_level)  # FLAIR nulls free water
    return {"T1c": t1c.astype(np.float32), "FLAIR": flair.astype(np.float32)}


def bias_field(rng: np.random.Generator, anatomy: Anatomy, strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(quadratic polynomial of position), (x, y, z) float32, mean about 1.

    Coordinates are mm from the grid centre divided by 80 mm, so ``strength`` is the log-amplitude scale.
    """
    shape = anatomy.shape
    idx = [np.arange(n, dtype=np.float64) for n in shape]
    centre = np.array([(n - 1) / 2.0 for n in shape])
    x, y, z = ((i - ci) * anatomy.spacing_mm / 80.0 for i, ci in zip(idx, centre, strict=True))
    a = rng.normal(0.0, strength, size=9)
    # Separable terms broadcast without building nine full grids.
    log_b = (
        (a[0] * x + a[3] * x**2)[:, None, None]
        + (a[1] * y + a[4] * y**2)[None, :, None]
        + (a[2] * z + a[5] * z**2)[None, None, :]
        + a[6] * x[:, None, None] * y[None, :, None]
        + a[7] * x[:, None, None] * z[None, None, :]
        + a[8] * y[None, :, None] * z[None, None, :]
    )
    return np.exp(log_b).astype(np.float32)


def rician(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise (sigma per component): Rician statistics."""
    real = image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag)


def to_int16(image: np.ndarray) -> np.ndarray:
    """Round and clip to the int16 range scanners store."""
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
