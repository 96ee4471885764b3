"""``Forecaster``: a checkpoint applied to raw native scans, as the pyfunc model and ``evaluate`` use it.

Input rows are scans of one or more patients (one row per prior scan); each patient's scans are brought onto
its baseline (first) scan's grid the way ingest does it (RAS reorientation, resampling to the model's spacing,
per-channel intensity normalisation, rigid registration to the baseline), cropped around the last context
tumour, and forecast at the query days. Volumes are in ml; days are since each patient's first row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from longitudinal.models.base import ForecastModel
from longitudinal.models.baselines import linear_volumes_ml
from longitudinal.models.calibration import LEVELS, volume_quantiles
from longitudinal.models.checkpoint import model_from_checkpoint
from longitudinal.runtime import tune_cpu_allocator

# Output column order of the pyfunc (median first); the levels are the calibration module's.
QUANTILES = {k: LEVELS[k] for k in ("median", "lo80", "hi80", "lo95", "hi95")}
VOLUME_KINDS = ("whole", "enhancing")
OUTPUT_COLUMNS = (
    ["patient_id", "query_day", "n_context", "n_samples"]
    + [f"volume_{k}_ml_{q}" for k in VOLUME_KINDS for q in QUANTILES]
    + ["forecast_path", "tumour_prob_path"]
)


def output_columns() -> list[str]:
    """Columns of ``Forecaster.predict``'s DataFrame, in order."""
    return list(OUTPUT_COLUMNS)


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu") -> tuple[ForecastModel, dict[str, Any]]:
    """Rebuild the model of a checkpoint file (loaded with ``weights_only=True``). Returns (model in eval mode,
    the checkpoint dict without the state dict)."""
    ckpt = torch.load(Path(path), map_location=device, weights_only=True)
    missing = [k for k in ("kind", "config", "state_dict") if k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a forecaster checkpoint: missing {missing}")
    model = model_from_checkpoint({"meta": {}, **ckpt})  # weights and the volume calibration of meta
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta


@dataclass
class PreparedPatient:
    """One patient's scans on the baseline grid.

    images: (T, C, Z, Y, X) float32 normalised; labels: (T, Z, Y, X) uint8 (zeros where no label given);
    has_label: (T,) bool; days: (T,) float64 since the first scan; affine: 4x4 voxel (i=x, j=y, k=z) -> RAS mm
    of the baseline grid; spacing_mm: (z, y, x).
    """

    images: np.ndarray
    labels: np.ndarray
    has_label: np.ndarray
    days: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]


def check_frame(frame: pd.DataFrame, channels: Sequence[str], query_days: Sequence[float]) -> list[str]:
    """Every problem with a prediction input (empty when valid)."""
    problems = []
    missing = [c for c in ("patient_id", "days", *channels) if c not in frame.columns]
    if missing:
        problems.append(f"missing columns {missing}; need patient_id, days, {', '.join(channels)} (+ optional label)")
    if len(frame) == 0:
        problems.append("no rows")
    if "days" in frame.columns:
        days = pd.to_numeric(frame["days"], errors="coerce")
        if days.isna().any() or not np.all(np.isfinite(days.to_numpy(float))):
            problems.append("days must be finite numbers")
    for col in [c for c in (*channels, "label") if c in frame.columns]:
        for i, value in frame[col].items():
            if col == "label" and (value is None or (isinstance(value, float) and math.isnan(value)) or value == ""):
                continue
            if not isinstance(value, str) or ("://" not in value and not Path(value).exists()):
                problems.append(f"row {i} column {col}: no such file {value!r}")
    if "patient_id" in frame.columns and "days" in frame.columns:
        dup = frame.duplicated(subset=["patient_id", "days"])
        if dup.any():
            problems.append(f"duplicate (patient_id, days) rows: {frame.index[dup].tolist()}")
    q = np.asarray(list(query_days), dtype=float)
    if q.size == 0 or not np.all(np.isfinite(q)) or np.any(q < 0):
        problems.append(f"query_days must be a non-empty list of finite days >= 0, got {list(query_days)}")
    return problems


def _local(uri: str) -> str:
    """A local path for ``uri`` (fsspec URLs are copied to a temporary file)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    import tempfile

    import fsspec

    suffix = "".join(Path(uri).suffixes)
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    with fsspec.open(uri, "rb") as src, open(fd, "wb") as dst:
        dst.write(src.read())
    return tmp


def prepare_patient(
    rows: pd.DataFrame, channels: Sequence[str], spacing_mm: float, register_channel: str | None = None
) -> PreparedPatient:
    """Bring one patient's native scans onto its baseline grid (see ``longitudinal.tracking.preprocess``)."""
    from longitudinal.tracking import preprocess

    rows = rows.sort_values("days")
    days = rows["days"].to_numpy(float)
    days = days - days[0]
    scans = []
    for _, r in rows.iterrows():
        label = r.get("label") if "label" in rows.columns else None
        if label is not None and (isinstance(label, float) and math.isnan(label) or label == ""):
            label = None
        scans.append(({c: _local(r[c]) for c in channels}, _local(label) if label else None))
    images, labels, has_label, affine, spacing = preprocess.series_to_baseline(
        scans, list(channels), spacing_mm, register_channel or channels[0]
    )
    return PreparedPatient(images, labels, has_label, days, affine, spacing)


class Forecaster:
    """A checkpoint ready to forecast from native scans. ``device`` defaults to CUDA when available."""

    def __init__(self, checkpoint: Path | str, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            tune_cpu_allocator()
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        self.channels: list[str] = list(self.meta.get("channels") or ["T1c", "FLAIR"])
        sp = self.meta.get("spacing_mm") or (2.0, 2.0, 2.0)
        self.spacing_mm = float(np.mean(sp))
        cs = self.meta.get("crop_size")
        self.crop_size = tuple(int(c) for c in (cs if isinstance(cs, list | tuple) else (cs,) * 3)) if cs else None
        inner = self.meta.get("meta") or {}
        data = inner.get("data") or self.meta.get("data") or {}
        self.max_context = int(data.get("max_context") or inner.get("max_context") or 0) or None
        self.normalize = str(data.get("normalize") or "none")

    def predict(
        self,
        frame: pd.DataFrame,
        query_days: Sequence[float],
        n_samples: int = 8,
        out_dir: Path | str | None = None,
        seed: int = 0,
    ) -> pd.DataFrame:
        """One row per (patient_id, query day) with volume quantiles in ml (columns ``output_columns()``).

        frame: one row per prior scan (patient_id, days since that patient's first row, one column per channel
        holding a path/URI, optional ``label``). query_days: days since each patient's first row.
        With ``out_dir``, writes per query day a NIfTI of the forecast image (mean over samples, 4D x,y,z,C)
        and of P(tumour) on the patient's baseline grid, and returns their paths.
        Raises ValueError listing every input problem.
        """
        problems = check_frame(frame, self.channels, query_days)
        if n_samples < 1:
            problems.append(f"n_samples must be >= 1, got {n_samples}")
        if problems:
            raise ValueError("invalid forecast input: " + "; ".join(problems))
        out = []
        for pid, rows in frame.groupby("patient_id", sort=True):
            prep = prepare_patient(rows, self.channels, self.spacing_mm)
            out.extend(self._predict_patient(str(pid), prep, list(query_days), n_samples, out_dir, seed))
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS)

    def _crop_box(self, prep: PreparedPatient) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        grid = prep.images.shape[-3:]
        size = self.crop_size or tuple(int(math.ceil(n / 16) * 16) for n in grid)
        lab = prep.labels[prep.has_label] if prep.has_label.any() else prep.labels[:0]
        nz = np.argwhere(lab[-1] > 0) if len(lab) else np.zeros((0, 3))
        if len(nz):
            centre = (nz.min(0) + nz.max(0)) / 2
        else:
            brain = np.argwhere(prep.images[-1].max(0) > 0)
            centre = (brain.min(0) + brain.max(0)) / 2 if len(brain) else (np.array(grid) - 1) / 2
        start = tuple(int(np.floor(c - s / 2 + 0.5)) for c, s in zip(centre, size, strict=True))
        return start, size  # type: ignore[return-value]

    @torch.no_grad()
    def _predict_patient(
        self, pid: str, prep: PreparedPatient, query_days: list[float], n_samples: int,
        out_dir: Path | str | None, seed: int,
    ) -> list[dict[str, Any]]:
        start, size = self._crop_box(prep)
        k = len(prep.days) if self.max_context is None else min(self.max_context, len(prep.days))
        imgs = np.stack([_crop(prep.images[t], start, size) for t in range(len(prep.days) - k, len(prep.days))])
        labs = np.stack([_crop(prep.labels[t], start, size) for t in range(len(prep.days) - k, len(prep.days))])
        scale = np.ones(imgs.shape[1], np.float32)
        if self.normalize == "context_mean":  # as the data layer: per channel, mean of non-zero context voxels
            scale = np.array([imgs[:, c][imgs[:, c] > 0].mean() if (imgs[:, c] > 0).any() else 1.0
                              for c in range(imgs.shape[1])], np.float32)
            imgs = imgs / scale[None, :, None, None, None]
        dev = self.device
        ctx_i = torch.from_numpy(imgs).float()[None].to(dev)
        ctx_l = torch.from_numpy(labs.astype(np.int64))[None].to(dev)
        ctx_t = torch.tensor(prep.days[-k:], dtype=torch.float32)[None].to(dev)
        mask = torch.ones(1, k, dtype=torch.bool, device=dev)
        q = torch.tensor(query_days, dtype=torch.float32)[None].to(dev)
        gen = torch.Generator(device=dev).manual_seed(seed)
        fc = self.model.sample(ctx_i, ctx_l, ctx_t, mask, q, n_samples=n_samples, generator=gen)
        voxel_ml = float(np.prod(prep.spacing_mm)) / 1000.0
        vols = fc.volumes_ml(voxel_ml)[0].cpu().numpy()  # [Q, S, 2]
        # the linear baseline's volumes from the same context: a difficulty-scaled calibration needs them
        ref = linear_volumes_ml(ctx_l, ctx_t, mask, q, voxel_ml)[0].cpu().numpy()  # [Q, 2]
        rows = []
        for qi, day in enumerate(query_days):
            row: dict[str, Any] = {"patient_id": pid, "query_day": float(day), "n_context": k,
                                   "n_samples": n_samples, "forecast_path": None, "tumour_prob_path": None}
            cals = self.model.volume_calibration or {}
            for vi, kind in enumerate(VOLUME_KINDS):
                qs = volume_quantiles(vols[qi, :, vi], float(day) - float(prep.days[-1]), cals.get(kind),
                                      float(ref[qi, vi]), max_ml=float(np.prod(size)) * voxel_ml)
                for name in QUANTILES:
                    row[f"volume_{kind}_ml_{name}"] = qs[name]
            if out_dir is not None:
                img = fc.images[0, qi].mean(0).float().cpu().numpy() * scale[:, None, None, None]  # (C,D,H,W)
                prob = fc.whole_prob[0, qi].mean(0).float().cpu().numpy()
                row["forecast_path"], row["tumour_prob_path"] = _write_forecast(
                    Path(out_dir), pid, float(day), img, prob, start, prep
                )
            rows.append(row)
        return rows


def _crop(vol: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """``vol[..., crop]`` zero-padded where the crop leaves the grid."""
    shape = vol.shape[-3:]
    out = np.zeros(vol.shape[:-3] + tuple(size), dtype=vol.dtype)
    src, dst = [], []
    for s0, n, dim in zip(start, size, shape, strict=True):
        lo, hi = max(s0, 0), min(s0 + n, dim)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s0, lo - s0 + max(0, hi - lo)))
    out[(..., *dst)] = vol[(..., *src)]
    return out


def _paste(full: np.ndarray, part: np.ndarray, start: Sequence[int]) -> None:
    shape = full.shape[-3:]
    src, dst = [], []
    for s0, n, dim in zip(start, part.shape[-3:], shape, strict=True):
        lo, hi = max(s0, 0), min(s0 + n, dim)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo - s0, lo - s0 + max(0, hi - lo)))
    full[(..., *dst)] = part[(..., *src)]


def _write_forecast(
    out_dir: Path, pid: str, day: float, img: np.ndarray, prob: np.ndarray, start: Sequence[int],
    prep: PreparedPatient,
) -> tuple[str, str]:
    """Paste the crop into the baseline grid (outside it: the last scan, P(tumour)=0) and write NIfTI files;
    store arrays are (z, y, x) = NIfTI (x, y, z) transposed."""
    import nibabel as nib

    out_dir.mkdir(parents=True, exist_ok=True)
    full_img = prep.images[-1].copy()
    _paste(full_img, img.astype(np.float32), start)
    full_prob = np.zeros(prep.images.shape[-3:], np.float32)
    _paste(full_prob, prob.astype(np.float32), start)
    stem = f"{pid}_day{day:g}"
    img_path = out_dir / f"{stem}_forecast.nii.gz"
    prob_path = out_dir / f"{stem}_tumour_prob.nii.gz"
    nib.save(nib.Nifti1Image(np.transpose(full_img, (3, 2, 1, 0)), prep.affine), img_path)
    nib.save(nib.Nifti1Image(np.transpose(full_prob, (2, 1, 0)), prep.affine), prob_path)
    return str(img_path), str(prob_path)
