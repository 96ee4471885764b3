"""Where training sends params, metrics, tags and artifacts. Training never imports mlflow: it talks to this
interface; longitudinal.tracking provides the MLflow implementation."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class MetricLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...


class JsonlLogger:
    """Appends one JSON object per call to ``<run_dir>/metrics.jsonl``; artifacts are copied to run_dir."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"

    def _write(self, kind: str, payload: dict[str, Any], step: int | None = None) -> None:
        rec = {"kind": kind, "time": time.time(), "step": step, **payload}
        with self.path.open("a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")

    def log_params(self, params: dict[str, Any]) -> None:
        self._write("params", {"params": params})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._write("metrics", {"metrics": {k: float(v) for k, v in metrics.items()}}, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write("tags", {"tags": tags})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        dest = self.run_dir / (artifact_path or "")
        dest.mkdir(parents=True, exist_ok=True)
        if Path(path).resolve().parent != dest.resolve():
            shutil.copy2(path, dest / Path(path).name)


class NullLogger:
    """Discards everything (benchmarks measuring tracking overhead use it as the 'without' case)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass
