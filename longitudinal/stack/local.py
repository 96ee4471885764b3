"""The local stack: Prefect server + work pools + one worker + MLflow server, all on loopback.

Nothing here imports prefect or mlflow: they run as subprocesses (``python -m prefect ...``,
``python -m mlflow server``) of this interpreter and are judged healthy over HTTP only. State (pids, ports,
URLs, logs) lives in ``<home>/stack/state.json`` so ``down`` and ``status`` work from any later command.
Each pid is recorded with the identity of its process, so a later command never signals a stranger that
was handed the same pid after a crash or reboot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from longitudinal.stack.config import StackConfig, port_open
from longitudinal.stack.process import (
    DetachedProcess,
    ProcessIdentity,
    StackError,
    check_process,
    group_members,
    http_ok,
    start_detached,
    stop_by_hand,
    stop_group,
    wait_healthy,
)


@dataclass(frozen=True)
class Service:
    """One started process: its pid (also its process-group id), where it listens and logs.

    ``identity`` is what the pid belonged to when it was started; None in state files written before it
    was recorded, and such a service is never signalled.
    """

    name: str
    pid: int
    port: int
    url: str
    health_url: str
    log: str
    identity: ProcessIdentity | None = None

    @classmethod
    def started(
        cls, name: str, proc: DetachedProcess, port: int, url: str, health_url: str, log: Path
    ) -> Service:
        """The record of a process ``start_detached`` just started."""
        return cls(name, proc.pid, port, url, health_url, str(log), proc.identity)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Service:
        """A service from its JSON form; one without ``identity`` (older state files) gets None."""
        identity = raw.get("identity")
        fields = {k: v for k, v in raw.items() if k != "identity"}
        return cls(**fields, identity=ProcessIdentity.from_dict(identity) if identity else None)


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
        raw["services"] = {k: Service.from_dict(v) for k, v in raw["services"].items()}
        return cls(**raw)


@dataclass(frozen=True)
class ServiceStatus:
    """``status`` row: is the recorded process there, does it answer, is its port open.

    ``note`` says why ``alive`` cannot be trusted or is False although the pid exists (empty otherwise).
    """

    name: str
    pid: int
    alive: bool
    healthy: bool
    port_open: bool
    url: str
    note: str = ""


@dataclass(frozen=True)
class DownReport:
    """What ``stack_down`` did with each recorded service.

    ``warnings`` are stale records cleared without signalling anything (their pid belongs to another
    process now, or a leftover could not be verified); ``problems`` are what may still be running although it
    should be down. Only problems make ``down`` fail.
    """

    stopped: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


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
    if existing:
        # Records whose pid now belongs to someone else are stale and get overwritten; unverifiable ones may
        # be a live stack, which `down` reports on.
        checks = [check_process(s.pid, s.identity).state for s in existing.services.values()]
        if "running" in checks:
            raise StackError(
                f"a stack is already running ({cfg.state_file}); run `longitudinal stack down` first"
            )
        if "unverifiable" in checks:
            raise StackError(
                f"a stack is recorded ({cfg.state_file}) whose processes cannot be verified; "
                "run `longitudinal stack down` first"
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
        started["prefect-server"] = Service.started(
            "prefect-server",
            start_detached(server_argv, env=server_env, log_path=log, cwd=cfg.stack_dir),
            cfg.prefect_port,
            cfg.prefect_api_url,
            f"{cfg.prefect_api_url}/health",
            log,
        )
        mlflow_argv = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", cfg.mlflow_backend_uri,
            "--artifacts-destination", cfg.mlflow_artifacts_destination,
            "--host", cfg.host, "--port", str(cfg.mlflow_port), "--workers", "1",
        ]  # fmt: skip
        log = logs / "mlflow-server.log"
        started["mlflow-server"] = Service.started(
            "mlflow-server",
            start_detached(mlflow_argv, env=env, log_path=log, cwd=cfg.stack_dir),
            cfg.mlflow_port,
            cfg.mlflow_url,
            f"{cfg.mlflow_url}/health",
            log,
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
            started[name] = Service.started(
                name,
                start_detached(worker_argv, env=worker_env, log_path=log, cwd=cfg.code_dir),
                cfg.worker_health_ports[pool],
                f"pool {pool}",
                cfg.worker_health_url(pool),
                log,
            )
        for pool in cfg.worker_pools:
            svc = started[f"worker-{pool}"]
            wait_healthy(svc.health_url, svc.pid, timeout_s=cfg.startup_timeout_s, log_path=Path(svc.log))
    except BaseException:
        for svc in reversed(list(started.values())):
            if svc.identity is not None:
                stop_group(svc.pid, svc.identity)
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
    rows = []
    for svc in state.services.values():
        check = check_process(svc.pid, svc.identity)
        rows.append(
            ServiceStatus(
                name=svc.name,
                pid=svc.pid,
                alive=check.state in ("running", "unverifiable"),
                healthy=http_ok(svc.health_url),
                port_open=port_open(state.host, svc.port),
                url=svc.url,
                note=check.detail,
            )
        )
    return rows


def stack_down(stack_dir: Path, *, port_timeout_s: float = 20.0) -> DownReport | None:
    """Stop every recorded process group (worker first) that is still the process recorded, and wait until
    their ports close. None when no stack is recorded.

    A pid that now belongs to another process is left alone and its record cleared (a warning). A pid that
    cannot be verified (a state file without identities) is not signalled either: a problem, since it may be
    a live server, reported with how to stop it by hand, and its record cleared because no later ``down``
    could verify it. What was signalled but survived, or left its port open, stays recorded for a retry;
    the state file goes once nothing is left in it.
    """
    state = read_state(stack_dir)
    if state is None:
        return None
    report = DownReport()
    signalled: list[Service] = []
    failed: dict[str, Service] = {}
    for svc in reversed(state.services.values()):
        check = check_process(svc.pid, svc.identity)
        if check.state == "running" and svc.identity is not None:
            survivors = stop_group(svc.pid, svc.identity)
            if survivors:
                report.problems.append(f"{svc.name}: pids {survivors} still alive after SIGKILL")
                failed[svc.name] = svc
            else:
                signalled.append(svc)
        elif check.state == "gone":
            report.already_gone.append(svc.name)
            leftovers = group_members(svc.pid)
            if leftovers:
                # A dead leader cannot vouch for its group: the pid may have been freed and reused meanwhile.
                report.warnings.append(
                    f"{svc.name}: pid {svc.pid} had exited, but pids {leftovers} are in process group "
                    f"{svc.pid} and were not signalled; {stop_by_hand(svc.pid)}"
                )
            elif port_open(state.host, svc.port):
                report.warnings.append(
                    f"{svc.name}: pid {svc.pid} had exited, but port {state.host}:{svc.port} is open, held by "
                    "a process the stack cannot verify (not signalled)"
                )
        elif check.state == "replaced":
            report.warnings.append(f"{svc.name}: {check.detail}; left it alone and cleared the record")
        else:
            report.problems.append(f"{svc.name}: not signalled: {check.detail}; {stop_by_hand(svc.pid)}")

    deadline = time.monotonic() + port_timeout_s
    while time.monotonic() < deadline and any(port_open(state.host, s.port) for s in signalled):
        time.sleep(0.2)
    for svc in signalled:
        if port_open(state.host, svc.port):
            report.problems.append(f"{svc.name}: port {state.host}:{svc.port} still open")
            failed[svc.name] = svc
        else:
            report.stopped.append(svc.name)

    path = stack_dir / "state.json"
    if failed:
        kept = {name: svc for name, svc in state.services.items() if name in failed}
        path.write_text(replace(state, services=kept).to_json())
    else:
        path.unlink()
    return report
