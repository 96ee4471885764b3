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
    # Anatomy shared by every scan (flat phantoms correlate only through noise, and ingest's registration QC
    # would rightly quarantine them): the served model prepares scans through real ingest.
    zz, yy, xx = np.meshgrid(*[np.linspace(0, np.pi, n) for n in grid], indexing="ij")
    texture = 0.15 * np.sin(2 * zz + 0.5) * np.cos(3 * yy) + 0.1 * np.sin(4 * xx + yy)
    inside = rec.image[:, :1] > 0
    rec.image = np.where(inside & (rec.label[:, None] == 0), rec.image + texture, rec.image).astype(np.float32)
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


# Tiny training settings: 16^3 crops, a few steps, no workers, so a whole run_training takes seconds of compute.
TINY_TRAIN = {"crop_size": [16, 16, 16], "steps": 4, "batch_size": 2, "num_workers": 0, "val_fraction": 0.25,
              "test_fraction": 0.25, "eval_every": 2, "ckpt_every": 2, "log_every": 1, "val_targets": 4,
              "augment": None, "warmup_steps": 0}

CONSUMER_SCRIPT = """
import json, sys
import mlflow
import pandas as pd

uri, frame_csv, out_dir, out_json, name = sys.argv[1:6]
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
frame = pd.read_csv(frame_csv)
out = model.predict(frame, params={"in_days": [60.0, 120.0], "n_samples": 2, "out_dir": out_dir})
out.to_json(out_json, orient="records")
print("modules", sorted(m for m in sys.modules if m.split(".")[0] == "longitudinal")[:3])
"""


def run_consumer(tracking_uri: str, frame: pd.DataFrame, work: Path, name: str = "tumor-growth-forecaster"
                 ) -> list[dict]:
    """A fresh Python process that loads ``models:/<name>@champion`` with ``mlflow.pyfunc.load_model`` alone
    and predicts."""
    import json

    work.mkdir(parents=True, exist_ok=True)
    frame.to_csv(work / "frame.csv", index=False)
    (work / "consumer.py").write_text(CONSUMER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(work / "consumer.py"), tracking_uri, str(work / "frame.csv"), str(work / "maps"),
         str(work / "out.json"), name],
        cwd=work, env={**os.environ, **ENV_QUIET, "MLFLOW_TRACKING_URI": "", "LONGITUDINAL_HOME": str(work / "home")},
        capture_output=True, text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "out.json").read_text())


def check_consumer_output(rows: list[dict], truth: dict) -> None:
    """Known answers for a ``linear`` champion on a growing sphere: volumes extrapolate the last two scans'
    whole-tumour volumes linearly in time; the probability map sits on the baseline's tumour (registration
    undid the header shifts)."""
    import json

    import nibabel as nib

    v, d = truth["whole_ml"], truth["days"]
    assert [r["days_since_baseline"] for r in rows] == [180.0, 240.0]
    assert [r["days_after_last_scan"] for r in rows] == [60.0, 120.0]
    for r in rows:
        expected = v[-1] + (v[-1] - v[-2]) * (r["days_since_baseline"] - d[-1]) / (d[-1] - d[-2])
        assert r["volume_whole_ml_median"] == pytest_approx(expected, rel=0.15)
        assert r["volume_whole_ml_lo95"] <= r["volume_whole_ml_median"] <= r["volume_whole_ml_hi95"]
        assert 0 < r["volume_enhancing_ml_median"] < r["volume_whole_ml_median"]
    assert rows[1]["volume_whole_ml_median"] > rows[0]["volume_whole_ml_median"] > v[-1]
    files = json.loads(Path(rows[0]["summary_path"]).read_text())["queries"][0]["files"]
    prob = nib.load(files["prob_whole"])
    data = np.asarray(prob.dataobj)
    centroid = np.argwhere(data > 0.5).mean(0)
    # In the latest scan's native grid, whose header moved with its content, the tumour sits at the centre.
    assert np.allclose(centroid, (np.array(data.shape) - 1) / 2, atol=0.75), centroid
    assert nib.load(files["forecast_T1c"]).shape == data.shape


def pytest_approx(value: float, rel: float) -> object:
    import pytest

    return pytest.approx(value, rel=rel)
