"""Kill a training mid-way (SIGKILL), rerun it: it resumes from the checkpoint, in the same MLflow run, and
leaves exactly one registered version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow import MlflowClient
from trackinghelpers import ENV_QUIET, TINY_TRAIN

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.settings import Settings
from longitudinal.tracking.registry import list_versions
from longitudinal.tracking.run import STATE_FILE, config_dict, run_key, run_training, store_hash
from longitudinal.training.config import DEFAULT_TRAIN_CONFIG, TrainConfig

TFM = {**TINY_TRAIN, "model": "tfm", "steps": 12, "ckpt_every": 3, "eval_every": 1000, "val_targets": 2,
       "model_options": {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}}

SCRIPT = """
import json, sys
from longitudinal.settings import Settings
from longitudinal.tracking.run import run_training
run_training(Settings(home=sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), eval_samples=2)
"""


def test_killed_training_resumes_in_the_same_run_with_one_version(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    store = str(tmp_path / "store.zarr")
    make_phantom_store(store, n_patients=6, seed=2, grid=(24, 24, 24))
    cfg = TrainConfig(**{**DEFAULT_TRAIN_CONFIG.to_dict(), **TFM})
    run_dir = settings.runs_path / f"tfm-{run_key(config_dict(cfg), store_hash(store))}"
    latest = run_dir / "checkpoints" / "latest.pt"

    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(settings.home), store, json.dumps(TFM)],
                            cwd=tmp_path, env={**os.environ, **ENV_QUIET}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 400
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            killed_at = int(torch.load(latest, weights_only=True)["step"])
            break
        time.sleep(0.05)
    assert killed_at is not None, f"no checkpoint before the run ended: {proc.stderr.read()[-2000:]}"
    assert 0 < killed_at < TFM["steps"]
    first_run_id = json.loads((run_dir / STATE_FILE).read_text())["run_id"]
    assert list_versions(settings) == []  # killed before registration

    outcome = run_training(settings, store, TFM, eval_samples=2)
    assert outcome.resumed and outcome.run_id == first_run_id
    versions = list_versions(settings)
    assert [v.version for v in versions] == ["1"]
    # a sampled model is registered with the calibration its intervals rest on
    n_val = len(json.loads((run_dir / "split.json").read_text())["val"])
    assert versions[0].intervals.startswith("calibrated: ") and f"of {n_val} held-out patients" in versions[0].intervals
    assert versions[0].intervals.endswith("(scaled scores)")  # training's default form
    client = MlflowClient(outcome.tracking_uri)
    steps = [m.step for m in client.get_metric_history(outcome.run_id, "train_loss")]
    # resumed, not restarted: no training step is logged twice, and the run reaches the configured steps
    assert len(steps) == len(set(steps)) and max(steps) == TFM["steps"]
    assert min(steps) <= killed_at
    assert client.get_run(outcome.run_id).info.status == "FINISHED"

    again = run_training(settings, store, TFM, eval_samples=2)  # a rerun of a finished training adds nothing
    assert again.run_id == outcome.run_id and not again.created_version
    assert [v.version for v in list_versions(settings)] == ["1"]
