"""Synthetic patient records with known content for the cohort-store tests (no downloads).

A plain module (not conftest) so crash-test subprocesses can import it too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from storage.schema import PatientRecord, SessionRecord
from storage.store import PAUSE_ENV, PAUSE_RESUME_ENV, PAUSE_SIGNAL_ENV, CohortStore

GRID = (12, 14, 10)  # (z, y, x) voxels: small, and deliberately not a multiple of any chunk size


def make_session(i: int, days: float, seed: int = 0) -> SessionRecord:
    """A session record whose content hash depends on (seed, i)."""
    return SessionRecord(
        session=f"ses-{i:02d}",
        days=float(days),
        shifted_date=f"2031-{(i % 12) + 1:02d}-15",
        source_sha256={"T1c": f"t1c-{seed}-{i}", "FLAIR": f"flair-{seed}-{i}", "label": f"lab-{seed}-{i}"},
        transform_to_reference=np.eye(4).tolist(),
        registration_metric=-0.5 - 0.01 * i,
        native_shape=[GRID[2], GRID[1], GRID[0]],
        native_affine=np.diag([2.0, 2.0, 2.0, 1.0]).tolist(),
        has_label=True,
        qc_flags=[],
    )


def make_record(
    pid: str = "p001",
    days: tuple[float, ...] = (0.0, 45.5, 120.0),
    seed: int = 0,
    grid: tuple[int, int, int] = GRID,
    channels: tuple[str, ...] = ("T1c", "FLAIR"),
) -> PatientRecord:
    """A patient with T=len(days) sessions of random images and labels in {0, 1, 2}."""
    rng = np.random.default_rng(seed)
    t, c = len(days), len(channels)
    image = rng.normal(size=(t, c, *grid)).astype(np.float32)
    image[:, :, :2] = 0.0  # exact zeros must survive (no fill-value masking by readers)
    label = rng.integers(0, 3, size=(t, *grid)).astype(np.uint8)
    affine = np.array([[2.0, 0, 0, -10.0], [0, 2.0, 0, -14.0], [0, 0, 2.0, -12.0], [0, 0, 0, 1]])
    return PatientRecord(
        patient_id=pid,
        image=image,
        label=label,
        days=np.asarray(days, dtype=np.float64),
        channels=channels,
        spacing_mm=(2.0, 2.0, 2.0),
        reference_affine=affine,
        sessions=[make_session(i, d, seed) for i, d in enumerate(days)],
    )


def appended(current: PatientRecord | None, pid: str, days: tuple[float, ...], seed: int) -> PatientRecord:
    """``current`` (None: no patient yet) plus the sessions of ``make_record(pid, days, seed)``, in day order.

    Added sessions are named ``ses-s<seed>-<i>``, so the appends of different seeds never collide."""
    new = make_record(pid, days=days, seed=seed)
    sessions = [dataclasses.replace(s, session=f"ses-s{seed}-{i}") for i, s in enumerate(new.sessions)]
    if current is None:
        return dataclasses.replace(new, sessions=sessions)
    image = np.concatenate([current.image, new.image])
    label = np.concatenate([current.label, new.label])
    sessions = list(current.sessions) + sessions
    order = np.argsort([s.days for s in sessions], kind="stable")
    return dataclasses.replace(
        current,
        image=image[order],
        label=label[order],
        days=np.asarray([sessions[i].days for i in order], dtype=np.float64),
        sessions=[sessions[i] for i in order],
    )


# --- crash-test helpers: a writer subprocess that pauses at a commit stage -------------------------
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

UPDATER = """
import json, os, sys, time
sys.path[:0] = [{repo!r}, {here!r}]
from storerecords import appended
from storage.store import CohortStore
args = json.loads(sys.argv[1])
store = CohortStore.open(args["url"], storage_options=args.get("options"), recover=False)
days, seed = tuple(args["days"]), args["seed"]
while args["go"] and not os.path.exists(args["go"]):
    time.sleep(0.02)
update = store.update_patient(args["pid"], lambda current: appended(current, args["pid"], days, seed))
print(update.generation)
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


def start_updater(
    url: str, pid: str, spec: dict, pause: dict[str, str] | None = None, options=None, go: Path | None = None
):
    """Start a subprocess appending ``spec``'s sessions to ``pid`` with ``update_patient``.

    ``pause``: extra environment, e.g. {PAUSE_ENV: "staged:60", PAUSE_SIGNAL_ENV: ..., PAUSE_RESUME_ENV: ...}.
    ``go``: the update starts once this file exists (the process is started, and imports, before).
    """
    env = {k: v for k, v in os.environ.items() if k not in (PAUSE_ENV, PAUSE_SIGNAL_ENV, PAUSE_RESUME_ENV)}
    env.update(pause or {})
    args = {"url": url, "pid": pid, "days": list(spec["days"]), "seed": spec["seed"], "options": options,
            "go": str(go) if go else None}
    code = UPDATER.format(repo=str(REPO), here=str(HERE))
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 90.0, until_exit: bool = False) -> None:
    """Wait until ``path`` exists (a writer reached its pause); with ``until_exit`` the writer's exit ends the
    wait as well (a writer that never needs to pause there)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            assert until_exit, f"writer exited before reaching its pause: {proc.communicate()}"
            return
        assert time.monotonic() < deadline, "writer never reached its pause"
        time.sleep(0.02)


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
