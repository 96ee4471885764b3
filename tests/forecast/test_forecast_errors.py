"""Every expected failure of a forecast query is one clear ForecastError (API) and, through the CLI, one message
with exit code 1 or 2 and no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from forecasthelpers import KEY, Cohort, baseline_checkpoint
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.forecast import (
    DateBeforeBaselineError,
    ForecastError,
    ForecastRequest,
    InvalidQueryError,
    ModelDataMismatchError,
    ModelNotFoundError,
    Queries,
    ScanInputError,
    StoreUnreadableError,
    UnknownPatientError,
    forecast_patient,
)
from longitudinal.settings import Settings


def _typo(pid: str) -> str:
    return pid[:-1] + ("0" if pid[-1] != "0" else "1")


def test_unknown_patient_suggests_the_closest_ids(cohort: Cohort) -> None:
    pid = cohort.pids["sub-01"]
    with pytest.raises(UnknownPatientError) as err:
        forecast_patient(cohort.settings, ForecastRequest(_typo(pid), Queries(in_days=(30,)), store_url=cohort.store))
    assert err.value.suggestions[0] == pid and f"closest: {pid}" in str(err.value)
    assert err.value.exit_code == 1
    # Without the site's key a raw id is not looked up: it is just unknown.
    keyless = Settings(home=cohort.root / "keyless")
    with pytest.raises(UnknownPatientError):
        forecast_patient(keyless, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=cohort.store))
    assert not (cohort.root / "keyless" / "secrets").exists()  # a query never creates a key
    # The flow's mode: pseudonyms only.
    with pytest.raises(UnknownPatientError):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=cohort.store, allow_raw_id=False))


def test_date_before_baseline(cohort: Cohort) -> None:
    with pytest.raises(DateBeforeBaselineError, match="2023-12-01 is not after the baseline scan of 2024-01-10"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(at=("2023-12-01",)), store_url=cohort.store))
    with pytest.raises(DateBeforeBaselineError, match="day -5 is not after the baseline"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(days_since_baseline=(-5,)), store_url=cohort.store))
    with pytest.raises(InvalidQueryError) as err:  # every problem at once
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(at=("2024-13-45", "2020-01-01",), in_days=(-3,)), store_url=cohort.store))
    assert all(s in str(err.value) for s in ("2024-13-45", "2020-01-01", "--in -3"))
    assert err.value.exit_code == 2
    with pytest.raises(InvalidQueryError, match="no query"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(), store_url=cohort.store))


def test_no_registered_model_or_alias(cohort: Cohort, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nosuch"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=cohort.store, model_ref="tumor-growth-forecaster@nosuch"))
    # a registry that holds nothing
    empty = Settings(home=tmp_path / "empty-home", pseudonym_key=KEY,
                     mlflow_tracking_uri=f"sqlite:///{tmp_path / 'empty-home' / 'mlflow.db'}")
    with pytest.raises(ModelNotFoundError, match="tumor-growth-forecaster@champion") as err:
        forecast_patient(empty, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=cohort.store))
    assert "longitudinal models list" in str(err.value) and err.value.exit_code == 1


def test_channel_mismatch(cohort: Cohort, tmp_path: Path) -> None:
    ckpt = baseline_checkpoint(tmp_path / "t2.pt", channels=("T1c", "T2w"))
    with pytest.raises(ModelDataMismatchError, match=r"channel mismatch.*missing \['T2w'\]"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=cohort.store, model_ref=str(ckpt)))
    # A model that needs a subset of the stored channels is fine: channels are picked by name.
    r = forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=cohort.store, n_samples=1, write=False, model_ref=str(baseline_checkpoint(tmp_path / "flair.pt", channels=("FLAIR",)))))
    assert r.channels == ("FLAIR",) and r.queries[0].volume_whole_ml.median > 0


def test_unreadable_store(cohort: Cohort, tmp_path: Path) -> None:
    with pytest.raises(StoreUnreadableError, match="no cohort store"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=str(tmp_path / "missing.zarr")))
    bad = tmp_path / "bad.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("{not json")
    with pytest.raises(StoreUnreadableError, match="cannot read cohort store"):
        forecast_patient(cohort.settings, ForecastRequest("sub-01", Queries(in_days=(30,)), store_url=str(bad)))


def test_bad_scan_specs_are_listed_together(cohort: Cohort) -> None:
    with pytest.raises(ScanInputError) as err:
        forecast_patient(cohort.settings, ForecastRequest("sub-77", Queries(in_days=(30,)), scans=["2024-01-01-T1c-x.nii", "nodate=x"]))
    assert "2024-01-01-T1c-x.nii" in str(err.value) and "nodate=x" in str(err.value)
    assert err.value.exit_code == 2


def _cli(cohort: Cohort, *args: str) -> object:
    return CliRunner().invoke(app, ["--home", str(cohort.settings.home), "forecast", *args],
                              env={"LONGITUDINAL_PSEUDONYM_KEY": KEY,
                                   "LONGITUDINAL_MLFLOW_TRACKING_URI": cohort.settings.tracking_uri})


@pytest.mark.parametrize(("args", "code", "message"), [
    (["sub-0l", "--in", "30"], 1, "unknown patient 'sub-0l'"),
    (["{pid_typo}", "--in", "30"], 1, "closest: {pid}"),
    (["sub-01", "--at", "2023-12-01"], 2, "not after the baseline scan of 2024-01-10"),
    (["sub-01", "--at", "2025-02-30"], 2, "not a calendar date"),
    (["sub-01"], 2, "no query"),
    (["sub-01", "--in", "30", "--model", "tumor-growth-forecaster@nosuch"], 1, "not found"),
    (["sub-01", "--in", "30", "--model", "{t2w}"], 1, "channel mismatch"),
    (["sub-01", "--in", "30", "--samples", "0"], 2, "--samples must be >= 1"),
    (["sub-01", "--in", "30", "--store", "{missing}"], 1, "no cohort store"),
    (["sub-01", "--in", "30", "--scan", "garbage"], 2, "expected DATE:CHANNEL=PATH"),
])
def test_cli_errors_are_clean(cohort: Cohort, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    pid = cohort.pids["sub-01"]
    fill = {"pid": pid, "pid_typo": _typo(pid), "missing": str(tmp_path / "none.zarr"),
            "t2w": str(baseline_checkpoint(tmp_path / "t2.pt", channels=("T1c", "T2w")))}
    args = [a.format(**fill) for a in args]
    if "--store" not in args:
        args += ["--store", cohort.store]
    res = _cli(cohort, *args)
    out = res.output.replace("\n", " ")
    assert res.exit_code == code, res.output
    assert message.format(**fill) in " ".join(out.split()), res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)


def test_all_errors_are_forecast_errors() -> None:
    for cls in (DateBeforeBaselineError, InvalidQueryError, ModelDataMismatchError, ModelNotFoundError,
                ScanInputError, StoreUnreadableError, UnknownPatientError):
        assert issubclass(cls, ForecastError) and cls.exit_code in (1, 2)
