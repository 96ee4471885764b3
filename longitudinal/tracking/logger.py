"""``MlflowLogger``: the MetricLogger of longitudinal.training, backed by one MLflow run.

Training talks to the MetricLogger protocol only; this class is the MLflow side. Calls go through an
``MlflowClient`` with an explicit run id (no fluent global state), so one process can hold several runs and a
resumed training keeps logging into the same run.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.time import get_current_time_millis

# MLflow caps params at 6000 characters and a batch at 100 params / 1000 metrics.
_MAX_PARAM_CHARS = 6000
_PARAM_BATCH = 100
_METRIC_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (JSON-encoded when logged)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def metric_key(*parts: object) -> str:
    """Join parts with '/' and replace characters MLflow rejects (e.g. '>365' -> 'gt365')."""
    text = "/".join(str(p).replace(">", "gt").replace("<", "lt").replace("+", "plus") for p in parts)
    return _BAD_KEY_CHARS.sub("_", text)


def evaluation_metrics(rows: Iterable[Mapping[str, Any]], prefix: str = "test") -> dict[str, float]:
    """Per-horizon evaluation rows -> flat metrics ``<prefix>/<model>/<horizon>/<metric>`` (finite numbers only);
    a row of a treatment stratum other than ``all`` (its ``stratum``: ``treated`` / ``untreated``) goes under
    ``<prefix>/<stratum>/<model>/<horizon>/<metric>``."""
    out: dict[str, float] = {}
    for row in rows:
        model, horizon = row.get("model", "model"), row.get("horizon", "all")
        stratum = row.get("stratum", "all")
        where = prefix if stratum == "all" else f"{prefix}/{stratum}"
        for key, value in row.items():
            if key in ("model", "horizon", "stratum") or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(float(value)):
                out[metric_key(where, model, horizon, key)] = float(value)
    return out


class MlflowLogger:
    """MetricLogger writing to MLflow run ``run_id`` at ``tracking_uri``.

    Also offers ``log_table`` / ``log_json`` / ``log_figure`` for the evaluation report and plots.
    """

    def __init__(self, run_id: str, tracking_uri: str) -> None:
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- MetricLogger protocol -----------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened params; values JSON-encoded when not scalars. Re-logging an equal value is a no-op
        (MLflow refuses to change a param, which a resumed run must not trip over)."""
        existing = self.client.get_run(self.run_id).data.params
        items = []
        for key, value in flatten(params).items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            text = text[:_MAX_PARAM_CHARS]
            key = metric_key(key)
            if key in existing:
                continue
            items.append(Param(key, text))
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = get_current_time_millis()
        items = [
            Metric(metric_key(k), float(v), now, int(step or 0))
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        for i in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _METRIC_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        items = [RunTag(str(k), str(v)) for k, v in tags.items() if v is not None]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    # --- extras ---------------------------------------------------------------------------------------
    def log_json(self, obj: Any, name: str, artifact_path: str | None = None) -> None:
        """Write ``obj`` as JSON file ``name`` and log it."""
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(obj, indent=2, default=str))
            self.log_artifact(p, artifact_path)

    def log_table(self, rows: list[dict[str, Any]], name: str, prefix: str = "test") -> None:
        """Evaluation rows as metrics (``<prefix>/<model>/<horizon>/<metric>``) and as CSV + JSON artifacts."""
        import pandas as pd

        self.log_metrics(evaluation_metrics(rows, prefix))
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / f"{name}.csv"
            pd.DataFrame(rows).to_csv(csv, index=False)
            self.log_artifact(csv, "evaluation")
        self.log_json(rows, f"{name}.json", "evaluation")

    def log_figure(self, fig: Any, name: str, artifact_path: str = "figures") -> None:
        """Save a matplotlib figure as PNG and log it (the figure is closed)."""
        import matplotlib.pyplot as plt

        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            fig.savefig(p, dpi=90, bbox_inches="tight")
            plt.close(fig)
            self.log_artifact(p, artifact_path)
