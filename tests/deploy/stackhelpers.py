"""Helpers for tests that drive the real stack: the CLI as a subprocess and Prefect's REST API over loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def offline_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of every process a test starts: workspace under tmp, Prefect offline, fast polling."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "LONGITUDINAL_"))}
    env.update(
        LONGITUDINAL_HOME=str(home),
        PREFECT_HOME=str(home / "prefect-client"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        MLFLOW_ENABLE_TELEMETRY="false",
        # Workers and served deployments poll every 5 s instead of 10 s, so tests wait less.
        PREFECT_WORKER_QUERY_SECONDS="5",
        PREFECT_RUNNER_POLL_FREQUENCY="5",
    )
    env.update(extra)
    return env


def cli(
    env: dict[str, str], *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``longitudinal ARGS`` as a subprocess; on failure show its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "longitudinal", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"longitudinal {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def api(base: str, method: str, path: str, body: dict[str, Any] | None = None, tries: int = 10) -> Any:
    """JSON call to the Prefect REST API at ``base`` (…/api).

    Retries 503 and read timeouts: Prefect on SQLite answers 503, or stalls, while the database is locked by
    the scheduler or a worker (worst on a loaded machine).
    """
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(tries):
        req = urllib.request.Request(
            f"{base}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == tries - 1:
                raise
        except (TimeoutError, urllib.error.URLError):
            if attempt == tries - 1:
                raise
        time.sleep(1.0)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, every_s: float = 1.0) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def flow_runs(base: str, deployment_id: str) -> list[dict[str, Any]]:
    """Every flow run of one deployment."""
    return api(
        base,
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 200},
    )


def trigger_and_wait(
    env: dict[str, str], name: str, parameters: dict | None = None, timeout_s: int = 600
) -> dict:
    """Run a deployment with prefect.deployments.run_deployment (a real client) and return its final state."""
    code = (
        "import json, sys\n"
        "from prefect.deployments import run_deployment\n"
        "fr = run_deployment(sys.argv[1], parameters=json.loads(sys.argv[2]) or None, timeout=int(sys.argv[3]))\n"
        "print(json.dumps({'id': str(fr.id), 'state': fr.state.type.value, 'message': fr.state.message}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, name, json.dumps(parameters or {}), str(timeout_s)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie awaiting its reaper: it holds nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
