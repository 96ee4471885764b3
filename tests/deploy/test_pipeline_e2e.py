"""The pipeline through a real server: `stack up` -> deploy/prefect.yaml -> nightly-ingest -> weekly-retrain.

A tiny synthetic cohort (generated here) is ingested by the cpu worker and a tiny model is trained by the gpu
pool's worker (on the CPU here); the store must verify and the registry must hold a champion afterwards.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from stackhelpers import api, cli, flow_runs, offline_env, pid_gone, trigger_and_wait

from longitudinal.stack.config import port_open

pytestmark = pytest.mark.slow

N_PATIENTS = 5
TINY_TRAIN = {
    "model": "linear", "crop_size": [16, 16, 16], "steps": 4, "batch_size": 2, "num_workers": 0,
    "val_fraction": 0.25, "test_fraction": 0.25, "eval_every": 2, "ckpt_every": 2, "log_every": 1,
    "val_targets": 4, "augment": None, "warmup_steps": 0,
}  # fmt: skip


def test_nightly_ingest_then_weekly_retrain(tmp_path: Path) -> None:
    from longitudinal.synth import generate_cohort
    from storage.store import CohortStore

    bids = tmp_path / "bids"
    generate_cohort(bids, N_PATIENTS, 0, "tiny")
    home, store = tmp_path / "home", str(tmp_path / "home" / "cohort.zarr")
    env = offline_env(
        home,
        LONGITUDINAL_INGEST_SOURCE=str(bids),
        LONGITUDINAL_STORE=store,
        LONGITUDINAL_PSEUDONYM_KEY="deploy-test-key",
        LONGITUDINAL_TARGET_SPACING_MM="4.0",  # the tiny preset's grid
    )
    up = cli(
        env,
        "stack",
        "up",
        "--prefect-port",
        "0",
        "--mlflow-port",
        "0",
        "--worker-port",
        "0",
        "--gpu-worker",
        "--no-ui",
    )
    state = json.loads((home / "stack" / "state.json").read_text())
    try:
        export = next(line for line in up.stdout.splitlines() if line.startswith("export "))
        urls = dict(kv.split("=", 1) for kv in export.split()[1:])
        client = dict(env, **urls)
        base = urls["PREFECT_API_URL"]

        deployed = cli(env, "stack", "deploy", "--name", "nightly-ingest", "--name", "weekly-retrain")
        assert (
            "ingest-cohort/nightly-ingest" in deployed.stdout
            and "train-forecaster/weekly-retrain" in deployed.stdout
        )
        nightly = api(base, "GET", "/deployments/name/ingest-cohort/nightly-ingest")
        weekly = api(base, "GET", "/deployments/name/train-forecaster/weekly-retrain")
        assert nightly["parameters"] == {"source": str(bids), "store": store}
        assert (nightly["work_pool_name"], weekly["work_pool_name"]) == ("cpu", "gpu")
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert weekly["schedules"][0]["schedule"]["cron"] == "0 4 * * 0"

        # The cron schedule is live: the scheduler has queued upcoming nightly runs at 02:00 UTC.
        def upcoming():
            return [
                r
                for r in flow_runs(base, nightly["id"])
                if r["auto_scheduled"] and r["state_type"] == "SCHEDULED"
            ]

        assert all("T02:00:00" in r["expected_start_time"] for r in upcoming())

        ingest = trigger_and_wait(client, "ingest-cohort/nightly-ingest", timeout_s=600)
        assert ingest["state"] == "COMPLETED", ingest
        cohort = CohortStore.open(store)
        assert len(cohort.patient_ids()) == N_PATIENTS
        assert cohort.verify() == []

        train = trigger_and_wait(
            client, "train-forecaster/weekly-retrain", {"train_config": TINY_TRAIN}, timeout_s=600
        )
        assert train["state"] == "COMPLETED", train
        query = urllib.parse.urlencode({"name": "tumor-growth-forecaster", "alias": "champion"})
        with urllib.request.urlopen(
            f"{urls['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/registered-models/alias?{query}", timeout=30
        ) as resp:
            champion = json.loads(resp.read())["model_version"]
        assert champion["name"] == "tumor-growth-forecaster" and int(champion["version"]) >= 1
        # The training run carries the Prefect flow run id that produced it.
        run_id = champion["run_id"]
        with urllib.request.urlopen(
            f"{urls['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/runs/get?run_id={run_id}"
        ) as r:
            tags = {t["key"]: t["value"] for t in json.loads(r.read())["run"]["data"]["tags"]}
        assert train["id"] in tags.values()
    finally:
        cli(env, "stack", "down", check=False)
    for svc in state["services"].values():
        assert pid_gone(svc["pid"]) and not port_open("127.0.0.1", svc["port"])
