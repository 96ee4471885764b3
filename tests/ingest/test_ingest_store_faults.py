"""Store faults seen through ingest: two ingests adding sessions to one patient at once both land; a full disk is
named in the patient's error, and the next ingest leaves a store that verifies without ``--repair``."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from longitudinal.ingest import ingest_cohort
from longitudinal.settings import Settings
from storage.store import PAUSE_ENV, PAUSE_RESUME_ENV, PAUSE_SIGNAL_ENV, CohortStore

KEY = "ingest-test-pseudonym-key"  # the key of the ``settings`` fixture, for the subprocesses
REPO = Path(__file__).resolve().parents[2]
SESSIONS = ("ses-01", "ses-02", "ses-03", "ses-04", "ses-05")


def _subset(tiny_bids: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    """A copy of the tiny cohort holding only sub-001's sessions ``keep``."""
    shutil.copytree(tiny_bids, dst)
    for sub in ("sub-002", "derivatives/labels/sub-002", "derivatives/groundtruth/sub-002"):
        shutil.rmtree(dst / sub, ignore_errors=True)
    for ses in set(SESSIONS) - set(keep):
        shutil.rmtree(dst / "sub-001" / ses)
        shutil.rmtree(dst / "derivatives/labels/sub-001" / ses, ignore_errors=True)
    return dst


def _start_ingest(source: Path, store: str, home: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "longitudinal", "--home", str(home), "ingest", str(source), "--store", store,
           "--spacing", "4"]
    return subprocess.Popen(cmd, env=env, cwd=home.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_for(path: Path, proc: subprocess.Popen, until_exit: bool = False, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            assert until_exit, f"ingest ended before its pause:\n{proc.communicate()[0]}"
            return
        assert time.monotonic() < deadline, "ingest never reached its pause"
        time.sleep(0.05)


@pytest.mark.slow
def test_concurrent_ingests_adding_sessions_to_one_patient_keep_all(tiny_bids: Path, settings: Settings,
                                                                    tmp_path: Path):
    store_url = str(tmp_path / "cohort.zarr")
    seeded = ingest_cohort(_subset(tiny_bids, tmp_path / "seed", SESSIONS[:1]), store_url, settings)
    assert seeded.stored == 1
    first = _subset(tiny_bids, tmp_path / "first", SESSIONS[:3])
    second = _subset(tiny_bids, tmp_path / "second", SESSIONS[:1] + SESSIONS[3:])

    paused, waiting, resume = tmp_path / "first-paused", tmp_path / "second-waiting", tmp_path / "resume"
    env = {k: v for k, v in os.environ.items() if k not in (PAUSE_ENV, PAUSE_SIGNAL_ENV, PAUSE_RESUME_ENV)}
    env |= {"LONGITUDINAL_PSEUDONYM_KEY": KEY, "PYTHONPATH": str(REPO)}
    # The first ingest stops after staging its merged patient, before committing it.
    one = _start_ingest(first, store_url, settings.home_dir, env | {
        PAUSE_ENV: "staged:60", PAUSE_SIGNAL_ENV: str(paused), PAUSE_RESUME_ENV: str(resume)})
    try:
        _wait_for(paused, one)
        # The second runs meanwhile; it signals if it has to wait for the first one's patient lock.
        two = _start_ingest(second, store_url, settings.home_dir, env | {
            PAUSE_ENV: "lock-wait:0", PAUSE_SIGNAL_ENV: str(waiting)})
        try:
            _wait_for(waiting, two, until_exit=True)
            resume.touch()
            out_one, out_two = one.communicate(timeout=240)[0], two.communicate(timeout=240)[0]
        finally:
            two.kill()
    finally:
        one.kill()
    assert one.returncode == 0, out_one
    assert two.returncode == 0, out_two

    store = CohortStore.open(store_url, recover=False)
    assert store.verify() == []
    (pid,) = store.patient_ids()
    stored = {s.session for s in store.sessions(pid)}
    assert len(stored) == 5, f"{len(stored)} of 5 sessions survive the two concurrent ingests"
    days = store.arrays(pid).days
    assert days[0] == 0 and (days[1:] > days[:-1]).all()
    assert store.index()["content_sha256"].is_unique
    # No ingest reports a session as stored that is not in the store.
    reports = [json.loads(p.read_text()) for p in settings.reports_path.glob("ingest-*.json")]
    claimed = [s["session"] for rep in reports for p in rep["patients"] for s in p["sessions"]
               if s["status"] == "stored"]
    assert sorted(claimed) == sorted(stored)


def test_disk_full_is_named_and_the_next_ingest_leaves_a_sound_store(tiny_bids: Path, settings: Settings,
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store_url = str(tmp_path / "cohort.zarr")
    source = _subset(tiny_bids, tmp_path / "src", SESSIONS[:2])
    real = CohortStore._write_staging

    def full(self, name, record, uid):
        real(self, name, record, uid)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CohortStore, "_write_staging", full)
    # As if the writer could not clean up either: its staging stays behind.
    monkeypatch.setattr(CohortStore, "_discard", lambda self, name: None)
    failed = ingest_cohort(source, store_url, settings)
    monkeypatch.undo()
    (patient,) = failed.patients
    assert failed.exit_code() == 2 and patient.error and "disk full" in patient.error
    assert "disk full" in failed.markdown()
    assert any("unfinished write" in p for p in CohortStore.open(store_url, recover=False).verify())

    again = ingest_cohort(source, store_url, settings)
    assert again.exit_code() == 0 and again.stored == 2
    assert CohortStore.open(store_url, recover=False).verify() == []
