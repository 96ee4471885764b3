"""A registry with versions but no champion (the gate promoted none): the forecast error says so and names a
version to use, as a CLI option."""

from __future__ import annotations

from pathlib import Path

from forecasthelpers import KEY, Cohort, baseline_checkpoint, register_champion
from typer.testing import CliRunner

from longitudinal.cli import app
from longitudinal.settings import Settings


def test_missing_champion_names_the_versions(cohort: Cohort, tmp_path: Path) -> None:
    from longitudinal.tracking import uri

    home = tmp_path / "home"
    settings = Settings(home=home, pseudonym_key=KEY, mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    version = register_champion(settings, baseline_checkpoint(tmp_path / "linear.pt"))
    uri.client(settings).delete_registered_model_alias(settings.registered_model_name, "champion")
    res = CliRunner().invoke(app, ["--home", str(home), "forecast", "sub-01", "--store", cohort.store, "--in", "30"],
                             env={"LONGITUDINAL_PSEUDONYM_KEY": KEY, "COLUMNS": "400",
                                  "LONGITUDINAL_MLFLOW_TRACKING_URI": settings.tracking_uri})
    assert res.exit_code == 1, res.output
    assert "none of them champion" in res.output
    assert f"--model tumor-growth-forecaster/{version}" in res.output and "Traceback" not in res.output
