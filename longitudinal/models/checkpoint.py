"""Model checkpoint dict (docs/ARCHITECTURE.md) to and from bytes: pure torch, a path or a file object.

    {"kind", "config", "state_dict", "channels", "spacing_mm", "crop_size", "meta"}

Only tensors and plain containers go in, so ``torch.load(weights_only=True)`` reads it back (no pickled code).
Atomic file replacement and training state live in ``longitudinal.training.checkpoint``; this is the
same format, usable where only bytes are at hand (an MLflow artifact, a BytesIO).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import torch

from longitudinal.models.base import ForecastModel, build_model
from longitudinal.models.calibration import calibrations_from_meta

CHECKPOINT_KEYS = ("kind", "config", "state_dict", "channels", "spacing_mm", "crop_size", "meta")


def checkpoint_dict(
    model: ForecastModel,
    channels: Sequence[str],
    spacing_mm: Sequence[float],
    crop_size: Sequence[int],
    meta: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The checkpoint of ``model`` (weights on CPU); ``state_dict`` overrides its weights (e.g. an EMA copy).

    spacing_mm: voxel spacing of the crops in mm (z, y, x); crop_size: crop shape in voxels (D, H, W).
    """
    sd = state_dict if state_dict is not None else model.state_dict()
    return {
        "kind": model.kind,
        "config": model.config_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in sd.items()},
        "channels": [str(c) for c in channels],
        "spacing_mm": [float(s) for s in spacing_mm],
        "crop_size": [int(s) for s in crop_size],
        "meta": dict(meta or {}),
    }


def save_checkpoint(ckpt: dict[str, Any], dest: str | Path | IO[bytes]) -> None:
    """torch.save a checkpoint dict to a path or a binary file object, after checking its keys."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint lacks keys {missing}; a checkpoint has {list(CHECKPOINT_KEYS)}")
    torch.save(ckpt, dest)


def load_checkpoint(src: str | Path | IO[bytes], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """torch.load(weights_only=True) a checkpoint dict; raises ValueError naming missing keys."""
    ckpt = torch.load(src, map_location=map_location, weights_only=True)
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"not a model checkpoint: missing keys {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> ForecastModel:
    """Rebuild the model of a checkpoint dict with its weights (on CPU; move it with ``.to``) and its volume
    calibration (``model.volume_calibration``: {structure: VolumeCalibration}, empty when it has none)."""
    from longitudinal.models.base import MODEL_KINDS

    config, state_dict = dict(ckpt["config"]), ckpt["state_dict"]
    kind = MODEL_KINDS.get(ckpt["kind"])
    if isinstance(kind, type) and issubclass(kind, ForecastModel):
        config, state_dict = kind.upgrade_checkpoint(config, state_dict)
    model = build_model(ckpt["kind"], config)
    model.load_state_dict(state_dict)
    model.volume_calibration = calibrations_from_meta(ckpt.get("meta"))
    return model
