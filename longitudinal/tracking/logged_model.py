"""Log a trained checkpoint as the pyfunc model (models-from-code) of a run, once."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from longitudinal.tracking.inference import QUANTILES, VOLUME_KINDS
from longitudinal.tracking.registry import CONFIG_FILE, WEIGHTS_FILE

MODEL_NAME = "forecaster"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
# Fields of a checkpoint the pyfunc needs; optimizer/EMA/RNG state of a training checkpoint stays behind.
MODEL_FIELDS = ("kind", "config", "state_dict", "channels", "spacing_mm", "crop_size", "meta")


def signature(channels: tuple[str, ...] | list[str]) -> ModelSignature:
    """Input one row per prior scan; output one row per (patient, query day); params query_days/n_samples/out_dir."""
    inputs = Schema(
        [ColSpec("string", "patient_id"), ColSpec("double", "days")]
        + [ColSpec("string", c) for c in channels]
        + [ColSpec("string", "label", required=False)]
    )
    outputs = Schema(
        [ColSpec("string", "patient_id"), ColSpec("double", "query_day"), ColSpec("long", "n_context"),
         ColSpec("long", "n_samples")]
        + [ColSpec("double", f"volume_{k}_ml_{q}") for k in VOLUME_KINDS for q in QUANTILES]
        + [ColSpec("string", "forecast_path", required=False), ColSpec("string", "tumour_prob_path", required=False)]
    )
    params = ParamSchema(
        [
            ParamSpec("query_days", "double", [90.0], (-1,)),
            ParamSpec("n_samples", "long", 8),
            ParamSpec("out_dir", "string", ""),
            ParamSpec("seed", "long", 0),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def slim_checkpoint(checkpoint: Path | str, dest: Path, use_ema: bool = True) -> dict[str, Any]:
    """Write the model-only checkpoint (EMA weights when the training checkpoint has them) to ``dest``;
    returns the config dict written beside it."""
    ckpt = torch.load(Path(checkpoint), map_location="cpu", weights_only=True)
    slim = {k: ckpt[k] for k in MODEL_FIELDS if k in ckpt}
    if use_ema and isinstance(ckpt.get("ema_state_dict"), dict):
        slim["state_dict"] = ckpt["ema_state_dict"]
    missing = [k for k in ("kind", "config", "state_dict") if k not in slim]
    if missing:
        raise ValueError(f"{checkpoint} is not a forecaster checkpoint: missing {missing}")
    torch.save(slim, dest)
    return {k: v for k, v in slim.items() if k != "state_dict"}


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
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(PYFUNC_FILE),
                artifacts={"weights": str(weights), "config": str(cfg_path)},
                signature=signature(tuple(cfg.get("channels") or ("T1c", "FLAIR"))),
                pip_requirements=_requirements(),
                tags={"model_kind": str(cfg["kind"])},
            )
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
