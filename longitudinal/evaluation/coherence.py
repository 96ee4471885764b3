"""Temporal coherence of sampled trajectories (issue: the neural process's growth curves).

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

import torch

from longitudinal.data.dataset import DataConfig, EvalDataset, EvalItem, StoreReader, collate_eval
from longitudinal.models.base import ForecastModel


@dataclass(frozen=True)
class CoherenceResult:
    """n_trajectories = patients x samples; monotone_fraction in [0, 1]; grid_days: query gaps (days)."""

    model: str
    n_patients: int
    n_trajectories: int
    monotone_fraction: float
    grid_days: tuple[float, ...]


@torch.no_grad()
def trajectory_coherence(
    name: str, model: ForecastModel, store_url: str, patient_ids: Sequence[str], *,
    crop_size: tuple[int, int, int] = (32, 32, 32), max_context: int = 3, normalize: str = "none",
    n_samples: int = 16, grid_days: Sequence[float] = (60.0, 120.0, 180.0, 270.0, 365.0, 540.0),
    tol_voxels: int = 1, seed: int = 0, device: str | torch.device = "cpu",
) -> CoherenceResult:
    """Fraction of sampled volume trajectories that never shrink (see the module docstring).

    grid_days: strictly increasing gaps after the last context scan (days)."""
    grid = [float(g) for g in grid_days]
    if len(grid) < 2 or any(b <= a for a, b in zip(grid, grid[1:], strict=False)) or grid[0] <= 0:
        raise ValueError(f"grid_days must hold >= 2 strictly increasing positive gaps, got {grid}")
    reader = StoreReader(store_url)
    items = []
    for pid in sorted(patient_ids):
        days = list(reader.days(pid))
        if len(days) < 2:
            continue
        k = min(max_context, len(days) - 1)
        items.append(EvalItem(pid, tuple(range(k)), k, float(days[k] - days[k - 1]), float(days[k])))
    if not items:
        raise ValueError("no patient with >= 2 scans")
    dcfg = DataConfig(crop_size=tuple(crop_size), max_context=max_context, n_queries=1, crop_jitter=0,
                      normalize=normalize, augment=None)  # type: ignore[arg-type]
    model = model.to(device).eval()
    monotone, total = 0, 0
    gen = torch.Generator(device=device).manual_seed(seed)
    for item in items:
        eb = collate_eval([EvalDataset(store_url, [item], dcfg)[0]])
        b = eb.batch.to(device)
        last = b.context_times.masked_fill(~b.context_mask.bool(), float("-inf")).amax(dim=1)  # [1]
        queries = last[:, None] + torch.tensor(grid, device=device, dtype=last.dtype)[None]
        fc = model.sample(b.context_images, b.context_labels, b.context_times, b.context_mask, queries,
                          n_samples=n_samples, generator=gen)
        voxels = (fc.probs[0].float().argmax(2) > 0).flatten(2).sum(-1)  # [Q, S]
        steps = voxels[1:] - voxels[:-1]  # [Q-1, S]
        monotone += int((steps >= -tol_voxels).all(dim=0).sum())
        total += voxels.shape[1]
    return CoherenceResult(name, len(items), total, monotone / total, tuple(grid))
