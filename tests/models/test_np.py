"""Tests of the continuous-time neural process ``np`` on small crops and growing-sphere phantoms.

Phantoms have an exact answer: a sphere whose radius grows linearly in time (voxels per year), so the true
whole-tumour volume is strictly increasing over increasing query times.
"""

from __future__ import annotations

import math

import pytest
import torch

from longitudinal.models.base import DAYS_PER_YEAR, MODEL_KINDS, Batch, build_model
from longitudinal.models.np import NeuralProcess, NPConfig

CROP = 12
SMALL = {"in_channels": 2, "width": 8, "latent_dim": 8, "heads": 2, "time_dim": 16}


def sphere_scan(radius: float, centre: tuple[float, float, float], size: int = CROP,
                noise: float = 0.0, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One phantom scan: image [2, size^3] and label [size^3] (1 shell, 2 core at half the radius)."""
    ax = torch.arange(size, dtype=torch.float32)
    zz, yy, xx = torch.meshgrid(ax, ax, ax, indexing="ij")
    dist = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2).sqrt()
    whole, core = dist <= radius, dist <= 0.5 * radius
    label = whole.long() + core.long()
    img = torch.stack([0.1 + 0.6 * whole + 0.6 * core, 0.1 + 0.8 * whole]).float()
    if noise:
        img = img + noise * torch.randn(img.shape, generator=gen)
    return img, label


def phantom_batch(n: int, k: int, q: int, gen: torch.Generator, ragged: bool = False) -> Batch:
    """n growing spheres, k context scans (ragged: some rows have fewer, padded with garbage), q later targets.

    Radius r(t) = r0 + v * t_years with r0 in [1.5, 2.5] voxels and v in [1, 2] voxels/year; queries fall
    60-360 days after the last context scan.
    """
    ci = torch.empty(n, k, 2, CROP, CROP, CROP)
    cl = torch.zeros(n, k, CROP, CROP, CROP, dtype=torch.long)
    ct = torch.zeros(n, k)
    cm = torch.ones(n, k, dtype=torch.bool)
    ti = torch.empty(n, q, 2, CROP, CROP, CROP)
    tl = torch.zeros(n, q, CROP, CROP, CROP, dtype=torch.long)
    qt = torch.zeros(n, q)
    for i in range(n):
        r0 = 1.5 + 1.0 * float(torch.rand((), generator=gen))
        v = 1.0 + 1.0 * float(torch.rand((), generator=gen))
        centre = tuple(CROP / 2 - 0.5 + float(x) for x in (torch.rand(3, generator=gen) * 2 - 1))
        kk = k if not ragged else 1 + int(torch.randint(0, k, (), generator=gen))
        days = torch.cumsum(torch.cat([torch.zeros(1), 60 + 120 * torch.rand(kk - 1, generator=gen)]), 0)
        for j in range(kk):
            ci[i, j], cl[i, j] = sphere_scan(r0 + v * float(days[j]) / DAYS_PER_YEAR, centre, noise=0.02, gen=gen)
            ct[i, j] = days[j]
        if kk < k:  # padding must be ignored whatever it holds
            ci[i, kk:] = 1e3 * torch.randn(k - kk, 2, CROP, CROP, CROP, generator=gen)
            cl[i, kk:] = 2
            ct[i, kk:] = -1e4
            cm[i, kk:] = False
        gaps = torch.sort(60 + 300 * torch.rand(q, generator=gen)).values
        for j in range(q):
            qt[i, j] = days[kk - 1] + gaps[j]
            ti[i, j], tl[i, j] = sphere_scan(r0 + v * float(qt[i, j]) / DAYS_PER_YEAR, centre, noise=0.02, gen=gen)
    return Batch(ci, cl, ct, cm, qt, torch.ones(n, q, dtype=torch.bool), ti, tl, torch.full((n,), 0.001))


def make_model(**kw: object) -> NeuralProcess:
    torch.manual_seed(0)
    return NeuralProcess(**{**SMALL, **kw})


def draw(model: NeuralProcess, b: Batch, n_samples: int, seed: int, query_times: torch.Tensor | None = None):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.sample(b.context_images, b.context_labels, b.context_times, b.context_mask,
                            b.query_times if query_times is None else query_times, n_samples=n_samples,
                            generator=gen)


def test_registered_and_config_round_trips() -> None:
    assert "np" in MODEL_KINDS
    model = make_model(beta=0.5)
    cfg = model.config_dict()
    assert cfg == {**NPConfig().__dict__, **SMALL, "beta": 0.5}
    rebuilt = build_model("np", cfg)
    assert isinstance(rebuilt, NeuralProcess) and rebuilt.config_dict() == cfg
    rebuilt.load_state_dict(model.state_dict())  # same architecture, same parameter names and shapes


def test_bad_config_and_inputs_list_every_problem() -> None:
    with pytest.raises(ValueError) as err:
        NeuralProcess(width=6, heads=4, beta=-1.0, colour="red")
    assert "colour" in str(err.value)
    with pytest.raises(ValueError) as err:
        NeuralProcess(width=6, heads=4, beta=-1.0)
    assert "divisible" in str(err.value) and "beta" in str(err.value)
    model = make_model()
    b = phantom_batch(1, 2, 1, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError) as err:
        model.sample(b.context_images[..., :-1][:, :, :1], b.context_labels[..., :-1], b.context_times,
                     b.context_mask, b.query_times)
    msg = str(err.value)
    assert "in_channels=2" in msg and "multiple of 4" in msg


@pytest.mark.parametrize(("bsz", "k", "q", "s"), [(1, 1, 1, 1), (2, 3, 2, 3), (3, 2, 4, 2)])
def test_sample_shapes_and_probabilities(bsz: int, k: int, q: int, s: int) -> None:
    model = make_model().eval()
    b = phantom_batch(bsz, k, q, torch.Generator().manual_seed(1), ragged=True)
    fc = draw(model, b, s, seed=0)
    assert fc.images.shape == (bsz, q, s, 2, CROP, CROP, CROP)
    assert fc.probs.shape == (bsz, q, s, 3, CROP, CROP, CROP)
    assert torch.allclose(fc.probs.sum(dim=3), torch.ones(()), atol=1e-5)
    assert torch.isfinite(fc.images).all()


def test_untrained_model_starts_at_last_context_scan() -> None:
    model = make_model().eval()
    b = phantom_batch(2, 3, 2, torch.Generator().manual_seed(2), ragged=True)
    fc = draw(model, b, 2, seed=0)
    last = b.context_mask.long().cumsum(1).argmax(1)  # index of the last present scan (times are sorted)
    ar = torch.arange(2)
    lab = fc.probs.argmax(dim=3)
    assert torch.equal(lab, b.context_labels[ar, last][:, None, None].expand_as(lab))
    img_err = (fc.images - b.context_images[ar, last][:, None, None]).abs().max()
    assert img_err < 0.05


def test_context_permutation_invariance() -> None:
    model = make_model().eval()
    b = phantom_batch(2, 3, 2, torch.Generator().manual_seed(3), ragged=True)
    perm = torch.tensor([2, 0, 1])
    shuffled = Batch(b.context_images[:, perm], b.context_labels[:, perm], b.context_times[:, perm],
                     b.context_mask[:, perm], b.query_times, b.query_mask)
    a, c = draw(model, b, 3, seed=7), draw(model, shuffled, 3, seed=7)
    assert torch.allclose(a.images, c.images, atol=1e-5)
    assert torch.allclose(a.probs, c.probs, atol=1e-5)


def test_masked_padding_does_not_change_outputs() -> None:
    model = make_model().eval()
    b = phantom_batch(2, 2, 2, torch.Generator().manual_seed(4))
    # Same patients with two extra padded slots holding garbage (huge values, NaN, enhancing labels, odd times).
    pad_img = torch.full((2, 2, 2, CROP, CROP, CROP), float("nan"))
    pad_img[:, 0] = 1e4
    padded = Batch(torch.cat([pad_img[:, :1], b.context_images, pad_img[:, 1:]], 1),
                   torch.cat([torch.full((2, 1, CROP, CROP, CROP), 2), b.context_labels,
                              torch.ones(2, 1, CROP, CROP, CROP, dtype=torch.long)], 1),
                   torch.cat([torch.full((2, 1), 1e5), b.context_times, torch.full((2, 1), -3.0)], 1),
                   torch.cat([torch.zeros(2, 1, dtype=torch.bool), b.context_mask,
                              torch.zeros(2, 1, dtype=torch.bool)], 1),
                   b.query_times, b.query_mask)
    a, c = draw(model, b, 2, seed=5), draw(model, padded, 2, seed=5)
    assert torch.isfinite(c.images).all()
    assert torch.allclose(a.images, c.images, atol=1e-5)
    assert torch.allclose(a.probs, c.probs, atol=1e-5)
    # ... and in training: the padded batch gives the same loss under the same seed.
    padded.target_images, padded.target_labels = b.target_images, b.target_labels
    torch.manual_seed(9)
    la = model.loss(b)
    torch.manual_seed(9)
    lc = model.loss(padded)
    assert torch.allclose(la, lc, atol=1e-5)


def test_one_latent_is_shared_by_all_queries_of_a_trajectory() -> None:
    model = make_model(head_init_std=0.1).eval()  # a visibly non-trivial decoder
    b = phantom_batch(2, 2, 3, torch.Generator().manual_seed(6))
    with torch.no_grad():
        ctx = model.encode_context(b.context_images, b.context_labels, b.context_times, b.context_mask)
        prior = model.prior(ctx)
        z = model.draw_latent(prior, 4, torch.Generator().manual_seed(11))
        img, lg = model.decode(ctx, b.query_times, z)
        # sample() uses one z per trajectory for all its queries: identical to decoding the same draws.
        fc = draw(model, b, 4, seed=11)
        assert torch.allclose(fc.images, img, atol=1e-6)
        # With z fixed, a query's output depends only on its own time: repeated times give identical volumes,
        # and decoding one query alone gives what it gave inside the longer list.
        t = b.query_times[:, 1:2]
        img_rep, _ = model.decode(ctx, torch.cat([t, b.query_times[:, :1], t], dim=1), z)
        # 1e-5: with two threads the batch position changes the float summation order (1.2e-6 seen).
        assert torch.allclose(img_rep[:, 0], img_rep[:, 2], atol=1e-5)
        assert torch.allclose(img_rep[:, 0], img[:, 1], atol=1e-5)
        # ... and it does change with time (a model that ignores the query time is broken).
        assert (img[:, 0] - img[:, 2]).abs().max() > 1e-4
        # Different latents give different samples.
        assert (img[:, :, 0] - img[:, :, 1]).abs().amax() > 1e-4
        assert (lg[:, :, 0] - lg[:, :, 1]).abs().amax() > 1e-4


def test_prior_posterior_shapes_and_kl() -> None:
    model = make_model()
    b = phantom_batch(3, 2, 2, torch.Generator().manual_seed(7), ragged=True)
    ctx = model.encode_context(b.context_images, b.context_labels, b.context_times, b.context_mask)
    prior = model.prior(ctx)
    post = model.posterior(ctx, b.target_images, b.target_labels, b.query_times, b.query_mask)
    for dist in (prior, post):
        assert dist.loc.shape == (3, SMALL["latent_dim"]) and dist.scale.shape == (3, SMALL["latent_dim"])
        assert (dist.scale > 0).all()
    assert not torch.allclose(prior.loc, post.loc)  # targets inform the posterior
    terms = model.loss_terms(b)
    assert torch.isfinite(terms["kl"]) and terms["kl"] >= 0
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_same_seed_same_samples_different_seed_different_samples() -> None:
    model = make_model(head_init_std=0.1).eval()
    b = phantom_batch(1, 2, 2, torch.Generator().manual_seed(8))
    a, c, d = draw(model, b, 3, seed=1), draw(model, b, 3, seed=1), draw(model, b, 3, seed=2)
    assert torch.equal(a.images, c.images)
    assert not torch.allclose(a.images, d.images)


def test_training_on_growing_spheres_gives_monotone_coherent_trajectories() -> None:
    """Short training on growing spheres; sampled whole-tumour volumes must grow with the query time."""
    torch.manual_seed(0)
    model = NeuralProcess(**{**SMALL, "width": 4})  # narrow: CPU seconds per step on a shared 2-core box
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(100)
    first = last = math.nan
    for step in range(STEPS):
        batch = phantom_batch(BATCH, 3, 2, gen, ragged=True)
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
    assert last < 0.5 * first, (first, last)

    model.eval()
    test = phantom_batch(8, 3, 1, torch.Generator().manual_seed(200), ragged=True)
    t_last = test.context_times.masked_fill(~test.context_mask, -math.inf).amax(1, keepdim=True)
    queries = t_last + torch.tensor([[60.0, 135.0, 210.0, 285.0, 360.0]])
    fc = draw(model, test, 10, seed=3, query_times=queries)
    vols = fc.volumes_ml(test.voxel_volume_ml)[..., 0] / 0.001  # [B, Q, S] whole-tumour voxels
    traj = vols.permute(0, 2, 1).reshape(-1, queries.shape[1])  # one row per sampled trajectory
    monotone = (traj.diff(dim=1) >= 0).all(dim=1).float().mean().item()
    grows = (traj[:, -1] > traj[:, 0]).float().mean().item()
    print(f"np growing spheres: loss {first:.3f} -> {last:.3f}; monotone trajectories {monotone:.3f} "
          f"({traj.shape[0]} trajectories), growing first->last query {grows:.3f}")
    assert monotone >= 0.9
    assert grows >= 0.9


STEPS = 60
BATCH = 6
