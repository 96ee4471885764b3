"""CohortStore round trip: what is written is what is read, lazily and eagerly, with a consistent index."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import zarr
from storerecords import GRID, make_record

from storage.schema import INDEX_COLUMNS, SCHEMA_VERSION
from storage.store import CohortStore


def _assert_same(got, want) -> None:
    assert got.patient_id == want.patient_id
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.label, want.label)
    np.testing.assert_array_equal(got.days, want.days)
    assert got.image.dtype == np.float32 and got.label.dtype == np.uint8 and got.days.dtype == np.float64
    assert tuple(got.channels) == tuple(want.channels)
    assert tuple(got.spacing_mm) == tuple(want.spacing_mm)
    np.testing.assert_array_equal(got.reference_affine, want.reference_affine)
    assert got.sessions == want.sessions


def test_round_trip_and_root_attrs(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True, created_by="longitudinal 9.9")
    a, b = make_record("p001"), make_record("p002", days=(0.0, 200.0), seed=7, channels=("T1c",))
    store.write_patient(a)
    store.write_patient(b)

    assert store.patient_ids() == ["p001", "p002"]
    _assert_same(store.read_patient("p001"), a)
    _assert_same(store.read_patient("p002"), b)
    assert store.attrs["schema_version"] == SCHEMA_VERSION
    assert store.attrs["created_by"] == "longitudinal 9.9"
    assert "RAS" in store.attrs["reference_space"]
    assert store.verify() == []

    # Reopening (no create) sees the same store; a missing store is an error, not a silent creation.
    assert CohortStore.open(tmp_path / "c.zarr").patient_ids() == ["p001", "p002"]
    with pytest.raises(FileNotFoundError, match="no cohort store"):
        CohortStore.open(tmp_path / "missing.zarr")


def test_arrays_are_lazy_zarr_with_schema_chunks(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    rec = make_record("p001", grid=(70, 12, 9))
    store.write_patient(rec)
    arrs = store.arrays("p001")
    assert isinstance(arrs.image, zarr.Array) and isinstance(arrs.label, zarr.Array)
    assert arrs.image.shape == (3, 2, 70, 12, 9) and arrs.label.shape == (3, 70, 12, 9)
    # Schema chunks (1, 1, 64, 64, 64), clipped to the grid where it is smaller.
    assert arrs.image.chunks == (1, 1, 64, 12, 9) and arrs.label.chunks == (1, 64, 12, 9)
    np.testing.assert_array_equal(arrs.image[2, 1, 65:], rec.image[2, 1, 65:])
    np.testing.assert_array_equal(arrs.days, [0.0, 45.5, 120.0])
    assert arrs.channels == ("T1c", "FLAIR") and arrs.spacing_mm == (2.0, 2.0, 2.0)
    assert arrs.affine.shape == (4, 4) and arrs.affine[0, 3] == -10.0
    attrs = store.patient_attrs("p001")
    assert attrs["reference_nifti"]["shape_xyz"] == [9, 12, 70]
    assert attrs["acquisition_dates"] == [s.shifted_date for s in rec.sessions]
    assert [s["session"] for s in attrs["sessions"]] == ["ses-00", "ses-01", "ses-02"]


def test_index_sorted_typed_and_matching_sessions(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    assert list(store.index().columns) == list(INDEX_COLUMNS) and len(store.index()) == 0
    store.write_patient(make_record("zz9", days=(0.0, 10.0)))
    store.write_patient(make_record("aa1", days=(0.0, 5.0, 400.0), seed=3))
    df = store.index()
    assert list(df.columns) == list(INDEX_COLUMNS)
    assert df["patient_id"].tolist() == ["aa1", "aa1", "aa1", "zz9", "zz9"]
    assert df["days"].tolist() == [0.0, 5.0, 400.0, 0.0, 10.0]
    assert df["time_index"].tolist() == [0, 1, 2, 0, 1]
    assert df["days"].dtype == np.float64 and df["has_label"].dtype == bool
    assert set(df["qc_status"]) == {"ok"}
    want = {s.content_sha256 for s in make_record("aa1", days=(0.0, 5.0, 400.0), seed=3).sessions}
    assert set(df.loc[df.patient_id == "aa1", "content_sha256"]) == want == store.content_hashes("aa1")
    assert store.content_hashes("unknown") == set()


def test_append_and_rebase_replace_the_whole_patient(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    first = make_record("p001", days=(0.0, 45.5))
    store.write_patient(first)
    before = store.content_hashes("p001")

    # An earlier session arrives: ingest re-bases days and writes the merged series.
    merged = make_record("p001", days=(0.0, 30.0, 75.5), seed=5)
    generation = store.write_patient(merged)
    _assert_same(store.read_patient("p001"), merged)
    assert store.patient_attrs("p001")["commit"]["generation"] == generation
    assert store.index()["days"].tolist() == [0.0, 30.0, 75.5]
    assert store.content_hashes("p001") != before
    assert store.verify() == []

    # Shrinking works too (no stale chunks or rows survive a replace).
    store.write_patient(first)
    _assert_same(store.read_patient("p001"), first)
    assert len(store.index()) == 2 and store.verify() == []
    assert not list((tmp_path / "c.zarr" / ".staging").iterdir())
    assert not list((tmp_path / "c.zarr" / ".trash").iterdir())


def test_invalid_record_rejected_with_every_problem(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    bad = make_record("p001")
    bad.days = np.array([0.0, 50.0, 20.0])
    bad.image = bad.image[:, :1]
    bad.label = bad.label + 5
    with pytest.raises(ValueError) as err:
        store.write_patient(bad)
    msg = str(err.value)
    assert "strictly increase" in msg and "C=2" in msg and "label must hold" in msg
    assert store.patient_ids() == [] and len(store.index()) == 0


def test_missing_patient_is_keyerror(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    with pytest.raises(KeyError, match="p404"):
        store.read_patient("p404")
    with pytest.raises(KeyError):
        store.sessions("p404")
    assert not store.has_patient("p404")


def test_store_pickles_for_workers(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    store.write_patient(make_record("p001"))
    clone = pickle.loads(pickle.dumps(store))
    assert clone.patient_ids() == ["p001"]
    assert clone.read_patient("p001").image.shape == (3, 2, *GRID)


def test_info_summary(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    store.write_patient(make_record("p001"))
    store.write_patient(make_record("p002", days=(0.0, 9.0)))
    info = store.info()
    assert info["patients"] == 2 and info["sessions"] == 5
    assert info["channels"] == ["T1c", "FLAIR"]
    assert info["grids_zyx"] == ["12x14x10"] and info["spacings_mm_zyx"] == ["2x2x2"]
    assert info["schema_version"] == SCHEMA_VERSION and not info["read_only"] and info["size_bytes"] > 0


def test_non_finite_metric_round_trips_as_strict_json(tmp_path):
    import dataclasses
    import json
    import math

    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    rec = make_record("p001")
    rec.sessions[0] = dataclasses.replace(
        rec.sessions[0], registration_metric=float("nan"), qc_flags=["baseline"]
    )
    store.write_patient(rec)
    text = (tmp_path / "c.zarr" / "patients" / "p001" / "zarr.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    got = store.sessions("p001")[0]
    assert math.isnan(got.registration_metric) and got.qc_flags == ["baseline"]
    assert got.content_sha256 == rec.sessions[0].content_sha256
    df = store.index()
    assert df.loc[0, "qc_status"] == "warn" and math.isnan(df.loc[0, "registration_metric"])
    assert store.verify() == []
