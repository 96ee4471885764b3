"""``fk`` recovers the growth of the synthetic cohort: untreated patients of the smallest preset (4 mm), fitted with
tissue maps registered from the MNI152 templates (``longitudinal.registration.tissue``), give back the
generator's white-matter D and rho.

The series is built from the generator's ground truth (the density of every visit in the atlas space, before the
simulated head motion, labelled with the patient's own imaging thresholds), so what is tested is the fit, not
ingest's registration. The model is given those thresholds (``whole_threshold`` / ``enhancing_threshold``): the
question is D and rho, and with the default thresholds the threshold mismatch adds its own error.

Tolerances, chosen on another cohort (seed 1, 8 patients: D rho within a factor 1.25 for the median patient, the
front speed 2 sqrt(D rho) within a factor 1.75 for every one) and asserted here on seed 0 (4 patients; measured:
D rho 0.61-0.93 of the truth, median 0.74; rho 0.86-1.26; front speed within a factor 1.3): D rho within 45 % for
the median patient, rho within 30 % for the median patient, every patient's front speed within a factor 1.8.
Segmentations pin down the front speed far better than D and rho apart (D / rho was off by up to a factor 2.6).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from longitudinal.models.fk import FisherKolmogorovModel
from longitudinal.registration.tissue import register_tissue
from longitudinal.synth import generate_cohort, load_ground_truth
from longitudinal.synth.anatomy import load_anatomy

N_PATIENTS, SEED, CROP = 4, 0, 32


@pytest.fixture
def one_thread() -> Iterator[None]:
    # The solver's small steps scale badly over threads on a shared machine; one is the fastest there.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _crop(a: np.ndarray, lo: list[int]) -> np.ndarray:
    """a[..., lo:lo+CROP] on the last three axes, zero padded."""
    out = np.zeros(a.shape[:-3] + (CROP,) * 3, a.dtype)
    src = tuple(slice(max(s, 0), min(s + CROP, n)) for s, n in zip(lo, a.shape[-3:], strict=True))
    dst = tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(src, lo, strict=True))
    out[(..., *dst)] = a[(..., *src)]
    return out


def test_fit_with_tissue_maps_recovers_the_generators_growth(tmp_path: Path, one_thread: None) -> None:
    root = tmp_path / "bids"
    summary = generate_cohort(root, N_PATIENTS, SEED, "tiny", treated_fraction=0.0)
    assert not any(p.treated for p in summary.patients)
    anatomy = load_anatomy(4.0)
    # Store convention: (z, y, x) arrays, the affine mapping voxel (x, y, z) to RAS mm.
    tissue = register_tissue(anatomy.t1.T, (4.0, 4.0, 4.0), anatomy.affine)
    head = anatomy.t1.T > 0.05
    ratios = []
    for k in range(N_PATIENTS):
        truth = load_ground_truth(root, f"{k + 1:03d}")
        thr = truth["params"]["thresholds"]
        d_true, rho_true = truth["params"]["d_white_mm2_per_day"], truth["params"]["rho_per_day"]
        density = np.stack([np.asarray(nib.load(s["density_path"]).dataobj, dtype=np.float32).T
                            for s in truth["sessions"]])
        labels = (density >= thr["flair"]).astype(np.int64) + (density >= thr["enhancing"])
        days = [s["days_since_baseline"] for s in truth["sessions"]]
        voxels = np.argwhere(labels.any(0))
        lo = [int(c) - CROP // 2 for c in (voxels.min(0) + voxels.max(0)) // 2]
        model = FisherKolmogorovModel(whole_threshold=thr["flair"], enhancing_threshold=thr["enhancing"])
        crop_labels = torch.from_numpy(_crop(labels, lo))
        geometry = model.geometry(torch.from_numpy(_crop(head, lo)), crop_labels,
                                  torch.from_numpy(_crop(tissue, lo)), (4.0, 4.0, 4.0))
        d, rho = model.fit(crop_labels, torch.tensor(days), geometry).best()
        ratios.append((d * rho / (d_true * rho_true), rho / rho_true))
    r = np.asarray(ratios)
    assert np.median(np.abs(np.log(r[:, 0]))) < math.log(1.45), r
    assert np.median(np.abs(np.log(r[:, 1]))) < math.log(1.3), r
    assert np.all(np.abs(np.log(np.sqrt(r[:, 0]))) < math.log(1.8)), r
