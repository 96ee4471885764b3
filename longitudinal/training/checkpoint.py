"""Checkpoint files.

Model checkpoint (docs/ARCHITECTURE.md; what evaluation, tracking and forecast load)::

    {"kind", "config", "state_dict", "channels", "spacing_mm", "crop_size", "meta"}

``state_dict`` holds the EMA weights; ``meta`` carries the data settings needed to cut inputs the same way
(``meta["data"]``: max_context, normalize), the training step and the split id.

Training state (``latest.pt``, for resume only): model, EMA, optimizer, scaler, step, RNG states, best metric,
elapsed seconds, config and split id. Both load with ``torch.load(weights_only=True)``: only tensors and plain
containers are stored (numpy RNG state is converted to lists). Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longitudinal.models.base import ForecastModel
from longitudinal.models.checkpoint import checkpoint_dict, load_checkpoint, model_from_checkpoint


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save to ``path`` via a temporary file in the same folder, then rename (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_model_checkpoint(
    path: Path,
    model: ForecastModel,
    channels: Sequence[str],
    spacing_mm: Sequence[float],
    crop_size: Sequence[int],
    meta: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a model checkpoint atomically; ``state_dict`` overrides the model's own weights (e.g. the EMA)."""
    return atomic_save(checkpoint_dict(model, channels, spacing_mm, crop_size, meta, state_dict), path)


def load_model_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[ForecastModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint with its weights. Returns (model, meta merged with every top-level
    key but the weights: kind, config, channels, spacing_mm, crop_size)."""
    ckpt = load_checkpoint(Path(path))
    model = model_from_checkpoint(ckpt).to(device)
    info = {k: v for k, v in ckpt.items() if k not in ("state_dict", "meta")}
    return model, {**dict(ckpt.get("meta") or {}), **info}


def rng_state() -> dict[str, Any]:
    """Every global RNG state (torch CPU/CUDA, numpy, random) as weights_only-safe values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "random": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["random"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def load_train_state(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path), map_location=device, weights_only=True)
