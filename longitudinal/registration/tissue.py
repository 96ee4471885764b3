"""White- and grey-matter probability maps of a patient without downloads: the MNI152 templates shipped inside
nilearn (ICBM 2009a symmetric, 1 mm: T1, grey and white matter, the maps the synthetic cohort grows its tumours
on), registered affinely to the patient's baseline scan with SimpleITK.

Recipe (coarse on purpose: diffusivity maps need millimetres, not sub-voxel accuracy, and ingest may spend about
a second on them):

- the template T1 is block-averaged to ``REGISTRATION_MM`` (4 mm) once per process; the baseline scan is
  block-averaged by the whole factor closest to the same size;
- a 12-parameter affine (head sizes differ) maps the scan's physical space onto the template's, initialised by
  aligning the intensity centres of mass; Mattes mutual information (32 bins; T1c against a T1 template: the
  contrasts differ) on a seeded 20 % random sample, regular-step gradient descent with scales from the physical
  shift, two levels (shrink 2 then 1 of the 4 mm images, smoothing 1 then 0 voxels);
- the white- and grey-matter templates, block-averaged to 2 mm and scaled to [0, 1] by their maximum (as nilearn
  does), are resampled onto the baseline grid (linear; 0 outside the template);
- QC, so that a failed registration never becomes tissue: the final metric must reach ``MAX_METRIC``, the
  volume scale of the affine (its determinant) must lie in [``MIN_SCALE``, ``MAX_SCALE``], and at least
  ``MIN_BRAIN_IN_HEAD`` of the registered parenchyma
  (white + grey >= 0.3) must lie inside the head (voxels above 10 % of the scan's 99th percentile). A failure
  raises ``TissueError``; ingest then stores the patient without tissue maps.

Arrays follow the store: (z, y, x) voxels, ``affine`` maps voxel (x, y, z) to RAS mm. Output channel order
``TISSUE_CHANNELS`` = (white, grey).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from longitudinal.registration.geometry import grid_from_affine, image_on_grid
from storage.schema import TISSUE_CHANNELS, PatientRecord

REGISTRATION_MM = 4.0
OUTPUT_TEMPLATE_MM = 2
MIN_SCALE, MAX_SCALE = 0.6, 1.6
MIN_BRAIN_IN_HEAD = 0.9
# Mattes MI at convergence (negative; lower is better): the synthetic cohort's heads reach about -1.0, a textured
# sphere phantom -0.25 and noise -0.08. Not calibrated on clinical scans.
MAX_METRIC = -0.4
PARENCHYMA = 0.3  # white + grey probability from which a voxel is brain tissue (the synthetic cohort's)
SEED = 20261206
_FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
          "grey": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
          "white": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}


class TissueError(RuntimeError):
    """The templates could not be registered to the scan (or the result failed QC)."""


def _template_dir() -> Path:
    # find_spec locates the package without importing it: importing nilearn costs seconds, reading its files not.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise TissueError("nilearn is not installed: it ships the MNI152 tissue templates")
    return Path(spec.origin).parent / "datasets" / "data"


def _read_scaled(name: str) -> sitk.Image:
    """A 1 mm template as float32 scaled to [0, 1] by its maximum."""
    image = sitk.ReadImage(str(_template_dir() / _FILES[name]), sitk.sitkFloat32)
    top = float(sitk.GetArrayViewFromImage(image).max())
    return sitk.Cast(image / top, sitk.sitkFloat32) if top > 0 else image


@lru_cache(maxsize=1)
def templates() -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """(T1 at REGISTRATION_MM, white matter at 2 mm, grey matter at 2 mm), block means of the 1 mm maps; cached
    per process (about 0.2 s)."""
    t1 = sitk.BinShrink(_read_scaled("t1"), [int(REGISTRATION_MM)] * 3)
    white, grey = (sitk.BinShrink(_read_scaled(n), [OUTPUT_TEMPLATE_MM] * 3) for n in ("white", "grey"))
    return t1, white, grey


def _register(fixed: sitk.Image, moving: sitk.Image) -> tuple[sitk.AffineTransform, float]:
    """The affine mapping ``fixed`` physical points onto ``moving`` ones (module docstring's recipe) and the
    final metric value."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=100,
                                                 gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(init, inPlace=False)
    out = reg.Execute(fixed, moving)
    # Execute returns a composite holding the optimised affine.
    if isinstance(out, sitk.CompositeTransform):
        out = out.GetBackTransform() if out.GetNumberOfTransforms() == 1 else out
    return sitk.AffineTransform(out), float(reg.GetMetricValue())


def register_tissue(image: np.ndarray, spacing_mm: tuple[float, float, float], affine: np.ndarray) -> np.ndarray:
    """(2, Z, Y, X) float32 white- and grey-matter probabilities in [0, 1] on the grid of the baseline scan
    ``image`` ((Z, Y, X) intensities, a T1-weighted channel), whose voxel size is ``spacing_mm`` (z, y, x) and
    whose ``affine`` maps voxel (x, y, z) to RAS mm. Raises TissueError when the registration fails or fails QC
    (module docstring)."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3 or not np.isfinite(image).all():
        raise TissueError(f"need a finite (Z, Y, X) image, got shape {image.shape}")
    grid = grid_from_affine(np.asarray(affine, dtype=float), tuple(reversed(image.shape)))
    fixed_full = image_on_grid(image, grid)
    factor = max(1, int(round(REGISTRATION_MM / min(float(s) for s in spacing_mm))))
    fixed = sitk.BinShrink(fixed_full, [factor] * 3) if factor > 1 else fixed_full
    t1, white, grey = templates()
    try:
        transform, metric = _register(fixed, t1)
    except RuntimeError as exc:  # e.g. every sample maps outside the template
        raise TissueError(f"template registration failed: {str(exc).strip().splitlines()[-1][:200]}") from exc
    if metric > MAX_METRIC:
        raise TissueError(f"template registration implausible: mutual information {metric:.2f} > {MAX_METRIC}")
    scale = abs(float(np.linalg.det(np.asarray(transform.GetMatrix()).reshape(3, 3))))
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise TissueError(f"template registration implausible: volume scale {scale:.2f} outside "
                          f"[{MIN_SCALE}, {MAX_SCALE}]")
    maps = np.stack([sitk.GetArrayFromImage(sitk.Resample(m, fixed_full, transform, sitk.sitkLinear, 0.0,
                                                          sitk.sitkFloat32)) for m in (white, grey)])
    maps = np.clip(maps, 0.0, 1.0).astype(np.float32)
    brain = maps.sum(0) >= PARENCHYMA
    head = image > 0.1 * float(np.percentile(image, 99))
    inside = float((brain & head).sum()) / max(int(brain.sum()), 1)
    if not brain.any() or inside < MIN_BRAIN_IN_HEAD:
        raise TissueError(f"template registration implausible: {inside:.0%} of the registered brain lies in the "
                          f"head (need {MIN_BRAIN_IN_HEAD:.0%})")
    return maps


def reference_time(record: PatientRecord) -> int:
    """The time index of the patient's reference (baseline) scan: the session whose transform to the reference
    is the identity (the first one when none is)."""
    for t, s in enumerate(record.sessions):
        if np.array_equal(np.asarray(s.transform_to_reference, dtype=float), np.eye(4)):
            return t
    return 0


def attach_tissue(record: PatientRecord | None, current: PatientRecord | None = None,
                  channels: tuple[str, ...] = ("T1c", "T1")) -> PatientRecord | None:
    """``record`` with tissue maps (``PatientRecord.tissue``) when it has none: those of ``current`` (the
    committed version) when the grid is unchanged, else registered to the reference scan's first channel named in
    ``channels`` (else its channel 0). A registration that fails leaves the record without tissue (it never stops
    an ingest). None stays None."""
    if record is None or record.tissue is not None:
        return record
    grid = tuple(record.image.shape[2:])
    if (current is not None and current.tissue is not None and tuple(current.tissue.shape[1:]) == grid
            and np.allclose(current.reference_affine, record.reference_affine)):
        return dataclasses.replace(record, tissue=current.tissue)
    ch = next((record.channels.index(c) for c in channels if c in record.channels), 0)
    t = reference_time(record)
    try:
        tissue = register_tissue(record.image[t, ch], record.spacing_mm, record.reference_affine)
    except TissueError:
        return record
    return dataclasses.replace(record, tissue=tissue)


__all__ = ["TISSUE_CHANNELS", "TissueError", "attach_tissue", "reference_time", "register_tissue", "templates"]
