"""configure() must not leak one workspace's tracking URI into later Settings of another workspace."""

from __future__ import annotations

import os
from pathlib import Path

from longitudinal.settings import Settings
from longitudinal.tracking import uri as uri_mod


def test_configure_does_not_change_later_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = Settings(home=tmp_path / "a")
    assert uri_mod.configure(first) == f"sqlite:///{(tmp_path / 'a').resolve() / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    second = Settings(home=tmp_path / "b")
    assert second.tracking_uri == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"


def test_configure_keeps_an_explicit_environment_uri(tmp_path: Path, monkeypatch) -> None:
    explicit = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", explicit)
    assert uri_mod.configure(Settings(home=tmp_path / "a")) == explicit
    assert os.environ["MLFLOW_TRACKING_URI"] == explicit
    assert Settings(home=tmp_path / "b").tracking_uri == explicit
