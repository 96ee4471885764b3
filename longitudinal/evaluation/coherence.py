"""Temporal coherence of sampled trajectories (the neural process's growth curves).

For each patient, the model sees its first scans (up to ``max_context``, keeping at least one later scan
unseen) and forecasts ``n_samples`` trajectories at an increasing grid of query times after the last context
scan. A trajectory is *monotone* when its whole-tumour volume never decreases along the grid (a tolerance of
``tol_voxels`` voxels absorbs one-voxel flicker at the boundary). On a cohort of growing tumours (the
synthetic cohort: Fisher-Kolmogorov growth never shrinks) the fraction of monotone trajectories measures
whether sample s at one time and sample s at a later time belong to one coherent growth curve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from longitudinal.data.context import PatientSeries
from longitudinal.models.base import ForecastModel
from longitudinal.models.checkpoint import DataSettings
from longitudinal.predict import Predictor
from storage.store import CohortStore


@dataclass(frozen=True)
class CoherenceResult:
    """n_trajectories = patients x samples; monotone_fraction in [0, 1]; grid_days: query gaps (days)."""

    model: str
    n_patients: int
    n_trajectories: int
    monotone_fraction: float
    grid_days: tuple[float, ...]


def trajectory_coherence(
    name: str, model: ForecastModel | Predictor, store_url: str, patient_ids: Sequence[str], *,
    crop_size: tuple[int, int, int] = (32, 32, 32), max_context: int = 3, normalize: str = "none",
    n_samples: int = 16, grid_days: Sequence[float] = (60.0, 120.0, 180.0, 270.0, 365.0, 540.0),
    tol_voxels: int = 1, seed: int = 0, device: str | torch.device = "cpu",
) -> CoherenceResult:
    """Fraction of sampled volume trajectories that never shrink (see the module docstring).

    model: a Predictor, or a bare model applied with ``crop_size`` / ``max_context`` / ``normalize``.
    grid_days: strictly increasing gaps after the last context scan (days)."""
    grid = [float(g) for g in grid_days]
    if len(grid) < 2 or any(b <= a for a, b in zip(grid, grid[1:], strict=False)) or grid[0] <= 0:
        raise ValueError(f"grid_days must hold >= 2 strictly increasing positive gaps, got {grid}")
    predictor = model if isinstance(model, Predictor) else Predictor(
        model, crop_size, DataSettings(max_context=max_context, normalize=normalize), device=device)
    store = CohortStore.open(store_url)
    monotone, total, n_patients = 0, 0, 0
    for pid in sorted(patient_ids):
        series = PatientSeries(store.arrays(pid))
        if len(series.days) < 2:
            continue
        k = min(predictor.data.max_context, len(series.days) - 1)
        last = float(series.days[k - 1])
        pred = predictor.predict(series.upto(k), [last + g for g in grid], n_samples=n_samples, seed=seed)
        voxels = np.stack([np.round(q.volumes_ml[:, 0] / series.voxel_ml) for q in pred.queries])  # [Q, S]
        steps = voxels[1:] - voxels[:-1]  # [Q-1, S]
        monotone += int((steps >= -tol_voxels).all(axis=0).sum())
        total += voxels.shape[1]
        n_patients += 1
    if not total:
        raise ValueError("no patient with >= 2 scans")
    return CoherenceResult(name, n_patients, total, monotone / total, tuple(grid))
