"""The one model checkpoint type: what training writes and what evaluation, calibration, forecasts, the MLflow
model and the run figures read.

On disk it is a plain dict of tensors and containers, so ``torch.load(weights_only=True)`` reads it back (no
pickled code)::

    {"kind", "config", "state_dict", "channels", "spacing_mm", "crop_size", "meta"}

``meta`` holds the data settings (``meta["data"]``: max_context, normalize, fov, fov_margin_mm), the volume
calibration (``meta["volume_calibration"]``) and provenance (step, split id, ...). :class:`Checkpoint` is its typed form;
:meth:`Checkpoint.load` is the only reader and :meth:`Checkpoint.save` the only writer of model checkpoints, and
:func:`read_torch_file` the one ``torch.load`` of the library (training state files go through it too).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import torch

from longitudinal.models.base import ForecastModel, build_model
from longitudinal.models.calibration import VolumeCalibration, calibrations_from_meta, calibrations_to_meta

CHECKPOINT_KEYS = ("kind", "config", "state_dict", "channels", "spacing_mm", "crop_size", "meta")
NORMALIZE_CHOICES = ("none", "context_mean")
FOV_CHOICES = ("adaptive", "fixed")


def read_torch_file(src: str | Path | IO[bytes], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code."""
    return torch.load(src, map_location=map_location, weights_only=True)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save to ``path`` via a temporary file in the same folder, then rename (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class DataSettings:
    """How the model's inputs are cut: up to ``max_context`` scans, intensities normalised by ``normalize``
    ("none" keeps store intensities; "context_mean" divides each channel by the mean of the non-zero voxels of
    the context crops); the field of view ``fov`` "adaptive" (the crop's stride grows until the context
    tumours plus ``fov_margin_mm`` of growth room on every side fit) or "fixed" (the store's spacing; what
    checkpoints saved without the setting were trained with)."""

    max_context: int = 3
    normalize: str = "none"
    fov: str = "adaptive"
    fov_margin_mm: float = 16.0

    def problems(self) -> list[str]:
        out = []
        if self.fov not in FOV_CHOICES:
            out.append(f"fov must be one of {list(FOV_CHOICES)}, got {self.fov!r}")
        if float(self.fov_margin_mm) < 0:
            out.append(f"fov_margin_mm must be >= 0, got {self.fov_margin_mm}")
        if int(self.max_context) < 1:
            out.append(f"max_context must be >= 1, got {self.max_context}")
        if self.normalize not in NORMALIZE_CHOICES:
            out.append(f"normalize must be one of {list(NORMALIZE_CHOICES)}, got {self.normalize!r}")
        return out


@dataclass
class Checkpoint:
    """A trained (or baseline) model with everything needed to cut its inputs the way it was trained.

    kind: model kind (``longitudinal.models.MODEL_KINDS``); config: the model's config dict; state_dict: its
    weights (CPU tensors); channels: store channel names in the model's input order; spacing_mm: (z, y, x) voxel
    spacing in mm of the grid it was trained on; crop_size: (D, H, W) crop in voxels; data: context size and
    normalisation; calibration: {"whole", "enhancing"} volume-interval calibrations (empty when none), plus
    per treatment stratum ``"<structure>:<stratum>"`` where fitted (``models.calibration.calibration_key``;
    checkpoints with the pooled keys only load as they are);
    provenance: the rest of ``meta`` (training step, split id, ...), kept verbatim.
    """

    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    channels: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    crop_size: tuple[int, int, int]
    data: DataSettings = field(default_factory=DataSettings)
    calibration: dict[str, VolumeCalibration] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def of_model(cls, model: ForecastModel, channels: Sequence[str], spacing_mm: Sequence[float],
                 crop_size: Sequence[int], data: DataSettings | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 state_dict: Mapping[str, torch.Tensor] | None = None) -> Checkpoint:
        """The checkpoint of ``model`` (weights copied to CPU); ``state_dict`` overrides its weights (e.g. an EMA
        copy). Its calibration is the model's ``volume_calibration``."""
        sd = state_dict if state_dict is not None else model.state_dict()
        return cls(
            kind=model.kind, config=model.config_dict(),
            state_dict={k: v.detach().cpu() for k, v in sd.items()},
            channels=tuple(str(c) for c in channels), spacing_mm=_three(spacing_mm, float),
            crop_size=_three(crop_size, int), data=data or DataSettings(),
            calibration=dict(getattr(model, "volume_calibration", None) or {}),
            provenance=dict(provenance or {}),
        )

    @classmethod
    def from_dict(cls, ckpt: Mapping[str, Any], where: str = "checkpoint") -> Checkpoint:
        """The typed form of an on-disk dict; one ValueError names every missing or malformed field."""
        if not isinstance(ckpt, Mapping):
            raise ValueError(f"{where} is not a model checkpoint (a {type(ckpt).__name__}, not a dict)")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{where} is not a model checkpoint: missing keys {missing}")
        meta = dict(ckpt.get("meta") or {})
        raw_data = dict(meta.pop("data", None) or {})
        data = DataSettings(max_context=int(raw_data.get("max_context", 3)),
                            normalize=str(raw_data.get("normalize", "none")),
                            fov=str(raw_data.get("fov", "fixed")),
                            fov_margin_mm=float(raw_data.get("fov_margin_mm", 16.0)))
        problems = data.problems()
        try:
            spacing = _three(ckpt["spacing_mm"], float)
            crop = _three(ckpt["crop_size"], int)
        except (TypeError, ValueError) as exc:
            problems.append(f"spacing_mm / crop_size must be 3 numbers each ({exc})")
            spacing, crop = (0.0, 0.0, 0.0), (0, 0, 0)
        if not ckpt["channels"]:
            problems.append("no channels")
        if problems:
            raise ValueError(f"{where} is not a usable model checkpoint: " + "; ".join(problems))
        calibration = calibrations_from_meta({"volume_calibration": meta.pop("volume_calibration", None)})
        return cls(kind=str(ckpt["kind"]), config=dict(ckpt["config"]), state_dict=dict(ckpt["state_dict"]),
                   channels=tuple(str(c) for c in ckpt["channels"]), spacing_mm=spacing, crop_size=crop,
                   data=data, calibration=calibration, provenance=meta)

    @classmethod
    def load(cls, src: str | Path | IO[bytes]) -> Checkpoint:
        """Read a checkpoint file (or binary file object). Raises ValueError naming what is missing."""
        where = str(src) if isinstance(src, str | Path) else "checkpoint"
        try:
            ckpt = read_torch_file(src)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(f"{where} cannot be read as a checkpoint: {type(exc).__name__}: {first[:200]}") from None
        return cls.from_dict(ckpt, where)

    # --- use ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The on-disk dict (module docstring)."""
        meta = dict(self.provenance)
        meta["data"] = {"max_context": int(self.data.max_context), "normalize": self.data.normalize,
                        "fov": self.data.fov, "fov_margin_mm": float(self.data.fov_margin_mm)}
        if self.calibration:
            meta["volume_calibration"] = calibrations_to_meta(self.calibration)
        return {"kind": self.kind, "config": dict(self.config), "state_dict": dict(self.state_dict),
                "channels": list(self.channels), "spacing_mm": list(self.spacing_mm),
                "crop_size": list(self.crop_size), "meta": meta}

    def save(self, dest: str | Path | IO[bytes]) -> None:
        """Write the checkpoint: atomically (temporary file + rename) to a path, or into a binary file object."""
        if isinstance(dest, str | Path):
            atomic_torch_save(self.to_dict(), dest)
        else:
            torch.save(self.to_dict(), dest)

    def build(self, device: str | torch.device = "cpu") -> ForecastModel:
        """The model with its weights and volume calibration, in eval mode on ``device``."""
        from longitudinal.models.base import MODEL_KINDS

        config, state_dict = dict(self.config), self.state_dict
        kind = MODEL_KINDS.get(self.kind)
        if isinstance(kind, type) and issubclass(kind, ForecastModel):
            config, state_dict = kind.upgrade_checkpoint(config, state_dict)
        model = build_model(self.kind, config)
        model.load_state_dict(state_dict)
        model.volume_calibration = dict(self.calibration)
        return model.to(device).eval()

    def with_calibration(self, calibration: Mapping[str, VolumeCalibration], **provenance: Any) -> Checkpoint:
        """A copy carrying ``calibration`` (and ``provenance`` entries added or replaced)."""
        return replace(self, calibration=dict(calibration), provenance={**self.provenance, **provenance})

    def describe(self) -> dict[str, Any]:
        """Everything but the weights, as plain values (for a config artifact or a log line)."""
        body = self.to_dict()
        body.pop("state_dict")
        return body


def _three(values: Any, kind: type) -> tuple:
    vals = tuple(kind(v) for v in (values if isinstance(values, Sequence) else (values,) * 3))
    if len(vals) != 3:
        raise ValueError(f"need 3 values, got {len(vals)}")
    return vals
