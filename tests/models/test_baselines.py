"""Known answers for the closed-form baselines ``lci`` and ``linear``."""

from __future__ import annotations

import torch

from longitudinal.models.base import build_model
from longitudinal.models.baselines import depth_score, linear_volume_counts, linear_volumes_ml, top_n_mask


def test_lci_takes_the_latest_scan_by_time_not_position(phantom):
    labels = torch.stack([phantom.sphere_labels(torch.tensor([r]), 12)[0] for r in (4.0, 2.0, 3.0)])[None]
    images = phantom.labels_to_images(labels)
    times = torch.tensor([[200.0, 0.0, 100.0]])  # latest is position 0
    f = build_model("lci").sample(images, labels, times, torch.ones(1, 3, dtype=torch.bool),
                                  torch.tensor([[250.0, 400.0]]), n_samples=3)
    assert torch.equal(f.images, images[:, 0][:, None, None].expand(1, 2, 3, 1, 12, 12, 12))
    assert torch.equal(f.probs.argmax(dim=3), labels[:, 0][:, None, None].expand(1, 2, 3, 12, 12, 12))


def test_linear_images_are_exact_for_voxelwise_linear_trends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 8, 8, 8, generator=g), torch.randn(2, 1, 8, 8, 8, generator=g)
    times = torch.tensor([[0.0, 90.0], [10.0, 200.0]])
    images = a[:, None] + b[:, None] * times[..., None, None, None, None] / 365.25
    labels = torch.zeros(2, 2, 8, 8, 8, dtype=torch.long)
    query = torch.tensor([[120.0, 700.0], [365.0, 1000.0]])
    f = build_model("linear").sample(images, labels, times, torch.ones(2, 2, dtype=torch.bool), query)
    expected = a[:, None] + b[:, None] * query[..., None, None, None, None] / 365.25
    torch.testing.assert_close(f.images[:, :, 0], expected, atol=1e-4, rtol=1e-4)


def test_linear_with_one_scan_is_lci():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(1, 2, 1, 8, 8, 8, generator=g)
    labels = torch.randint(0, 3, (1, 2, 8, 8, 8), generator=g)
    args = (images, labels, torch.tensor([[50.0, 0.0]]), torch.tensor([[True, False]]), torch.tensor([[300.0]]))
    lin, lci = build_model("linear").sample(*args), build_model("lci").sample(*args)
    assert torch.equal(lin.images, lci.images) and torch.equal(lin.probs, lci.probs)


def _sphere_series(phantom, radii: list[float], size: int = 16) -> torch.Tensor:
    return torch.stack([phantom.sphere_labels(torch.tensor([r]), size)[0] for r in radii])[None]


def test_linear_volumes_extrapolate_and_the_mask_grows_outward(phantom):
    labels = _sphere_series(phantom, [3.0, 4.0])
    whole = [(labels[0, i] > 0).sum().item() for i in range(2)]
    enh = [(labels[0, i] == 2).sum().item() for i in range(2)]
    query = torch.tensor([[150.0, 200.0, 300.0]])
    f = build_model("linear").sample(phantom.labels_to_images(labels), labels, torch.tensor([[0.0, 100.0]]),
                                     torch.ones(1, 2, dtype=torch.bool), query)
    w, e = f.masks()
    for j, t in enumerate(query[0].tolist()):
        k = (t - 100.0) / 100.0
        assert w[0, j, 0].sum().item() == round(whole[1] + (whole[1] - whole[0]) * k)
        assert e[0, j, 0].sum().item() == round(enh[1] + (enh[1] - enh[0]) * k)
        assert bool((w[0, j, 0] | ~(labels[0, 1] > 0)).all()), "growth keeps the last mask"
        assert bool((w[0, j, 0] | ~e[0, j, 0]).all()), "enhancing core lies inside the whole tumour"
    # The grown shape stays a ball: overlap with the centred sphere of equal voxel count.
    ax = torch.arange(16.0)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    r = ((z - 7.5) ** 2 + (y - 7.5) ** 2 + (x - 7.5) ** 2).sqrt()
    grown = w[0, 2, 0]
    ball = r <= r.flatten().sort().values[int(grown.sum()) - 1]
    assert (grown & ball).sum() / (grown | ball).sum() > 0.9


def test_linear_shrinks_inside_the_last_mask_and_stops_at_zero(phantom):
    labels = _sphere_series(phantom, [5.0, 4.0])
    f = build_model("linear").sample(phantom.labels_to_images(labels), labels, torch.tensor([[0.0, 100.0]]),
                                     torch.ones(1, 2, dtype=torch.bool), torch.tensor([[150.0, 5000.0]]))
    w, _ = f.masks()
    assert 0 < w[0, 0, 0].sum() < (labels[0, 1] > 0).sum()
    assert bool((~w[0, 0, 0] | (labels[0, 1] > 0)).all()), "shrinkage erodes from the boundary"
    assert w[0, 1, 0].sum() == 0


def test_top_n_of_depth_score_is_nested_and_exact(phantom):
    mask = phantom.sphere_labels(torch.tensor([3.0]), 12) > 0
    score = depth_score(mask)
    prev = torch.zeros_like(mask)
    for n in (10, 50, int(mask.sum()), 300, 1000):
        cur = top_n_mask(score, torch.tensor([n]))
        assert cur.sum() == n and bool((cur | ~prev).all())
        prev = cur
    assert torch.equal(top_n_mask(score, mask.flatten(1).sum(1)), mask)


def test_linear_volume_counts_are_the_linear_forecasts_mask_sizes(phantom):
    """The closed-form counts a difficulty-scaled calibration uses are exactly the voxels of the linear
    baseline's forecast, for growth, shrinkage to zero, one scan (LCI) and masked-out padding."""
    labels = torch.cat([_sphere_series(phantom, [3.0, 4.5, 5.0]), _sphere_series(phantom, [5.0, 4.0, 2.0])])
    times = torch.tensor([[0.0, 100.0, 40.0], [0.0, 100.0, 300.0]])  # sample 0: the latest scan is position 1
    mask = torch.tensor([[True, True, False], [True, True, True]])  # sample 0's third scan is padding
    query = torch.tensor([[150.0, 400.0], [320.0, 2000.0]])
    f = build_model("linear").sample(phantom.labels_to_images(labels), labels, times, mask, query)
    w, e = f.masks()
    counts = linear_volume_counts(labels, times, mask, query)
    assert counts.shape == (2, 2, 2) and counts.dtype == torch.long
    assert torch.equal(counts[..., 0], w[:, :, 0].flatten(2).sum(-1))
    assert torch.equal(counts[..., 1], e[:, :, 0].flatten(2).sum(-1))
    whole = [(labels[0, i] > 0).sum().item() for i in range(2)]
    assert counts[0, 0, 0].item() == round(whole[1] + (whole[1] - whole[0]) * 0.5)
    assert counts[1, 1].tolist() == [0, 0]  # shrinking, far ahead: clamped at zero
    one = linear_volume_counts(labels[:1, :1], times[:1, :1], mask[:1, :1], query[:1])
    assert one[0, :, 0].tolist() == [whole[0]] * 2  # one scan: the last count, as LCI
    ml = linear_volumes_ml(labels, times, mask, query, voxel_volume_ml=0.008)
    torch.testing.assert_close(ml, counts.double() * 0.008)
