"""Checkpoint files.

Model checkpoint: ``longitudinal.models.checkpoint.Checkpoint`` (its weights are the EMA weights; its
provenance holds the training step and the split id).

Training state (``latest.pt``, for resume only): model, EMA, optimizer, scaler, step, RNG states, best metric,
elapsed seconds, config and split id. Both load with ``torch.load(weights_only=True)``: only tensors and plain
containers are stored (numpy RNG state is converted to lists). Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from longitudinal.models.base import ForecastModel
from longitudinal.models.checkpoint import Checkpoint, DataSettings, atomic_torch_save, read_torch_file


def save_model_checkpoint(
    path: Path,
    model: ForecastModel,
    channels: Sequence[str],
    spacing_mm: Sequence[float],
    crop_size: Sequence[int],
    data: DataSettings,
    provenance: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a model checkpoint atomically; ``state_dict`` overrides the model's own weights (e.g. the EMA)."""
    Checkpoint.of_model(model, channels, spacing_mm, crop_size, data, provenance, state_dict).save(path)
    return Path(path)


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


def save_train_state(state: dict[str, Any], path: Path) -> Path:
    """Write the training state (resume only) atomically."""
    return atomic_torch_save(state, path)


def load_train_state(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read what ``save_train_state`` wrote (tensors and plain containers only)."""
    return read_torch_file(Path(path), map_location=device)
