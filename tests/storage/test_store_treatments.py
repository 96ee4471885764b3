"""Treatment events in the store (schema v2): round trip, plain readers (zarr attributes, the parquet table),
the record checks, and verify naming every inconsistency between attributes, checksum and table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import zarr
from storerecords import make_record

from storage.schema import TREATMENT_COLUMNS, TreatmentRecord
from storage.store import CohortStore

# make_record's baseline session is dated 2031-01-15 (shifted calendar).
EVENTS = [
    TreatmentRecord("surgery", 7.0, "2031-01-22"),
    TreatmentRecord("radiotherapy", 35.0, "2031-02-19", 74.0, "2031-03-30"),
    TreatmentRecord("chemotherapy", 35.0, "2031-02-19", 74.0, "2031-03-30"),
    TreatmentRecord("surgery", -3.0, "2031-01-12"),  # before the baseline scan: negative days
]


def _treated(pid: str = "p001", events: list[TreatmentRecord] = EVENTS):
    return dataclasses.replace(make_record(pid), treatments=list(events))


@pytest.fixture
def store(tmp_path: Path) -> CohortStore:
    s = CohortStore.open(tmp_path / "c.zarr", create=True, created_by="tests")
    s.write_patient(_treated("p001"))
    s.write_patient(make_record("p002", seed=1))  # untreated
    return s


def test_events_round_trip_and_plain_readers_see_them(store: CohortStore, tmp_path: Path):
    assert store.verify() == []
    ordered = sorted(EVENTS, key=lambda t: (t.start_date, t.kind))
    assert store.patient_treatments("p001") == ordered
    assert store.read_patient("p001").treatments == ordered
    assert store.arrays("p001").treatments == ordered
    assert store.patient_treatments("p002") == []
    assert store.info()["treatment_events"] == 4

    # Without this code: the parquet table beside index/ and the patient group's zarr attributes.
    url = str(tmp_path / "c.zarr")
    table = pd.read_parquet(url + "/treatments")
    assert list(table.columns) == list(TREATMENT_COLUMNS)
    assert set(table["patient_id"]) == {"p001"}  # p002's fragment is an empty table
    rows = table.sort_values("event")
    assert rows["kind"].tolist() == [t.kind for t in ordered]
    assert rows["start_days"].tolist() == [t.start_days for t in ordered]
    assert rows["start_date"].tolist() == [t.start_date for t in ordered]
    assert rows["end_days"].isna().tolist() == [t.end_days is None for t in ordered]
    attrs = zarr.open_group(url, path="patients/p001", mode="r").attrs.asdict()
    assert attrs["treatments"] == [t.to_dict() for t in ordered]
    assert attrs["schema_version"] == 2 and attrs["commit"]["treatments_sha256"]
    pd.testing.assert_frame_equal(store.treatments(), table.sort_values(["patient_id", "event"]).reset_index(
        drop=True))


def test_record_check_names_every_bad_event() -> None:
    base = make_record("p001")
    bad = [
        TreatmentRecord("laser", 7.0, "2031-01-22"),
        TreatmentRecord("radiotherapy", 35.0, "2031-02-19", 30.0, "2031-02-14"),  # ends before it starts
        TreatmentRecord("surgery", 8.0, "2031-01-22"),  # days disagree with the dates
        TreatmentRecord("chemotherapy", 35.0, "2031-02-19", 74.0, None),
        TreatmentRecord("surgery", 7.0, "2031-01-22"),
        TreatmentRecord("surgery", 7.0, "2031-01-22"),  # the same event twice
    ]
    problems = "\n".join(dataclasses.replace(base, treatments=bad).check())
    for fragment in ("kind must be one of", "ends before it starts", "start_days 8.0 != 7",
                     "end_days and end_date must both be set", "not unique"):
        assert fragment in problems, problems


def test_writing_a_bad_event_is_refused(store: CohortStore):
    with pytest.raises(ValueError, match="laser"):
        store.write_patient(_treated("p003", [TreatmentRecord("laser", 7.0, "2031-01-22")]))
    assert "p003" not in store.patient_ids()


def test_verify_names_tampered_events_checksum_and_table(store: CohortStore, tmp_path: Path):
    root = tmp_path / "c.zarr"
    meta_path = root / "patients" / "p001" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["treatments"][0]["start_days"] = -4.0  # edited behind the store's back
    meta_path.write_text(json.dumps(meta))
    faults = store.verify()
    assert any("p001: treatments checksum mismatch" in f for f in faults), faults
    assert any("start_days -4.0 != -3 days after the baseline" in f for f in faults), faults
    assert any("treatments row 0: start_days" in f for f in faults), faults

    (root / "treatments" / "p002.parquet").unlink()
    (root / "treatments" / "p999.parquet").write_bytes((root / "treatments" / "p001.parquet").read_bytes())
    faults = store.verify()
    assert any("p002: no treatments fragment" in f for f in faults), faults
    assert any("fragment p999.parquet does not belong to a committed patient" in f for f in faults), faults


def test_update_adds_an_event_and_delete_removes_the_fragment(store: CohortStore, tmp_path: Path):
    extra = TreatmentRecord("chemotherapy", 102.0, "2031-04-27", 269.0, "2031-10-11")
    update = store.update_patient("p001", lambda cur: dataclasses.replace(cur, treatments=[*cur.treatments, extra]))
    assert update.written and extra in store.patient_treatments("p001")
    assert len(pd.read_parquet(str(tmp_path / "c.zarr") + "/treatments")) == 5
    store.delete_patient("p001")
    assert not (tmp_path / "c.zarr" / "treatments" / "p001.parquet").exists()
    assert store.verify() == []
