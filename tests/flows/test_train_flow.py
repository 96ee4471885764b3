"""The ``train-forecaster`` flow under Prefect's test harness: it trains, registers and promotes through
run_training, records the flow-run id on the MLflow run, publishes a summary artifact, and a rerun of the flow
adds no registry version."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.settings import Settings
from longitudinal.tracking.registry import list_versions

TINY = {"model": "linear", "crop_size": [16, 16, 16], "steps": 2, "batch_size": 2, "num_workers": 0,
        "val_fraction": 0.25, "test_fraction": 0.25, "eval_every": 2, "ckpt_every": 2, "log_every": 1,
        "val_targets": 4, "augment": None}


@pytest.fixture
def prefect_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    prefect_home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(prefect_home / "storage"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_TELEMETRY", "false")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: prefect_home,
                                     PREFECT_LOCAL_STORAGE_PATH: prefect_home / "storage"}):
        with prefect_test_harness(server_startup_timeout=180):  # a loaded CI machine starts it slowly
            yield prefect_home


def test_train_forecaster_flow_registers_once_and_records_the_flow_run(tmp_path: Path, prefect_env: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.train import train_forecaster

    home = tmp_path / "home"
    store = str(tmp_path / "store.zarr")
    make_phantom_store(store, n_patients=6, seed=4, grid=(24, 24, 24))

    summary = train_forecaster(store=store, train_config=TINY, home=str(home))
    assert summary["version"] == "1" and summary["created_version"]
    assert summary["aliases"] == ["challenger", "champion"]
    assert summary["decision"]["gate.decision"] == "promoted"

    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs()
        artifacts = {a.key: a for a in client.read_artifacts()}
    assert "train-forecaster-summary" in artifacts
    assert summary["run_id"] in artifacts["train-forecaster-summary"].data
    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.tags["prefect_flow_run_id"] == str(flow_run.id)
    assert summary["tracking_uri"] == Settings(home=home).tracking_uri

    again = train_forecaster(store=store, train_config=TINY, home=str(home))
    assert again["run_id"] == summary["run_id"] and not again["created_version"]
    assert [v.version for v in list_versions(Settings(home=home))] == ["1"]
