"""`longitudinal store info|verify`: summary table, exit 0 on a sound store, exit 1 listing every fault."""

from __future__ import annotations

import pandas as pd
from storerecords import make_record
from typer.testing import CliRunner

from longitudinal.cli import app
from storage.store import CohortStore


def _store(tmp_path):
    path = tmp_path / "c.zarr"
    store = CohortStore.open(path, create=True, created_by="longitudinal test")
    store.write_patient(make_record("p001"))
    store.write_patient(make_record("p002", days=(0.0, 12.0), seed=2))
    return path


def test_info_prints_summary_and_locations(tmp_path):
    path = _store(tmp_path)
    result = CliRunner().invoke(app, ["--home", str(tmp_path / "home"), "store", "info", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert str(path) in out and str(tmp_path / "home") in out  # locations are printed
    for expected in ("patients", "sessions", "T1c, FLAIR", "12x14x10", "2x2x2", "KiB", "longitudinal test"):
        assert expected in out, expected
    assert "│ patients              │ 2" in out and "│ sessions              │ 5" in out


def test_store_defaults_to_settings(tmp_path, monkeypatch):
    path = _store(tmp_path)
    monkeypatch.setenv("LONGITUDINAL_STORE", str(path))
    result = CliRunner().invoke(app, ["store", "verify"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and str(path) in result.output


def test_verify_exit_codes(tmp_path):
    path = _store(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(app, ["store", "verify", str(path)])
    assert ok.exit_code == 0 and "no faults" in ok.output

    frag = path / "index" / "p002.parquet"
    pd.read_parquet(frag).iloc[:1].to_parquet(frag)
    (path / ".staging" / "p003.abc").mkdir()
    bad = runner.invoke(app, ["store", "verify", str(path)])
    assert bad.exit_code == 1
    assert "patient p002: index has 1 rows for 2 sessions" in bad.output
    assert ".staging/p003.abc" in bad.output
    assert "2 fault(s)" in bad.output

    # --repair clears crash debris (not data faults).
    repaired = runner.invoke(app, ["store", "verify", "--repair", str(path)])
    assert repaired.exit_code == 1 and "1 fault(s)" in repaired.output


def test_missing_store_fails_cleanly(tmp_path):
    result = CliRunner().invoke(app, ["store", "info", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 1
    assert "no cohort store" in result.output and "Traceback" not in result.output
