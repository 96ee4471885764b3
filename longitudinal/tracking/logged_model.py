"""Log a trained checkpoint as the pyfunc model (models-from-code) of a run, once."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from longitudinal.models.checkpoint import Checkpoint
from longitudinal.tracking.registry import CONFIG_FILE, WEIGHTS_FILE
from longitudinal.tracking.served import OUTPUT_COLUMNS

MODEL_NAME = "forecaster"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# UserWarnings MLflow prints when logging a pyfunc whose signature is explicit (matched as substrings: the
# messages start with colour codes).
_HARMLESS_WARNINGS = ("Add type hints to the `predict` method", "An input example was not provided")


def signature(channels: tuple[str, ...] | list[str]) -> ModelSignature:
    """Input one row per prior scan; output one row per (patient, query); params as ``tracking.served``."""
    inputs = Schema(
        [ColSpec("string", "patient_id"), ColSpec("string", "date", required=False),
         ColSpec("double", "days", required=False)]
        + [ColSpec("string", c) for c in channels]
        + [ColSpec("string", "label", required=False)]
    )
    types = {"patient_id": "string", "pseudonym": "string", "date": "string", "summary_path": "string",
             "warning": "string", "n_context": "long", "n_samples": "long"}
    outputs = Schema([ColSpec(types.get(c, "double"), c, required=c not in ("date", "summary_path", "warning"))
                      for c in OUTPUT_COLUMNS])
    params = ParamSchema(
        [
            ParamSpec("in_days", "double", [], (-1,)),
            ParamSpec("at", "string", [], (-1,)),
            ParamSpec("plan", "string", [], (-1,)),
            ParamSpec("days_since_baseline", "double", [], (-1,)),
            ParamSpec("n_samples", "long", 8),
            ParamSpec("out_dir", "string", ""),
            ParamSpec("seed", "long", 0),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def slim_checkpoint(checkpoint: Path | str, dest: Path) -> dict[str, Any]:
    """Write the model checkpoint the pyfunc serves to ``dest``; returns its description (everything but the
    weights), written beside it as the config artifact."""
    ckpt = Checkpoint.load(Path(checkpoint))
    ckpt.save(dest)
    return ckpt.describe()


def find_logged_model(client: MlflowClient, run_id: str, name: str = MODEL_NAME) -> str | None:
    """Model id of the model ``name`` already logged by ``run_id`` (what makes a resumed run log it once)."""
    run = client.get_run(run_id)
    found = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"
    )
    ready = [m for m in found if str(m.status).upper().endswith("READY")]
    return (ready or found)[0].model_id if (ready or found) else None


def log_forecaster(checkpoint: Path | str, run_id: str, tracking_uri: str, name: str = MODEL_NAME) -> str:
    """Log ``checkpoint`` as the pyfunc model of ``run_id`` unless already logged; returns ``models:/m-...``."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    existing = find_logged_model(client, run_id, name)
    if existing:
        return f"models:/{existing}"
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        cfg = slim_checkpoint(checkpoint, weights)
        cfg_path = Path(tmp) / CONFIG_FILE
        cfg_path.write_text(json.dumps(cfg, indent=2, default=str))
        active = mlflow.active_run()
        if active is not None and active.info.run_id != run_id:
            raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active; cannot log into {run_id}")
        started = active is None
        if started:
            mlflow.start_run(run_id=run_id)
        try:
            # The signature is given explicitly, and an input example would have to be real scan files:
            # MLflow's advice to add type hints or an input example does not apply to this model. MLflow adds
            # its own warning filters while logging, so the warnings are recorded and the others passed on.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                info = mlflow.pyfunc.log_model(
                    name=name,
                    python_model=str(PYFUNC_FILE),
                    artifacts={"weights": str(weights), "config": str(cfg_path)},
                    signature=signature(tuple(cfg.get("channels") or ("T1c", "FLAIR"))),
                    pip_requirements=_requirements(),
                    tags={"model_kind": str(cfg["kind"])},
                )
            for w in caught:
                if not any(p in str(w.message) for p in _HARMLESS_WARNINGS):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        finally:
            if started:
                mlflow.end_run()
    return info.model_uri


def _requirements() -> list[str]:
    """Pinned runtime requirements (explicit, so MLflow does not import the model to infer them)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("torch", "mlflow", "longitudinal", "SimpleITK", "nibabel", "pandas", "numpy"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs
