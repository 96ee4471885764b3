"""Parallel writers (threads, as in a Dask/Prefect map over patients) never undo or mix each other's writes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from storerecords import make_record

from storage.store import CohortStore


def test_parallel_writers_of_different_patients(tmp_path):
    url = str(tmp_path / "c.zarr")
    CohortStore.open(url, create=True)
    pids = [f"p{i:03d}" for i in range(8)]

    def write(pid: str) -> str:
        # Each task opens its own handle (recovery runs on open while others are mid-write).
        store = CohortStore.open(url)
        return store.write_patient(make_record(pid, days=(0.0, 10.0 + int(pid[1:])), seed=int(pid[1:])))

    with ThreadPoolExecutor(max_workers=4) as pool:
        generations = list(pool.map(write, pids))
    store = CohortStore.open(url)
    assert store.patient_ids() == pids
    assert store.verify() == []
    for pid, gen in zip(pids, generations, strict=True):
        assert store.patient_attrs(pid)["commit"]["generation"] == gen
        np.testing.assert_array_equal(
            store.read_patient(pid).image, make_record(pid, days=(0, 1), seed=int(pid[1:])).image
        )
    assert len(store.index()) == 16


def test_racing_writers_of_one_patient_leave_one_complete_version(tmp_path):
    url = str(tmp_path / "c.zarr")
    CohortStore.open(url, create=True)
    seeds = [1, 2, 3, 4]

    def write(seed: int) -> str:
        return CohortStore.open(url).write_patient(make_record("p001", days=(0.0, float(seed)), seed=seed))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(write, seeds))
    store = CohortStore.open(url)
    assert store.verify() == []
    got = store.read_patient("p001")
    seed = int(got.days[1])
    np.testing.assert_array_equal(got.image, make_record("p001", days=(0.0, float(seed)), seed=seed).image)
