"""deploy/prefect.yaml: the three deployments, their schedules, pools and parameters; the checks around it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longitudinal.settings import Settings
from longitudinal.stack.prefect_file import (
    check_entrypoints,
    deploy_all,
    fill_placeholders,
    load_prefect_file,
    placeholder_env,
)
from longitudinal.stack.process import StackError

REPO = Path(__file__).resolve().parents[2]
PREFECT_FILE = REPO / "deploy" / "prefect.yaml"


def test_deployments_schedules_and_pools() -> None:
    specs = {s.name: s for s in load_prefect_file(PREFECT_FILE)}
    assert list(specs) == ["nightly-ingest", "weekly-retrain", "forecast-on-demand"]
    assert {n: (s.flow_name, s.entrypoint, s.work_pool) for n, s in specs.items()} == {
        "nightly-ingest": ("ingest-cohort", "flows/ingest.py:ingest_cohort_flow", "cpu"),
        "weekly-retrain": ("train-forecaster", "flows/train.py:train_forecaster", "gpu"),
        "forecast-on-demand": ("forecast-patient", "flows/forecast.py:forecast_patient", "cpu"),
    }
    assert specs["nightly-ingest"].schedules == ({"cron": "0 2 * * *", "timezone": "UTC"},)
    assert specs["weekly-retrain"].schedules == ({"cron": "0 4 * * 0", "timezone": "UTC"},)
    assert specs["forecast-on-demand"].schedules == ()
    assert set(specs["nightly-ingest"].parameters) == {"source", "store", "treatments"}


def test_pull_step_points_workers_at_their_checkout() -> None:
    raw = yaml.safe_load(PREFECT_FILE.read_text())
    assert raw["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $LONGITUDINAL_CODE_DIR }}"}}
    ]


def test_placeholders_filled_from_settings_and_environment(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    env = placeholder_env(settings, {"LONGITUDINAL_INGEST_SOURCE": "/data/incoming"})
    spec = next(s for s in load_prefect_file(PREFECT_FILE) if s.name == "nightly-ingest")
    missing: set[str] = set()
    assert fill_placeholders(spec.parameters, env, missing) == {
        "source": "/data/incoming",
        "store": str(tmp_path.resolve() / "cohort.zarr"),
        "treatments": "",  # no treatments CSV unless LONGITUDINAL_INGEST_TREATMENTS names one
    }
    assert missing == set()
    fill_placeholders({"a": ["{{ $NOPE_ONE }}", "x{{$NOPE_TWO}}"]}, {}, missing)
    assert missing == {"NOPE_ONE", "NOPE_TWO"}


def test_check_entrypoints_reports_every_problem(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "good.py").write_text("@flow\ndef good_flow(x: int) -> int:\n    return x\n")
    (tmp_path / "prefect.yaml").write_text(
        yaml.safe_dump(
            {
                "deployments": [
                    {"name": "ok", "entrypoint": "flows/good.py:good_flow", "work_pool": {"name": "cpu"}},
                    {"name": "nofile", "entrypoint": "flows/missing.py:f", "work_pool": {"name": "cpu"}},
                    {"name": "nofunc", "entrypoint": "flows/good.py:other", "work_pool": {"name": "tpu"}},
                ]
            }
        )
    )
    problems = check_entrypoints(load_prefect_file(tmp_path / "prefect.yaml"), tmp_path)
    assert problems == [
        f"nofile: flows/missing.py does not exist under {tmp_path}",
        "nofunc: flows/good.py defines no function other",
        "nofunc: work pool 'tpu' is not one of ['cpu', 'gpu']",
    ]


def test_malformed_file_lists_every_fault(tmp_path: Path) -> None:
    path = tmp_path / "prefect.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "deployments": [
                    {"name": "a", "entrypoint": "flows/x.py", "work_pool": {"name": "cpu"}},
                    {"entrypoint": "flows/x.py:f"},
                    {
                        "name": "b",
                        "entrypoint": "f.py:f",
                        "work_pool": {"name": "cpu"},
                        "schedules": [{"cron": "* *"}],
                    },
                ]
            }
        )
    )
    with pytest.raises(StackError) as err:
        load_prefect_file(path)
    text = str(err.value)
    for fault in (
        "(a) entrypoint 'flows/x.py' is not 'path/to/file.py:function'",
        "deployments[1] has no name",
        "deployments[1] (None) has no work_pool.name",
        "(b) schedules[0] cron '* *' does not have 5 fields",
    ):
        assert fault in text


def test_deploy_refuses_without_a_server(tmp_path: Path) -> None:
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "f.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "deployments": [
                    {
                        "name": "d",
                        "entrypoint": "flows/f.py:f",
                        "work_pool": {"name": "cpu"},
                        "parameters": {"x": "{{ $SURELY_UNSET_VAR }}"},
                    }
                ]
            }
        )
    )
    with pytest.raises(StackError) as err:
        deploy_all(Settings(home=tmp_path), prefect_file=tmp_path / "p.yaml", code_dir=tmp_path, environ={})
    assert "environment variable SURELY_UNSET_VAR is unset" in str(err.value)
    assert "no Prefect API URL" in str(err.value)
