"""What a finished training run left in MLflow, read back for a summary: the gate's decision of its registered
version and its evaluation tables (used by the demo's verdict, also after a rerun that found the run finished)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from longitudinal.settings import Settings
from longitudinal.tracking import uri as uri_mod
from longitudinal.tracking.registry import CHAMPION, alias_version


def version_tags(settings: Settings, name: str, version: str) -> dict[str, str]:
    """The tags of a registered version (``gate.*`` hold the promotion decision and its figures)."""
    return dict(uri_mod.client(settings).get_model_version(name, str(version)).tags or {})


def champion_version(settings: Settings, name: str) -> str | None:
    """The version holding the ``champion`` alias, or None."""
    mv = alias_version(uri_mod.client(settings), name, CHAMPION)
    return None if mv is None else str(mv.version)


def evaluation_rows(settings: Settings, run_id: str, table: str = "test") -> list[dict[str, Any]]:
    """The rows ``run_training`` logged as ``evaluation/<table>.json`` (``validation`` or ``test``); empty when
    the run has none."""
    client = uri_mod.client(settings)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"evaluation/{table}.json", tmp)
        except (MlflowException, OSError):
            return []
        return list(json.loads(Path(path).read_text()))
