"""The PostgreSQL option: deploy/postgres.sh starts a loopback cluster; the stack keeps Prefect and MLflow in it.

A throwaway cluster (own name, free port) is created and dropped by the test; the script installs Debian's
postgresql first when it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from stackhelpers import REPO, cli, offline_env, pid_gone, trigger_and_wait

from longitudinal.stack.config import free_port, port_open

pytestmark = pytest.mark.slow

PASSWORD = "stack-test-pw"


def psql(port: int, db: str, sql: str) -> str:
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "longitudinal", "-d", db, "-tAc", sql],
        env=dict(os.environ, PGPASSWORD=PASSWORD),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def cluster():
    name, port = f"lt{os.getpid()}", free_port()
    script = str(REPO / "deploy" / "postgres.sh")
    try:
        out = subprocess.run(
            [script, "--port", str(port), "--cluster", name, "--password", PASSWORD],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        export = next(line for line in out.stdout.splitlines() if line.startswith("export "))
        yield port, dict(kv.split("=", 1) for kv in export.split()[1:])
    finally:
        subprocess.run([script, "--cluster", name, "--drop"], capture_output=True, timeout=120)
    assert not port_open("127.0.0.1", port)


def test_stack_on_postgres(cluster, tmp_path: Path) -> None:
    port, urls = cluster
    assert urls == {
        "LONGITUDINAL_PREFECT_DATABASE_URL": f"postgresql+asyncpg://longitudinal:{PASSWORD}@127.0.0.1:{port}/prefect",
        "LONGITUDINAL_MLFLOW_BACKEND_URI": f"postgresql+psycopg://longitudinal:{PASSWORD}@127.0.0.1:{port}/mlflow",
    }
    home = tmp_path / "home"
    env = offline_env(home, **urls)
    up = cli(env, "stack", "up", "--prefect-port", "0", "--mlflow-port", "0", "--worker-port", "0", "--no-ui")
    state = json.loads((home / "stack" / "state.json").read_text())
    try:
        assert PASSWORD not in up.stdout  # database URLs are printed redacted
        export = next(line for line in up.stdout.splitlines() if line.startswith("export "))
        client = dict(env, **dict(kv.split("=", 1) for kv in export.split()[1:]))
        assert not (home / "stack" / "prefect" / "prefect.db").exists()  # no SQLite fallback
        assert psql(port, "prefect", "SELECT string_agg(name, ',' ORDER BY name) FROM work_pool") == "cpu,gpu"

        prefect_file = tmp_path / "prefect.yaml"
        prefect_file.write_text(
            yaml.safe_dump(
                {
                    "pull": [
                        {
                            "prefect.deployments.steps.set_working_directory": {
                                "directory": "{{ $LONGITUDINAL_CODE_DIR }}"
                            }
                        }
                    ],
                    "deployments": [
                        {
                            "name": "toy-pg",
                            "entrypoint": "tests/deploy/toy_flows.py:toy_sum",
                            "parameters": {"values": [2, 3], "out_dir": str(tmp_path / "out")},
                            "work_pool": {"name": "cpu"},
                        }
                    ],
                }
            )
        )
        cli(env, "stack", "deploy", "--prefect-file", str(prefect_file))
        run = trigger_and_wait(client, "toy-sum/toy-pg", timeout_s=300)
        assert run["state"] == "COMPLETED", run
        assert json.loads((tmp_path / "out" / f"{run['id']}.json").read_text())["total"] == 5.0
        assert (
            psql(port, "prefect", f"SELECT state_type FROM flow_run WHERE id = '{run['id']}'") == "COMPLETED"
        )

        req = urllib.request.Request(
            f"{client['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/create",
            data=json.dumps({"name": "pg-check"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            exp_id = json.loads(resp.read())["experiment_id"]
        assert (
            psql(port, "mlflow", f"SELECT name FROM experiments WHERE experiment_id = {exp_id}") == "pg-check"
        )
        assert not (home / "mlflow.db").exists()
    finally:
        cli(env, "stack", "down", check=False)
    for svc in state["services"].values():
        assert pid_gone(svc["pid"]) and not port_open("127.0.0.1", svc["port"])
