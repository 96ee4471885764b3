"""The pseudonym key: created atomically, one key under concurrent first use, never used when empty or short."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longitudinal.settings import MIN_PSEUDONYM_KEY_CHARS, PseudonymKeyError, Settings, load_or_create_key

ROUNDS = 60
PROCESSES = 4


def _first_use(home: str, barrier, out) -> None:
    barrier.wait()  # start together, so every process sees the key file missing
    try:
        out.put(("ok", Settings(home=home).pseudonym_secret.decode()))
    except Exception as exc:  # noqa: BLE001 - the test reports whatever a process raised
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def test_concurrent_first_use_yields_one_full_key(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")  # cheap processes, so many rounds fit in a few seconds
    for round_ in range(ROUNDS):
        home = tmp_path / f"home{round_}"
        barrier, out = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_first_use, args=(str(home), barrier, out)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert [kind for kind, _ in results] == ["ok"] * PROCESSES, (round_, results)
        keys = {key for _, key in results}
        assert len(keys) == 1, (round_, keys)
        (key,) = keys
        assert len(key) == 64 and (home / "secrets" / "pseudonym.key").read_text() == key
        assert oct((home / "secrets" / "pseudonym.key").stat().st_mode & 0o777) == "0o600"
        # No temporary key files are left behind.
        assert sorted(p.name for p in (home / "secrets").iterdir()) == ["pseudonym.key"]


def test_empty_key_file_is_refused_with_how_to_restore(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "pseudonym.key"
    path.parent.mkdir(parents=True)
    path.write_text("")
    with pytest.raises(PseudonymKeyError, match="empty") as info:
        _ = Settings(home=tmp_path).pseudonym_secret
    assert str(path) in str(info.value) and "Restore" in str(info.value)
    path.write_text("abc123\n")
    with pytest.raises(PseudonymKeyError, match="too short"):
        _ = Settings(home=tmp_path).pseudonym_secret
    assert path.read_text() == "abc123\n"  # a bad key is never silently replaced


def test_failed_write_leaves_no_key_and_the_next_use_creates_a_full_one(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "secrets" / "pseudonym.key"

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        load_or_create_key(path)
    assert not path.exists() and list(path.parent.iterdir()) == []
    monkeypatch.undo()
    key = load_or_create_key(path)
    assert len(key) == 64 and load_or_create_key(path) == key


@pytest.mark.parametrize("value", ["", "   ", "x" * (MIN_PSEUDONYM_KEY_CHARS - 1)])
def test_explicit_short_key_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(PseudonymKeyError, match="LONGITUDINAL_PSEUDONYM_KEY"):
        _ = Settings(home=tmp_path, pseudonym_key=value).pseudonym_secret


def test_cli_names_the_empty_key_without_a_traceback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "secrets").mkdir(parents=True)
    (home / "secrets" / "pseudonym.key").write_text("")
    source = tmp_path / "manifest.csv"
    scan = tmp_path / "t1c.nii.gz"
    scan.write_bytes(b"")
    source.write_text(f"patient_id,date,channel,path,label_path\nP1,2024-01-02,T1c,{scan},\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LONGITUDINAL_")}
    env.update(LONGITUDINAL_HOME=str(home), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "longitudinal", "ingest", str(source)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pseudonym key" in proc.stderr and "empty" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "cohort.zarr").exists()
