"""verify() finds each kind of fault, names the patient, and leaves sound patients alone."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import zarr
from storerecords import make_record

from storage.store import CohortStore


@pytest.fixture
def store(tmp_path):
    s = CohortStore.open(tmp_path / "c.zarr", create=True)
    s.write_patient(make_record("p001"))
    s.write_patient(make_record("p002", days=(0.0, 30.0), seed=2))
    assert s.verify() == []
    return s


def _root(store):
    from pathlib import Path

    return Path(store.url)


def _only_about(problems, pid):
    assert problems, "expected at least one fault"
    assert all(pid in p for p in problems), problems


def test_corrupted_chunk_bytes(store):
    chunk = _root(store) / "patients/p001/image/c/1/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    data[-3] ^= 0x55
    chunk.write_bytes(bytes(data))
    problems = store.verify()
    _only_about(problems, "p001")
    assert any("data unreadable" in p or "checksum mismatch" in p for p in problems)


def test_silently_changed_voxels_fail_the_checksum(store):
    image = zarr.open_array(str(_root(store)), path="patients/p001/image", mode="r+")
    image[2, 0, 5, 5, 5] = 1234.5  # a valid chunk with different content
    problems = store.verify()
    _only_about(problems, "p001")
    assert any("checksum mismatch" in p for p in problems)


def test_missing_index_row(store):
    frag = _root(store) / "index/p001.parquet"
    df = pd.read_parquet(frag)
    df.iloc[:2].to_parquet(frag)
    problems = store.verify()
    _only_about(problems, "p001")
    assert any("index has 2 rows for 3 sessions" in p for p in problems)


def test_index_hash_differs(store):
    frag = _root(store) / "index/p002.parquet"
    df = pd.read_parquet(frag)
    df.loc[1, "content_sha256"] = "0" * 64
    df.to_parquet(frag)
    problems = store.verify()
    _only_about(problems, "p002")
    assert any("content_sha256" in p for p in problems)


def test_missing_index_fragment(store):
    (_root(store) / "index/p002.parquet").unlink()
    problems = store.verify()
    _only_about(problems, "p002")
    assert any("index has 0 rows for 2 sessions" in p for p in problems)


def test_wrong_shape(store):
    label = zarr.open_array(str(_root(store)), path="patients/p001/label", mode="r+")
    label.resize((2, *label.shape[1:]))
    problems = store.verify()
    _only_about(problems, "p001")
    assert any("time lengths differ" in p for p in problems)


def test_time_not_increasing(store):
    t = zarr.open_array(str(_root(store)), path="patients/p001/time", mode="r+")
    t[:] = [0.0, 120.0, 45.5]
    problems = store.verify()
    _only_about(problems, "p001")
    assert any("strictly increase" in p for p in problems)


def test_missing_array(store):
    shutil.rmtree(_root(store) / "patients/p002/label")
    problems = store.verify()
    _only_about(problems, "p002")
    assert any("'label' missing" in p for p in problems)


def test_uncommitted_group_and_stray_staging(store):
    root = _root(store)
    shutil.copytree(root / "patients/p001", root / "patients/p003")
    meta = json.loads((root / "patients/p003/zarr.json").read_text())
    del meta["attributes"]["commit"]
    (root / "patients/p003/zarr.json").write_text(json.dumps(meta))
    (root / ".staging/p004.deadbeef").mkdir(parents=True)
    problems = store.verify()
    assert any("p003" in p and "not committed" in p for p in problems)
    assert any(".staging/p004.deadbeef" in p for p in problems)
    # Readers ignore the uncommitted group.
    assert store.patient_ids() == ["p001", "p002"]
    assert set(store.index()["patient_id"]) == {"p001", "p002"}


def test_index_fragment_without_patient(store):
    shutil.copy(_root(store) / "index/p002.parquet", _root(store) / "index/p009.parquet")
    problems = store.verify()
    assert problems == ["index: fragment p009.parquet does not belong to a committed patient"]


def test_wrong_schema_version(store):
    root = _root(store)
    meta = json.loads((root / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (root / "zarr.json").write_text(json.dumps(meta))
    assert any("schema_version 99" in p for p in store.verify())
    with pytest.raises(ValueError, match="schema_version 99"):
        CohortStore.open(root)
