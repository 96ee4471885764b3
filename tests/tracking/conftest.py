"""Fixtures of the tracking tests: an isolated working directory and both MLflow backends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from trackinghelpers import ENV_QUIET, MlflowServer

from longitudinal.settings import Settings


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV_QUIET.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty current directory; tests assert it stays empty (nothing like ./mlflow.db or ./mlruns)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifact root), started and stopped here."""
    old = {k: os.environ.get(k) for k in ENV_QUIET}
    os.environ.update(ENV_QUIET)
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.wait()
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["sqlite", "server"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings for the sqlite default under the workspace, or for the loopback server."""
    home = tmp_path / "home"
    if request.param == "sqlite":
        return Settings(home=home)
    server = request.getfixturevalue("mlflow_server")
    return Settings(home=home, mlflow_tracking_uri=server.uri)
