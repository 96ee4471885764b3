"""Flow ``train-forecaster``: split, train (on the GPU when present), evaluate, log, register, promote.

Thin: one task calls ``longitudinal.tracking.run.run_training``, the same function as the CLI twin
``longitudinal train --track``. Resumable because run_training is: a rerun continues from the run folder's
checkpoint, reuses the MLflow run and never registers a second version for it.

``nproc_per_node`` > 1 (or "auto" on a worker with several GPUs) trains data-parallel: the task launches
``torchrun --nproc_per_node N -m longitudinal train --track`` on its node (``commands.train.train_with_torchrun``);
rank 0 logs, evaluates, registers and gates exactly as the in-process call does.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run


def _device_tags() -> list[str]:
    import torch

    return ["gpu"] if torch.cuda.is_available() else ["cpu"]


def processes_per_node(nproc_per_node: int | str) -> int:
    """Training processes for ``nproc_per_node``: a number as given, "auto" one per visible GPU (1 without)."""
    if str(nproc_per_node).strip().lower() == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    n = int(nproc_per_node)
    if n < 1:
        raise ValueError(f"nproc_per_node must be >= 1 or 'auto', got {nproc_per_node!r}")
    return n


@task(name="train-evaluate-register", tags=_device_tags())
def train_task(store: str | None, train_config: dict[str, Any] | str | None, register_as: str | None,
               flow_run_id: str | None, home: str | None = None, nproc_per_node: int | str = 1
               ) -> dict[str, Any]:
    """Runs on whatever device fit selects (CUDA when present), in this process or as ``nproc_per_node``
    torchrun processes. No retries: a failed fit is not I/O."""
    from longitudinal.settings import get_settings
    from longitudinal.tracking.run import default_train_config, run_training

    settings = get_settings(home=home)
    store_url = store or settings.store_url
    config = train_config if train_config is not None else default_train_config()
    n = processes_per_node(nproc_per_node)
    if n > 1:
        from longitudinal.commands.train import train_with_torchrun

        return train_with_torchrun(settings, store_url, config, n, register_as=register_as,
                                   flow_run_id=flow_run_id)
    outcome = run_training(settings, store_url, config, register_as=register_as, flow_run_id=flow_run_id)
    if outcome is None:  # this worker itself runs as a non-zero torchrun rank: nothing to report
        raise RuntimeError("train-forecaster ran on a non-zero torchrun rank; start the worker without torchrun")
    return outcome.summary()


@flow(name="train-forecaster")
def train_forecaster(
    store: str | None = None,
    train_config: dict[str, Any] | str | None = None,
    register_as: str | None = None,
    home: str | None = None,
    nproc_per_node: int | str = 1,
) -> dict[str, Any]:
    """store: cohort store URL (default Settings().store_url). train_config: TrainConfig fields as a dict, or a
    YAML/JSON path (default: the shipped TrainConfig). register_as: registered model name. home: workspace
    (default LONGITUDINAL_HOME); the MLflow URI follows Settings (MLFLOW_TRACKING_URI, else sqlite there).
    nproc_per_node: data-parallel training processes on the worker's node (torchrun; NCCL, one GPU each, or
    gloo on CPUs); "auto" = one per visible GPU; 1 = in the task's process."""
    summary = train_task(store, train_config, register_as, flow_run.get_id(), home, nproc_per_node)
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
