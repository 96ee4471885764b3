"""The `forecast-patient` flow on a phantom store: same outputs as its CLI twin's library call, artifacts
published, pseudonyms only, and no retry for a query that cannot succeed."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from longitudinal.data.phantoms import make_phantom_store
from longitudinal.models.base import build_model


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    # The temporary API server starts slowly on a busy 2-core machine; 20 s (the default) is not always enough.
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    # INFO lines of the temporary server's shutdown are logged at exit, after pytest closed its capture streams.
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")
    monkeypatch.setenv("MLFLOW_ENABLE_TELEMETRY", "false")
    monkeypatch.setenv("LONGITUDINAL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LONGITUDINAL_MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    monkeypatch.delenv("LONGITUDINAL_PSEUDONYM_KEY", raising=False)
    return tmp_path


def _checkpoint(path: Path) -> Path:
    model = build_model("linear")
    torch.save({"kind": "linear", "config": model.config_dict(), "state_dict": model.state_dict(),
                "channels": ["T1c", "FLAIR"], "spacing_mm": [2.0] * 3, "crop_size": [32] * 3,
                "meta": {"data": {"max_context": 3, "normalize": "none"}}}, path)
    return path


def test_forecast_flow_writes_the_same_outputs_as_the_library(env: Path) -> None:
    from prefect.artifacts import Artifact

    from flows.forecast import SUMMARY_KEY, TABLE_KEY, forecast_patient
    from longitudinal.forecast import ForecastRequest, Queries, UnknownPatientError
    from longitudinal.forecast import forecast_patient as library_forecast
    from longitudinal.settings import Settings

    cohort = make_phantom_store(str(env / "cohort.zarr"), n_patients=2, seed=3)
    ckpt = _checkpoint(env / "linear.pt")
    out = env / "flow-out"
    body = forecast_patient(patient_id="P001", store=cohort.url, in_days=[60.0, 120.0], model_ref=str(ckpt),
                            n_samples=2, out_dir=str(out))
    assert body["patient"] == "P001" and Path(body["summary_path"]) == out / "P001_forecast.json"
    on_disk = json.loads((out / "P001_forecast.json").read_text())
    assert on_disk["queries"] == body["queries"]
    twin = library_forecast(Settings(), ForecastRequest("P001", Queries(in_days=(60.0, 120.0)), store_url=cohort.url,
                                                        model_ref=str(ckpt), n_samples=2, write=False))
    assert [q.to_dict()["volume_whole_ml"] for q in twin.queries] == [q["volume_whole_ml"] for q in body["queries"]]
    medians = [q["volume_whole_ml"]["median"] for q in body["queries"]]
    assert cohort.patients["P001"].whole_ml[-1] < medians[0] < medians[1]
    img = nib.load(body["queries"][0]["files"]["prob_whole"])
    assert img.shape == tuple(reversed(cohort.grid))
    np.testing.assert_array_equal(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert Artifact.get(TABLE_KEY) is not None and Artifact.get(SUMMARY_KEY) is not None

    state = forecast_patient(patient_id="P01", store=cohort.url, in_days=[60.0], model_ref=str(ckpt),
                             return_state=True)
    assert state.is_failed()
    with pytest.raises(UnknownPatientError, match="closest: P001"):
        state.result()


class _State:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self, raise_on_failure: bool = True) -> BaseException:
        return self.exc


def test_only_io_errors_are_retried() -> None:
    from flows.forecast import retry_on_io
    from longitudinal.forecast import ModelNotFoundError, StoreUnreadableError, UnknownPatientError

    assert retry_on_io(None, None, _State(OSError("disk")))
    assert retry_on_io(None, None, _State(FileNotFoundError("gone")))
    for exc in (UnknownPatientError("x"), ModelNotFoundError("x"), StoreUnreadableError("x"), ValueError("x")):
        assert not retry_on_io(None, None, _State(exc))


def test_forecast_flow_takes_a_plan_and_names_its_events_by_days(env: Path) -> None:
    import re

    from prefect.artifacts import Artifact

    from flows.forecast import SUMMARY_KEY, TABLE_KEY, forecast_patient
    from longitudinal.forecast import InvalidQueryError

    cohort = make_phantom_store(str(env / "cohort.zarr"), n_patients=2, seed=3)
    ckpt = _checkpoint(env / "linear.pt")
    body = forecast_patient(patient_id="P001", store=cohort.url, in_days=[60.0], model_ref=str(ckpt),
                            n_samples=2, out_dir=str(env / "flow-out"), plan=["surgery@+10"])
    last = cohort.patients["P001"].days[-1]
    assert body["counterfactual"] is True and body["plan"][0]["start_days"] == pytest.approx(last + 10)
    # linear ignores treatments: the forecast under the plan is the recorded history's, in files of their own
    cf = body["queries"][0]["counterfactual"]
    assert cf["volume_whole_ml"] == body["queries"][0]["volume_whole_ml"]
    assert all("_plan_" in Path(f).name for f in cf["files"].values())
    markdown = Artifact.get(SUMMARY_KEY).data
    assert f"| counterfactual plan | surgery day {last + 10:g} |" in markdown, markdown
    assert not re.search(r"\d{4}-\d{2}-\d{2}", markdown)  # days since baseline only
    table = Artifact.get(TABLE_KEY).data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["history"] for r in rows] == ["recorded", "plan"]

    state = forecast_patient(patient_id="P001", store=cohort.url, in_days=[60.0], model_ref=str(ckpt),
                             plan=["laser@+5"], return_state=True)
    assert state.is_failed()
    with pytest.raises(InvalidQueryError, match="valid kinds: surgery, radiotherapy, chemotherapy"):
        state.result()
