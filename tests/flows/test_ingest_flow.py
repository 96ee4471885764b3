"""The ``ingest-cohort`` flow under Prefect's test harness and the ``longitudinal ingest`` CLI give the same
store index; the flow publishes its QC table and summary; a rerun is a no-op; I/O-only retries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from longitudinal.cli import app
from storage.store import CohortStore

KEY = "flow-test-pseudonym-key"


@pytest.fixture(scope="module")
def tiny_bids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from longitudinal.synth import generate_cohort

    root = tmp_path_factory.mktemp("flowsynth") / "bids"
    generate_cohort(root, 2, 3, "tiny")
    return root


@pytest.fixture
def prefect_env(tmp_path: Path, monkeypatch):
    prefect_home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(prefect_home / "storage"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings(updates={PREFECT_HOME: prefect_home, PREFECT_LOCAL_STORAGE_PATH: prefect_home / "storage"}):
        with prefect_test_harness(server_startup_timeout=180):  # a loaded CI machine starts it slowly
            yield prefect_home


def test_flow_and_cli_give_the_same_index(tiny_bids: Path, tmp_path: Path, prefect_env):
    from prefect.client.orchestration import get_client

    from flows.ingest import QC_TABLE_KEY, SUMMARY_KEY, ingest_cohort_flow

    home = tmp_path / "home"
    cli_store, flow_store = str(tmp_path / "cli.zarr"), str(tmp_path / "flow.zarr")
    result = CliRunner().invoke(
        app, ["--home", str(home), "ingest", str(tiny_bids), "--store", cli_store, "--spacing", "4", "--workers", "2"]
    )
    assert result.exit_code == 0, result.output

    # Every file lies inside the allowed root: confining the run changes nothing. The tasks confine their reads
    # through the settings the flow's parameter builds.
    from flows.ingest import _settings

    assert _settings(None, None, None, str(tiny_bids)).allowed_root == tiny_bids
    summary = ingest_cohort_flow(source=str(tiny_bids), store=flow_store, home=str(home), target_spacing_mm=4.0,
                                 allowed_root=str(tiny_bids))
    n_sessions = len(CohortStore.open(cli_store).index())
    assert summary["stored"] == n_sessions and summary["quarantined"] == 0 and summary["failed_patients"] == 0

    cli_index, flow_index = CohortStore.open(cli_store).index(), CohortStore.open(flow_store).index()
    exact = [c for c in cli_index.columns if c != "registration_metric"]
    pd.testing.assert_frame_equal(cli_index[exact], flow_index[exact])
    np.testing.assert_allclose(cli_index["registration_metric"], flow_index["registration_metric"], atol=1e-3)
    assert CohortStore.open(flow_store).verify() == []

    with get_client(sync_client=True) as client:
        keys = {a.key: a for a in client.read_artifacts()}
        assert QC_TABLE_KEY in keys and SUMMARY_KEY in keys
        assert "Ingest summary" in keys[SUMMARY_KEY].data
        task_runs = client.read_task_runs()
        assert len([t for t in task_runs if t.name.startswith("ingest-p-")]) == 2
        # Parameters are the source/store strings and options only: no patient id parameter on the flow.
        (flow_run,) = client.read_flow_runs()
        assert set(flow_run.parameters) <= {"source", "store", "home", "reports_dir", "target_spacing_mm",
                                            "registration", "allowed_root", "treatments"}

    # A rerun changes nothing: every session is already stored.
    again = ingest_cohort_flow(source=str(tiny_bids), store=flow_store, home=str(home), target_spacing_mm=4.0)
    assert again["stored"] == 0 and again["skipped"] == n_sessions
    pd.testing.assert_frame_equal(CohortStore.open(flow_store).index(), flow_index)


def test_retry_condition_only_retries_io_errors():
    from prefect.states import Failed

    from flows.ingest import retry_on_io

    assert retry_on_io(None, None, Failed(data=OSError("disk gone")))
    assert retry_on_io(None, None, Failed(data=FileNotFoundError("store missing")))
    assert not retry_on_io(None, None, Failed(data=ValueError("bad record")))
    assert not retry_on_io(None, None, Failed(data=KeyError("p-000")))
