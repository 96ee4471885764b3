"""Crash safety: a writer SIGKILLed at any step of the commit leaves the patient absent, old or new -- never partial.

The writer runs in a subprocess with COHORT_STORE_PAUSE=<stage>:<seconds>, which makes it sleep at that step
and touch a signal file; the test then SIGKILLs it, reopens the store (recovery) and checks everything.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from storerecords import make_record

from storage.store import PAUSE_ENV, PAUSE_SIGNAL_ENV, CohortStore

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

WRITER = """
import json, sys
sys.path[:0] = [{repo!r}, {here!r}]
from storerecords import make_record
from storage.store import CohortStore
args = json.loads(sys.argv[1])
store = CohortStore.open(args["url"], storage_options=args.get("options"))
store.write_patient(make_record(args["pid"], days=tuple(args["days"]), seed=args["seed"]))
print("done")
"""

OLD = {"days": (0.0, 45.5, 120.0), "seed": 0}
NEW = {"days": (0.0, 30.0, 45.5, 120.0), "seed": 1}


def start_writer(url: str, pid: str, spec: dict, stage: str | None, signal_file: Path, options=None):
    """Start a writer subprocess; with ``stage`` it pauses there (after touching ``signal_file``)."""
    env = dict(os.environ)
    env.pop(PAUSE_ENV, None)
    if stage:
        env[PAUSE_ENV] = f"{stage}:120"
        env[PAUSE_SIGNAL_ENV] = str(signal_file)
    args = {"url": url, "pid": pid, "days": list(spec["days"]), "seed": spec["seed"], "options": options}
    code = WRITER.format(repo=str(REPO), here=str(HERE))
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], env=env, stdout=subprocess.PIPE)


def kill_when_paused(proc: subprocess.Popen, signal_file: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not signal_file.exists():
        assert proc.poll() is None, "writer exited before reaching the pause"
        assert time.monotonic() < deadline, "writer never reached the pause"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # reap it, so its pid is really gone


def assert_patient_is(store: CohortStore, pid: str, spec: dict | None) -> None:
    if spec is None:
        assert pid not in store.patient_ids()
        assert pid not in set(store.index()["patient_id"])
        return
    want = make_record(pid, days=spec["days"], seed=spec["seed"])
    got = store.read_patient(pid)
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.label, want.label)
    np.testing.assert_array_equal(got.days, want.days)
    rows = store.index()
    rows = rows[rows.patient_id == pid]
    assert rows["days"].tolist() == list(spec["days"])  # each session exactly once


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
