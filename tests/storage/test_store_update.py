"""Read-modify-write of one patient (``update_patient``): concurrent updaters, in separate processes, on local
disk and S3, never lose each other's sessions; a commit over a generation it did not read is refused."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import s3fs
from storerecords import appended, make_record, start_updater, wait_for

from storage.store import (
    PAUSE_ENV,
    PAUSE_RESUME_ENV,
    PAUSE_SIGNAL_ENV,
    STAGING,
    CohortStore,
    ConcurrentUpdateError,
)

BASE = {"days": (0.0,), "seed": 0}
A = {"days": (10.0, 20.0), "seed": 1}
B = {"days": (30.0, 40.0), "seed": 2}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _expected_image(days: list[float]) -> np.ndarray:
    """The image series a store holding BASE, A and B must have, by day."""
    by_day = {}
    for spec in (BASE, A, B):
        rec = make_record("p001", days=spec["days"], seed=spec["seed"])
        by_day.update({d: rec.image[i] for i, d in enumerate(spec["days"])})
    return np.stack([by_day[d] for d in days])


def _race(url: str, tmp_path, options=None) -> None:
    """A pauses under the lock after staging its merge; B starts, finds the patient locked, then A goes on."""
    paused, waiting, resume, go = (tmp_path / n for n in ("a-paused", "b-waiting", "resume", "go"))
    a = start_updater(url, "p001", A, options=options, pause={
        PAUSE_ENV: "staged:60", PAUSE_SIGNAL_ENV: str(paused), PAUSE_RESUME_ENV: str(resume)})
    try:
        b = start_updater(url, "p001", B, options=options, go=go, pause={
            PAUSE_ENV: "lock-wait:0", PAUSE_SIGNAL_ENV: str(waiting)})
        try:
            wait_for(paused, a)
            go.touch()
            wait_for(waiting, b, until_exit=True)
            resume.touch()
            out_a, out_b = a.communicate(timeout=90), b.communicate(timeout=90)
        finally:
            b.kill()
    finally:
        a.kill()
    assert a.returncode == 0, out_a
    assert b.returncode == 0, out_b
    assert waiting.exists(), "the second updater never waited for the first"


def _assert_all_sessions(store: CohortStore) -> None:
    assert store.verify() == []
    got = store.read_patient("p001")
    assert got.days.tolist() == [0.0, 10.0, 20.0, 30.0, 40.0], f"{len(got.days)} of 5 sessions survive"
    np.testing.assert_array_equal(got.image, _expected_image(got.days.tolist()))
    assert len(store.index()) == 5


def test_concurrent_updates_in_two_processes_keep_both(tmp_path):
    url = str(tmp_path / "c.zarr")
    store = CohortStore.open(url, create=True)
    store.write_patient(appended(None, "p001", BASE["days"], BASE["seed"]))
    _race(url, tmp_path)
    _assert_all_sessions(CohortStore.open(url, recover=False))


@pytest.mark.slow
def test_concurrent_updates_on_s3_keep_both(s3_url, s3_options, tmp_path):
    store = CohortStore.open(s3_url, create=True, storage_options=s3_options)
    store.write_patient(appended(None, "p001", BASE["days"], BASE["seed"]))
    _race(s3_url, tmp_path, options=s3_options)
    store = CohortStore.open(s3_url, storage_options=s3_options, recover=False)
    _assert_all_sessions(store)
    assert store._listdir(".locks") == []  # every lease was released


def test_update_patient_reads_under_the_lock_and_may_write_nothing(tmp_path):
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    seen = []

    def first(current):
        seen.append(current)
        return appended(current, "p001", BASE["days"], BASE["seed"])

    created = store.update_patient("p001", first)
    assert seen == [None] and created.written
    assert store.patient_attrs("p001")["commit"]["generation"] == created.generation

    unchanged = store.update_patient("p001", lambda current: None)
    assert not unchanged.written and unchanged.generation == created.generation
    with pytest.raises(ValueError, match="returned patient"):
        store.update_patient("p001", lambda current: make_record("p002"))
    assert store.verify() == [] and not os.listdir(tmp_path / "c.zarr" / STAGING)


def test_a_generation_committed_behind_the_lock_is_merged_with_not_overwritten(tmp_path):
    """A blind write landing between an update's read and its commit refuses that commit; the merge reruns."""
    url = str(tmp_path / "c.zarr")
    store = CohortStore.open(url, create=True)
    store.write_patient(appended(None, "p001", BASE["days"], BASE["seed"]))
    calls = []

    def merge(current):
        calls.append(current.days.tolist())
        if len(calls) == 1:  # the lock is re-entrant in this thread: this write gets around it
            CohortStore.open(url).write_patient(appended(current, "p001", A["days"], A["seed"]))
        return appended(current, "p001", B["days"], B["seed"])

    store.update_patient("p001", merge)
    assert calls == [[0.0], [0.0, 10.0, 20.0]]
    _assert_all_sessions(store)

    def always_behind(current):
        CohortStore.open(url).write_patient(current)  # a new generation every time
        return current

    with pytest.raises(ConcurrentUpdateError, match="2 attempts"):
        store.update_patient("p001", always_behind, attempts=2)
    assert store.verify() == []


@pytest.mark.parametrize(("expect", "outcome"), [("read", "rolled forward"), ("other", "dropped")])
def test_recovery_rolls_an_update_forward_only_over_the_generation_it_read(tmp_path, expect, outcome):
    """An update that died after its flip is rolled forward if the patient is still what it read."""
    store = CohortStore.open(tmp_path / "c.zarr", create=True)
    read = store.write_patient(appended(None, "p001", BASE["days"], BASE["seed"]))
    uid = uuid.uuid4().hex
    name = f"p001.{uid}"
    store._write_staging(name, appended(store.read_patient("p001"), "p001", A["days"], A["seed"]), uid)
    journal = {"patient_id": "p001", "generation": uid, "state": "commit", "host": socket.gethostname(),
               "pid": os.getpid(), "writer": "storage", "time": time.time(),
               "expect_generation": read if expect == "read" else uuid.uuid4().hex}
    (tmp_path / "c.zarr" / STAGING / f"{name}.json").write_text(json.dumps(journal))

    done = store.recover()  # this process wrote the journal, but that write is not running any more
    assert any(outcome in line and uid in line for line in done), done
    assert store.verify() == []
    want = [0.0, 10.0, 20.0] if outcome == "rolled forward" else [0.0]
    assert store.read_patient("p001").days.tolist() == want


def test_s3_leases_of_dead_holders_are_broken_and_live_ones_waited_for(s3_url, s3_options):
    store = CohortStore.open(s3_url, create=True, storage_options=s3_options)
    store.write_patient(appended(None, "p001", BASE["days"], BASE["seed"]))
    fs = s3fs.S3FileSystem(**s3_options)
    lease = f"{s3_url[len('s3://'):]}/.locks/p001.lock"
    holder = {"patient_id": "p001", "token": "t", "time": time.time()}

    fs.pipe_file(lease, json.dumps(holder | {"host": socket.gethostname(), "pid": _dead_pid()}).encode())
    store.update_patient("p001", lambda current: appended(current, "p001", A["days"], A["seed"]))
    assert not fs.exists(lease)  # broken, then taken and released by the update

    fs.pipe_file(lease, json.dumps(holder | {"host": "elsewhere", "pid": 1}).encode())  # live, other host
    with pytest.raises(TimeoutError, match="locked by process 1 on elsewhere"):
        with store._patient_lock("p001", timeout_s=0.2):
            pass
    assert CohortStore.open(s3_url, storage_options=s3_options).verify() == []
    assert fs.exists(lease)  # recovery leaves a live holder's lease alone...
    fs.pipe_file(lease, json.dumps(holder | {"host": "elsewhere", "pid": 1, "time": 0.0}).encode())
    assert any("abandoned lock" in line for line in store.recover())  # ...and removes a stale one
    assert not fs.exists(lease)
    assert store.read_patient("p001").days.tolist() == [0.0, 10.0, 20.0]
