"""Spatial/intensity augmentation applied with ONE set of random parameters to every time point of a sample.

The time points are stacked along the channel axis before the MONAI transforms run, so a flip, rotation or
scaling moves context and targets together: the growth between them is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges. Rotations in radians, scale as a fraction (0.1 = +-10%), intensity scale as a
    fraction applied to all time points alike."""

    flip_prob: float = 0.5
    affine_prob: float = 0.25
    rotate_rad: float = 0.15
    scale: float = 0.1
    intensity_scale: float = 0.1
    intensity_prob: float = 0.3


def make_augment(cfg: AugmentConfig):  # -> monai.transforms.Compose
    """A MONAI Compose over keys ``image`` ([N*C, D, H, W]) and ``label`` ([N, D, H, W])."""
    from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd

    keys = ["image", "label"]
    return Compose([
        RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=0),
        RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=1),
        RandFlipd(keys=keys, prob=cfg.flip_prob, spatial_axis=2),
        RandAffined(
            keys=keys, prob=cfg.affine_prob, rotate_range=(cfg.rotate_rad,) * 3, scale_range=(cfg.scale,) * 3,
            mode=("bilinear", "nearest"), padding_mode="zeros",
        ),
        RandScaleIntensityd(keys=["image"], factors=cfg.intensity_scale, prob=cfg.intensity_prob),
    ])


def apply_augment(transform, images: Tensor, labels: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """Augment ``images`` [N, C, D, H, W] and ``labels`` [N, D, H, W] (N = all time points of one sample) with
    one draw of random parameters seeded by ``seed``. Returns tensors of the same shapes and dtypes."""
    n, c = images.shape[:2]
    transform.set_random_state(seed=int(seed) % (2**32))
    out = transform({"image": images.reshape(n * c, *images.shape[2:]), "label": labels.to(torch.float32)})
    img = torch.as_tensor(np.asarray(out["image"]), dtype=images.dtype).reshape(images.shape)
    lab = torch.as_tensor(np.asarray(out["label"])).round().to(labels.dtype).reshape(labels.shape)
    return img, lab
