"""The object-store variant against a real S3 API (moto's server on 127.0.0.1): round trip, plain xarray/pandas
reads, the copy-then-flip commit and its crash recovery."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import s3fs
import xarray as xr
from storerecords import NEW, OLD, assert_patient_is, kill_when_paused, make_record, start_writer

from storage.store import CohortStore


@pytest.fixture
def url(s3_url):
    return s3_url


def test_s3_round_trip_and_plain_readers(url, s3_options):
    store = CohortStore.open(url, create=True, storage_options=s3_options)
    assert not store.is_local
    a = make_record("p001")
    store.write_patient(a)
    store.write_patient(make_record("p002", days=(0.0, 8.0), seed=3))
    assert store.patient_ids() == ["p001", "p002"]
    got = store.read_patient("p001")
    np.testing.assert_array_equal(got.image, a.image)
    np.testing.assert_array_equal(got.label, a.label)
    assert got.sessions == a.sessions
    assert store.verify() == []
    assert store.info()["sessions"] == 5

    ds = xr.open_zarr(url, group="patients/p001", consolidated=False, storage_options=s3_options)
    assert ds["image"].dims == ("time", "channel", "z", "y", "x")
    np.testing.assert_array_equal(ds["time"].values, [0.0, 45.5, 120.0])
    np.testing.assert_array_equal(ds["label"].values, a.label)
    df = pd.read_parquet(f"{url}/index", storage_options=s3_options)
    assert len(df) == 5 and set(df["patient_id"]) == {"p001", "p002"}


def test_s3_append_replaces_whole_patient(url, s3_options):
    store = CohortStore.open(url, create=True, storage_options=s3_options)
    store.write_patient(make_record("p001", days=OLD["days"], seed=OLD["seed"]))
    store.write_patient(make_record("p001", days=NEW["days"], seed=NEW["seed"]))
    store.write_patient(make_record("p001", days=(0.0, 5.0), seed=4))  # shrink: no stale chunks may remain
    assert_patient_is(store, "p001", {"days": (0.0, 5.0), "seed": 4})
    assert store.verify() == []
    fs = s3fs.S3FileSystem(**s3_options)
    keys = fs.find(url[len("s3://") :])
    assert not [k for k in keys if "/.staging/" in k]
    image_chunks = [k for k in keys if "/patients/p001/image/c/" in k]
    assert len(image_chunks) == 2 * 2  # T=2, C=2, one spatial chunk each


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "outcome"), [("staged", "old"), ("swapped", "new")])
def test_s3_sigkill_mid_commit_recovers(url, s3_options, tmp_path, stage, outcome):
    store = CohortStore.open(url, create=True, storage_options=s3_options)
    store.write_patient(make_record("p001", days=OLD["days"], seed=OLD["seed"]))
    signal_file = tmp_path / "paused"
    proc = start_writer(url, "p001", NEW, stage, signal_file, options=s3_options)
    kill_when_paused(proc, signal_file)

    raw = CohortStore.open(url, storage_options=s3_options, recover=False)
    if stage == "swapped":
        # The group's zarr.json went first: the patient is invisible to us and to plain xarray alike.
        assert raw.patient_ids() == []
        with pytest.raises((FileNotFoundError, KeyError, OSError)):
            xr.open_zarr(url, group="patients/p001", consolidated=False, storage_options=s3_options)
    assert any("unfinished write" in p for p in raw.verify())

    healed = CohortStore.open(url, storage_options=s3_options)
    assert healed.verify() == []
    assert_patient_is(healed, "p001", {"old": OLD, "new": NEW}[outcome])


def test_s3_partial_group_is_ignored_and_flagged(url, s3_options):
    store = CohortStore.open(url, create=True, storage_options=s3_options)
    store.write_patient(make_record("p001"))
    store.write_patient(make_record("p002", days=(0.0, 8.0), seed=3))
    fs = s3fs.S3FileSystem(**s3_options)
    fs.rm(f"{url[len('s3://') :]}/patients/p002/zarr.json")  # as if a copy died before its marker landed
    store = CohortStore.open(url, storage_options=s3_options)
    assert store.patient_ids() == ["p001"]
    assert set(store.index()["patient_id"]) == {"p001"}
    problems = store.verify()
    assert any("p002" in p and "not committed" in p for p in problems)
