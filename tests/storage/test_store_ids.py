"""Patient ids are path components: hostile ones are rejected by every entry point, naming the id."""

from __future__ import annotations

import pytest
from storerecords import make_record

from storage.schema import patient_id_problem, validate_patient_id
from storage.store import CohortStore

HOSTILE = [
    "..",
    "../p001",
    "a/b",
    "a\\b",
    "/abs",
    "",
    "x" * 65,
    "p\x00001",
    "p\n1",
    "p 1",
    ".hidden",
    "p.1",
    "pé",
    "~root",
]
GOOD = ["p001", "sub-01", "A_b-9", "x" * 64]


@pytest.mark.parametrize("pid", HOSTILE)
def test_hostile_ids_rejected_everywhere(tmp_path, pid):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    assert patient_id_problem(pid) is not None
    with pytest.raises(ValueError, match="invalid patient id") as err:
        store.write_patient(make_record(pid))
    assert repr(pid) in str(err.value)
    for call in (
        store.read_patient,
        store.arrays,
        store.sessions,
        store.content_hashes,
        store.delete_patient,
    ):
        with pytest.raises(ValueError, match="invalid patient id"):
            call(pid)
    assert store.patient_ids() == []
    # Nothing escaped the store directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.zarr"]


@pytest.mark.parametrize("pid", GOOD)
def test_good_ids_accepted(tmp_path, pid):
    assert validate_patient_id(pid) == pid
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    store.write_patient(make_record(pid, days=(0.0,)))
    assert store.patient_ids() == [pid]


def test_non_string_id_rejected():
    with pytest.raises(ValueError, match="must be a string"):
        validate_patient_id(17)
