"""End to end on loopback: `stack up` -> deploy -> trigger through the API -> schedules fire -> serve -> `stack down`.

One real stack (Prefect server, cpu and gpu workers, MLflow server) per module; toy flows from
tests/deploy/toy_flows.py stand in for the pipeline's flows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stackhelpers import REPO, api, cli, flow_runs, offline_env, pid_gone, trigger_and_wait, wait_for

from longitudinal.stack.config import port_open

pytestmark = pytest.mark.slow

PULL = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $LONGITUDINAL_CODE_DIR }}"}}]


def toy_prefect_file(path: Path, deployments: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"name": "toy", "pull": PULL, "deployments": deployments}))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("stack-home")
    env = offline_env(home)
    up = cli(
        env, "stack", "up", "--prefect-port", "0", "--mlflow-port", "0", "--worker-port", "0",
        "--gpu-worker", "--no-ui",
    )  # fmt: skip
    export = next(line for line in up.stdout.splitlines() if line.startswith("export "))
    urls = dict(kv.split("=", 1) for kv in export.split()[1:])
    state = json.loads((home / "stack" / "state.json").read_text())
    client_env = dict(env, **urls)
    info = {"home": home, "env": env, "client_env": client_env, "urls": urls, "state": state, "up": up.stdout}
    try:
        yield info
    finally:
        # Teardown is the `down` test's job; this only guards against a failure before it ran.
        if (home / "stack" / "state.json").exists():
            cli(env, "stack", "down", check=False)


def test_up_starts_every_service_healthy(stack) -> None:
    services = stack["state"]["services"]
    assert list(services) == ["prefect-server", "mlflow-server", "worker-cpu", "worker-gpu"]
    status = cli(stack["env"], "stack", "status")
    assert status.stdout.count("alive=True healthy=True port_open=True") == 4, status.stdout
    urls = stack["urls"]
    assert urls["PREFECT_API_URL"].startswith("http://127.0.0.1:") and urls["PREFECT_API_URL"].endswith(
        "/api"
    )
    assert api(urls["PREFECT_API_URL"], "GET", "/health") is True
    pools = {p["name"]: p["type"] for p in api(urls["PREFECT_API_URL"], "POST", "/work_pools/filter", {})}
    assert pools == {"cpu": "process", "gpu": "process"}
    # The MLflow server has a database backend and answers its REST API.
    exps = api_mlflow(urls["MLFLOW_TRACKING_URI"], "/api/2.0/mlflow/experiments/search", {"max_results": 10})
    assert [e["name"] for e in exps["experiments"]] == ["Default"]
    assert (stack["home"] / "mlflow.db").is_file()
    # Every server listens on loopback only.
    for svc in services.values():
        assert port_open("127.0.0.1", svc["port"])


def api_mlflow(base: str, path: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(
        f"{base}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_second_up_refuses_while_running(stack) -> None:
    again = cli(stack["env"], "stack", "up", "--prefect-port", "0", "--mlflow-port", "0", check=False)
    assert again.returncode == 1
    assert "already running" in again.stderr


def test_deploy_and_trigger_through_the_api(stack, tmp_path: Path) -> None:
    base = stack["urls"]["PREFECT_API_URL"]
    out_on_demand, out_interval = tmp_path / "on-demand", tmp_path / "interval"
    prefect_file = toy_prefect_file(
        tmp_path / "prefect.yaml",
        [
            {
                "name": "toy-on-demand",
                "entrypoint": "tests/deploy/toy_flows.py:toy_sum",
                "parameters": {"values": [1, 2, 3.5], "out_dir": str(out_on_demand)},
                "schedules": [],
                "work_pool": {"name": "cpu"},
            },
            {
                "name": "toy-interval",
                "entrypoint": "tests/deploy/toy_flows.py:toy_sum",
                "parameters": {"values": [10, 20], "out_dir": str(out_interval)},
                "schedules": [{"interval": 20}],
                "work_pool": {"name": "gpu"},
            },
        ],
    )
    deployed = cli(stack["env"], "stack", "deploy", "--prefect-file", str(prefect_file))
    assert "toy-on-demand" in deployed.stdout and "toy-interval" in deployed.stdout

    on_demand = api(base, "GET", "/deployments/name/toy-sum/toy-on-demand")
    assert on_demand["work_pool_name"] == "cpu" and on_demand["schedules"] == []
    interval = api(base, "GET", "/deployments/name/toy-sum/toy-interval")
    assert interval["work_pool_name"] == "gpu"
    assert interval["schedules"][0]["schedule"]["interval"] == 20.0

    # Triggered through the API, executed by the cpu worker, with the parameters overridden.
    run = trigger_and_wait(stack["client_env"], "toy-sum/toy-on-demand", {"values": [4, 0.25]}, timeout_s=300)
    assert run["state"] == "COMPLETED", run
    record = json.loads((out_on_demand / f"{run['id']}.json").read_text())
    assert record["total"] == 4.25
    assert Path(record["cwd"]) == REPO  # the pull step moved into LONGITUDINAL_CODE_DIR
    assert record["mlflow"] == stack["urls"]["MLFLOW_TRACKING_URI"]

    # The schedule alone creates runs (every 20 s), and the gpu worker completes one.
    def completed_scheduled():
        runs = flow_runs(base, interval["id"])
        return [r for r in runs if r["auto_scheduled"] and r["state_type"] == "COMPLETED"]

    done = wait_for(completed_scheduled, 300, "a completed auto-scheduled run of toy-interval")
    record = json.loads((out_interval / f"{done[0]['id']}.json").read_text())
    assert record["total"] == 30.0
    # Stop the schedule so the worker is idle for the next tests.
    api(base, "PATCH", f"/deployments/{interval['id']}", {"paused": True})


def test_serve_runs_scheduled_deployments_in_one_process(stack, tmp_path: Path) -> None:
    base = stack["urls"]["PREFECT_API_URL"]
    out = tmp_path / "served"
    prefect_file = toy_prefect_file(
        tmp_path / "serve.yaml",
        [
            {
                "name": "toy-served",
                "entrypoint": "tests/deploy/toy_flows.py:toy_sum",
                "parameters": {"values": [1, 1, 1], "out_dir": str(out)},
                "schedules": [{"interval": 20}],
                "work_pool": {"name": "cpu"},
            }
        ],
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "longitudinal", "serve", "--prefect-file", str(prefect_file)],
        env=stack["env"],  # no PREFECT_API_URL: serve finds the recorded stack
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        served = wait_for(
            lambda: _deployment_or_none(base, "toy-sum/toy-served"), 120, "serve to register toy-served"
        )
        assert served["schedules"][0]["schedule"]["interval"] == 20.0
        assert served["work_pool_name"] is None  # served, not pooled

        def completed():
            runs = flow_runs(base, served["id"])
            return [r for r in runs if r["auto_scheduled"] and r["state_type"] == "COMPLETED"]

        done = wait_for(completed, 300, "a completed scheduled run of the served deployment")
        assert json.loads((out / f"{done[0]['id']}.json").read_text())["total"] == 3.0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert pid_gone(proc.pid)


def _deployment_or_none(base: str, name: str) -> dict | None:
    import urllib.error

    try:
        return api(base, "GET", f"/deployments/name/{name}")
    except urllib.error.HTTPError:
        return None


def test_down_leaves_no_process_and_no_port(stack) -> None:
    services = stack["state"]["services"]
    down = cli(stack["env"], "stack", "down")
    assert "stopped: worker-gpu, worker-cpu, mlflow-server, prefect-server" in down.stdout
    for name, svc in services.items():
        assert pid_gone(svc["pid"]), f"{name} pid {svc['pid']} still alive"
        assert not port_open("127.0.0.1", svc["port"]), f"{name} port {svc['port']} still open"
    assert not (stack["home"] / "stack" / "state.json").exists()
    status = cli(stack["env"], "stack", "status", check=False)
    assert status.returncode == 1 and "no stack recorded" in status.stderr
