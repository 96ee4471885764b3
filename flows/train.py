"""Flow ``train-forecaster``: split, train (on the GPU when present), evaluate, log, register, promote.

Thin: one task calls ``longitudinal.tracking.run.run_training``, the same function as the CLI twin
``longitudinal train --track``. Resumable because run_training is: a rerun continues from the run folder's
checkpoint, reuses the MLflow run and never registers a second version for it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run


def _device_tags() -> list[str]:
    import torch

    return ["gpu"] if torch.cuda.is_available() else ["cpu"]


@task(name="train-evaluate-register", tags=_device_tags())
def train_task(store: str | None, train_config: dict[str, Any] | str | None, register_as: str | None,
               flow_run_id: str | None, home: str | None = None) -> dict[str, Any]:
    """Runs on whatever device fit selects (CUDA when present). No retries: a failed fit is not I/O."""
    from longitudinal.settings import get_settings
    from longitudinal.tracking.run import default_train_config, run_training

    settings = get_settings(home=home)
    outcome = run_training(settings, store or settings.store_url,
                           train_config if train_config is not None else default_train_config(),
                           register_as=register_as, flow_run_id=flow_run_id)
    return outcome.summary()


@flow(name="train-forecaster")
def train_forecaster(
    store: str | None = None,
    train_config: dict[str, Any] | str | None = None,
    register_as: str | None = None,
    home: str | None = None,
) -> dict[str, Any]:
    """store: cohort store URL (default Settings().store_url). train_config: TrainConfig fields as a dict, or a
    YAML/JSON path (default: the shipped TrainConfig). register_as: registered model name. home: workspace
    (default LONGITUDINAL_HOME); the MLflow URI follows Settings (MLFLOW_TRACKING_URI, else sqlite there)."""
    summary = train_task(store, train_config, register_as, flow_run.get_id(), home)
    d = summary.get("decision") or {}
    create_markdown_artifact(
        key="train-forecaster-summary",
        markdown=(
            f"## train-forecaster\n\n| field | value |\n|---|---|\n"
            f"| MLflow run | `{summary['run_id']}` |\n| model | `{summary['model_uri']}` |\n"
            f"| registered | `{summary['registered_name']}` v{summary['version']} |\n"
            f"| aliases | {', '.join(summary['aliases']) or '-'} |\n"
            f"| gate | {d.get('gate.decision', 'gated before')}: {d.get('gate.reasons', '')} |\n"
            f"| resumed | {summary['resumed']} |\n"
        ),
        description="Training run, registry version and promotion decision",
    )
    return summary
