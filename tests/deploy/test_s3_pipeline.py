"""The whole pipeline against an s3:// store on a real S3 API (moto's server on 127.0.0.1): ingest a tiny
synthetic cohort into s3://BUCKET/cohort.zarr, verify it, train and register a tiny model reading from it
(sqlite MLflow under tmp), and forecast a patient from it with the registered model.

Credentials and the endpoint reach s3fs the way a site sets them: AWS_* environment variables
(AWS_ENDPOINT_URL for a non-AWS S3), nothing passed in code.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import s3fs
import xarray as xr
from distributed import LocalCluster
from moto.server import ThreadedMotoServer
from typer.testing import CliRunner

from longitudinal.cli import app

pytestmark = pytest.mark.slow

N_PATIENTS = 4  # tiny preset: 2 train, 1 validation, 1 test patient
SPACING_MM = 4.0  # the tiny preset's grid
KEY = "s3-test-pseudonym-key"
TINY_TFM = {"width": 4, "channel_mult": [1, 2], "ctx_width": 4, "emb_dim": 16, "steps": 2}
TINY_TRAIN = {
    "model": "tfm", "model_options": TINY_TFM, "crop_size": [16, 16, 16], "steps": 3, "batch_size": 2,
    "num_workers": 0, "device": "cpu", "val_fraction": 0.25, "test_fraction": 0.25, "eval_every": 3,
    "ckpt_every": 3, "log_every": 1, "val_targets": 2, "augment": None, "warmup_steps": 0, "budget_s": None,
}  # fmt: skip


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server on loopback, a fresh bucket, and the AWS_* environment pointing at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                     "MLFLOW_TRACKING_URI", "LONGITUDINAL_STORE", "LONGITUDINAL_HOME"):
            mp.delenv(name, raising=False)
        # Dummy credentials only; the region keeps botocore from looking anywhere else.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)  # the CLI's settings come from the environment
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
            bucket = f"cohort-{uuid.uuid4().hex[:12]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
            yield {"bucket": bucket, "url": f"s3://{bucket}/cohort.zarr", "endpoint": f"http://{host}:{port}"}
        finally:
            server.stop()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from longitudinal.synth import generate_cohort

    root = tmp_path_factory.mktemp("s3-pipeline")
    generate_cohort(root / "bids", N_PATIENTS, 0, "tiny")
    return {"root": root, "bids": root / "bids", "home": root / "home"}


def _settings(workspace: dict[str, Path], store: str):
    from longitudinal.settings import Settings

    home = workspace["home"]
    return Settings(home=home, store=store, pseudonym_key=KEY, target_spacing_mm=SPACING_MM,
                    mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")


def test_ingest_train_forecast_on_s3(s3, workspace) -> None:
    import mlflow

    from longitudinal.forecast import ForecastRequest, Queries, forecast_patient
    from longitudinal.ingest import ingest_cohort
    from longitudinal.tracking.run import run_training
    from storage.store import CohortStore

    url = s3["url"]
    settings = _settings(workspace, url)

    # Ingest through the CLI: every session lands in the bucket; nothing is written to a local cohort folder.
    cli = CliRunner().invoke(app, ["--home", str(workspace["home"]), "ingest", str(workspace["bids"]),
                                   "--store", url, "--workers", "2", "--spacing", str(SPACING_MM)])
    assert cli.exit_code == 0, cli.output
    report = json.loads(sorted((workspace["home"] / "reports").glob("ingest-*.json"))[-1].read_text())
    assert report["summary"]["failed_patients"] == 0 and report["summary"]["quarantined"] == 0
    stored = report["summary"]["stored"]
    assert stored >= N_PATIENTS * 3
    store = CohortStore.open(url, recover=False)
    assert not store.is_local
    assert store.verify() == []
    assert len(store.patient_ids()) == N_PATIENTS
    assert not list(workspace["home"].glob("**/*.zarr"))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    keys = fs.find(f"{s3['bucket']}/cohort.zarr")
    assert any("/patients/" in k and "/image/c/" in k for k in keys)
    # Re-ingesting the same files on a 2-process Dask cluster (workers get the AWS_* environment) reads the
    # bucket's index from the workers and writes nothing.
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        again = ingest_cohort(workspace["bids"], url, settings, dask_address=cluster.scheduler_address)
    assert (again.stored, again.skipped, again.failed_patients) == (0, stored, [])
    # Plain ecosystem readers work on the bucket too.
    index = pd.read_parquet(f"{url}/index")
    assert len(index) == stored
    pid = store.patient_ids()[0]
    ds = xr.open_zarr(url, group=f"patients/{pid}", consolidated=False)
    np.testing.assert_array_equal(ds["time"].values, store.arrays(pid).days)

    # Train + evaluate + register a tiny model reading its samples from the bucket.
    outcome = run_training(settings, url, TINY_TRAIN, eval_samples=2, system_metrics_interval_s=60.0)
    assert int(outcome.version) >= 1 and ({"challenger", "champion"} & set(outcome.aliases))
    assert outcome.checkpoint.is_file()
    assert {r["model"] for r in outcome.val_rows} >= {"candidate", "lci"}
    run = mlflow.MlflowClient(tracking_uri=outcome.tracking_uri).get_run(outcome.run_id)
    assert run.data.tags["store_url"] == url
    assert run.data.params["steps"] == "3"

    # Forecast from the bucket with the registered version (resolved through the sqlite registry).
    patient = store.patient_ids()[-1]
    out_dir = workspace["root"] / "forecast"
    result = forecast_patient(settings, ForecastRequest(patient, Queries(in_days=(90.0,)), store_url=url, model_ref=f"{outcome.registered_name}/{outcome.version}", n_samples=2, out_dir=out_dir, seed=0))
    arr = store.arrays(patient)
    assert result.patient == patient and str(result.version) == str(outcome.version)
    assert len(result.queries) == 1
    q = result.queries[0]
    assert q.days == pytest.approx(float(arr.days[-1]) + 90.0)
    assert q.n_context == min(len(arr.days), 3)
    v = q.volume_whole_ml
    assert np.isfinite(v.median) and v.lo95 <= v.lo80 <= v.median <= v.hi80 <= v.hi95
    assert result.summary_path is not None and result.summary_path.is_file()
    assert all(Path(p).is_file() for p in q.files.values()) and q.files
