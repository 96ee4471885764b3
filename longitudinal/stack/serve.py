"""The command line of the single-process ``serve`` alternative (the CLI execs it; prefect stays in flows/)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from longitudinal.settings import Settings
from longitudinal.stack.prefect_file import placeholder_env


def serve_command(
    settings: Settings,
    *,
    prefect_file: Path | None = None,
    deployments: Sequence[str] = (),
    limit: int | None = None,
    api_url: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """argv and environment of ``python -m flows.serve``.

    The Prefect API is, in order: the settings (LONGITUDINAL_PREFECT_API_URL / PREFECT_API_URL), then
    ``api_url`` (the recorded stack's). Raises ValueError when there is none: without a server, schedules
    would never fire.
    """
    url = settings.prefect_url or api_url
    if not url:
        raise ValueError(
            "serve needs a Prefect server: set PREFECT_API_URL or start one with `longitudinal stack up`"
        )
    env = placeholder_env(settings)
    env.update(
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        LONGITUDINAL_HOME=str(settings.home_dir),
    )
    env.setdefault("PREFECT_HOME", str(settings.home_dir / "stack" / "prefect"))
    env.setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    argv = [sys.executable, "-m", "flows.serve"]
    if prefect_file is not None:
        argv += ["--prefect-file", str(Path(prefect_file).resolve())]
    for name in deployments:
        argv += ["--deployment", name]
    if limit is not None:
        argv += ["--limit", str(limit)]
    # The child resolves flows/ from the checkout, wherever the CLI was started.
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (env.get("LONGITUDINAL_CODE_DIR"), env.get("PYTHONPATH")) if p
    )
    return argv, env
