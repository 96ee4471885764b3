"""A full disk (ENOSPC, or EDQUOT for a spent quota) during a write: the error says "disk full", the patient
keeps its old version, and whatever the failed write left behind is cleaned by the next open, so verify passes
without ``--repair``."""

from __future__ import annotations

import errno
import os

import pytest
from storerecords import NEW, OLD, assert_patient_is, make_record

from storage.store import STAGING, CohortStore, StoreFullError


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


def _full_after_partial_staging(code: int):
    """A _write_staging that writes part of the staged group, then hits a full disk."""
    real = CohortStore._write_staging

    def write(self, name, record, uid):
        real(self, name, record, uid)
        raise OSError(code, os.strerror(code), self._path(STAGING, name, "image", "c", "0"))

    return write


def _store_with_old(tmp_path) -> tuple[str, CohortStore]:
    url = str(tmp_path / "c.zarr")
    store = CohortStore.open(url, create=True)
    store.write_patient(make_record("p001", days=OLD["days"], seed=OLD["seed"]))
    return url, store


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_staging_is_named_and_rolled_back(tmp_path, monkeypatch, code):
    url, store = _store_with_old(tmp_path)
    monkeypatch.setattr(CohortStore, "_write_staging", _full_after_partial_staging(code))
    with pytest.raises(StoreFullError, match=r"^disk full") as caught:
        store.write_patient(make_record("p001", days=NEW["days"], seed=NEW["seed"]))
    assert caught.value.errno == code and isinstance(caught.value, OSError)
    assert "p001" in str(caught.value)
    with pytest.raises(StoreFullError, match=r"^disk full"):
        store.update_patient("p001", lambda current: make_record("p001", days=NEW["days"], seed=NEW["seed"]))
    # The failed writes cleaned up after themselves: sound at once, no recovery needed.
    assert CohortStore.open(url, recover=False).verify() == []
    assert_patient_is(store, "p001", OLD)


def test_a_full_journal_write_leaves_no_temp_file(tmp_path, monkeypatch):
    url, store = _store_with_old(tmp_path)
    monkeypatch.setattr(os, "fsync", _fail_with(errno.ENOSPC))
    with pytest.raises(StoreFullError, match="disk full"):
        store.write_patient(make_record("p001", days=NEW["days"], seed=NEW["seed"]))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "c.zarr" / STAGING) == []
    assert CohortStore.open(url, recover=False).verify() == []


def test_leftovers_the_failed_write_could_not_remove_are_cleaned_on_the_next_open(tmp_path, monkeypatch):
    url, store = _store_with_old(tmp_path)
    monkeypatch.setattr(CohortStore, "_write_staging", _full_after_partial_staging(errno.ENOSPC))
    monkeypatch.setattr(CohortStore, "_discard", lambda self, name: None)  # as if its clean-up never ran
    with pytest.raises(StoreFullError):
        store.write_patient(make_record("p001", days=NEW["days"], seed=NEW["seed"]))
    monkeypatch.undo()
    # The writer (this very process) is alive, but its write is over: its staging is debris.
    assert any("unfinished write" in p for p in CohortStore.open(url, recover=False).verify())
    reopened = CohortStore.open(url)
    assert reopened.verify() == []
    assert_patient_is(reopened, "p001", OLD)


def test_disk_full_after_the_flip_is_rolled_forward_on_the_next_open(tmp_path, monkeypatch):
    url, store = _store_with_old(tmp_path)
    monkeypatch.setattr(CohortStore, "_write_index_fragment", _fail_with(errno.ENOSPC))
    with pytest.raises(StoreFullError, match="disk full"):
        store.write_patient(make_record("p001", days=NEW["days"], seed=NEW["seed"]))
    monkeypatch.undo()
    assert CohortStore.open(url, recover=False).verify() != []  # the index still describes the old version
    reopened = CohortStore.open(url)
    assert reopened.verify() == []
    assert_patient_is(reopened, "p001", NEW)
