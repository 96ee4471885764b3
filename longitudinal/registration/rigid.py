"""SimpleITK rigid (optionally affine) registration of a session to the patient's reference scan, and its QC.

Recipe (why each part: docs/decisions/registration-qc.md): Mattes mutual information (50 bins) on a 5 % random
sample (at least ``min_samples`` points), RegularStepGradientDescent with scales estimated from the physical
shift, a 4/2/1 shrink pyramid smoothed with sigmas 2/1/0 voxels, and a geometry-centred initial transform.

Before the metric sees them, both images are homomorphically high-passed (``log_highpass``): the log intensity
minus its Gaussian-smoothed local mean inside the head. Each visit carries its own smooth multiplicative bias
field, and MI on raw intensities is pulled by it (about 1 mm TRE on the synthetic cohort at 4 mm; N4 halved it,
the high-pass brought it to about 0.3 mm at a fraction of N4's cost).

Conventions: ITK's registration transform maps points of the FIXED (reference) physical space onto the MOVING
(session) physical space, in LPS. ``RegistrationResult.to_reference_ras`` is its inverse in RAS: native session
point -> reference point, which is what the store keeps (``SessionRecord.transform_to_reference``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from longitudinal.registration.geometry import lps_to_ras, transform_to_matrix


@dataclass(frozen=True)
class RegistrationConfig:
    """Knobs of the registration. ``qc_max_metric``: sessions with ``1 - NCC`` above it fail QC.
    ``qc_exclude_margin_mm``: the tumours (and resection cavities) of both scans, dilated by this margin, are
    left out of the QC metric (``qc_exclusion``): tissue that changes between visits says nothing about the
    alignment."""

    kind: Literal["rigid", "affine"] = "rigid"
    histogram_bins: int = 50
    sampling_fraction: float = 0.05
    min_samples: int = 40000
    seed: int = 20240601
    iterations: int = 200
    learning_rate: float = 1.0
    min_step: float = 1e-4
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    highpass_sigma_mm: float | None = 8.0
    qc_max_metric: float = 0.25
    qc_mask_threshold: float = 0.05
    qc_exclude_margin_mm: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("rigid", "affine"):
            problems.append(f"kind must be one of 'rigid', 'affine', got {self.kind!r}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            problems.append("shrink_factors and smoothing_sigmas must have the same length")
        if not 0 < self.sampling_fraction <= 1:
            problems.append(f"sampling_fraction must be in (0, 1], got {self.sampling_fraction}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of registering one moving image to a fixed one.

    transform: the ITK transform (fixed LPS point -> moving LPS point), for ``sitk.Resample``.
    to_reference_ras: 4x4, native (moving) RAS mm point -> reference (fixed) RAS mm point.
    optimizer_metric: final Mattes MI value reported by the optimiser (negative; lower is better).
    stop: the optimiser's stop condition, for logs.
    """

    transform: sitk.Transform
    to_reference_ras: np.ndarray
    optimizer_metric: float
    stop: str


def log_highpass(image: sitk.Image, sigma_mm: float, exclude: np.ndarray | None = None) -> sitk.Image:
    """``log(I) - G_sigma * log(I)`` inside the head (normalised convolution: the local mean uses head voxels
    only), 0 outside; returned as ``exp`` of that, float32, same grid. The head is voxels above 10 % of the
    99th percentile. Removes smooth multiplicative fields (bias) while keeping anatomy edges.

    exclude: bool array of the image's (z, y, x) shape; those voxels are left out of the head (0 in the output,
    and their intensities never enter a local mean)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    hi = float(np.percentile(arr, 99.0))
    mask = arr > 0.1 * hi if hi > 0 else arr > arr.min()
    if exclude is not None:
        mask &= ~exclude
    # A floor at 1 % of the bright end keeps clipped-to-zero voxels from dominating the log.
    log = np.where(mask, np.log(np.maximum(arr, 0.01 * hi if hi > 0 else 1e-6)), 0.0)

    def smooth(a: np.ndarray) -> np.ndarray:
        im = sitk.GetImageFromArray(a)
        im.CopyInformation(image)
        return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(im, sigma_mm))

    local = smooth(log) / np.maximum(smooth(mask.astype(np.float64)), 1e-6)
    out = np.where(mask, np.exp(np.clip(log - local, -5.0, 5.0)), 0.0).astype(np.float32)
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


def _run(
    fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, config: RegistrationConfig
) -> tuple[float, str]:
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # Small grids (e.g. 4 mm) get a larger fraction: ~40k samples keep MI's noise below a tenth of a voxel.
    n_voxels = float(np.prod(fixed.GetSize()))
    fraction = min(1.0, max(config.sampling_fraction, config.min_samples / n_voxels))
    reg.SetMetricSamplingPercentage(fraction, config.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=config.learning_rate,
        minStep=config.min_step,
        numberOfIterations=config.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(config.shrink_factors))
    reg.SetSmoothingSigmasPerLevel(list(config.smoothing_sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=True)
    reg.Execute(fixed, moving)
    return float(reg.GetMetricValue()), reg.GetOptimizerStopConditionDescription()


def register(
    fixed: sitk.Image, moving: sitk.Image, config: RegistrationConfig | None = None
) -> RegistrationResult:
    """Register ``moving`` onto ``fixed`` (both 3D, any grids; physical space decides).

    Rigid: a 6-parameter Euler transform. Affine: the rigid result refined by a 12-parameter affine.
    """
    config = config or RegistrationConfig()
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    if config.highpass_sigma_mm:
        fixed = log_highpass(fixed, config.highpass_sigma_mm)
        moving = log_highpass(moving, config.highpass_sigma_mm)
    rigid = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY
    )
    rigid = sitk.Euler3DTransform(rigid)
    value, stop = _run(fixed, moving, rigid, config)
    transform: sitk.Transform = rigid
    if config.kind == "affine":
        affine = sitk.AffineTransform(3)
        affine.SetCenter(rigid.GetCenter())
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        value, stop = _run(fixed, moving, affine, config)
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
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), reference, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)


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
    (``benchmarks/registration_qc.py --patients 8``, half treated: registered sessions 0.037-0.214 on the
    high-passed images, 0.036-0.062 with the tumours left out; spoiled by 4 mm or 4 degrees 0.362 and above)."""
    union: np.ndarray | None = None
    for label in labels:
        if label is not None:
            union = (label > 0) if union is None else union | (label > 0)
    if union is None or not union.any():
        return None
    from scipy import ndimage

    return ndimage.distance_transform_edt(~union, sampling=spacing_zyx_mm) <= margin_mm


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
