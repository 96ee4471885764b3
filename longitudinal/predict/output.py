"""The one writer of forecast files, shared by ``longitudinal forecast`` and the MLflow model.

Per query: the mean forecast image per channel and the mean P(whole tumour) / P(enhancing) maps, pasted into the
full reference grid (outside the crop: the last context scan's image and probability 0) and resampled into the
NATIVE grid of one stored session through its stored registration (``native.py``); then
``<patient>_forecast.json`` and ``<patient>_volumes.png``. File names::

    <patient>_day<D>_forecast_<channel>.nii.gz   <patient>_day<D>_prob_whole.nii.gz
    <patient>_day<D>_prob_enhancing.nii.gz       (D: whole days since baseline)

Two queries of one call that fall on the same whole day get ``_day<D>_2``, ``_day<D>_3``, ... in query order.
The forecast under a treatment plan (``predict.plan``) is written as ``<patient>_day<D>_plan_...``, beside the
forecast under the recorded history.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from longitudinal.predict.predictor import QueryPrediction
from longitudinal.predict.result import ForecastResult


def output_geometry(arr: Any, session: Any) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray, str]:
    """(shape (x, y, z), affine, transform to reference, "native") of ``session``; the reference grid
    (identity transform, "reference") only when the store lacks a usable native geometry for it."""
    try:
        shape = tuple(int(v) for v in session.native_shape)
        affine = np.asarray(session.native_affine, dtype=np.float64)
        to_ref = np.asarray(session.transform_to_reference, dtype=np.float64)
        ok = (len(shape) == 3 and min(shape) > 0 and affine.shape == (4, 4) and to_ref.shape == (4, 4)
              and np.all(np.isfinite(affine)) and np.all(np.isfinite(to_ref)) and abs(np.linalg.det(affine)) > 0)
    except (TypeError, ValueError):
        ok = False
    if ok:
        return shape, affine, to_ref, "native"  # type: ignore[return-value]
    grid = tuple(int(v) for v in reversed(arr.label.shape[-3:]))
    return grid, np.asarray(arr.affine, dtype=np.float64), np.eye(4), "reference"  # type: ignore[return-value]


class ForecastWriter:
    """Writes each query's maps into one session's native grid (module docstring)."""

    def __init__(self, arr: Any, session: Any, channels: list[str], out: Path, pid: str) -> None:
        from longitudinal.predict.native import NativeResampler

        shape_xyz, affine, to_ref, self.grid_kind = output_geometry(arr, session)
        self.shape_xyz, self.affine = shape_xyz, affine
        grid = tuple(int(n) for n in arr.label.shape[-3:])
        self.resampler = NativeResampler(arr.affine, grid, affine, shape_xyz, to_ref)
        self.arr = arr
        self._context_images: dict[int, np.ndarray] = {}
        self.ch_store = [list(arr.channels).index(c) for c in channels]
        self.channels = channels
        self.grid = grid
        self.out = out
        self.pid = pid
        self._stems: set[str] = set()

    def write(self, q: QueryPrediction, plan: bool = False) -> dict[str, str]:
        """The query's files (kind -> path): ``forecast_<channel>``, ``prob_whole``, ``prob_enhancing``; ``plan``:
        the forecast under a treatment plan (file stem ``..._day<D>_plan``)."""
        from longitudinal.predict.native import paste

        self.out.mkdir(parents=True, exist_ok=True)
        stem = base = f"{self.pid}_day{round(q.days)}" + ("_plan" if plan else "")
        n = 1
        while stem in self._stems:
            n += 1
            stem = f"{base}_{n}"
        self._stems.add(stem)
        files: dict[str, str] = {}
        # Outside the crop the forecast image is the last CONTEXT scan: a retrospective query must not show the
        # later scans it was not given (for a query after the latest scan this is the latest scan).
        last = q.last_context
        if last not in self._context_images:
            self._context_images[last] = np.asarray(self.arr.image[last], dtype=np.float32)  # (C, Z, Y, X)
        for ci, (ch, cs) in enumerate(zip(self.channels, self.ch_store, strict=True)):
            full = self._context_images[last][cs].copy()
            paste(full, q.crop.upsample(q.mean_image[ci]), q.crop.start)
            files[f"forecast_{ch}"] = str(self._save(full, f"{stem}_forecast_{ch}.nii.gz"))
        for kind, prob in (("prob_whole", q.prob_whole), ("prob_enhancing", q.prob_enhancing)):
            full = np.zeros(self.grid, np.float32)
            paste(full, q.crop.upsample(prob.astype(np.float32)), q.crop.start)
            files[kind] = str(self._save(full, f"{stem}_{kind}.nii.gz"))
        return files

    def _save(self, volume_zyx: np.ndarray, name: str) -> Path:
        return self.resampler.save(self.resampler.to_native(volume_zyx), self.out / name)


def write_summary(result: ForecastResult, out: Path) -> None:
    """The plot and the JSON summary of ``result`` into ``out`` (sets its out_dir, plot and summary paths)."""
    from longitudinal.predict.plot import plot_volumes

    result.out_dir = out
    result.plot_path = plot_volumes(result, out / f"{result.patient}_volumes.png")
    result.summary_path = out / f"{result.patient}_forecast.json"
    tmp = result.summary_path.with_name(f".{result.summary_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2))
    os.replace(tmp, result.summary_path)
