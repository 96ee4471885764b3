"""`longitudinal store patients`: one row per patient with its scans and date range; CLI words in errors."""

from __future__ import annotations

from storerecords import make_record
from typer.testing import CliRunner

from longitudinal.cli import app
from storage.store import CohortStore


def test_patients_lists_pseudonyms_sessions_and_dates(tmp_path):
    path = tmp_path / "c.zarr"
    store = CohortStore.open(path, create=True, created_by="longitudinal test")
    store.write_patient(make_record("p001"))
    store.write_patient(make_record("p002", days=(0.0, 12.0), seed=2))
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "store", "patients", str(path)],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line.split()[2:] for line in result.output.splitlines()
            if line.startswith("│ p00")}
    assert rows["p001"][:-1] == ["│", "3", "│", "2031-01-15", "│", "2031-03-15", "│", "120", "│", "3"]
    assert rows["p002"][:-1] == ["│", "2", "│", "2031-01-15", "│", "2031-02-15", "│", "12", "│", "2"]
    assert "2 patients" in result.output and "shifted calendar" in result.output
    # The table fits 80 columns; a location is printed whole on its own line, however long.
    lines = result.output.splitlines()
    assert any(line.split() == ["store", str(path)] for line in lines)
    assert max(len(line) for line in lines if str(tmp_path) not in line) <= 80


def test_empty_and_missing_stores_name_cli_commands(tmp_path):
    runner = CliRunner()
    empty = tmp_path / "empty.zarr"
    CohortStore.open(empty, create=True)
    res = runner.invoke(app, ["--home", str(tmp_path / "home"), "store", "patients", str(empty)])
    assert res.exit_code == 0 and "holds no patient yet" in res.output and "longitudinal ingest" in res.output
    missing = runner.invoke(app, ["--home", str(tmp_path / "home"), "store", "patients", str(tmp_path / "no.zarr")])
    assert missing.exit_code == 1
    assert "longitudinal ingest SOURCE --store" in missing.output and "create=True" not in missing.output
