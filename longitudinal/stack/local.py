"""The local stack: Prefect server + work pools + one worker + MLflow server, all on loopback.

Nothing here imports prefect or mlflow: they run as subprocesses (``python -m prefect ...``,
``python -m mlflow server``) of this interpreter and are judged healthy over HTTP only. State (pids, ports,
URLs, logs) lives in ``<home>/stack/state.json`` so ``down`` and ``status`` work from any later command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from longitudinal.stack.config import StackConfig, port_open
from longitudinal.stack.process import StackError, http_ok, is_alive, start_detached, stop_group, wait_healthy


@dataclass(frozen=True)
class Service:
    """One started process: its pid (also its process-group id), where it listens and logs."""

    name: str
    pid: int
    port: int
    url: str
    health_url: str
    log: str


@dataclass(frozen=True)
class StackState:
    """What ``up`` started; persisted as JSON so ``down``/``status`` need no live parent."""

    prefect_api_url: str
    mlflow_tracking_uri: str
    host: str
    worker_pools: list[str]
    # In start order; ``down`` stops in reverse so no worker polls a vanished server.
    services: dict[str, Service]
    started_at: float

    def exports(self) -> str:
        """The shell line that points clients at this stack."""
        return f"export PREFECT_API_URL={self.prefect_api_url} MLFLOW_TRACKING_URI={self.mlflow_tracking_uri}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackState:
        raw = json.loads(text)
        raw["services"] = {k: Service(**v) for k, v in raw["services"].items()}
        return cls(**raw)


@dataclass(frozen=True)
class ServiceStatus:
    """``status`` row: is the process there, does it answer, is its port open."""

    name: str
    pid: int
    alive: bool
    healthy: bool
    port_open: bool
    url: str


def read_state(stack_dir: Path) -> StackState | None:
    """The recorded stack under ``stack_dir`` (None when nothing was started)."""
    path = stack_dir / "state.json"
    return StackState.from_json(path.read_text()) if path.exists() else None


def base_env(cfg: StackConfig) -> dict[str, str]:
    """Environment every stack process gets: offline Prefect, workspace-scoped homes, the stack's URLs."""
    env = dict(os.environ)
    env.update(
        {
            "PREFECT_HOME": str(cfg.prefect_home),
            "PREFECT_API_URL": cfg.prefect_api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "MLFLOW_TRACKING_URI": cfg.mlflow_url,
            "LONGITUDINAL_HOME": str(cfg.home),
            "LONGITUDINAL_MLFLOW_TRACKING_URI": cfg.mlflow_url,
            "LONGITUDINAL_PREFECT_API_URL": cfg.prefect_api_url,
            # deploy/prefect.yaml's pull step changes into this directory before loading a flow.
            "LONGITUDINAL_CODE_DIR": str(cfg.code_dir),
        }
    )
    env.update(cfg.extra_env)
    return env


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _create_pools(cfg: StackConfig, env: dict[str, str], log_path: Path) -> None:
    """Create (or keep) every work pool as a process pool; idempotent across restarts."""
    problems: list[str] = []
    for pool in cfg.pools:
        proc = subprocess.run(
            _prefect("work-pool", "create", pool, "--type", "process"),
            # Wide lines: rich would otherwise wrap the "already exists" message we look for.
            env=dict(env, COLUMNS="400"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        with open(log_path, "a") as log:
            log.write(proc.stdout + proc.stderr)
        if proc.returncode != 0 and "already exists" not in proc.stdout + proc.stderr:
            problems.append(
                f"work pool {pool!r}: exit {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}"
            )
    if problems:
        raise StackError("could not create work pools:\n" + "\n".join(problems))


def stack_up(cfg: StackConfig) -> StackState:
    """Start every service, wait until each answers over HTTP, record and return the state.

    Raises StackError (listing every problem) when a stack is already recorded as running, a port is taken,
    or a service fails to become healthy; in the last case everything started so far is stopped again.
    """
    existing = read_state(cfg.stack_dir)
    if existing and any(is_alive(s.pid) for s in existing.services.values()):
        raise StackError(
            f"a stack is already running ({cfg.state_file}); run `longitudinal stack down` first"
        )
    problems = cfg.validate()
    if problems:
        raise StackError("cannot start the stack:\n- " + "\n- ".join(problems))

    logs = cfg.stack_dir / "logs"
    for d in (cfg.prefect_home, logs, cfg.home):
        d.mkdir(parents=True, exist_ok=True)
    if cfg.mlflow_backend_uri.startswith("sqlite:///"):
        Path(cfg.mlflow_backend_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    if "://" not in cfg.mlflow_artifacts_destination:
        Path(cfg.mlflow_artifacts_destination).mkdir(parents=True, exist_ok=True)
    env = base_env(cfg)
    started: dict[str, Service] = {}
    try:
        server_env = dict(env, PREFECT_SERVER_DATABASE_CONNECTION_URL=cfg.prefect_database_url)
        server_argv = _prefect(
            "server", "start", "--host", cfg.host, "--port", str(cfg.prefect_port),
            "--ui" if cfg.prefect_ui else "--no-ui",
        )  # fmt: skip
        log = logs / "prefect-server.log"
        started["prefect-server"] = Service(
            "prefect-server",
            start_detached(server_argv, env=server_env, log_path=log, cwd=cfg.stack_dir),
            cfg.prefect_port,
            cfg.prefect_api_url,
            f"{cfg.prefect_api_url}/health",
            str(log),
        )
        mlflow_argv = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", cfg.mlflow_backend_uri,
            "--artifacts-destination", cfg.mlflow_artifacts_destination,
            "--host", cfg.host, "--port", str(cfg.mlflow_port), "--workers", "1",
        ]  # fmt: skip
        log = logs / "mlflow-server.log"
        started["mlflow-server"] = Service(
            "mlflow-server",
            start_detached(mlflow_argv, env=env, log_path=log, cwd=cfg.stack_dir),
            cfg.mlflow_port,
            cfg.mlflow_url,
            f"{cfg.mlflow_url}/health",
            str(log),
        )
        for svc in list(started.values()):
            wait_healthy(svc.health_url, svc.pid, timeout_s=cfg.startup_timeout_s, log_path=Path(svc.log))

        _create_pools(cfg, env, logs / "work-pools.log")
        for pool in cfg.worker_pools:
            name = f"worker-{pool}"
            worker_env = dict(
                env,
                PREFECT_WORKER_WEBSERVER_HOST=cfg.host,
                PREFECT_WORKER_WEBSERVER_PORT=str(cfg.worker_health_ports[pool]),
            )
            worker_argv = _prefect(
                "worker", "start", "--pool", pool, "--type", "process",
                "--name", f"longitudinal-{pool}-{cfg.prefect_port}", "--with-healthcheck",
                "--install-policy", "never",
            )  # fmt: skip
            log = logs / f"{name}.log"
            started[name] = Service(
                name,
                start_detached(worker_argv, env=worker_env, log_path=log, cwd=cfg.code_dir),
                cfg.worker_health_ports[pool],
                f"pool {pool}",
                cfg.worker_health_url(pool),
                str(log),
            )
        for pool in cfg.worker_pools:
            svc = started[f"worker-{pool}"]
            wait_healthy(svc.health_url, svc.pid, timeout_s=cfg.startup_timeout_s, log_path=Path(svc.log))
    except BaseException:
        for svc in reversed(list(started.values())):
            stop_group(svc.pid)
        raise

    state = StackState(
        prefect_api_url=cfg.prefect_api_url,
        mlflow_tracking_uri=cfg.mlflow_url,
        host=cfg.host,
        worker_pools=list(cfg.worker_pools),
        services=started,
        started_at=time.time(),
    )
    cfg.state_file.write_text(state.to_json())
    return state


def stack_status(stack_dir: Path) -> list[ServiceStatus]:
    """One row per recorded service (empty when no stack is recorded)."""
    state = read_state(stack_dir)
    if state is None:
        return []
    return [
        ServiceStatus(
            name=svc.name,
            pid=svc.pid,
            alive=is_alive(svc.pid),
            healthy=http_ok(svc.health_url),
            port_open=port_open(state.host, svc.port),
            url=svc.url,
        )
        for svc in state.services.values()
    ]


def stack_down(stack_dir: Path, *, port_timeout_s: float = 20.0) -> list[str]:
    """Stop every recorded process group (worker first) and wait until their ports close.

    Returns the names of the services stopped; raises StackError listing any pid that survived or port
    left open. The state file is removed only when everything is down.
    """
    state = read_state(stack_dir)
    if state is None:
        return []
    services = list(reversed(state.services.values()))
    problems: list[str] = []
    for svc in services:
        survivors = stop_group(svc.pid)
        if survivors:
            problems.append(f"{svc.name}: pids {survivors} still alive after SIGKILL")
    deadline = time.monotonic() + port_timeout_s
    while time.monotonic() < deadline and any(port_open(state.host, s.port) for s in services):
        time.sleep(0.2)
    problems += [
        f"{s.name}: port {state.host}:{s.port} still open" for s in services if port_open(state.host, s.port)
    ]
    if problems:
        raise StackError("stack did not stop cleanly:\n- " + "\n- ".join(problems))
    (stack_dir / "state.json").unlink()
    return [s.name for s in services]
