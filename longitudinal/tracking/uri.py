"""Tracking URI and experiments, always explicit.

MLflow 3 writes ``./mlflow.db`` and ``./mlruns`` in the current directory when nothing is configured; every
entry point here calls ``configure`` first, and experiments on a local backend get an artifact root under the
workspace (``Settings.mlflow_artifacts_path``) so nothing lands wherever a command happened to run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient

from longitudinal.settings import Settings

EXPERIMENT_NAME = "tumor-growth-forecasting"
# MLflow announces at INFO level that it creates or upgrades its database tables and starts or stops sampling
# system metrics (and that it skips GPU metrics on a machine without one): nothing for a user to act on.
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.system_metrics")
_REMOTE_SCHEMES = ("http", "https", "databricks")


def configure(settings: Settings) -> str:
    """Set the tracking and registry URI from settings (creating a sqlite file's folder); return the URI."""
    uri = settings.tracking_uri
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which Settings reads: restore the caller's
    # environment so one configured workspace does not silently become every later Settings' default.
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    return uri


def is_remote(uri: str) -> bool:
    """True for a tracking server (which owns the artifact store); False for a database or file backend."""
    return urlparse(uri).scheme in _REMOTE_SCHEMES


def client(settings: Settings) -> MlflowClient:
    """A client bound to the configured URI (configures the process too)."""
    uri = configure(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(settings: Settings, name: str = EXPERIMENT_NAME) -> str:
    """Id of experiment ``name``, created on first use.

    On a local backend the artifact root is ``<home>/mlartifacts/<name>`` (a file URI); a server decides its
    own (``--artifacts-destination``).
    """
    c = client(settings)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not is_remote(settings.tracking_uri):
        root = settings.mlflow_artifacts_path / name
        root.mkdir(parents=True, exist_ok=True)
        location = root.resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)
