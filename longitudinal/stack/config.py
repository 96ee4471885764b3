"""Typed configuration of the local stack: where each server listens and what it stores where.

Values come from ``StackSettings`` (env prefix ``LONGITUDINAL_``, like ``longitudinal.settings``) with CLI
overrides on top. Every default location lives under ``<home>/stack`` (Prefect) or beside the library's own
defaults (``<home>/mlflow.db``, ``<home>/mlartifacts``), so a file-backed run and the MLflow server share one
registry.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from longitudinal.settings import Settings

LOOPBACK = "127.0.0.1"
# The pools deploy/prefect.yaml names; a worker serves one pool.
WORK_POOLS: tuple[str, ...] = ("cpu", "gpu")


class StackSettings(BaseSettings):
    """Stack knobs from the environment (``LONGITUDINAL_PREFECT_DATABASE_URL`` etc.); 0 means a free port."""

    model_config = SettingsConfigDict(env_prefix="LONGITUDINAL_", extra="ignore")

    stack_host: str = Field(default=LOOPBACK, description="Interface every server binds to.")
    prefect_port: int = Field(default=4200, ge=0, le=65535)
    mlflow_port: int = Field(default=5000, ge=0, le=65535)
    worker_health_port: int = Field(default=8765, ge=0, le=65535)
    prefect_database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of Prefect's database (postgresql+asyncpg://...); sqlite under home if unset.",
    )
    mlflow_backend_uri: str | None = Field(
        default=None, description="MLflow backend store (postgresql://...); sqlite under home if unset."
    )
    mlflow_artifacts_destination: str | None = Field(
        default=None, description="Where the MLflow server puts artifacts (path or s3://...); home if unset."
    )
    code_dir: Path | None = Field(
        default=None,
        description="Checkout the worker runs flows from (pull step); the project root if unset.",
    )


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for printing database URLs)."""
    return re.sub(r"(://[^:/@]+:)[^/]*@", r"\1***@", url)


def project_root() -> Path:
    """The checkout this package runs from (the directory holding ``flows/`` and ``deploy/``)."""
    return Path(__file__).resolve().parents[2]


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class StackConfig:
    """Resolved stack: concrete ports (never 0), URLs and locations.

    ``stack_dir`` holds ``state.json``, one log per process and Prefect's home (``prefect/``).
    """

    home: Path
    code_dir: Path
    host: str
    prefect_port: int
    mlflow_port: int
    worker_health_ports: dict[str, int]
    prefect_database_url: str
    mlflow_backend_uri: str
    mlflow_artifacts_destination: str
    pools: tuple[str, ...] = WORK_POOLS
    prefect_ui: bool = True
    # Generous: on a loaded 2-core machine the Prefect server takes over a minute to migrate and start.
    startup_timeout_s: float = 300.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def stack_dir(self) -> Path:
        return self.home / "stack"

    @property
    def prefect_home(self) -> Path:
        return self.stack_dir / "prefect"

    @property
    def state_file(self) -> Path:
        return self.stack_dir / "state.json"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def worker_pools(self) -> tuple[str, ...]:
        """Pools that get a worker here, in start order."""
        return tuple(self.worker_health_ports)

    def worker_health_url(self, pool: str) -> str:
        return f"http://{self.host}:{self.worker_health_ports[pool]}/health"

    def validate(self) -> list[str]:
        """Every problem with this config (empty when it can start)."""
        problems: list[str] = []
        ports = {
            "prefect": self.prefect_port,
            "mlflow": self.mlflow_port,
            **{f"worker {pool} health": p for pool, p in self.worker_health_ports.items()},
        }
        for name, port in ports.items():
            if not 0 < port < 65536:
                problems.append(f"{name} port {port} is not in 1..65535")
            elif port_open(self.host, port):
                problems.append(f"{name} port {self.host}:{port} is already in use")
        if len(set(ports.values())) != len(ports):
            problems.append(f"ports must differ, got {ports}")
        for pool in self.worker_pools:
            if pool not in self.pools:
                problems.append(f"worker pool {pool!r} is not one of {list(self.pools)}")
        if not (self.code_dir / "flows").is_dir():
            problems.append(f"code dir {self.code_dir} has no flows/ package")
        for name, url in (
            ("prefect database", self.prefect_database_url),
            ("mlflow backend", self.mlflow_backend_uri),
        ):
            if "://" not in url:
                problems.append(f"{name} URL {url!r} is not a URL (sqlite:///... or postgresql://...)")
        if self.prefect_database_url.startswith("postgresql") and "+asyncpg" not in self.prefect_database_url:
            problems.append("Prefect needs the asyncpg driver: postgresql+asyncpg://user:pass@host/db")
        return problems


def resolve_config(
    settings: Settings,
    *,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    worker_health_port: int | None = None,
    prefect_database_url: str | None = None,
    mlflow_backend_uri: str | None = None,
    worker_pools: tuple[str, ...] = ("cpu",),
    prefect_ui: bool = True,
    env: StackSettings | None = None,
) -> StackConfig:
    """Settings + environment + explicit overrides -> a StackConfig with concrete ports (0 -> a free port).

    The worker of the i-th pool in ``worker_pools`` answers health checks on ``worker_health_port + i``.
    """
    env = env or StackSettings()
    home = settings.home_dir
    host = env.stack_host

    def port(value: int | None, default: int) -> int:
        chosen = default if value is None else value
        return free_port(host) if chosen == 0 else chosen

    base = env.worker_health_port if worker_health_port is None else worker_health_port
    prefect_db = (
        prefect_database_url
        or env.prefect_database_url
        or f"sqlite+aiosqlite:///{home / 'stack' / 'prefect' / 'prefect.db'}"
    )
    mlflow_db = mlflow_backend_uri or env.mlflow_backend_uri or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = env.mlflow_artifacts_destination or str(settings.mlflow_artifacts_path)
    return StackConfig(
        home=home,
        code_dir=(env.code_dir or project_root()).resolve(),
        host=host,
        prefect_port=port(prefect_port, env.prefect_port),
        mlflow_port=port(mlflow_port, env.mlflow_port),
        worker_health_ports={
            pool: free_port(host) if base == 0 else base + i for i, pool in enumerate(worker_pools)
        },
        prefect_database_url=prefect_db,
        mlflow_backend_uri=mlflow_db,
        mlflow_artifacts_destination=artifacts,
        prefect_ui=prefect_ui,
    )
