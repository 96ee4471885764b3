"""Metrics against known answers: boxes and spheres with exact overlaps, shifted and concentric spheres with
anisotropic spacing, volumes, and coverage / CRPS of known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longitudinal.data.phantoms import sphere_labels
from longitudinal.evaluation import metrics as M


def box(shape, lo, hi) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


@pytest.mark.parametrize(
    ("shift", "expected"),
    [(0, 1.0), (5, 0.5), (2, 0.8), (10, 0.0)],  # 10x10x10 cubes overlapping 10-shift slices of 10
)
def test_dice_of_shifted_cubes_is_exact(shift, expected):
    a = box((24, 24, 24), (2, 2, 2), (12, 12, 12))
    b = box((24, 24, 24), (2, 2, 2 + shift), (12, 12, 12 + shift))
    assert M.dice(a, b) == pytest.approx(expected)


def test_dice_of_concentric_spheres_matches_volume_ratio():
    sp = (1.0, 1.0, 1.0)
    inner = torch.from_numpy(sphere_labels((40, 40, 40), sp, (19.5, 19.5, 19.5), 8.0) > 0)
    outer = torch.from_numpy(sphere_labels((40, 40, 40), sp, (19.5, 19.5, 19.5), 12.0) > 0)
    expected = 2 * 8.0**3 / (8.0**3 + 12.0**3)  # 2 V1 / (V1 + V2), V1 inside V2
    assert M.dice(inner, outer) == pytest.approx(expected, abs=0.02)


def test_dice_empty_conventions():
    empty = torch.zeros((8, 8, 8), dtype=torch.bool)
    full = box((8, 8, 8), (1, 1, 1), (4, 4, 4))
    assert M.dice(empty, empty) == 1.0
    assert M.dice(full, empty) == 0.0


def test_hd95_of_shifted_spheres_in_mm_with_anisotropic_spacing():
    # Spheres of radius 10 mm on a (2.0, 0.5, 0.5) mm grid, shifted 2 voxels = 4 mm along z. For a sphere
    # shifted by d, the surface distance at polar cosine u is |sqrt(r^2 + d^2 - 2 r d u) - r| with u uniform,
    # whose 95th percentile is 3.8 mm; voxelisation adds up to half a voxel.
    sp, grid = (2.0, 0.5, 0.5), (24, 64, 64)
    a = torch.from_numpy(sphere_labels(grid, sp, (11.5, 31.5, 31.5), 10.0) > 0)
    b = torch.from_numpy(sphere_labels(grid, sp, (13.5, 31.5, 31.5), 10.0) > 0)
    u = np.linspace(-1, 1, 200_001)
    theory = float(np.quantile(np.abs(np.sqrt(100 + 16 - 80 * u) - 10), 0.95))
    assert theory == pytest.approx(3.8, abs=1e-6)
    assert M.hd95_mm(a, b, sp) == pytest.approx(theory, abs=0.5)
    # Ignoring the spacing would report the shift in voxels (2), not mm.
    assert M.hd95_mm(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0, abs=0.5)


def test_hd95_of_concentric_spheres_is_radius_gap():
    sp, grid = (2.0, 0.5, 0.5), (24, 64, 64)
    a = torch.from_numpy(sphere_labels(grid, sp, (11.5, 31.5, 31.5), 10.0) > 0)
    c = torch.from_numpy(sphere_labels(grid, sp, (11.5, 31.5, 31.5), 6.0) > 0)
    assert M.hd95_mm(a, c, sp) == pytest.approx(4.0, abs=0.5)


def test_hd95_empty_conventions():
    empty = torch.zeros((8, 8, 8), dtype=torch.bool)
    full = box((8, 8, 8), (1, 1, 1), (4, 4, 4))
    assert M.hd95_mm(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(M.hd95_mm(full, empty, (1, 1, 1)))
    assert math.isnan(M.hd95_mm(empty, full, (1, 1, 1)))


def test_volume_ml_counts_voxels_times_voxel_volume():
    m = box((10, 10, 10), (0, 0, 0), (5, 4, 3))  # 60 voxels
    assert M.volume_ml(m, 2.0 * 1.5 * 1.0 / 1000) == pytest.approx(60 * 3.0 / 1000)


def test_masked_mse_and_ssim():
    g = torch.Generator().manual_seed(0)
    target = torch.rand((2, 16, 16, 16), generator=g)
    mask = box((16, 16, 16), (2, 2, 2), (14, 14, 14))
    pred = target.clone()
    pred[:, ~mask] += 5.0  # errors outside the brain are ignored
    assert M.masked_mse(pred, target, mask) == pytest.approx(0.0, abs=1e-12)
    assert M.masked_ssim(target, target, mask) == pytest.approx(1.0, abs=1e-4)
    pred2 = target.clone()
    pred2[:, mask] += 0.5
    assert M.masked_mse(pred2, target, mask) == pytest.approx(0.25, rel=1e-5)
    assert M.masked_ssim(torch.rand((2, 16, 16, 16), generator=g), target, mask) < 0.2


def test_interval_coverage_of_a_known_distribution():
    # Truths drawn from the same N(0, 1) as the samples: the central 80% / 95% intervals cover at ~ nominal rates.
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(4000, generator=g, dtype=torch.float64)
    truths = torch.randn(2000, generator=g, dtype=torch.float64)
    cov80 = np.mean([M.interval_covers(samples, float(t), 0.8) for t in truths])
    cov95 = np.mean([M.interval_covers(samples, float(t), 0.95) for t in truths])
    assert cov80 == pytest.approx(0.8, abs=0.03)
    assert cov95 == pytest.approx(0.95, abs=0.02)
    assert M.interval_covers(torch.tensor([1.0, 2.0, 3.0]), 2.0, 0.8)
    assert not M.interval_covers(torch.tensor([1.0, 2.0, 3.0]), 3.5, 0.95)


@pytest.mark.parametrize(("mu", "sigma", "y"), [(0.0, 1.0, 0.0), (2.0, 0.5, 3.0), (10.0, 3.0, 4.0)])
def test_crps_of_gaussian_samples_matches_closed_form(mu, sigma, y):
    # Evenly spaced quantiles of N(mu, sigma^2): a sample with no Monte-Carlo noise, so the energy form must
    # reproduce the closed form closely.
    n = 2000
    probs = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    samples = torch.distributions.Normal(mu, sigma).icdf(probs)
    assert M.crps_samples(samples, y) == pytest.approx(M.crps_gaussian(mu, sigma, y), rel=0.005)


def test_crps_of_a_point_forecast_is_absolute_error():
    assert M.crps_samples(torch.tensor([3.0]), 5.5) == pytest.approx(2.5)
    assert M.crps_gaussian(0.0, 1.0, 0.0) == pytest.approx((math.sqrt(2) - 1) / math.sqrt(math.pi))


def test_generalized_energy_distance():
    a = box((12, 12, 12), (0, 0, 0), (6, 12, 12))
    b = box((12, 12, 12), (6, 0, 0), (12, 12, 12))
    # Perfect deterministic forecast -> 0; disjoint halves -> 2 * (1 - IoU) = 2.
    assert M.generalized_energy_distance(torch.stack([a, a]), a) == pytest.approx(0.0)
    assert M.generalized_energy_distance(torch.stack([b]), a) == pytest.approx(2.0)
    # Samples {a, b} vs truth a: 2 * mean(0, 1) - mean over pairs (0, 1, 1, 0) = 1 - 0.5.
    assert M.generalized_energy_distance(torch.stack([a, b]), a) == pytest.approx(0.5)
