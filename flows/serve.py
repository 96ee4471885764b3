"""Single-process alternative to workers: serve the deployments of deploy/prefect.yaml with their schedules.

    python -m flows.serve [--prefect-file deploy/prefect.yaml] [--deployment nightly-ingest ...]

Needs a Prefect server (PREFECT_API_URL) for schedules to fire; no work pool or worker is involved: this
process polls for its own scheduled and triggered runs and executes them in subprocesses. Schedules,
parameters and entrypoints come from the same prefect.yaml as ``prefect deploy``, so both paths agree.
``longitudinal serve`` execs this module (the CLI never imports prefect).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import serve
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron, Interval, RRule, Schedule

from longitudinal.settings import get_settings
from longitudinal.stack.config import project_root
from longitudinal.stack.prefect_file import (
    DEFAULT_PREFECT_FILE,
    DeploymentSpec,
    fill_placeholders,
    load_prefect_file,
    placeholder_env,
)


def to_schedule(config: dict[str, Any]) -> Schedule:
    """A prefect.yaml schedule dict (cron | interval seconds | rrule, optional timezone) -> Schedule."""
    tz = config.get("timezone")
    active = bool(config.get("active", True))
    if config.get("cron"):
        return Cron(str(config["cron"]), timezone=tz, active=active)
    if config.get("interval"):
        return Interval(datetime.timedelta(seconds=float(config["interval"])), timezone=tz, active=active)
    return RRule(str(config["rrule"]), timezone=tz, active=active)


def build_deployments(specs: Sequence[DeploymentSpec], environ: dict[str, str]) -> list[Any]:
    """RunnerDeployments for ``specs``; raise ValueError listing every unset placeholder."""
    missing: set[str] = set()
    filled = [(spec, fill_placeholders(spec.parameters, environ, missing)) for spec in specs]
    if missing:
        raise ValueError(f"environment variables unset (used in parameters): {sorted(missing)}")
    deployments = []
    for spec, parameters in filled:
        flow = load_flow_from_entrypoint(spec.entrypoint, use_placeholder_flow=False)
        deployments.append(
            flow.to_deployment(
                name=spec.name,
                description=spec.description,
                tags=list(spec.tags),
                parameters=parameters,
                schedules=[to_schedule(s) for s in spec.schedules],
            )
        )
    return deployments


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prefect-file", type=Path, default=None, help="default: <checkout>/deploy/prefect.yaml"
    )
    parser.add_argument(
        "--deployment", action="append", default=[], help="serve only these deployment names (repeatable)"
    )
    parser.add_argument("--limit", type=int, default=None, help="most runs executed at once")
    args = parser.parse_args(argv)

    code_dir = Path(os.environ.get("LONGITUDINAL_CODE_DIR") or project_root())
    prefect_file = args.prefect_file or code_dir / DEFAULT_PREFECT_FILE
    specs = load_prefect_file(prefect_file)
    if args.deployment:
        unknown = sorted(set(args.deployment) - {s.name for s in specs})
        if unknown:
            sys.exit(f"unknown deployments {unknown}; {prefect_file} has {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in args.deployment]
    # Entrypoints are relative to the checkout, as for a worker's pull step.
    os.chdir(code_dir)
    sys.path.insert(0, str(code_dir))
    deployments = build_deployments(specs, placeholder_env(get_settings()))
    serve(*deployments, limit=args.limit)


if __name__ == "__main__":
    main()
