"""The model contract, as tables over every registered kind (a newly registered kind joins automatically).

Shapes follow longitudinal.models.base: context [B,K,C,D,H,W], forecasts [B,Q,S,C|3,D,H,W].
"""

from __future__ import annotations

import json

import pytest
import torch

from longitudinal.models.base import MODEL_KINDS, Batch, ForecastModel, build_model

KINDS = sorted(MODEL_KINDS)
# Small widths keep every test in seconds on a 2-core CPU; kinds not listed use their defaults.
TINY: dict[str, dict] = {
    "tfm": {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16},
    "np": {"width": 8, "latent_dim": 8, "heads": 2, "time_dim": 16},
}
# Kinds allowed to ignore the query time (the persistence baseline, by definition).
TIME_FREE = {"lci"}
# Short training on growing spheres before checking that forecasts keep growing: (steps, lr, config).
# tfm: 80 steps pass for torch seeds 0, 1 and 2 with every phantom monotone (60 steps did too).
GROWTH_RECIPES: dict[str, tuple[int, float, dict]] = {
    "tfm": (80, 3e-3, {"width": 8, "channel_mult": [1, 2], "ctx_width": 8, "emb_dim": 32}),
    "np": (60, 3e-3, {"width": 4, "latent_dim": 8, "heads": 2, "time_dim": 16}),
}
DEFAULT_RECIPE = (100, 3e-3, {})
GROWTH_SIZE, GROWTH_RATE = 12, 2.0  # 12^3 crops, radius +2 voxels/year (spheres stay inside the crop)


def make(kind: str, in_channels: int, seed: int = 0) -> ForecastModel:
    torch.manual_seed(seed)
    return build_model(kind, dict(TINY.get(kind, {})), in_channels=in_channels)


def random_batch(b: int, k: int, q: int, c: int, size: tuple[int, int, int], seed: int = 0) -> Batch:
    """Random inputs where sample i has 1 + (i % k) real context scans; padding holds garbage on purpose."""
    g = torch.Generator().manual_seed(seed)
    n_ctx = 1 + torch.arange(b) % k
    mask = torch.arange(k)[None] < n_ctx[:, None]
    times = torch.cumsum(30 + 200 * torch.rand(b, k, generator=g), dim=1) - 30
    times = torch.where(mask, times, 9999.0)  # garbage times on padding must be ignored
    t_last = torch.where(mask, times, -1.0).max(dim=1).values
    return Batch(
        context_images=torch.randn(b, k, c, *size, generator=g),
        context_labels=torch.randint(0, 3, (b, k, *size), generator=g),
        context_times=times,
        context_mask=mask,
        query_times=t_last[:, None] + 30 + 400 * torch.rand(b, q, generator=g),
        query_mask=torch.ones(b, q, dtype=torch.bool),
        target_images=torch.randn(b, q, c, *size, generator=g),
        target_labels=torch.randint(0, 3, (b, q, *size), generator=g),
        voxel_volume_ml=torch.full((b,), 0.001),
    )


def ctx(batch: Batch) -> tuple[torch.Tensor, ...]:
    return batch.context_images, batch.context_labels, batch.context_times, batch.context_mask


def draw(model: ForecastModel, batch: Batch, query_times: torch.Tensor | None = None, n: int = 2, seed: int = 7):
    torch.manual_seed(seed)  # for kinds that draw from the global RNG
    g = torch.Generator().manual_seed(seed)
    qt = batch.query_times if query_times is None else query_times
    return model.sample(*ctx(batch), qt, n, generator=g)


# (B, K, Q, S, C, spatial) -> images [B,Q,S,C,*spatial], probs [B,Q,S,3,*spatial]
SHAPE_CASES = [
    (2, 3, 2, 2, 2, (16, 16, 16)),
    (3, 2, 3, 1, 1, (8, 16, 12)),
    (1, 1, 1, 3, 2, (8, 8, 8)),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("b,k,q,s,c,size", SHAPE_CASES)
def test_sample_shapes_and_probabilities(kind, b, k, q, s, c, size):
    model = make(kind, c)
    batch = random_batch(b, k, q, c, size)
    f = draw(model, batch, n=s)
    assert tuple(f.images.shape) == (b, q, s, c, *size)
    assert tuple(f.probs.shape) == (b, q, s, 3, *size)
    assert torch.isfinite(f.images).all() and torch.isfinite(f.probs).all()
    assert (f.probs >= 0).all() and (f.probs <= 1).all()
    torch.testing.assert_close(f.probs.sum(dim=3), torch.ones(b, q, s, *size), atol=1e-5, rtol=0)
    assert tuple(f.volumes_ml(batch.voxel_volume_ml).shape) == (b, q, s, 2)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_is_ignored(kind):
    """Changing what sits in masked-out context slots (images, labels, times) changes nothing."""
    model = make(kind, 2)
    batch = random_batch(3, 3, 2, 2, (16, 16, 16))
    other = Batch(**{**batch.__dict__})
    pad = ~batch.context_mask
    other.context_images = torch.where(pad[..., None, None, None, None], 5.0, batch.context_images)
    other.context_labels = torch.where(pad[..., None, None, None], 2, batch.context_labels)
    other.context_times = torch.where(pad, -123.0, batch.context_times)
    a, b = draw(model, batch), draw(model, other)
    torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.probs, b.probs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_config_round_trips_through_build_model(kind):
    model = make(kind, 2)
    cfg = model.config_dict()
    json.dumps(cfg)  # JSON-able, for MLflow params and checkpoints
    again = build_model(kind, cfg)
    assert again.config_dict() == cfg
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_finite_and_reaches_every_parameter(kind):
    model = make(kind, 2)
    batch = random_batch(3, 3, 2, 2, (16, 16, 16))
    batch.query_mask[0, 1] = False  # a padded query must be accepted
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    params = dict(model.named_parameters())
    if not model.trainable:
        assert not params and not loss.requires_grad
        return
    loss.backward()
    dead = [n for n, p in params.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not dead, f"no gradient reaches {dead}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())


@pytest.mark.parametrize("kind", [k for k in KINDS if MODEL_KINDS[k].trainable])
def test_overfits_one_batch(kind):
    """A few dozen Adam steps on one tiny 16^3 batch at least halve the loss (noise fixed by seed)."""
    model = make(kind, 1)
    batch = random_batch(2, 2, 2, 1, (16, 16, 16), seed=3)

    def fixed_loss() -> torch.Tensor:
        torch.manual_seed(11)
        return model.loss(batch)

    with torch.no_grad():
        first = float(fixed_loss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        fixed_loss().backward()
        opt.step()
    with torch.no_grad():
        last = float(fixed_loss())
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_under_a_seed(kind):
    batch = random_batch(2, 3, 2, 2, (16, 16, 16))
    m1, m2 = make(kind, 2, seed=5), make(kind, 2, seed=5)
    for (n, p1), p2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(p1, p2), n
    a, b = draw(m1, batch, seed=3), draw(m2, batch, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.probs, b.probs)
    torch.manual_seed(9)
    l1 = m1.loss(batch)
    torch.manual_seed(9)
    l2 = m2.loss(batch)
    assert torch.equal(l1, l2)
    if MODEL_KINDS[kind].stochastic:
        c = draw(m1, batch, seed=4)
        # A forecast is images and tumour probabilities; fk forecasts density only (its image is the last scan).
        assert not (torch.equal(a.images, c.images) and torch.equal(a.probs, c.probs)), \
            "different seeds must give different samples"
    else:
        assert torch.equal(a.images[:, :, 0], a.images[:, :, 1]), "deterministic kinds repeat one sample"


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in TIME_FREE])
def test_forecast_depends_on_the_query_gap(kind):
    """Same context, gaps of 30 and 300 days -> different forecasts (even untrained: time is wired in)."""
    model = make(kind, 2)
    batch = random_batch(2, 3, 1, 2, (16, 16, 16))
    batch.context_mask[:] = True
    batch.context_times = torch.tensor([[0.0, 100.0, 200.0], [0.0, 50.0, 300.0]])
    # A small tumour (random labels fill the crop, where a density model has nothing left to grow into).
    r2 = sum((g - 7.5) ** 2 for g in torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    batch.context_labels = ((r2 <= 9).long() + (r2 <= 4).long()).expand_as(batch.context_labels).clone()
    near, far = draw(model, batch, batch.context_times[:, -1:] + 30), draw(model, batch, batch.context_times[:, -1:] + 300)
    assert max((near.images - far.images).abs().max(), (near.probs - far.probs).abs().max()) > 1e-5


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in TIME_FREE])
def test_growing_tumour_keeps_growing(kind, spheres):
    """Spheres whose radius grows linearly with time: forecast whole-tumour volume rises with the gap.

    Trainable kinds first train briefly on such phantoms (seconds); the mean over 8 unseen phantoms and 2
    samples must increase strictly over gaps of 30, 180 and 365 days, and at least 3/4 of the phantoms
    with two context scans (those whose growth rate is observable) must grow monotonically.
    """
    steps, lr, cfg = GROWTH_RECIPES.get(kind, DEFAULT_RECIPE)
    torch.manual_seed(0)
    model = build_model(kind, dict(cfg), in_channels=1)
    if model.trainable:
        g = torch.Generator().manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            loss = model.loss(spheres(4, GROWTH_SIZE, k=2, q=2, generator=g, rate_vox_per_year=GROWTH_RATE))
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = spheres(8, GROWTH_SIZE, k=2, q=1, generator=torch.Generator().manual_seed(5), rate_vox_per_year=GROWTH_RATE)
    t_last = torch.where(test.context_mask, test.context_times, -1.0).max(dim=1).values[:, None]
    f = draw(model, test, t_last + torch.tensor([[30.0, 180.0, 365.0]]))
    vol = f.volumes_ml(1.0)[..., 0].mean(dim=2)  # [B, 3] voxels
    mean = vol.mean(dim=0)
    assert mean[0] < mean[1] < mean[2], vol
    two = test.context_mask.all(dim=1)
    monotone = (vol[:, 1] > vol[:, 0]) & (vol[:, 2] > vol[:, 1])
    assert monotone[two].float().mean() >= 0.75, vol
