"""`stack down` signals only the processes it started: a recorded pid now held by another process is left alone.

Harmless `sleep` processes stand in for the servers; a stale record is simulated by recording one process's pid
with an identity it does not have (another start time, another boot, another command line), or by a state file
written before identities were recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from stackhelpers import cli, offline_env, pid_gone

from longitudinal.settings import Settings
from longitudinal.stack import process
from longitudinal.stack.config import free_port, resolve_config
from longitudinal.stack.local import (
    DownReport,
    Service,
    StackState,
    read_state,
    stack_down,
    stack_status,
    stack_up,
)
from longitudinal.stack.process import (
    DetachedProcess,
    ProcessIdentity,
    StackError,
    check_process,
    process_identity,
    start_detached,
    stop_group,
)

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    """Start processes with ``start_detached``; whatever a test leaves running is killed afterwards."""
    started: list[int] = []

    def start(*argv: str) -> DetachedProcess:
        proc = start_detached(list(argv), env=ENV, log_path=tmp_path / f"proc-{len(started)}.log")
        started.append(proc.pid)
        assert proc.identity is not None
        return proc

    yield start
    for pid in started:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def record(stack_dir: Path, *services: Service) -> None:
    """Write a state file recording ``services`` (ports nobody listens on)."""
    state = StackState("http://x/api", "http://y", "127.0.0.1", ["cpu"], {s.name: s for s in services}, 0.0)
    stack_dir.mkdir(parents=True, exist_ok=True)
    (stack_dir / "state.json").write_text(state.to_json())


def service(name: str, pid: int, identity: ProcessIdentity | None) -> Service:
    port = free_port()
    return Service(name, pid, port, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/", "log", identity)


def alive(pid: int) -> bool:
    return not pid_gone(pid)


def test_identity_is_start_time_boot_and_command_line(spawn) -> None:
    proc = spawn("sleep", "300")
    stat = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert proc.identity == ProcessIdentity(start_time=stat[19], boot_id=boot, cmdline=("sleep", "300"))
    assert process_identity(proc.pid) == proc.identity
    assert check_process(proc.pid, proc.identity).state == "running"


def test_identities_match_on_start_boot_and_command_line() -> None:
    ident = ProcessIdentity("100", "boot-a", ("sleep", "300"))
    assert ident.matches(ident)
    assert not ident.matches(replace(ident, start_time="101"))
    assert not ident.matches(replace(ident, boot_id="boot-b"))
    assert not ident.matches(replace(ident, cmdline=("sleep", "301")))
    # /proc shows an empty command line just after exec and while exiting: start time and boot decide.
    assert ident.matches(replace(ident, cmdline=())) and replace(ident, cmdline=()).matches(ident)
    assert not ident.matches(ProcessIdentity("101", "boot-a", ()))


def test_state_file_round_trips_the_identity(spawn, tmp_path: Path) -> None:
    proc = spawn("sleep", "300")
    svc = service("web", proc.pid, proc.identity)
    record(tmp_path / "stack", svc)
    raw = json.loads((tmp_path / "stack" / "state.json").read_text())["services"]["web"]["identity"]
    assert raw["cmdline"] == ["sleep", "300"] and raw["start_time"] == proc.identity.start_time
    assert read_state(tmp_path / "stack").services["web"] == svc


def test_down_stops_a_process_that_matches_its_record(spawn, tmp_path: Path) -> None:
    proc = spawn("sleep", "300")
    record(tmp_path / "stack", service("web", proc.pid, proc.identity))
    assert stack_down(tmp_path / "stack", port_timeout_s=1) == DownReport(stopped=["web"])
    assert pid_gone(proc.pid)
    assert read_state(tmp_path / "stack") is None


@pytest.mark.parametrize(
    ("stale", "reason"),
    [
        (lambda ident: replace(ident, start_time=str(int(ident.start_time) - 1)), "its start time is"),
        (lambda ident: replace(ident, boot_id="00000000-0000-0000-0000-000000000000"), "restarted"),
    ],
    ids=["start-time", "reboot"],
)
def test_down_leaves_a_process_that_took_over_the_pid_alone(
    spawn, tmp_path: Path, stale, reason: str
) -> None:
    mine = spawn("sleep", "300")
    other = spawn("sleep", "301")
    # The record says pid `other` is a process started earlier (or before a reboot): it is not ours any more.
    record(
        tmp_path / "stack",
        service("web", other.pid, stale(other.identity)),
        service("ml", mine.pid, mine.identity),
    )
    report = stack_down(tmp_path / "stack", port_timeout_s=1)
    assert alive(other.pid), "down killed a process it did not start"
    assert pid_gone(mine.pid)
    assert report.stopped == ["ml"] and report.problems == []
    [warning] = report.warnings
    assert f"the recorded process is gone and pid {other.pid} now belongs to another process" in warning
    assert reason in warning and "left it alone and cleared the record" in warning
    assert read_state(tmp_path / "stack") is None  # the stale record is cleared


def test_down_leaves_alone_a_pid_running_another_command(spawn, tmp_path: Path) -> None:
    # A pid handed to a program other than the one recorded, even with the same start time.
    other = spawn("sleep", "301")
    record(tmp_path / "stack", service("web", other.pid, replace(other.identity, cmdline=("sleep", "300"))))
    report = stack_down(tmp_path / "stack", port_timeout_s=1)
    assert alive(other.pid)
    [warning] = report.warnings
    assert f"pid {other.pid} no longer runs the recorded command" in warning and "'sleep 301'" in warning
    assert report.problems == [] and read_state(tmp_path / "stack") is None


def test_cli_down_names_the_stale_pid_and_exits_0(spawn, tmp_path: Path) -> None:
    other = spawn("sleep", "301")
    stale = replace(other.identity, start_time=str(int(other.identity.start_time) - 1))
    record(tmp_path / "stack", service("web", other.pid, stale))
    down = cli(offline_env(tmp_path), "stack", "down", check=False)
    assert alive(other.pid)
    assert down.returncode == 0, down.stdout + down.stderr
    err = " ".join(down.stderr.split())
    assert (
        f"warning: web: the recorded process is gone and pid {other.pid} now belongs to another process"
        in err
    )
    assert "stopped: nothing" in down.stdout
    assert not (tmp_path / "stack" / "state.json").exists()


def test_an_old_state_file_is_not_signalled_and_down_says_how_to_stop_it(spawn, tmp_path: Path) -> None:
    proc = spawn("sleep", "300")
    svc = service("web", proc.pid, None)
    record(tmp_path / "stack", svc)
    # Exactly what older versions wrote: no "identity" key at all.
    raw = json.loads((tmp_path / "stack" / "state.json").read_text())
    del raw["services"]["web"]["identity"]
    (tmp_path / "stack" / "state.json").write_text(json.dumps(raw))
    assert read_state(tmp_path / "stack").services["web"].identity is None

    down = cli(offline_env(tmp_path), "stack", "down", check=False)
    assert alive(proc.pid)
    assert down.returncode == 1
    err = " ".join(down.stderr.split())
    assert f"web: not signalled: pid {proc.pid} was recorded without its start time and command line" in err
    assert f"kill -TERM -- -{proc.pid}" in err
    # No later `down` could verify it either, so the record goes; the message carries the pid.
    assert not (tmp_path / "stack" / "state.json").exists()


def test_stop_group_spares_a_pid_and_its_descendants_that_are_not_the_recorded_process(
    spawn, tmp_path: Path
) -> None:
    script = (
        "import subprocess, sys, time\n"
        "a = subprocess.Popen(['sleep', '300'])\n"
        "b = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
        "print(a.pid, b.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    tree = start_detached([sys.executable, "-c", script], env=ENV, log_path=tmp_path / "tree.log")
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "tree.log").read_text().strip():
            time.sleep(0.1)
        kids = [int(x) for x in (tmp_path / "tree.log").read_text().split()]
        stale = replace(tree.identity, start_time=str(int(tree.identity.start_time) - 1))
        assert stop_group(tree.pid, stale, grace_s=1) == []
        assert all(alive(p) for p in [tree.pid, *kids])
        record(tmp_path / "stack", service("tree", tree.pid, stale))
        stack_down(tmp_path / "stack", port_timeout_s=1)
        assert all(alive(p) for p in [tree.pid, *kids])
    finally:
        for p in (tree.pid, *kids):
            try:
                os.killpg(p, signal.SIGKILL)
            except OSError:
                pass


def test_a_dead_leaders_leftovers_are_reported_not_signalled(tmp_path: Path) -> None:
    # The leader exits and leaves a child in its process group: the leader can no longer vouch for it.
    script = "import subprocess; print(subprocess.Popen(['sleep', '300']).pid, flush=True)"
    log = tmp_path / "leader.log"
    leader = start_detached([sys.executable, "-c", script], env=ENV, log_path=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pid_gone(leader.pid) and log.read_text().strip()):
        time.sleep(0.1)
    child = int(log.read_text())
    try:
        record(tmp_path / "stack", service("web", leader.pid, leader.identity))
        report = stack_down(tmp_path / "stack", port_timeout_s=1)
        assert alive(child)
        assert report.already_gone == ["web"] and report.problems == []
        [warning] = report.warnings
        assert f"pids [{child}] are in process group {leader.pid} and were not signalled" in warning
    finally:
        os.kill(child, signal.SIGKILL)


def test_status_and_up_see_a_taken_over_pid_as_not_running(spawn, tmp_path: Path) -> None:
    other = spawn("sleep", "301")
    stale = replace(other.identity, start_time=str(int(other.identity.start_time) - 1))
    record(tmp_path / "stack", service("web", other.pid, stale))
    [row] = stack_status(tmp_path / "stack")
    assert not row.alive and "now belongs to another process" in row.note
    # `up` goes past the stale record (and stops at the invalid config instead of "already running").
    cfg = resolve_config(Settings(home=tmp_path), worker_pools=("tpu",), prefect_port=0, mlflow_port=0)
    with pytest.raises(StackError, match="cannot start the stack"):
        stack_up(cfg)
    record(tmp_path / "stack", service("web", other.pid, other.identity))
    with pytest.raises(StackError, match="already running"):
        stack_up(cfg)
    assert alive(other.pid)


@pytest.mark.skipif(shutil.which("ps") is None, reason="needs ps")
def test_without_proc_the_identity_comes_from_ps(
    spawn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    proc = spawn("sleep", "300")
    other = spawn("sleep", "301")
    monkeypatch.setattr(process, "PROC", tmp_path / "no-proc")
    ident = process_identity(proc.pid)
    assert ident is not None and ident.cmdline == ("sleep 300",)
    assert check_process(proc.pid, ident).state == "running"
    assert check_process(other.pid, ident).state == "replaced"
    assert stop_group(other.pid, ident, grace_s=1) == [] and alive(other.pid)
    assert stop_group(proc.pid, ident, grace_s=5) == [] and pid_gone(proc.pid)
