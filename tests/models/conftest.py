"""Phantoms with known answers for the model tests: spheres whose radius grows linearly with time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from longitudinal.models.base import Batch


def sphere_labels(radius: torch.Tensor, size: int, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Labels [N, size, size, size] (int64): 1 inside ``radius`` voxels, 2 inside radius/2 (enhancing core)."""
    ax = torch.arange(size, dtype=torch.float32)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    c = centre if centre is not None else torch.full((radius.shape[0], 3), (size - 1) / 2)
    r = ((z - c[:, 0, None, None, None]) ** 2 + (y - c[:, 1, None, None, None]) ** 2
         + (x - c[:, 2, None, None, None]) ** 2).sqrt()
    rad = radius.view(-1, 1, 1, 1)
    return (r < rad).long() + (r < rad / 2).long()


def labels_to_images(labels: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 1-channel image [..., 1, D, H, W] whose intensity follows the label (0, 1, 2 -> -0.5, 1.0, 2.0)."""
    img = torch.tensor([-0.5, 1.0, 2.0])[labels]
    if noise:
        img = img + noise * torch.randn(img.shape, generator=generator)
    return img.unsqueeze(-4)


def growing_sphere_batch(
    b: int, size: int = 16, k: int = 2, q: int = 2, generator: torch.Generator | None = None,
    rate_vox_per_year: float = 3.0,
) -> Batch:
    """B patients with a sphere of radius r(t) = r0 + rate * years; K context scans, Q later query scans.

    Context times are spread over the first 200 days, queries 0.1-1 year after the last context scan.
    Sample i uses only 1 + (i % k) context scans (the rest is padding) to exercise masks.
    """
    g = generator
    r0 = 1.5 + 1.0 * torch.rand(b, generator=g)
    ct = torch.sort(torch.rand(b, k, generator=g) * 200.0, dim=1).values
    ct[:, 0] = 0.0
    n_ctx = 1 + torch.arange(b) % k
    mask = torch.arange(k)[None] < n_ctx[:, None]
    t_last = ct.gather(1, (n_ctx - 1)[:, None])
    qt = t_last + 36.5 + torch.rand(b, q, generator=g) * 330.0
    rate = rate_vox_per_year / 365.25

    def lab(t: torch.Tensor) -> torch.Tensor:
        return sphere_labels((r0[:, None] + rate * t).flatten(), size).view(*t.shape, size, size, size)

    cl = lab(ct)
    tl = lab(qt)
    return Batch(
        context_images=labels_to_images(cl), context_labels=cl, context_times=ct, context_mask=mask,
        query_times=qt, query_mask=torch.ones(b, q, dtype=torch.bool),
        target_images=labels_to_images(tl), target_labels=tl, voxel_volume_ml=torch.full((b,), 0.001),
    )


@pytest.fixture
def spheres():
    """The ``growing_sphere_batch`` factory."""
    return growing_sphere_batch


@pytest.fixture
def phantom():
    """The phantom helpers of this module (tests here are not a package, so they come as a fixture)."""
    return SimpleNamespace(
        sphere_labels=sphere_labels, labels_to_images=labels_to_images, growing=growing_sphere_batch
    )
