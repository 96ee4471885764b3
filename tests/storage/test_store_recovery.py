"""Recovery rules without subprocess timing: dead owners are cleaned, live or recent foreign ones kept."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from storerecords import make_record

from storage.store import STALE_AFTER_S, TEMP_STALE_S, CohortStore


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _journal(root, name, **fields):
    body = {"patient_id": name.split(".")[0], "generation": name.split(".")[1], "state": "writing"} | fields
    (root / ".staging" / f"{name}.json").write_text(json.dumps(body))
    (root / ".staging" / name).mkdir()
    (root / ".staging" / name / "zarr.json").write_text("{}")


def test_recovery_rules(tmp_path):
    root = tmp_path / "c.zarr"
    store = CohortStore.open(root, create=True)
    store.write_patient(make_record("p001", days=(0.0, 3.0)))
    host, now = socket.gethostname(), time.time()
    _journal(root, "p002.aaaa", host=host, pid=_dead_pid(), time=now)  # dead local writer
    _journal(root, "p003.bbbb", host=host, pid=os.getpid(), time=now)  # this process: alive
    _journal(root, "p004.cccc", host="elsewhere", pid=1, time=now)  # other host, recent: alive
    _journal(root, "p005.dddd", host="elsewhere", pid=1, time=now - STALE_AFTER_S - 1)  # other host, stale
    (root / ".staging" / "p006.eeee").mkdir()  # staging without a journal: debris
    (root / ".trash" / "p007.ffff").mkdir(parents=True, exist_ok=True)  # trash without a journal: debris
    old_tmp = root / "index" / ".p001.parquet.1234.tmp"
    old_tmp.write_bytes(b"partial")
    os.utime(old_tmp, (now - TEMP_STALE_S - 5, now - TEMP_STALE_S - 5))
    fresh_tmp = root / "index" / ".p001.parquet.5678.tmp"
    fresh_tmp.write_bytes(b"in flight")

    done = store.recover()
    left = sorted(p.name for p in (root / ".staging").iterdir())
    assert left == ["p003.bbbb", "p003.bbbb.json", "p004.cccc", "p004.cccc.json"]
    assert not list((root / ".trash").iterdir())
    assert not old_tmp.exists() and fresh_tmp.exists()
    assert (
        any("p002" in d for d in done) and any("p005" in d for d in done) and any("p006" in d for d in done)
    )
    # Live writers' leftovers are still reported by verify, never silently accepted.
    problems = store.verify()
    assert any("p003.bbbb" in p for p in problems) and any("p004.cccc" in p for p in problems)
    assert store.patient_ids() == ["p001"] and len(store.index()) == 2
