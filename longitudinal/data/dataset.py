"""Samples over the cohort store: (context scans + times, query times, targets), read lazily from Zarr.

A training sample is one patient: a random subset of 1..K of its scans before a random split point (the
context, left-aligned in K slots, ``context_mask`` False on padding) and up to Q scans after it (the queries,
``query_mask`` False on padding). Times are days since the patient's baseline. Crops are tumour-centred, the
centre coming from the CONTEXT labels only. An evaluation item is deterministic: context = the (up to K) most
recent scans before target j, query = scan j (see `enumerate_targets`).

Workers: the dataset holds only the store URL and plain settings; the store and its zarr arrays are opened
lazily inside each process (the per-process cache is dropped when pickled), so DataLoader workers work with
any start method and with object stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from longitudinal.data.augment import AugmentConfig, apply_augment, make_augment
from longitudinal.data.context import Event, adapted_crop, normalisation_scale, pool_box, recorded_events
from longitudinal.data.reader import StoreReader
from longitudinal.data.splits import content_order
from longitudinal.models.base import Batch, Conditions, encode_treatments

Normalize = Literal["none", "context_mean"]


@dataclass(frozen=True)
class DataConfig:
    """How samples are cut.

    crop_size: (D, H, W) voxels of every crop. max_context: K slots. n_queries: Q slots (training).
    crop_jitter: max random shift (crop voxels, per axis) of the training crop centre; evaluation never jitters.
    fov / fov_margin_mm: the field of view ("adaptive": the crop's stride grows until the context tumours plus
        the margin fit; "fixed": the store's spacing), as in ``DataSettings`` and ``data.context``.
    normalize: "none" keeps store intensities; "context_mean" divides each channel by the mean of the non-zero
        voxels of the context crops (targets get the same factor, so growth is not normalised away).
    augment: None disables augmentation.
    samples_per_patient: dataset length = eligible patients x this.
    read_cache_mb / cache_margin: per-process read cache of the store reader (see `StoreReader`).
    """

    crop_size: tuple[int, int, int] = (32, 32, 32)
    max_context: int = 3
    n_queries: int = 2
    crop_jitter: int = 3
    normalize: Normalize = "none"
    fov: str = "adaptive"
    fov_margin_mm: float = 16.0
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    samples_per_patient: int = 1
    read_cache_mb: float = 512.0
    cache_margin: int = 8

    def check(self) -> list[str]:
        problems = []
        if len(self.crop_size) != 3 or any(int(s) < 4 for s in self.crop_size):
            problems.append(f"crop_size must be 3 sizes >= 4 voxels, got {self.crop_size}")
        if self.max_context < 1:
            problems.append(f"max_context must be >= 1, got {self.max_context}")
        if self.n_queries < 1:
            problems.append(f"n_queries must be >= 1, got {self.n_queries}")
        if self.crop_jitter < 0:
            problems.append(f"crop_jitter must be >= 0, got {self.crop_jitter}")
        if self.fov not in ("adaptive", "fixed"):
            problems.append(f"fov must be 'adaptive' or 'fixed', got {self.fov!r}")
        if self.normalize not in ("none", "context_mean"):
            problems.append(f"normalize must be 'none' or 'context_mean', got {self.normalize!r}")
        if self.read_cache_mb < 0 or self.cache_margin < 0:
            problems.append(f"read_cache_mb and cache_margin must be >= 0, got {self.read_cache_mb}, "
                            f"{self.cache_margin}")
        if self.samples_per_patient < 1:
            problems.append(f"samples_per_patient must be >= 1, got {self.samples_per_patient}")
        return problems


@dataclass(frozen=True)
class EvalItem:
    """One forecasting target: scan ``target_idx`` of ``patient_id`` from its scans ``context_idx``.
    horizon_days = days[target] - days[last context]."""

    patient_id: str
    context_idx: tuple[int, ...]
    target_idx: int
    horizon_days: float
    target_days: float


@dataclass
class Sample:
    """One sample as tensors (shapes as in longitudinal.models.base, without the batch axis) plus provenance.

    brain_mask [Q, D, H, W] bool: voxels where the raw target image is non-zero (the evaluation region).
    crop_start: (z, y, x) voxel of the store grid at crop index (0, 0, 0). spacing_mm: (z, y, x) size of one
    CROP voxel (the store's spacing times the crop's stride). events: the patient's recorded treatment events
    (start day, end day, kind), days since baseline.
    """

    context_images: Tensor
    context_labels: Tensor
    context_times: Tensor
    context_mask: Tensor
    query_times: Tensor
    query_mask: Tensor
    target_images: Tensor
    target_labels: Tensor
    brain_mask: Tensor
    voxel_volume_ml: float
    patient_id: str
    context_idx: tuple[int, ...]
    target_idx: tuple[int, ...]
    crop_start: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    events: list[Event] = field(default_factory=list)


def build_sample(
    reader: StoreReader,
    pid: str,
    context_idx: Sequence[int],
    target_idx: Sequence[int],
    cfg: DataConfig,
    n_query_slots: int,
    rng: np.random.Generator | None = None,
    augment: Any = None,
) -> Sample:
    """Cut one sample. ``rng`` (training) adds crop jitter and seeds ``augment``; None = deterministic."""
    arr = reader.arrays(pid)
    days = reader.days(pid)
    k, q = cfg.max_context, n_query_slots
    ctx, tgt = [int(i) for i in context_idx], [int(i) for i in target_idx]
    problems = []
    if not 1 <= len(ctx) <= k:
        problems.append(f"need 1..{k} context scans, got {len(ctx)}")
    if not 1 <= len(tgt) <= q:
        problems.append(f"need 1..{q} targets, got {len(tgt)}")
    if ctx and tgt and max(ctx) >= min(tgt):
        problems.append(f"context {ctx} must precede targets {tgt}")
    if problems:
        raise ValueError(f"bad sample for {pid}: " + "; ".join(problems))
    size = tuple(int(s) for s in cfg.crop_size)
    grid = tuple(int(n) for n in arr.label.shape[-3:])
    shift = (0, 0, 0)
    if rng is not None and cfg.crop_jitter > 0:
        shift = tuple(int(v) for v in rng.integers(-cfg.crop_jitter, cfg.crop_jitter + 1, size=3))
    box = adapted_crop([reader.bbox(pid, t) for t in ctx], grid, size, arr.spacing_mm, cfg, shift)
    start = box.start
    idx = ctx + tgt  # strictly increasing, so one orthogonal read fetches every time point
    images = torch.from_numpy(pool_box(reader.read(pid, "image", idx, start, box.extent), box)
                              .astype(np.float32))
    labels = torch.from_numpy(pool_box(reader.read(pid, "label", idx, start, box.extent), box, labels=True)
                              .astype(np.int64))
    brain = images[len(ctx):].abs().sum(1) > 0
    images = images / normalisation_scale(images[: len(ctx)], cfg.normalize).view(1, -1, 1, 1, 1)
    if augment is not None and rng is not None:
        images, labels = apply_augment(augment, images, labels, int(rng.integers(2**31)))
        brain = images[len(ctx):].abs().sum(1) > 0
    nc, nt = len(ctx), len(tgt)
    c_img = torch.zeros((k, *images.shape[1:]), dtype=torch.float32)
    c_lab = torch.zeros((k, *size), dtype=torch.int64)
    c_img[:nc], c_lab[:nc] = images[:nc], labels[:nc]
    c_t = torch.zeros(k, dtype=torch.float32)
    c_t[:nc] = torch.as_tensor(days[ctx], dtype=torch.float32)
    c_m = torch.zeros(k, dtype=torch.bool)
    c_m[:nc] = True
    t_img = torch.zeros((q, *images.shape[1:]), dtype=torch.float32)
    t_lab = torch.zeros((q, *size), dtype=torch.int64)
    b_m = torch.zeros((q, *size), dtype=torch.bool)
    t_img[:nt], t_lab[:nt], b_m[:nt] = images[nc:], labels[nc:], brain
    # Padded query slots repeat the last real query time so models never see a time before the context.
    q_t = torch.full((q,), float(days[tgt[-1]]), dtype=torch.float32)
    q_t[:nt] = torch.as_tensor(days[tgt], dtype=torch.float32)
    q_m = torch.zeros(q, dtype=torch.bool)
    q_m[:nt] = True
    spacing = box.spacing_mm(arr.spacing_mm)
    return Sample(
        context_images=c_img, context_labels=c_lab, context_times=c_t, context_mask=c_m, query_times=q_t,
        query_mask=q_m, target_images=t_img, target_labels=t_lab, brain_mask=b_m,
        voxel_volume_ml=float(np.prod(spacing)) / 1000.0, patient_id=pid, context_idx=tuple(ctx),
        target_idx=tuple(tgt), crop_start=start, spacing_mm=spacing,  # type: ignore[arg-type]
        events=recorded_events(getattr(arr, "treatments", None) or []),
    )


def reset_worker_reader(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each worker reopens the store instead of using handles from its parent."""
    info = torch.utils.data.get_worker_info()
    reader = getattr(info.dataset, "reader", None) if info is not None else None
    if isinstance(reader, StoreReader):
        reader.reset()


class StreamSampler(torch.utils.data.Sampler[int]):
    """Endless sampler: a fresh permutation of ``range(n)`` per epoch (seeded by ``(seed, epoch)``), yielded as
    ``epoch * n + i`` and starting at sample position ``start``; so a resumed run continues the exact order.

    Data-parallel: with ``world`` > 1 the stream is cut into batches of ``batch_size`` and this sampler
    yields only the batches ``b`` with ``b % world == rank`` (batch numbers counted from ``start``)."""

    def __init__(self, n: int, seed: int = 0, start: int = 0, rank: int = 0, world: int = 1,
                 batch_size: int = 1) -> None:
        if n < 1:
            raise ValueError("StreamSampler needs at least one item")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} must be in [0, world={world})")
        self.n, self.seed, self.start = int(n), int(seed), int(start)
        self.rank, self.world, self.batch_size = int(rank), int(world), int(batch_size)

    def _stream(self):
        pos = self.start
        while True:
            epoch, off = divmod(pos, self.n)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            for i in torch.randperm(self.n, generator=gen)[off:].tolist():
                yield epoch * self.n + int(i)
            pos = (epoch + 1) * self.n

    def __iter__(self):  # type: ignore[override]
        for k, idx in enumerate(self._stream()):
            if (k // self.batch_size) % self.world == self.rank:
                yield idx


class ForecastDataset(Dataset):
    """Random training samples over ``patient_ids`` (patients with fewer than 2 scans are skipped).

    Item ``i`` is patient ``i % n``; its randomness comes from ``(seed, epoch, i)`` only, so a sample is
    reproducible in any worker and after resume. Call `set_epoch` before each epoch's iterator is created.
    """

    def __init__(self, store_url: str, patient_ids: Sequence[str], cfg: DataConfig, seed: int = 0,
                 train: bool = True, reader: StoreReader | None = None) -> None:
        problems = cfg.check()
        if problems:
            raise ValueError("bad DataConfig: " + "; ".join(problems))
        self.reader = reader if reader is not None else StoreReader(store_url, cfg.read_cache_mb,
                                                                    cfg.cache_margin)
        self.cfg = cfg
        self.seed = int(seed)
        self.epoch = 0
        self.train = train
        self.patient_ids = [p for p in patient_ids if len(self.reader.days(p)) >= 2]
        self.skipped = sorted(set(patient_ids) - set(self.patient_ids))
        self._augment = make_augment(cfg.augment) if (train and cfg.augment is not None) else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.patient_ids) * self.cfg.samples_per_patient

    def draw_indices(self, n_scans: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """Random (context, targets): split point s in 1..T-1, context = sorted random subset of 1..K scans
        before s, targets = sorted random subset of up to Q scans from s on."""
        s = int(rng.integers(1, n_scans))
        n_ctx = int(rng.integers(1, min(self.cfg.max_context, s) + 1))
        ctx = sorted(int(i) for i in rng.choice(s, size=n_ctx, replace=False))
        n_tgt = min(self.cfg.n_queries, n_scans - s)
        n_tgt = int(rng.integers(1, n_tgt + 1))
        tgt = sorted(int(i) for i in s + rng.choice(n_scans - s, size=n_tgt, replace=False))
        return ctx, tgt

    def __getitem__(self, index: int) -> Sample:
        # Indices past len() continue into later epochs (an endless sampler encodes epoch * len + i).
        epoch, i = divmod(int(index), len(self))
        pid = self.patient_ids[i % len(self.patient_ids)]
        rng = np.random.default_rng([self.seed, self.epoch + epoch, i])
        ctx, tgt = self.draw_indices(len(self.reader.days(pid)), rng)
        return build_sample(self.reader, pid, ctx, tgt, self.cfg, self.cfg.n_queries,
                            rng if self.train else None, self._augment)


def enumerate_targets(store_url: str, patient_ids: Sequence[str] | None = None, max_context: int = 3,
                      pairs: Literal["next", "all"] = "next") -> list[EvalItem]:
    """Every forecasting target of a store, deterministically, patients in the order of their scans' content
    (``splits.content_order``: the same under any pseudonym key, so a subset taken from this list is too).

    pairs="next": for each scan j >= 1, context = the up to ``max_context`` most recent scans before j.
    pairs="all": additionally every longer horizon: for each scan j and each cut 1 <= i <= j, context = the up to
    ``max_context`` most recent scans before i, target j (the "next" items are the i = j ones). With visits every
    few months only "all" fills the horizon bins beyond the typical visit gap.
    """
    if pairs not in ("next", "all"):
        raise ValueError(f"pairs must be 'next' or 'all', got {pairs!r}")
    reader = StoreReader(store_url)
    pids = content_order(reader.store.patient_ids() if patient_ids is None else patient_ids, store_url)
    items = []
    for pid in pids:
        days = reader.days(pid)
        for j in range(1, len(days)):
            for i in (range(1, j + 1) if pairs == "all" else (j,)):
                ctx = tuple(range(max(0, i - max_context), i))
                items.append(EvalItem(pid, ctx, j, float(days[j] - days[ctx[-1]]), float(days[j])))
    return items


class EvalDataset(Dataset):
    """Deterministic samples (Q = 1, no jitter, no augmentation) for a list of `EvalItem`."""

    def __init__(self, store_url: str, items: Sequence[EvalItem], cfg: DataConfig) -> None:
        self.reader = StoreReader(store_url, cfg.read_cache_mb, cfg.cache_margin)
        self.items = list(items)
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        it = self.items[index]
        return build_sample(self.reader, it.patient_id, it.context_idx, (it.target_idx,), self.cfg, 1)


def collate_batch(samples: Sequence[Sample]) -> Batch:
    """Stack samples into a `Batch` (shapes in longitudinal.models.base)."""
    return Batch(
        context_images=torch.stack([s.context_images for s in samples]),
        context_labels=torch.stack([s.context_labels for s in samples]),
        context_times=torch.stack([s.context_times for s in samples]),
        context_mask=torch.stack([s.context_mask for s in samples]),
        query_times=torch.stack([s.query_times for s in samples]),
        query_mask=torch.stack([s.query_mask for s in samples]),
        target_images=torch.stack([s.target_images for s in samples]),
        target_labels=torch.stack([s.target_labels for s in samples]),
        voxel_volume_ml=torch.tensor([s.voxel_volume_ml for s in samples], dtype=torch.float32),
        conditions=Conditions(treatments=encode_treatments([s.events for s in samples]),
                              spacing_mm=torch.tensor([s.spacing_mm for s in samples], dtype=torch.float32)),
    )


@dataclass
class EvalBatch:
    """A Batch plus what evaluation needs beside it: brain masks [B, Q, D, H, W] and per-sample provenance."""

    batch: Batch
    brain_mask: Tensor
    samples: list[Sample]


def collate_eval(samples: Sequence[Sample]) -> EvalBatch:
    """Like `collate_batch`, keeping brain masks and provenance (patient, indices, crop, spacing)."""
    return EvalBatch(batch=collate_batch(samples), brain_mask=torch.stack([s.brain_mask for s in samples]),
                     samples=list(samples))
