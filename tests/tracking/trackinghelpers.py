"""Shared helpers of the tracking tests: a real MLflow server on loopback, native NIfTI series written from
phantoms with a known header shift, and model checkpoints of the baseline kinds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from longitudinal.data.phantoms import phantom_record
from longitudinal.models.base import build_model

ENV_QUIET = {"MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a sqlite backend and a local artifact root, in its own session so
    stop() ends the whole process group (uvicorn workers, job runner)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=root,
                                     env={**os.environ, **ENV_QUIET}, start_new_session=True)

    def wait(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(1.0)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def write_native_series(
    out: Path, patient_id: str = "p1", days: tuple[float, ...] = (0.0, 60.0, 120.0),
    radii_mm: tuple[float, ...] = (5.0, 6.5, 8.0), shift_mm: float = 4.0, grid: tuple[int, int, int] = (32, 32, 32),
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Write a phantom patient's scans as native NIfTI files (one per channel + label per scan).

    Scans after the baseline get their header origin moved by ``shift_mm`` along x (a known 'motion' of the
    content in physical space), so a consumer must register them. Returns the input DataFrame and the truth
    (whole-tumour volumes in ml per scan, days).
    """
    out.mkdir(parents=True, exist_ok=True)
    centre = tuple((n - 1) / 2 for n in grid)
    rec = phantom_record(patient_id, list(days), [centre] * len(days), list(radii_mm), grid=grid)
    rows = []
    for t in range(len(days)):
        aff = rec.reference_affine.copy()
        if t > 0:
            aff[0, 3] += shift_mm * (1 if t % 2 else -1)
        row: dict[str, object] = {"patient_id": patient_id, "days": float(days[t])}
        for ci, ch in enumerate(rec.channels):
            p = out / f"{patient_id}_t{t}_{ch}.nii.gz"
            nib.save(nib.Nifti1Image(np.transpose(rec.image[t, ci], (2, 1, 0)), aff), p)
            row[ch] = str(p)
        p = out / f"{patient_id}_t{t}_label.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(rec.label[t], (2, 1, 0)).astype(np.uint8), aff), p)
        row["label"] = str(p)
        rows.append(row)
    voxel_ml = float(np.prod(rec.spacing_mm)) / 1000.0
    truth = {"whole_ml": (rec.label.reshape(len(days), -1) > 0).sum(1) * voxel_ml, "days": np.asarray(days)}
    return pd.DataFrame(rows), truth


def baseline_checkpoint(path: Path, kind: str = "linear", crop: int = 32) -> Path:
    """A model-only checkpoint of a closed-form baseline kind (no training needed)."""
    model = build_model(kind)
    torch.save({"kind": kind, "config": model.config_dict(), "state_dict": model.state_dict(),
                "channels": ["T1c", "FLAIR"], "spacing_mm": [2.0, 2.0, 2.0], "crop_size": [crop] * 3,
                "meta": {"max_context": 3}}, path)
    return path
