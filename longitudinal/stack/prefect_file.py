"""deploy/prefect.yaml as data: read, check, fill ``{{ $VAR }}`` placeholders, and run ``prefect deploy``.

``flows/serve.py`` builds its served deployments from the same file, so the cron schedules and parameters
live in one place whether a site runs workers (``prefect deploy``) or a single ``serve`` process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from longitudinal.settings import Settings
from longitudinal.stack.config import WORK_POOLS, project_root
from longitudinal.stack.process import StackError

DEFAULT_PREFECT_FILE = Path("deploy") / "prefect.yaml"
_PLACEHOLDER = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_SCHEDULE_KINDS = ("cron", "interval", "rrule")


@dataclass(frozen=True)
class DeploymentSpec:
    """One ``deployments:`` entry. ``schedules`` are prefect.yaml dicts (cron|interval|rrule [+ timezone])."""

    name: str
    entrypoint: str
    work_pool: str
    flow_name: str | None = None
    description: str | None = None
    tags: tuple[str, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[dict[str, Any], ...] = ()

    @property
    def entrypoint_path(self) -> str:
        return self.entrypoint.rsplit(":", 1)[0]

    @property
    def function_name(self) -> str:
        return self.entrypoint.rsplit(":", 1)[1]


def load_prefect_file(path: Path) -> list[DeploymentSpec]:
    """Parse a prefect.yaml into specs; raise StackError listing every malformed entry."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StackError(f"cannot read {path}: {exc}") from exc
    entries = raw.get("deployments") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise StackError(f"{path}: no `deployments:` list")
    problems: list[str] = []
    specs: list[DeploymentSpec] = []
    for i, entry in enumerate(entries):
        where = f"{path}: deployments[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} is not a mapping")
            continue
        name, entrypoint = entry.get("name"), entry.get("entrypoint")
        pool = (entry.get("work_pool") or {}).get("name")
        if not name:
            problems.append(f"{where} has no name")
        if not entrypoint or ":" not in str(entrypoint):
            problems.append(f"{where} ({name}) entrypoint {entrypoint!r} is not 'path/to/file.py:function'")
        if not pool:
            problems.append(f"{where} ({name}) has no work_pool.name")
        schedules = entry.get("schedules") or []
        for j, sched in enumerate(schedules):
            kinds = [k for k in _SCHEDULE_KINDS if isinstance(sched, dict) and sched.get(k)]
            if len(kinds) != 1:
                problems.append(
                    f"{where} ({name}) schedules[{j}] needs exactly one of {list(_SCHEDULE_KINDS)}"
                )
            elif kinds == ["cron"] and len(str(sched["cron"]).split()) != 5:
                problems.append(
                    f"{where} ({name}) schedules[{j}] cron {sched['cron']!r} does not have 5 fields"
                )
        if name and entrypoint and ":" in str(entrypoint) and pool:
            specs.append(
                DeploymentSpec(
                    name=str(name),
                    entrypoint=str(entrypoint),
                    work_pool=str(pool),
                    flow_name=entry.get("flow_name"),
                    description=entry.get("description"),
                    tags=tuple(entry.get("tags") or ()),
                    parameters=dict(entry.get("parameters") or {}),
                    schedules=tuple(schedules),
                )
            )
    names = [s.name for s in specs]
    problems += [
        f"{path}: deployment name {n!r} appears twice"
        for n in sorted({n for n in names if names.count(n) > 1})
    ]
    if problems:
        raise StackError("invalid prefect file:\n- " + "\n- ".join(problems))
    return specs


def check_entrypoints(
    specs: Sequence[DeploymentSpec], code_dir: Path, pools: Sequence[str] = WORK_POOLS
) -> list[str]:
    """Every spec whose file or flow function is missing under ``code_dir``, or whose pool is unknown."""
    problems: list[str] = []
    for spec in specs:
        file = code_dir / spec.entrypoint_path
        if not file.is_file():
            problems.append(f"{spec.name}: {spec.entrypoint_path} does not exist under {code_dir}")
        elif not re.search(
            rf"^(async\s+)?def\s+{re.escape(spec.function_name)}\s*\(", file.read_text(), re.M
        ):
            problems.append(f"{spec.name}: {spec.entrypoint_path} defines no function {spec.function_name}")
        if spec.work_pool not in pools:
            problems.append(f"{spec.name}: work pool {spec.work_pool!r} is not one of {list(pools)}")
    return problems


def fill_placeholders(value: Any, environ: Mapping[str, str], missing: set[str] | None = None) -> Any:
    """``value`` with every ``{{ $VAR }}`` replaced from ``environ`` (recursively); unset names go to ``missing``."""
    if isinstance(value, dict):
        return {k: fill_placeholders(v, environ, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [fill_placeholders(v, environ, missing) for v in value]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in environ and missing is not None:
                missing.add(m.group(1))
            return environ.get(m.group(1), m.group(0))

        return _PLACEHOLDER.sub(sub, value)
    return value


def placeholder_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for deploying/serving: ``environ`` plus defaults for the placeholders prefect.yaml uses.

    ``LONGITUDINAL_STORE`` defaults to the settings' store URL, ``LONGITUDINAL_INGEST_SOURCE`` to the
    synthetic data folder, ``LONGITUDINAL_INGEST_TREATMENTS`` (a treatments CSV) to "" (none),
    ``LONGITUDINAL_CODE_DIR`` to this checkout; values already set win.
    """
    env = dict(os.environ if environ is None else environ)
    env.setdefault("LONGITUDINAL_STORE", settings.store_url)
    env.setdefault("LONGITUDINAL_INGEST_SOURCE", str(settings.data_path))
    env.setdefault("LONGITUDINAL_INGEST_TREATMENTS", "")
    env.setdefault("LONGITUDINAL_CODE_DIR", str(project_root()))
    return env


@dataclass(frozen=True)
class DeployResult:
    """What ``prefect deploy`` registered: ``flow-name/deployment`` names and its output."""

    deployments: list[str]
    output: str


def deploy_all(
    settings: Settings,
    *,
    prefect_file: Path | None = None,
    api_url: str | None = None,
    code_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    names: Sequence[str] = (),
    timeout_s: float = 600.0,
) -> DeployResult:
    """Run ``prefect deploy --all --prefect-file <file>`` (or ``--name`` each of ``names``) from ``code_dir``.

    Checks first (collecting every problem): the file parses, the named deployments exist, their
    entrypoints exist, an API URL is known and every ``{{ $VAR }}`` in their parameters has a value.
    """
    code_dir = (code_dir or project_root()).resolve()
    prefect_file = (prefect_file or code_dir / DEFAULT_PREFECT_FILE).resolve()
    env = placeholder_env(settings, environ)
    api_url = api_url or settings.prefect_url or env.get("PREFECT_API_URL")
    specs = load_prefect_file(prefect_file)
    problems = [f"no deployment {n!r} in {prefect_file}" for n in names if n not in {s.name for s in specs}]
    if names:
        specs = [s for s in specs if s.name in names]
    problems += check_entrypoints(specs, code_dir)
    missing: set[str] = set()
    for spec in specs:
        fill_placeholders(spec.parameters, env, missing)
    problems += [f"environment variable {m} is unset (used in parameters)" for m in sorted(missing)]
    if not api_url:
        problems.append(
            "no Prefect API URL: start the stack or set PREFECT_API_URL / LONGITUDINAL_PREFECT_API_URL"
        )
    if problems:
        raise StackError(f"cannot deploy {prefect_file}:\n- " + "\n- ".join(problems))
    env.update(PREFECT_API_URL=str(api_url), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    env.setdefault("PREFECT_HOME", str(settings.home_dir / "stack" / "prefect"))
    which = [a for n in names for a in ("--name", n)] or ["--all"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect",
            "--no-prompt",
            "deploy",
            *which,
            "--prefect-file",
            str(prefect_file),
        ],
        cwd=code_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise StackError(f"prefect deploy failed (exit {proc.returncode}):\n{output[-4000:]}")
    deployed = [f"{s.flow_name}/{s.name}" if s.flow_name else s.name for s in specs]
    return DeployResult(deployments=deployed, output=output)
