"""Test-only flows deployed through the real stack (stand-ins until the pipeline's flows are deployed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run


@flow(name="toy-sum")
def toy_sum(values: list[float], out_dir: str) -> float:
    """Write {run id, sum, worker cwd, tracking URI} to ``out_dir/<run id>.json``; return the sum."""
    total = float(sum(values))
    record = {
        "flow_run_id": str(flow_run.id),
        "total": total,
        "cwd": os.getcwd(),
        "mlflow": os.environ.get("MLFLOW_TRACKING_URI"),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"{flow_run.id}.json").write_text(json.dumps(record))
    return total
