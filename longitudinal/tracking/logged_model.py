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


# The crop ``longitudinal forecast --model <kind>`` applies to a closed-form kind (``longitudinal.forecast.api``).
CLOSED_FORM_CROP = (32, 32, 32)


def register_closed_form(settings: Any, kind: str, name: str | None = None, aliases: tuple[str, ...] = ()
                         ) -> tuple[str, str]:
    """Register a kind that needs no training (``lci``, ``linear``, ``fk``) as a new version of ``name`` (default
    ``settings.registered_model_name``), logged like a trained model: the pyfunc of a new run of the tracking
    experiment, version tags ``model_kind`` and ``closed_form``, then ``aliases`` set on it (no gate: nothing
    was trained to compare). The checkpoint is what ``longitudinal forecast --model <kind>`` applies: the
    default config, ``CLOSED_FORM_CROP``, the default data settings, channels ``CHANNELS`` and the store's
    ``target_spacing_mm``, so both give the same forecast. Returns (version, model uri). Raises ValueError for a
    kind that needs weights."""
    from longitudinal.models.base import build_model, closed_form_kinds
    from longitudinal.settings import CHANNELS
    from longitudinal.tracking import uri
    from longitudinal.tracking.registry import register_version

    if kind not in closed_form_kinds():
        raise ValueError(f"model kind {kind!r} needs trained weights; closed-form kinds: {closed_form_kinds()}")
    name = name or settings.registered_model_name
    client = uri.client(settings)
    run_id = client.create_run(uri.ensure_experiment(settings), run_name=f"closed-form-{kind}",
                               tags={"model_kind": kind}).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        Checkpoint.of_model(build_model(kind), CHANNELS, (settings.target_spacing_mm,) * 3, CLOSED_FORM_CROP,
                            provenance={"closed_form": True}).save(path)
        model_uri = log_forecaster(path, run_id, settings.tracking_uri)
    mv, _ = register_version(client, name, model_uri, run_id, model_uri.removeprefix("models:/"),
                             {"model_kind": kind, "closed_form": "true", "intervals": "raw samples"})
    for alias in aliases:
        client.set_registered_model_alias(name, alias, mv.version)
    client.set_terminated(run_id)
    return str(mv.version), model_uri


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
