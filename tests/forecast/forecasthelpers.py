"""Shared helpers of the forecast tests: a tiny synthetic cohort written as native NIfTI scans with real dates
(later scans moved in physical space, the latest one also on a flipped, padded grid), ingested with the real
ingest into a store, and a ``linear`` baseline registered as champion in a temporary sqlite MLflow."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from longitudinal.data.phantoms import phantom_record
from longitudinal.models.base import build_model
from longitudinal.settings import Settings

ENV_QUIET = {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
KEY = "forecast-test-pseudonym-key"
GRID = (32, 32, 32)
SPACING = 2.0


@dataclass
class NativePatient:
    """One patient's files. ``files[t]`` maps T1c / FLAIR / label to the NIfTI of scan t; dates are real."""

    raw_id: str
    dates: list[str]
    days: list[float]
    radii_mm: list[float]
    files: list[dict[str, Path]] = field(default_factory=list)

    @property
    def latest(self) -> dict[str, Path]:
        return self.files[-1]


def _moved(data_xyz: np.ndarray, affine: np.ndarray, shift_mm: np.ndarray, flip_pad: bool) -> tuple[np.ndarray, np.ndarray]:
    """The same physical content on another grid: origin moved by ``shift_mm`` (the 'motion' the registration
    must undo); with ``flip_pad`` the x axis is reversed (affine column negated) and 2 voxels are padded on each
    side of x, so shape and affine both differ from the baseline's."""
    aff = affine.copy()
    aff[:3, 3] += shift_mm
    if not flip_pad:
        return data_xyz, aff
    pad = 2
    data = np.pad(data_xyz, ((pad, pad), (0, 0), (0, 0)))
    nx = data.shape[0]
    flipped = data[::-1].copy()
    # voxel i of the flipped array is voxel nx-1-i of the padded one, which sits at x = origin + (nx-1-i-pad) * dx
    new = aff.copy()
    new[:3, 0] = -aff[:3, 0]
    new[:3, 3] = aff[:3, 3] + aff[:3, 0] * (nx - 1 - pad)
    return flipped, new


def write_native_patient(out: Path, raw_id: str, dates: list[str], radii_mm: list[float],
                         shifts_mm: list[tuple[float, float, float]], flip_last: bool = True) -> NativePatient:
    """Write a growing-sphere phantom's scans (T1c, FLAIR, label) as native NIfTI files, one folder per scan."""
    import datetime as dt

    d0 = dt.date.fromisoformat(dates[0])
    days = [float((dt.date.fromisoformat(d) - d0).days) for d in dates]
    centre = tuple((n - 1) / 2 for n in GRID)
    rec = phantom_record(raw_id.replace(".", "-"), days, [centre] * len(days), radii_mm, grid=GRID,
                         spacing_mm=(SPACING,) * 3)
    # Anatomy: a smooth texture shared by every scan of the patient. Flat phantoms correlate only through their
    # noise, so ingest's registration QC (1 - NCC inside the head) would rightly quarantine them.
    zz, yy, xx = np.meshgrid(*[np.linspace(0, np.pi, n) for n in GRID], indexing="ij")
    texture = 0.15 * np.sin(2 * zz + 0.5) * np.cos(3 * yy) + 0.1 * np.sin(4 * xx + yy)
    inside = rec.image[:, :1] > 0
    image = np.where(inside & (rec.label[:, None] == 0), rec.image + texture.astype(np.float32), rec.image)
    rec.image = image.astype(np.float32)
    patient = NativePatient(raw_id, list(dates), days, list(radii_mm))
    for t in range(len(days)):
        folder = out / raw_id / f"scan{t}"
        folder.mkdir(parents=True, exist_ok=True)
        last = flip_last and t == len(days) - 1
        files = {}
        for name, vol, dtype in [*((ch, rec.image[t, ci], np.float32) for ci, ch in enumerate(rec.channels)),
                                 ("label", rec.label[t], np.uint8)]:
            data, aff = _moved(np.transpose(vol, (2, 1, 0)), rec.reference_affine, np.asarray(shifts_mm[t]), last)
            img = nib.Nifti1Image(data.astype(dtype), aff)
            img.set_qform(aff, code=1)
            img.set_sform(aff, code=1)
            files[name] = folder / f"{name}.nii.gz"
            nib.save(img, files[name])
        patient.files.append(files)
    return patient


def write_manifest(path: Path, patients: list[NativePatient]) -> Path:
    """An ingest manifest CSV (patient_id, date, channel, path, label_path) for ``patients``."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "date", "channel", "path", "label_path"])
        for p in patients:
            for date, files in zip(p.dates, p.files, strict=True):
                for ch in ("T1c", "FLAIR"):
                    w.writerow([p.raw_id, date, ch, str(files[ch]), str(files["label"])])
    return path


def baseline_checkpoint(path: Path, kind: str = "linear", channels: tuple[str, ...] = ("T1c", "FLAIR"),
                        crop: int = 32, normalize: str = "none", fov: str | None = None) -> Path:
    """A model-only checkpoint of a closed-form baseline (no training needed); ``fov`` None writes no field-of-view
    setting (a checkpoint saved before the field of view could adapt: fixed)."""
    model = build_model(kind)
    data = {"max_context": 3, "normalize": normalize} | ({"fov": fov} if fov is not None else {})
    torch.save({"kind": kind, "config": model.config_dict(), "state_dict": model.state_dict(),
                "channels": list(channels), "spacing_mm": [SPACING] * 3, "crop_size": [crop] * 3,
                "meta": {"data": data}}, path)
    return path


def register_champion(settings: Settings, checkpoint: Path) -> str:
    """Log ``checkpoint`` as the pyfunc model of a new run and register it as version 1 with aliases challenger
    and champion (what a promoted training run leaves). Returns the version."""
    from longitudinal.tracking import uri
    from longitudinal.tracking.logged_model import log_forecaster
    from longitudinal.tracking.registry import register_version

    client = uri.client(settings)
    exp = uri.ensure_experiment(settings)
    run_id = client.create_run(exp).info.run_id
    model_uri = log_forecaster(checkpoint, run_id, settings.tracking_uri)
    name = settings.registered_model_name
    mv, _ = register_version(client, name, model_uri, run_id, model_uri.removeprefix("models:/"),
                             {"model_kind": "linear"})
    client.set_registered_model_alias(name, "challenger", mv.version)
    client.set_registered_model_alias(name, "champion", mv.version)
    client.set_terminated(run_id)
    return str(mv.version)


@dataclass
class Cohort:
    """An ingested store with two patients (raw ids sub-01 with 3 scans, sub-02 with 2) and a linear champion."""

    root: Path
    settings: Settings
    store: str
    patients: dict[str, NativePatient]
    pids: dict[str, str]
    checkpoint: Path
    version: str


def world_centroid(path: Path, threshold: float = 0.5) -> np.ndarray:
    """RAS mm centroid of the voxels of a NIfTI above ``threshold``."""
    img = nib.load(str(path))
    vox = np.argwhere(np.asarray(img.dataobj) > threshold)
    assert len(vox), f"{path} has no voxel above {threshold}"
    return nib.affines.apply_affine(img.affine, vox.mean(0))
