"""Crash safety: a writer SIGKILLed at any step of the commit leaves the patient absent, old or new -- never partial.

The writer runs in a subprocess with COHORT_STORE_PAUSE=<stage>:<seconds>, which makes it sleep at that step
and touch a signal file; the test then SIGKILLs it, reopens the store (recovery) and checks everything.
"""

from __future__ import annotations

import signal
import time

import pytest
from storerecords import NEW, OLD, assert_patient_is, kill_when_paused, make_record, start_writer

from storage.store import CohortStore

# (stage killed at, existing patient before?, what recovery must show)
CASES = [
    ("staged", True, "old"),  # staged group complete, journal not flipped: roll back
    ("committing", True, "new"),  # journal says commit: roll forward
    ("swapped", True, "new"),  # between the two renames: patient briefly absent, rolled forward
    ("staged", False, "absent"),
    ("swapped", False, "new"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "existing", "outcome"), CASES)
def test_sigkill_mid_write_then_recover(tmp_path, stage, existing, outcome):
    url = str(tmp_path / "c.zarr")
    store = CohortStore.open(url, create=True)
    store.write_patient(make_record("other", days=(0.0, 10.0), seed=9))
    if existing:
        store.write_patient(make_record("p001", days=OLD["days"], seed=OLD["seed"]))
    signal_file = tmp_path / "paused"
    proc = start_writer(url, "p001", NEW, stage, signal_file)
    kill_when_paused(proc, signal_file)

    # Before recovery: readers never see a partial patient, and verify names the leftovers.
    raw = CohortStore.open(url, recover=False)
    visible = raw.patient_ids()
    assert "other" in visible
    if "p001" in visible:
        raw.read_patient("p001")  # whatever is visible is complete and readable
    assert any("unfinished write" in p for p in raw.verify())

    healed = CohortStore.open(url)  # recovery runs on open
    assert healed.verify() == []
    expected = {"old": OLD, "new": NEW, "absent": None}[outcome]
    assert_patient_is(healed, "p001", expected)
    assert_patient_is(healed, "other", {"days": (0.0, 10.0), "seed": 9})

    # Rerunning the interrupted write lands it exactly once.
    rerun = start_writer(url, "p001", NEW, None, signal_file)
    assert rerun.wait(timeout=120) == 0
    final = CohortStore.open(url)
    assert final.verify() == []
    assert_patient_is(final, "p001", NEW)
    assert not any((tmp_path / "c.zarr" / ".staging").iterdir())


@pytest.mark.slow
def test_recovery_leaves_live_writers_alone(tmp_path):
    url = str(tmp_path / "c.zarr")
    CohortStore.open(url, create=True).write_patient(make_record("p001", days=OLD["days"], seed=OLD["seed"]))
    signal_file = tmp_path / "paused"
    proc = start_writer(url, "p001", NEW, "staged", signal_file)
    try:
        deadline = time.monotonic() + 90
        while not signal_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        other = CohortStore.open(url)  # a parallel worker opening the store must not undo this write
        assert other.recover() == []
        staged = [p.name for p in (tmp_path / "c.zarr" / ".staging").iterdir()]
        assert len(staged) == 2 and any(n.endswith(".json") for n in staged)
        assert_patient_is(other, "p001", OLD)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    after = CohortStore.open(url)
    assert after.verify() == []
    assert_patient_is(after, "p001", OLD)


@pytest.mark.slow
def test_abandoned_commit_does_not_override_a_later_write(tmp_path):
    url = str(tmp_path / "c.zarr")
    CohortStore.open(url, create=True).write_patient(make_record("p001", days=OLD["days"], seed=OLD["seed"]))
    signal_file = tmp_path / "paused"
    proc = start_writer(url, "p001", NEW, "committing", signal_file)
    kill_when_paused(proc, signal_file)
    # A writer that skipped recovery commits a newer version before anyone rolls the dead one forward.
    newest = {"days": (0.0, 7.0), "seed": 5}
    CohortStore.open(url, recover=False).write_patient(make_record("p001", days=newest["days"], seed=5))
    healed = CohortStore.open(url)
    assert healed.verify() == []
    assert_patient_is(healed, "p001", newest)
