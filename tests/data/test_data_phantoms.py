"""Phantom stores have the growth and volumes they claim."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longitudinal.data.phantoms import make_phantom_store
from storage.store import CohortStore


def test_phantom_store_truth_matches_store(tmp_path):
    cohort = make_phantom_store(str(tmp_path / "c.zarr"), n_patients=3, seed=5, grid=(24, 24, 24))
    store = CohortStore.open(cohort.url)
    assert store.patient_ids() == sorted(cohort.patients)
    assert store.verify() == []
    for pid, truth in cohort.patients.items():
        arr = store.arrays(pid)
        np.testing.assert_allclose(arr.days, truth.days)
        assert tuple(arr.spacing_mm) == cohort.spacing_mm
        label = np.asarray(arr.label[:])
        whole = (label > 0).sum((1, 2, 3)) * cohort.voxel_volume_ml
        np.testing.assert_allclose(whole, truth.whole_ml)
        # Radii grow linearly with time at the stated rate, and volumes follow 4/3 pi r^3 (voxelised).
        np.testing.assert_allclose(np.diff(truth.radii_mm),
                                   truth.growth_mm_per_year * np.diff(truth.days) / 365.25, rtol=1e-9)
        for r, v in zip(truth.radii_mm, truth.whole_ml, strict=True):
            assert v == pytest.approx(4 / 3 * math.pi * r**3 / 1000, rel=0.25)
        assert all(np.diff(truth.whole_ml) > 0)
        # Image is exactly zero outside the brain and brighter in the tumour (T1c enhancing core).
        img = np.asarray(arr.image[0])
        assert img[:, 0, 0, 0].tolist() == [0.0, 0.0]
        assert img[0][label[0] == 2].mean() > img[0][(label[0] == 0) & (img[0] != 0)].mean() + 0.3
