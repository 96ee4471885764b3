"""Anatomy of the synthetic cohort: the MNI152 template and tissue maps shipped inside nilearn (offline)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Anatomy:
    """Atlas on the generator grid. All arrays are (x, y, z) voxels in NIfTI/RAS voxel order, float32.

    t1: MNI152 T1 template intensity in [0, 1] (head, not skull-stripped outside the brain mask).
    gm, wm, csf: tissue probabilities in [0, 1]; csf = brain mask minus gm and wm.
    brain: bool brain mask (gm + wm + csf support).
    parenchyma: bool domain of tumour growth (gm + wm >= 0.3); the no-flux boundary is its surface.
    affine: 4x4 voxel -> RAS mm (the nominal MNI affine of this grid).
    spacing_mm: isotropic voxel size (mm).
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    parenchyma: np.ndarray
    affine: np.ndarray
    spacing_mm: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return self.spacing_mm**3 / 1000.0


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor^3 blocks (edge-padded to a multiple of factor)."""
    pad = [(0, (-n) % factor) for n in a.shape]
    a = np.pad(a, pad, mode="edge")
    sx, sy, sz = (n // factor for n in a.shape)
    return a.reshape(sx, factor, sy, factor, sz, factor).mean(axis=(1, 3, 5))


@lru_cache(maxsize=4)
def load_anatomy(spacing_mm: float) -> Anatomy:
    """MNI152 anatomy at ``spacing_mm`` (2 = nilearn's 2 mm grid; 4, 6, ... = that grid block-averaged).

    Cached per process because nilearn takes about a second per map.
    """
    from nilearn import datasets

    factor_f = spacing_mm / 2.0
    factor = int(round(factor_f))
    if factor < 1 or abs(factor - factor_f) > 1e-9:
        raise ValueError(f"spacing_mm must be a positive multiple of 2 mm, got {spacing_mm}")
    t1_img = datasets.load_mni152_template(resolution=2)
    maps = [
        np.asarray(t1_img.get_fdata(dtype=np.float32)),
        np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(dtype=np.float32)),
        np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(dtype=np.float32)),
        np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata(dtype=np.float32)),
    ]
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    if factor > 1:
        maps = [_block_mean(m, factor).astype(np.float32) for m in maps]
        # The new voxel 0 is the centre of the old voxels 0..factor-1.
        scale = np.diag([factor, factor, factor, 1.0])
        shift = np.eye(4)
        shift[:3, 3] = (factor - 1) / 2.0
        affine = affine @ shift @ scale
    t1, gm, wm, mask = (np.clip(m, 0.0, 1.0) for m in maps)
    brain = mask >= 0.5
    gm = np.where(brain, gm, 0.0).astype(np.float32)
    wm = np.where(brain, wm, 0.0).astype(np.float32)
    csf = np.where(brain, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    parenchyma = brain & (gm + wm >= 0.3)
    return Anatomy(
        t1=t1.astype(np.float32),
        gm=gm,
        wm=wm,
        csf=csf,
        brain=brain,
        parenchyma=parenchyma,
        affine=affine,
        spacing_mm=float(spacing_mm),
    )


def diffusivity_map(anatomy: Anatomy, d_white: float) -> np.ndarray:
    """Voxel diffusivity (mm^2/day), (x, y, z) float32: D_w in white matter, D_w/10 in grey matter.

    Mixed voxels take the tissue-weighted mean; outside the parenchyma D = 0.
    """
    tissue = anatomy.gm + anatomy.wm
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(tissue > 0, (anatomy.wm + anatomy.gm / 10.0) / tissue, 0.0)
    return np.where(anatomy.parenchyma, d_white * frac, 0.0).astype(np.float32)
