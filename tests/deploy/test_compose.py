"""deploy/compose.yaml cannot be run here (no docker): check it parses, hangs together and names real files."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def test_topology_has_every_role() -> None:
    assert set(SERVICES) == {
        "postgres", "minio", "buckets", "prefect-server", "mlflow", "dask-scheduler", "dask-worker",
        "worker-cpu", "worker-gpu", "deployer",
    }  # fmt: skip
    assert "--pool" in SERVICES["worker-cpu"]["command"] and "cpu" in SERVICES["worker-cpu"]["command"]
    assert SERVICES["worker-gpu"]["command"][SERVICES["worker-gpu"]["command"].index("--pool") + 1] == "gpu"
    gpu = SERVICES["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_dependencies_and_volumes_are_declared() -> None:
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
        for vol in svc.get("volumes") or []:
            source = re.match(r"(\$\{[^}]*\}|[^:]+)", vol).group(1)
            if source.startswith("${"):
                assert ":?" in source, f"{name}: {source} needs a required variable, not a silent default"
            elif source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in COMPOSE["volumes"], f"{name} uses undeclared volume {source}"


def test_builds_reference_existing_files() -> None:
    for name, svc in SERVICES.items():
        build = svc.get("build")
        if not build:
            continue
        context = (DEPLOY / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{name}: {dockerfile}"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (context / src).exists(), f"Dockerfile COPY source {src} missing"
    assert (DEPLOY / "prefect.yaml").is_file()  # the deployer's --prefect-file


def test_urls_point_at_the_services_that_serve_them() -> None:
    env = SERVICES["worker-cpu"]["environment"]
    prefect = urlparse(env["PREFECT_API_URL"])
    server = SERVICES["prefect-server"]["command"]
    assert prefect.hostname == "prefect-server" and str(prefect.port) == server[server.index("--port") + 1]
    mlflow = urlparse(env["MLFLOW_TRACKING_URI"])
    cmd = SERVICES["mlflow"]["command"]
    assert mlflow.hostname == "mlflow" and str(mlflow.port) == cmd[cmd.index("--port") + 1]
    assert urlparse(env["LONGITUDINAL_DASK_ADDRESS"]).hostname == "dask-scheduler"
    assert env["LONGITUDINAL_STORE"].startswith("s3://")
    # Both servers keep their state in PostgreSQL databases created by postgres-init.sql.
    init = (DEPLOY / "postgres-init.sql").read_text()
    prefect_db = SERVICES["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    mlflow_db = cmd[cmd.index("--backend-store-uri") + 1]
    for url in (prefect_db, mlflow_db):
        parsed = urlparse(url)
        assert parsed.scheme.startswith("postgresql+") and parsed.hostname == "postgres"
        assert re.search(rf"CREATE DATABASE {parsed.path.lstrip('/')} OWNER {parsed.username};", init)
    assert cmd[cmd.index("--artifacts-destination") + 1].startswith("s3://")


def test_published_ports_are_loopback_only() -> None:
    for name, svc in SERVICES.items():
        for port in svc.get("ports") or []:
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
