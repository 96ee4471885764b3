"""Crash safety: SIGKILL an ingest subprocess in the middle of a patient's commit, rerun it; the store verifies
and holds every session exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.store import PAUSE_ENV, PAUSE_SIGNAL_ENV, CohortStore

KEY = "ingest-test-pseudonym-key"
REPO = Path(__file__).resolve().parents[2]


def _ingest_cmd(source: Path, store: str, home: Path) -> list[str]:
    return [sys.executable, "-m", "longitudinal", "--home", str(home), "ingest", str(source),
            "--store", store, "--spacing", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["staged", "committing"])
def test_sigkill_mid_ingest_then_rerun(tiny_bids: Path, tmp_path: Path, stage: str):
    store_url = str(tmp_path / "cohort.zarr")
    home = tmp_path / "home"
    signal_file = tmp_path / "paused"
    env = {**os.environ, "LONGITUDINAL_PSEUDONYM_KEY": KEY, PAUSE_ENV: f"{stage}:300",
           PAUSE_SIGNAL_ENV: str(signal_file), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_ingest_cmd(tiny_bids, store_url, home), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not signal_file.exists():
            assert proc.poll() is None, "ingest ended before reaching the pause point"
            assert time.monotonic() < deadline, "ingest never reached the pause point"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    env.pop(PAUSE_ENV)
    rerun = subprocess.run(_ingest_cmd(tiny_bids, store_url, home), env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    store = CohortStore.open(store_url)
    assert store.verify() == []
    index = store.index()
    assert len(index) == 9  # sub-001: 5 sessions, sub-002: 4
    assert index["content_sha256"].is_unique
    assert index.groupby("patient_id").size().sort_values().tolist() == [4, 5]
    for pid in store.patient_ids():
        days = store.arrays(pid).days
        assert days[0] == 0 and (days[1:] > days[:-1]).all()
