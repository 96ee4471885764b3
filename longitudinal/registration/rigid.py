"""SimpleITK rigid (optionally affine) registration of a session to the patient's reference scan, and its QC.

Recipe (why each part: docs/decisions/registration-qc.md and docs/decisions/registration-speed.md): both images
are homomorphically high-passed (``log_highpass``) and block-averaged into a 4/2/1 pyramid, once per image (the
reference's pyramid is kept for the patient's next session). Each level is its own RegularStepGradientDescent run
(scales from the physical shift) starting where the coarser one stopped, on a few thousand random points inside
the reference's head (background points cost as much and say little): mean squares on the two coarse levels (the
same contrast, gain and bias removed by the high-pass; a wider capture range than mutual information at a lower
cost per point), Mattes mutual information (50 bins) on the finest. The transform starts geometry-centred.

The high-pass is the log intensity minus its Gaussian-smoothed local mean inside the head. Each visit carries its
own smooth multiplicative bias field, and MI on raw intensities is pulled by it (about 1 mm TRE on the synthetic
cohort at 4 mm; N4 halved it, the high-pass brought it to about 0.3 mm at a fraction of N4's cost).

Conventions: ITK's registration transform maps points of the FIXED (reference) physical space onto the MOVING
(session) physical space, in LPS. ``RegistrationResult.to_reference_ras`` is its inverse in RAS: native session
point -> reference point, which is what the store keeps (``SessionRecord.transform_to_reference``).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from longitudinal.registration.geometry import lps_to_ras, transform_to_matrix


@dataclass(frozen=True)
class RegistrationConfig:
    """Knobs of the registration, per pyramid level where a tuple (coarsest first).

    shrink_factors: block-averaging factor of each level (1 = the grid registered on). metrics: "mean_squares"
    or "mattes" per level. samples: metric points per level inside the reference's head (all head voxels when it
    has fewer). first_step_mm / min_step_mm: the optimiser's first and last step per level (scaled parameters,
    about mm of the largest voxel shift); the coarse levels converge tightly, which costs little there and is
    what gives the finest level a start it can refine in a few steps. iterations: cap per level; relaxation: the
    step's factor when the gradient turns back. ``qc_max_metric``: sessions with ``1 - NCC`` above it fail QC.
    ``qc_exclude_margin_mm``: the tumours (and resection cavities) of both scans, dilated by this margin, are
    left out of the QC metric (``qc_exclusion``): tissue that changes between visits says nothing about the
    alignment."""

    kind: Literal["rigid", "affine"] = "rigid"
    histogram_bins: int = 50
    seed: int = 20240601
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    metrics: tuple[Literal["mean_squares", "mattes"], ...] = ("mean_squares", "mean_squares", "mattes")
    samples: tuple[int, ...] = (2000, 5000, 6000)
    first_step_mm: tuple[float, ...] = (2.0, 0.25, 0.1)
    min_step_mm: tuple[float, ...] = (0.001, 0.0001, 0.01)
    iterations: int = 200
    relaxation: float = 0.5
    highpass_sigma_mm: float | None = 8.0
    qc_max_metric: float = 0.25
    qc_mask_threshold: float = 0.05
    qc_exclude_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("rigid", "affine"):
            problems.append(f"kind must be one of 'rigid', 'affine', got {self.kind!r}")
        levels = len(self.shrink_factors)
        if levels == 0 or any(len(t) != levels for t in (self.metrics, self.samples, self.first_step_mm,
                                                          self.min_step_mm)):
            problems.append("shrink_factors, metrics, samples, first_step_mm and min_step_mm must have the same "
                            "length (one entry per pyramid level, at least one)")
        if any(m not in ("mean_squares", "mattes") for m in self.metrics):
            problems.append(f"metrics must each be 'mean_squares' or 'mattes', got {self.metrics}")
        if any(int(f) != f or f < 1 for f in self.shrink_factors):
            problems.append(f"shrink_factors must be integers >= 1, got {self.shrink_factors}")
        if any(n < 1 for n in self.samples):
            problems.append(f"samples must be positive, got {self.samples}")
        if any(not 0 < lo <= hi for lo, hi in zip(self.min_step_mm, self.first_step_mm, strict=False)):
            problems.append("steps must satisfy 0 < min_step_mm <= first_step_mm at every level")
        if self.iterations < 1:
            problems.append(f"iterations must be >= 1, got {self.iterations}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of registering one moving image to a fixed one.

    transform: the ITK transform (fixed LPS point -> moving LPS point), for ``sitk.Resample``.
    to_reference_ras: 4x4, native (moving) RAS mm point -> reference (fixed) RAS mm point.
    optimizer_metric: the finest level's metric value (Mattes MI by default: negative; lower is better).
    stop: the optimiser's stop condition (finest level), for logs.
    """

    transform: sitk.Transform
    to_reference_ras: np.ndarray
    optimizer_metric: float
    stop: str


@dataclass(frozen=True)
class _Level:
    """One pyramid level: the prepared image (float32), its head mask (uint8) and the mask's voxel count."""

    image: sitk.Image
    mask: sitk.Image
    head_voxels: int


def _on_grid(array: np.ndarray, grid: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(grid)
    return out


def _local_mean(values: np.ndarray, mask: np.ndarray, grid: sitk.Image, sigma_mm: float) -> np.ndarray:
    """Gaussian-weighted mean of ``values`` over ``mask`` (normalised convolution; zero beyond the grid), float32,
    the grid's (z, y, x) shape. ``sigma_mm`` in mm, per axis from the grid's spacing.

    Why on a coarser grid: the mean varies over ``sigma_mm`` (8 mm), so it is computed on blocks of about a
    quarter of sigma and interpolated back (linear), with sigma reduced by the blocks' own spread: a fifth of the
    cost of ITK's recursive Gaussian on the full grid; the log high-pass moves by less than 0.01 at 99 % of head
    voxels."""
    from scipy import ndimage

    spacing = np.asarray(grid.GetSpacing(), dtype=float)[::-1]  # (z, y, x) mm
    factor = max(1, int(sigma_mm / (2.0 * spacing.max())))
    num, den = values, mask.astype(np.float32)
    if factor > 1:
        num = sitk.GetArrayFromImage(sitk.BinShrink(_on_grid(num, grid), [factor] * 3))
        den = sitk.GetArrayFromImage(sitk.BinShrink(_on_grid(den, grid), [factor] * 3))
    block = factor * spacing if factor > 1 else np.zeros(3)
    sigma_vox = np.sqrt(np.maximum(sigma_mm**2 - block**2 / 12.0, (0.5 * sigma_mm) ** 2)) / (spacing * factor)
    num = ndimage.gaussian_filter(num, sigma_vox, mode="constant", truncate=3.0)
    den = ndimage.gaussian_filter(den, sigma_vox, mode="constant", truncate=3.0)
    ratio = num / np.maximum(den, np.float32(1e-6))
    return ratio if factor == 1 else _upsample(ratio, factor, values.shape)


def _upsample(coarse: np.ndarray, factor: int, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of ``coarse`` (block means of ``factor`` voxels per axis, as ``sitk.BinShrink`` makes
    them) back onto the fine grid of ``shape``; beyond the outermost block centres the nearest value. One axis
    at a time, which costs a few passes over the fine grid (ITK's resampler costs several times more)."""
    out = coarse
    for axis, n in enumerate(shape):
        pos = np.clip((np.arange(n) - (factor - 1) / 2.0) / factor, 0.0, coarse.shape[axis] - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, coarse.shape[axis] - 1)
        w = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        a, b = np.take(out, lo, axis=axis), np.take(out, hi, axis=axis)
        b -= a
        b *= w
        a += b
        out = a
    return out


def log_highpass(image: sitk.Image, sigma_mm: float, exclude: np.ndarray | None = None) -> sitk.Image:
    """``log(I) - G_sigma * log(I)`` inside the head (normalised convolution: the local mean uses head voxels
    only, ``_local_mean``), 0 outside; returned as ``exp`` of that, float32, same grid. The head is voxels above
    10 % of the 99th percentile. Removes smooth multiplicative fields (bias, scanner gain) while keeping anatomy
    edges.

    exclude: bool array of the image's (z, y, x) shape; those voxels are left out of the head (0 in the output,
    and their intensities never enter a local mean)."""
    arr = sitk.GetArrayViewFromImage(image)
    hi = float(np.percentile(arr, 99.0))
    mask = arr > 0.1 * hi if hi > 0 else arr > arr.min()
    if exclude is not None:
        mask &= ~exclude
    inside = np.flatnonzero(mask)  # logs and exps of the head only: it is a fifth of a typical field of view
    # A floor at 1 % of the bright end keeps clipped-to-zero voxels from dominating the log.
    head_log = np.log(np.maximum(arr.ravel()[inside], np.float32(0.01 * hi if hi > 0 else 1e-6)),
                      dtype=np.float32)
    log = np.zeros(arr.shape, dtype=np.float32)
    log.ravel()[inside] = head_log
    head_log -= _local_mean(log, mask, image, sigma_mm).ravel()[inside]
    out = np.zeros(arr.shape, dtype=np.float32)
    out.ravel()[inside] = np.exp(np.clip(head_log, -5.0, 5.0, out=head_log), out=head_log)
    return _on_grid(out, image)


def _crop_to_mask(image: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """``image`` and ``mask`` cut to the mask's bounding box plus a voxel (geometry kept): ITK visits every voxel
    of the reference grid when it sets up a level, so the head's box is all it needs to see."""
    head = sitk.GetArrayViewFromImage(mask) > 0
    if not head.any():
        return image, mask
    box = []
    for axis in range(3):  # x, y, z of SimpleITK = axes 2, 1, 0 of the array
        along = np.flatnonzero(head.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
        box.append(slice(max(int(along[0]) - 1, 0), min(int(along[-1]) + 2, image.GetSize()[axis])))
    return image[box[0], box[1], box[2]], mask[box[0], box[1], box[2]]


def _pyramid(image: sitk.Image, config: RegistrationConfig, crop: bool = False) -> tuple[_Level, ...]:
    """The registration's view of ``image`` (float32): high-passed when configured, head-masked (voxels above
    10 % of the 99th percentile; a block is in the head when any of its voxels is), block-averaged per level.
    crop: each level cut to its head's bounding box (for the reference, whose head is all the metric samples)."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    if config.highpass_sigma_mm:
        image = log_highpass(image, config.highpass_sigma_mm)
        head = sitk.GetArrayViewFromImage(image) > 0
    else:
        arr = sitk.GetArrayViewFromImage(image)
        head = arr > 0.1 * float(np.percentile(arr, 99.0))
    mask = _on_grid(head.astype(np.float32), image)
    levels = []
    for f in config.shrink_factors:
        level_image = image if f == 1 else sitk.BinShrink(image, [int(f)] * 3)
        level_mask = sitk.Cast((mask if f == 1 else sitk.BinShrink(mask, [int(f)] * 3)) > 0, sitk.sitkUInt8)
        if crop:
            level_image, level_mask = _crop_to_mask(level_image, level_mask)
        levels.append(_Level(level_image, level_mask, int(sitk.GetArrayViewFromImage(level_mask).sum())))
    return tuple(levels)


# The reference scan's pyramid, by content: ingest registers every session of a patient to the same reference.
_CACHE: OrderedDict[bytes, tuple[_Level, ...]] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4  # one per concurrent patient is enough


def _reference_pyramid(image: sitk.Image, config: RegistrationConfig) -> tuple[_Level, ...]:
    """``_pyramid`` of ``image``, reused while the same image content and geometry come back."""
    h = hashlib.blake2b(digest_size=20)
    h.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).data)
    h.update(repr((image.GetPixelIDValue(), image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                   image.GetDirection(), config.highpass_sigma_mm, config.shrink_factors)).encode())
    key = h.digest()
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    levels = _pyramid(image, config, crop=True)
    with _CACHE_LOCK:
        _CACHE[key] = levels
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return levels


def _run(
    fixed: tuple[_Level, ...], moving: tuple[_Level, ...], transform: sitk.Transform, config: RegistrationConfig
) -> tuple[float, str]:
    """Optimise ``transform`` in place, level by level (coarsest first). Returns (metric, stop) of the last."""
    value, stop = float("nan"), ""
    for k, (f, m) in enumerate(zip(fixed, moving, strict=True)):
        reg = sitk.ImageRegistrationMethod()
        if config.metrics[k] == "mean_squares":
            reg.SetMetricAsMeanSquares()
        else:
            reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.histogram_bins)
        fraction = config.samples[k] / max(f.head_voxels, 1)
        if fraction >= 1.0:
            reg.SetMetricSamplingStrategy(reg.NONE)
        else:
            reg.SetMetricSamplingStrategy(reg.RANDOM)
            reg.SetMetricSamplingPercentage(fraction, config.seed)
        reg.SetMetricFixedMask(f.mask)
        if config.shrink_factors[k] == 1:
            # On the finest grid, gradients at the sampled points only: a gradient image of the whole grid would
            # cost more than the few thousand points need. Coarse grids are small, and their smoothed gradient
            # images make the coarse levels both cheaper per point and steadier than central differences.
            reg.MetricUseFixedImageGradientFilterOff()
            reg.MetricUseMovingImageGradientFilterOff()
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=config.first_step_mm[k],
            minStep=config.min_step_mm[k],
            numberOfIterations=config.iterations,
            relaxationFactor=config.relaxation,
            gradientMagnitudeTolerance=1e-8,
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetInitialTransform(transform, inPlace=True)
        reg.Execute(f.image, m.image)
        value, stop = float(reg.GetMetricValue()), reg.GetOptimizerStopConditionDescription()
    return value, stop


def register(
    fixed: sitk.Image, moving: sitk.Image, config: RegistrationConfig | None = None
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (both 3D, any grids; physical space decides).

    Rigid: a 6-parameter Euler transform. Affine: the rigid result refined by a 12-parameter affine.
    """
    config = config or RegistrationConfig()
    fixed_levels = _reference_pyramid(fixed, config)
    moving_levels = _pyramid(moving, config)
    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    rigid = sitk.Euler3DTransform(rigid)
    value, stop = _run(fixed_levels, moving_levels, rigid, config)
    transform: sitk.Transform = rigid
    if config.kind == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        value, stop = _run(fixed_levels, moving_levels, affine, config)
        transform = affine
    fixed_to_moving_ras = lps_to_ras(transform_to_matrix(transform))
    return RegistrationResult(
        transform=transform,
        to_reference_ras=np.linalg.inv(fixed_to_moving_ras),
        optimizer_metric=value,
        stop=stop,
    )


def resample_onto(
    image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None, label: bool = False
) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference`` through ``transform`` (reference point -> image
    point; None = identity). Linear for images (float32), nearest neighbour for labels (uint8); 0 outside."""
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    if label:
        return sitk.Resample(image, reference, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # ITK interpolates in double whatever the input type, so an integer scan needs no float32 copy first.
    return sitk.Resample(image, reference, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def qc_metric(
    fixed: np.ndarray, moved: np.ndarray, mask_threshold: float = 0.05, exclude: np.ndarray | None = None
) -> float:
    """Registration QC: ``1 - NCC`` between two images on the same grid, inside the head of ``fixed``
    (voxels above ``mask_threshold`` of its range) minus ``exclude``. 0 = identical up to gain/offset,
    1 = unrelated.

    fixed, moved: arrays of the same shape (any dims), intensities normalised or not; exclude: bool, same
    shape, voxels left out (None: none).
    """
    if fixed.shape != moved.shape:
        raise ValueError(f"qc_metric needs equal shapes, got {fixed.shape} and {moved.shape}")
    lo, hi = float(np.min(fixed)), float(np.max(fixed))
    mask = fixed > lo + mask_threshold * (hi - lo)
    if exclude is not None:
        mask &= ~exclude
    if mask.sum() < 10:
        return 1.0
    a = fixed[mask].astype(np.float64)
    b = moved[mask].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    if denom == 0:
        return 1.0
    return float(1.0 - (a * b).sum() / denom)


def qc_exclusion(
    labels: list[np.ndarray | None], spacing_zyx_mm: tuple[float, float, float], margin_mm: float
) -> np.ndarray | None:
    """Voxels the QC metric leaves out: the union of the tumour labels (any label > 0) of the scans compared,
    all on one grid (z, y, x), dilated by ``margin_mm`` (Euclidean, in mm). None when no label marks anything.

    Why: between a pre-operative reference and a post-operative scan the tumour vanishes and a resection cavity
    appears inside the margin around the old tumour (radiotherapy and regrowth change it too). That tissue
    differs even when the alignment is perfect, so it is judged on the anatomy that should not change
    (``benchmarks/registration_qc.py --preset hard``, tumours past 150 ml, half resected: registered sessions
    up to 0.65 on the high-passed images, at most 0.074 with the tumours left out; misregistered by 4 mm or 4
    degrees 0.331 and above)."""
    union: np.ndarray | None = None
    for label in labels:
        if label is not None:
            union = (label > 0) if union is None else union | (label > 0)
    if union is None or not union.any():
        return None
    from scipy import ndimage

    # The distance transform runs on the labels' bounding box grown by the margin (and a voxel): every voxel
    # outside it is farther than the margin from any label voxel, so the result is the same at a fraction of
    # the cost of the whole grid.
    box = []
    for axis, step in enumerate(spacing_zyx_mm):
        hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        pad = int(math.ceil(margin_mm / step)) + 1
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + pad + 1, union.shape[axis])))
    out = np.zeros(union.shape, dtype=bool)
    out[tuple(box)] = ndimage.distance_transform_edt(~union[tuple(box)], sampling=spacing_zyx_mm) <= margin_mm
    return out


def registration_qc(
    fixed: sitk.Image, moved: sitk.Image, config: RegistrationConfig | None = None,
    exclude: np.ndarray | None = None,
) -> float:
    """QC of a registration: ``qc_metric`` between ``fixed`` and ``moved`` (same grid) after the same log
    high-pass the registration uses (when configured), with the voxels of ``exclude`` (bool, the grid's
    (z, y, x) shape; ``qc_exclusion``) left out of both the high-pass and the metric. Why on high-passed images:
    docs/decisions/registration-qc.md.
    """
    config = config or RegistrationConfig()
    if config.highpass_sigma_mm:
        fixed = log_highpass(sitk.Cast(fixed, sitk.sitkFloat32), config.highpass_sigma_mm, exclude)
        moved = log_highpass(sitk.Cast(moved, sitk.sitkFloat32), config.highpass_sigma_mm, exclude)
    return qc_metric(sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(moved), config.qc_mask_threshold,
                     exclude)
