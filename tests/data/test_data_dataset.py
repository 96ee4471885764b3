"""The dataset over the store: shapes and masks, context-only crops, border padding, identical augmentation
across time points, lazy reads in worker processes, and the deterministic evaluation enumerator."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from longitudinal.data.augment import AugmentConfig
from longitudinal.data.crops import read_crop
from longitudinal.data.dataset import (
    DataConfig,
    EvalDataset,
    ForecastDataset,
    StoreReader,
    StreamSampler,
    build_sample,
    collate_batch,
    enumerate_targets,
)
from longitudinal.data.phantoms import make_phantom_store, phantom_record
from storage.store import CohortStore

GRID = (24, 24, 24)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_phantom_store(str(tmp_path_factory.mktemp("data") / "c.zarr"), n_patients=5, seed=1, grid=GRID,
                              n_times=(2, 5))


@pytest.mark.parametrize(
    ("k", "q", "crop"),
    [(1, 1, (16, 16, 16)), (3, 2, (16, 16, 16)), (4, 3, (12, 20, 16))],
)
def test_sample_shapes_masks_and_times(cohort, k, q, crop):
    cfg = DataConfig(crop_size=crop, max_context=k, n_queries=q, augment=None, fov="fixed")
    ds = ForecastDataset(cohort.url, list(cohort.patients), cfg, seed=0)
    samples = [ds[i] for i in range(len(ds) * 2)]  # two epochs' worth of draws
    batch = collate_batch(samples)
    batch.check()
    n = len(samples)
    assert tuple(batch.context_images.shape) == (n, k, 2, *crop)
    assert tuple(batch.target_labels.shape) == (n, q, *crop)
    assert batch.context_labels.dtype == torch.int64 and batch.context_mask.dtype == torch.bool
    for s in samples:
        nc, nq = int(s.context_mask.sum()), int(s.query_mask.sum())
        assert 1 <= nc <= k and 1 <= nq <= q
        # Left-aligned: real slots first, padding after, and padding is all zeros.
        assert s.context_mask[:nc].all() and not s.context_mask[nc:].any()
        assert s.context_images[nc:].abs().sum() == 0 and s.context_labels[nc:].sum() == 0
        days = np.asarray(cohort.patients[s.patient_id].days)
        np.testing.assert_allclose(s.context_times[:nc].numpy(), days[list(s.context_idx)], rtol=1e-6)
        np.testing.assert_allclose(s.query_times[:nq].numpy(), days[list(s.target_idx)], rtol=1e-6)
        assert s.context_times[:nc].max() < s.query_times[:nq].min()
        assert (np.diff(s.context_idx) > 0).all() and (np.diff(s.target_idx) > 0).all()
        assert s.voxel_volume_ml == pytest.approx(cohort.voxel_volume_ml)


def test_training_draws_are_reproducible_and_vary_with_epoch(cohort):
    cfg = DataConfig(crop_size=(16, 16, 16))
    a = ForecastDataset(cohort.url, list(cohort.patients), cfg, seed=7)
    b = ForecastDataset(cohort.url, list(cohort.patients), cfg, seed=7)
    assert torch.equal(a[3].context_images, b[3].context_images)
    assert a[3].context_idx == b[3].context_idx and a[3].crop_start == b[3].crop_start
    # Index n + i is item i of the next epoch: same patient, new draw.
    draws = {(a[i * len(a) + 1].context_idx, a[i * len(a) + 1].crop_start) for i in range(6)}
    assert len({a[i * len(a) + 1].patient_id for i in range(6)}) == 1
    assert len(draws) > 1


def _moving_tumour_store(path, target_centre):
    # Context tumours (t=0, 1) sit around voxel (12, 12.5, 12); the target tumour (t=2) sits elsewhere.
    rec = phantom_record("MOVE", [0.0, 100.0, 200.0], [(12, 12, 12), (12, 13, 12), target_centre], [5.0, 6.0, 7.0],
                         grid=(32, 32, 32), noise=0.0)
    store = CohortStore.open(str(path), create=True)
    store.write_patient(rec)
    return str(path)


def test_crop_is_centred_on_context_tumour_and_ignores_target(tmp_path):
    url_a = _moving_tumour_store(tmp_path / "a.zarr", (24, 24, 24))
    url_b = _moving_tumour_store(tmp_path / "b.zarr", (20, 8, 26))
    cfg = DataConfig(crop_size=(16, 16, 16), max_context=2, n_queries=1, augment=None, fov="fixed")
    sa = build_sample(StoreReader(url_a), "MOVE", (0, 1), (2,), cfg, 1)
    sb = build_sample(StoreReader(url_b), "MOVE", (0, 1), (2,), cfg, 1)
    # Context tumours' union bounding box is z 9..15, y 10..16, x 9..15 (voxels), centred at (12, 13, 12):
    # the 16^3 crop starts 8 voxels before that.
    assert sa.crop_start == (4, 5, 4)
    assert sb.crop_start == sa.crop_start, "moving the target tumour must not move the crop"
    assert torch.equal(sa.context_images, sb.context_images)
    # The context tumour is centred in the crop; the far-away target tumour is (almost) outside it.
    lab = sa.context_labels[1].numpy()
    centroid = np.argwhere(lab > 0).mean(0)
    np.testing.assert_allclose(centroid, [8, 8, 8], atol=1.0)
    assert sa.target_labels[0].sum() < 0.1 * (sa.context_labels[1] > 0).sum()


def test_crops_pad_with_zeros_at_the_borders():
    arr = np.arange(2 * 6 * 7 * 8, dtype=np.float32).reshape(2, 6, 7, 8) + 1
    start, size = (-3, 4, 5), (8, 8, 8)
    got = read_crop(arr, (slice(None),), start, size)
    ref = np.pad(arr, ((0, 0), (3, 5), (0, 5), (0, 5)))[:, 0:8, 4:12, 5:13]
    np.testing.assert_array_equal(got, ref)
    assert got[:, :3].sum() == 0  # the 3 slices before the volume are padding
    far = read_crop(arr, (0,), (100, 0, 0), (4, 4, 4))
    assert far.shape == (4, 4, 4) and far.sum() == 0


def test_tumour_at_the_border_gives_a_padded_crop(tmp_path):
    # Near the brain's lower z edge: the crop must start before the volume.
    rec = phantom_record("EDGE", [0.0, 90.0], [(3, 12, 12)] * 2, [4.0, 5.0], grid=(24, 24, 24), noise=0.0)
    store = CohortStore.open(str(tmp_path / "e.zarr"), create=True)
    store.write_patient(rec)
    s = build_sample(StoreReader(str(tmp_path / "e.zarr")), "EDGE", (0,), (1,),
                     DataConfig(crop_size=(16, 16, 16), augment=None, fov="fixed"), 1)
    assert min(s.crop_start) < 0
    assert s.context_images.shape[-3:] == (16, 16, 16)
    pad = -s.crop_start[0]
    assert s.context_images[0, :, :pad].abs().sum() == 0


def test_augmentation_is_identical_across_time_points(tmp_path):
    # A static tumour without noise: every time point has the same image, so after augmentation all time
    # points must still be identical if (and only if) one set of random parameters was applied to all.
    rec = phantom_record("STILL", [0.0, 50.0, 100.0, 150.0], [(12, 11, 13)] * 4, [6.0] * 4, grid=(24, 24, 24),
                         noise=0.0)
    url = str(tmp_path / "s.zarr")
    CohortStore.open(url, create=True).write_patient(rec)
    aug = AugmentConfig(flip_prob=0.5, affine_prob=1.0, rotate_rad=0.4, scale=0.15, intensity_prob=1.0)
    cfg = DataConfig(crop_size=(16, 16, 16), max_context=3, n_queries=1, crop_jitter=0, augment=aug)
    plain = build_sample(StoreReader(url), "STILL", (0, 1, 2), (3,), DataConfig(crop_size=(16, 16, 16),
                                                                              augment=None, max_context=3), 1)
    ds = ForecastDataset(url, ["STILL"], cfg, seed=0)
    changed = 0
    for i in range(4):
        s = build_sample(ds.reader, "STILL", (0, 1, 2), (3,), cfg, 1, np.random.default_rng(i), ds._augment)
        for t in range(1, 3):
            assert torch.allclose(s.context_images[t], s.context_images[0], atol=1e-6)
            assert torch.equal(s.context_labels[t], s.context_labels[0])
        assert torch.allclose(s.target_images[0], s.context_images[0], atol=1e-6)
        assert torch.equal(s.target_labels[0], s.context_labels[0])
        changed += int(not torch.allclose(s.context_images[0], plain.context_images[0], atol=1e-4))
    assert changed >= 3, "the augmentation must actually change the crops"


def test_lazy_reads_in_worker_processes_match_in_process(cohort):
    cfg = DataConfig(crop_size=(16, 16, 16))
    ds = ForecastDataset(cohort.url, list(cohort.patients), cfg, seed=2)
    _ = ds[0]  # the parent has open handles and caches now
    blob = pickle.dumps(ds)
    # Settings and the (small) augmentation pipeline only: the store's arrays alone are ~1 MB.
    assert len(blob) < 100_000, "a pickled dataset carries settings, never array data"
    clone = pickle.loads(blob)
    assert clone.reader._arrays == {} and clone.reader._store is None

    def batches(workers):
        loader = DataLoader(ds, batch_size=2, sampler=StreamSampler(len(ds), seed=2), num_workers=workers,
                            collate_fn=collate_batch, multiprocessing_context="spawn" if workers else None)
        it = iter(loader)
        out = [next(it) for _ in range(4)]
        del it
        return out

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a.context_images, b.context_images)
        assert torch.equal(a.target_labels, b.target_labels)
        assert torch.equal(a.query_times, b.query_times)


def test_stream_sampler_is_a_permutation_per_epoch_and_resumes():
    s = StreamSampler(5, seed=3)
    it = iter(s)
    first = [next(it) for _ in range(15)]
    for e in range(3):
        assert sorted(first[e * 5:(e + 1) * 5]) == list(range(e * 5, e * 5 + 5))
    it2 = iter(StreamSampler(5, seed=3, start=7))
    assert [next(it2) for _ in range(8)] == first[7:15]


def test_enumerate_targets_lists_every_later_scan(cohort):
    items = enumerate_targets(cohort.url, max_context=2)
    expected = sum(len(p.days) - 1 for p in cohort.patients.values())
    assert len(items) == expected
    assert items == enumerate_targets(cohort.url, max_context=2)
    for it in items:
        days = cohort.patients[it.patient_id].days
        assert it.context_idx == tuple(range(max(0, it.target_idx - 2), it.target_idx))
        assert it.horizon_days == pytest.approx(days[it.target_idx] - days[it.target_idx - 1])
    every = enumerate_targets(cohort.url, max_context=2, pairs="all")
    assert len(every) == sum(len(p.days) * (len(p.days) - 1) // 2 for p in cohort.patients.values())
    assert set(items) <= set(every)
    for it in every:
        days = cohort.patients[it.patient_id].days
        cut = it.context_idx[-1] + 1
        assert cut <= it.target_idx and it.context_idx == tuple(range(max(0, cut - 2), cut))
        assert it.horizon_days == pytest.approx(days[it.target_idx] - days[cut - 1])
    ds = EvalDataset(cohort.url, items, DataConfig(crop_size=(16, 16, 16), max_context=2, n_queries=1,
                                                   augment=None))
    s = ds[len(ds) - 1]
    assert s.target_idx == (items[-1].target_idx,) and bool(s.query_mask.all())
    assert s.brain_mask.any() and not s.brain_mask.all()


def test_read_cache_returns_exactly_the_uncached_crops_within_its_budget(cohort):
    plain = StoreReader(cohort.url, cache_mb=0)
    cached = StoreReader(cohort.url, cache_mb=1, cache_margin=4)  # 1 MB: forces evictions below
    rng = np.random.default_rng(0)
    pids = sorted(cohort.patients)
    for _ in range(60):
        pid = pids[int(rng.integers(len(pids)))]
        n = len(cohort.patients[pid].days)
        times = sorted(int(t) for t in rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False))
        # Near a per-patient position (like jittered tumour crops), some past the borders.
        base = (-4 + 3 * pids.index(pid), 2, 10)
        start = tuple(int(b + v) for b, v in zip(base, rng.integers(-3, 4, size=3), strict=True))
        size = (16, 16, 12)
        for name in ("image", "label"):
            np.testing.assert_array_equal(cached.read(pid, name, times, start, size),
                                          plain.read(pid, name, times, start, size))
    assert cached.hits > 0 and cached.misses > 0
    assert cached._cached_bytes <= 2**20
    # A pickled reader keeps its settings, not its cache.
    clone = pickle.loads(pickle.dumps(cached))
    assert (clone.cache_bytes, clone.cache_margin, len(clone._cache)) == (2**20, 4, 0)
