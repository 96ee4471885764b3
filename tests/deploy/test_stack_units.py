"""The stack library without servers: config checks, URL redaction, process-group shutdown, state round trip."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
from stackhelpers import pid_gone

from longitudinal.settings import Settings
from longitudinal.stack.config import StackSettings, free_port, port_open, redact_url, resolve_config
from longitudinal.stack.local import DownReport, Service, StackState, read_state, stack_down, stack_up
from longitudinal.stack.process import StackError, descendants, http_ok, start_detached, stop_group


def test_defaults_live_under_the_workspace(tmp_path: Path) -> None:
    cfg = resolve_config(Settings(home=tmp_path), env=StackSettings(_env_file=None))
    home = tmp_path.resolve()
    assert (cfg.prefect_port, cfg.mlflow_port, cfg.worker_health_ports) == (4200, 5000, {"cpu": 8765})
    assert cfg.prefect_database_url == f"sqlite+aiosqlite:///{home}/stack/prefect/prefect.db"
    assert cfg.mlflow_backend_uri == f"sqlite:///{home}/mlflow.db"
    assert cfg.mlflow_artifacts_destination == str(home / "mlartifacts")
    assert cfg.prefect_api_url == "http://127.0.0.1:4200/api" and cfg.mlflow_url == "http://127.0.0.1:5000"
    two = resolve_config(Settings(home=tmp_path), worker_pools=("cpu", "gpu"), worker_health_port=9000)
    assert two.worker_health_ports == {"cpu": 9000, "gpu": 9001}


def test_zero_ports_become_free_ports(tmp_path: Path) -> None:
    cfg = resolve_config(Settings(home=tmp_path), prefect_port=0, mlflow_port=0, worker_health_port=0)
    ports = [cfg.prefect_port, cfg.mlflow_port, *cfg.worker_health_ports.values()]
    assert all(p > 0 for p in ports) and not any(port_open("127.0.0.1", p) for p in ports)


def test_validate_collects_every_problem(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cfg = resolve_config(
            Settings(home=tmp_path),
            prefect_port=taken,
            mlflow_port=taken,
            worker_health_port=0,
            prefect_database_url="postgresql://u:p@127.0.0.1/prefect",
            mlflow_backend_uri="not-a-url",
            worker_pools=("tpu",),
        )
        problems = cfg.validate()
        with pytest.raises(StackError) as err:
            stack_up(cfg)
    assert f"prefect port 127.0.0.1:{taken} is already in use" in problems
    assert f"mlflow port 127.0.0.1:{taken} is already in use" in problems
    assert any(p.startswith("ports must differ") for p in problems)
    assert "worker pool 'tpu' is not one of ['cpu', 'gpu']" in problems
    assert "mlflow backend URL 'not-a-url' is not a URL (sqlite:///... or postgresql://...)" in problems
    assert "Prefect needs the asyncpg driver: postgresql+asyncpg://user:pass@host/db" in problems
    assert len(problems) == 6
    assert all(p in str(err.value) for p in problems)  # up refuses with the whole list, starting nothing
    assert not (tmp_path / "stack" / "state.json").exists()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+asyncpg://u:s3cr3t@db:5432/prefect", "postgresql+asyncpg://u:***@db:5432/prefect"),
        ("postgresql+psycopg://u:p@ss:w@db/mlflow", "postgresql+psycopg://u:***@db/mlflow"),
        ("postgresql://u@db/mlflow", "postgresql://u@db/mlflow"),
        ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_stop_group_ends_a_process_tree_including_a_new_session(tmp_path: Path) -> None:
    # A parent with one child in its group and one that escaped into a session of its own (as Prefect's
    # flow-run subprocesses may): stop_group must end all three.
    script = (
        "import subprocess, sys, time\n"
        "a = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    log = tmp_path / "tree.log"
    proc = start_detached([sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin"}, log_path=log)
    pid = proc.pid
    assert proc.identity is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not log.read_text().strip():
        time.sleep(0.1)
    kids = [int(x) for x in log.read_text().split()]
    assert sorted(descendants(pid)) == sorted(kids)
    assert stop_group(pid, proc.identity, grace_s=5) == []
    for p in [pid, *kids]:
        assert pid_gone(p)


def test_down_stops_recorded_services_and_frees_their_ports(tmp_path: Path) -> None:
    port = free_port()
    server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    log = tmp_path / "http.log"
    proc = start_detached(server, env={"PATH": "/usr/bin:/bin"}, log_path=log, cwd=tmp_path)
    pid = proc.pid
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not http_ok(f"http://127.0.0.1:{port}/"):
        time.sleep(0.2)
    svc = Service.started("web", proc, port, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/", log)
    assert svc.identity is not None and svc.identity.cmdline == tuple(server)
    state = StackState("http://x/api", "http://y", "127.0.0.1", ["cpu"], {"web": svc}, 0.0)
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "state.json").write_text(state.to_json())
    assert read_state(tmp_path / "stack") == state
    assert state.exports() == "export PREFECT_API_URL=http://x/api MLFLOW_TRACKING_URI=http://y"
    assert stack_down(tmp_path / "stack") == DownReport(stopped=["web"])
    assert pid_gone(pid) and not port_open("127.0.0.1", port)
    assert read_state(tmp_path / "stack") is None
    assert stack_down(tmp_path / "stack") is None  # idempotent


def test_a_process_that_dies_at_start_fails_fast_with_its_log(tmp_path: Path) -> None:
    from longitudinal.stack.process import wait_healthy

    log = tmp_path / "bad.log"
    pid = start_detached(
        [sys.executable, "-c", "print('boom: bad config'); raise SystemExit(3)"], env={}, log_path=log
    ).pid
    with pytest.raises(StackError) as err:
        wait_healthy(f"http://127.0.0.1:{free_port()}/health", pid, timeout_s=120, log_path=log)
    # "exited before" (not "not healthy after"): the death was noticed, not waited out.
    assert "exited before" in str(err.value) and "boom: bad config" in str(err.value)
    assert pid_gone(pid)
