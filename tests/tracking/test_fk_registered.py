"""``fk`` (fitted per patient, nothing trained) registered as an MLflow model version with ``longitudinal models
register-closed-form``: ``mlflow.pyfunc.load_model("models:/<name>/<version>").predict(...)`` gives the volumes of
``longitudinal forecast --model fk`` for the same native scans, query and seed."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from trackinghelpers import write_native_series
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.ingest.deid import pseudonym
from longitudinal.settings import Settings
from longitudinal.tracking.served import DAYS_ORIGIN

KEY = "fk-registry-test-pseudonym-key"
ENDS = ("median", "lo80", "hi80", "lo95", "hi95")
SAMPLES, SEED, GAP = 4, 3, 90.0


def test_registered_fk_forecasts_as_the_cli_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    home = tmp_path / "home"
    monkeypatch.setenv("LONGITUDINAL_HOME", str(home))
    monkeypatch.setenv("LONGITUDINAL_PSEUDONYM_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "200")
    settings = Settings(home=home, pseudonym_key=KEY)
    frame, truth = write_native_series(tmp_path / "scans", days=(0.0, 60.0, 120.0), radii_mm=(5.0, 6.5, 8.0))
    runner = CliRunner()

    registered = runner.invoke(app, ["models", "register-closed-form", "fk", "--alias", "champion"],
                               catch_exceptions=False)
    assert registered.exit_code == 0, registered.output
    name = settings.registered_model_name
    assert f"registered fk as {name}/1" in registered.output
    refused = runner.invoke(app, ["models", "register-closed-form", "tfm"])
    assert refused.exit_code == 1 and "needs trained weights" in refused.output

    # The registry consumer: the model loaded by its version alone, given the native files.
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    rows = model.predict(frame, params={"in_days": [GAP], "n_samples": SAMPLES, "seed": SEED})
    row = rows.iloc[0]
    served = {f"{k}_{e}": float(row[f"volume_{k}_ml_{e}"]) for k in ("whole", "enhancing") for e in ENDS}

    # The CLI on the same files: the served model dates scans given by days from DAYS_ORIGIN.
    out = tmp_path / "out-cli"
    args = ["forecast", "p1", "--in", f"{GAP:g}", "--model", "fk", "--samples", str(SAMPLES), "--seed", str(SEED),
            "--out", str(out)]
    for _, r in frame.iterrows():
        date = (DAYS_ORIGIN + dt.timedelta(days=float(r["days"]))).isoformat(timespec="seconds")
        args += [arg for ch in ("T1c", "FLAIR", "label") for arg in ("--scan", f"{date}:{ch}={r[ch]}")]
    run = runner.invoke(app, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    pid = pseudonym("p1", KEY.encode())
    query = json.loads((out / f"{pid}_forecast.json").read_text())["queries"][0]
    cli = {f"{k}_{e}": query[f"volume_{k}_ml"][e] for k in ("whole", "enhancing") for e in ENDS}

    assert row["pseudonym"] == pid and row["days_after_last_scan"] == pytest.approx(GAP)
    assert served == pytest.approx(cli, rel=1e-6, abs=1e-6)
    # A real forecast: the sphere keeps growing beyond its last observed volume.
    assert served["whole_median"] > truth["whole_ml"][-1] > 0
