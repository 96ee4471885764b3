"""Figures logged with every training run (matplotlib, Agg backend, no display needed).

All arrays are in store orientation (z, y, x) voxels; days since the patient's baseline; volumes in ml.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# Errors whose ratio to LCI's defines skill; Dice is turned into an error as 1 - Dice.
SKILL_METRICS: dict[str, str] = {
    "dice_whole": "1 - Dice whole",
    "volume_error_ml": "volume error (ml)",
    "hd95_mm": "HD95 (mm)",
}


def _tumour_slice(weights: np.ndarray) -> int:
    """Axial (z) index with the most tumour probability (the middle slice when there is none)."""
    per_slice = weights.reshape(weights.shape[0], -1).sum(1)
    return int(per_slice.argmax()) if per_slice.max() > 0 else weights.shape[0] // 2


def forecast_montage(
    context: np.ndarray, truth: np.ndarray | None, forecast: np.ndarray, prob: np.ndarray, title: str = ""
) -> Figure:
    """One row: last context image, truth at the query time, forecast (median sample), tumour probability.

    context, truth, forecast: (z, y, x) one channel; prob: (z, y, x) in [0, 1]. The slice shown is the axial
    slice with the most forecast tumour probability.
    """
    k = _tumour_slice(prob)
    panels = [("context (last)", context), ("truth", truth), ("forecast", forecast), ("P(tumour)", prob)]
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.2))
    for ax, (name, img) in zip(axes, panels, strict=True):
        ax.axis("off")
        ax.set_title(name)
        if img is None:
            ax.text(0.5, 0.5, "n/a", ha="center", va="center")
            continue
        if name == "P(tumour)":
            ax.imshow(img[k], cmap="magma", vmin=0, vmax=1, origin="lower")
        else:
            ax.imshow(img[k], cmap="gray", origin="lower")
    fig.suptitle(f"{title} (axial slice z={k})")
    return fig


def volume_trajectories(trajectories: Sequence[Mapping[str, Any]]) -> Figure:
    """Whole-tumour volume over time per patient with forecast intervals.

    Each item: ``patient_id``, ``observed_days`` (n,), ``observed_ml`` (n,), ``query_days`` (q,), and
    ``median``, ``lo80``, ``hi80``, ``lo95``, ``hi95`` (q,) in ml.
    """
    n = max(1, len(trajectories))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, tr in zip(axes.flat, trajectories, strict=False):
        q = np.asarray(tr["query_days"], float)
        ax.fill_between(q, tr["lo95"], tr["hi95"], alpha=0.2, color="C0", label="95%")
        ax.fill_between(q, tr["lo80"], tr["hi80"], alpha=0.35, color="C0", label="80%")
        ax.plot(q, tr["median"], color="C0", label="median")
        ax.plot(tr["observed_days"], tr["observed_ml"], "ko", ms=4, label="observed")
        ax.set_title(str(tr["patient_id"]))
        ax.set_xlabel("days since baseline")
        ax.set_ylabel("whole tumour (ml)")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def skill_table(rows: Sequence[Mapping[str, Any]], reference: str = "lci") -> list[dict[str, Any]]:
    """Skill against ``reference`` per (model, horizon, metric): 1 - error(model) / error(reference).

    Positive = better than the reference. Missing/zero reference errors give NaN.
    """
    ref = {r["horizon"]: r for r in rows if r.get("model") == reference}
    out = []
    for r in rows:
        if r.get("model") == reference or r.get("horizon") not in ref:
            continue
        for metric in SKILL_METRICS:
            a, b = r.get(metric), ref[r["horizon"]].get(metric)
            if a is None or b is None:
                continue
            ea, eb = (1 - a, 1 - b) if metric.startswith("dice") else (a, b)
            skill = 1 - ea / eb if eb and math.isfinite(eb) and math.isfinite(ea) else float("nan")
            out.append({"model": r["model"], "horizon": r["horizon"], "metric": metric, "skill": skill})
    return out


def skill_per_horizon(rows: Sequence[Mapping[str, Any]], reference: str = "lci") -> Figure:
    """Grouped bars of skill vs ``reference`` per horizon, one panel per metric in SKILL_METRICS."""
    table = skill_table(rows, reference)
    horizons = list(dict.fromkeys(r["horizon"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in table))
    fig, axes = plt.subplots(1, len(SKILL_METRICS), figsize=(4.5 * len(SKILL_METRICS), 3.2), squeeze=False)
    width = 0.8 / max(1, len(models))
    for ax, (metric, label) in zip(axes.flat, SKILL_METRICS.items(), strict=True):
        for i, m in enumerate(models):
            vals = [
                next((t["skill"] for t in table if t["model"] == m and t["horizon"] == h and t["metric"] == metric),
                     np.nan)
                for h in horizons
            ]
            ax.bar(np.arange(len(horizons)) + i * width, vals, width, label=m)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(horizons)) + width * (len(models) - 1) / 2, horizons)
        ax.set_title(f"skill vs {reference}: {label}")
        ax.set_xlabel("horizon (days)")
    if models:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
