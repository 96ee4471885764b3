"""Schema v1 -> v2 on a v1 store written by the code before treatments existed (``data/v1_store``: two patients
written by that code's ``CohortStore.write_patient``, kept byte for byte): it opens read-only and verifies, its
writers are refused, ``migrate_store`` upgrades it in place (atomically: a failure leaves a sound v1 store that a
rerun finishes), and ``longitudinal store migrate|verify`` work on both versions."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from storerecords import make_record
from typer.testing import CliRunner

from longitudinal.cli import app
from storage import _migrate
from storage.schema import SCHEMA_VERSION, TreatmentRecord
from storage.store import CohortStore, MigrationError, ReadOnlyStoreError, migrate_store

V1_STORE = Path(__file__).parent / "data" / "v1_store"
V1_PATIENTS = ["p-0a1b2c3d4e5f", "p-99aa88bb77cc"]


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A private copy of the frozen v1 store."""
    dst = tmp_path / "v1.zarr"
    shutil.copytree(V1_STORE, dst)
    return dst


def _root_version(url: Path) -> int:
    return json.loads((url / "zarr.json").read_text())["attributes"]["schema_version"]


def test_v1_store_opens_read_only_reads_and_verifies(v1: Path):
    store = CohortStore.open(v1)
    assert store.read_only and store.schema_version == 1 and store.info()["read_only"]
    assert store.verify() == []
    assert store.patient_ids() == V1_PATIENTS
    assert len(store.index()) == 5 and store.treatments().empty
    record = store.read_patient(V1_PATIENTS[0])
    assert record.treatments == [] and record.days.tolist() == [0.0, 45.5, 120.0]
    with pytest.raises(ReadOnlyStoreError, match="store migrate"):
        store.write_patient(make_record("p-000000000001"))
    with pytest.raises(ReadOnlyStoreError):
        store.update_patient(V1_PATIENTS[0], lambda cur: cur)
    with pytest.raises(ReadOnlyStoreError):
        store.delete_patient(V1_PATIENTS[0])
    assert _root_version(v1) == 1 and not (v1 / "treatments").exists()

    from longitudinal.ingest.patient import open_store

    with pytest.raises(ReadOnlyStoreError, match="store migrate"):
        open_store(str(v1), recover=True)  # ingest refuses it before reading any source


def test_migration_upgrades_in_place_keeps_data_and_is_idempotent(v1: Path):
    before = CohortStore.open(v1)
    commits = {pid: before.patient_attrs(pid)["commit"] for pid in V1_PATIENTS}
    images = {pid: before.read_patient(pid).image for pid in V1_PATIENTS}
    index = before.index()

    report = migrate_store(v1)
    assert report.migrated and (report.from_version, report.to_version) == (1, SCHEMA_VERSION)
    assert report.faults == [] and len(report.steps) == len(V1_PATIENTS) + 1
    store = CohortStore.open(v1)
    assert not store.read_only and _root_version(v1) == SCHEMA_VERSION
    assert store.verify() == []
    for pid in V1_PATIENTS:
        commit = store.patient_attrs(pid)["commit"]
        # Same generation and data checksum: no array was rewritten.
        assert {k: commit[k] for k in commits[pid]} == commits[pid]
        np.testing.assert_array_equal(store.read_patient(pid).image, images[pid])
        assert store.patient_treatments(pid) == []
    pd.testing.assert_frame_equal(store.index(), index)
    assert pd.read_parquet(str(v1) + "/treatments").empty

    again = migrate_store(v1)
    assert not again.migrated and again.faults == []

    # Now writable: a treatment event is merged like a new session.
    event = TreatmentRecord("surgery", 7.0, "2031-01-22")
    store.update_patient(V1_PATIENTS[0], lambda cur: dataclasses.replace(cur, treatments=[event]))
    assert store.verify() == []
    assert pd.read_parquet(str(v1) + "/treatments")["kind"].tolist() == ["surgery"]


def test_a_failed_migration_leaves_a_sound_v1_store_and_a_rerun_finishes(v1: Path, monkeypatch):
    def no_flip(store):
        raise OSError("simulated crash before the root is written")

    monkeypatch.setattr(_migrate, "_flip_root", no_flip)
    with pytest.raises(OSError, match="simulated crash"):
        migrate_store(v1)
    store = CohortStore.open(v1)
    assert store.read_only and _root_version(v1) == 1
    assert store.verify() == []  # every patient already prepared, still a sound v1 store
    monkeypatch.undo()
    assert migrate_store(v1).faults == []
    assert CohortStore.open(v1).verify() == [] and _root_version(v1) == SCHEMA_VERSION


def test_an_unsound_store_is_not_migrated(v1: Path):
    chunk = next((v1 / "patients" / V1_PATIENTS[1] / "image").rglob("c/*/*/*/*/*"))
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    with pytest.raises(MigrationError) as err:
        migrate_store(v1)
    assert V1_PATIENTS[1] in str(err.value) and "nothing was changed" in str(err.value)
    assert _root_version(v1) == 1
    assert "treatments" not in json.loads((v1 / "patients" / V1_PATIENTS[0] / "zarr.json").read_text())[
        "attributes"]


def test_cli_verify_and_migrate_on_both_versions(v1: Path, tmp_path: Path):
    runner = CliRunner()
    home = ["--home", str(tmp_path / "home")]
    result = runner.invoke(app, [*home, "store", "verify", str(v1)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*home, "store", "info", str(v1)])
    assert result.exit_code == 0 and "read-only" in result.output
    result = runner.invoke(app, [*home, "store", "migrate", str(v1)])
    assert result.exit_code == 0, result.output
    assert f"schema version 1 -> {SCHEMA_VERSION}" in result.output
    result = runner.invoke(app, [*home, "store", "verify", str(v1)])
    assert result.exit_code == 0 and "no faults" in result.output
    result = runner.invoke(app, [*home, "store", "migrate", str(v1)])
    assert result.exit_code == 0 and "already at schema version" in result.output
    result = runner.invoke(app, [*home, "store", "migrate", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 1
