"""The optional per-patient tissue maps: written with the patient, read back as ``PatientArrays.tissue`` (None when
absent), kept through read-modify-write updates, covered by ``verify()`` through their own checksum, and absent
without any trace (the same attributes and data checksum as before) for a patient without them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import zarr
from storerecords import GRID, appended, make_record

from storage._records import data_checksum
from storage.schema import TISSUE_CHANNELS
from storage.store import CohortStore


def _tissue(seed: int = 0) -> np.ndarray:
    """(2, *GRID) white/grey probabilities in [0, 1] summing to at most 1."""
    rng = np.random.default_rng(seed)
    white = rng.uniform(0, 1, size=GRID).astype(np.float32)
    return np.stack([white, (1 - white) * rng.uniform(0, 1, size=GRID).astype(np.float32)])


@pytest.fixture
def store(tmp_path: Path) -> CohortStore:
    return CohortStore.open(tmp_path / "c.zarr", create=True)


def test_tissue_round_trips_as_float16_and_verifies(store: CohortStore) -> None:
    tissue = _tissue()
    store.write_patient(dataclasses.replace(make_record("p001"), tissue=tissue))
    arrays = store.arrays("p001")
    assert arrays.tissue.shape == (len(TISSUE_CHANNELS), *GRID) and arrays.tissue.dtype == np.float16
    np.testing.assert_allclose(np.asarray(arrays.tissue[...], dtype=np.float32), tissue, atol=5e-4)
    back = store.read_patient("p001").tissue
    assert back is not None and back.dtype == np.float32
    np.testing.assert_array_equal(back, tissue.astype(np.float16).astype(np.float32))
    assert store.verify() == []
    # Plain zarr readers see a labelled array.
    group = zarr.open_group(store.url, path="patients/p001", mode="r")
    assert tuple(group["tissue"].metadata.dimension_names) == ("tissue", "z", "y", "x")
    assert list(group["tissue"].attrs["channels"]) == ["white_matter", "grey_matter"]


def test_a_patient_without_tissue_is_stored_exactly_as_before(store: CohortStore) -> None:
    record = make_record("p002", seed=2)
    store.write_patient(record)
    assert store.arrays("p002").tissue is None and store.read_patient("p002").tissue is None
    commit = store.patient_attrs("p002")["commit"]
    assert set(commit) == {"generation", "data_sha256", "checksum_definition", "treatments_sha256",
                           "treatments_checksum_definition", "committed_at", "staged_unix"}
    assert commit["data_sha256"] == data_checksum(record.image, record.label, record.days)
    assert "tissue" not in dict(zarr.open_group(store.url, path="patients/p002", mode="r").arrays())
    assert store.verify() == []


def test_updates_keep_the_tissue(store: CohortStore) -> None:
    store.write_patient(dataclasses.replace(make_record("p001"), tissue=_tissue()))
    before = store.read_patient("p001").tissue
    update = store.update_patient("p001", lambda current: appended(current, "p001", (200.0,), seed=7))
    assert update.written and len(store.sessions("p001")) == 4
    np.testing.assert_array_equal(store.read_patient("p001").tissue, before)
    assert store.verify() == []


def test_verify_finds_changed_or_missing_tissue(store: CohortStore) -> None:
    store.write_patient(dataclasses.replace(make_record("p001"), tissue=_tissue()))
    store.write_patient(dataclasses.replace(make_record("p002", seed=2), tissue=_tissue(2)))
    group = zarr.open_group(store.url, path="patients/p001", mode="r+")
    group["tissue"][0, 0, 0, 0] = 0.5 if float(group["tissue"][0, 0, 0, 0]) != 0.5 else 0.25
    problems = store.verify()
    assert problems and all("p001" in p for p in problems) and any("tissue checksum mismatch" in p for p in problems)
    zarr.open_group(store.url, path="patients/p002", mode="r+").__delitem__("tissue")
    assert any("p002" in p and "tissue array is missing" in p for p in store.verify())


def test_records_with_bad_tissue_are_refused_with_every_problem(store: CohortStore) -> None:
    with pytest.raises(ValueError, match="tissue shape"):
        store.write_patient(dataclasses.replace(make_record("p001"), tissue=np.zeros((2, 3, 3, 3), np.float32)))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        store.write_patient(dataclasses.replace(make_record("p001"), tissue=_tissue() * 2))
    assert store.patient_ids() == []
