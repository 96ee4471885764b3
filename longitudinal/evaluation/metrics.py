"""Per-target forecast metrics (Metrics Reloaded: overlap + boundary + volume, plus image and probabilistic
scores). Masks are boolean [D, H, W] tensors on the crop grid; spacing is (z, y, x) mm; volumes are ml.

Empty masks, handled explicitly:
- Dice: both empty -> 1.0 (a correct "no tumour"); one empty -> 0.0.
- HD95: both empty -> 0.0 mm; exactly one empty -> NaN (undefined: there is no surface to measure from).
  Aggregates average the defined values and report how many were undefined (``hd95_undefined``), so a model
  that forecasts nothing is penalised by Dice and volume error, not hidden by HD95.
- 1 - IoU distance (energy distance): both empty -> 0.0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor


def dice(pred: Tensor, target: Tensor) -> float:
    """Dice overlap of two boolean masks of equal shape (1.0 when both are empty)."""
    p, t = pred.bool(), target.bool()
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int((p & t).sum()) / denom


def iou_distance(a: Tensor, b: Tensor) -> float:
    """1 - IoU of two boolean masks (0.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    if union == 0:
        return 0.0
    return 1.0 - int((a & b).sum()) / union


def hd95_mm(pred: Tensor, target: Tensor, spacing_mm: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between two boolean [D, H, W] masks, with
    anisotropic ``spacing_mm`` (z, y, x), via MONAI ``compute_hausdorff_distance(percentile=95)``.
    Empty masks: see the module docstring."""
    from monai.metrics import compute_hausdorff_distance

    p, t = pred.bool(), target.bool()
    np_, nt = bool(p.any()), bool(t.any())
    if not np_ and not nt:
        return 0.0
    if np_ != nt:
        return float("nan")
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about a deprecated argument its own helper passes; nothing for us to change.
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(
            p[None, None].float().cpu(), t[None, None].float().cpu(), include_background=True, percentile=95,
            spacing=[float(s) for s in spacing_mm],
        )
    return float(hd.reshape(-1)[0])


def volume_ml(mask: Tensor, voxel_volume_ml: float) -> float:
    """Volume of a boolean mask in ml."""
    return float(mask.bool().sum()) * float(voxel_volume_ml)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> float:
    """Mean squared error over channels and the voxels of ``mask``; images [C, D, H, W], mask [D, H, W].
    NaN when the mask is empty."""
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return float("nan")
    diff = (pred.float() - target.float())[:, m]
    return float((diff**2).mean())


def masked_ssim(pred: Tensor, target: Tensor, mask: Tensor, kernel_size: int = 7, sigma: float = 1.5) -> float:
    """SSIM averaged over channels and the voxels of ``mask`` (images [C, D, H, W], mask [D, H, W]).

    The local SSIM map comes from MONAI ``compute_ssim_and_cs`` (Gaussian window); its valid region is the
    crop shrunk by ``kernel_size // 2`` on each side, so the mask is cropped the same way. The data range is
    the target's range inside the mask. NaN when the (cropped) mask is empty.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    r = kernel_size // 2
    m = mask.bool()[r:-r, r:-r, r:-r]
    if int(m.sum()) == 0:
        return float("nan")
    t = target.float()
    vals = t[:, mask.bool()]
    data_range = float(vals.max() - vals.min()) if vals.numel() else 1.0
    data_range = data_range if data_range > 0 else 1.0
    ssim_map, _ = compute_ssim_and_cs(
        pred.float()[None].cpu(), t[None].cpu(), spatial_dims=3, kernel_size=[kernel_size] * 3,
        kernel_sigma=[sigma] * 3, data_range=data_range,
    )
    return float(ssim_map[0][:, m.cpu()].mean())


def interval_covers(samples: Tensor, truth: float, level: float) -> bool:
    """Whether ``truth`` lies in the central ``level`` interval of the sample values (empirical quantiles,
    linear interpolation, bounds inclusive)."""
    s = samples.double().flatten()
    lo = float(torch.quantile(s, (1 - level) / 2))
    hi = float(torch.quantile(s, 1 - (1 - level) / 2))
    return lo <= truth <= hi


def crps_samples(samples: Tensor, truth: float) -> float:
    """Sample-based CRPS in energy form: E|X - y| - 0.5 E|X - X'| over all sample pairs (units of the values).

    For one sample it reduces to the absolute error."""
    s = samples.double().flatten()
    term1 = (s - truth).abs().mean()
    term2 = (s[:, None] - s[None, :]).abs().mean()
    return float(term1 - 0.5 * term2)


def crps_gaussian(mu: float, sigma: float, y: float) -> float:
    """Closed-form CRPS of N(mu, sigma^2) at y (reference for tests and calibration checks)."""
    z = (y - mu) / sigma
    pdf = math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return sigma * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))


def generalized_energy_distance(sample_masks: Tensor, target: Tensor) -> float:
    """Squared generalized energy distance with d = 1 - IoU between forecast samples [S, D, H, W] (bool) and one
    ground-truth mask [D, H, W]: 2 E d(S, Y) - E d(S, S') (the E d(Y, Y') term is 0 with a single annotation).
    Pairs include i == j (V-statistic), so a deterministic forecast scores 2 d(S, Y)."""
    n = sample_masks.shape[0]
    cross = sum(iou_distance(sample_masks[i], target) for i in range(n)) / n
    within = sum(iou_distance(sample_masks[i], sample_masks[j]) for i in range(n) for j in range(n)) / (n * n)
    return 2 * cross - within
